"""Block devices: the interface every export implements (base.py) and the in-memory reference
device (memory.py). The cache, an overlay included, is a ``BlockDevice`` of its own package (cache/)."""

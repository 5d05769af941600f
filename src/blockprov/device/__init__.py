"""Block devices: the layers of an agent's export (cache, overlay, memory for tests)."""

"""The repository's HTTP service (``blockprov serve``): API in app.py, raw disk view in rawview.py,
server lifecycle in run.py. Imported lazily by the CLI so local-only commands never load FastAPI."""

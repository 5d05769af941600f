"""The repository's HTTP service (``blockprov serve``): the app in app.py, its routes by area in routes/,
what they share in state.py, the error edge in edge.py, the raw disk view in rawview.py, server
lifecycle in run.py. Imported lazily by the CLI so local-only commands never load FastAPI."""

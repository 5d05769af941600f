"""Repositories: the local embedded one, the HTTP client and the failover over several servers share
one interface (base.py, split by role)."""

"""Repositories: the local embedded one and the HTTP client share one interface."""

"""Transports: HTTP/JSON (FastAPI) over the engine's Service."""

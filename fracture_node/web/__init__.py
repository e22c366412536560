"""The node's HTTP server: web console, JSON API and STOW-RS (FastAPI on uvicorn)."""

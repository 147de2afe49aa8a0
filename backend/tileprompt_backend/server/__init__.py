"""The local HTTP service (FastAPI + uvicorn on 127.0.0.1, bearer token): ``tileprompt serve``. See docs/service.md."""

from .app import create_app
from .main import serve

__all__ = ["create_app", "serve"]

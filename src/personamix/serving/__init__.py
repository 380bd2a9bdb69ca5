"""Serving: `personamix serve`, an OpenAI-compatible API over one Generator (app.py), its
request/response shapes (protocol.py) and the playground page (playground.html)."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]

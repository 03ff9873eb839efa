"""``llm_gateway.server.asgi:app``: the gateway app made from the environment at import.

For ASGI servers without a factory option; ``uvicorn --factory
llm_gateway.server.app:create_app`` is the same. Importing it reads the environment but does
no I/O: the app connects at startup (its lifespan).
"""

from __future__ import annotations

from .app import create_app

__all__ = ["app"]

app = create_app()

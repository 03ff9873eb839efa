"""The OpenAI-compatible gateway server: its ASGI app and the virtual keys it authenticates.

``create_app`` (``llm_gateway.server.app``) needs the ``server`` extra; it is imported on
first use, so ``import llm_gateway.server.virtual_keys`` (the ``keys`` commands) does not load
Starlette. The app made from the environment: ``llm_gateway.server.asgi:app``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .virtual_keys import VirtualKey, VirtualKeyStore

__all__ = ["VirtualKey", "VirtualKeyStore", "create_app"]

_EXPORTS = {"create_app": "app", "VirtualKey": "virtual_keys", "VirtualKeyStore": "virtual_keys"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)

"""The OpenAI-compatible gateway server: its ASGI app and the virtual keys it authenticates."""

"""Deterministic structured answers: tool calls and JSON-mode content for a chat request.

Values are made from the JSON schemas the request carries (a tool's ``parameters``, a
``response_format``'s ``json_schema.schema``): every property is filled, strings with the
last user message, numbers with their ``minimum`` or 1, enums with their first value. Pure
functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .behaviour import dumps

__all__ = ["json_content", "planned_calls", "schema_instance"]

_MAX_DEPTH = 8


def schema_instance(schema: object, text: str, depth: int = 0) -> Any:
    """A value valid for the common subset of JSON Schema that function calling uses.

    Supports ``type`` (also a list), ``properties``, ``items``, ``enum``, ``const``,
    ``anyOf``/``oneOf``, ``minimum`` and ``minItems``; ``$ref`` and anything deeper than a
    few levels get ``text``.
    """
    if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
        return text
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return schema_instance(options[0], text, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the first that is not null
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and isinstance(schema.get("properties"), Mapping):
        kind = "object"
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, Mapping):
            return {}
        return {str(k): schema_instance(v, text, depth + 1) for k, v in properties.items()}
    if kind == "array":
        count = schema.get("minItems")
        count = count if type(count) is int and 1 <= count <= 8 else 1
        return [schema_instance(schema.get("items"), text, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        low = schema.get("minimum")
        if isinstance(low, (int, float)) and not isinstance(low, bool):
            return int(low) if kind == "integer" else low
        return 1
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text


def _functions(tools: object) -> list[Mapping[str, Any]]:
    """The ``function`` objects of the request's function tools, in order."""
    if not isinstance(tools, list):
        return []
    found = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            found.append(fn)
    return found


def planned_calls(body: Mapping[str, Any], text: str) -> list[tuple[str, str]]:
    """``(name, arguments JSON)`` of the calls to answer ``body`` with (``[]``: answer text).

    ``tool_choice: "none"`` calls nothing; naming a function calls that one; otherwise the
    first tool is called, or every tool when the request says ``parallel_tool_calls: true``.
    """
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return []
    choice = body.get("tool_choice")
    if choice == "none":
        return []
    functions = _functions(tools)
    forced = choice.get("function") if isinstance(choice, Mapping) else None
    if isinstance(forced, Mapping) and isinstance(forced.get("name"), str):
        name = forced["name"]
        functions = [fn for fn in functions if fn["name"] == name] or [{"name": name}]
    elif body.get("parallel_tool_calls") is not True:
        functions = functions[:1]
    if not functions:  # tools, but none a function (e.g. a built-in tool type)
        return [("tool", "{}")]
    return [
        (fn["name"], dumps(schema_instance(fn.get("parameters"), text)).decode())
        for fn in functions
    ]


def json_content(body: Mapping[str, Any], text: str) -> str | None:
    """The JSON text answering a JSON-mode request, ``None`` when it asks for plain text."""
    fmt = body.get("response_format")
    if not isinstance(fmt, Mapping):
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return dumps({"answer": text}).decode()
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        value = schema_instance(schema, text) if schema is not None else {"answer": text}
        return dumps(value).decode()
    return None

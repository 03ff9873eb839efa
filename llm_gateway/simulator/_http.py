"""Minimal HTTP/1.1 framing over asyncio streams: read one request, write one response."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from .behaviour import dumps

__all__ = [
    "JSON",
    "TERMINATOR",
    "BadRequest",
    "Headers",
    "RawRequest",
    "encode_head",
    "frame",
    "read_request",
    "send",
    "send_error",
    "until_eof",
]

JSON: Final = "application/json"
TERMINATOR: Final = b"0\r\n\r\n"
"""End of a chunked body."""
Headers = list[tuple[str, str]]


class BadRequest(Exception):
    """The request could not be framed; answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class RawRequest:
    """A request as read from the wire."""

    method: str
    target: str
    headers: dict[str, str]
    """Header names lower-cased."""
    body: bytes
    keep_alive: bool
    received_at: float


async def read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    """Read one request (``None`` on a clean end of stream); raise :class:`BadRequest`."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest(431, "Request header fields too large") from None
    received = time.monotonic()
    lines = head[:-4].decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(400, "Malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    try:
        body = await _read_body(reader, headers)
    except ValueError:
        raise BadRequest(400, "Malformed request body framing") from None
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return RawRequest(method, target, headers, body, keep, received)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # skip trailers
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(headers.get("content-length") or 0)
    if length < 0:
        raise ValueError("negative Content-Length")
    return await reader.readexactly(length) if length else b""


@functools.cache
def _status_line(status: int) -> str:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}"


def encode_head(status: int, headers: Headers) -> bytes:
    """Status line and headers, ending with the blank line."""
    lines = [_status_line(status)]
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def frame(chunk: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(chunk), chunk)


async def send(
    writer: asyncio.StreamWriter,
    status: int,
    payload: bytes,
    keep: bool,
    content_type: str = JSON,
    extra: Headers | None = None,
) -> None:
    """Write a complete ``Content-Length`` response in one go."""
    headers = [("content-type", content_type), ("content-length", str(len(payload)))]
    if extra:
        headers.extend(extra)
    if not keep:
        headers.append(("connection", "close"))
    writer.write(encode_head(status, headers) + payload)
    await writer.drain()


async def send_error(writer: asyncio.StreamWriter, status: int, message: str, keep: bool) -> None:
    """Write an OpenAI-style JSON error response."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    await send(writer, status, dumps({"error": error}), keep)


async def until_eof(reader: asyncio.StreamReader) -> None:
    """Wait (reading and discarding) until the client closes the connection."""
    while await reader.read(65536):
        pass

"""A bare HTTP/1.1 client for requests that httpx would normalise (dot-segments, backslashes)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    port: int,
    target: bytes,
    method: bytes = b"GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> RawResponse:
    lines = [
        method + b" " + target + b" HTTP/1.1",
        b"Host: 127.0.0.1:%d" % port,
        b"Connection: close",
    ]
    for k, v in headers or []:
        lines.append(k + b": " + v)
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return raw_exchange(port, b"\r\n".join(lines) + b"\r\n\r\n" + body)


def raw_exchange(port: int, data: bytes) -> RawResponse:
    """Send `data` exactly as given (one write, so it arrives as one packet on loopback) and read
    the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = [tuple(h.split(": ", 1)) for h in header_lines]
    response_headers = [(k, v) for k, v in parsed]  # type: ignore[misc]
    if any(k.lower() == "transfer-encoding" and "chunked" in v for k, v in response_headers):
        out = bytearray()
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        rest = bytes(out)
    return RawResponse(int(status_line.split()[1]), response_headers, rest)

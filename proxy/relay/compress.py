"""Response compression (`[compression]`): gzip (zlib, streamed) and brotli (the `brotli` package)
for text-like answers the upstream did not compress, when the client accepts it.

What nginx's gzip filter and Envoy's compressor do, and no more:
- the client's Accept-Encoding decides, q-values honoured (`gzip;q=0` refuses gzip, `*` covers
  codings it does not name); brotli wins a tie, it is smaller for text at a similar CPU cost;
- never for HEAD, 204, 304, 206 or an answer with Content-Range, an answer the upstream already
  encoded, `Cache-Control: no-transform`, a type not in `compression.types`, Server-Sent Events
  (an event must reach the browser when it is sent, not when a compressor's block fills), or a
  Content-Length below `compression.min_bytes`;
- the body is compressed as it streams: each chunk the upstream delivered is compressed and
  flushed, never the whole body buffered; Content-Length goes (the server frames it chunked)
  unless the whole body was already in hand;
- `Vary: Accept-Encoding` is merged into the answer's Vary, a strong ETag becomes weak (the bytes
  differ from the upstream's, the meaning does not).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from ..config import CompressionSettings

try:  # a wheel for every common platform; without it, gzip alone is offered
    import brotli  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the machine
    brotli = None

Headers = list[tuple[bytes, bytes]]

# A tie in the client's q-values goes to the first of these it accepts.
_PREFERENCE = ("br", "gzip")
_BROTLI_QUALITY = 4  # near gzip -6 in CPU per MB, smaller output (bench/compression.py)


class Encoder:
    """One response's compressor: `chunk()` per upstream chunk, `finish()` at the end."""

    __slots__ = ("_process", "_flush", "_finish", "bytes_in", "bytes_out")

    def __init__(
        self,
        process: Callable[[bytes], bytes],
        flush: Callable[[], bytes],
        finish: Callable[[], bytes],
    ) -> None:
        self._process = process
        self._flush = flush
        self._finish = finish
        self.bytes_in = 0
        self.bytes_out = 0

    def chunk(self, data: bytes, *, flush: bool = True) -> bytes:
        """Compress `data`; with `flush`, everything so far is decodable by the client now."""
        self.bytes_in += len(data)
        out = self._process(data) + (self._flush() if flush else b"")
        self.bytes_out += len(out)
        return out

    def finish(self) -> bytes:
        out = self._finish()
        self.bytes_out += len(out)
        return out

    def whole(self, data: bytes) -> bytes:
        return self.chunk(data, flush=False) + self.finish()


def gzip_encoder(level: int) -> Encoder:
    z = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: a gzip header and trailer
    return Encoder(z.compress, lambda: z.flush(zlib.Z_SYNC_FLUSH), z.flush)


def brotli_encoder() -> Encoder:
    c = brotli.Compressor(quality=_BROTLI_QUALITY)
    return Encoder(c.process, c.flush, c.finish)


def accepted(accept_encoding: bytes, offered: tuple[str, ...]) -> str | None:
    """The coding of `offered` the client prefers (RFC 9110 12.5.3), or None."""
    q_of: dict[str, float] = {}
    star: float | None = None
    for item in accept_encoding.decode("latin-1").split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if coding == "*":
            star = q
        elif coding == "x-gzip":
            q_of.setdefault("gzip", q)
        else:
            q_of[coding] = q
    best, best_q = None, 0.0
    for coding in offered:
        q = q_of.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    return best


class Compression:
    """The `[compression]` policy, decided once; `encoder()` per answer."""

    def __init__(self, settings: CompressionSettings) -> None:
        self.min_bytes = settings.min_bytes
        self.level = settings.level
        exact, prefixes, suffixes = set(), [], []
        for t in settings.types:
            main, sub = t.split("/")
            if sub == "*":
                prefixes.append(f"{main}/".encode())
            elif sub.startswith("*+"):
                suffixes.append((f"{main}/".encode(), sub[1:].encode()))
            else:
                exact.add(t.encode())
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)
        self._suffixes = tuple(suffixes)
        self.offered: tuple[str, ...] = _PREFERENCE if brotli is not None else ("gzip",)

    def compressible_type(self, content_type: bytes) -> bool:
        mime = content_type.split(b";", 1)[0].strip().lower()
        if mime == b"text/event-stream":
            return False  # SSE: left alone, an event must not wait in a compressor
        if mime in self._exact or mime.startswith(self._prefixes):
            return True
        return any(mime.startswith(m) and mime.endswith(s) for m, s in self._suffixes)

    def encoder(
        self,
        request_headers: list[tuple[bytes, bytes]],
        method: str,
        status: int,
        headers: Headers,
        length: int | None,
    ) -> tuple[Encoder, str] | None:
        """An encoder for this answer when it should be compressed, and the coding's name."""
        if method == "HEAD" or status < 200 or status in (204, 206, 304):
            return None
        if length is not None and length < self.min_bytes:
            return None
        content_type = None
        for name, value in headers:
            if name == b"content-type":
                content_type = value
            elif name in (b"content-encoding", b"content-range"):
                return None
            elif name == b"cache-control" and b"no-transform" in value.lower():
                return None
        if content_type is None or not self.compressible_type(content_type):
            return None
        accept = b",".join(v for n, v in request_headers if n == b"accept-encoding")
        if not accept:
            return None
        coding = accepted(accept, self.offered)
        if coding is None:
            return None
        return (brotli_encoder() if coding == "br" else gzip_encoder(self.level)), coding


def rewrite_headers(headers: Headers, coding: str, length: int | None) -> Headers:
    """The answer's headers once compressed: Content-Encoding, Content-Length (the compressed
    length when known, else none), Vary merged, a strong ETag weakened."""
    out: Headers = []
    vary_seen = False
    for name, value in headers:
        if name == b"content-length":
            continue
        if name == b"vary":
            lowered = value.lower()
            if not vary_seen and b"*" not in lowered and b"accept-encoding" not in lowered:
                value = value + b", Accept-Encoding" if value.strip() else b"Accept-Encoding"
            vary_seen = True
        elif name == b"etag" and not value.startswith(b"W/"):
            value = b"W/" + value
        out.append((name, value))
    if not vary_seen:
        out.append((b"vary", b"Accept-Encoding"))
    out.append((b"content-encoding", coding.encode()))
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    return out

"""JSON-lines logging: one line per request and per WebSocket session, plus operational events.

Every line carries the request id of the exchange it belongs to (a context variable set by the
pipeline). Callers pass only values that are safe to print: ids, never tokens, keys or secrets.
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import json
import logging
import re
import sys
import threading
import time
from typing import Any, TextIO

from .clock import rfc3339, rfc3339_now
from .lines import LineBatch

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "authproxy_request_id", default=None
)

ACCESS_LOGGER = "authproxy.access"
ACCESS = logging.getLogger(ACCESS_LOGGER)
# One encoder, built once: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(separators=(",", ":"), default=str)


# uvicorn's lines are the sidecar's server talking ("Started server process", "Shutting down"):
# written under our own name, so an alert on a logger called `*.error` is not set off by them.
SERVER_LOGGER = "authproxy.server"
# uvicorn's lines whose level says more than they mean: per-WebSocket chatter, and a client's
# malformed input, which is the client's problem and already answered (400, 1007).
_HONEST_LEVELS = {
    "connection open": logging.DEBUG,
    "connection closed": logging.DEBUG,
    "Invalid HTTP request received.": logging.INFO,
    "Unsupported upgrade request.": logging.INFO,
    "Invalid UTF-8 sequence received from client.": logging.INFO,
}


def _logger_name(record: logging.LogRecord) -> str:
    name = record.name
    return SERVER_LOGGER if name == "uvicorn" or name.startswith("uvicorn.") else name


def _honest_level(record: logging.LogRecord) -> bool:
    level = _HONEST_LEVELS.get(str(record.msg))
    if level is not None and level != record.levelno:
        record.levelno, record.levelname = level, logging.getLevelName(level)
        return logging.getLogger(record.name).isEnabledFor(level)
    return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; `extra={"fields": {...}}` adds keys."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": _logger_name(record),
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            line["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and message only: tracebacks go to no client and stay short here.
            line["error"] = redact(f"{record.exc_info[0].__name__}: {record.exc_info[1]}")
        return _JSON.encode(line)


def _not_a_handshake_line(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    # uvicorn logs every WebSocket handshake with the raw query string, which may carry a token
    # or API key (`?token=`, `?api_key=`); the tunnel writes its own line without credentials.
    if message.startswith('%s - "WebSocket %s"'):
        return False
    # uvicorn's sans-I/O WebSocket protocol reports a handshake refused with an HTTP response (the
    # denial-response extension, which the pipeline always completes) as an error; it is not one.
    return message != "ASGI callable returned without completing handshake."


# Whatever a library logs, no credential gets through. Written as [redacted]: the value of a
# query or form parameter, a `Name: value` header or a JSON member whose name is a credential's
# (token, access_token, id_token, jwt, api_key, apikey, key, secret, password, signature, with
# any prefix or case), whatever follows "Bearer " or the "bearer." subprotocol, and anything shaped
# like a JWT, and a whole Authorization value. This holds for any wording (uvicorn's handshake
# line carries the raw query string at info level), unlike a filter that knows lines by their text.
_NAMES = r"[\w.\[\]%-]*?(?:token|jwt|api[_-]?key|apikey|key|secret|passw(?:or)?d|signature)"
_SECRET_PARAM = re.compile(
    rf"(?i)((?:^|[?&;,\s\"'(/]){_NAMES}(?:\[\])?(?:=|\"?\s*:\s*\"?))[^&;,\s\"')]+"
)
_BEARER = re.compile(r"(?i)\b(bearer[\s.]+)[^\s\"',;]+")
_JWT = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
_AUTHORIZATION = re.compile(r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)[^\r\n\"']+")


def redact(text: str) -> str:
    """`text` with credential-looking values replaced by [redacted]."""
    if "uthorization" in text:
        text = _AUTHORIZATION.sub(r"\1[redacted]", text)  # any scheme: Bearer, Basic, ...
    if "=" in text or ":" in text:
        text = _SECRET_PARAM.sub(r"\1[redacted]", text)
    if "earer" in text:
        text = _BEARER.sub(r"\1[redacted]", text)
    if "eyJ" in text:
        text = _JWT.sub("[redacted]", text)
    return text


def _redact_record(record: logging.LogRecord) -> bool:
    # Only library records pass here (access lines are written apart): cost is not a concern.
    if not record.name.startswith("authproxy"):
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
    return True


class _Writer:
    """Writes log lines on a thread of its own, so a log nobody reads never stops the event loop.

    A pipe whose reader stalled (a stuck log shipper, a terminal paused with Ctrl-S) blocks
    write(2): done on the loop's thread, that froze every request. Lines are queued here, encoded
    (UTF-8), and written in order by one thread; past `max_bytes` waiting, new lines are dropped
    and counted, and a line says how many once the stream takes writes again. A text stream with
    a binary buffer under it (`sys.stdout`) is written through that buffer: the lines are not
    decoded on the loop's thread to be encoded again on this one.
    """

    def __init__(self, stream: TextIO, max_bytes: int = 8 * 1024 * 1024) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self.dropped = 0
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._lock = threading.Condition()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="authproxy-log", daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> None:
        with self._lock:
            if self._queued_bytes + len(data) > self.max_bytes:
                self.dropped += data.count(b"\n") or 1
                return
            self._queue.append(data)
            self._queued_bytes += len(data)
            self._lock.notify()

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued is written (at shutdown); False if the stream is stuck."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._busy = False
                    self._lock.notify_all()
                    self._lock.wait()
                self._busy = True
                data = b"".join(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                dropped, self.dropped = self.dropped, 0
            if dropped:
                data = _dropped_line(dropped) + data
            try:
                self._write(data)
            except (OSError, ValueError):
                pass  # a closed or broken stream: nothing to tell, nowhere to tell it

    def _write(self, data: bytes) -> None:
        stream = self.stream
        binary = getattr(stream, "buffer", None)
        if binary is None:  # a text stream only (a test's StringIO)
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()
            return
        stream.flush()  # text written to the stream itself, if any, goes first
        binary.write(data)
        binary.flush()


def _dropped_line(count: int) -> bytes:
    line = {
        "time": rfc3339_now(),
        "level": "warning",
        "logger": "authproxy.log",
        "message": f"{count} log line(s) dropped: the log stream was not being read",
        "dropped": count,
    }
    return (_JSON.encode(line) + "\n").encode()


class JsonLinesHandler(logging.Handler):
    """JSON lines on a stream; access lines are written in batches, all lines by a writer thread.

    Measured with the log on a file: a write(2) per request cost ~90 µs of the ~350 µs of CPU a
    proxied request takes. Access lines wait at most `flush_interval_s` (0: no waiting) in
    `batch` (telemetry/lines.py, compiled; access.py adds to it); any other record, a full batch,
    shutdown and `flush()` hand them on first, so order is kept.
    """

    def __init__(
        self, stream: TextIO, flush_interval_s: float = 0.1, max_batch_bytes: int = 64 * 1024
    ) -> None:
        super().__init__()
        self.stream = stream
        self.setFormatter(JsonFormatter())
        self.addFilter(_redact_record)
        self._writer = _Writer(stream)
        self.batch = LineBatch(self._writer.put, flush_interval_s, max_batch_bytes)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self.batch.flush()
        self._writer.put(text.encode("utf-8", "replace"))

    def flush(self) -> None:
        """Hand waiting access lines to the writer (never waits for the stream)."""
        self.batch.flush()

    def drain(self, timeout: float = 2.0) -> bool:
        """Flush, then wait (at most `timeout`) for everything to be written."""
        self.flush()
        return self._writer.drain(timeout)


def configure(level: str = "info", flush_interval_s: float = 0.1) -> None:
    """Send authproxy's and uvicorn's logs to stdout as JSON lines."""
    handler = JsonLinesHandler(sys.stdout, flush_interval_s)
    # The writer thread is a daemon (a stuck stream must not keep the process alive): what it
    # still holds at exit is written first, a little waiting allowed.
    atexit.register(handler.drain)
    # The libraries that log on the request path too, so their lines are JSON and redacted.
    for name in ("authproxy", "uvicorn", "uvicorn.error", "websockets", "asyncio", "aiohttp"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(level.upper())
    uvicorn_error = logging.getLogger("uvicorn.error")
    for keep in (_not_a_handshake_line, _honest_level):
        if keep not in uvicorn_error.filters:
            uvicorn_error.addFilter(keep)
    logging.getLogger("uvicorn.access").disabled = True


def flush() -> None:
    """Write any lines still waiting (at shutdown), waiting a little for a slow stream."""
    handler = handler_of(ACCESS)
    if isinstance(handler, JsonLinesHandler):
        handler.drain()
    elif handler is not None:
        handler.flush()


def encode(line: dict[str, Any]) -> str:
    """A line as JSON by the standard encoder (what orjson refuses, e.g. a lone surrogate)."""
    return _JSON.encode(line)


def handler_of(logger: logging.Logger) -> logging.Handler | None:
    node: logging.Logger | None = logger
    while node is not None:
        if node.handlers:
            return node.handlers[0]
        if not node.propagate:
            return None
        node = node.parent
    return None

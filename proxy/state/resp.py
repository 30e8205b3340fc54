"""The hot path's Redis client: one pipelined connection, scripts by SHA, hiredis' parser.

redis-py's asyncio client cost 88 µs of CPU per script call here (pool checkout, its lock, its
command packer); the rate-limit check runs on every request of a limited route, so it has this:
commands from every request written back to back on one connection (Redis answers in order, and
is single-threaded anyway), each awaiting its future, replies parsed in C. Everything else (pub/sub,
revocations, slot renewals) stays on redis-py.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError


class _Protocol(asyncio.Protocol):
    """Replies matched to commands in order: each `call` queues a future, each reply pops one
    (a future given up on by a timeout still takes its reply, so the rest stay matched)."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as ones.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future = self._waiting.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ResponseError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or RedisConnectionError("connection closed by redis")
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(RedisConnectionError(f"lost: {self.lost}"))

    def call(self, *args: Any) -> asyncio.Future[Any]:
        if self.lost is not None or self._transport is None:
            raise RedisConnectionError("not connected")
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._transport.write(hiredis.pack_command(args))
        return future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class ScriptPipe:
    """Lua scripts run over one pipelined connection, (re)made on demand."""

    def __init__(self, url: str, connect_timeout_s: float, scripts: dict[str, str]) -> None:
        parts = urlsplit(url)
        self._unix = parts.path if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        db = parts.path.strip("/") if parts.scheme != "unix" else ""
        self._db = int(db) if db.isdigit() else 0
        self._timeout = connect_timeout_s
        self._scripts = scripts
        self._sha = {name: hashlib.sha1(s.encode()).hexdigest() for name, s in scripts.items()}
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    async def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA of script `name`; redis' exceptions (and OSError, TimeoutError) on failure."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connected()
        try:
            return await protocol.call("EVALSHA", self._sha[name], len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # SCRIPT FLUSH behind our back: load them again, once.
            await self._load(protocol)
            return await protocol.call("EVALSHA", self._sha[name], len(keys), *keys, *args)

    def reset(self) -> None:
        """Drop the connection (after a timeout: the next call reconnects)."""
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    async def _connected(self) -> _Protocol:
        # Concurrent callers share one connection attempt.
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        # The whole hand-shake in the bound: a Redis that takes connections and answers nothing
        # must not hold this attempt (and every request waiting on it) open.
        async with asyncio.timeout(self._timeout):
            if self._unix is not None:
                _, protocol = await loop.create_unix_connection(_Protocol, self._unix)
            else:
                _, protocol = await loop.create_connection(
                    _Protocol, self._host, self._port, ssl=self._ssl
                )
            try:
                if self._password is not None:
                    auth = (
                        [self._password] if not self._username else [self._username, self._password]
                    )
                    await protocol.call("AUTH", *auth)
                if self._db:
                    await protocol.call("SELECT", self._db)
                await self._load(protocol)
            except BaseException:
                protocol.close()
                raise
        self._protocol = protocol
        return protocol

    async def _load(self, protocol: _Protocol) -> None:
        for script in self._scripts.values():
            await protocol.call("SCRIPT", "LOAD", script)

    def close(self) -> None:
        self.reset()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()

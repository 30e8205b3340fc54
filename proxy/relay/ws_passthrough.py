"""A session's whole data frames, relayed as they arrived (proxy/wsframes.py splits them): the
tunnel's two frame sinks, one a direction, compiled with the request path.

Each does what the message relay (relay/tunnel.py: `_forward`, `_deliver`) does with a message,
without parsing it into one: checks that the session still relays and that the other hop takes
a frame now, writes the frame as it came, and counts it. Whatever it declines goes to the hop's
parser, and from there the message relay's way, so that every refusal (invalid UTF-8: 1007, a
re-authentication, a full write buffer, a closing hop) stays that way's.

The hops are uvicorn's and websockets' objects, reached by duck typing (`Any`): this module is
compiled, and a type from those libraries would tie it to them at build time for nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from websockets.protocol import State

from ..telemetry.tally import Tally
from ..wsframes import FrameSink, utf8_valid
from .ws_session import Session

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets without its C extension
    from websockets.utils import apply_mask

REAUTH_MARK: Final = b'"authproxy.reauth"'

# Final: compiled, each is read from a C static. `State.OPEN` is an attribute of an enum class:
# some 60 ns a look-up (the metaclass's and the class's dictionaries), three a round trip.
_OPEN: Final = State.OPEN
_unmask: Final = apply_mask


def may_be_reauth(data: bytes) -> bool:
    """Whether a client text message (UTF-8) must be parsed to know if it is a re-authentication:
    it names the type literally, or is a JSON object with escapes (`"authproxy\\u002ereauth"` is
    the same string to a JSON parser). Anything else is the application's, and costs one
    substring test."""
    return REAUTH_MARK in data or (b"\\u" in data and data.lstrip()[:1] == b"{")


def state_of(protocol: Any) -> State:
    """A websockets sans-I/O protocol's `state`, read where that property keeps it (`_state`):
    the property is an interpreted frame, and each relayed frame asks (tests/test_library_hooks.py
    fails if websockets moves it)."""
    state: State = protocol._state
    return state


def upstream_writable(upstream: Any, protocol: Any) -> bool:
    """Whether a frame may be written to the upstream hop (relay/tunnel.py's connection; its
    websockets `protocol`) now, past websockets' `send`: open, its write buffer under the limit,
    no fragmented send in progress. Otherwise `send` waits for the buffer, or raises the close
    that ends the session."""
    return state_of(protocol) is _OPEN and not upstream.paused and upstream.send_in_progress is None


class Counts:
    """One direction's metrics (Prometheus children)."""

    def __init__(self, messages: Any, payload_bytes: Any) -> None:
        self.messages = Tally(messages)
        self.payload_bytes = Tally(payload_bytes)


class ClientFrames(FrameSink):
    """Client -> upstream. `client`: the client hop's protocol (proxy/wsprotocol.py);
    `upstream`: the upstream hop's connection (relay/tunnel.py); `session`: the registry's."""

    def __init__(
        self, client: Any, upstream: Any, session: Session, counts: Counts, reauth: bool
    ) -> None:
        self.client = client
        # The client's inbound ASGI messages (wsprotocol.Inbox: its list is never replaced).
        self.inbox: list[Any] = client.queue.items
        self.upstream = upstream
        self.protocol = upstream.protocol
        self.transport = upstream.transport
        self.debug: bool = self.protocol.debug  # (set when websockets' protocol is made)
        self.session = session
        self.counts = counts
        self.reauth = reauth  # `websocket.reauth`: text that may be one takes the parser's way
        self.on = True

    def stop(self) -> None:
        """The session no longer relays: every frame goes to the parser from now on."""
        self.on = False

    def ready(self) -> bool:
        # As the client hop hands a parsed message to the relay: the session takes messages,
        # none waits for ASGI `receive` ahead of this one, the hop is not closing.
        client = self.client
        return self.on and client.relay is not None and not client.close_sent and not self.inbox

    def take(self, frame: bytes, head: int, text: bool) -> bool:
        if self.session.outcome is not None:
            return True  # decided: nothing more is relayed
        size = len(frame) - head
        if text:
            payload: bytes = _unmask(frame[head:], frame[head - 4 : head])
            if not utf8_valid(payload):
                return False  # the parser closes with 1007
            if self.reauth and may_be_reauth(payload):
                return False
        upstream = self.upstream
        protocol = self.protocol
        if not upstream_writable(upstream, protocol) or protocol.writes or self.debug:
            return False  # the relay task waits for the buffer, or meets the close
        try:
            self.transport.write(frame)
        except Exception as exc:  # as websockets' send: the connection is cut, the session ends
            upstream.set_connection_exc(exc)
            self.transport.abort()
        count(self.session, self.counts, size, True)
        return True

    def parse(self, data: bytes) -> None:
        self.client.parse_frames(data)


class UpstreamFrames(FrameSink):
    """Upstream -> client, from the upstream connection's `data_received`."""

    def __init__(
        self,
        client: Any,
        upstream: Any,
        session: Session,
        counts: Counts,
        failed: Callable[[], None],
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.protocol = upstream.protocol
        self.client_conn = client.conn  # the client hop's websockets protocol, for its state
        self.client_transport = client.transport  # (uvicorn's, set once the connection is made)
        self.session = session
        self.counts = counts
        self.failed = failed  # a write to the client raised (logged and ended by the tunnel)
        self.on = True

    def stop(self) -> None:
        self.on = False

    def ready(self) -> bool:
        return self.on and state_of(self.protocol) is _OPEN

    def take(self, frame: bytes, head: int, text: bool) -> bool:
        if self.session.outcome is not None:
            return True  # decided: nothing more is relayed
        if text and not utf8_valid(frame[head:]):
            return False  # websockets' parser refuses it, and the session ends as it says
        client = self.client
        if client.close_sent or client.disconnected or state_of(self.client_conn) is not _OPEN:
            return True  # the client is leaving: its disconnect ends the session
        try:
            self.client_transport.write(frame)
        except Exception:
            self.failed()
            return True
        count(self.session, self.counts, len(frame) - head, False)
        return True

    def parse(self, data: bytes) -> None:
        self.upstream.parse_frames(data)


def count(session: Session, counts: Counts, size: int, inbound: bool) -> None:
    """One message relayed: the session's counts and activity, and the metrics."""
    if inbound:
        session.bytes_in += size
        session.messages_in += 1
    else:
        session.bytes_out += size
        session.messages_out += 1
    clock = session.idle_clock
    if clock is not None:
        session.last_activity = clock()
    counts.messages.add(1.0)
    counts.payload_bytes.add(size)

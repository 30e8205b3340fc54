"""The `/ws` message protocol, apart from any socket: client text in, a command or an error out.

Client messages:  `{"type": "subscribe", "topics": [...]}`,
                  `{"type": "unsubscribe", "topics": [...]}`, `{"type": "ping"}`.
Server messages:  `subscribed`, `unsubscribed`, `pong`, `heartbeat`, `model_update`, `error`; each
                  carries a per-connection `seq` that grows by one per message (a skipped number
                  means events were dropped for a slow reader).
Topics:           `models` (every model) and `model:<id>` (one model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from upstream_demo.events import ALL_MODELS_TOPIC
from upstream_demo.store import MODEL_ID_PATTERN

MAX_MESSAGE_CHARS = 65536
MAX_TOPICS = 100
_MODEL_TOPIC_RE = re.compile("^model:" + MODEL_ID_PATTERN.lstrip("^"))


class ProtocolError(Exception):
    """A client message the server cannot act on; answered with an `error` message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_message(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class Subscribe:
    """A client's subscribe message."""

    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """A client's unsubscribe message."""

    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    """A client's ping (its id is echoed in the pong)."""

    id: Any = None


Command = Subscribe | Unsubscribe | Ping


def is_topic(value: object) -> bool:
    return isinstance(value, str) and (
        value == ALL_MODELS_TOPIC or bool(_MODEL_TOPIC_RE.match(value))
    )


def _topics(message: dict[str, Any]) -> tuple[str, ...]:
    topics = message.get("topics")
    if not isinstance(topics, list) or not topics:
        raise ProtocolError("bad_topics", "'topics' must be a non-empty list of strings")
    if len(topics) > MAX_TOPICS:
        raise ProtocolError("bad_topics", f"at most {MAX_TOPICS} topics per message")
    bad = [t for t in topics if not is_topic(t)]
    if bad:
        raise ProtocolError(
            "bad_topics",
            f"unknown topic(s) {json.dumps(bad)[:200]}; use 'models' or 'model:<id>'",
        )
    return tuple(dict.fromkeys(topics))


def parse_client_message(raw: str | bytes) -> Command:
    """Decode one client frame; raises ProtocolError for anything the server will not act on."""
    if len(raw) > MAX_MESSAGE_CHARS:
        raise ProtocolError("too_large", f"messages are limited to {MAX_MESSAGE_CHARS} bytes")
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_json", "message is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_message", "message must be a JSON object")
    kind = message.get("type")
    if kind == "subscribe":
        return Subscribe(_topics(message))
    if kind == "unsubscribe":
        return Unsubscribe(_topics(message))
    if kind == "ping":
        return Ping(message.get("id"))
    shown = json.dumps(kind)[:60]
    raise ProtocolError(
        "unknown_type", f"unknown message type {shown}; expected subscribe, unsubscribe or ping"
    )


def choose_subprotocol(offered: list[str]) -> str | None:
    """Accept the first offered subprotocol that is not a `bearer.<token>` credential carrier."""
    for name in offered:
        if not name.lower().startswith("bearer."):
            return name
    return None

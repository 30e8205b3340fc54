"""ASGI type aliases."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The sidecar's own server (http11.py) reads this key of an `http.response.start` message: true
# promises the body in the very next `send`, before the app awaits anything else, so the head
# waits for it without a callback. Another ASGI server ignores it.
BODY_FOLLOWS = "authproxy.body_follows"

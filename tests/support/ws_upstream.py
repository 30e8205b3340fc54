"""A WebSocket upstream for the tunnel's integration tests: pure ASGI, run on uvicorn in its own
process, reporting what reached it.

WebSocket, any path: accepts with the first subprotocol offered (`?subprotocol=none`: none), then
echoes every message (text as text, binary as binary) except commands, text messages that start
with `!`:

    !info                       a JSON report of the handshake (path, raw_path, query, headers,
                                subprotocols offered)
    !close CODE [REASON]        closes with that code and reason
    !stream N                   sends N messages seq 0..N-1, alternating text/binary (`seq_message`)
    !expect                     starts checking the client's messages: each must be seq_message(i)
    !report                     a JSON report of the checking: {"received", "errors", "first_error"}
    !big N                      sends one binary message of N bytes
    !flood N SIZE               sends N binary messages of SIZE bytes as fast as it may

HTTP: `GET /stats` gives {"connects": n, "closes": [[code, reason], ...]}: every WebSocket
handshake that reached this process and every close the clients sent.
"""

from __future__ import annotations

import json
import os
from typing import Any

Scope = dict[str, Any]

CONNECTS = 0
CLOSES: list[tuple[int, str]] = []


def seq_message(i: int) -> str | bytes:
    """Message i of a sequence: even ones text, odd ones binary, sizes varying."""
    body = f"{i:08d}:" + "x" * (i % 97)
    return body if i % 2 == 0 else body.encode() + bytes([i % 256]) * (i % 13)


async def app(scope: Scope, receive: Any, send: Any) -> None:
    global CONNECTS
    if scope["type"] == "http":
        body = json.dumps({"connects": CONNECTS, "closes": CLOSES}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    if scope["type"] != "websocket":
        return
    message = await receive()
    assert message["type"] == "websocket.connect"
    CONNECTS += 1
    offered: list[str] = scope.get("subprotocols") or []
    choose_none = b"subprotocol=none" in scope["query_string"]
    await send(
        {
            "type": "websocket.accept",
            "subprotocol": offered[0] if offered and not choose_none else None,
        }
    )
    expecting = False
    received = 0
    errors = 0
    first_error: str | None = None
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            if "reason" in message:  # a close frame (uvicorn gives no reason for a lost peer)
                CLOSES.append((message["code"], message.get("reason") or ""))
            else:
                CLOSES.append((1006, ""))
            return
        text = message.get("text")
        if text is not None and text.startswith("!"):
            cmd, *args = text[1:].split(" ", 2)
            if cmd == "info":
                await send(
                    {
                        "type": "websocket.send",
                        "text": json.dumps(
                            {
                                "path": scope["path"],
                                "raw_path": scope["raw_path"].decode("latin-1"),
                                "query": scope["query_string"].decode("latin-1"),
                                "headers": [
                                    [k.decode("latin-1"), v.decode("latin-1")]
                                    for k, v in scope["headers"]
                                ],
                                "subprotocols": offered,
                            }
                        ),
                    }
                )
            elif cmd == "close":
                await send(
                    {
                        "type": "websocket.close",
                        "code": int(args[0]),
                        "reason": args[1] if len(args) > 1 else "",
                    }
                )
                # Stay until the client answers the close.
                while (await receive())["type"] != "websocket.disconnect":
                    pass
                return
            elif cmd == "stream":
                for i in range(int(args[0])):
                    m = seq_message(i)
                    await send(
                        {
                            "type": "websocket.send",
                            **({"text": m} if isinstance(m, str) else {"bytes": m}),
                        }
                    )
            elif cmd == "expect":
                expecting, received, errors, first_error = True, 0, 0, None
            elif cmd == "report":
                await send(
                    {
                        "type": "websocket.send",
                        "text": json.dumps(
                            {"received": received, "errors": errors, "first_error": first_error}
                        ),
                    }
                )
            elif cmd == "big":
                await send({"type": "websocket.send", "bytes": b"b" * int(args[0])})
            elif cmd == "flood":
                # Cheap to deflate on this hop; the test's client hop is uncompressed, so the
                # sidecar would hold full-size messages if it read ahead of its client.
                size = int(args[1])
                chunk = (os.urandom(256) * (size // 256 + 1))[:size]
                for _ in range(int(args[0])):
                    await send({"type": "websocket.send", "bytes": chunk})
            continue
        data = text if text is not None else message.get("bytes")
        if expecting:
            if data != seq_message(received):
                errors += 1
                if first_error is None:
                    first_error = f"at {received}: got {data!r:.60}"
            received += 1
            continue
        await send(
            {
                "type": "websocket.send",
                **({"text": data} if isinstance(data, str) else {"bytes": data}),
            }
        )

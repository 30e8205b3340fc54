"""A small identity provider on a loopback port, in a thread of the test process, for sidecars
running as real processes: OpenID Connect discovery, a JWKS that can fail, and RFC 7662
introspection with HTTP Basic client authentication. Every answer can be switched by the test."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs


class ThreadedIdp:
    """Discovery at `/.well-known/openid-configuration`, keys at `/jwks`, introspection at
    `/introspect` (answers from `tokens`, by the token string)."""

    def __init__(self, keys: list[dict[str, Any]] | None = None) -> None:
        self.keys = keys or []
        self.jwks_down = False
        self.introspection_down = False
        self.client_id = "authproxy"
        self.client_secret = "introspection-secret"
        self.tokens: dict[str, dict[str, Any]] = {}
        self.introspections = 0
        self.jwks_fetches = 0
        self.bad_client_auth = 0
        self.last_form: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> ThreadedIdp:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, doc: Any, cache: str = "no-store") -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", cache)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    doc = {
                        "issuer": idp.base,
                        "jwks_uri": idp.base + "/jwks",
                        "introspection_endpoint": idp.base + "/introspect",
                    }
                    self._json(200, doc)
                elif self.path == "/jwks":
                    with idp._lock:
                        idp.jwks_fetches += 1
                    if idp.jwks_down:
                        self._json(503, {"error": "maintenance"})
                    else:
                        self._json(200, {"keys": idp.keys})
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:
                if self.path != "/introspect":
                    self._json(404, {"error": "not_found"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                with idp._lock:
                    idp.introspections += 1
                    idp.last_form = form
                if idp.introspection_down:
                    self._json(503, {"error": "temporarily_unavailable"})
                    return
                expected = base64.b64encode(
                    f"{idp.client_id}:{idp.client_secret}".encode()
                ).decode()
                if self.headers.get("Authorization") != f"Basic {expected}":
                    with idp._lock:
                        idp.bad_client_auth += 1
                    self._json(401, {"error": "invalid_client"})
                    return
                token = form.get("token", [""])[0]
                self._json(200, idp.tokens.get(token, {"active": False}))

        return Handler

"""Revocation with the memory backend: the admin listener is the way in, only with the secret of
`admin.token_env`; it refuses the key at once and closes its WebSockets with 4403."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from proxy.auth.apikeys import hash_key
from tests.relay.test_websocket_tunnel import close_of, open_ws
from tests.support.servers import ROOT, start_sidecar, start_upstream

KEY, OTHER = "ak_revoked_0123456789", "ak_stays_0123456789ab"
ADMIN = "admin-secret-for-tests-0123"
CONFIG = f"""
[auth.api_keys]
[[auth.api_keys.keys]]
id = "leaky"
sha256 = "{hash_key(KEY)}"
[[auth.api_keys.keys]]
id = "stays"
sha256 = "{hash_key(OTHER)}"

[[routes]]
path = "/*"
auth = ["api_key"]
"""


async def test_a_key_revoked_through_the_admin_listener_closes_its_websockets_with_4403(
    tmp_path: Path,
) -> None:
    upstream = start_upstream("tests.support.ws_upstream:app", tmp_path)
    env = {"AUTHPROXY__ADMIN__TOKEN_ENV": "AP_ADMIN", "AP_ADMIN": ADMIN}
    sidecar = start_sidecar(tmp_path, upstream.port, CONFIG, env=env)
    try:
        leaky = await open_ws(sidecar, "/ws/echo", headers={"X-API-Key": KEY})
        stays = await open_ws(sidecar, "/ws/echo", headers={"X-API-Key": OTHER})
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "revoke", "--config", str(sidecar.config_path)]
            + ["--key-id", "leaky"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", **env},
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert await close_of(leaky, timeout=1.0) == (4403, "api key revoked")
        await stays.send("untouched")
        assert await stays.recv() == "untouched"
        await stays.close()
        assert httpx.get(sidecar.url + "/x", headers={"X-API-Key": KEY}).status_code == 401
        assert httpx.get(sidecar.url + "/x", headers={"X-API-Key": OTHER}).status_code == 200
        # A bad body is refused, a GET is not a revocation.
        auth = {"Authorization": f"Bearer {ADMIN}"}
        bad = httpx.post(sidecar.admin_url + "/revocations", headers=auth, json={"jti": ""})
        assert bad.status_code == 400
        deep = httpx.post(sidecar.admin_url + "/revocations", headers=auth, content=b"[" * 4000)
        assert deep.status_code == 400 and deep.json()["error"] == "bad_request"
        assert httpx.get(sidecar.admin_url + "/revocations", headers=auth).status_code == 405
    finally:
        sidecar.stop()
        upstream.stop()
    assert ADMIN not in sidecar.output() and KEY not in sidecar.output()


def test_without_admin_token_env_the_revocation_endpoint_refuses_everyone(tmp_path: Path) -> None:
    upstream = start_upstream("tests.support.upstreams:app", tmp_path)
    sidecar = start_sidecar(tmp_path, upstream.port, CONFIG)
    try:
        answer = httpx.post(
            sidecar.admin_url + "/revocations",
            headers={"Authorization": "Bearer anything-at-all-here"},
            json={"key_id": "leaky"},
        )
        assert answer.status_code == 403
        assert httpx.get(sidecar.url + "/x", headers={"X-API-Key": KEY}).status_code == 200
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "revoke", "--config", str(sidecar.config_path)]
            + ["--key-id", "leaky"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin"},
            timeout=30,
        )
        assert done.returncode == 2
        assert done.stderr.strip().startswith("authproxy: config error: admin.token_env:")
    finally:
        sidecar.stop()
        upstream.stop()

"""`python -m upstream_demo` and the demo page server."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from upstream_demo.__main__ import parse_args
from upstream_demo.app import create_web_app

PAGE_IDS = [
    "username",
    "password",
    "login-button",
    "logout-button",
    "models-table",
    "ws-state",
    "events",
    "error",
    "user",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_parse_args_defaults() -> None:
    args = parse_args([])
    assert (args.host, args.port, args.web_port) == ("127.0.0.1", 9000, 5173)
    assert args.event_interval == 3.0
    assert args.api_url == "http://localhost:8000"
    assert args.ws_url == "ws://localhost:8000/ws"
    assert args.issuer == "http://127.0.0.1:9000"
    assert args.token_ttl == 300
    assert args.key_rotation_s == 3600.0
    assert args.key_grace_s is None  # create_app turns this into 2 x token ttl


def test_parse_args_issuer_follows_the_port_unless_given() -> None:
    assert parse_args(["--port", "9100"]).issuer == "http://127.0.0.1:9100"
    assert parse_args(["--issuer", "https://idp.test"]).issuer == "https://idp.test"
    args = parse_args(["--event-interval", "0.5", "--key-grace-s", "60", "--web-port", "0"])
    assert (args.event_interval, args.key_grace_s, args.web_port) == (0.5, 60.0, 0)


def test_parse_args_refuses_a_non_positive_token_ttl(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--token-ttl", "0"])
    assert exc.value.code == 2
    assert "--token-ttl" in capsys.readouterr().err


def test_parse_args_signature_check_defaults_to_v2_with_a_30_s_window(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse_args([])
    assert (args.identity_signature, args.identity_max_skew_s) == ("v2", 30.0)
    args = parse_args(["--identity-signature", "v1", "--identity-max-skew-s", "5"])
    assert (args.identity_signature, args.identity_max_skew_s) == ("v1", 5.0)
    with pytest.raises(SystemExit):
        parse_args(["--identity-max-skew-s", "0"])
    assert "--identity-max-skew-s" in capsys.readouterr().err


@pytest.fixture
async def web() -> AsyncIterator[httpx.AsyncClient]:
    app = create_web_app(api_url="http://sidecar.test:8000/", ws_url="ws://sidecar.test:8000/ws")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://page"
    ) as http:
        yield http


async def test_the_page_gets_its_urls_from_a_generated_config_js(web: httpx.AsyncClient) -> None:
    response = await web.get("/config.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/javascript")
    assert response.headers["cache-control"] == "no-store"
    prefix = "window.AUTHPROXY_CONFIG = "
    assert response.text.startswith(prefix)
    config = json.loads(response.text.removeprefix(prefix).strip().rstrip(";"))
    assert config == {"apiUrl": "http://sidecar.test:8000", "wsUrl": "ws://sidecar.test:8000/ws"}


async def test_the_page_has_the_element_ids_tests_rely_on(web: httpx.AsyncClient) -> None:
    response = await web.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    ids = set(re.findall(r'\bid="([^"]+)"', response.text))
    assert set(PAGE_IDS) <= ids
    assert '<script src="/config.js"></script>' in response.text
    for asset in ("/app.js", "/style.css"):
        assert (await web.get(asset)).status_code == 200


def wait_for(url: str, timeout: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=1.0)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def demo_process(*args: str) -> Iterator[subprocess.Popen[str]]:
    """`python -m upstream_demo` with `args`; killed at the end if the test did not stop it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "upstream_demo", *args],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_python_m_upstream_demo_serves_backend_and_page_and_stops_cleanly(
    sig: signal.Signals,
) -> None:
    port, web_port = free_port(), free_port()
    with demo_process(
        f"--port={port}",
        f"--web-port={web_port}",
        "--api-url=http://api.test:8000",
        "--event-interval=0.2",
        "--log-level=warning",
    ) as process:
        assert wait_for(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
        assert "http://api.test:8000" in wait_for(f"http://127.0.0.1:{web_port}/config.js").text
        oidc = httpx.get(f"http://127.0.0.1:{port}/.well-known/openid-configuration").json()
        assert oidc["issuer"] == f"http://127.0.0.1:{port}"
        process.send_signal(sig)
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert f"http://127.0.0.1:{web_port}" in out
    assert "Traceback" not in err


def test_a_stop_lets_the_backend_finish_its_streams_and_its_lifespan_after_the_page_ended() -> None:
    # The page server has nothing in flight and ends first; the backend still drains a stream.
    # Its end must not be taken for a second stop that forces the backend (the stream cut short,
    # its lifespan shutdown skipped and cancelled into a traceback by asyncio.run).
    port, web_port = free_port(), free_port()
    with demo_process(
        f"--port={port}", f"--web-port={web_port}", "--event-interval=0", "--chat-token-delay=0.05"
    ) as process:
        wait_for(f"http://127.0.0.1:{web_port}/healthz")
        models = wait_for(f"http://127.0.0.1:{port}/api/models").json()
        chat = {
            "model": models[0]["id"],
            "messages": [{"role": "user", "content": "a long enough question to stream"}],
            "stream": True,
        }
        with httpx.stream(
            "POST", f"http://127.0.0.1:{port}/api/chat/completions", json=chat, timeout=10
        ) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # the stream is under way
            process.send_signal(signal.SIGINT)
            rest = list(lines)
        out, err = process.communicate(timeout=15)
    assert "data: [DONE]" in rest  # drained, not cut
    assert process.returncode == 0, err
    assert "Application shutdown complete." in err
    assert "Traceback" not in err and "CancelledError" not in err


def test_python_m_upstream_demo_exits_1_when_its_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "upstream_demo", f"--port={port}", "--web-port=0"],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=15,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr

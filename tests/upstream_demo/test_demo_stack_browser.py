"""`make run` end to end in Chromium: the page on its own origin, the real sidecar with the
repository's config.toml, and upstream_demo behind it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.servers import ROOT, free_port

ARTIFACTS = Path(os.environ.get("AUTHPROXY_ARTIFACTS_DIR", ROOT / "test-artifacts"))


class Stack:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, ports: dict[str, int]) -> None:
        self.proc, self.log, self.ports = proc, log, ports

    @property
    def page_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['web']}/"

    @property
    def sidecar_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['sidecar']}"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """`python -m upstream_demo.stack` (what `make run` runs) on free ports: the repository's
    config.toml with only its port numbers changed."""
    ports = {
        "sidecar": free_port(),
        "admin": free_port(),
        "upstream": free_port(),
        "web": free_port(),
    }
    text = (ROOT / "config.toml").read_text()
    for old, new in (
        ("8000", ports["sidecar"]),
        ("8001", ports["admin"]),
        ("9000", ports["upstream"]),
        ("5173", ports["web"]),
    ):
        assert f":{old}" in text
        text = text.replace(f":{old}", f":{new}")
    config = tmp_path / "config.toml"
    config.write_text(text)
    log = tmp_path / "stack.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "upstream_demo.stack",
                "--config",
                str(config),
                "--web-port",
                str(ports["web"]),
                "--event-interval",
                "1",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    s = Stack(proc, log, ports)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                ready = httpx.get(f"http://127.0.0.1:{ports['admin']}/readyz")
                if ready.status_code == 200 and b"running" in log.read_bytes():
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            proc.wait(20)


def login(page: Page, user: str) -> None:
    page.click(f"#prefill-{user}")
    page.click("#login-button")
    expect(page.locator("#user")).to_have_text(f"{user}@example.com")


@pytest.mark.browser
def test_make_run_stack_serves_the_whole_story_in_a_browser(stack: Stack) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(stack.page_url)
            login(page, "admin")
            # The model list came through the sidecar (a different origin: CORS is real).
            expect(page.locator("#models-table tr[data-model-id]")).to_have_count(3)
            expect(page.locator("#ws-state")).to_have_text("open", timeout=10_000)
            # The simulator steps every second: a live event arrives over the tunnel.
            expect(page.locator("#events .event").first).to_be_visible(timeout=15_000)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "demo-stack.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # The viewer may read but not start models: the page offers no enabled button, and
            # the sidecar's 403 (asked for anyway) reaches the page.
            page.click("#logout-button")
            login(page, "viewer")
            expect(page.locator("#models-table tr[data-model-id]")).to_have_count(3)
            start = page.locator('tr[data-model-id="phi-3"] button.start')
            expect(start).to_be_disabled()
            expect(start).to_have_attribute("title", "needs the models:write scope")
            page.evaluate("() => window.authproxyDemo.modelAction('phi-3', 'start')")
            expect(page.locator("#error")).to_contain_text("models:write", timeout=5_000)
        finally:
            browser.close()
    # Every call went through the sidecar, which logged it with the caller's identity.
    lines = [json.loads(x) for x in stack.log.read_text().splitlines() if x.startswith("{")]
    subjects = {x.get("subject") for x in lines if x.get("message") == "request"}
    assert {"admin@example.com", "viewer@example.com"} <= subjects
    assert any(
        x.get("status") == 403 and x.get("subject") == "viewer@example.com"
        for x in lines
        if x.get("message") == "request"
    )


def test_make_run_stack_stops_all_three_on_ctrl_c(stack: Stack) -> None:
    assert httpx.get(stack.sidecar_url + "/api/models").status_code == 401
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(20) == 0
    for port in stack.ports.values():
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)

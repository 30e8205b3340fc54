"""The request path compiled with mypyc (proxy/compiled.py): what `make install` builds is what
runs, a stale build is refused, and the plain-Python modules (a build without a C compiler) serve
the same."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from proxy import compiled
from tests.support.servers import ROOT, Process, free_port, sidecar_config, spawn

CONFIG = f"""
[auth.api_keys]
header = "X-API-Key"
[[auth.api_keys.keys]]
id = "reader"
sha256 = "{hashlib.sha256(b"ak_pure_python_key").hexdigest()}"

[[routes]]
path = "/echo/*"
auth = "api_key"
[[routes]]
path = "/public/*"
auth = "public"
"""


def test_every_listed_module_exists_and_is_part_of_the_package() -> None:
    for module in compiled.MODULES:
        assert (ROOT / "proxy" / f"{module}.py").is_file(), module
    assert len(set(compiled.MODULES)) == len(compiled.MODULES)


def test_the_tests_run_the_compiled_request_path() -> None:
    """`make test` builds it first; run pytest alone after `make install`."""
    running = compiled.running()
    assert [m for m, yes in running.items() if not yes] == [], "run `make install` first"
    assert compiled.summary() == "mypyc"
    import proxy.relay.http

    assert proxy.relay.http.__file__.endswith(".so")  # what Python actually loaded


def copy_package(target: Path, *, with_extensions: bool) -> Path:
    """proxy/ (with or without its compiled files) and setup.py, as a checkout would have them."""
    ignore = ["__pycache__"] + ([] if with_extensions else ["*.so"])
    shutil.copytree(ROOT / "proxy", target / "proxy", ignore=shutil.ignore_patterns(*ignore))
    shutil.copy(ROOT / "setup.py", target / "setup.py")
    return target


def python_in(tree: Path, code: str) -> subprocess.CompletedProcess[str]:
    """`code` run with `tree` first on sys.path (ahead of this checkout's editable install)."""
    return subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); {code}"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_module_edited_after_compiling_is_refused_by_name(tmp_path: Path) -> None:
    tree = copy_package(tmp_path, with_extensions=True)
    fine = python_in(tree, "import proxy.compiled as c; print(c.summary(), c.__file__)")
    assert fine.returncode == 0, fine.stderr
    assert fine.stdout.split() == ["mypyc", str(tree / "proxy" / "compiled.py")]
    source = tree / "proxy" / "relay" / "upstream.py"
    later = max(path.stat().st_mtime for path in tree.rglob("*.so")) + 5
    os.utime(source, (later, later))
    refused = python_in(tree, "import proxy")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "ImportError: proxy/relay/upstream.py changed after it was compiled with mypyc: "
        "run `make install` to rebuild"
    )


def test_the_plain_python_modules_serve_the_same(tmp_path: Path) -> None:
    """What `pip install .` gives without AUTHPROXY_MYPYC=1: the same policy, uncompiled."""
    tree = copy_package(tmp_path / "tree", with_extensions=False)
    upstream_port = free_port()
    upstream = spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.support.upstreams:app",
            "--port",
            str(upstream_port),
            "--log-level",
            "warning",
            "--lifespan",
            "off",
        ],
        tmp_path / "upstream.log",
        upstream_port,
    )
    port, admin = free_port(), free_port()
    config = tmp_path / "pure.toml"
    config.write_text(sidecar_config(upstream_port, port, admin, CONFIG))
    code = (
        "import runpy; sys.argv[0] = 'authproxy'; "
        "runpy.run_module('proxy', run_name='__main__', alter_sys=True)"
    )
    sidecar: Process = spawn(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(tree)!r}); {code}",
            "serve",
            "--config",
            str(config),
        ],
        tmp_path / "sidecar.log",
        port,
        env={"AUTHPROXY__LOGGING__FLUSH_INTERVAL_S": "0"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/public/x").json()["path"] == "/public/x"
        refused = httpx.get(f"{url}/echo/x")
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
        seen = httpx.get(f"{url}/echo/x", headers={"X-API-Key": "ak_pure_python_key"}).json()
        assert ["x-auth-subject", "reader"] in seen["headers"]
    finally:
        upstream.stop()
        assert sidecar.stop() == 0, sidecar.output()
    lines = [json.loads(line) for line in sidecar.output().splitlines() if line.startswith("{")]
    (start,) = [line for line in lines if line["message"] == "authproxy starting"]
    assert start["compiled"] == "no"  # it ran the copy: this checkout's own build is compiled

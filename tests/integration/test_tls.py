"""TLS on both hops, with certificates from trustme: HTTPS and WSS on the public listener (its
certificate re-read on SIGHUP), an https/wss upstream trusted through `upstream.ca_file`, and a
client certificate for an upstream that asks for one."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from websockets.asyncio.client import connect

from tests.support.servers import ROOT, Process, Sidecar, start_sidecar, start_upstream

UPSTREAM = "tests.support.upstreams:http_and_ws"


def write_pair(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def peer_certificate(port: int, ca: trustme.CA) -> tuple[bytes, str, str | None]:
    """The DER certificate the listener presents, the TLS version and the ALPN protocol."""
    context = client_context(ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der, tls.version() or "", tls.selected_alpn_protocol()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Process]:
    process = start_upstream(UPSTREAM, tmp_path)
    yield process
    process.stop()


def tls_sidecar(tmp_path: Path, upstream_port: int, ca: trustme.CA, **kwargs: str) -> Sidecar:
    cert, key = write_pair(ca.issue_cert("127.0.0.1", "localhost"), tmp_path, "server")
    server = f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
    return start_sidecar(tmp_path, upstream_port, server=server, **kwargs)


# --- the public listener -----------------------------------------------------------------------


def test_https_requests_reach_the_upstream_and_plain_http_is_not_served(
    tmp_path: Path, upstream: Process, ca: trustme.CA
) -> None:
    sidecar = tls_sidecar(tmp_path, upstream.port, ca)
    try:
        base = f"https://127.0.0.1:{sidecar.port}"
        with httpx.Client(verify=client_context(ca)) as client:
            r = client.get(base + "/echo/a?b=1")
        assert r.status_code == 200
        headers = dict(r.json()["headers"])
        assert headers["x-forwarded-proto"] == "https"  # the upstream learns the client's scheme
        # A client that does not trust the CA gets a failed handshake, not an answer.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(base + "/echo/a")
        # Plain HTTP on the TLS port: no answer in clear text.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{sidecar.port}/echo/a", timeout=3)
        _, version, alpn = peer_certificate(sidecar.port, ca)
        assert version in ("TLSv1.2", "TLSv1.3")
        assert alpn == "http/1.1"  # offered h2 too: the listener speaks HTTP/1.1 only
        # TLS 1.1 and older are refused.
        old = client_context(ca)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", sidecar.port), timeout=5) as raw:
            with pytest.raises(ssl.SSLError):
                old.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        sidecar.stop()


# Without compression whole frames pass (relay/ws_passthrough.py), split from the decrypted
# bytes; with it, the message relay runs.
@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_wss_sessions_are_tunnelled(
    tmp_path: Path, upstream: Process, ca: trustme.CA, compression: str | None
) -> None:
    sidecar = tls_sidecar(tmp_path, upstream.port, ca)
    try:
        url = f"wss://127.0.0.1:{sidecar.port}/ws/echo"
        async with connect(
            url, ssl=client_context(ca), open_timeout=5, compression=compression, max_size=None
        ) as ws:
            for message in ("over tls", b"\x00" * 70_000, "é" * 30_000, b"\x01"):
                await ws.send(message)
                assert await ws.recv() == message
    finally:
        sidecar.stop()


def test_sighup_reloads_the_certificate_and_a_bad_one_keeps_the_old(
    tmp_path: Path, upstream: Process, ca: trustme.CA
) -> None:
    sidecar = tls_sidecar(tmp_path, upstream.port, ca)
    try:
        first, _, _ = peer_certificate(sidecar.port, ca)
        # A renewed certificate written over the files (what cert-manager or certbot do)...
        write_pair(ca.issue_cert("127.0.0.1", "localhost"), tmp_path, "server")
        sidecar.process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while (second := peer_certificate(sidecar.port, ca)[0]) == first:
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            time.sleep(0.05)
        # ...then a broken key: the renewed certificate stays in use and the process serves on.
        (tmp_path / "server.key").write_text("not a key\n")
        sidecar.process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "certificate reload failed" not in sidecar.output():
            assert time.monotonic() < deadline, sidecar.output()
            time.sleep(0.05)
        assert peer_certificate(sidecar.port, ca)[0] == second
        with httpx.Client(verify=client_context(ca)) as client:
            assert client.get(f"https://127.0.0.1:{sidecar.port}/echo/x").status_code == 200
        metrics = httpx.get(sidecar.admin_url + "/metrics").text
        assert 'authproxy_tls_reloads_total{result="ok"} 1.0' in metrics
        assert 'authproxy_tls_reloads_total{result="error"} 1.0' in metrics
        assert "BEGIN" not in sidecar.output()  # no PEM, let alone a key, in the log
    finally:
        sidecar.stop()


# --- the upstream hop --------------------------------------------------------------------------


def tls_upstream(tmp_path: Path, ca: trustme.CA, client_ca: trustme.CA | None = None) -> Process:
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "upstream")
    # No proxy headers: the scope's scheme is then the connection's own, https.
    args = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--no-proxy-headers"]
    if client_ca is not None:  # mTLS: the upstream requires a certificate from this CA
        client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
        args += ["--ssl-ca-certs", str(tmp_path / "client-ca.pem"), "--ssl-cert-reqs", "2"]
    return start_upstream(UPSTREAM, tmp_path, extra_args=args)


async def test_an_https_upstream_is_verified_against_ca_file(
    tmp_path: Path, ca: trustme.CA
) -> None:
    upstream = tls_upstream(tmp_path, ca)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trusted = start_sidecar(
        tmp_path,
        upstream.port,
        upstream=f'ca_file = "{tmp_path / "ca.pem"}"',
        upstream_scheme="https",
    )
    # Without ca_file the system store is used, and it does not know this CA: 502, never a
    # request sent over an unverified connection.
    untrusted = start_sidecar(tmp_path, upstream.port, upstream_scheme="https")
    try:
        r = httpx.get(trusted.url + "/echo/over-tls")
        assert r.status_code == 200
        assert r.json()["scheme"] == "https"
        for compression in (None, "deflate"):  # whole frames over TLS upstream, and messages
            async with connect(
                trusted.ws_url + "/ws/echo", open_timeout=5, compression=compression
            ) as ws:
                for message in ("wss upstream", b"\x02" * 70_000, b"\x03"):
                    await ws.send(message)
                    assert await ws.recv() == message
        refused = httpx.get(untrusted.url + "/echo/over-tls")
        assert refused.status_code == 502
        assert refused.json()["error"] == "bad_gateway"
        assert "Traceback" not in untrusted.output()
    finally:
        trusted.stop()
        untrusted.stop()
        upstream.stop()


def test_a_client_certificate_is_presented_to_an_upstream_that_requires_one(
    tmp_path: Path, ca: trustme.CA
) -> None:
    client_ca = trustme.CA()
    upstream = tls_upstream(tmp_path, ca, client_ca=client_ca)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert, key = write_pair(client_ca.issue_cert("authproxy.sidecar"), tmp_path, "client")
    trust = f'ca_file = "{tmp_path / "ca.pem"}"\n'
    with_cert = start_sidecar(
        tmp_path,
        upstream.port,
        upstream=trust + f'client_cert_file = "{cert}"\nclient_key_file = "{key}"\n',
        upstream_scheme="https",
    )
    without = start_sidecar(tmp_path, upstream.port, upstream=trust, upstream_scheme="https")
    try:
        assert httpx.get(with_cert.url + "/echo/mtls").status_code == 200
        assert httpx.get(without.url + "/echo/mtls").status_code == 502
    finally:
        with_cert.stop()
        without.stop()
        upstream.stop()


# --- configuration -----------------------------------------------------------------------------


def check_config(tmp_path: Path, server: str = "", upstream: str = "", scheme: str = "http") -> str:
    url = f"{scheme}://127.0.0.1:9"
    config = tmp_path / "check.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n{server}\n[upstream]\nurl = "{url}"\n{upstream}\n'
        '[[routes]]\npath = "/*"\nauth = "public"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("server", "upstream", "scheme", "names"),
    [
        ('tls_cert_file = "CERT"', "", "http", ["server.tls_cert_file", "tls_key_file"]),
        ('tls_key_file = "KEY"', "", "http", ["server.tls_key_file", "tls_cert_file"]),
        (
            'tls_cert_file = "MISSING"\ntls_key_file = "KEY"',
            "",
            "http",
            ["server.tls_cert_file", "missing.pem"],
        ),
        (
            'tls_cert_file = "CERT"\ntls_key_file = "OTHERKEY"',
            "",
            "http",
            ["server.tls_cert_file", "key"],
        ),
        ("", 'ca_file = "CA"', "http", ["upstream.ca_file", "https"]),
        ("", 'ca_file = "MISSING"', "https", ["upstream.ca_file", "missing.pem"]),
        (
            "",
            'client_cert_file = "CERT"',
            "https",
            ["upstream.client_cert_file", "client_key_file"],
        ),
    ],
)
def test_tls_settings_that_cannot_work_are_one_line_naming_the_key(
    tmp_path: Path, ca: trustme.CA, server: str, upstream: str, scheme: str, names: list[str]
) -> None:
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "good")
    _, other_key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "other")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    paths = {
        "CERT": cert,
        "OTHERKEY": other_key,
        "KEY": key,
        "CA": tmp_path / "ca.pem",
        "MISSING": tmp_path / "missing.pem",
    }

    def fill(text: str) -> str:
        for name in sorted(paths, key=len, reverse=True):
            text = text.replace(f'"{name}"', f'"{paths[name]}"')
        return text

    line = check_config(tmp_path, fill(server), fill(upstream), scheme)
    for name in names:
        assert name in line, line
    assert "BEGIN" not in line and "Traceback" not in line


def test_a_tls_listener_starts_in_each_worker(tmp_path: Path, ca: trustme.CA) -> None:
    upstream = start_upstream(UPSTREAM, tmp_path)
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "server")
    sidecar = start_sidecar(
        tmp_path,
        upstream.port,
        server=f'workers = 2\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n',
    )
    try:
        with httpx.Client(verify=client_context(ca)) as client:
            for _ in range(8):  # new connections, spread by the kernel across both workers
                r = client.get(
                    f"https://127.0.0.1:{sidecar.port}/echo/w", headers={"Connection": "close"}
                )
                assert r.status_code == 200
    finally:
        sidecar.stop()
        upstream.stop()


def test_relative_tls_paths_are_relative_to_the_config_file(tmp_path: Path, ca: trustme.CA) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    write_pair(ca.issue_cert("127.0.0.1"), conf, "server")
    write_pair(ca.issue_cert("authproxy"), conf, "client")
    ca.cert_pem.write_to_path(str(conf / "ca.pem"))
    config = conf / "authproxy.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:0"\ntls_cert_file = "server.crt"\n'
        'tls_key_file = "server.key"\n'
        '[upstream]\nurl = "https://127.0.0.1:9"\nca_file = "ca.pem"\n'
        'client_cert_file = "client.crt"\nclient_key_file = "client.key"\n'
        '[[routes]]\npath = "/*"\nauth = "public"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config)],
        cwd=ROOT,  # not the config's directory
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_ca_file_replaces_the_system_store_rather_than_adding_to_it(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """An upstream whose certificate the *system* store trusts (here SSL_CERT_FILE stands in for
    it) is refused when ca_file names another CA: ca_file is the whole trust."""
    system_ca, pinned_ca = ca, trustme.CA()
    upstream = tls_upstream(tmp_path, system_ca)
    system_ca.cert_pem.write_to_path(str(tmp_path / "system.pem"))
    pinned_ca.cert_pem.write_to_path(str(tmp_path / "pinned.pem"))
    env = {"SSL_CERT_FILE": str(tmp_path / "system.pem")}
    pinned = start_sidecar(
        tmp_path,
        upstream.port,
        upstream=f'ca_file = "{tmp_path / "pinned.pem"}"',
        upstream_scheme="https",
        env=env,
    )
    system = start_sidecar(tmp_path, upstream.port, upstream_scheme="https", env=env)
    try:
        assert httpx.get(system.url + "/echo/x").status_code == 200  # the stand-in works
        assert httpx.get(pinned.url + "/echo/x").status_code == 502
    finally:
        pinned.stop()
        system.stop()
        upstream.stop()

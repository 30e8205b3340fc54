"""The request's authority: Host syntax, and an absolute-form target against the Host."""

from __future__ import annotations

import pytest

from proxy.authority import absolute_form_problem, valid_host
from proxy.errors import BadRequest
from proxy.pipeline import Request


@pytest.mark.parametrize(
    "host",
    [
        b"app.test",
        b"App.Test:8080",
        b"localhost",
        b"svc_1.local.",
        b"127.0.0.1:8000",
        b"[::1]",
        b"[::1]:8000",
        b"[::ffff:10.0.0.1]:443",
        b"xn--pp-uia.test",
        b"a" * 63 + b".test",
    ],
)
def test_hosts_a_client_sends_are_valid(host: bytes) -> None:
    assert valid_host(host)


@pytest.mark.parametrize(
    "host",
    [
        b"",
        b":80",
        b"app.test:",
        b"app.test:65536",
        b"app.test:-1",
        b"app.test:8o",
        b"app.test/x",
        b"app.test\\x",
        b"app.test?x",
        b"app.test#x",
        b"user@app.test",
        b"app.test,evil.test",
        b"app.test;x",
        b"app.test evil.test",
        b" app.test",
        b"app.test\t",
        b"app..test",
        b".app.test",
        b"%61pp.test",
        b"\xc3\xa4pp.test",
        b"app.test\x00",
        b"[::1",
        b"::1",
        b"[::1]x",
        b"[fe80::1%25eth0]",
        b"[v1.fe]",
        b"[1.2.3.4]",
        b"a" * 64 + b".test",
        (b"a" * 60 + b".") * 5 + b"test",
    ],
)
def test_anything_else_is_not_a_host(host: bytes) -> None:
    assert not valid_host(host)


@pytest.mark.parametrize(
    ("target", "hosts", "ok"),
    [
        (b"http://app.test/x", [b"app.test"], True),
        (b"HTTPS://APP.test:8443/x?y", [b"app.test:8443"], True),
        (b"http://[::1]:8000/", [b"[::1]:8000"], True),
        (b"http://evil.test/x", [b"app.test"], False),
        (b"http://app.test:80/x", [b"app.test"], False),
        (b"http://app.test/x", [], False),
        (b"http://app.test/x", [b"app.test", b"app.test"], False),
        (b"http://user@app.test/x", [b"user@app.test"], False),
        (b"http://app.test", [b"app.test"], False),
        (b"http://app.test?x=/y", [b"app.test"], False),
        (b"ftp://app.test/x", [b"app.test"], False),
        (b"app.test:443", [b"app.test:443"], False),
        (b"//app.test/x", [b"app.test"], False),
    ],
)
def test_an_absolute_form_target_is_served_only_when_it_names_the_host(
    target: bytes, hosts: list[bytes], ok: bool
) -> None:
    assert (absolute_form_problem(target, hosts) is None) is ok


def scope(*headers: tuple[bytes, bytes], http_version: str = "1.1") -> dict[str, object]:
    return {"headers": list(headers), "http_version": http_version}


def test_request_read_refuses_two_hosts_a_bad_host_and_a_missing_one() -> None:
    for s in (
        scope((b"host", b"app.test"), (b"host", b"app.test")),
        scope((b"host", b"app.test,evil.test")),
        scope(),
    ):
        with pytest.raises(BadRequest) as caught:
            Request.read(s, "GET", 65536)
        assert caught.value.details["reason"] == "invalid_host"
    assert Request.read(scope(http_version="1.0"), "GET", 65536).host is None
    assert Request.read(scope((b"host", b"[::1]:80")), "GET", 65536).host == "[::1]:80"


def test_remembered_host_verdicts_are_only_valid_ones_and_bounded() -> None:
    from proxy import authority

    assert authority.valid_host(b"remembered.test:8080")
    assert b"remembered.test:8080" in authority._KNOWN_VALID
    assert authority.valid_host(b"remembered.test:8080")  # from memory: still valid
    assert not authority.valid_host(b"bad,host") and b"bad,host" not in authority._KNOWN_VALID
    for i in range(authority._MAX_KNOWN + 10):
        assert authority.valid_host(b"h%d.test" % i)
    assert len(authority._KNOWN_VALID) == authority._MAX_KNOWN
    assert not authority.valid_host(b"h1.test,evil")

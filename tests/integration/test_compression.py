"""Compression around a real sidecar and a real upstream: what the client decodes is exactly what
the upstream sent, and what must pass untouched does."""

from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import brotli
import httpx
import pytest

from tests.support import compressible
from tests.support.servers import Process, Sidecar, start_sidecar, start_upstream


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    process = start_upstream("tests.support.compressible:app", tmp_path_factory.mktemp("up"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def sidecar(up: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    s = start_sidecar(
        tmp_path_factory.mktemp("sc"),
        up.port,
        "[compression]\nenabled = true\nmin_bytes = 1024\n",
    )
    yield s
    s.stop()


def raw(sidecar: Sidecar, path: str, accept: str | None, method: str = "GET") -> httpx.Response:
    """The answer as sent: no decoding by the client."""
    headers = {"accept-encoding": accept} if accept is not None else {"accept-encoding": ""}
    with httpx.Client() as client:
        request = client.build_request(method, sidecar.url + path, headers=headers)
        response = client.send(request, stream=True)
        response._content = b"".join(response.iter_raw())
        response.close()
    return response


@pytest.mark.parametrize("size", [1500, 60_000, 300_000])  # whole, whole at the edge, streamed
def test_gzip_decodes_to_the_exact_upstream_bytes(sidecar: Sidecar, size: int) -> None:
    r = raw(sidecar, f"/json?size={size}", "gzip, deflate")
    expected = compressible.json_body(size)
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "gzip"
    assert gzip.decompress(r.content) == expected
    assert len(r.content) < len(expected) / 3
    assert r.headers["vary"] == "Origin, Accept-Encoding"
    assert r.headers["etag"] == 'W/"v1"'
    if "content-length" in r.headers:
        assert int(r.headers["content-length"]) == len(r.content)
    else:
        assert r.headers["transfer-encoding"] == "chunked"


def test_brotli_is_chosen_when_preferred_and_decodes_exactly(sidecar: Sidecar) -> None:
    r = raw(sidecar, "/json?size=50000", "gzip;q=0.5, br")
    assert r.headers["content-encoding"] == "br"
    assert brotli.decompress(r.content) == compressible.json_body(50_000)


def test_a_streamed_text_answer_is_compressed_as_it_streams(sidecar: Sidecar) -> None:
    chunks = compressible.text_chunks(5)
    with httpx.Client() as client:
        request = client.build_request(
            "GET", sidecar.url + "/stream?n=5", headers={"accept-encoding": "gzip"}
        )
        response = client.send(request, stream=True)
        assert response.headers["content-encoding"] == "gzip"
        assert "content-length" not in response.headers
        decoder = zlib.decompressobj(31)
        first_seen = None
        decoded = b""
        start = time.monotonic()
        for piece in response.iter_raw():
            decoded += decoder.decompress(piece)
            if first_seen is None and decoded:
                first_seen = time.monotonic() - start
        response.close()
    assert decoded + decoder.flush() == b"".join(chunks)
    # The first chunk decodes before the stream ends (5 chunks 20 ms apart): flushed per chunk.
    assert first_seen is not None and decoded.startswith(chunks[0])
    assert first_seen < 0.08


@pytest.mark.parametrize(
    ("path", "accept"),
    [
        ("/json?size=500", "gzip"),  # below min_bytes
        ("/binary?size=50000", "gzip"),  # not a text type
        ("/json?size=50000", "gzip;q=0"),  # refused by the client
        ("/json?size=50000", None),  # no Accept-Encoding at all
        ("/no-transform?size=50000", "gzip"),
        ("/sse", "gzip"),  # Server-Sent Events pass as they are
    ],
)
def test_what_must_not_be_compressed_passes_untouched(
    sidecar: Sidecar, up: Process, path: str, accept: str | None
) -> None:
    r = raw(sidecar, path, accept)
    direct = httpx.get(f"http://127.0.0.1:{up.port}{path}").content
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    assert r.content == direct


def test_an_answer_the_upstream_compressed_passes_as_it_came(sidecar: Sidecar) -> None:
    r = raw(sidecar, "/gzipped?size=50000", "gzip, br")
    assert r.headers["content-encoding"] == "gzip"
    assert gzip.decompress(r.content) == compressible.json_body(50_000)  # once, not twice


def test_partial_content_and_head_are_left_alone(sidecar: Sidecar) -> None:
    r = raw(sidecar, "/range?size=50000", "gzip")
    assert r.status_code == 206 and "content-encoding" not in r.headers
    assert r.content == compressible.json_body(50_000)[:5000]
    head = raw(sidecar, "/json?size=50000", "gzip", method="HEAD")
    assert "content-encoding" not in head.headers and head.content == b""


def test_compressed_bytes_are_counted(sidecar: Sidecar) -> None:
    raw(sidecar, "/json?size=20000", "gzip")
    text = httpx.get(sidecar.admin_url + "/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("authproxy_compression_bytes_total", "authproxy_compressed_resp"))
    }
    bytes_in = values['authproxy_compression_bytes_total{direction="in"}']
    bytes_out = values['authproxy_compression_bytes_total{direction="out"}']
    assert bytes_in >= 20_000 and 0 < bytes_out < bytes_in / 3
    assert values['authproxy_compressed_responses_total{encoding="gzip"}'] >= 1


def test_without_the_compression_table_nothing_is_compressed(up: Process, tmp_path: Path) -> None:
    s = start_sidecar(tmp_path, up.port)
    try:
        r = raw(s, "/json?size=50000", "gzip, br")
    finally:
        s.stop()
    assert "content-encoding" not in r.headers
    assert r.content == compressible.json_body(50_000)

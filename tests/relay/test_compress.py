"""Compression decisions without sockets: the client's Accept-Encoding, which answers qualify,
and how the headers change."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest

from proxy import config
from proxy.relay.compress import Compression, accepted, gzip_encoder, rewrite_headers

BOTH = ("br", "gzip")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"gzip", "gzip"),
        (b"gzip, deflate, br", "br"),  # a tie goes to brotli
        (b"br;q=0.5, gzip", "gzip"),
        (b"gzip;q=0", None),  # q=0 refuses
        (b"br;q=0, gzip;q=0", None),
        (b"*", "br"),
        (b"*;q=0.1, br;q=0", "gzip"),  # the star covers what is not named
        (b"identity", None),
        (b"x-gzip", "gzip"),
        (b"GZIP ; Q=0.8", "gzip"),
        (b"gzip;q=bogus", None),
        (b"", None),
    ],
)
def test_the_client_preference_decides_the_coding(header: bytes, expected: str | None) -> None:
    assert accepted(header, BOTH) == expected


def test_without_brotli_offered_a_brotli_only_client_gets_nothing() -> None:
    assert accepted(b"br", ("gzip",)) is None


def policy(**keys: object) -> Compression:
    return Compression(config.from_dict({"compression": {"enabled": True, **keys}}).compression)


ACCEPT = [(b"accept-encoding", b"gzip")]
JSON = [(b"content-type", b"application/json")]


@pytest.mark.parametrize(
    ("method", "status", "headers", "length", "compressed"),
    [
        ("GET", 200, JSON, 5000, True),
        ("GET", 200, JSON, None, True),  # a stream of unknown length
        ("GET", 200, JSON, 100, False),  # below min_bytes
        ("HEAD", 200, JSON, 5000, False),
        ("GET", 204, JSON, None, False),
        ("GET", 304, JSON, None, False),
        ("GET", 206, JSON, 5000, False),
        ("GET", 200, [*JSON, (b"content-range", b"bytes 0-1/9")], 5000, False),
        ("GET", 200, [*JSON, (b"content-encoding", b"gzip")], 5000, False),
        ("GET", 200, [*JSON, (b"cache-control", b"public, no-transform")], 5000, False),
        ("GET", 200, [(b"content-type", b"image/png")], 5000, False),
        ("GET", 200, [(b"content-type", b"application/octet-stream")], 5000, False),
        ("GET", 200, [(b"content-type", b"text/event-stream")], None, False),
        ("GET", 200, [(b"content-type", b"text/html; charset=utf-8")], 5000, True),
        ("GET", 200, [(b"content-type", b"application/problem+json")], 5000, True),
        ("GET", 200, [(b"content-type", b"image/svg+xml")], 5000, True),
        ("GET", 200, [(b"content-type", b"application/javascript")], 5000, True),
        ("GET", 200, [], 5000, False),  # no type: not guessed
    ],
)
def test_which_answers_are_compressed(
    method: str,
    status: int,
    headers: list[tuple[bytes, bytes]],
    length: int | None,
    compressed: bool,
) -> None:
    assert (policy().encoder(ACCEPT, method, status, headers, length) is not None) is compressed


def test_a_client_that_accepts_nothing_gets_nothing() -> None:
    assert policy().encoder([], "GET", 200, JSON, 5000) is None
    refused = [(b"accept-encoding", b"gzip;q=0, br;q=0")]
    assert policy().encoder(refused, "GET", 200, JSON, 5000) is None


def test_the_types_key_replaces_the_default_list() -> None:
    only_csv = policy(types=["text/csv"])
    assert only_csv.encoder(ACCEPT, "GET", 200, [(b"content-type", b"text/csv")], 5000)
    assert only_csv.encoder(ACCEPT, "GET", 200, JSON, 5000) is None


def test_the_headers_say_the_coding_merge_vary_and_weaken_the_etag() -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"5000"),
        (b"etag", b'"abc"'),
        (b"vary", b"Origin"),
    ]
    out = rewrite_headers(headers, "gzip", None)
    assert (b"vary", b"Origin, Accept-Encoding") in out
    assert (b"etag", b'W/"abc"') in out
    assert (b"content-encoding", b"gzip") in out
    assert not any(n == b"content-length" for n, _ in out)
    whole = rewrite_headers(headers, "br", 1234)
    assert (b"content-length", b"1234") in whole
    assert rewrite_headers([(b"vary", b"accept-encoding")], "gzip", None)[0] == (
        b"vary",
        b"accept-encoding",
    )
    assert (b"vary", b"Accept-Encoding") in rewrite_headers([], "gzip", None)
    weak = rewrite_headers([(b"etag", b'W/"x"')], "gzip", None)
    assert (b"etag", b'W/"x"') in weak


def test_a_stream_flushed_per_chunk_decodes_chunk_by_chunk_and_whole() -> None:
    enc = gzip_encoder(6)
    parts = [b"alpha " * 300, b"beta " * 300]
    first = enc.chunk(parts[0])
    d = zlib.decompressobj(31)
    assert d.decompress(first) == parts[0]  # the client can show the first chunk already
    rest = enc.chunk(parts[1]) + enc.finish()
    assert gzip.decompress(first + rest) == b"".join(parts)
    assert enc.bytes_in == sum(map(len, parts)) and enc.bytes_out == len(first + rest)


def test_brotli_encodes_what_brotli_decodes() -> None:
    picked = policy().encoder([(b"accept-encoding", b"br")], "GET", 200, JSON, 5000)
    assert picked is not None and picked[1] == "br"
    data = b'{"k": "value"}' * 1000
    assert brotli.decompress(picked[0].whole(data)) == data

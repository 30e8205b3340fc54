"""The path rule: what the policy judges is what the upstream receives."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import BadRequest
from proxy.paths import judge_path


@pytest.mark.parametrize(
    ("raw", "judged", "sent"),
    [
        (b"/api/models", "/api/models", b"/api/models"),
        (b"/api/models/", "/api/models/", b"/api/models/"),
        (b"/%61pi/models", "/api/models", b"/api/models"),
        (b"/api/caf%C3%A9", "/api/caf\u00e9", b"/api/caf%C3%A9"),
        (b"/api/a%20b", "/api/a b", b"/api/a%20b"),
        (b"/api/%7Euser", "/api/~user", b"/api/~user"),
        (b"/api/..x/.y", "/api/..x/.y", b"/api/..x/.y"),
        (b"/api/a.b/c..d", "/api/a.b/c..d", b"/api/a.b/c..d"),
    ],
)
def test_safe_paths_are_judged_decoded_and_sent_canonically(
    raw: bytes, judged: str, sent: bytes
) -> None:
    assert judge_path(raw) == (judged, sent)


@pytest.mark.parametrize(
    "raw",
    [
        b"/api/../admin",
        b"/api/./x",
        b"/api/..",
        b"/api/.",
        b"/..",
        b"/api/%2e%2e/admin",
        b"/api/%2E./admin",
        b"/api%2fadmin",
        b"/api%2Fadmin",
        b"/api%5cadmin",
        b"/api\\admin",
        b"/api//admin",
        b"//admin",
        b"/api/%00",
        b"/api/%0a",
        b"/api/%ff",
        b"/api/%C3",
        b"/api/%252e%252e/admin",
        b"/api/%252fadmin",
        b"/api/%255cadmin",
        b"api/x",
        b"*",
        b"/auth/..;/api/models",
        b"/auth/..%3B/api/x",
        b"/api/models;x",
        b"/api/a;jsessionid=1",
        b"/api/.../x",
        b"/api/....",
    ],
)
def test_ambiguous_paths_are_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        judge_path(raw)


@given(st.binary(max_size=64))
def test_any_path_is_either_refused_or_canonical_and_stable(tail: bytes) -> None:
    raw = b"/" + tail
    try:
        judged, sent = judge_path(raw)
    except BadRequest:
        return
    # Judging what we send gives the same verdict: the upstream cannot see another path.
    assert judge_path(sent) == (judged, sent)
    assert ".." not in judged.split("/") and "\\" not in judged


def _segments_refused(path: str) -> bool:
    """The segment rule, segment by segment (what paths._check_segments' shortcut must agree
    with): a dot-only segment anywhere, an empty one anywhere but last."""
    segments = path.split("/")
    return any(
        (s and not s.strip(".")) or (s == "" and i != len(segments) - 1)
        for i, s in enumerate(segments[1:], start=1)
    )


@given(st.text(st.sampled_from(list("/.a;")), max_size=12))
def test_the_segment_shortcut_agrees_with_the_segment_by_segment_rule(tail: str) -> None:
    from proxy.paths import _check_segments

    path = "/" + tail
    try:
        _check_segments(path)
    except BadRequest:
        assert ";" in path or _segments_refused(path)
    else:
        assert ";" not in path and not _segments_refused(path)


def test_the_canonical_byte_set_is_rfc_3986s_pchar_and_slash_without_percent() -> None:
    """`judge_path` tests a raw path against a byte set (`bytes.translate`), not the grammar:
    the two must agree on every byte, one at a time, and a path of them only is sent as it came."""
    import re

    from proxy.paths import _CANONICAL_BYTES

    # RFC 3986 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@"; the path adds "/".
    pchar = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/]")
    for byte in range(256):
        one = bytes([byte])
        assert (one in _CANONICAL_BYTES) == bool(pchar.fullmatch(one)), one
    assert judge_path(b"/api/v1/models:run@x") == ("/api/v1/models:run@x", b"/api/v1/models:run@x")
    # Outside the set (a space, a non-ASCII byte, a percent-escape): decoded and sent re-encoded.
    assert judge_path(b"/a%20b") == ("/a b", b"/a%20b")
    assert judge_path(b"/caf\xc3\xa9") == ("/café", b"/caf%C3%A9")

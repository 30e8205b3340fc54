"""W3C Trace Context: what is kept, what starts a new trace (tracing.py)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from proxy.ids import RequestIds, new_request_id, new_span_id
from proxy.tracing import MAX_TRACESTATE_BYTES, trace_of

VALID = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OURS = "0af7651916cd43dd8448eb211c80319c"
STRICT = re.compile(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def test_a_valid_context_is_kept_unchanged_with_its_state() -> None:
    t = trace_of(
        VALID, b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", OURS, new_request_id, new_span_id
    )
    assert t.traceparent == VALID and not t.started
    assert t.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert t.tracestate == b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


def test_a_missing_context_starts_a_trace_named_after_the_request_id() -> None:
    t = trace_of(None, b"rojo=1", OURS, new_request_id, new_span_id)
    assert t.started and t.trace_id == OURS
    assert STRICT.fullmatch(t.traceparent) and t.traceparent.startswith(b"00-" + OURS.encode())
    assert t.traceparent.endswith(b"-00")  # not sampled: the sidecar decided nothing
    assert t.tracestate is None  # a state without its parent means nothing


def test_a_client_request_id_that_is_not_a_trace_id_gets_a_fresh_one() -> None:
    # The client named the request itself (own_id None).
    t = trace_of(None, None, None, new_request_id, new_span_id)
    assert re.fullmatch("[0-9a-f]{32}", t.trace_id) and t.trace_id != "checkout-42"


INVALID = [
    b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # uppercase
    b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
    b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
    b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
    b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",  # 00 with more
    b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",  # later version, no dash
    b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
    b"",  # sent twice
]


def test_an_invalid_context_is_replaced_and_its_state_dropped() -> None:
    for value in INVALID:
        t = trace_of(value, b"congo=1", OURS, new_request_id, new_span_id)
        assert t.started and t.trace_id == OURS and t.tracestate is None, value


def test_a_later_version_is_read_as_version_00() -> None:
    t = trace_of(
        VALID.replace(b"00-", b"02-", 1) + b"-extra", None, OURS, new_request_id, new_span_id
    )
    assert t.traceparent == VALID and not t.started


def test_a_tracestate_beyond_what_must_be_carried_is_dropped() -> None:
    long = b"a=" + b"b" * MAX_TRACESTATE_BYTES
    assert trace_of(VALID, long, OURS, new_request_id, new_span_id).tracestate is None
    assert trace_of(VALID, b"a=\x01", OURS, new_request_id, new_span_id).tracestate is None


@given(st.binary(max_size=80), st.one_of(st.none(), st.binary(max_size=600)))
def test_whatever_arrives_the_upstream_gets_a_well_formed_context(
    traceparent: bytes, tracestate: bytes | None
) -> None:
    t = trace_of(traceparent, tracestate, new_request_id(), new_request_id, new_span_id)
    assert STRICT.fullmatch(t.traceparent)
    assert t.traceparent[3:35] != b"0" * 32 and t.traceparent[36:52] != b"0" * 16
    assert t.trace_id.encode() == t.traceparent[3:35]
    if t.tracestate is not None:
        assert len(t.tracestate) <= MAX_TRACESTATE_BYTES and b"\n" not in t.tracestate


def test_ids_are_lower_case_hex_of_their_length_and_a_span_id_is_never_zero() -> None:
    for _ in range(200):
        assert re.fullmatch("[0-9a-f]{32}", new_request_id())
        assert re.fullmatch("[0-9a-f]{16}", new_span_id())
    ids = RequestIds()
    ids._random.getrandbits = lambda k: 0  # type: ignore[method-assign]
    assert ids.new() == "0" * 32
    assert ids.span() == "1" + "0" * 15


def test_a_started_trace_takes_its_span_id_from_new_span() -> None:
    t = trace_of(None, None, OURS, new_request_id, lambda: "00f067aa0ba902b7")
    assert t.traceparent == b"00-" + OURS.encode() + b"-00f067aa0ba902b7-00"

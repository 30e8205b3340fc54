"""The memory engine's windows and slots, on a clock the test moves: exact limits, honest waits."""

from __future__ import annotations

import pytest

from proxy.state.rules import Rule, state_item, whole_seconds
from proxy.state.store import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rule(name: str = "r", limit: int = 3, window_s: int = 10, concurrent: int = 0) -> Rule:
    return Rule(name, False, limit, window_s, concurrent)


def test_a_fresh_caller_may_send_exactly_limit_at_once_and_the_next_is_refused() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    r = rule(limit=5)
    results = [store.hit_now([r], ["k"]) for _ in range(6)]
    assert [res.refused is None for res in results] == [True] * 5 + [False]
    assert [res.states[0][1] for res in results[:5]] == [4, 3, 2, 1, 0]
    assert results[5].refused == r
    assert results[5].retry_after_s == pytest.approx(10.0)


def test_retry_after_is_when_the_oldest_request_leaves_the_window_and_is_enough() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    r = rule(limit=2, window_s=10)
    store.hit_now([r], ["k"])
    clock.now += 4
    store.hit_now([r], ["k"])
    clock.now += 1
    refused = store.hit_now([r], ["k"])
    assert refused.refused == r and refused.retry_after_s == pytest.approx(5.0)
    clock.now += refused.retry_after_s - 0.001
    assert store.hit_now([r], ["k"]).refused == r  # a moment early: still refused
    clock.now += 0.001
    assert store.hit_now([r], ["k"]).refused is None  # on time: let through


def test_no_window_of_window_s_seconds_ever_holds_more_than_limit() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    r = rule(limit=4, window_s=3)
    allowed: list[float] = []
    for step in range(400):  # a request every 0.1 s for 40 s
        clock.now = 1000.0 + step * 0.1
        if store.hit_now([r], ["k"]).refused is None:
            allowed.append(clock.now)
    for i, t in enumerate(allowed):
        assert sum(1 for u in allowed[i:] if u < t + 3 - 1e-9) <= 4
    assert len(allowed) >= 4 * (40 // 3)  # and the limit is not stricter than asked


def test_refused_requests_are_not_counted() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    r = rule(limit=1, window_s=10)
    store.hit_now([r], ["k"])
    for _ in range(50):
        store.hit_now([r], ["k"])
    clock.now += 10
    assert store.hit_now([r], ["k"]).refused is None


def test_the_strictest_of_several_rules_wins_and_a_refusal_counts_in_none() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    loose, tight = rule("loose", limit=100, window_s=60), rule("tight", limit=2, window_s=30)
    keys = ["loose|a", "tight|a"]
    assert store.hit_now([loose, tight], keys).refused is None
    assert store.hit_now([loose, tight], keys).refused is None
    third = store.hit_now([loose, tight], keys)
    assert third.refused == tight and third.retry_after_s == pytest.approx(30.0)
    # `loose` counted the two requests let through, not the refused one.
    assert third.states[0][1] == 98


def test_callers_are_counted_apart() -> None:
    store = MemoryStore(Clock())
    r = rule(limit=1)
    assert store.hit_now([r], ["a"]).refused is None
    assert store.hit_now([r], ["b"]).refused is None
    assert store.hit_now([r], ["a"]).refused == r


def test_the_sweep_forgets_windows_nobody_used_for_a_window() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    r = rule(limit=5, window_s=10)
    for i in range(100):
        store.hit_now([r], [f"caller-{i}"])
    assert len(store) == 100
    clock.now += 5
    store.hit_now([r], ["recent"])
    clock.now += 5.5
    store.sweep()
    assert len(store) == 1


async def test_slots_are_capped_per_key_and_given_back() -> None:
    store = MemoryStore(Clock())
    r = rule(concurrent=2, limit=0)
    a = await store.acquire([r], ["k"])
    b = await store.acquire([r], ["k"])
    assert await store.acquire([r], ["k"]) == r
    assert not isinstance(await store.acquire([r], ["other"]), Rule)
    assert not isinstance(a, Rule) and not isinstance(b, Rule)
    store.release(a)
    assert store.held("k") == 1
    c = await store.acquire([r], ["k"])
    assert not isinstance(c, Rule)
    store.release(b)
    store.release(c)
    assert store.held("k") == 0 and len(store) == 1  # only "other" still holds one


def test_header_values_are_the_draft_s_structured_fields() -> None:
    r = rule("per-caller", limit=100, window_s=60)
    assert state_item(r, 7, 11.2) == '"per-caller";r=7;t=12'
    assert state_item(r, -1, 0.0) == '"per-caller";r=0;t=0'
    assert whole_seconds(3.0) == 3 and whole_seconds(3.0001) == 4


def test_ipv6_clients_are_counted_by_their_64() -> None:
    from proxy.state.limiter import client_key

    assert (
        client_key("2001:db8:1:2::7") == client_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    )
    assert client_key("2001:db8:1:3::7") != client_key("2001:db8:1:2::7")
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key(None) == "-"

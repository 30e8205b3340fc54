"""server.DrainingServer's signal handling: one stop, however its signals arrive."""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
import uvicorn

from proxy.server import SAME_STOP_S, DrainingServer


async def _app(scope: Any, receive: Any, send: Any) -> None:  # never called
    raise AssertionError


class Stops:
    """A DrainingServer and what it told the app."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.exits = 0
        self.stops = 0
        self.server = DrainingServer(
            uvicorn.Config(_app), self.on_exit, on_stop=self.on_stop, delay_s=delay_s
        )

    def on_exit(self) -> None:
        self.exits += 1

    def on_stop(self) -> None:
        self.stops += 1


_OWN_CODE = {DrainingServer.handle_exit.__code__, DrainingServer._exit_now.__code__}


def _with_a_signal_inside(
    first: Callable[[], None], second: Callable[[], None], at_step: int
) -> bool:
    """Run `first`, and `second` inside it before its `at_step`-th line (of handle_exit and
    _exit_now), as Python runs a signal handler that arrives while another runs. False when
    `first` had fewer lines than that (`second` was not run)."""
    steps = 0
    fired = False

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal steps, fired
        if event in ("line", "return") and not fired:
            steps += 1
            if steps == at_step:
                fired = True
                second()  # not traced: the trace function is off while it runs
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        return on_line if frame.f_code in _OWN_CODE else None

    before = sys.gettrace()  # (a coverage run's, say)
    sys.settrace(on_call)
    try:
        first()
    finally:
        sys.settrace(before)
    return fired


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)],
    ids=["sigterm-inside-sigint", "sigint-inside-sigterm"],
)
async def test_ctrl_c_and_the_supervisors_sigterm_are_one_graceful_stop_wherever_they_interleave(
    first: signal.Signals, second: signal.Signals
) -> None:
    # `make run` under Ctrl-C: the terminal's SIGINT and the stack's SIGTERM reach the sidecar a
    # moment apart, and one handler can run inside the other. Found in CI: uvicorn took the inner
    # one for a second Ctrl-C and skipped the lifespan's shutdown (a CancelledError line).
    step = 1
    while True:
        stops = Stops()
        server = stops.server
        inside = _with_a_signal_inside(
            functools.partial(server.handle_exit, first, None),
            functools.partial(server.handle_exit, second, None),
            step,
        )
        await asyncio.sleep(0)  # the app hears of the stop through the loop
        assert server.should_exit, step
        assert not server.force_exit, step
        assert stops.exits == 1, step
        if not inside:
            break
        step += 1
    assert step > 3  # the interleavings were tried, not skipped


async def test_a_second_ctrl_c_within_the_same_stop_is_ignored_and_a_later_one_forces() -> None:
    stops = Stops()
    server = stops.server
    server.handle_exit(signal.SIGINT, None)
    server.handle_exit(signal.SIGINT, None)  # the terminal's and another's, together
    assert server.should_exit and not server.force_exit
    server.handle_exit(signal.SIGTERM, None)
    assert not server.force_exit
    assert server._stopping_since is not None
    server._stopping_since -= SAME_STOP_S  # a person pressing Ctrl-C again, later
    server.handle_exit(signal.SIGTERM, None)
    assert not server.force_exit  # SIGTERM never forces
    server.handle_exit(signal.SIGINT, None)
    assert server.force_exit
    await asyncio.sleep(0)
    assert stops.exits == 1


async def test_sigterm_with_a_shutdown_delay_serves_on_and_sigint_cuts_the_delay_short() -> None:
    stops = Stops(delay_s=30.0)
    server = stops.server
    server.handle_exit(signal.SIGTERM, None)
    assert stops.stops == 1 and not server.should_exit  # readiness failed, still serving
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and not server.force_exit
    await asyncio.sleep(0)
    assert stops.exits == 1


async def test_the_shutdown_delay_ends_in_the_drain_on_its_own() -> None:
    stops = Stops(delay_s=0.01)
    server = stops.server
    server.handle_exit(signal.SIGTERM, None)
    assert not server.should_exit
    await asyncio.sleep(0.05)
    assert server.should_exit and not server.force_exit and stops.exits == 1

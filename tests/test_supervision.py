"""Background tasks that raise are logged with their traceback and started again."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller import ControllerConfig
from controller.decisions.registry import Worker
from controller.sharing.parent import ParentLink
from controller.sharing.state import StateFile
from controller.upkeep.supervision import supervise

from .conftest import FakeClock, MakeWorker, RunController, post_ok, register_body, wait_until

SUPERVISOR = "controller.upkeep.supervision"


class InjectedFault(Exception):
    """What the tests make a background task raise."""


def failing_once(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, except that its first call raises :class:`InjectedFault`."""
    calls = 0

    def faulty(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise InjectedFault("injected by the test")
        return real(*args, **kwargs)

    return faulty


def supervisor_errors(caplog: pytest.LogCaptureFixture, task: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == SUPERVISOR and r.levelno == logging.ERROR and task in r.getMessage()
    ]


def assert_logged_with_traceback(caplog: pytest.LogCaptureFixture, task: str) -> None:
    [record] = supervisor_errors(caplog, task)
    assert record.exc_info is not None and isinstance(record.exc_info[1], InjectedFault)
    assert "Traceback (most recent call last)" in caplog.text
    assert "InjectedFault: injected by the test" in caplog.text


async def test_expiry_keeps_working_after_the_sweep_raised(
    run_controller: RunController,
    make_worker: MakeWorker,
    clock: FakeClock,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sweep that raises is logged at ERROR with its traceback, and a silent worker is
    still removed afterwards."""
    caplog.set_level(logging.INFO, logger="controller")
    config = ControllerConfig(
        host="127.0.0.1", port=0, heart_beat_expiration=0.2, load_poll_interval=0
    )
    controller = await run_controller(config, clock=clock)
    registry = controller.registry
    registry.expire = failing_once(registry.expire)  # type: ignore[method-assign]
    worker = await make_worker()
    await post_ok(http, controller, "/register_worker", register_body(worker))
    clock.advance(0.3)

    # The sweep runs every 0.1 s of real time; the restart waits 0.1 s.
    await wait_until(lambda: len(registry) == 0, timeout=5)

    assert_logged_with_traceback(caplog, "expiry")
    removed = [r for r in caplog.records if f"Removed worker {worker.url}" in r.getMessage()]
    assert len(removed) == 1


async def test_parent_link_recovers_after_it_raised(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A parent link that raises is logged with its traceback and restarted: the parent
    still learns the child's models."""
    monkeypatch.setattr(ParentLink, "offer", failing_once(ParentLink.offer))
    parent = await run_controller()
    config = ControllerConfig(
        host="127.0.0.1", port=0, parent_controller=parent.url, parent_heart_beat_interval=0.2
    )
    child = await run_controller(config)
    worker = await make_worker(model_names=["a"])
    await post_ok(http, child, "/register_worker", register_body(worker))

    await wait_until(lambda: parent.registry.model_names() == ["a"], timeout=5)

    assert_logged_with_traceback(caplog, "parent-link")
    entry = parent.registry.get(child.url)
    assert entry is not None and entry.info.model_names == ("a",)


async def test_state_file_saving_resumes_after_a_save_raised(
    tmp_path: Path,
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A state-file save that raises is logged with its traceback; the next registration
    is saved at once, with the one whose save failed."""
    monkeypatch.setattr(StateFile, "save", failing_once(StateFile.save))
    path = tmp_path / "state.json"
    config = ControllerConfig(host="127.0.0.1", port=0, state_file=str(path))
    controller = await run_controller(config)
    first, second = await make_worker(), await make_worker()
    await post_ok(http, controller, "/register_worker", register_body(first))
    await wait_until(lambda: bool(supervisor_errors(caplog, "state")), timeout=5)

    await post_ok(http, controller, "/register_worker", register_body(second))

    def saved() -> set[str]:
        try:
            return {w["worker_name"] for w in json.loads(path.read_bytes())["workers"]}
        except FileNotFoundError:
            return set()

    # Well before the periodic save (a third of the 90 s expiration) would write it.
    await wait_until(lambda: saved() == {first.url, second.url}, timeout=5)
    assert_logged_with_traceback(caplog, "state")


@pytest.fixture
def delays() -> list[float]:
    return []


async def run_supervised(
    outcomes: list[float | None], delays: list[float], clock: FakeClock
) -> None:
    """Supervise work whose runs last ``outcomes[i]`` seconds of ``clock`` and then raise;
    ``None`` ends the work normally."""
    runs = iter(outcomes)

    async def work() -> None:
        lasted = next(runs)
        if lasted is None:
            return
        clock.advance(lasted)
        raise InjectedFault("injected by the test")

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    await supervise(
        work, "test", first_delay=0.1, max_delay=1.0, healthy_after=60, clock=clock, sleep=sleep
    )


async def test_restarts_back_off_and_start_over_after_a_healthy_run(
    delays: list[float], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The delay before a restart doubles while failures follow each other, up to its
    cap, and starts over after a run that went well for a while."""
    await run_supervised([0, 0, 0, 0, 0, 0, 61, 0, None], delays, clock)

    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 0.1, 0.2]
    assert len(supervisor_errors(caplog, "test")) == 8


@pytest.mark.parametrize("where", ["while it works", "while it waits to restart"])
async def test_cancelling_a_supervised_task_always_cancels_it(where: str) -> None:
    """Cancellation is never taken for a failure: the supervised task ends cancelled."""
    working, waiting = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        working.set()
        if where == "while it works":
            await asyncio.Event().wait()
        raise InjectedFault("injected by the test")

    async def sleep(seconds: float) -> None:
        waiting.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise(work, "test", sleep=sleep))
    await (working if where == "while it works" else waiting).wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_controller_closes_while_a_task_waits_to_restart(
    run_controller: RunController, caplog: pytest.LogCaptureFixture
) -> None:
    """A controller whose background task keeps failing still closes, promptly."""
    config = ControllerConfig(
        host="127.0.0.1", port=0, heart_beat_expiration=0.2, load_poll_interval=0
    )
    controller = await run_controller(config)

    def always_fails() -> list[Worker]:
        raise InjectedFault("injected by the test")

    # The sweep's first step, taken whether or not a worker is due.
    controller.registry.due = always_fails  # type: ignore[method-assign]
    await wait_until(lambda: len(supervisor_errors(caplog, "expiry")) >= 2, timeout=5)

    async with asyncio.timeout(5):
        await controller.aclose()
    assert not controller.running

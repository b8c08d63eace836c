"""--state-file: the registry survives a restart; bad files never stop the controller."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest

from controller import Controller, ControllerConfig

from .conftest import FakeClock, MakeWorker, RunController, register_body


class WallClock(FakeClock):
    pass


def config(path: Path, **kwargs: object) -> ControllerConfig:
    return ControllerConfig(host="127.0.0.1", port=0, state_file=str(path), **kwargs)  # type: ignore[arg-type]


async def eventually_saved(path: Path, names: set[str], timeout: float = 5.0) -> None:
    """Wait until the state file lists exactly ``names``."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                saved = {w["worker_name"] for w in json.loads(path.read_bytes())["workers"]}
            except (FileNotFoundError, ValueError):
                saved = None
            if saved == names:
                return
            await asyncio.sleep(0.02)


async def address(http: aiohttp.ClientSession, controller: Controller, model: str = "m") -> str:
    async with http.post(f"{controller.url}/get_worker_address", json={"model": model}) as r:
        return str((await r.json())["address"])


async def test_registry_is_saved_as_it_changes(
    tmp_path: Path, run_controller: RunController, http: aiohttp.ClientSession
) -> None:
    """Registering and unregistering workers rewrites the state file to match."""
    path = tmp_path / "state.json"
    controller = await run_controller(config(path))
    for port in (1, 2):
        body = register_body(f"http://127.0.0.1:{port}")
        body["worker_status"] = {"model_names": ["m"], "speed": 1, "queue_length": 0}
        async with http.post(f"{controller.url}/register_worker", json=body):
            pass
    await eventually_saved(path, {"http://127.0.0.1:1", "http://127.0.0.1:2"})

    async with http.post(
        f"{controller.url}/unregister_worker", json={"worker_name": "http://127.0.0.1:1"}
    ):
        pass
    await eventually_saved(path, {"http://127.0.0.1:2"})


async def test_restarted_controller_routes_at_once(
    tmp_path: Path, make_worker: MakeWorker, http: aiohttp.ClientSession
) -> None:
    """A controller restarted on the same state file hands out workers without re-registration."""
    path = tmp_path / "state.json"
    worker = await make_worker(model_names=["a", "b"])
    async with Controller.serve(config(path)) as first:
        async with http.post(f"{first.url}/register_worker", json=register_body(worker)):
            pass

    async with Controller.serve(config(path)) as second:
        assert await address(http, second, "b") == worker.url
        async with http.post(f"{second.url}/list_models") as r:
            assert await r.json() == {"models": ["a", "b"]}
        # Known again: its next heartbeat is accepted, so it need not register.
        beat = {"worker_name": worker.url, "queue_length": 0}
        async with http.post(f"{second.url}/receive_heart_beat", json=beat) as r:
            assert await r.json() == {"exist": True}


async def test_a_state_file_larger_than_max_workers_still_starts(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A state file saved with more workers than a lower --max-workers allows starts the
    controller with as many as fit, and says how many it left out."""
    caplog.set_level(logging.INFO, logger="controller")
    path = tmp_path / "state.json"
    status = {"model_names": ["m"], "speed": 1, "queue_length": 0}
    async with Controller.serve(config(path)) as first:
        for port in (9001, 9002, 9003):
            body = register_body(f"http://127.0.0.1:{port}", worker_status=status)
            async with http.post(f"{first.url}/register_worker", json=body) as r:
                assert r.status == 200

    async with Controller.serve(config(path, max_workers=2)) as second:
        assert len(second.registry) == 2
    assert any("1 past --max-workers" in r.getMessage() for r in caplog.records)


async def test_stale_entries_expire_as_usual(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Saved heartbeats keep their age: old ones are dropped, recent ones expire on time."""
    path = tmp_path / "state.json"
    wall = WallClock(now=1_000_000.0)
    clock = FakeClock()

    def saved(name: str, age: float, check: bool = True) -> dict[str, object]:
        return {
            "worker_name": name,
            "model_names": [name.rsplit(":", 1)[1]],
            "speed": 1,
            "queue_length": 0,
            "check_heart_beat": check,
            "multimodal": False,
            "last_heart_beat": wall.now - age,
        }

    doc = {
        "version": 1,
        "saved_at": wall.now,
        "workers": [
            saved("http://127.0.0.1:1", age=100),  # past the 90 s expiration
            saved("http://127.0.0.1:2", age=80),  # 10 s left
            saved("http://127.0.0.1:3", age=10_000, check=False),  # never expires
        ],
    }
    path.write_text(json.dumps(doc))

    async with Controller.serve(config(path), clock=clock, wall_clock=wall) as controller:
        assert await address(http, controller, "1") == ""
        assert await address(http, controller, "2") == "http://127.0.0.1:2"
        assert await address(http, controller, "3") == "http://127.0.0.1:3"
        clock.advance(10.5)
        assert await address(http, controller, "2") == ""
        assert await address(http, controller, "3") == "http://127.0.0.1:3"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"version": 99, "workers": []}', b'{"version": 1, "workers": [{"x": 1}]}'],
)
async def test_corrupt_state_file_gives_warning_and_empty_start(
    tmp_path: Path,
    content: bytes,
    caplog: pytest.LogCaptureFixture,
    http: aiohttp.ClientSession,
) -> None:
    """A corrupt state file is reported and ignored; the controller starts empty and serves."""
    path = tmp_path / "state.json"
    path.write_bytes(content)
    caplog.set_level(logging.WARNING, logger="controller")

    async with Controller.serve(config(path)) as controller:
        async with http.post(f"{controller.url}/list_models") as r:
            assert await r.json() == {"models": []}

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in w and "empty registry" in w for w in warnings)


async def test_unreadable_state_file_gives_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    """A state file path that cannot be read (a directory) is reported; the controller serves."""
    caplog.set_level(logging.WARNING, logger="controller")
    async with Controller.serve(config(tmp_path)) as controller:
        async with http.get(f"{controller.url}/test_connection") as r:
            assert await r.json() == "success"
    assert any("Cannot read state file" in r.getMessage() for r in caplog.records)


async def test_a_write_left_running_by_a_cancelled_save_lands_before_the_next(
    tmp_path: Path,
) -> None:
    """The saver is cancelled at shutdown while its thread writes an older registry; the
    final save waits for that write, so the file ends with the registry as it is last."""
    import threading

    from controller.decisions.models import WorkerInfo
    from controller.decisions.registry import Registry
    from controller.sharing.state import Row, StateFile

    registry = Registry(expiration=90.0)
    registry.register(WorkerInfo("http://127.0.0.1:9001", ("m",), 1, False), 0)
    state = StateFile(str(tmp_path / "state.json"), registry, lambda: 1_000_000.0)
    release = threading.Event()
    writes: list[int] = []
    real_write = state._write

    def write(rows: list[Row], wall_now: float) -> None:
        if not writes:
            release.wait(10)  # the first write is slow
        writes.append(len(rows))
        real_write(rows, wall_now)

    state._write = write  # type: ignore[method-assign]
    first = asyncio.create_task(state.save())
    while state._writing is None:
        await asyncio.sleep(0)
    first.cancel()
    registry.register(WorkerInfo("http://127.0.0.1:9002", ("m",), 1, False), 0)
    last = asyncio.create_task(state.save())
    await asyncio.sleep(0)
    release.set()
    await last
    assert writes == [1, 2]
    saved = json.loads((tmp_path / "state.json").read_bytes())
    assert len(saved["workers"]) == 2


async def test_the_saver_stops_when_a_change_comes_in_the_same_turn_as_the_stop(
    tmp_path: Path,
) -> None:
    """A registry change and the stop (the saver's task cancelled) arriving together: the
    saver ends at once. With asyncio.wait_for on Python 3.11 the change's wake-up swallowed
    the cancellation, and shutdown waited out the saver's refresh (up to 30 s)."""
    from controller.decisions.models import WorkerInfo
    from controller.decisions.registry import Registry
    from controller.sharing.state import StateFile

    registry = Registry(expiration=90.0)
    state = StateFile(str(tmp_path / "state.json"), registry, lambda: 1_000_000.0)
    saver = asyncio.create_task(state.save_forever())
    for _ in range(5):  # the saver reaches its wait for a change
        await asyncio.sleep(0)
    registry.register(WorkerInfo("http://127.0.0.1:9001", ("m",), 1, False), 0)
    saver.cancel()
    for _ in range(20):  # turns, not time: a saver that ends does so in a few
        if saver.done():
            break
        await asyncio.sleep(0)
    assert saver.cancelled()

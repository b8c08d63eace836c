"""The registry's index from model to workers: registration order kept through removals."""

from __future__ import annotations

from controller.decisions.models import WorkerInfo, WorkerStatus
from controller.decisions.registry import Registry

from .conftest import FakeClock


def info(n: int, *models: str) -> WorkerInfo:
    return WorkerInfo(f"http://10.0.0.{n}:21002", models or ("m",), 1, True)


def names(registry: Registry, model: str) -> list[str]:
    return [w.name for w in registry.candidates(model)]


def test_removals_keep_the_others_in_registration_order(clock: FakeClock) -> None:
    """Workers that leave or expire drop out of their models' candidates; the rest keep
    the registration order dispatch breaks ties in, and a returning worker joins last."""
    registry = Registry(10, clock)
    for n in range(6):
        registry.register(info(n, "m", "n"), 0)
    clock.advance(8)
    for n in (0, 2, 4, 5):
        assert registry.heartbeat(info(n).name, 0)
    registry.remove(info(4).name)
    clock.advance(3)

    assert sorted(w.name for w, _ in registry.expire()) == [info(1).name, info(3).name]
    assert names(registry, "m") == names(registry, "n") == [info(n).name for n in (0, 2, 5)]
    registry.register(info(1, "m"), 0)
    assert names(registry, "m") == [info(n).name for n in (0, 2, 5, 1)]
    assert names(registry, "n") == [info(n).name for n in (0, 2, 5)]


def test_a_fleet_of_one_model_expiring_together_leaves_the_survivor(clock: FakeClock) -> None:
    """Thousands of workers of one model expiring in one sweep leave the one that
    heartbeats as the model's only candidate; a model nobody serves any more is gone."""
    registry = Registry(10, clock)
    fleet = [info(n) for n in range(3000)]
    for worker in fleet:
        registry.register(worker, 0)
    registry.register(info(9999, "other"), 0)
    clock.advance(8)
    assert registry.heartbeat(fleet[1234].name, 0)
    clock.advance(3)

    assert len(registry.expire()) == len(fleet)
    assert names(registry, "m") == [fleet[1234].name]
    assert names(registry, "other") == []
    assert registry.model_names() == ["m"]


def test_a_refresh_that_changes_models_moves_the_worker_between_indexes(
    clock: FakeClock,
) -> None:
    """A refresh answer naming other models takes the worker out of its old models'
    candidates and into the new ones'."""
    registry = Registry(10, clock)
    first, _ = registry.register(info(1, "m"), 0)
    registry.register(info(2, "m"), 0)
    assert registry.update(first, first.generation, WorkerStatus(("n",), 1, 0))
    assert names(registry, "m") == [info(2).name]
    assert names(registry, "n") == [info(1).name]


def test_listed_models_are_those_a_live_worker_of_the_kind_serves(clock: FakeClock) -> None:
    """A model is listed while some live worker serves it: a fleet of one model expired
    but not yet swept lists nothing, a worker that heartbeats keeps its models listed, a
    manual registration never expires, and each kind lists only its own workers'
    models (a model served by both kinds is in both lists)."""
    registry = Registry(10, clock)
    for n in range(2000):
        registry.register(info(n, "fleet"), 0)
    registry.register(info(3000, "kept", "shared"), 0)
    registry.register(WorkerInfo("http://10.0.1.1:21002", ("manual",), 1, False), 0)
    registry.register(WorkerInfo("http://10.0.1.2:21002", ("llava", "shared"), 1, True, True), 0)
    assert registry.model_names() == ["fleet", "kept", "llava", "manual", "shared"]
    clock.advance(8)
    assert registry.heartbeat(info(3000).name, 0)
    clock.advance(3)  # the fleet and the multimodal worker expired; nothing swept yet

    assert registry.model_names() == ["kept", "manual", "shared"]
    assert registry.model_names(False) == ["kept", "manual", "shared"]
    assert registry.model_names(True) == []
    registry.register(WorkerInfo("http://10.0.1.2:21002", ("llava", "shared"), 1, True, True), 0)
    assert registry.model_names(True) == ["llava", "shared"]
    assert registry.heartbeat(info(1999).name, 0) is False  # expired: it must register again
    registry.register(info(1999, "fleet"), 0)
    assert registry.model_names(False) == ["fleet", "kept", "manual", "shared"]

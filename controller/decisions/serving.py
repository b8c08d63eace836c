"""Which workers serve each model: ordered sets with O(1) removal and random draws.

Pure bookkeeping for the registry, which alone changes it. Dispatch reads it on every
request, so reading one model's workers never costs anything for the workers of other
models, and a random draw from a large fleet costs the size of the draw, not of the fleet.
"""

from __future__ import annotations

import random
from collections.abc import Container, Iterable

from .worker import Worker

__all__ = ["ModelIndex", "sort_out"]


class ModelIndex:
    """Per model, the workers serving it in registration order.

    Each model's workers are an ordered set (a dict's keys): registration order, which is
    the order dispatch ties are broken in, and adding or removing a worker in O(1) per
    model it serves, so a fleet expiring together costs linear time. Random draws need
    positions, which a dict does not have: a list of the model's workers is made on the
    first draw and kept until they change (a list copy of pointers, microseconds even for
    thousands, and membership changes are rare next to dispatches).
    """

    __slots__ = ("_lists", "serving")

    def __init__(self) -> None:
        #: per model, the workers serving it, live or not, in registration order: read it
        #: (a lookup on every dispatch, without a call), change it with add and discard
        self.serving: dict[str, dict[Worker, None]] = {}
        self._lists: dict[str, list[Worker]] = {}

    def __contains__(self, model: object) -> bool:
        """Whether some worker, live or not, serves ``model``."""
        return model in self.serving

    def add(self, worker: Worker, models: Iterable[str]) -> None:
        for model in models:
            self.serving.setdefault(model, {})[worker] = None
            self._lists.pop(model, None)

    def discard(self, worker: Worker, models: Iterable[str]) -> None:
        for model in models:
            serving = self.serving.get(model)
            if serving is None:
                continue
            serving.pop(worker, None)
            self._lists.pop(model, None)
            if not serving:
                del self.serving[model]

    def draw(self, model: str, k: int, rng: random.Random) -> list[Worker] | None:
        """``k`` distinct workers of ``model`` drawn at random, in registration order;
        ``None`` when it has ``k`` or fewer (the caller looks at all of them instead)."""
        serving = self.serving.get(model)
        if serving is None or len(serving) <= k:
            return None
        workers = self._lists.get(model)
        if workers is None:
            workers = self._lists[model] = list(serving)
        n = len(workers)
        if n < 2 * k:
            # Most of the fleet is drawn: random.sample's pool method, which never repeats.
            picked: Iterable[int] = rng.sample(range(n), k)
        else:
            # Positions drawn one at a time, a repeat drawn again: a uniform sample without
            # replacement like random.sample's, at about half its cost (rng.random is one
            # C call; sample's _randbelow is Python code per draw).
            uniform = rng.random
            distinct: set[int] = set()
            while len(distinct) < k:
                distinct.add(int(uniform() * n))
            picked = distinct
        # Sorted positions keep registration order among the drawn, for ties.
        return [workers[i] for i in sorted(picked)]


def sort_out(
    workers: Iterable[Worker], now: float, cutoff: float, exclude: Container[str]
) -> tuple[list[Worker], list[Worker]]:
    """Of ``workers``, those in rotation and those ejected after failures, in the order
    given; left out are the excluded ones and those registered with ``check_heart_beat``
    whose last heartbeat is before ``cutoff`` (expired, whether removed yet or not).

    The loads of those kept are brought up to ``now``: requests presumed finished by then
    stop counting. One pass, inline: this runs on every dispatch.
    """
    in_rotation: list[Worker] = []
    ejected: list[Worker] = []
    for w in workers:
        info = w.info
        if (info.check_heart_beat and w.last_heart_beat < cutoff) or (
            exclude and info.name in exclude
        ):
            continue
        load = w.load
        # Requests still waiting to be presumed finished (by address, or of the last
        # report): retire those due by now. Checked inline, per candidate per dispatch.
        if load.retire_at or load.reported_retired < load.reported_to_retire:
            load.retire(now)
        if w.ejected_until > now:
            ejected.append(w)
        else:
            in_rotation.append(w)
    return in_rotation, ejected

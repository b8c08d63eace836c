"""The registry of workers: plain synchronous methods over attrs objects, time injected.

Nothing here awaits, so each method runs to completion on the event loop without
interleaving. Operations that must await between reading and writing (probing a worker,
then recording what it said) take the controller's lock for their write phase and pass the
``generation`` they saw, so a registration that happened meanwhile is never overwritten.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from .models import WorkerInfo, WorkerStatus

__all__ = ["Registry"]

Clock = Callable[[], float]


class Registry:
    """Registered workers by name, with an index from model name to the workers serving it.

    Both the name map and each model's list keep registration order, which is the order
    dispatch ties are broken in. A worker registered with ``check_heart_beat`` whose last
    heartbeat is older than ``expiration`` is invisible to every query from that instant,
    whether or not :meth:`expire` has removed it yet.
    """

    def __init__(self, expiration: float, clock: Clock = time.monotonic) -> None:
        self.expiration = expiration
        self.clock = clock
        self._workers: dict[str, WorkerInfo] = {}
        self._by_model: dict[str, list[WorkerInfo]] = {}

    # -- queries -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[WorkerInfo]:
        """Iterate over a snapshot of the live workers, in registration order."""
        now = self.clock()
        return iter([w for w in self._workers.values() if not self._expired(w, now)])

    def get(self, name: str) -> WorkerInfo | None:
        """The live entry for ``name``, or ``None``."""
        info = self._workers.get(name)
        if info is None or self._expired(info, self.clock()):
            return None
        return info

    def candidates(self, model: str) -> list[WorkerInfo]:
        """The live workers serving ``model``, in registration order."""
        serving = self._by_model.get(model)
        if not serving:
            return []
        cutoff = self.clock() - self.expiration
        return [w for w in serving if not w.check_heart_beat or w.last_heart_beat >= cutoff]

    def model_names(self, multimodal: bool | None = None) -> list[str]:
        """Sorted union of the models of live workers; ``multimodal`` filters by kind."""
        names: set[str] = set()
        for w in self:
            if multimodal is None or w.multimodal == multimodal:
                names.update(w.model_names)
        return sorted(names)

    # -- changes -----------------------------------------------------------------------

    def register(
        self, name: str, status: WorkerStatus, *, check_heart_beat: bool, multimodal: bool
    ) -> tuple[WorkerInfo, bool]:
        """Add a worker or replace what is known of it; returns the entry and whether it is new.

        A replaced entry keeps its identity and place in line, so streams already relayed to
        it still settle their count on it when they end.
        """
        now = self.clock()
        info = self._workers.get(name)
        is_new = info is None or self._expired(info, now)
        if info is None:
            info = WorkerInfo(
                name=name,
                model_names=status.model_names,
                speed=status.speed,
                check_heart_beat=check_heart_beat,
                multimodal=multimodal,
                last_heart_beat=now,
            )
            self._workers[name] = info
            self._index(info, status.model_names)
        else:
            if info.model_names != status.model_names:
                self._unindex(info)
                self._index(info, status.model_names)
            info.model_names = status.model_names
            info.speed = status.speed
            info.check_heart_beat = check_heart_beat
            info.multimodal = multimodal
        info.generation += 1
        info.report(status.queue_length, now)
        return info, is_new

    def heartbeat(self, name: str, queue_length: int) -> bool:
        """Record a heartbeat; ``False`` when the worker is unknown or has already expired.

        An expired worker is forgotten here rather than revived: it must register again and
        tell the controller what it serves now.
        """
        info = self._workers.get(name)
        if info is None:
            return False
        now = self.clock()
        if self._expired(info, now):
            self._drop(info)
            return False
        info.report(queue_length, now)
        return True

    def remove(self, name: str) -> WorkerInfo | None:
        """Forget a worker at once; returns the entry that was removed, if any."""
        info = self._workers.get(name)
        if info is not None:
            self._drop(info)
        return info

    def update_if_current(self, info: WorkerInfo, generation: int, status: WorkerStatus) -> bool:
        """Apply a probed status unless the worker re-registered or left meanwhile."""
        if self._workers.get(info.name) is not info or info.generation != generation:
            return False
        if info.model_names != status.model_names:
            self._unindex(info)
            self._index(info, status.model_names)
            info.model_names = status.model_names
        info.speed = status.speed
        info.report(status.queue_length, self.clock())
        return True

    def remove_if_current(self, info: WorkerInfo, generation: int) -> bool:
        """Remove a worker whose probe failed, unless it re-registered or left meanwhile."""
        if self._workers.get(info.name) is not info or info.generation != generation:
            return False
        self._drop(info)
        return True

    def expire(self) -> list[tuple[WorkerInfo, float]]:
        """Remove every expired worker; returns each with how long it had been silent."""
        now = self.clock()
        gone = [w for w in self._workers.values() if self._expired(w, now)]
        for w in gone:
            self._drop(w)
        return [(w, now - w.last_heart_beat) for w in gone]

    # -- internals ---------------------------------------------------------------------

    def _expired(self, info: WorkerInfo, now: float) -> bool:
        return info.check_heart_beat and now - info.last_heart_beat > self.expiration

    def _drop(self, info: WorkerInfo) -> None:
        del self._workers[info.name]
        self._unindex(info)

    def _index(self, info: WorkerInfo, model_names: tuple[str, ...]) -> None:
        for model in model_names:
            self._by_model.setdefault(model, []).append(info)

    def _unindex(self, info: WorkerInfo) -> None:
        for model in info.model_names:
            serving = self._by_model.get(model)
            if serving is None:
                continue
            serving[:] = [w for w in serving if w is not info]
            if not serving:
                del self._by_model[model]

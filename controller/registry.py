"""The registry of workers: plain synchronous methods over attrs objects, time injected.

Nothing here awaits, so each method runs to completion on the event loop without
interleaving. Operations that must await between reading and writing (probing a worker,
then recording what it said) take the controller's lock for their write phase and pass the
``generation`` they saw, so a registration that happened meanwhile is never overwritten.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterator

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

    #: after this many failed relays in a row a worker is an outlier: only its ejection
    #: running out brings it back, not a heartbeat or a successful probe
    OUTLIER_FAILURES = 3

    def __init__(
        self,
        expiration: float,
        clock: Clock = time.monotonic,
        *,
        ejection_base: float = 5.0,
        ejection_max: float = 300.0,
        worker_slots: int | None = None,
    ) -> None:
        self.expiration = expiration
        #: how many requests each worker runs at once (None: one at a time)
        self.worker_slots = worker_slots
        self.clock = clock
        self.ejection_base = ejection_base
        self.ejection_max = ejection_max
        #: called with a worker and the reason when it is back in rotation early
        self.on_back_in_rotation: Callable[[WorkerInfo, str], None] | None = None
        #: called after a worker joined, left or changed what it serves
        self.on_change: Callable[[], None] | None = None
        self._workers: dict[str, WorkerInfo] = {}
        # The workers that can expire, so the sweep does not visit the others (a fleet of
        # manual registrations or child controllers would otherwise cost a scan a second).
        self._expiring: dict[str, WorkerInfo] = {}
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

    def candidates(self, model: str, exclude: Container[str] = ()) -> list[WorkerInfo]:
        """The live workers in rotation serving ``model``, in registration order.

        Workers ejected after failures are left out, unless all of them are.
        """
        serving = self._by_model.get(model)
        if not serving:
            return []
        now = self.clock()
        cutoff = now - self.expiration
        # One pass: this runs on every dispatch.
        in_rotation: list[WorkerInfo] = []
        ejected: list[WorkerInfo] = []
        for w in serving:
            if (w.check_heart_beat and w.last_heart_beat < cutoff) or (
                exclude and w.name in exclude
            ):
                continue
            if w.retiring:
                w.retire(now)
            if w.ejected_until > now:
                ejected.append(w)
            else:
                in_rotation.append(w)
        # When every live worker is ejected, trying them beats certain failure: one may
        # have recovered (Envoy calls this panic routing).
        return in_rotation or ejected

    def model_names(self, multimodal: bool | None = None) -> list[str]:
        """Sorted union of the models of live workers; ``multimodal`` filters by kind."""
        names: set[str] = set()
        for w in self:
            if multimodal is None or w.multimodal == multimodal:
                names.update(w.model_names)
        return sorted(names)

    # -- changes -----------------------------------------------------------------------

    def register(
        self,
        name: str,
        status: WorkerStatus,
        *,
        check_heart_beat: bool,
        multimodal: bool,
        last_heart_beat: float | None = None,
    ) -> tuple[WorkerInfo, bool]:
        """Add a worker or replace what is known of it; returns the entry and whether it is new.

        A replaced entry keeps its identity and place in line, so streams already relayed to
        it still settle their count on it when they end. ``last_heart_beat`` (on the
        registry's clock) is for entries restored from a saved state; it defaults to now.
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
            self._set_models(info, status.model_names)
            info.speed = status.speed
            info.check_heart_beat = check_heart_beat
            info.multimodal = multimodal
        # A registration is a fresh start, failures included.
        info.consecutive_failures = 0
        info.ejected_until = 0.0
        info.generation += 1
        if check_heart_beat:
            self._expiring[name] = info
        else:
            self._expiring.pop(name, None)
        info.report(status.queue_length, now, self.worker_slots)
        if last_heart_beat is not None:
            info.last_heart_beat = last_heart_beat
        self._changed()
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
        info.report(queue_length, now, self.worker_slots)
        if info.ejected_until:
            self._shows_life(info, "it sent a heartbeat")
        return True

    def remove(self, name: str) -> WorkerInfo | None:
        """Forget a worker at once; returns the entry that was removed, if any."""
        info = self._workers.get(name)
        if info is not None:
            self._drop(info)
        return info

    def update_if_current(self, info: WorkerInfo, generation: int, status: WorkerStatus) -> bool:
        """Apply a probed status unless the worker re-registered or left meanwhile."""
        if not self._is_current(info, generation):
            return False
        if self._set_models(info, status.model_names):
            self._changed()
        info.speed = status.speed
        info.report(status.queue_length, self.clock(), self.worker_slots)
        if info.ejected_until:
            self._shows_life(info, "it answered a status probe")
        return True

    def remove_if_current(self, info: WorkerInfo, generation: int) -> bool:
        """Remove a worker whose probe failed, unless it re-registered or left meanwhile."""
        if not self._is_current(info, generation):
            return False
        self._drop(info)
        return True

    def expire(self) -> list[tuple[WorkerInfo, float]]:
        """Remove every expired worker; returns each with how long it had been silent."""
        now = self.clock()
        gone = [w for w in self._expiring.values() if self._expired(w, now)]
        for w in gone:
            self._drop(w)
        return [(w, now - w.last_heart_beat) for w in gone]

    def record_failure(self, info: WorkerInfo) -> float:
        """Take a worker out of rotation after a relayed request failed; returns for how long.

        The ejection doubles with each failure in a row, from ``ejection_base`` up to
        ``ejection_max``.
        """
        info.consecutive_failures += 1
        doublings = min(info.consecutive_failures - 1, 30)
        duration = min(self.ejection_base * (1 << doublings), self.ejection_max)
        info.ejected_until = self.clock() + duration
        return duration

    def record_success(self, info: WorkerInfo) -> int:
        """A relayed request succeeded; returns how many failures in a row it ends."""
        failures = info.consecutive_failures
        if failures:
            info.consecutive_failures = 0
            info.ejected_until = 0.0
        return failures

    def is_ejected(self, info: WorkerInfo) -> bool:
        return info.ejected_until > self.clock()

    # -- internals ---------------------------------------------------------------------

    def _shows_life(self, info: WorkerInfo, how: str) -> None:
        # A worker that failed once or twice is back as soon as it shows it is alive; an
        # outlier waits out its ejection whatever it says.
        if info.consecutive_failures >= self.OUTLIER_FAILURES:
            return
        still_out = info.ejected_until > self.clock()
        info.ejected_until = 0.0
        if still_out and self.on_back_in_rotation is not None:
            self.on_back_in_rotation(info, how)

    def _expired(self, info: WorkerInfo, now: float) -> bool:
        return info.check_heart_beat and now - info.last_heart_beat > self.expiration

    def _drop(self, info: WorkerInfo) -> None:
        del self._workers[info.name]
        self._expiring.pop(info.name, None)
        self._unindex(info)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _is_current(self, info: WorkerInfo, generation: int) -> bool:
        return self._workers.get(info.name) is info and info.generation == generation

    def _set_models(self, info: WorkerInfo, model_names: tuple[str, ...]) -> bool:
        """Make ``info`` serve ``model_names``; returns whether that changed anything."""
        if info.model_names == model_names:
            return False
        self._unindex(info)
        self._index(info, model_names)
        info.model_names = model_names
        return True

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

"""The registry of workers, and the one place where it changes.

Every change to which workers exist, what they serve and when they last showed life goes
through a :class:`Registry` method, which applies it and appends it to the
:class:`~controller.decisions.changes.ChangeFeed`. Nothing here awaits or does I/O, so each
method runs to completion on the event loop without interleaving; time is injected.
Operations that await between reading and writing (probe a worker, then record what it
said) pass the ``generation`` they saw, so a registration that happened meanwhile is never
overwritten (see :mod:`controller.upkeep.probing` for the lock that orders them).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Container, Iterable, Iterator

import attrs

from ..errors import ForbiddenError
from .capacity import Capacity
from .changes import MEMBERSHIP, ChangeFeed, ChangeKind
from .health import Health
from .models import Owner, WorkerInfo, WorkerStatus
from .ownership import Standing, standing
from .serving import ModelIndex, sort_out
from .worker import Worker

__all__ = ["Clock", "Registry", "Worker"]

Clock = Callable[[], float]


class Registry(Health):
    """Registered workers by name, with an index from model name to the workers serving it.

    Both the name map and each model's set of workers keep registration order, which is
    the order dispatch ties are broken in. A worker registered with ``check_heart_beat``
    whose last heartbeat is older than ``expiration`` is invisible to every query from that
    instant, whether or not :meth:`expire` has removed it yet (unless expiry is held: see
    :meth:`hold_expiry`).
    """

    def __init__(
        self,
        expiration: float,
        clock: Clock = time.monotonic,
        *,
        ejection_base: float = 5.0,
        ejection_max: float = 300.0,
        worker_slots: int | None = None,
        feed: ChangeFeed | None = None,
        max_workers: int | None = None,
        max_per_source: int | None = None,
    ) -> None:
        self.expiration = expiration
        # How long silence is tolerated now: the expiration, or forever while expiry is
        # held (see hold_expiry).
        self._live_for = expiration
        #: registrations held at most, and made from one source at most (None: no limit)
        self.capacity = Capacity(max_workers, max_per_source)
        #: how many requests each worker runs at once (None: one at a time)
        self.worker_slots = worker_slots
        self.clock = clock
        self.ejection_base = ejection_base
        self.ejection_max = ejection_max
        #: every change, in order, for listeners (see :mod:`controller.decisions.changes`)
        self.feed = feed if feed is not None else ChangeFeed()
        #: counts the changes to which workers exist or what they serve (not heartbeats),
        #: so a cached answer about the registry can tell it is stale
        self.membership = 0
        #: called with a worker and the reason when it is back in rotation early
        self.on_back_in_rotation: Callable[[Worker, str], None] | None = None
        self._workers: dict[str, Worker] = {}
        # The workers that can expire, so the sweep does not visit the others (a fleet of
        # manual registrations or child controllers would otherwise cost a scan a second).
        self._expiring: dict[str, Worker] = {}
        # Per model, its workers in registration order (for dispatch ties), removal in O(1)
        # and random draws that cost the size of the draw.
        self._by_model = ModelIndex()

    # -- queries -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[Worker]:
        """Iterate over a snapshot of the live workers, in registration order."""
        now = self.clock()
        return iter([w for w in self._workers.values() if not self._expired(w, now)])

    def get(self, name: str) -> Worker | None:
        """The live entry for ``name``, or ``None``."""
        worker = self._workers.get(name)
        if worker is None or self._expired(worker, self.clock()):
            return None
        return worker

    def serves(self, model: str) -> bool:
        """Whether some registered worker, live or not yet swept, serves ``model``."""
        return model in self._by_model

    def candidates(
        self,
        model: str,
        exclude: Container[str] = (),
        now: float | None = None,
        draw: int = 0,
        need: int = 0,
        rng: random.Random | None = None,
    ) -> list[Worker]:
        """The live workers in rotation serving ``model``, in registration order.

        Workers ejected after failures are left out, unless all of them are. ``now`` saves
        a read of the clock when the caller has just read it.

        With ``draw`` (and ``rng``), a model with more workers than that has ``draw`` of
        them drawn at random instead, of which those live and in rotation, at a cost
        independent of the size of the fleet: a uniform draw from all entries, filtered,
        is a uniform draw from the workers in rotation, only smaller. When fewer than
        ``need`` of the drawn are usable (most of the fleet expired or ejected), every
        worker is looked at after all.
        """
        if now is None:
            now = self.clock()
        cutoff = now - self._live_for
        serving = self._by_model.serving.get(model, ())
        if draw and len(serving) > draw:
            assert rng is not None, "a draw needs a random source"
            drawn = self._by_model.draw(model, draw, rng)
            if drawn is not None:
                usable, _ = sort_out(drawn, now, cutoff, exclude)
                if len(usable) >= need:
                    return usable
        in_rotation, ejected = sort_out(serving, now, cutoff, exclude)
        # When every live worker is ejected, trying them beats certain failure: one may
        # have recovered (Envoy calls this panic routing).
        return in_rotation or ejected

    def standing(self, name: str, caller: Owner | None, admin: bool = False) -> Standing:
        """Where ``caller`` stands towards the live registration of ``name`` (the owner
        of a name nobody holds)."""
        worker = self.get(name)
        return standing(worker.owner if worker is not None else None, caller, admin)

    def check_room(self, name: str, source: str | None) -> None:
        """:class:`~controller.errors.RegistryFullError` if registering ``name`` from
        ``source`` would pass the capacity (registering a name again never does)."""
        held = self._workers.get(name)
        self.capacity.check(len(self), held.source if held else None, held is not None, source)

    def model_names(self, multimodal: bool | None = None) -> list[str]:
        """Sorted union of the models of live workers; ``multimodal`` filters by kind.

        Looks up the model index, not every worker: a model's first live worker of the
        kind ends its look (8,000 workers of one model cost 4 ms a call when each was
        visited)."""
        now = self.clock()
        expired = self._expired
        names = [
            model
            for model, serving in self._by_model.serving.items()
            if any(
                not expired(w, now) and (multimodal is None or w.info.multimodal == multimodal)
                for w in serving
            )
        ]
        return sorted(names)

    # -- changes: each one is applied here and appended to the feed ----------------------

    def register(
        self,
        info: WorkerInfo,
        queue_length: int,
        *,
        last_heart_beat: float | None = None,
        owner: Owner | None = None,
        admin: bool = False,
        source: str | None = None,
    ) -> tuple[Worker, bool]:
        """Add a worker or replace what is known of it; returns the entry and whether it is new.

        A replaced entry keeps its identity and place in line, so streams already relayed to
        it still settle their count on it when they end. ``last_heart_beat`` (on the
        registry's clock) is for entries restored from a saved state; it defaults to now.
        The registration then belongs to ``owner``; :class:`ForbiddenError` if a principal
        other than ``owner`` holds it (unless ``admin``).
        """
        name = info.name
        if self.standing(name, owner, admin) is Standing.FORBIDDEN:
            raise ForbiddenError(name)
        self.check_room(name, source)
        now = self.clock()
        worker = self._workers.get(name)
        is_new = worker is None or self._expired(worker, now)
        if worker is None:
            worker = Worker(info, now)
            self._workers[name] = worker
            self._by_model.add(worker, info.model_names)
        else:
            self._set_info(worker, info)
        worker.owner = owner
        self.capacity.moved(worker.source, source)
        worker.source = source
        # A registration is a fresh start, failures included.
        worker.consecutive_failures = 0
        worker.last_failure_at = None
        worker.ejected_until = 0.0
        worker.generation += 1
        if info.check_heart_beat:
            self._expiring[name] = worker
        else:
            self._expiring.pop(name, None)
        worker.load.report(queue_length, now, self.worker_slots)
        worker.last_heart_beat = now if last_heart_beat is None else last_heart_beat
        reason = "registered" if last_heart_beat is None else "restored"
        self._record(worker, ChangeKind.REGISTERED, queue_length, now, reason)
        return worker, is_new

    def heartbeat(
        self, name: str, queue_length: int, *, owner: Owner | None = None, admin: bool = False
    ) -> bool:
        """Record a heartbeat; ``False`` when the worker is unknown or has already expired,
        or when it came from another source than the registration's (not applied).

        An expired worker is forgotten here rather than revived: it must register again and
        tell the controller what it serves now. :class:`ForbiddenError` when a principal
        other than ``owner`` holds the registration.
        """
        worker = self._workers.get(name)
        if worker is None:
            return False
        now = self.clock()
        if self._expired(worker, now):
            self._drop(worker, "expired")
            return False
        where = standing(worker.owner, owner, admin)
        if where is Standing.FORBIDDEN:
            raise ForbiddenError(name)
        if where is Standing.OTHER_SOURCE:
            return False
        worker.load.report(queue_length, now, self.worker_slots)
        worker.last_heart_beat = now
        self._record(worker, ChangeKind.HEARTBEAT, queue_length, now)
        if worker.ejected_until:
            self._shows_life(worker, "it sent a heartbeat")
        return True

    def update(self, worker: Worker, generation: int, status: WorkerStatus) -> bool:
        """Re-register a worker from its answer to ``/refresh_all_workers``'s status probe,
        unless it re-registered or left meanwhile.

        As in FastChat, whose refresh registers every worker again: what it serves, its
        speed and its queue are replaced, and it counts as a sign of life (its heartbeat
        time is renewed).
        """
        if not self._is_current(worker, generation):
            return False
        now = self.clock()
        info = worker.info
        changed = status.model_names != info.model_names or status.speed != info.speed
        if changed:
            self._set_info(
                worker, attrs.evolve(info, model_names=status.model_names, speed=status.speed)
            )
        worker.last_heart_beat = now
        kind = ChangeKind.UPDATED if changed else ChangeKind.LOAD
        self._report(worker, kind, status.queue_length, now)
        return True

    def report_load(self, worker: Worker, generation: int, queue_length: int) -> bool:
        """Take the queue a load poll found, unless the worker re-registered or left meanwhile.

        Only the load changes. A poll is not a heartbeat: a worker that answers polls but
        stopped heartbeating still expires. Nor does it change what the worker serves: a
        restarted child controller answers ``model_names: []`` until its own workers have
        registered again, and forgetting its models then would leave it without traffic,
        and so without polls, for good. Registrations and ``/refresh_all_workers`` change
        what a worker serves.
        """
        if not self._is_current(worker, generation):
            return False
        self._report(worker, ChangeKind.LOAD, queue_length, self.clock())
        return True

    def remove(
        self, name: str, *, owner: Owner | None = None, admin: bool = False
    ) -> Worker | None:
        """Forget a worker that said it is leaving; returns the entry removed, if any.

        :class:`ForbiddenError` when ``owner`` is not who registered it (unless ``admin``).
        """
        worker = self._workers.get(name)
        if worker is not None:
            # An expired entry is nobody's any more: its ownership ended with it.
            if self.standing(name, owner, admin) is not Standing.OWNER:
                raise ForbiddenError(name)
            self._drop(worker, "unregistered")
        return worker

    def remove_if_current(self, worker: Worker, generation: int) -> bool:
        """Remove a worker whose probe failed, unless it re-registered or left meanwhile."""
        if not self._is_current(worker, generation):
            return False
        self._drop(worker, "unreachable")
        return True

    def due(self) -> list[Worker]:
        """The entries expired by now and not removed yet (for :meth:`expire`)."""
        # Inline: a scan of every worker that can expire, once a second.
        cutoff = self.clock() - self._live_for
        return [w for w in self._expiring.values() if w.last_heart_beat < cutoff]

    def expire(self, workers: Iterable[Worker] | None = None) -> list[tuple[Worker, float]]:
        """Remove the expired workers among ``workers`` (all of them if ``None``); returns
        each with how long it had been silent.

        ``workers`` may come from an earlier :meth:`due`: an entry that meanwhile was
        removed, registered again or sent a heartbeat is left alone.
        """
        now = self.clock()
        if workers is None:
            workers = self.due()
        gone: list[tuple[Worker, float]] = []
        for w in workers:
            if self._expiring.get(w.info.name) is w and self._expired(w, now):
                self._drop(w, "expired")
                gone.append((w, now - w.last_heart_beat))
        return gone

    def hold_expiry(self, held: bool) -> None:
        """While held, no worker expires on its heartbeats' age (a shared registry whose
        backend is unreachable: the heartbeats may be going to another replica)."""
        self._live_for = math.inf if held else self.expiration

    @property
    def expiry_held(self) -> bool:
        return self._live_for == math.inf

    # -- internals ---------------------------------------------------------------------

    def _record(
        self, worker: Worker, kind: ChangeKind, queue_length: int, now: float, reason: str = ""
    ) -> None:
        change = self.feed.append(kind, worker.info, queue_length, now, reason, worker.owner)
        worker.version = change.version
        if kind in MEMBERSHIP:
            self.membership += 1

    def _report(self, worker: Worker, kind: ChangeKind, queue_length: int, now: float) -> None:
        """A status probe's answer: the queue feeds the estimate, and a worker ejected after
        a failure or two is back in rotation (it answers, so it is up)."""
        worker.load.report(queue_length, now, self.worker_slots)
        self._record(worker, kind, queue_length, now)
        if worker.ejected_until:
            self._shows_life(worker, "it answered a status probe")

    def _expired(self, worker: Worker, now: float) -> bool:
        return worker.info.check_heart_beat and now - worker.last_heart_beat > self._live_for

    def _drop(self, worker: Worker, reason: str) -> None:
        name = worker.info.name
        self.capacity.moved(worker.source, None)
        del self._workers[name]
        self._expiring.pop(name, None)
        self._by_model.discard(worker, worker.info.model_names)
        self._record(worker, ChangeKind.REMOVED, 0, self.clock(), reason)

    def _is_current(self, worker: Worker, generation: int) -> bool:
        return self._workers.get(worker.info.name) is worker and worker.generation == generation

    def _set_info(self, worker: Worker, info: WorkerInfo) -> None:
        """Give ``worker`` a new registration, re-indexing it if it serves other models."""
        if info.model_names != worker.info.model_names:
            self._by_model.discard(worker, worker.info.model_names)
            self._by_model.add(worker, info.model_names)
        worker.info = info

"""The local side of a shared registry: which version of each worker this replica holds,
other replicas' changes applied through the registry's own methods, and this replica's
own changes told apart from those.

Applying another replica's change goes through :class:`~controller.decisions.registry.
Registry` like any change, so it lands in the change feed too; the versions of the feed
entries it made are remembered, and :meth:`Mirror.own` drops them, so a change is never
published back (no echo between replicas).
"""

from __future__ import annotations

import logging

from ..decisions.changes import Change, ChangeKind
from ..decisions.registry import Registry
from ..errors import RegistryFullError
from ..logtext import brief
from .redis_wire import Entry

__all__ = ["FRESH", "Mirror"]

log = logging.getLogger(__name__)

#: a change whose heartbeat is younger than this (seconds) counts as a heartbeat now
FRESH = 1.0


class Mirror:
    """The shared registry's bookkeeping beside one replica's registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        #: per worker, the version of the last change this replica holds (its own, once
        #: Redis stamped it, or another replica's); also the version of its last report
        self.versions: dict[str, int] = {}
        #: removals made here that Redis has not taken yet, with their versions
        self.tombs: dict[str, int] = {}
        # Feed versions of the changes made by applying other replicas' changes.
        self._echo: set[int] = set()
        self._full_logged = False

    def apply(self, entry: Entry) -> bool:
        """Apply another replica's change (or Redis's copy of a worker) unless this replica
        holds that worker's version already or a later one; ``True`` if applied."""
        name = entry.info.name
        if entry.version <= self.versions.get(name, 0):
            return False
        feed = self.registry.feed
        before = feed.version
        try:
            self._apply(entry)
        finally:
            self._echo.update(range(before + 1, feed.version + 1))
        self.versions[name] = entry.version
        tomb = self.tombs.get(name)
        if tomb is not None and tomb <= entry.version:
            del self.tombs[name]
        return True

    def own(self, changes: list[Change]) -> list[Change]:
        """Of ``changes`` (from the feed), those made here: not another replica's applied,
        not an expiry (every replica expires on its own, and Redis forgets the hash)."""
        echo = self._echo
        if not echo:
            return [c for c in changes if c.reason != "expired"]
        mine: list[Change] = []
        for change in changes:
            if change.version in echo:
                echo.discard(change.version)
            elif change.reason != "expired":
                mine.append(change)
        return mine

    def forget_echo(self) -> None:
        """The feed was read afresh (a listener fell behind): no older version will come."""
        self._echo.clear()

    def _apply(self, entry: Entry) -> None:
        registry = self.registry
        name = entry.info.name
        if entry.kind is ChangeKind.REMOVED:
            registry.remove(name, admin=True)
            return
        now = registry.clock()
        worker = registry.get(name)
        beat = now - entry.age
        if (
            worker is not None
            and worker.info == entry.info
            and worker.owner == entry.owner
            and entry.kind is not ChangeKind.REGISTERED
        ):
            if entry.kind is ChangeKind.LOAD or beat <= worker.last_heart_beat:
                registry.report_load(worker, worker.generation, entry.queue_length)
            elif entry.age < FRESH:
                registry.heartbeat(name, entry.queue_length, admin=True)
            else:
                self._register(entry, beat)
            return
        if entry.info.check_heart_beat and entry.age > registry.expiration:
            return  # silent for longer than the expiration: gone, wherever it was
        self._register(entry, None if entry.age < FRESH else beat)

    def _register(self, entry: Entry, beat: float | None) -> None:
        try:
            self.registry.register(
                entry.info,
                entry.queue_length,
                last_heart_beat=beat,
                owner=entry.owner,
                admin=True,
                source=entry.source,
            )
        except RegistryFullError:
            if not self._full_logged:
                log.warning(
                    "Worker %s registered at another replica does not fit here (--max-workers "
                    "or --max-workers-per-source is lower than theirs)",
                    brief(entry.info.name),
                )
            self._full_logged = True

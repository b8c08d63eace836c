"""How many registrations the registry holds at most, in all and from one source."""

from __future__ import annotations

from ..errors import RegistryFullError

__all__ = ["Capacity"]


class Capacity:
    """``--max-workers`` and ``--max-workers-per-source``, with the counts per source.

    ``None`` for a limit means none. A source is the host a registration came from, as
    ownership names it; registrations restored from a state file have none.
    """

    def __init__(self, max_workers: int | None, max_per_source: int | None) -> None:
        self.max_workers = max_workers
        self.max_per_source = max_per_source
        self._per_source: dict[str, int] = {}

    def check(self, held: int, old: str | None, exists: bool, source: str | None) -> None:
        """Raise :class:`RegistryFullError` unless one more registration from ``source`` fits
        (``exists``: the name is registered already, from ``old``; ``held``: how many are)."""
        if not exists and self.max_workers is not None and held >= self.max_workers:
            raise RegistryFullError(
                f"the controller holds its maximum of {self.max_workers} workers (--max-workers)"
            )
        limit = self.max_per_source
        if (
            limit is not None
            and source is not None
            and (not exists or old != source)
            and self._per_source.get(source, 0) >= limit
        ):
            raise RegistryFullError(
                f"{limit} workers are registered from {source} already (--max-workers-per-source)"
            )

    def moved(self, old: str | None, new: str | None) -> None:
        """A registration went from source ``old`` to ``new`` (``None``: none, or gone)."""
        if old == new:
            return
        for source, delta in ((old, -1), (new, 1)):
            if source is None:
                continue
            count = self._per_source.get(source, 0) + delta
            if count > 0:
                self._per_source[source] = count
            else:
                self._per_source.pop(source, None)

    def count(self, source: str) -> int:
        """Registrations held from ``source``."""
        return self._per_source.get(source, 0)

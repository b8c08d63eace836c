"""Routing: which worker gets a request, with affinity and a log of recent decisions.

Pure code over the registry: the clock and randomness come in, nothing awaits. Every worker
choice the controller makes (by address for ``/get_worker_address``, or for a relay it
makes itself) goes through :meth:`Router.dispatch`, which also counts the request against
the worker's load estimate.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from . import dispatch
from .models import DispatchMethod
from .registry import Clock, Registry, Worker

__all__ = ["UNKNOWN_MODEL", "Router"]

log = logging.getLogger(__name__)

#: (wall time, model, method, chosen worker, candidate count, [(worker, queue, service)])
_Decision = tuple[float, str, str, str | None, int, list[tuple[str, int, float | None]]]

# A request keeps going to the worker of its affinity key unless that worker is expected
# to take more than this many times as long as the best one.
AFFINITY_SLACK = 2.0
# Affinity keys remembered (least recently used ones are forgotten first).
AFFINITY_KEYS = 100_000
#: what dispatches for a model no registered worker serves are counted under: a client's
#: made-up model names must not become a metric label each
UNKNOWN_MODEL = "unknown"
# Candidates shown per decision in /dispatch_decisions and the debug log.
DECISION_CANDIDATES = 16
# Per method that decides on workers drawn at random: how many it draws from a larger
# fleet, and how many of them must be live and in rotation (else it looks at all).
_DRAWS = {
    DispatchMethod.LEAST_TIME: (dispatch.LEAST_TIME_SCAN, dispatch.LEAST_TIME_SCAN // 2),
    DispatchMethod.POWER_OF_TWO: (2, 2),
}


class Router:
    """Chooses workers for requests by ``method``, counting each choice against its load.

    ``wall_clock`` stamps the decision log only; ``rng`` drives the randomised methods.
    """

    def __init__(
        self,
        registry: Registry,
        method: DispatchMethod,
        *,
        rng: random.Random | None = None,
        wall_clock: Clock = time.time,
        decision_log_size: int = 100,
    ) -> None:
        self.registry = registry
        self.method = method
        # Read on every dispatch; an enum's .value is a slow property lookup.
        self._method_name = method.value
        self._least_time = method is DispatchMethod.LEAST_TIME
        # The methods that look at a few workers drawn at random draw them from the
        # registry's index directly, at a cost independent of the fleet: how many they
        # draw, and how many of those must be live and in rotation to decide on them.
        self._draw, self._need = _DRAWS.get(method, (0, 0))
        self.rng = rng if rng is not None else random.Random()
        self.wall_clock = wall_clock
        self._affinity: collections.OrderedDict[str, str] = collections.OrderedDict()
        #: the last dispatch decisions, for /dispatch_decisions (see recent_decisions)
        self.decisions: collections.deque[_Decision] = collections.deque(maxlen=decision_log_size)
        #: dispatches by model (registered models only, the rest under UNKNOWN_MODEL), in
        #: plain numbers: the metrics read them when scraped and forget models gone since
        self.dispatched: dict[str, int] = {}

    def dispatch(
        self,
        model: str,
        *,
        count: bool = True,
        exclude: Sequence[str] = (),
        by_address: bool = False,
        affinity: str | None = None,
    ) -> Worker | None:
        """Pick a worker for ``model``.

        ``count`` adds the request to the worker's queue length. ``by_address`` says the
        controller will not see the request end (the client talks to the worker itself), so
        it stops counting after the worker's learned service time instead. ``affinity``
        sends requests with the same key to the same worker while it is not overloaded.
        """
        registry = self.registry
        slots = registry.worker_slots
        now = registry.clock()
        candidates = registry.candidates(model, exclude, now, self._draw, self._need, self.rng)
        counted = model if candidates or registry.serves(model) else UNKNOWN_MODEL
        dispatched = self.dispatched
        dispatched[counted] = dispatched.get(counted, 0) + 1
        worker = None
        if affinity is not None:
            worker = self._affine_worker(affinity, model, candidates, exclude, now)
        if worker is None:
            if self._least_time and len(candidates) <= dispatch.LEAST_TIME_SCAN:
                # dispatch.choose's own first step, taken here: one call fewer per request.
                # One candidate is least_time's choice whatever its estimate (nothing to
                # compare it with), and a model served by one worker is common.
                if len(candidates) == 1:
                    worker = candidates[0]
                else:
                    worker = dispatch.least_time(candidates, slots, now)
            else:
                worker = dispatch.choose(self.method, candidates, self.rng, slots, now)
        # Recorded before counting: the estimates the choice was made on.
        shown = []
        # Sliced only when longer (a copy of the list otherwise).
        for w in (
            candidates
            if len(candidates) <= DECISION_CANDIDATES
            else candidates[:DECISION_CANDIDATES]
        ):
            # A loop, not a comprehension: one frame fewer per dispatch.
            load = w.load
            shown.append((w.info.name, load.queue_length, load.service_time))
        chosen = worker.info.name if worker is not None else None
        self.decisions.append(
            (self.wall_clock(), model, self._method_name, chosen, len(candidates), shown)
        )
        if log.isEnabledFor(logging.DEBUG):
            _log_decision(model, self._method_name, shown, chosen)
        if worker is not None:
            if count:
                load = worker.load
                retire_at = None
                periods = dispatch.periods(load.queue_length, slots)
                if by_address and load.service_time is not None:
                    # Without evidence of its own, a worker's requests count until its next
                    # report, which comes soon (see the load poller): retiring them on a
                    # guess would hide how slow it is.
                    retire_at = now + load.service_time * periods
                load.dispatched(now, retire_at, periods)
            if affinity is not None:
                self._remember_affinity(affinity, worker.info.name)
        return worker

    def recent_decisions(self, n: int) -> list[dict[str, Any]]:
        """The last ``n`` dispatch decisions, newest last, as JSON-ready dicts."""
        picked = list(self.decisions)[-n:] if n > 0 else []
        return [
            {
                "time": when,
                "model": model,
                "method": method,
                "chosen": chosen,
                "candidate_count": total,
                "candidates": [
                    {"worker": name, "queue_length": queue, "service_time": service}
                    for name, queue, service in shown
                ],
            }
            for when, model, method, chosen, total, shown in picked
        ]

    def _affine_worker(
        self, key: str, model: str, candidates: Sequence[Worker], exclude: Sequence[str], now: float
    ) -> Worker | None:
        name = self._affinity.get(key)
        if name is None or not candidates:
            return None
        # Looked up by name: the candidates may be a few drawn from a large fleet.
        mine = self.registry.get(name)
        if (
            mine is None
            or name in exclude
            or model not in mine.info.model_names
            # Ejected while others are in rotation (the candidates are the ejected ones
            # only when every worker is).
            or (mine.ejected_until > now and candidates[0].ejected_until <= now)
        ):
            return None
        mine.load.retire(now)
        slots = self.registry.worker_slots
        # Sampled like least_time's own choice in a large fleet: the best of 64 is a fair
        # yardstick, and a full scan would cost milliseconds at 10,000 workers.
        best = dispatch.choose(DispatchMethod.LEAST_TIME, candidates, self.rng, slots, now)
        prior = dispatch.prior_service_time(candidates)
        if best is not None and dispatch.expected_time(
            mine, prior, slots, now
        ) > AFFINITY_SLACK * dispatch.expected_time(best, prior, slots, now):
            # Overloaded compared with the best choice: give way.
            return None
        return mine

    def _remember_affinity(self, key: str, name: str) -> None:
        self._affinity[key] = name
        self._affinity.move_to_end(key)
        if len(self._affinity) > AFFINITY_KEYS:
            self._affinity.popitem(last=False)


def _log_decision(
    model: str, method: str, shown: list[tuple[str, int, float | None]], chosen: str | None
) -> None:
    log.debug(
        "dispatch %r by %s: %s -> %s",
        model,
        method,
        ", ".join(
            f"{name} (queue {queue}, service {_seconds(service)})" for name, queue, service in shown
        )
        or "no candidates",
        chosen or "none",
    )


def _seconds(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3f}s"

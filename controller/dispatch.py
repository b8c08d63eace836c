"""Dispatch strategies: pure functions over the candidate workers of one model.

Randomness comes from the ``random.Random`` passed in, so tests can seed it. Every strategy
reads the same estimate of each worker's load (``WorkerInfo.queue_length``, kept close to
the truth between reports by the registry) and, for the time-based ones, its learned
service time.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from .models import DispatchMethod, WorkerInfo

__all__ = [
    "choose",
    "expected_time",
    "least_time",
    "lottery",
    "power_of_two",
    "prior_service_time",
    "shortest_queue",
]

# Below this total speed the lottery has nothing to draw from (FastChat's threshold).
_MIN_TOTAL_SPEED = 1e-4


def shortest_queue(candidates: Sequence[WorkerInfo]) -> WorkerInfo | None:
    """The worker with the smallest ``queue_length / speed``; ties go to the earliest.

    A worker reporting speed 0 (or less) can still serve, but only when no worker with a
    positive speed is left: it ranks after all of them, by queue length among themselves.
    """
    best: WorkerInfo | None = None
    best_key = (math.inf, math.inf)
    for w in candidates:
        key = (w.queue_length / w.speed, 0.0) if w.speed > 0 else (math.inf, w.queue_length)
        if best is None or key < best_key:
            best, best_key = w, key
    return best


def lottery(candidates: Sequence[WorkerInfo], rng: random.Random) -> WorkerInfo | None:
    """A worker drawn with probability ``speed / sum(speeds)``; never one with speed 0."""
    total = 0.0
    for w in candidates:
        if w.speed > 0:
            total += w.speed
    if total < _MIN_TOTAL_SPEED:
        return None
    point = rng.random() * total
    last: WorkerInfo | None = None
    for w in candidates:
        if w.speed > 0:
            last = w
            point -= w.speed
            if point < 0:
                return w
    # Rounding can leave a sliver past the last positive speed: it belongs to that worker.
    return last


def prior_service_time(candidates: Sequence[WorkerInfo]) -> float | None:
    """What to assume for a worker without evidence: the speed-weighted mean of the others.

    A worker twice as fast by its reported ``speed`` is assumed to take half as long.
    ``None`` when no candidate has evidence yet.
    """
    total = 0.0
    weight = 0.0
    for w in candidates:
        if w.service_time is not None and w.speed > 0:
            total += w.service_time * w.speed
            weight += 1
    return total / weight if weight else None


def expected_time(w: WorkerInfo, prior: float | None, slots: int | None = None) -> float:
    """Expected time until a new request sent to ``w`` would finish, on one scale for all.

    Each request takes the worker's learned service time. With ``slots`` (how many requests
    a worker runs at once, when the operator says so) the queue is served that many at a
    time; without, one at a time, which still orders workers sensibly. Without evidence
    anywhere, the reported speed stands in (``1 / speed`` per request), which orders
    workers exactly like ``shortest_queue``.
    """
    if w.speed <= 0:
        return math.inf
    per_request = w.service_time
    if per_request is None:
        per_request = prior / w.speed if prior is not None else 1.0 / w.speed
    if slots is None:
        return (w.queue_length + 1) * per_request
    return per_request * (w.queue_length // slots + 1)


def least_time(candidates: Sequence[WorkerInfo], slots: int | None = None) -> WorkerInfo | None:
    """The worker expected to finish a new request first; ties go to the shorter queue,
    then to the earliest registered.

    Workers with speed 0 come last, by queue length among themselves.
    """
    prior = prior_service_time(candidates)
    best: WorkerInfo | None = None
    best_key = (math.inf, math.inf)
    for w in candidates:
        key = (expected_time(w, prior, slots), float(w.queue_length))
        if best is None or key < best_key:
            best, best_key = w, key
    return best


def power_of_two(
    candidates: Sequence[WorkerInfo], rng: random.Random, slots: int | None = None
) -> WorkerInfo | None:
    """The better (by expected time) of two workers drawn at random.

    Constant work per decision whatever the fleet size, and nearly as good as looking at
    every worker; the randomness also keeps several controllers from herding onto one
    worker.
    """
    n = len(candidates)
    if n <= 2:
        return least_time(candidates, slots)
    i, j = rng.sample(range(n), 2)
    return least_time((candidates[min(i, j)], candidates[max(i, j)]), slots)


def choose(
    method: DispatchMethod,
    candidates: Sequence[WorkerInfo],
    rng: random.Random,
    slots: int | None = None,
) -> WorkerInfo | None:
    """Apply ``method`` to ``candidates``; ``None`` when none can be picked."""
    if method is DispatchMethod.SHORTEST_QUEUE:
        return shortest_queue(candidates)
    if method is DispatchMethod.LEAST_TIME:
        return least_time(candidates, slots)
    if method is DispatchMethod.POWER_OF_TWO:
        return power_of_two(candidates, rng, slots)
    return lottery(candidates, rng)

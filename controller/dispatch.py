"""Dispatch strategies: pure functions over the candidate workers of one model.

Randomness comes from the ``random.Random`` passed in, so tests can seed it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from .models import DispatchMethod, WorkerInfo

__all__ = ["choose", "lottery", "shortest_queue"]

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


def choose(
    method: DispatchMethod, candidates: Sequence[WorkerInfo], rng: random.Random
) -> WorkerInfo | None:
    """Apply ``method`` to ``candidates``; ``None`` when none can be picked."""
    if method is DispatchMethod.LOTTERY:
        return lottery(candidates, rng)
    return shortest_queue(candidates)

"""Dispatch strategies: pure functions over the candidate workers of one model.

Randomness comes from the ``random.Random`` passed in, so tests can seed it. Every strategy
reads the same estimate of each worker's load (``Worker.load.queue_length``, kept close to
the truth between reports by the registry) and, for the time-based ones, its learned
service time.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from .models import DispatchMethod
from .registry import Worker

__all__ = [
    "choose",
    "expected_time",
    "least_time",
    "lottery",
    "periods",
    "power_of_two",
    "prior_service_time",
    "service_estimate",
    "shortest_queue",
]

#: expected times within this fraction of the best one count as equally good
TIE_TOLERANCE = 0.25
#: least_time looks at this many workers at most, drawn at random from larger fleets
LEAST_TIME_SCAN = 64
#: seconds without an observation after which a high estimate has come halfway back to
#: the others' (see service_estimate)
RELAX_HALF_LIFE = 10.0

# Below this total speed the lottery has nothing to draw from (FastChat's threshold).
_MIN_TOTAL_SPEED = 1e-4


def shortest_queue(candidates: Sequence[Worker]) -> Worker | None:
    """The worker with the smallest ``queue_length / speed``; ties go to the earliest.

    A worker reporting speed 0 (or less) can still serve, but only when no worker with a
    positive speed is left: it ranks after all of them, by queue length among themselves.
    """
    best: Worker | None = None
    best_key = (math.inf, math.inf)
    for w in candidates:
        queue, speed = w.load.queue_length, w.info.speed
        key = (queue / speed, 0.0) if speed > 0 else (math.inf, queue)
        if best is None or key < best_key:
            best, best_key = w, key
    return best


def lottery(candidates: Sequence[Worker], rng: random.Random) -> Worker | None:
    """A worker drawn with probability ``speed / sum(speeds)``; never one with speed 0."""
    total = 0.0
    for w in candidates:
        if w.info.speed > 0:
            total += w.info.speed
    if total < _MIN_TOTAL_SPEED:
        return None
    point = rng.random() * total
    last: Worker | None = None
    for w in candidates:
        if w.info.speed > 0:
            last = w
            point -= w.info.speed
            if point < 0:
                return w
    # Rounding can leave a sliver past the last positive speed: it belongs to that worker.
    return last


def prior_service_time(candidates: Sequence[Worker]) -> float | None:
    """What to assume for a worker without evidence: the speed-weighted mean of the others.

    A worker twice as fast by its reported ``speed`` is assumed to take half as long.
    ``None`` when no candidate has evidence yet.
    """
    total = 0.0
    weight = 0.0
    for w in candidates:
        if w.load.service_time is not None and w.info.speed > 0:
            total += w.load.service_time * w.info.speed
            weight += 1
    return total / weight if weight else None


def service_estimate(w: Worker, prior: float | None, now: float | None = None) -> float | None:
    """The time a request is expected to spend at ``w``, waiting for a slot aside.

    Its learned service time, else the ``prior`` scaled by its speed but never below what
    it is known to take at least. ``None`` when no worker has a service time yet.

    An estimate above the prior drifts back towards it (half the gap every
    ``RELAX_HALF_LIFE`` seconds after its last observation, given ``now``): a worker that
    was slow once gets no work and so no chance to show it has recovered, and would be
    shunned for good. Once it is within reach of the others it gets a request again and
    fresh evidence.
    """
    expected_per_speed = prior / w.info.speed if prior is not None and w.info.speed > 0 else None
    learned = w.load.service_time
    if learned is None:
        if expected_per_speed is not None:
            return max(expected_per_speed, w.load.service_floor)
        return None
    if expected_per_speed is not None and learned > expected_per_speed and now is not None:
        idle = now - w.load.learned_at
        if idle > 0:
            decay = math.pow(0.5, idle / RELAX_HALF_LIFE)
            return expected_per_speed + (learned - expected_per_speed) * decay
    return learned


def expected_time(
    w: Worker, prior: float | None, slots: int | None = None, now: float | None = None
) -> float:
    """Expected time until a new request sent to ``w`` would finish, on one scale for all.

    Each request takes the worker's estimated service time (``service_estimate``), more
    the busier the worker: with ``slots`` (how many requests a worker runs at once),
    ``1 + queue_length / slots`` times it; without, one at a time. The smooth growth with
    the queue (rather than steps of whole rounds of slots) spreads work over workers
    whose estimates differ by noise alone, as the rounds would not: a model worker's
    batch gets slower as it grows anyway. Without evidence anywhere, the reported speed
    stands in (``1 / speed`` per request, or what the worker is known to take at least
    if that is more), which orders workers like ``shortest_queue``.
    """
    if w.info.speed <= 0:
        return math.inf
    per_request = service_estimate(w, prior, now)
    if per_request is None:
        # No time known anywhere: one scale for all, so a worker known to take at least
        # some time does not look better than one nothing is known of.
        per_request = max(1.0 / w.info.speed, w.load.service_floor)
    if slots is None:
        return per_request * (w.load.queue_length + 1)
    return per_request * (1 + w.load.queue_length / slots)


def periods(queue_length: int, slots: int | None) -> int:
    """How many service times a request joining ``queue_length`` others takes at a worker
    that serves ``slots`` at once: one while a slot is free, one more per full round of
    slots ahead of it (every request ahead of it when the slots are not known)."""
    if slots is None:
        return queue_length + 1
    return queue_length // slots + 1


def least_time(
    candidates: Sequence[Worker], slots: int | None = None, now: float | None = None
) -> Worker | None:
    """The worker expected to finish a new request first.

    Expected times within ``TIE_TOLERANCE`` of the best count as a tie, which goes to the
    shorter queue, then to the earliest registered: learned service times are estimates,
    and chasing a few percent of difference between equal workers would pile requests
    onto whichever looks faster by chance. Workers with speed 0 come last, by queue
    length among themselves.
    """
    if not candidates:
        return None
    prior = prior_service_time(candidates)
    # This runs on every dispatch over every candidate: the common cases (a learned
    # estimate at or below the prior; nothing learned anywhere yet) are computed inline,
    # the rest by expected_time.
    per_slot = 1.0 / slots if slots is not None else 0.0
    expected: list[float] = []
    lowest = math.inf
    for w in candidates:
        load = w.load
        learned = load.service_time
        speed = w.info.speed
        if slots is None or speed <= 0:
            e = expected_time(w, prior, slots, now)
        elif learned is None:
            if prior is None:
                # As expected_time has it without evidence anywhere.
                per_request = 1.0 / speed
                floor = load.service_floor
                if floor > per_request:
                    per_request = floor
                e = per_request * (1 + load.queue_length / slots)
            else:
                e = expected_time(w, prior, slots, now)
        elif prior is not None and learned * speed > prior:
            e = expected_time(w, prior, slots, now)
        else:
            e = learned * (1 + load.queue_length * per_slot)
        expected.append(e)
        if e < lowest:
            lowest = e
    bound = lowest * (1 + TIE_TOLERANCE)
    best: Worker | None = None
    best_queue = math.inf
    best_e = math.inf
    for w, e in zip(candidates, expected, strict=True):
        if e > bound:
            continue
        queue = w.load.queue_length
        if best is None or queue < best_queue or (queue == best_queue and e < best_e):
            best, best_queue, best_e = w, queue, e
    return best


def power_of_two(
    candidates: Sequence[Worker],
    rng: random.Random,
    slots: int | None = None,
    now: float | None = None,
) -> Worker | None:
    """The better (by expected time) of two workers drawn at random.

    Constant work per decision whatever the fleet size, and nearly as good as looking at
    every worker; the randomness also keeps several controllers from herding onto one
    worker.
    """
    n = len(candidates)
    if n <= 2:
        return least_time(candidates, slots, now)
    i, j = rng.sample(range(n), 2)
    return least_time((candidates[min(i, j)], candidates[max(i, j)]), slots, now)


def choose(
    method: DispatchMethod,
    candidates: Sequence[Worker],
    rng: random.Random,
    slots: int | None = None,
    now: float | None = None,
) -> Worker | None:
    """Apply ``method`` to ``candidates``; ``None`` when none can be picked.

    ``now`` (on the clock of the workers' ``learned_at``) lets old estimates relax.
    """
    if method is DispatchMethod.SHORTEST_QUEUE:
        return shortest_queue(candidates)
    if method is DispatchMethod.LEAST_TIME:
        if len(candidates) > LEAST_TIME_SCAN:
            # A fleet this large is sampled rather than scanned on every request (the
            # "power of d choices": the best of 64 is as good as the best of all, nearly
            # always); sampled in registration order, so ties still go to the earliest.
            picked = sorted(rng.sample(range(len(candidates)), LEAST_TIME_SCAN))
            candidates = [candidates[i] for i in picked]
        return least_time(candidates, slots, now)
    if method is DispatchMethod.POWER_OF_TWO:
        return power_of_two(candidates, rng, slots, now)
    return lottery(candidates, rng)

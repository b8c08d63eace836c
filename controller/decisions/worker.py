"""A registry entry: one worker's registration, liveness, load estimate and health."""

from __future__ import annotations

import json

import attrs

from .estimator import LoadEstimate
from .models import Owner, WorkerInfo

__all__ = ["Worker"]


@attrs.define(eq=False, slots=True)
class Worker:
    """One registry entry: a worker's registration, liveness, load estimate and health.

    Only the registry changes ``info``, ``last_heart_beat``, ``generation`` and
    ``version``. ``load`` and ``in_flight`` are bookkeeping the router and the relay update
    as they dispatch and relay; the health fields are the relay's passive health checks
    (through the registry's ``record_failure``/``record_success``); the poll fields belong
    to the load poller.
    """

    info: WorkerInfo
    last_heart_beat: float
    #: whom the registration belongs to (see :mod:`controller.decisions.ownership`)
    owner: Owner | None = None
    #: the host the registration came from (counted against --max-workers-per-source)
    source: str | None = None
    #: incremented by every registration of this name; lets an operation that awaited
    #: (a refresh probe) tell whether the entry it looked at is still the current one
    generation: int = 0
    #: the version of the last change to this entry (see ``Change.version``)
    version: int = 0
    load: LoadEstimate = attrs.field(factory=LoadEstimate)
    #: requests this controller is relaying to the worker right now, counted or not in
    #: its load (the relay keeps it; the metrics read it)
    in_flight: int = 0
    #: relayed requests that failed in a row (reset by one that succeeds)
    consecutive_failures: int = 0
    #: when the last relayed request to it failed (the registry's clock; None: never)
    last_failure_at: float | None = None
    #: the worker is out of rotation until this time (the registry's clock)
    ejected_until: float = 0.0
    #: load polls of this worker wait until then (backs off after failed polls)
    next_poll_at: float = 0.0
    poll_failures: int = 0
    #: the ``/get_worker_address`` answer naming this worker, encoded once
    address_body: bytes = attrs.field(init=False)

    @address_body.default
    def _encode_address(self) -> bytes:
        return json.dumps({"address": self.info.name}).encode()

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def queue_length(self) -> int:
        """How many requests dispatch believes the worker holds (see ``LoadEstimate``)."""
        return self.load.queue_length

"""Relay orchestration: choose a worker, relay, fail over before the first byte, settle.

Every relayed request (a stream, or a call answered by one JSON document) runs through
:meth:`Relay.attempts`: it asks the router for a worker, runs one attempt on it, counts the
attempt against the worker's load while it runs, learns the worker's service time from a
completed generation, and settles the worker's passive health from how the attempt ended.
A worker that fails before anything reached the client is replaced by another, up to
``stream_attempts`` workers in all, so the client sees no error while a healthy one exists.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
from aiohttp import web

from .. import protocol
from ..config import ControllerConfig
from ..decisions import dispatch
from ..decisions.registry import Registry, Worker
from ..decisions.routing import Router
from ..logtext import brief
from .budget import Budget
from .connections import WorkerConnections
from .forward import relay_document
from .reach import Reach
from .stream import Outcome, relay_stream
from .tally import RelayTally, StreamTiming
from .via import Via
from .watch import DisconnectWatch

__all__ = ["Relay"]

log = logging.getLogger(__name__)

_R = TypeVar("_R", bound=web.StreamResponse)

# Paths whose completed relays say how long a generation takes at a worker.
_GENERATION_PATHS = frozenset({"/worker_generate_stream", "/worker_generate"})


@attrs.define(eq=False)
class Relay:
    """Relays requests to the workers the router picks, and drains them on shutdown."""

    config: ControllerConfig
    router: Router
    connections: WorkerConnections
    watch: DisconnectWatch = attrs.field(factory=DisconnectWatch, init=False)
    #: this controller's Via entry (a random id per controller): relayed requests carry it
    via: Via = attrs.field(factory=Via, init=False)
    #: the bytes all relays may hold at once
    budget: Budget = attrs.field(init=False)
    #: relayed requests (streams and single calls) in progress, for draining
    in_flight: int = attrs.field(default=0, init=False)
    #: what the relays count for the metrics
    tally: RelayTally = attrs.field(factory=RelayTally, init=False)
    _none_in_flight: asyncio.Event = attrs.field(init=False)
    _reach: Reach | None = attrs.field(default=None, init=False)

    @budget.default
    def _budget(self) -> Budget:
        return Budget(self.config.max_buffered_bytes)

    @_none_in_flight.default
    def _idle(self) -> asyncio.Event:
        event = asyncio.Event()
        event.set()
        return event

    @property
    def registry(self) -> Registry:
        return self.router.registry

    @property
    def reach(self) -> Reach:
        """How relays reach workers: made once per opening of the connections."""
        pool = self.connections.pool
        reach = self._reach
        if reach is None or reach.pool is not pool:
            cfg = self.config
            reach = self._reach = Reach(
                pool,
                self.budget,
                self.watch,
                cfg.status_probe_timeout,
                cfg.worker_api_timeout,
                self.via,
                self.tally,
            )
        return reach

    async def generate_stream(
        self,
        request: web.Request,
        body: bytes | bytearray,
        model: str,
        affinity: str | None = None,
        started: float | None = None,
    ) -> web.StreamResponse:
        """Relay a generation to a worker serving ``model``; errors travel in-band.

        ``started`` is when the request came in (on the registry's clock; now if not
        given): the stream's time to first message and duration count from then.
        """
        cfg = self.config
        error_code = cfg.error_profile.worker_error
        clock = self.registry.clock
        timing = StreamTiming(clock, clock() if started is None else started)

        async def attempt(worker: Worker) -> tuple[web.StreamResponse, Outcome]:
            name = worker.info.name
            return await relay_stream(request, name, body, self.reach, error_code, timing)

        no_worker = cfg.error_profile.no_worker
        response = await self.attempts(
            model,
            "/worker_generate_stream",
            attempt,
            lambda: web.Response(body=protocol.stream_error(no_worker)),
            count=True,
            affinity=affinity,
        )
        timing.report(self.tally)
        return response

    async def forward(
        self,
        request: web.Request | None,
        path: str,
        body: bytes | bytearray,
        model: str,
        *,
        count: bool,
        affinity: str | None = None,
    ) -> web.Response:
        """Relay a worker call answered by one JSON document to a worker serving ``model``.

        This is what lets clients treat this controller as a worker (hierarchical mode).
        ``count`` says whether the call occupies the worker like a generation does (it then
        stays counted in the worker's load until it ends). Failures come back as a
        worker-shaped error document with HTTP 200, as workers send them. Given the
        client's ``request``, a client that leaves stops the call at the worker.
        """
        cfg = self.config
        profile = cfg.error_profile

        async def attempt(worker: Worker) -> tuple[web.Response, Outcome]:
            limit = cfg.max_worker_answer_size
            answer, outcome = await relay_document(
                request, worker.info.name, path, body, self.reach, limit
            )
            if answer is None:
                error = protocol.error_message(profile.worker_error)
                return _json_response(error), outcome
            return _json_response(answer), outcome

        return await self.attempts(
            model,
            path,
            attempt,
            lambda: _json_response(protocol.error_message(profile.no_worker)),
            count=count,
            affinity=affinity,
        )

    async def attempts(
        self,
        model: str,
        path: str,
        attempt: Callable[[Worker], Awaitable[tuple[_R, Outcome]]],
        no_worker: Callable[[], _R],
        *,
        count: bool,
        affinity: str | None = None,
    ) -> _R:
        """Run ``attempt`` on workers serving ``model`` until one gets past its first byte.

        Every attempt is counted against its worker's queue while it runs (when ``count``)
        and settles the worker's health when it ends; a cancelled attempt settles neither
        health nor anything but the count.
        """
        self.in_flight += 1
        self._none_in_flight.clear()
        try:
            tried: list[str] = []
            answer: _R | None = None
            learns = path in _GENERATION_PATHS
            clock = self.registry.clock
            slots = self.config.worker_slots
            for _ in range(self.config.stream_attempts):
                worker = self.router.dispatch(model, count=count, exclude=tried, affinity=affinity)
                if worker is None:
                    break
                if tried:
                    self.tally.failovers += 1
                load = worker.load
                started = clock()
                # Service times it was expected to take (more if it had to wait for a slot):
                # the wait is counted from the queue length, not learned as slowness.
                periods = dispatch.periods(load.queue_length - 1, slots) if count else 1
                if count:
                    # Counted until it ends, not presumed finished at the worker's next report.
                    load.active_streams += 1
                worker.in_flight += 1
                try:
                    answer, outcome = await attempt(worker)
                finally:
                    worker.in_flight -= 1
                    if count:
                        load.active_streams -= 1
                        load.stream_ended()
                if learns and outcome is Outcome.COMPLETED:
                    now = clock()
                    load.learn_service_time((now - started) / periods, now)
                self._settle(worker, outcome, path)
                if outcome is not Outcome.FAILED_BEFORE_START:
                    return answer
                tried.append(worker.info.name)
            if answer is None:
                log.debug("no worker for model %s (%s)", brief(model), path)
                return no_worker()
            # Every worker tried failed before its first byte: the last one's in-band error.
            return answer
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._none_in_flight.set()

    async def drain(self) -> None:
        """Let relays in flight finish, up to ``drain_timeout``; end the rest in-band."""
        if not self.in_flight:
            return
        limit = self.config.drain_timeout
        log.info("Draining %d relayed request(s) for up to %g s", self.in_flight, limit)
        try:
            async with asyncio.timeout(limit):  # not wait_for: see sharing/state.py
                await self._none_in_flight.wait()
        except TimeoutError:
            cut = self.watch.close_all()
            log.warning("Drain timeout: ending %d stream(s) with an in-band error", cut)

    def _settle(self, worker: Worker, outcome: Outcome, path: str) -> None:
        """Update a worker's health from how a relayed request ended; log state changes."""
        registry = self.registry
        if outcome is Outcome.COMPLETED:
            failures = registry.record_success(worker)
            if failures:
                log.info(
                    "Worker %s is back in rotation: a request succeeded after %d failures",
                    worker.info.name,
                    failures,
                )
        elif outcome is Outcome.FAILED_BEFORE_START or outcome is Outcome.FAILED_MIDSTREAM:
            if registry.is_ejected(worker):
                # Part of the incident that ejected it (streams that were running on it
                # then, or tried on it because every worker is out): counting each would
                # make one crash with many streams in flight an outlier out for minutes.
                return
            duration = registry.record_failure(worker)
            log.warning(
                "Worker %s failed %s (%s); out of rotation for %g s (%d failures in a row)",
                worker.info.name,
                path,
                outcome.value.replace("_", " "),
                duration,
                worker.consecutive_failures,
            )


def _json_response(body: bytes | bytearray) -> web.Response:
    return web.Response(body=body, content_type="application/json")

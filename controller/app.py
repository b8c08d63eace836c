"""The Controller: owns the configuration, the registry, the one ClientSession and the
background tasks, and runs either inside a host aiohttp application or on its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from . import dispatch, protocol, state
from ._upstream import Pool
from .config import ControllerConfig
from .errors import BadRequestError, ConfigError, NotRunningError
from .models import DispatchMethod, WorkerInfo, WorkerStatus
from .parent import ParentLink
from .protocol import RegisterRequest
from .proxy import DisconnectWatch, Outcome, forward_request, relay_stream, worker_url
from .registry import Clock, Registry

__all__ = ["CONTROLLER_KEY", "Controller"]

log = logging.getLogger(__name__)

_R = TypeVar("_R", bound=web.StreamResponse)
#: (wall time, model, method, chosen worker, candidate count, [(worker, queue, service)])
_Decision = tuple[float, str, str, str | None, int, list[tuple[str, int, float | None]]]

# A request keeps going to the worker of its affinity key unless that worker is expected
# to take more than this many times as long as the best one.
AFFINITY_SLACK = 2.0
# Affinity keys remembered (least recently used ones are forgotten first).
AFFINITY_KEYS = 100_000
# Candidates shown per decision in /dispatch_decisions and the debug log.
DECISION_CANDIDATES = 16
# Workers without a service time yet are polled this many times per load-poll interval.
COLD_POLLS_PER_INTERVAL = 4
# The longest wait between two load polls of a worker that keeps failing them.
MAX_POLL_BACKOFF = 60.0
# Paths whose completed relays say how long a generation takes at a worker.
_GENERATION_PATHS = frozenset({"/worker_generate_stream", "/worker_generate"})

# Seconds between two state-file writes at most; changes in between are saved together.
STATE_SAVE_DEBOUNCE = 0.5

# What aiohttp still waits for after the drain: requests that are not relays.
SHUTDOWN_TIMEOUT = 2.0


class Controller:
    """A FastChat-compatible controller.

    Three ways to run one:

    * inside a host application that has not started yet::

          controller = await Controller.start(app, config)

      The host's runner serves the controller's routes; its background work starts and
      stops with the host application.
    * standalone, from async code::

          async with Controller.serve(config) as controller:
              print(controller.url)

      or ``controller = await Controller.serve(config)`` and later
      ``await controller.aclose()``.
    * from the command line: ``fc-controller`` (see ``controller.cli``).

    ``clock`` (monotonic seconds), ``wall_clock`` (seconds since the epoch, used only for
    the state file) and ``rng`` are injectable so tests can drive time and dispatch
    randomness.
    """

    def __init__(
        self,
        config: ControllerConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        wall_clock: Clock = time.time,
    ) -> None:
        self.config = config if config is not None else ControllerConfig()
        self.wall_clock = wall_clock
        self.registry = Registry(
            self.config.heart_beat_expiration,
            clock,
            ejection_base=self.config.ejection_base,
            ejection_max=self.config.ejection_max,
            worker_slots=self.config.worker_slots,
        )
        self.registry.on_back_in_rotation = _log_back_in_rotation
        self.rng = rng if rng is not None else random.Random()
        #: serialises registry writes that follow an await (probe, then record)
        self.lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._pool: Pool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        #: attached to a host application (True) or serving on its own (False)
        self._embedded = True
        self._watch = DisconnectWatch()
        self._refreshing: asyncio.Future[None] | None = None
        #: relayed requests (streams and single calls) in progress, for draining
        self._relays_in_flight = 0
        self._no_relays = asyncio.Event()
        self._no_relays.set()
        self._state_changed = asyncio.Event()
        self._parent: ParentLink | None = None
        self.registry.on_change = self._registry_changed
        self._affinity: collections.OrderedDict[str, str] = collections.OrderedDict()
        # Read on every dispatch; an enum's .value is a slow property lookup.
        self._method_name = self.config.dispatch_method.value
        #: the last dispatch decisions, for /dispatch_decisions (see recent_decisions)
        self.decisions: collections.deque[_Decision] = collections.deque(
            maxlen=self.config.decision_log_size
        )
        self._state_save_failed = False
        cfg = self.config
        self._probe_timeout = aiohttp.ClientTimeout(total=cfg.status_probe_timeout)
        self._poll_timeout = aiohttp.ClientTimeout(
            total=min(cfg.status_probe_timeout, max(cfg.load_poll_interval, 0.5))
        )
        # No total: a long generation that keeps producing must never be cut.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=cfg.status_probe_timeout,
            sock_read=cfg.worker_api_timeout,
        )

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        app: web.Application,
        config: ControllerConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        wall_clock: Clock = time.time,
    ) -> Controller:
        """Attach a new controller to ``app``, which must not have started yet."""
        controller = cls(config, clock=clock, rng=rng, wall_clock=wall_clock)
        controller.attach(app)
        return controller

    def attach(self, app: web.Application) -> None:
        """Add the routes and the background work to ``app`` (before it starts)."""
        cfg = self.config
        if cfg.parent_controller is not None and cfg.advertise_address is None:
            # The host's runner listens, so only the host knows the address.
            raise ConfigError(
                "an embedded controller with parent_controller needs advertise_address: "
                "the URL the parent reaches this application at"
            )
        self._attach(app, embedded=True)

    def _attach(self, app: web.Application, *, embedded: bool) -> None:
        from .handlers import add_routes

        if app.frozen:
            raise RuntimeError("attach the controller before the application starts")
        if CONTROLLER_KEY in app:
            raise RuntimeError("this application already has a controller")
        self._embedded = embedded
        app[CONTROLLER_KEY] = self
        add_routes(app, self)
        app.cleanup_ctx.append(self._app_context)
        app.on_shutdown.append(self._drain)

    @classmethod
    def serve(
        cls,
        config: ControllerConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        wall_clock: Clock = time.time,
    ) -> _Serving:
        """Run a controller on its own listening socket.

        Await the result for a running controller, or use it with ``async with``.
        """
        return _Serving(cls(config, clock=clock, rng=rng, wall_clock=wall_clock))

    async def _serve(self) -> Controller:
        cfg = self.config
        app = web.Application(client_max_size=cfg.max_body_size, handler_args={"access_log": None})
        self._attach(app, embedded=False)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, cfg.host, cfg.port, ssl_context=self._ssl_context(), reuse_address=True
            )
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        # Standalone: the parent link starts once the (possibly OS-chosen) port is known.
        if cfg.parent_controller is not None:
            self._start_parent_link(cfg.advertise_address or self.url)
        return self

    def _ssl_context(self) -> ssl.SSLContext | None:
        cfg = self.config
        if cfg.ssl_certfile is None or cfg.ssl_keyfile is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile)
        return context

    async def _app_context(self, app: web.Application) -> AsyncIterator[None]:
        await self._open()
        try:
            yield
        finally:
            await self._close_resources()

    def _registry_changed(self) -> None:
        self._state_changed.set()
        if self._parent is not None:
            self._parent.registry_changed()

    def _start_parent_link(self, advertise_address: str) -> None:
        cfg = self.config
        if cfg.parent_controller is None or self._parent is not None:
            return
        self._parent = ParentLink(
            self,
            cfg.parent_controller,
            advertise_address,
            interval=cfg.parent_heart_beat_interval,
        )
        self._parent.start()

    async def _withdraw_from_parent(self) -> None:
        parent, self._parent = self._parent, None
        if parent is not None:
            await parent.aclose()

    async def _drain(self, app: web.Application | None = None) -> None:
        """Let relays in flight finish, up to ``drain_timeout``; end the rest in-band.

        aiohttp calls this once the application stopped accepting connections and before it
        waits for (and then cancels) the handlers still running, so streams that outlive
        the drain end with the in-band error instead of being cut mid-message. A parent
        controller is told first, so it stops sending work here.
        """
        await self._withdraw_from_parent()
        if self._relays_in_flight:
            log.info(
                "Draining %d relayed request(s) for up to %g s",
                self._relays_in_flight,
                self.config.drain_timeout,
            )
            try:
                await asyncio.wait_for(self._no_relays.wait(), self.config.drain_timeout)
            except TimeoutError:
                cut = self._watch.close_all()
                log.warning("Drain timeout: ending %d stream(s) with an in-band error", cut)

    async def _open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=False)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._stream_timeout, auto_decompress=False
        )
        self._pool = Pool(asyncio.get_running_loop())
        self._tasks = [
            asyncio.create_task(self._expire_forever(), name="fc-controller-expiry"),
            asyncio.create_task(self._watch.run(), name="fc-controller-disconnect-watch"),
        ]
        if self.config.load_poll_interval > 0:
            self._tasks.append(
                asyncio.create_task(self._poll_load_forever(), name="fc-controller-load-poll")
            )
        if self._embedded and self.config.advertise_address is not None:
            # attach() made sure a child embedded in a host has an address to advertise.
            self._start_parent_link(self.config.advertise_address)
        if self.config.state_file is not None:
            self._restore_state(self.config.state_file)
            self._tasks.append(
                asyncio.create_task(self._save_state_forever(), name="fc-controller-state")
            )

    async def _close_resources(self) -> None:
        await self._withdraw_from_parent()
        had_tasks = bool(self._tasks)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            # wait() (not awaiting each task) so that a caller already being cancelled
            # still closes the session below instead of stopping at the first task.
            await asyncio.wait(tasks)
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        if had_tasks and self.config.state_file is not None:
            await self._save_state(self.config.state_file)

    async def aclose(self) -> None:
        """Stop serving (if standalone), end background tasks and close the session.

        Idempotent. For a controller attached to a host application, the host's cleanup does
        this; calling it earlier stops the controller's background work only.
        """
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._close_resources()

    async def __aenter__(self) -> Controller:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def running(self) -> bool:
        return self._session is not None

    @property
    def url(self) -> str:
        """The base URL a standalone controller listens on (the real port if 0 was asked)."""
        if self._runner is None:
            raise NotRunningError("url is known only for a controller started with serve()")
        port = self.config.port
        for address in self._runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                port = address[1]
                break
        host = self.config.host or "0.0.0.0"
        if ":" in host:
            host = f"[{host}]"
        return f"{self.config.scheme}://{host}:{port}"

    @property
    def pool(self) -> Pool:
        """Kept-alive connections to workers for relayed streams."""
        if self._pool is None:
            raise NotRunningError("the controller is not running: start() or serve() it first")
        return self._pool

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise NotRunningError("the controller is not running: start() or serve() it first")
        return self._session

    # -- operations ----------------------------------------------------------------------

    async def register(self, request: RegisterRequest) -> bool:
        """Register a worker, asking it for its status when the request carried none."""
        status = request.worker_status
        if status is None:
            status = await self.probe(request.worker_name)
            if status is None:
                log.warning(
                    "Not registering %s: it did not answer /worker_get_status",
                    request.worker_name,
                )
                return False
        async with self.lock:
            info, is_new = self.registry.register(
                request.worker_name,
                status,
                check_heart_beat=request.check_heart_beat,
                multimodal=request.multimodal,
            )
        log.info(
            "%s worker %s: models=%s speed=%s queue_length=%d",
            "Registered new" if is_new else "Re-registered",
            info.name,
            list(info.model_names),
            info.speed,
            info.queue_length,
        )
        return True

    def unregister(self, worker_name: str) -> bool:
        info = self.registry.remove(worker_name)
        if info is not None:
            log.info("Removed worker %s: it said it is leaving", worker_name)
        return info is not None

    def heartbeat(self, worker_name: str, queue_length: int) -> bool:
        exists = self.registry.heartbeat(worker_name, queue_length)
        if not exists:
            log.debug("Heartbeat from unknown worker %s", worker_name)
        return exists

    def dispatch(
        self,
        model: str,
        *,
        count: bool = True,
        exclude: Sequence[str] = (),
        by_address: bool = False,
        affinity: str | None = None,
    ) -> WorkerInfo | None:
        """Pick a worker for ``model``.

        ``count`` adds the request to the worker's queue length. ``by_address`` says the
        controller will not see the request end (the client talks to the worker itself), so
        it stops counting after the worker's learned service time instead. ``affinity``
        sends requests with the same key to the same worker while it is not overloaded.
        """
        candidates = self.registry.candidates(model, exclude)
        now = self.registry.clock()
        worker = None
        if affinity is not None:
            worker = self._affine_worker(affinity, candidates, now)
        if worker is None:
            worker = dispatch.choose(
                self.config.dispatch_method, candidates, self.rng, self.config.worker_slots, now
            )
        # Recorded before counting: the estimates the choice was made on.
        self._record_decision(model, candidates, worker)
        if worker is not None:
            if count:
                retire_at = None
                periods = dispatch.periods(worker.queue_length, self.config.worker_slots)
                if by_address and worker.service_time is not None:
                    # Without evidence of its own, a worker's requests count until its next
                    # report, which comes soon (see poll_load): retiring them on a guess
                    # would hide how slow it is.
                    retire_at = now + worker.service_time * periods
                worker.dispatched(now, retire_at, periods)
            if affinity is not None:
                self._remember_affinity(affinity, worker.name)
        return worker

    def _affine_worker(
        self, key: str, candidates: Sequence[WorkerInfo], now: float
    ) -> WorkerInfo | None:
        name = self._affinity.get(key)
        if name is None:
            return None
        mine = next((w for w in candidates if w.name == name), None)
        if mine is None:
            return None
        slots = self.config.worker_slots
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

    def _record_decision(
        self, model: str, candidates: Sequence[WorkerInfo], chosen: WorkerInfo | None
    ) -> None:
        shown = [(w.name, w.queue_length, w.service_time) for w in candidates[:DECISION_CANDIDATES]]
        self.decisions.append(
            (
                self.wall_clock(),
                model,
                self._method_name,
                chosen.name if chosen is not None else None,
                len(candidates),
                shown,
            )
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "dispatch %r by %s: %s -> %s",
                model,
                self._method_name,
                ", ".join(
                    f"{name} (queue {queue}, service {_seconds(service)})"
                    for name, queue, service in shown
                )
                or "no candidates",
                chosen.name if chosen is not None else "none",
            )

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

    async def probe(self, worker_name: str, *, poll: bool = False) -> WorkerStatus | None:
        """Ask a worker for its status; ``None`` if it fails to answer well in time.

        A load ``poll`` gets a shorter timeout: its answer is useless once stale.
        """
        url = worker_url(worker_name, "/worker_get_status")
        timeout = self._poll_timeout if poll else self._probe_timeout
        try:
            async with self.session.post(url, timeout=timeout) as response:
                if response.status != 200:
                    log.debug("status probe of %s: HTTP %d", worker_name, response.status)
                    return None
                body = await response.read()
            return protocol.parse_worker_status(protocol.decode_body(body), "status")
        except (aiohttp.ClientError, TimeoutError, BadRequestError) as e:
            log.debug("status probe of %s failed: %r", worker_name, e)
            return None

    async def refresh_all_workers(self) -> None:
        """Re-ask every worker for its status at once; drop those that fail to answer.

        Workers stay routable while they are probed. Concurrent calls share one round of
        probes instead of each starting its own.
        """
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        self._refreshing = asyncio.get_running_loop().create_future()
        try:
            await self._refresh()
        finally:
            self._refreshing.set_result(None)
            self._refreshing = None

    async def _refresh(self) -> None:
        entries = [(w, w.generation) for w in self.registry]
        statuses = await asyncio.gather(*(self.probe(w.name) for w, _ in entries))
        async with self.lock:
            for (worker, generation), status in zip(entries, statuses, strict=True):
                if status is not None:
                    self.registry.update_if_current(worker, generation, status)
                elif self.registry.remove_if_current(worker, generation):
                    log.info("Removed worker %s: it did not answer /worker_get_status", worker.name)

    async def aggregate_status(self) -> WorkerStatus:
        """The sum of what every registered worker says now, as if this were one worker."""
        workers = list(self.registry)
        statuses = await asyncio.gather(*(self.probe(w.name) for w in workers))
        names: set[str] = set()
        speed: float = 0
        queue = 0
        for status in statuses:
            if status is not None:
                names.update(status.model_names)
                speed += status.speed
                queue += status.queue_length
        return WorkerStatus(tuple(sorted(names)), speed, queue)

    async def generate_stream(
        self, request: web.Request, body: bytes, model: str, affinity: str | None = None
    ) -> web.StreamResponse:
        """Relay a generation to a worker serving ``model``; errors travel in-band.

        A worker that fails before the first byte reaches the client is replaced by another
        (up to ``stream_attempts`` workers in all), so the client sees no error while a
        healthy worker exists.
        """
        error_code = self.config.error_profile.worker_error

        async def attempt(worker: WorkerInfo) -> tuple[web.StreamResponse, Outcome]:
            worker.active_streams += 1
            try:
                return await relay_stream(
                    request,
                    worker.name,
                    body,
                    connect_timeout=self.config.status_probe_timeout,
                    read_timeout=self.config.worker_api_timeout,
                    error_code=error_code,
                    watch=self._watch,
                    pool=self.pool,
                )
            finally:
                worker.active_streams -= 1

        no_worker = self.config.error_profile.no_worker
        return await self._with_failover(
            model,
            "/worker_generate_stream",
            attempt,
            lambda: web.Response(body=protocol.stream_error(no_worker)),
            count=True,
            affinity=affinity,
        )

    async def forward(
        self, path: str, body: bytes, model: str, *, count: bool, affinity: str | None = None
    ) -> web.Response:
        """Relay a worker call answered by one JSON document to a worker serving ``model``.

        This is what lets clients treat this controller as a worker (hierarchical mode).
        ``count`` says whether the call occupies the worker like a generation does. Failures
        come back as a worker-shaped error document with HTTP 200, as workers send them.
        """
        profile = self.config.error_profile

        async def attempt(worker: WorkerInfo) -> tuple[web.Response, Outcome]:
            answer = await forward_request(
                self.session, worker.name, path, body, client_timeout=self._stream_timeout
            )
            if answer is None:
                error = protocol.error_message(profile.worker_error)
                return _json_response(error), Outcome.FAILED_BEFORE_START
            return _json_response(answer), Outcome.COMPLETED

        return await self._with_failover(
            model,
            path,
            attempt,
            lambda: _json_response(protocol.error_message(profile.no_worker)),
            count=count,
            affinity=affinity,
        )

    async def _with_failover(
        self,
        model: str,
        path: str,
        attempt: Callable[[WorkerInfo], Awaitable[tuple[_R, Outcome]]],
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
        self._relays_in_flight += 1
        self._no_relays.clear()
        try:
            return await self._attempts(
                model, path, attempt, no_worker, count=count, affinity=affinity
            )
        finally:
            self._relays_in_flight -= 1
            if not self._relays_in_flight:
                self._no_relays.set()

    async def _attempts(
        self,
        model: str,
        path: str,
        attempt: Callable[[WorkerInfo], Awaitable[tuple[_R, Outcome]]],
        no_worker: Callable[[], _R],
        *,
        count: bool,
        affinity: str | None,
    ) -> _R:
        tried: list[str] = []
        answer: _R | None = None
        learns = path in _GENERATION_PATHS
        for _ in range(self.config.stream_attempts):
            worker = self.dispatch(model, count=count, exclude=tried, affinity=affinity)
            if worker is None:
                break
            started = self.registry.clock()
            # Service times it was expected to take (more if it had to wait for a slot):
            # the wait is counted from the queue length, not learned as slowness.
            periods = (
                dispatch.periods(worker.queue_length - 1, self.config.worker_slots) if count else 1
            )
            try:
                answer, outcome = await attempt(worker)
            finally:
                if count:
                    worker.stream_ended()
            if learns and outcome is Outcome.COMPLETED:
                now = self.registry.clock()
                worker.learn_service_time((now - started) / periods, now)
            self._settle(worker, outcome, path)
            if outcome is not Outcome.FAILED_BEFORE_START:
                return answer
            tried.append(worker.name)
        if answer is None:
            log.debug("no worker for model %r (%s)", model, path)
            return no_worker()
        # Every worker tried failed before its first byte: the last one's in-band error.
        return answer

    def _settle(self, worker: WorkerInfo, outcome: Outcome, path: str) -> None:
        """Update a worker's health from how a relayed request ended; log state changes."""
        if outcome is Outcome.COMPLETED:
            failures = self.registry.record_success(worker)
            if failures:
                log.info(
                    "Worker %s is back in rotation: a request succeeded after %d failures",
                    worker.name,
                    failures,
                )
        elif outcome is Outcome.FAILED_BEFORE_START or outcome is Outcome.FAILED_MIDSTREAM:
            if self.registry.is_ejected(worker):
                # Part of the incident that ejected it (streams that were running on it
                # then, or tried on it because every worker is out): counting each would
                # make one crash with many streams in flight an outlier out for minutes.
                return
            duration = self.registry.record_failure(worker)
            log.warning(
                "Worker %s failed %s (%s); out of rotation for %g s (%d failures in a row)",
                worker.name,
                path,
                outcome.value.replace("_", " "),
                duration,
                worker.consecutive_failures,
            )

    # -- background work -----------------------------------------------------------------

    async def _expire_forever(self) -> None:
        interval = self.config.sweep_interval
        while True:
            await asyncio.sleep(interval)
            self.expire_now()
            if self._pool is not None:
                self._pool.prune()

    async def _poll_load_forever(self) -> None:
        interval = self.config.load_poll_interval / COLD_POLLS_PER_INTERVAL
        while True:
            started = asyncio.get_running_loop().time()
            await self.poll_load()
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(interval - elapsed, interval / 10))

    async def poll_load(self) -> int:
        """Ask the workers that got work since their last report for their queue now.

        Stock FastChat workers report only every 45 s; a poll a second keeps the
        controller's view of their load, and so its dispatch, close to the truth. A worker
        whose service time is not known yet is asked four times as often: until then every
        request it gets is a guess, and the first reports after its first requests tell
        how long they take. Only busy workers are asked, all at once; one that fails to
        answer is asked less and less often. Returns how many answered.
        """
        interval = self.config.load_poll_interval
        tick = interval / COLD_POLLS_PER_INTERVAL
        now = self.registry.clock()
        due = [
            (w, w.generation)
            for w in self.registry
            if (w.dispatched_since_report or w.queue_length)
            and w.next_poll_at <= now
            and now - w.reported_at >= (interval if w.service_time is not None else tick) - tick / 2
        ]
        if not due:
            return 0
        statuses = await asyncio.gather(*(self.probe(w.name, poll=True) for w, _ in due))
        answered = 0
        async with self.lock:
            now = self.registry.clock()
            for (worker, generation), status in zip(due, statuses, strict=True):
                if status is None:
                    worker.poll_failures += 1
                    backoff = interval * (1 << min(worker.poll_failures, 6))
                    worker.next_poll_at = now + min(backoff, MAX_POLL_BACKOFF)
                    continue
                worker.poll_failures = 0
                if self.registry.update_if_current(worker, generation, status):
                    answered += 1
        return answered

    def _restore_state(self, path: str) -> None:
        # Read synchronously: this runs once, while the application starts, before any
        # request is served.
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            log.info("No state file at %s yet: starting with an empty registry", path)
            return
        except OSError as e:
            log.warning("Cannot read state file %s (%s): starting with an empty registry", path, e)
            return
        try:
            saved = state.load(data, self.wall_clock())
        except state.StateFileError as e:
            log.warning("Ignoring state file %s: %s; starting with an empty registry", path, e)
            return
        now = self.registry.clock()
        expired = 0
        for worker in saved:
            if worker.check_heart_beat and worker.silent_for > self.config.heart_beat_expiration:
                expired += 1
                continue
            self.registry.register(
                worker.name,
                worker.status,
                check_heart_beat=worker.check_heart_beat,
                multimodal=worker.multimodal,
                last_heart_beat=now - worker.silent_for,
            )
        log.info(
            "Restored %d worker(s) from %s (%d had expired meanwhile)",
            len(saved) - expired,
            path,
            expired,
        )

    async def _save_state_forever(self) -> None:
        path = self.config.state_file
        assert path is not None
        # Heartbeats do not trigger a save, so save now and then anyway to keep the saved
        # heartbeat times recent enough for a restart to trust them.
        refresh = min(self.config.heart_beat_expiration / 3, 30.0)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), refresh)
            self._state_changed.clear()
            await self._save_state(path)
            # Coalesce bursts of changes (a fleet registering at once) into few writes.
            await asyncio.sleep(STATE_SAVE_DEBOUNCE)

    async def _save_state(self, path: str) -> None:
        data = state.dump(self.registry, self.wall_clock())
        try:
            # The one use of a thread: file I/O (and fsync) has no non-blocking form.
            await asyncio.to_thread(state.write_atomically, path, data)
        except OSError as e:
            if not self._state_save_failed:
                log.warning("Cannot save state file %s: %s", path, e)
            self._state_save_failed = True
            return
        if self._state_save_failed:
            log.info("Saving state file %s works again", path)
        self._state_save_failed = False

    def expire_now(self) -> list[WorkerInfo]:
        """Remove expired workers now and log each; the background task calls this."""
        removed = self.registry.expire()
        for info, silent in removed:
            log.info(
                "Removed worker %s: no heartbeat for %.1f s (expiration %g s)",
                info.name,
                silent,
                self.config.heart_beat_expiration,
            )
        return [info for info, _ in removed]


def _seconds(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3f}s"


def _log_back_in_rotation(worker: WorkerInfo, how: str) -> None:
    log.info("Worker %s is back in rotation: %s", worker.name, how)


def _json_response(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


class _Serving:
    """What ``Controller.serve()`` returns: await it, or use it with ``async with``."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller

    def __await__(self) -> Generator[Any, None, Controller]:
        return self._controller._serve().__await__()

    async def __aenter__(self) -> Controller:
        return await self._controller._serve()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._controller.aclose()


CONTROLLER_KEY = web.AppKey("fc_controller", Controller)

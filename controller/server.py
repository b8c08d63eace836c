"""The Controller's lifecycle: it owns the configuration, the registry, the connections to
workers and the background tasks, wires the parts together, and runs either inside a host
aiohttp application or on its own listening socket."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, TypedDict, Unpack

import aiohttp
import attrs
from aiohttp import web

from .config import ControllerConfig
from .decisions.registry import Clock, Registry, Worker
from .decisions.routing import Router
from .edge import listening
from .edge.access import exposure_warnings
from .edge.client_connections import ClientConnections, ClientLimits
from .edge.handlers import Limits, add_routes
from .edge.metrics import Metrics
from .edge.request_ids import Tagging
from .errors import ConfigError, NotRunningError
from .jsonbody import BodyReader
from .relay.connections import WorkerConnections
from .relay.failover import Relay
from .relay.pool import Pool
from .relay.upstream import Upstream
from .sharing.parent import ParentLink
from .sharing.redis_link import SharedRegistry
from .sharing.state import StateFile
from .upkeep.expiry import expire_now, sweep_forever
from .upkeep.lag import sample_loop_lag
from .upkeep.probing import Prober
from .upkeep.supervision import supervise

__all__ = ["CONTROLLER_KEY", "Controller"]

log = logging.getLogger(__name__)

# What aiohttp still waits for after the drain: requests that are not relays.
SHUTDOWN_TIMEOUT = 2.0


class Injected(TypedDict, total=False):
    """What tests (and the curious) may inject into a controller: see :class:`Controller`."""

    clock: Clock
    rng: random.Random | None
    wall_clock: Clock


class Controller(contextlib.AbstractAsyncContextManager["Controller"]):
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

    ``clock`` (monotonic seconds), ``wall_clock`` (seconds since the epoch, used for the
    state file and the decision log) and ``rng`` are injectable so tests can drive time and
    dispatch randomness.

    The parts, each reachable as an attribute: ``registry`` (the workers, the one place
    where they change, and its change feed), ``router`` (which worker gets a request),
    ``relay`` (forwarding requests to workers, failover, draining), ``prober`` (status
    probes, refresh, load polls), ``connections`` (the session and pool to workers),
    ``metrics`` (``GET /metrics``, a registry of its own), ``bodies`` (reads bodies),
    ``shared`` (the link to the registry replicas share in Redis, or ``None``).
    """

    def __init__(
        self,
        config: ControllerConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        wall_clock: Clock = time.time,
    ) -> None:
        self.config = cfg = config if config is not None else ControllerConfig()
        self.wall_clock = wall_clock
        self.registry = Registry(
            cfg.heart_beat_expiration,
            clock,
            ejection_base=cfg.ejection_base,
            ejection_max=cfg.ejection_max,
            worker_slots=cfg.worker_slots,
            max_workers=cfg.max_workers,
            max_per_source=cfg.max_workers_per_source,
        )
        self.registry.on_back_in_rotation = _log_back_in_rotation
        self.router = Router(
            self.registry,
            cfg.dispatch_method,
            rng=rng,
            wall_clock=wall_clock,
            decision_log_size=cfg.decision_log_size,
        )
        self.connections = WorkerConnections.of(cfg, clock)
        self.relay = Relay(cfg, self.router, self.connections)
        self.prober = Prober(cfg, self.registry, self.connections)
        self.shared = SharedRegistry.configured(cfg, self.registry, wall_clock)
        self.metrics = Metrics(self.registry, self.router, self.relay.tally, self.shared)
        self.bodies = BodyReader()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        #: a standalone controller's listening socket and client connections
        self._clients: ClientConnections | None = None
        #: attached to a host application (True) or serving on its own (False)
        self._embedded = True
        self._parent: ParentLink | None = None
        self._state: StateFile | None = None

    # -- ways to run -----------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        app: web.Application,
        config: ControllerConfig | None = None,
        **injected: Unpack[Injected],
    ) -> Controller:
        """Attach a new controller to ``app``, which must not have started yet."""
        controller = cls(config, **injected)
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

    @classmethod
    def serve(
        cls, config: ControllerConfig | None = None, **injected: Unpack[Injected]
    ) -> _Serving:
        """Run a controller on its own listening socket.

        Await the result for a running controller, or use it with ``async with``.
        """
        return _Serving(cls(config, **injected))

    async def aclose(self) -> None:
        """Stop serving (if standalone), end background tasks and close the connections.

        Idempotent. For a controller attached to a host application, the host's cleanup does
        this; calling it earlier stops the controller's background work only.
        """
        clients, self._clients = self._clients, None
        if clients is not None:
            clients.close()  # accept no more connections
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._close()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- what a running controller offers ----------------------------------------------------

    @property
    def running(self) -> bool:
        return self.connections.is_open

    @property
    def url(self) -> str:
        """The base URL a standalone controller listens on (the real port if 0 was asked)."""
        if self._clients is None:
            raise NotRunningError("url is known only for a controller started with serve()")
        return listening.listening_url(self.config, self._clients.addresses)

    @property
    def client_connections(self) -> ClientConnections | None:
        """A standalone controller's client connections (``held`` counts them); ``None``
        for one attached to a host application, whose runner accepts the connections."""
        return self._clients

    @property
    def session(self) -> aiohttp.ClientSession:
        """The client session to workers (status probes, polls, single-document calls)."""
        return self.connections.session

    @property
    def pool(self) -> Pool[Upstream]:
        """Kept-alive connections to workers for relayed streams."""
        return self.connections.pool

    def expire_now(self) -> list[Worker]:
        """Remove expired workers now, in one go, and log them (the background sweep
        removes them in slices, letting the loop run in between)."""
        return expire_now(self.registry)

    # -- wiring ------------------------------------------------------------------------------

    def _attach(self, app: web.Application, *, embedded: bool) -> None:
        if app.frozen:
            raise RuntimeError("attach the controller before the application starts")
        if CONTROLLER_KEY in app:
            raise RuntimeError("this application already has a controller")
        self._embedded = embedded
        app[CONTROLLER_KEY] = self
        add_routes(
            app,
            registry=self.registry,
            router=self.router,
            relay=self.relay,
            prober=self.prober,
            access=self.config.access,
            limits=self._limits(),
            metrics=self.metrics,
            bodies=self.bodies,
            # Standalone, the connection layer tags and counts every request instead.
            tagged=embedded,
        )
        if embedded:
            # Every response the application sends, the host's too.
            app.on_response_prepare.append(self.metrics.count_response)
        else:
            self.relay.tally.started = self.metrics.count
        app.cleanup_ctx.append(self._app_context)
        app.on_shutdown.append(self._drain)

    async def _serve(self) -> Controller:
        cfg = self.config
        # auto_decompress off: a compressed body is refused (415) without being inflated,
        # not even while aiohttp discards what the client still sends.
        handler_args = {"access_log": None, "auto_decompress": False}
        # The larger of the two body limits here; the edge applies each to its endpoints.
        largest = max(cfg.max_body_size, cfg.max_control_body_size)
        app = web.Application(client_max_size=largest, handler_args=handler_args)
        self._attach(app, embedded=False)
        # Standalone, every descriptor is this controller's: the caps must fit the limit.
        caps = listening.fit_to_descriptors(
            cfg.max_connections, cfg.max_worker_connections, listening.soft_descriptor_limit()
        )
        if caps.warning is not None:
            log.warning("%s", caps.warning)
        self.connections.max_connections = caps.max_worker_connections
        # The client connections' time bounds are kept by ClientConnections; aiohttp's own
        # keep-alive timer stays as a backstop that never fires first.
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            keepalive_timeout=cfg.idle_timeout + cfg.header_timeout,
        )
        await runner.setup()
        try:
            assert runner.server is not None, "set up above"
            limits = attrs.evolve(ClientLimits.of(cfg), max_connections=caps.max_connections)
            clients = ClientConnections(runner.server, limits, Tagging(self.metrics.count))
            tls = listening.server_ssl_context(cfg)
            await clients.listen(cfg.host, cfg.port, ssl_context=tls, backlog=cfg.backlog)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._clients = runner, clients
        # A worker at this controller's own address would be a loop: refused.
        self.connections.guard.add_own(clients.addresses)
        for warning in exposure_warnings(cfg):
            log.warning("%s", warning)
        # Standalone: the parent link starts once the (possibly OS-chosen) port is known.
        if cfg.parent_controller is not None:
            self._start_parent_link(cfg.advertise_address or self.url)
        return self

    def _limits(self) -> Limits:
        cfg = self.config
        return Limits(cfg.max_control_body_size, cfg.max_body_size, cfg.max_models_per_worker)

    async def _app_context(self, app: web.Application) -> AsyncIterator[None]:
        self._open()
        try:
            if self.shared is not None:  # listen once holding the shared registry
                await self.shared.wait_synced()
            yield
        finally:
            await self._close()

    def _open(self) -> None:
        cfg = self.config
        self.connections.open()
        self._spawn(
            functools.partial(sweep_forever, self.registry, self.connections, cfg.sweep_interval),
            "expiry",
        )
        self._spawn(self.relay.watch.run, "disconnect-watch")
        metrics = self.metrics
        lag = functools.partial(sample_loop_lag, metrics.loop_lag.observe, metrics.lag_interval)
        self._spawn(lag, "loop-lag")
        if cfg.load_poll_interval > 0:
            self._spawn(self.prober.poll_load_forever, "load-poll")
        if self._embedded and cfg.advertise_address is not None:
            # attach() made sure a child embedded in a host has an address to advertise.
            self._start_parent_link(cfg.advertise_address)
        if self.shared is not None:
            self._spawn(self.shared.run, "shared-registry")
        if cfg.state_file is not None:
            self._state = StateFile(cfg.state_file, self.registry, self.wall_clock)
            self._state.restore()
            self._spawn(self._state.save_forever, "state")

    def _spawn(self, work: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``work`` in the background until the controller closes, restarted if it fails."""
        task = asyncio.create_task(supervise(work, name), name=f"fc-controller-{name}")
        self._tasks.append(task)

    def _start_parent_link(self, advertise_address: str) -> None:
        cfg = self.config
        if cfg.parent_controller is None or self._parent is not None:
            return
        self._parent = ParentLink(
            self.registry,
            cfg.parent_controller,
            advertise_address,
            interval=cfg.parent_heart_beat_interval,
            token=cfg.parent_token,
            ssl_context=self.connections.ssl_context,
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
        await self.relay.drain()

    async def _close(self) -> None:
        await self._withdraw_from_parent()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            # wait() (not awaiting each task) so that a caller already being cancelled
            # still closes the connections below instead of stopping at the first task.
            await asyncio.wait(tasks)
        await self.connections.close()
        state, self._state = self._state, None
        if state is not None:
            await state.save()


def _log_back_in_rotation(worker: Worker, how: str) -> None:
    log.info("Worker %s is back in rotation: %s", worker.info.name, how)


class _Serving:
    """What ``Controller.serve()`` returns: await it, or use it with ``async with``."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller

    def __await__(self) -> Generator[Any, None, Controller]:
        return self._controller._serve().__await__()

    async def __aenter__(self) -> Controller:
        return await self._controller._serve()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._controller.aclose()


CONTROLLER_KEY = web.AppKey("fc_controller", Controller)

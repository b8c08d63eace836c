"""The worker side of fc-controller: join a FastChat controller and stay registered.

A model worker uses these to join a FastChat controller (this project's or the original)::

    limiter = ConcurrencyLimiter(5)
    config = HeartbeatConfig.from_environ(
        controller_address="http://localhost:21001",
        worker_address="http://10.0.0.5:21002",
        model_names=["vicuna-7b"],
    )
    HeartbeatClient(config, limiter).attach(app)  # app: the worker's aiohttp application

``HeartbeatClient`` runs on asyncio; ``SyncHeartbeatClient`` does the same from a daemon
thread for workers that are not asyncio programs. ``controller.worker.demo`` is a fake
model worker built on them (``fc-demo-worker``). Nothing here imports the server side of
this package, and importing this package loads none of it.
"""

from __future__ import annotations

from .client import HeartbeatClient, QueueLengthSource
from .config import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_HEART_BEAT_INTERVAL,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_UNREGISTER_TIMEOUT,
    ENV_HEART_BEAT_INTERVAL,
    HeartbeatConfig,
    heart_beat_interval_from_environ,
)
from .core import Backoff, HeartbeatStats, SupportsQueueLength
from .limiter import ConcurrencyLimiter
from .sync import SyncHeartbeatClient

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_HEART_BEAT_INTERVAL",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_UNREGISTER_TIMEOUT",
    "ENV_HEART_BEAT_INTERVAL",
    "Backoff",
    "ConcurrencyLimiter",
    "HeartbeatClient",
    "HeartbeatConfig",
    "HeartbeatStats",
    "QueueLengthSource",
    "SupportsQueueLength",
    "SyncHeartbeatClient",
    "heart_beat_interval_from_environ",
]

"""A FastChat-compatible model worker that makes up its answers: ``fc-demo-worker``.

It speaks the whole worker API that FastChat's controller, OpenAI-compatible API server and
web UI use, generates readable fake words at a chosen pace, limits its own concurrency
like a real worker, and registers and heartbeats through ``controller.worker``. Knobs make
it slow, hang or fail, so one can watch a controller cope::

    fc-demo-worker --port 21002 --worker-address http://localhost:21002
    fc-demo-worker --port 21003 --token-delay 0.5 --hang-after 10
    python -m controller.worker.demo --port 21004

Requests may override the knobs for themselves with the body keys ``demo_token_delay``,
``demo_first_token_delay``, ``demo_hang_after``, ``demo_fail_after`` and ``demo_error``.
"""

from __future__ import annotations

from .app import DemoWorker
from .cli import build_parser, load_settings, main
from .model import SERVER_ERROR_MSG
from .settings import DemoSettings

__all__ = [
    "SERVER_ERROR_MSG",
    "DemoSettings",
    "DemoWorker",
    "build_parser",
    "load_settings",
    "main",
]

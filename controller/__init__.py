"""fc-controller: a fast, asyncio-native drop-in replacement for FastChat's controller.

The public API is what this module exports. Names are loaded on first use, so a worker
that imports only ``controller.worker`` (the worker-side helper) never loads the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ControllerConfig
    from .decisions.models import DispatchMethod, ErrorProfile, WorkerInfo, WorkerStatus
    from .decisions.registry import Worker
    from .errors import BadRequestError, ConfigError, ControllerError, NotRunningError
    from .protocol import SERVER_ERROR_MSG
    from .server import CONTROLLER_KEY, Controller
    from .version import __version__ as __version__

__all__ = [
    "CONTROLLER_KEY",
    "SERVER_ERROR_MSG",
    "BadRequestError",
    "ConfigError",
    "Controller",
    "ControllerConfig",
    "ControllerError",
    "DispatchMethod",
    "ErrorProfile",
    "NotRunningError",
    "Worker",
    "WorkerInfo",
    "WorkerStatus",
]

_HOME = {
    "CONTROLLER_KEY": "server",
    "Controller": "server",
    "ControllerConfig": "config",
    "BadRequestError": "errors",
    "ConfigError": "errors",
    "ControllerError": "errors",
    "NotRunningError": "errors",
    "DispatchMethod": "decisions.models",
    "ErrorProfile": "decisions.models",
    "Worker": "decisions.registry",
    "WorkerInfo": "decisions.models",
    "WorkerStatus": "decisions.models",
    "SERVER_ERROR_MSG": "protocol",
    "__version__": "version",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'controller' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

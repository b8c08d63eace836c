"""Kept so that ``from controller.client import ...`` keeps working; use ``controller.worker``.

The worker-side helpers moved to the ``controller.worker`` package. This module re-exports
its public names and adds nothing, so both paths give the same objects.
"""

from __future__ import annotations

from .worker import *  # noqa: F403
from .worker import __all__ as __all__

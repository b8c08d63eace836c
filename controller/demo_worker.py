"""Kept so that ``python -m controller.demo_worker`` and its imports keep working.

The demo worker moved to ``controller.worker.demo``; this module re-exports its public
names and adds nothing.
"""

from __future__ import annotations

import sys

from .worker.demo import *  # noqa: F403
from .worker.demo import __all__ as __all__
from .worker.demo import main

if __name__ == "__main__":
    sys.exit(main())

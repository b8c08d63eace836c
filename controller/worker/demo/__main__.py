"""``python -m controller.worker.demo`` runs ``fc-demo-worker``."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())

"""The package's version, in a module of its own so that any layer may show it without
importing the public facade (which would make an import cycle through the server)."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"

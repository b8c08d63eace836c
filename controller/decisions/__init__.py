"""Decisions: the registry of workers, its change feed, the load estimator and dispatch.

Pure code: no I/O and no ``await``; clocks and randomness are injected. The registry
(:mod:`.registry`) is the one place where the set of workers changes, and every change is
appended to the feed (:mod:`.changes`); the router (:mod:`.routing`) picks workers with the
strategies of :mod:`.dispatch` over each worker's :class:`~.estimator.LoadEstimate`.
"""

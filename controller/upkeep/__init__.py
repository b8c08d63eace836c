"""Upkeep: keeping the registry true between requests, and the work that does it running.

Asking workers about themselves (:mod:`.probing`: registrations without a status,
``/refresh_all_workers``, the aggregate status, load polls), forgetting the silent ones
(:mod:`.expiry`), and restarting background work that failed (:mod:`.supervision`).
"""

"""Upkeep: keeping the registry true between requests.

Asking workers about themselves (:mod:`.probing`: registrations without a status,
``/refresh_all_workers``, the aggregate status, load polls) and forgetting the silent ones
(:mod:`.expiry`).
"""

"""The soak (see ``tests/soak.py``), deselected by default: ``pytest -m soak`` runs the
short one, with ``FC_SOAK_SECONDS`` set the long one too."""

from __future__ import annotations

import os
import random

import pytest

from .soak import run_soak

pytestmark = [pytest.mark.soak, pytest.mark.slow]

#: growth of the controller's resident memory allowed between warm-up and the end
RSS_GROWTH_MIB = 10.0


async def soak(seconds: float, concurrency: int) -> None:
    seed = int(os.environ.get("FC_RELIABILITY_SEED", random.randrange(2**32)))
    print(f"\nFC_RELIABILITY_SEED={seed}")
    report = await run_soak(seconds, concurrency=concurrency, seed=seed)
    print(report.table())

    assert report.streams_whole > 0 and report.served["address"] > 0
    assert report.worker_deaths > 0
    # Dying workers may cut streams (the in-band error says so); nothing else may go wrong.
    assert set(report.in_band) <= {50005, 50006}
    # "No worker" only when none was up: a live, heartbeating worker is never lost.
    assert report.no_worker_while_up == 0
    assert dict(report.http_errors) == {}
    assert dict(report.connection_errors) == {}
    assert report.malformed == 0
    assert report.rss_end - report.rss_warm < RSS_GROWTH_MIB


async def test_short_soak_serves_through_worker_deaths() -> None:
    """10 s of mixed load as workers die and return: no HTTP error, flat controller memory."""
    await soak(10.0, concurrency=16)


@pytest.mark.skipif(not os.environ.get("FC_SOAK_SECONDS"), reason="set FC_SOAK_SECONDS to run")
async def test_long_soak() -> None:
    """The soak for FC_SOAK_SECONDS seconds (a couple of minutes is plenty)."""
    await soak(float(os.environ["FC_SOAK_SECONDS"]), concurrency=24)

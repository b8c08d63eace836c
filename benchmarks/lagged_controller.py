"""fc-controller exactly as ``python -m controller`` runs it, plus an event-loop lag sampler
the benchmark reads (the hostile scenario's "loop lag" column).

    FC_BENCH_LAG_FILE=/tmp/lag.txt python benchmarks/lagged_controller.py --port 21001 ...

Takes the controller's own flags. The sampler runs on the controller's loop: every
``PERIOD`` it sleeps and measures how late it woke (``time.monotonic``, the system-wide
CLOCK_MONOTONIC, so the orchestrator can place each sample on its own clock). A sample
late by ``REPORTED`` or more is appended to the file as ``lag START END SECONDS`` (START
when the sleep began, END when it woke: the loop was held somewhere in between), and a
line ``alive NOW`` follows at least every ``ALIVE`` seconds, so a reader knows every stall
before NOW is in the file. Garbage collections that take ``REPORTED`` or more are appended
as ``gc START END SECONDS GENERATION`` (the hostile scenario ignores them; they tell a
stall the collector caused from others). Cost: 50 wake-ups a second of a few microseconds
each, and a line written only when something held the loop; it lives in the benchmark, not
in the controller, so it works with any revision ``compare.py`` installs.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Callable

PERIOD = 0.02
REPORTED = 0.002
ALIVE = 0.5
LAG_FILE = "FC_BENCH_LAG_FILE"


async def sample_lag(path: str) -> None:
    """Append the loop's late wake-ups to ``path`` until cancelled."""
    clock = time.monotonic
    with open(path, "a", buffering=1) as out:
        said_alive = 0.0
        while True:
            start = clock()
            await asyncio.sleep(PERIOD)
            end = clock()
            late = end - start - PERIOD
            if late >= REPORTED:
                out.write(f"lag {start:.6f} {end:.6f} {late:.6f}\n")
            if end - said_alive >= ALIVE:
                out.write(f"alive {end:.6f}\n")
                said_alive = end


def log_collections(path: str) -> None:
    """Append the garbage collections of ``REPORTED`` or more to ``path``."""
    out = open(path, "a", buffering=1)  # noqa: SIM115  # open for the process's life
    began = [0.0]

    def note(phase: str, info: dict[str, int]) -> None:
        now = time.monotonic()
        if phase == "start":
            began[0] = now
        elif now - began[0] >= REPORTED:
            out.write(f"gc {began[0]:.6f} {now:.6f} {now - began[0]:.6f} {info['generation']}\n")

    gc.callbacks.append(note)


def with_sampler(
    make_loop: Callable[[], asyncio.AbstractEventLoop], path: str
) -> Callable[[], asyncio.AbstractEventLoop]:
    """A loop factory whose loops start the sampler as soon as they run."""

    def factory() -> asyncio.AbstractEventLoop:
        loop = make_loop()
        tasks: list[asyncio.Task[None]] = []

        def start() -> None:
            tasks.append(loop.create_task(sample_lag(path), name="bench-lag-sampler"))
            log_collections(path)

        loop.call_soon(start)
        return loop

    return factory


def main() -> int:
    from controller import cli
    from controller.worker import runtime

    path = os.environ.get(LAG_FILE)
    if path:
        chosen = runtime.loop_factory() or asyncio.new_event_loop
        # run_main() asks runtime.loop_factory for the loop it runs the controller on.
        runtime.loop_factory = lambda: with_sampler(chosen, path)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""Pieces of the dispatch-quality benchmark (``benchmarks/dispatch_quality.py``).

- :mod:`dispatch_sim.workers`: a process hosting FastChat-shaped model workers with real
  concurrency limits and service times, heartbeating like stock FastChat workers.
- :mod:`dispatch_sim.loadgen`: an open-loop Poisson client, direct or through the controller.
- :mod:`dispatch_sim.reference`: the exact-knowledge dispatcher the others are measured against.

The workers and the load generator run as their own processes (``python -m
dispatch_sim.workers`` / ``dispatch_sim.loadgen`` with ``benchmarks/`` as the working
directory); the reference runs inside the benchmark's own event loop.
"""

MODEL = "dispatch-bench-model"

"""Process and CPU accounting read straight from /proc (Linux only, stdlib only).

Shared by the orchestrator (``run.py``) and the load generator (``loadgen.py``), which both
sample the controller's CPU time at the edges of a measurement window.
"""

from __future__ import annotations

import os

__all__ = [
    "CLOCK_TICKS",
    "core_busy",
    "core_times",
    "cpu_seconds",
    "descendants",
    "rss_bytes",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren, ...), found by scanning /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int, *, tree: bool = True) -> float:
    """User + system CPU seconds used so far by ``pid`` (all its threads).

    With ``tree`` the live descendants are added, and so is the time of children the process
    has already waited for (cutime/cstime), so a server that forks is fully accounted.
    """
    pids = [pid, *descendants(pid)] if tree else [pid]
    ticks = 0
    for i, p in enumerate(pids):
        fields = _stat_fields(p)
        if fields is None:
            continue
        # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
        ticks += int(fields[11]) + int(fields[12])
        if tree and i == 0:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}: is it a zombie?")


def core_times() -> dict[int, tuple[float, float]]:
    """Per-core (busy, total) seconds since boot, from /proc/stat."""
    result: dict[int, tuple[float, float]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *values = line.split()
            ticks = [int(v) for v in values]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
            total = sum(ticks[:8])  # guest time is already counted in user
            result[int(name[3:])] = ((total - idle) / CLOCK_TICKS, total / CLOCK_TICKS)
    return result


def core_busy(
    before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]
) -> dict[int, float]:
    """Fraction of each core that was busy between two :func:`core_times` samples."""
    busy: dict[int, float] = {}
    for core, (b1, t1) in after.items():
        b0, t0 = before.get(core, (0.0, 0.0))
        busy[core] = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return busy

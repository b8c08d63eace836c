"""The hostile scenario (stdlib only): normal traffic through one fc-controller, quiet and
then while each attack of issue 16 runs against it, one at a time.

Every row is one measurement window of the same controller, started once under
``lagged_controller.py`` so its event loop's lag is recorded from inside. In each window:

- the normal traffic, from 127.0.0.2: ``/get_worker_address`` paced at 200 requests/s over
  16 connections and 32 closed-loop streams through the controller to the bench workers
  (``loadgen.py``);
- the attack, from 127.0.0.3 (``attacks.py``), starting when the window opens, against the
  controller and, for the worker-side attacks, through ``hostile_worker.py``; both in the
  idle scheduling class, below the normal traffic's generators, which share their core.

With ``--floor``, each attack also runs once, just before its row, against a stand-in
(``attack_sink.py``) instead of the controller: the normal traffic's p99 then is what the
attack costs it without the controller's part, the floor of that row on this machine.

Figures per row: the controller's largest loop lag in the window (until the attack ended,
if later), the normal traffic's dispatch latency p99 and stream TTFC p99 against the quiet
row's (same run), the controller's peak resident memory in the window (its high-water mark,
reset at the start of each row through /proc/PID/clear_refs) and its peak descriptor count.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processes import BenchError, flags, free_port, http_json, registration
from report import OURS


@dataclass(frozen=True)
class Attack:
    """One row: ``attacks.py`` subcommand ``key``; ``prep``: seconds its preparation may
    take before the window opens; ``longer``: seconds its window lasts beyond the usual."""

    key: str
    label: str
    prep: float = 0.0
    longer: float = 0.0


ATTACKS = (
    Attack("huge-json", "63 MiB JSON body of tiny objects", prep=0.5),
    Attack("deep-nesting", "16 MiB of 60-deep arrays + 4 bodies 1,000,000 deep", prep=0.5),
    Attack("gzip-bomb", "8 gzip bodies inflating to 256 MiB, at once", prep=1.5),
    Attack("oversized", "13 bodies of 100 MiB at once (413)", prep=0.5),
    Attack("slowloris", "200 heads sent a byte every 0.5 s"),
    Attack("slow-body", "200 bodies sent a byte every 0.5 s"),
    Attack("idle-sockets", "1,100 idle connections"),
    Attack("huge-answers", "4 worker answers of 256 MiB at once"),
    Attack("million-models", "4 registrations of a worker listing 1,000,000 models"),
    Attack("long-worker-name", "6 requests with a 16 MiB worker_name", prep=0.5),
    # Registering 8,000 workers takes the controller seconds, so they expire (2 s after
    # each registered) while later ones register; the window lasts until all are gone.
    Attack("mass-expiry", "8,000 workers of one model register, never heartbeat", longer=12.0),
    Attack("connect-burst", "256 new clients at once, 3 times"),
    Attack("status-fanout", "1,000 /worker_get_status calls, 1,000 workers", prep=3.0),
)
QUIET = "quiet"
QUIET_AFTER = "quiet-after"
NORMAL_ADDR = "127.0.0.2"
ATTACK_ADDR = "127.0.0.3"
#: seconds from starting a window's processes to opening it (start-up, warm-up)
LEAD = 1.5
PACED_RATE = 200.0
#: the paced generator's connections: enough that one slow answer does not queue the rest
PACED_CONNECTIONS = 16
STREAMS = 32
#: the controller's flags: a short expiration for mass-expiry (workers registered with
#: check_heart_beat false, as the bench workers are, never expire), room for its 8,000
#: workers and the fan-out's 1,000, all registered from one address
FLAGS = [
    "--heart-beat-expiration",
    "2",
    "--max-workers",
    "20000",
    "--max-workers-per-source",
    "20000",
]
#: shorter connection timeouts, passed when the controller has them, so that the slow and
#: idle attacks see them act within a window
SHORT_TIMEOUTS = {"--header-timeout": "2", "--body-timeout": "3", "--idle-timeout": "2"}
#: what a row keeps of its attack's run against the stand-in (``--floor``)
FLOOR_FIGURES = ("dispatch_ms", "dispatch_schedule_lag_ms", "ttfc_ms", "attacker")


def idle_class() -> list[str]:
    """The command prefix that starts a process in the idle scheduling class (``chrt``, of
    util-linux); ``nice -n 19`` where there is no ``chrt``."""
    if shutil.which("chrt"):
        return ["chrt", "--idle", "0"]
    return ["nice", "-n", "19"]


class LagLog:
    """The lines ``lagged_controller.py`` appends: late wake-ups and liveness marks."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> tuple[list[tuple[float, float, float]], float]:
        lags: list[tuple[float, float, float]] = []
        alive = 0.0
        with contextlib.suppress(FileNotFoundError), open(self.path) as f:
            for line in f:
                parts = line.split()
                if parts[:1] == ["lag"] and len(parts) == 4:
                    start, end, late = map(float, parts[1:])
                    lags.append((start, end, late))
                elif parts[:1] == ["alive"] and len(parts) == 2:
                    alive = max(alive, float(parts[1]))
        return lags, alive

    def max_lag(self, begin: float, end: float, timeout: float = 30.0) -> float:
        """The largest lag of a wake-up overlapping [begin, end], in seconds (0 when none
        reached the sampler's threshold); waits until the sampler has been alive past
        ``end``, so a stall still going on at ``end`` is counted whole."""
        deadline = time.monotonic() + timeout
        while True:
            lags, alive = self._read()
            if alive >= end:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the loop-lag sampler wrote nothing after {end:.1f}")
            time.sleep(0.1)
        return max(
            (late for start, stop, late in lags if stop >= begin and start <= end), default=0
        )


class PeakDescriptors(threading.Thread):
    """Counts a process's open descriptors every 50 ms; ``peak`` is the most seen."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, len(os.listdir(f"/proc/{self.pid}/fd")))
            self.done.wait(0.05)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no {field} in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's resident-memory high-water mark (VmHWM); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Hostile:
    """The scenario, run by ``Bench.scenario_hostile``; ``bench`` is run.py's Bench."""

    def __init__(self, bench: Any) -> None:
        self.bench = bench
        self.window_s = 2.5 if bench.args.quick else 5.0
        self.worker_url = ""

    def python_tool(self, script: str, *args: str) -> list[str]:
        return [str(self.bench.tools_python), str(Path(__file__).parent / script), *args]

    def start(
        self, name: str, cmd: list[str], *, hostile: bool = False, cores: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a tool on the load cores (or ``cores``); ``hostile`` ones (the misbehaving
        workers, the stand-in) in the idle scheduling class, so that on a small machine they
        take CPU only when the normal traffic's generators leave it, and give it up the
        moment one wakes (a nice value only weighs the shares): an attacker on another host
        would not slow them at all. (``attacks.py`` moves itself to that class once its
        payload is built.)"""
        if hostile:
            cmd = [*idle_class(), *cmd]
        proc: subprocess.Popen[bytes] = self.bench.procs.start(
            name, cmd, cores=self.bench.load_cores if cores is None else cores
        )
        return proc

    def collect(self, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
        """Wait for a tool and return the last JSON object it printed."""
        path = Path(proc.log_path)  # type: ignore[attr-defined]
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.bench.procs.stop(proc, grace=0)
            raise BenchError(f"{path.name} ran longer than {timeout:.0f}s") from None
        self.bench.procs.stop(proc, grace=0)
        output = path.read_text(errors="replace")
        lines = [line for line in output.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = "\n".join(output.strip().splitlines()[-8:])
            raise BenchError(f"{path.name} exited {proc.returncode}:\n{tail}")
        found: dict[str, Any] = json.loads(lines[-1])
        return found

    def controller_flags(self) -> list[str]:
        """FLAGS, and SHORT_TIMEOUTS where the controller under test has them."""
        python = str(self.bench.ours_python)
        shown = subprocess.run(
            [python, "-m", "controller", "--help"], capture_output=True, text=True, check=False
        ).stdout
        extra = [
            x for flag, value in SHORT_TIMEOUTS.items() if flag in shown for x in (flag, value)
        ]
        return FLAGS + extra

    def start_server(
        self, script: str, ready: str, cores: str | None = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``script --port P`` as a hostile tool and wait until it answers GET
        ``ready``; the process and its base URL."""
        port = free_port()
        name = script.removesuffix(".py").replace("_", "-")
        proc = self.start(
            name, self.python_tool(script, "--port", str(port)), hostile=True, cores=cores
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                http_json(f"{url}{ready}", timeout=1.0)
                return proc, url
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{script} did not start; see its log")
            time.sleep(0.1)

    def run(self) -> dict[str, Any]:
        bench = self.bench
        worker, self.worker_url = self.start_server("hostile_worker.py", "/counts")
        # The stand-in goes on the controller's core: the kernel's part in receiving an
        # attack's bytes lands there, as it would for the controller.
        sink = None
        if bench.args.floor:
            sink, self.sink_url = self.start_server(
                "attack_sink.py", "/test_connection", cores=bench.controller_cores
            )
        lag_file = bench.workdir / "hostile-loop-lag.txt"
        controller_flags = self.controller_flags()
        rows: list[dict[str, Any]] = []
        try:
            with bench.controller(OURS, controller_flags, lag_file) as (url, pid):
                bench.register_bench_workers(url)
                huge = registration(f"{self.worker_url}/huge", ["hostile-huge"])
                http_json(f"{url}/register_worker", huge)
                lags = LagLog(lag_file)
                chosen = bench.args.attack
                plan = [
                    Attack(QUIET, "none: the normal traffic alone"),
                    *(a for a in ATTACKS if not chosen or a.key in chosen),
                    Attack(QUIET_AFTER, "none, after the attacks"),
                ]
                for attack in plan:
                    floor = None
                    if sink and attack.key not in (QUIET, QUIET_AFTER):
                        floor = self.window(url, pid, lags, attack, self.sink_url)
                    row = self.window(url, pid, lags, attack, url)
                    row.update(attack=attack.key, label=attack.label)
                    if floor:
                        row["floor"] = {key: floor[key] for key in FLOOR_FIGURES}
                    rows.append(row)
                    self.log(row)
        finally:
            for proc in (worker, sink):
                if proc:
                    self.bench.procs.stop(proc, grace=1.0)
        return {
            "controller_flags": controller_flags,
            "window_s": self.window_s,
            "paced_rate": PACED_RATE,
            "paced_connections": PACED_CONNECTIONS,
            "streams": STREAMS,
            "floor": bool(sink),
            "rows": rows,
        }

    def window(self, url: str, pid: int, lags: LagLog, row: Attack, target: str) -> dict[str, Any]:
        """One row: normal traffic to ``url``, the attack (if any) to ``target``."""
        attack, prep = row.key, row.prep
        if target != url:
            attack += "-floor"
        w = self.window_s + row.longer
        start_at = time.monotonic() + LEAD + prep
        window = flags(start_at=f"{start_at:.6f}", duration=w, local_addr=NORMAL_ADDR)
        reset = reset_peak_rss(pid)
        fds = PeakDescriptors(pid)
        fds.start()
        paced = self.start(
            f"hostile-{attack}-dispatch",
            self.python_tool(
                "loadgen.py",
                *flags(
                    "paced",
                    url=f"{url}/get_worker_address",
                    body=json.dumps({"model": "bench-model"}),
                    rate=PACED_RATE,
                    connections=PACED_CONNECTIONS,
                    timeout=30,
                    cpu_pid=pid,
                ),
                *window,
            ),
        )
        streams = self.start(
            f"hostile-{attack}-streams",
            self.python_tool(
                "loadgen.py",
                *flags(
                    "streams",
                    url=f"{url}/worker_generate_stream",
                    concurrency=STREAMS,
                    body=json.dumps({"model": "bench-model", "prompt": "hi"}),
                    expect_chunks=64,
                    drain=3,
                    stagger=1.0,
                ),
                *window,
            ),
        )
        attacker = None
        if row.key not in (QUIET, QUIET_AFTER):
            args = flags(
                row.key,
                url=target,
                worker=self.worker_url,
                start_at=f"{start_at:.6f}",
                duration=w,
                local_addr=ATTACK_ADDR,
            )
            cmd = self.python_tool("attacks.py", *args, "--idle")
            attacker = self.start(f"hostile-{attack}", cmd)
        try:
            seen = self.collect(attacker, LEAD + prep + w + 90) if attacker else None
            dispatch = self.collect(paced, LEAD + prep + w + 60)
            stream = self.collect(streams, LEAD + prep + w + 60)
        finally:
            peak_fds = fds.stop()
        end = max(start_at + w, seen["ended"] if seen else 0.0)
        loop_lag_ms = lags.max_lag(start_at, end) * 1000
        if seen:
            # The lag during each phase the attacker timed (mass-expiry: the expiry alone).
            seen["phase_lag_ms"] = {
                phase: lags.max_lag(begin, stop) * 1000
                for phase, (begin, stop) in seen.get("phases", {}).items()
            }
        return {
            "loop_lag_ms": loop_lag_ms,
            "peak_rss_mib": status_mib(pid, "VmHWM") if reset else None,
            "rss_after_mib": status_mib(pid, "VmRSS"),
            "peak_fds": peak_fds,
            "dispatch_ms": dispatch["latency_ms"],
            # How late the generator itself sent its requests: high when the load cores,
            # not the controller, were short of CPU.
            "dispatch_schedule_lag_ms": dispatch["schedule_lag_ms"],
            "controller_cpu_util": dispatch["cpu_s"][str(pid)] / dispatch["window_s"],
            "dispatch_errors": dispatch["errors"],
            "dispatch_error_samples": dispatch["error_samples"],
            "ttfc_ms": stream["ttfc_ms"],
            "streams_bad": stream["streams_bad"],
            "stream_errors": stream["errors"],
            "stream_error_samples": stream["error_samples"],
            "attacker": seen,
            "seconds": end - start_at,
        }

    @staticmethod
    def log(row: dict[str, Any]) -> None:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} ms"

        seen = (row["attacker"] or {}).get("seen", "")
        floor = row.get("floor")
        if floor:
            seen += f" (floor: dispatch p99 {ms(floor['dispatch_ms']['p99'])})"
        print(
            f"  hostile {row['attack']:>16}: lag {row['loop_lag_ms']:.0f} ms, dispatch p99 "
            f"{ms(row['dispatch_ms']['p99'])}, TTFC p99 {ms(row['ttfc_ms']['p99'])}; {seen}",
            file=sys.stderr,
            flush=True,
        )

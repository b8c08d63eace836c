#!/usr/bin/env python3
"""Benchmark fc-controller against FastChat 0.2.36's controller and against no controller.

    python3 benchmarks/run.py                  # every scenario, about 10 minutes
    python3 benchmarks/run.py --quick          # smoke run, under 2 minutes
    python3 benchmarks/run.py --scenario stream --scenario dispatch --json out.json
    python3 benchmarks/run.py --target ours --ours-python /path/to/venv/bin/python

The first run creates ``benchmarks/.venv-fc`` and ``benchmarks/.venv-fastchat`` and installs
``wrk`` if it is missing (see envs.py). Every scenario runs each target in turn on the same
fake workers, so ratios compare like with like on a noisy machine. See benchmarks/README.md
for what each figure means.

This script needs only the standard library; the workers and load generators run in the
fc venv (aiohttp + uvloop) or are wrk.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import envs  # noqa: E402
import hostile  # noqa: E402
from lagged_controller import LAG_FILE  # noqa: E402
from processes import (  # noqa: E402
    BenchError,
    Processes,
    flags,
    free_port,
    http_json,
    registration,
    wait_until_up,
)
from procstat import core_busy, core_times, cpu_seconds, rss_bytes  # noqa: E402
from report import (  # noqa: E402
    BARE,
    DIRECT,
    FASTCHAT,
    OURS,
    OURS_TOKENS,
    TARGET_NAMES,
    format_report,
)

SCENARIOS = ("dispatch", "heartbeat", "stream", "registry", "slow-worker", "hostile")

MODEL = "bench-model"
N_WORKERS = 4
STREAM_TOKENS = 64
TOKEN_DELAY_MS = 20.0
STREAM_CONCURRENCY = (64, 256)
WRK_CONNECTIONS = 64
REGISTRY_SIZES = ((10, 1), (1_000, 10), (10_000, 100))
PACED_RATE = 200.0
PACED_CONNECTIONS = 4
FAKE_WORKER_PREFIX = "http://127.0.0.1:1/w"
STREAM_BODY = {
    "model": MODEL,
    "prompt": "A chat between a curious user and an artificial intelligence assistant. "
    "USER: Tell me a story. ASSISTANT:",
    "temperature": 0.7,
    "repetition_penalty": 1.0,
    "top_p": 1.0,
    "max_new_tokens": STREAM_TOKENS,
    "stop": None,
    "stop_token_ids": None,
    "echo": False,
}


@dataclass(frozen=True)
class Timings:
    """How long each measurement runs, in seconds."""

    wrk_warmup: float
    wrk_duration: float
    stream_warmup: float
    stream_duration: float
    stream_drain: float
    paced_warmup: float
    paced_duration: float
    registry_wrk_duration: float
    slow_duration: float
    trigger_interval: float

    paced_timeout: float

    @classmethod
    def full(cls) -> Timings:
        return cls(2.0, 15.0, 3.0, 15.0, 5.0, 1.0, 10.0, 6.0, 12.0, 1.0, 10.0)

    @classmethod
    def quick(cls) -> Timings:
        # No wrk run in the registry scenario; the slow phase fits inside one 5 s probe.
        return cls(1.0, 2.0, 1.3, 1.5, 2.0, 0.5, 1.5, 0.0, 4.0, 1.0, 3.0)


#: the tokens an ours-tokens controller is started with (role -> token)
BENCH_TOKENS = {
    "worker": "bench-worker-token-0123456789",
    "api": "bench-api-token-0123456789abcd",
    "admin": "bench-admin-token-0123456789ab",
}


# ---------------------------------------------------------------------------------- bench


@dataclass
class Bench:
    """Everything the scenarios share: tools, pinning, the workers, the results."""

    args: argparse.Namespace
    timings: Timings
    procs: Processes
    workdir: Path
    tools_python: Path
    fastchat_python: Path | None
    ours_python: Path | None
    wrk: str
    controller_cores: str | None
    load_cores: str | None
    load_threads: int
    skipped: dict[str, str]
    worker_ports: list[int] = field(default_factory=list)
    hang_port: int = 0
    worker_pid: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    #: base URLs of the running controllers started with tokens
    tokens_on: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)

    # -- workers and controllers

    @property
    def worker_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.worker_ports]

    def start_workers(self) -> None:
        """One process serving N_WORKERS fake workers plus the one whose status hangs."""
        self.worker_ports = [free_port() for _ in range(N_WORKERS)]
        self.hang_port = free_port()
        cmd = [str(self.tools_python), str(BENCH_DIR / "bench_worker.py")]
        cmd += flags(
            model=MODEL,
            tokens=STREAM_TOKENS,
            delay_ms=TOKEN_DELAY_MS,
            port=self.worker_ports,
            hang_port=self.hang_port,
        )
        proc = self.procs.start("workers", cmd, cores=self.load_cores)
        self.worker_pid = proc.pid
        deadline = time.monotonic() + 30
        for url in self.worker_urls:
            while True:
                if proc.poll() is not None:
                    raise BenchError(f"bench workers exited {proc.returncode}; see its log")
                try:
                    http_json(f"{url}/worker_get_status", {}, timeout=1.0)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise BenchError("bench workers did not start within 30s") from None
                    time.sleep(0.05)

    def token(self, url: str) -> str | None:
        """The admin token for a controller started with tokens (``ours-tokens``)."""
        return BENCH_TOKENS["admin"] if url in self.tokens_on else None

    def targets(self, *wanted: str) -> list[str]:
        return [t for t in wanted if t in self.args.target and t not in self.skipped]

    @contextlib.contextmanager
    def controller(
        self, kind: str, extra: Sequence[str] = (), lag_file: Path | None = None
    ) -> Iterator[tuple[str, int]]:
        """Start a fresh controller of ``kind``; yields (base URL, pid); always stops it.

        fc-controller gets the ``extra`` flags too, and with a ``lag_file`` runs under
        ``lagged_controller.py``, which records its event loop's lag there.
        """
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        rundir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.workdir))
        env = dict(os.environ)
        if kind == FASTCHAT:
            assert self.fastchat_python is not None
            cmd = [str(self.fastchat_python), "-m", "fastchat.serve.controller"]
            cmd += flags(host="127.0.0.1", port=port)
            env["LOGDIR"] = str(rundir)  # where it writes controller.log
        elif kind == BARE:
            # Answers the first worker's address: the same answer size as a controller's.
            cmd = [str(self.tools_python), str(BENCH_DIR / "bare_app.py")]
            cmd += flags(host="127.0.0.1", port=port, address=self.worker_urls[0])
        else:
            assert self.ours_python is not None
            cmd = [str(self.ours_python), "-m", "controller"]
            if lag_file is not None:
                cmd[1:] = [str(BENCH_DIR / "lagged_controller.py")]
                env[LAG_FILE] = str(lag_file)
            cmd += flags(host="127.0.0.1", port=port, log_level="warning")
            cmd += extra
            if kind == OURS_TOKENS:
                for role, token in BENCH_TOKENS.items():
                    path = rundir / f"{role}.tokens"
                    path.write_text(f"bench-{role}:{token}\n")
                    cmd += [f"--{role}-token-file", str(path)]
        proc = self.procs.start(kind, cmd, cores=self.controller_cores, cwd=rundir, env=env)
        if kind == OURS_TOKENS:
            self.tokens_on.add(url)
        try:
            wait_until_up(url, proc, timeout=60)
            yield url, proc.pid
            if proc.poll() is not None:
                raise BenchError(f"{TARGET_NAMES[kind]} died during the measurement")
        finally:
            # FastChat's heartbeat thread is not a daemon: SIGTERM stops uvicorn but never
            # the process, so it gets SIGKILL straight away.
            self.procs.stop(proc, grace=0 if kind == FASTCHAT else 3.0)

    def register_bench_workers(self, url: str) -> None:
        for worker in self.worker_urls:
            http_json(
                f"{url}/register_worker", registration(worker, [MODEL]), token=self.token(url)
            )
        body = {"model": MODEL}
        address = http_json(f"{url}/get_worker_address", body, token=self.token(url))["address"]
        if address not in self.worker_urls:
            raise BenchError(f"{url} dispatched {MODEL!r} to {address!r}")

    # -- load tools

    def wrk_run(
        self, name: str, url: str, bodies: list[dict[str, Any]], pid: int | None, duration: float
    ) -> dict[str, Any]:
        """wrk at WRK_CONNECTIONS connections; the controller's CPU is sampled around it."""
        bodies_file = self.workdir / f"{name}-bodies.txt"
        bodies_file.write_text("".join(json.dumps(b) + "\n" for b in bodies))
        cmd = [
            self.wrk,
            "-t",
            str(self.load_threads),
            "-c",
            str(WRK_CONNECTIONS),
            "-d",
            f"{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(BENCH_DIR / "wrk_post.lua"),
            url,
            "--",
            str(bodies_file),
        ]
        if any(url.startswith(base + "/") for base in self.tokens_on):
            cmd.append(BENCH_TOKENS["api"])
        cpu0 = cpu_seconds(pid) if pid else 0.0
        worker0 = cpu_seconds(self.worker_pid)
        cores0 = core_times()
        output, wrk_cpu, wall = self.procs.run_measured(
            name, cmd, cores=self.load_cores, timeout=duration + 30
        )
        cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
        worker = cpu_seconds(self.worker_pid) - worker0
        busy = core_busy(cores0, core_times())
        ours = cpu + worker + wrk_cpu
        match = re.search(r"^WRKJSON (\{.*\})$", output, re.MULTILINE)
        if not match:
            raise BenchError(f"no summary from wrk:\n{output[-1000:]}")
        summary: dict[str, Any] = json.loads(match.group(1))
        requests = summary["requests"]
        if requests == 0:
            raise BenchError(f"wrk completed no request against {url}")
        seconds = summary["duration_us"] / 1e6
        error_keys = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        return {
            "requests": requests,
            "req_per_s": requests / seconds,
            "p50_ms": summary["p50_us"] / 1000,
            "p90_ms": summary["p90_us"] / 1000,
            "p99_ms": summary["p99_us"] / 1000,
            "max_ms": summary["max_us"] / 1000,
            "errors": sum(summary[k] for k in error_keys),
            "controller_cpu_us_per_req": cpu / requests * 1e6 if pid else None,
            "controller_cpu_util": cpu / seconds if pid else None,
            "loadgen": "wrk",
            "loadgen_cpu_util": wrk_cpu / wall,
            "core_busy": {str(k): v for k, v in busy.items()},
            "other_cpu_util": max(0.0, sum(busy.values()) - ours / wall),
            "raw": summary,
        }

    def loadgen(self, name: str, args: list[str], timeout: float) -> dict[str, Any]:
        cmd = [str(self.tools_python), str(BENCH_DIR / "loadgen.py"), *args]
        output, _, _ = self.procs.run_measured(name, cmd, cores=self.load_cores, timeout=timeout)
        lines = [line for line in output.splitlines() if line.startswith("{")]
        if not lines:
            raise BenchError(f"{name} printed no result:\n{output[-1000:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def paced(
        self, name: str, url: str, body: dict[str, Any], pid: int, duration: float
    ) -> dict[str, Any]:
        """PACED_RATE requests/s on a fixed schedule; latency and the controller's CPU."""
        t = self.timings
        args = flags(
            "paced",
            url=url,
            body=json.dumps(body),
            rate=PACED_RATE,
            connections=PACED_CONNECTIONS,
            warmup=t.paced_warmup,
            duration=duration,
            timeout=t.paced_timeout,
            cpu_pid=pid,
        )
        result = self.loadgen(name, args, timeout=t.paced_warmup + duration + t.paced_timeout + 30)
        cpu = result["cpu_s"][str(pid)]
        requests = result["requests"]
        result["controller_cpu_us_per_req"] = cpu / requests * 1e6 if requests else None
        busy = sum(result["core_busy"].values())
        ours = (cpu + result["loadgen_cpu_s"]) / result["window_s"]
        result["other_cpu_util"] = max(0.0, busy - ours)
        return result

    # -- scenarios

    @contextlib.contextmanager
    def guard(self, label: str) -> Iterator[None]:
        """Record a failed measurement and go on with the next one."""
        try:
            yield
        except (BenchError, OSError) as e:
            self.errors[label] = f"{type(e).__name__}: {e}"
            print(f"[bench] {label} failed: {e}", file=sys.stderr)

    def scenario_wrk(
        self,
        scenario: str,
        path: str,
        bodies: list[dict[str, Any]],
        check: Callable[[str], None],
        kinds: tuple[str, ...] = (FASTCHAT, OURS),
    ) -> None:
        out = self.results.setdefault(scenario, {})
        t = self.timings
        for kind in self.targets(*kinds):
            with self.guard(f"{scenario} / {TARGET_NAMES[kind]}"):
                with self.controller(kind) as (url, pid):
                    if kind != BARE:  # it has no registry
                        self.register_bench_workers(url)
                    check(url)
                    target = f"{url}{path}"
                    if t.wrk_warmup:
                        self.wrk_run(
                            f"{scenario}-{kind}-warmup", target, bodies, None, t.wrk_warmup
                        )
                    result = self.wrk_run(f"{scenario}-{kind}", target, bodies, pid, t.wrk_duration)
                out[kind] = result
                log_result(scenario, kind, result, "req_per_s", "controller_cpu_us_per_req")

    def scenario_dispatch(self) -> None:
        def check(url: str) -> None:
            body = {"model": MODEL}
            address = http_json(f"{url}/get_worker_address", body, token=self.token(url))
            if address["address"] not in self.worker_urls:
                raise BenchError(f"dispatch answered {address!r}")

        kinds = (FASTCHAT, OURS, OURS_TOKENS, BARE)
        self.scenario_wrk("dispatch", "/get_worker_address", [{"model": MODEL}], check, kinds)

    def scenario_heartbeat(self) -> None:
        bodies = [{"worker_name": w, "queue_length": 0} for w in self.worker_urls]

        def check(url: str) -> None:
            for body in bodies:
                if http_json(f"{url}/receive_heart_beat", body) != {"exist": True}:
                    raise BenchError(f"heartbeat for a registered worker not known: {body}")

        self.scenario_wrk("heartbeat", "/receive_heart_beat", bodies, check)

    def stream_run(
        self, name: str, urls: list[str], concurrency: int, controller_pid: int | None
    ) -> dict[str, Any]:
        t = self.timings
        pids = [self.worker_pid] if controller_pid is None else [controller_pid, self.worker_pid]
        args = flags(
            "streams",
            concurrency=concurrency,
            body=json.dumps(STREAM_BODY),
            expect_chunks=STREAM_TOKENS,
            warmup=t.stream_warmup,
            duration=t.stream_duration,
            drain=t.stream_drain,
            # Spread the first starts over one stream's length so streams run out of phase.
            stagger=min(t.stream_warmup, STREAM_TOKENS * TOKEN_DELAY_MS / 1000),
            url=urls,
            cpu_pid=pids,
        )
        if any(u.startswith(base + "/") for u in urls for base in self.tokens_on):
            args += ["--token", BENCH_TOKENS["api"]]
        timeout = t.stream_warmup + t.stream_duration + t.stream_drain + 30
        result = self.loadgen(name, args, timeout=timeout)
        chunks = result["chunks"]
        if chunks == 0:
            raise BenchError(f"no chunk arrived: {result.get('error_samples')}")
        ours = sum(result["cpu_s"].values()) + result["loadgen_cpu_s"]
        busy = sum(result["core_busy"].values())
        result["other_cpu_util"] = max(0.0, busy - ours / result["window_s"])
        result["worker_cpu_us_per_chunk"] = result["cpu_s"][str(self.worker_pid)] / chunks * 1e6
        if controller_pid is not None:
            cpu = result["cpu_s"][str(controller_pid)]
            result["controller_cpu_us_per_chunk"] = cpu / chunks * 1e6
            result["controller_cpu_util"] = cpu / result["window_s"]
        return result

    def scenario_stream(self) -> None:
        out = self.results.setdefault("stream", {})
        for concurrency in STREAM_CONCURRENCY:
            level = out.setdefault(str(concurrency), {})
            for kind in self.targets(DIRECT, FASTCHAT, OURS, OURS_TOKENS):
                name = f"stream{concurrency}-{kind}"
                with self.guard(f"{concurrency} streams / {TARGET_NAMES[kind]}"):
                    if kind == DIRECT:
                        urls = [f"{w}/worker_generate_stream" for w in self.worker_urls]
                        result = self.stream_run(name, urls, concurrency, None)
                    else:
                        with self.controller(kind) as (url, pid):
                            self.register_bench_workers(url)
                            urls = [f"{url}/worker_generate_stream"]
                            result = self.stream_run(name, urls, concurrency, pid)
                    level[kind] = result
                    log_result(
                        f"stream {concurrency}",
                        kind,
                        result,
                        "chunks_per_s",
                        "controller_cpu_us_per_chunk",
                    )

    def registry_run(self, kind: str, count: int, models: int) -> dict[str, Any]:
        t = self.timings
        name = f"registry-{kind}-{count}"
        with self.controller(kind) as (url, pid):
            # Warm the code paths first so the RSS delta is the registry, not imports.
            http_json(f"{url}/register_worker", registration(f"{FAKE_WORKER_PREFIX}warm", ["warm"]))
            for _ in range(50):
                http_json(f"{url}/get_worker_address", {"model": "warm"})
            rss0 = rss_bytes(pid)
            args = flags("register", url=url, count=count, models=models, prefix=FAKE_WORKER_PREFIX)
            reg = self.loadgen(f"{name}-register", args, timeout=300)
            if reg["failures"]:
                raise BenchError(f"{reg['failures']} registrations failed")
            rss1 = rss_bytes(pid)
            address = http_json(f"{url}/get_worker_address", {"model": "m0"})["address"]
            if not address.startswith(FAKE_WORKER_PREFIX):
                raise BenchError(f"dispatch among {count} workers answered {address!r}")
            probe = f"{url}/get_worker_address"
            result = self.paced(name, probe, {"model": "m0"}, pid, t.paced_duration)
            if t.registry_wrk_duration:
                result["wrk"] = self.wrk_run(
                    f"{name}-wrk", probe, [{"model": "m0"}], pid, t.registry_wrk_duration
                )
        result.update(
            workers=count,
            models=models,
            register_s=reg["seconds"],
            rss_before=rss0,
            rss_after=rss1,
            bytes_per_worker=(rss1 - rss0) / count,
        )
        return result

    def scenario_registry(self) -> None:
        out = self.results.setdefault("registry", {})
        for kind in self.targets(FASTCHAT, OURS):
            for count, models in REGISTRY_SIZES:
                with self.guard(f"registry {count} / {TARGET_NAMES[kind]}"):
                    result = self.registry_run(kind, count, models)
                    out.setdefault(kind, {})[str(count)] = result
                    print(
                        f"  registry {TARGET_NAMES[kind]:>16} {count:>6} workers: "
                        f"p99 {result['latency_ms']['p99']:.2f} ms, "
                        f"{result['bytes_per_worker']:.0f} B/worker",
                        file=sys.stderr,
                    )

    def slow_worker_run(self, kind: str) -> dict[str, Any]:
        t = self.timings
        hang = {"worker_name": f"http://127.0.0.1:{self.hang_port}", "check_heart_beat": True}
        body = {"model": MODEL}
        with self.controller(kind) as (url, pid):
            self.register_bench_workers(url)
            probe = f"{url}/get_worker_address"
            base = self.paced(f"slow-{kind}-baseline", probe, body, pid, t.paced_duration)
            cmd = [str(self.tools_python), str(BENCH_DIR / "loadgen.py")]
            cmd += flags(
                "trigger",
                url=f"{url}/register_worker",
                body=json.dumps(hang),
                interval=t.trigger_interval,
                duration=t.paced_warmup + t.slow_duration,
            )
            trigger = self.procs.start(f"slow-{kind}-trigger", cmd, cores=self.load_cores)
            try:
                slow = self.paced(f"slow-{kind}-hanging", probe, body, pid, t.slow_duration)
                trigger.wait(timeout=40)
            finally:
                self.procs.stop(trigger, grace=0)
        log = Path(trigger.log_path).read_text()  # type: ignore[attr-defined]
        lines = [x for x in log.splitlines() if x.startswith("{")]
        return {
            "baseline": base,
            "hanging": slow,
            "trigger": json.loads(lines[-1]) if lines else None,
        }

    def scenario_slow_worker(self) -> None:
        """Others' dispatch latency, then the same while /register_worker keeps pointing the
        controller at a worker whose /worker_get_status never answers."""
        out = self.results.setdefault("slow-worker", {})
        for kind in self.targets(FASTCHAT, OURS):
            with self.guard(f"slow worker / {TARGET_NAMES[kind]}"):
                result = out[kind] = self.slow_worker_run(kind)
                print(
                    f"  slow-worker {TARGET_NAMES[kind]:>16}: p99 "
                    f"{result['baseline']['latency_ms']['p99']:.2f} ms -> "
                    f"{result['hanging']['latency_ms']['p99']:.2f} ms",
                    file=sys.stderr,
                )

    def scenario_hostile(self) -> None:
        """Normal dispatch and streams, quiet and then while each attack of issue 16 runs
        against the same fc-controller: its loop lag, the traffic's p99, its memory."""
        if OURS not in self.targets(OURS):
            return
        with self.guard("hostile / fc-controller"):
            self.results["hostile"] = hostile.Hostile(self).run()


def log_result(scenario: str, kind: str, result: dict[str, Any], rate: str, cpu: str) -> None:
    cost = result.get(cpu)
    print(
        f"  {scenario} {TARGET_NAMES[kind]:>16}: {result[rate]:,.0f}/s"
        + (f", {cost:.0f} us CPU each" if cost is not None else ""),
        file=sys.stderr,
    )


# ------------------------------------------------------------------------------- the run


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def machine_busy(seconds: float) -> float:
    """Cores' worth of CPU busy over ``seconds`` while the benchmark itself is idle."""
    before = core_times()
    time.sleep(seconds)
    return sum(core_busy(before, core_times()).values())


def interrupt(signum: int, frame: object) -> None:
    """Signals unwind like Ctrl-C, so every started process is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark fc-controller against FastChat 0.2.36's controller."
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 2 minutes)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument(
        "--target",
        action="append",
        choices=(FASTCHAT, OURS, OURS_TOKENS, BARE, DIRECT),
        help="run only against this target (repeatable; default: all)",
    )
    parser.add_argument(
        "--attack",
        action="append",
        choices=[attack.key for attack in hostile.ATTACKS],
        help="the hostile scenario runs only this attack (repeatable; default: all)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="the hostile scenario also runs each attack against a stand-in for the "
        "controller, just before its row: the normal traffic's p99 without the "
        "controller's part in the attack",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=BENCH_DIR / "results" / "latest.json",
        help="write the figures here (default: %(default)s)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the controller and the load to separate cores",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep every process's log (the path is printed)"
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter the venvs are created from (default: this one)",
    )
    parser.add_argument(
        "--ours-python",
        type=Path,
        help="interpreter that runs fc-controller for the 'ours' target (default: the fc "
        "venv's, i.e. this working tree); the workers and load generators still use the fc venv",
    )
    args = parser.parse_args(argv)
    if args.ours_python is not None:
        # Absolute, since controllers start in scratch directories; not resolved, since a
        # venv's python is a symlink to the base interpreter and only its path picks the venv.
        args.ours_python = args.ours_python.absolute()
        if not os.access(args.ours_python, os.X_OK):
            parser.error(f"--ours-python {args.ours_python}: not an executable")
    args.scenario = args.scenario or list(SCENARIOS)
    args.target = args.target or [FASTCHAT, OURS, BARE, DIRECT]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if sys.platform != "linux":
        print("the benchmark reads /proc and uses taskset: Linux only", file=sys.stderr)
        return 2
    # SIGINT too: a shell starting us in the background may have set it to "ignore".
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    timings = Timings.quick() if args.quick else Timings.full()
    started = time.monotonic()

    try:
        wrk = envs.ensure_wrk()
        tools_python = envs.ensure_fc_venv(args.python)
        fastchat_python = (
            envs.ensure_fastchat_venv(args.python) if FASTCHAT in args.target else None
        )
    except envs.BenchEnvError as e:
        print(f"[setup] {e}", file=sys.stderr)
        return 2
    skipped: dict[str, str] = {}
    ours_python: Path | None = args.ours_python or tools_python
    if OURS in args.target or OURS_TOKENS in args.target:
        problem = envs.fc_controller_problem(args.ours_python or tools_python)
        if problem:
            for kind in (OURS, OURS_TOKENS):
                skipped[kind] = f"fc-controller not runnable: {problem}"
            ours_python = None
            print(f"[bench] skipping: {skipped[OURS]}", file=sys.stderr)

    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    controller_cores = str(cpus[0]) if pin else None
    load_cores = ",".join(str(c) for c in cpus[1:]) if pin else None
    if pin:
        # The orchestrator mostly sleeps, but keep it off the controller's core anyway.
        os.sched_setaffinity(0, set(cpus[1:]))

    workdir = Path(tempfile.mkdtemp(prefix="fc-bench-"))
    procs = Processes(workdir)
    bench = Bench(
        args=args,
        timings=timings,
        procs=procs,
        workdir=workdir,
        tools_python=tools_python,
        fastchat_python=fastchat_python,
        ours_python=ours_python,
        wrk=wrk,
        controller_cores=controller_cores,
        load_cores=load_cores,
        load_threads=len(cpus) - 1 if pin else 1,
        skipped=skipped,
    )
    errors = bench.errors
    idle_busy = 0.0
    try:
        bench.start_workers()
        idle_busy = machine_busy(2.0)
        if idle_busy > 0.15:
            print(
                f"[bench] the machine is not idle: {idle_busy:.0%} of a core is busy "
                "before any load; expect noisy figures",
                file=sys.stderr,
            )
        for scenario in args.scenario:
            print(f"[bench] {scenario}", file=sys.stderr, flush=True)
            method = getattr(bench, "scenario_" + scenario.replace("-", "_"))
            t0 = time.monotonic()
            try:
                method()
            except (BenchError, OSError) as e:
                errors[scenario] = f"{type(e).__name__}: {e}"
                print(f"[bench] {scenario} failed: {e}", file=sys.stderr)
            print(f"[bench] {scenario} took {time.monotonic() - t0:.0f}s", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"[bench] interrupted; stopping every process (logs in {workdir})", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not interrupt the clean-up itself.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()

    report: dict[str, Any] = {
        "command": " ".join(["python3", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine_info(),
        "pinning": {
            "controller_cores": controller_cores,
            "load_cores": load_cores,
        },
        "ours_python": str(ours_python) if ours_python else None,
        "timings": asdict(timings),
        "workload": {
            "workers": N_WORKERS,
            "tokens": STREAM_TOKENS,
            "token_delay_ms": TOKEN_DELAY_MS,
            "stream_concurrency": STREAM_CONCURRENCY,
            "wrk_connections": WRK_CONNECTIONS,
            "registry_sizes": REGISTRY_SIZES,
            "paced_rate": PACED_RATE,
            "paced_connections": PACED_CONNECTIONS,
        },
        "versions": {
            "fastchat_env": envs.package_versions(fastchat_python, envs.FASTCHAT_REPORTED)
            if fastchat_python
            else {},
            "fc_env": envs.package_versions(tools_python, envs.FC_REPORTED),
            "ours_env": envs.package_versions(ours_python, envs.FC_REPORTED) if ours_python else {},
            "wrk": subprocess.run(
                [wrk, "--version"], capture_output=True, text=True, check=False
            ).stdout.split(" [")[0],
        },
        "idle_busy_before_load": idle_busy,
        "results": bench.results,
        "notes": list(skipped.values()) + [f"{s} failed: {e}" for s, e in errors.items()],
        "errors": errors,
        "elapsed_s": time.monotonic() - started,
    }
    text, checks = format_report(report)
    report["checks"] = [asdict(c) for c in checks]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(text)
    print()
    print(f"figures written to {args.json}; took {report['elapsed_s']:.0f}s")
    if args.keep_logs:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

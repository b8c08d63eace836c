#!/usr/bin/env python3
"""Dispatch quality when workers differ (issue 8): fc-controller vs FastChat vs exact knowledge.

    python benchmarks/dispatch_quality.py              # full run, about 20 minutes
    python benchmarks/dispatch_quality.py --quick      # direct mode, 45 s heartbeats, ~3 min
    python benchmarks/dispatch_quality.py --policies least_time --modes direct --json out.json

Four FastChat-shaped workers with four slots each (``dispatch_sim/workers.py``), three
serving a request in 0.2 s and one four times slower, all reporting ``speed: 1`` and
heartbeating like stock FastChat workers every 45 s or 5 s. An open-loop Poisson client in
its own process (``dispatch_sim/loadgen.py``) sends 45 requests/s (about 70% of the 65/s
the four can serve) for 30 s, either the OpenAI API server's way (``/get_worker_address``,
then stream from the worker: the controller never sees a request end) or proxied through
the controller's ``/worker_generate_stream``. The same arrivals go to each dispatcher in
turn, with fresh workers and a fresh controller for every run:

- ``reference``: a dispatcher that knows each worker's true work in flight and service time
  (``dispatch_sim/reference.py``), the bound the others are measured against;
- ``FastChat``: FastChat 0.2.36's controller (``benchmarks/envs.py`` builds its venv);
- ``fc``: this repository's controller, once per dispatch method it offers (read from
  ``python -m controller --help``, so new methods are benchmarked without changes here).

Then an "equal workers" check (all four at 0.2 s) compares fc-controller's default dispatch
method with plain shortest_queue, which it must not lose to.

Lottery draws by reported speed alone, so heartbeats cannot change it: it runs at the
shortest heartbeat only unless ``--all-combinations`` is given. Results are printed as
tables and written as JSON (``--json``, default ``benchmarks/results/dispatch_quality.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import web

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import envs  # noqa: E402
from dispatch_sim import MODEL  # noqa: E402
from dispatch_sim.reference import ExactDispatcher  # noqa: E402

REFERENCE = "reference"
FASTCHAT = "FastChat"
FC = "fc"
MODES = ("direct", "proxied")
FASTCHAT_POLICIES = ("shortest_queue", "lottery")
BASE_POLICIES = ("shortest_queue", "lottery")
#: lottery draws by reported speed only; heartbeats cannot change what it does
HEARTBEAT_BLIND = ("lottery",)

FAST = 0.2
SLOW = 0.8
SLOTS = 4
MESSAGES = 8
SKEWED = (FAST, FAST, FAST, SLOW)
EQUAL = (FAST, FAST, FAST, FAST)

#: p99 target against the reference with 45 s heartbeats (issue 8)
P99_TARGET = 1.2
#: "no loss" with equal workers: within this factor of shortest_queue (run-to-run noise)
NO_LOSS_TOLERANCE = 1.10


class BenchError(RuntimeError):
    """A run could not be completed; the message says where to look."""


@dataclass(frozen=True)
class Dispatcher:
    kind: str  # REFERENCE, FASTCHAT or FC
    policy: str

    @property
    def label(self) -> str:
        return REFERENCE if self.kind == REFERENCE else f"{self.kind} {self.policy}"


@dataclass(frozen=True)
class RunSpec:
    scenario: str  # "skewed" or "equal"
    dispatcher: Dispatcher
    heartbeat: float
    mode: str

    @property
    def service_times(self) -> tuple[float, ...]:
        return SKEWED if self.scenario == "skewed" else EQUAL

    @property
    def name(self) -> str:
        return (
            f"{self.scenario}-{self.mode}-hb{self.heartbeat:g}-"
            f"{self.dispatcher.label.replace(' ', '-')}"
        )


@dataclass
class Settings:
    rate: float
    duration: float
    seed: int
    request_timeout: float
    fc_python: str
    fc_args: list[str]
    fc_default: str | None
    fastchat_python: str | None
    logdir: Path
    runs: list[RunSpec] = field(default_factory=list)


# ----------------------------------------------------------------------------- processes


class Processes:
    """Every child process, each in its own process group so a sweep leaves nothing behind."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.live: dict[int, asyncio.subprocess.Process] = {}

    async def start(
        self,
        name: str,
        cmd: list[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        pipe_stdout: bool = False,
    ) -> tuple[asyncio.subprocess.Process, Path]:
        log = self.logdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_stdout else out,
                stderr=out,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        self.live[proc.pid] = proc
        return proc, log

    async def stop(self, proc: asyncio.subprocess.Process, grace: float = 2.0) -> None:
        """SIGTERM the group, SIGKILL it after ``grace`` s (FastChat's controller hangs on
        SIGTERM: its expiry thread is not a daemon)."""
        self.live.pop(proc.pid, None)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)

    def kill_all(self) -> None:
        """Last resort on any exit path, usable without an event loop."""
        for pid in list(self.live):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.live.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_until_up(
    session: aiohttp.ClientSession,
    url: str,
    proc: asyncio.subprocess.Process | None,
    log: Path | None,
    timeout: float = 30.0,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.returncode is not None:
            raise BenchError(f"{url} exited {proc.returncode} while starting; see {log}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with session.get(
                f"{url}/test_connection", timeout=aiohttp.ClientTimeout(total=1)
            ) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise BenchError(f"{url} did not answer /test_connection within {timeout:.0f} s; see {log}")


# ----------------------------------------------------------------------------- one run


async def start_dispatcher(
    stack: contextlib.AsyncExitStack,
    procs: Processes,
    session: aiohttp.ClientSession,
    spec: RunSpec,
    settings: Settings,
    port: int,
    workers: list[str],
) -> ExactDispatcher | None:
    """Start the dispatcher under test on ``port``; returns the reference when it is one."""
    url = f"http://127.0.0.1:{port}"
    d = spec.dispatcher
    if d.kind == REFERENCE:
        ref = ExactDispatcher(dict(zip(workers, spec.service_times, strict=True)), SLOTS)
        runner = web.AppRunner(ref.app(), access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        return ref
    env = dict(os.environ)
    if d.kind == FASTCHAT:
        assert settings.fastchat_python is not None
        cmd = [settings.fastchat_python, "-m", "fastchat.serve.controller"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--dispatch-method", d.policy]
        env["LOGDIR"] = str(settings.logdir)  # FastChat writes controller.log there
    else:
        cmd = [settings.fc_python, "-m", "controller", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--log-level", "warning", "--dispatch-method", d.policy]
        cmd += settings.fc_args
    proc, log = await procs.start(f"{spec.name}-controller", cmd, cwd=settings.logdir, env=env)
    stack.push_async_callback(procs.stop, proc, 1.0)
    await wait_until_up(session, url, proc, log)
    return None


async def run_one(
    procs: Processes, session: aiohttp.ClientSession, spec: RunSpec, settings: Settings
) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker_ports = [free_port() for _ in spec.service_times]
    workers = [f"http://127.0.0.1:{p}" for p in worker_ports]
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        ref = await start_dispatcher(stack, procs, session, spec, settings, port, workers)
        cmd = [sys.executable, "-m", "dispatch_sim.workers", "--controller", url]
        cmd += ["--ports", ",".join(map(str, worker_ports))]
        cmd += ["--service-times", ",".join(map(str, spec.service_times))]
        cmd += ["--slots", str(SLOTS), "--messages", str(MESSAGES)]
        cmd += ["--heartbeat", str(spec.heartbeat), "--seed", str(settings.seed)]
        if ref is not None:
            cmd += ["--notify", f"{url}/worker_finished"]
        wproc, wlog = await procs.start(
            f"{spec.name}-workers", cmd, cwd=BENCH_DIR, pipe_stdout=True
        )
        stack.push_async_callback(procs.stop, wproc, 1.0)
        assert wproc.stdout is not None
        try:
            line = await asyncio.wait_for(wproc.stdout.readline(), 30)
        except TimeoutError:
            raise BenchError(f"workers did not get ready in 30 s; see {wlog}") from None
        if not line:
            raise BenchError(f"workers exited while starting; see {wlog}")
        ready = json.loads(line)
        async with session.post(f"{url}/list_models") as r:
            models = (await r.json(content_type=None))["models"]
        if MODEL not in models:
            raise BenchError(f"{spec.dispatcher.label} lists {models}, not {MODEL}")

        out = settings.logdir / f"{spec.name}-requests.json"
        cmd = [sys.executable, "-m", "dispatch_sim.loadgen", "--controller", url]
        cmd += ["--mode", spec.mode, "--rate", str(settings.rate)]
        cmd += ["--duration", str(settings.duration), "--seed", str(settings.seed)]
        cmd += ["--timeout", str(settings.request_timeout), "--out", str(out)]
        lproc, llog = await procs.start(f"{spec.name}-loadgen", cmd, cwd=BENCH_DIR)
        stack.push_async_callback(procs.stop, lproc, 1.0)
        bound = settings.duration + settings.request_timeout + 30
        try:
            code = await asyncio.wait_for(lproc.wait(), bound)
        except TimeoutError:
            raise BenchError(f"the load generator ran past {bound:.0f} s; see {llog}") from None
        if code != 0:
            raise BenchError(f"the load generator exited {code}; see {llog}")
        result = json.loads(out.read_text())
    slow = {w for w, st in zip(workers, spec.service_times, strict=True) if st > FAST}
    summary = summarize(result["records"], workers, slow)
    summary["wall"] = round(time.monotonic() - started, 1)
    summary["heartbeat_phases"] = ready["phases"]
    return {"spec": spec_json(spec), "summary": summary}


def spec_json(spec: RunSpec) -> dict[str, Any]:
    return {
        "scenario": spec.scenario,
        "dispatcher": spec.dispatcher.label,
        "kind": spec.dispatcher.kind,
        "policy": spec.dispatcher.policy,
        "heartbeat": spec.heartbeat,
        "mode": spec.mode,
        "service_times": list(spec.service_times),
    }


# ----------------------------------------------------------------------------- statistics


def quantile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile; None for no values."""
    if not sorted_values:
        return None
    index = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[index]


def summarize(records: list[dict[str, Any]], workers: list[str], slow: set[str]) -> dict[str, Any]:
    ok = [r for r in records if not r["error"]]
    latencies = sorted(r["latency"] for r in ok)
    per_worker = {w: 0 for w in workers}
    for r in records:
        if r["worker"] in per_worker:
            per_worker[r["worker"]] += 1
    attributed = sum(per_worker.values())
    errors: dict[str, int] = {}
    for r in records:
        if r["error"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    lags = sorted(r["lag"] for r in records)
    dispatch = sorted(r["dispatch"] for r in records if "dispatch" in r)
    slow_count = sum(n for w, n in per_worker.items() if w in slow)
    return {
        "requests": len(records),
        "errors": sum(errors.values()),
        "error_kinds": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "slow_share": slow_count / attributed if attributed and slow else None,
        "per_worker": list(per_worker.values()),
        "p50": quantile(latencies, 0.50),
        "p90": quantile(latencies, 0.90),
        "p99": quantile(latencies, 0.99),
        "max": latencies[-1] if latencies else None,
        "mean": sum(latencies) / len(latencies) if latencies else None,
        "ttfc_p50": quantile(sorted(r["ttfc"] for r in ok if "ttfc" in r), 0.50),
        "dispatch_p99": quantile(dispatch, 0.99),
        "client_lag_p99": quantile(lags, 0.99),
    }


# ----------------------------------------------------------------------------- plan


def fc_dispatch_methods(python: str) -> tuple[list[str], str | None]:
    """The dispatch methods ``python -m controller --help`` lists, and its default."""
    env = dict(os.environ, COLUMNS="1000")
    result = subprocess.run(
        [python, "-m", "controller", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=BENCH_DIR,
        env=env,
    )
    if result.returncode != 0:
        raise BenchError(f"{python} -m controller --help failed: {result.stderr.strip()[-300:]}")
    text = result.stdout
    # The last mention is the option's own entry (the first is in the usage line).
    matches = list(re.finditer(r"--dispatch-method \{([^}]*)\}", text))
    if not matches:
        return list(BASE_POLICIES), None
    methods = matches[-1].group(1).split(",")
    found = re.search(r"\(default: ([\w-]+)\)", text[matches[-1].end() :])
    return methods, found.group(1) if found else None


def fastchat_venv() -> str:
    """FastChat 0.2.36's venv from envs.py: reused as it is when it already works.

    envs.py rebuilds the venv when the interpreter it is asked to build from differs from
    the one it was built from; run.py and this script may run under different ones, so
    asking it every time would rebuild the venv back and forth.
    """
    python = envs.BENCH_DIR / ".venv-fastchat" / "bin" / "python"
    if python.exists():
        probe = subprocess.run(
            [
                str(python),
                "-c",
                "import fastchat, fastchat.serve.controller; print(fastchat.__version__)",
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=tempfile.gettempdir(),  # importing the controller writes controller.log
            env=dict(os.environ, LOGDIR=""),
        )
        if probe.returncode == 0 and probe.stdout.strip().endswith("0.2.36"):
            return str(python)
    return str(envs.ensure_fastchat_venv())


def plan(args: argparse.Namespace, fc_policies: list[str], fc_default: str | None) -> list[RunSpec]:
    heartbeats = sorted(args.heartbeats, reverse=True)
    fastchat = [] if args.no_fastchat else list(args.fastchat_policies)
    runs: list[RunSpec] = []
    for mode in args.modes:
        runs.append(RunSpec("skewed", Dispatcher(REFERENCE, "exact"), min(heartbeats), mode))
        for hb in heartbeats:
            for kind, policies in ((FASTCHAT, fastchat), (FC, fc_policies)):
                for policy in policies:
                    if (
                        policy in HEARTBEAT_BLIND
                        and hb != min(heartbeats)
                        and not args.all_combinations
                    ):
                        continue
                    runs.append(RunSpec("skewed", Dispatcher(kind, policy), hb, mode))
    if not args.no_equal:
        equal_hb = max(heartbeats)
        baseline = [Dispatcher(FC, "shortest_queue")]
        if "shortest_queue" in fastchat:
            baseline.append(Dispatcher(FASTCHAT, "shortest_queue"))
        contenders = [Dispatcher(FC, fc_default)] if fc_default else []
        for mode in args.equal_modes:
            for d in [Dispatcher(REFERENCE, "exact"), *baseline, *contenders]:
                spec = RunSpec("equal", d, equal_hb, mode)
                if spec not in runs:
                    runs.append(spec)
    return runs


# ----------------------------------------------------------------------------- report


def fmt_s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def reference_of(results: list[dict[str, Any]], scenario: str, mode: str) -> dict[str, Any] | None:
    for r in results:
        s = r["spec"]
        if s["scenario"] == scenario and s["mode"] == mode and s["kind"] == REFERENCE:
            summary: dict[str, Any] = r["summary"]
            return summary
    return None


def table(results: list[dict[str, Any]], scenario: str) -> str:
    rows = [r for r in results if r["spec"]["scenario"] == scenario]
    header = "| mode | heartbeat | dispatcher | slow share | p50 | p99 | max | errors | p99 / ref |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, m = r["spec"], r["summary"]
        ref = reference_of(results, scenario, s["mode"])
        share = m["slow_share"]
        lines.append(
            "| "
            + " | ".join(
                [
                    s["mode"],
                    "—" if s["kind"] == REFERENCE else f"{s['heartbeat']:g} s",
                    s["dispatcher"],
                    "—" if share is None else f"{share:.0%}",
                    fmt_s(m["p50"]),
                    fmt_s(m["p99"]),
                    fmt_s(m["max"]),
                    f"{m['errors']}/{m['requests']}",
                    fmt_ratio(ratio(m["p99"], ref["p99"] if ref else None)),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def checks(results: list[dict[str, Any]], fc_default: str | None) -> list[dict[str, Any]]:
    """The issue's two targets, judged on the runs that were made."""
    out: list[dict[str, Any]] = []
    for r in results:
        s, m = r["spec"], r["summary"]
        if s["scenario"] != "skewed" or s["kind"] != FC or s["heartbeat"] != 45:
            continue
        ref = reference_of(results, "skewed", s["mode"])
        value = ratio(m["p99"], ref["p99"] if ref else None)
        ok = value is not None and value <= P99_TARGET and m["errors"] == 0
        out.append(
            {
                "check": f"{s['dispatcher']} p99 vs reference, 45 s heartbeats, {s['mode']}",
                "value": value,
                "target": f"<= {P99_TARGET}x, no errors",
                "ok": ok,
                "default": s["policy"] == fc_default,
            }
        )
    equal = [r for r in results if r["spec"]["scenario"] == "equal"]
    for mode in sorted({r["spec"]["mode"] for r in equal}):
        by_label = {
            r["spec"]["dispatcher"]: r["summary"] for r in equal if r["spec"]["mode"] == mode
        }
        contender = by_label.get(f"{FC} {fc_default}")
        for base in (f"{FC} shortest_queue", f"{FASTCHAT} shortest_queue"):
            baseline = by_label.get(base)
            if contender is None or baseline is None or base == f"{FC} {fc_default}":
                continue
            p50 = ratio(contender["p50"], baseline["p50"])
            p99 = ratio(contender["p99"], baseline["p99"])
            ok = (
                p50 is not None
                and p99 is not None
                and p50 <= NO_LOSS_TOLERANCE
                and p99 <= NO_LOSS_TOLERANCE
                and contender["errors"] <= baseline["errors"]
            )
            out.append(
                {
                    "check": f"equal workers, {mode}: fc {fc_default} vs {base} (p50, p99)",
                    "value": [p50, p99],
                    "target": f"both <= {NO_LOSS_TOLERANCE}x, no more errors",
                    "ok": ok,
                    "default": True,
                }
            )
    return out


def render_checks(items: list[dict[str, Any]]) -> str:
    lines = []
    for c in items:
        value = c["value"]
        shown = (
            ", ".join(fmt_ratio(v) for v in value) if isinstance(value, list) else fmt_ratio(value)
        )
        mark = "ok  " if c["ok"] else "MISS"
        tag = " (default policy)" if c["default"] else ""
        lines.append(f"- {mark} {c['check']}{tag}: {shown} (target {c['target']})")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Dispatch quality with one slow worker: fc-controller vs FastChat 0.2.36 "
        "vs an exact-knowledge reference (issue 8)."
    )
    p.add_argument("--quick", action="store_true", help="10 s runs, direct mode, 45 s beats")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals (30)")
    p.add_argument("--rate", type=float, default=45.0, help="arrivals per second (45)")
    p.add_argument("--seed", type=int, default=1, help="arrival and heartbeat-phase seed")
    p.add_argument(
        "--policies",
        nargs="+",
        default=None,
        help="fc-controller dispatch methods (default: every one --help lists)",
    )
    p.add_argument("--fastchat-policies", nargs="*", default=list(FASTCHAT_POLICIES))
    p.add_argument("--no-fastchat", action="store_true", help="skip FastChat's controller")
    p.add_argument("--heartbeats", type=float, nargs="+", default=None, help="(45 5)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None, help="(direct proxied)")
    p.add_argument("--no-equal", action="store_true", help="skip the equal-workers check")
    p.add_argument(
        "--all-combinations",
        action="store_true",
        help="also run lottery at every heartbeat (it ignores them)",
    )
    p.add_argument("--fc-args", default="", help="extra flags for every fc-controller run")
    p.add_argument("--request-timeout", type=float, default=150.0)
    p.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "dispatch_quality.json")
    p.add_argument("--keep-logs", action="store_true", help="keep the run logs on success")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 10.0 if args.quick else 30.0
    if args.heartbeats is None:
        args.heartbeats = [45.0] if args.quick else [45.0, 5.0]
    if args.modes is None:
        args.modes = ["direct"] if args.quick else list(MODES)
    args.equal_modes = ["direct"] if args.quick else args.modes
    return args


def log(message: str, stream: TextIO = sys.stderr) -> None:
    print(message, file=stream, flush=True)


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


async def run_all(settings: Settings, procs: Processes) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    async with client_session() as session:
        for i, spec in enumerate(settings.runs, 1):
            log(f"[{i}/{len(settings.runs)}] {spec.name} ...")
            result = await run_one(procs, session, spec, settings)
            m = result["summary"]
            share = "—" if m["slow_share"] is None else f"{m['slow_share']:.0%}"
            log(
                f"    slow share {share}, p50 {fmt_s(m['p50'])}, p99 {fmt_s(m['p99'])}, "
                f"errors {m['errors']}/{m['requests']}, client lag p99 "
                f"{fmt_s(m['client_lag_p99'])}, {m['wall']:.0f} s"
            )
            results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    fc_python = sys.executable
    problem = envs.fc_controller_problem(Path(fc_python))
    if problem:
        log(f"fc-controller cannot be imported by {fc_python}: {problem}")
        return 2
    methods, fc_default = fc_dispatch_methods(fc_python)
    if args.policies is None:
        fc_policies = list(BASE_POLICIES) + [m for m in methods if m not in BASE_POLICIES]
    else:
        fc_policies = args.policies
    unknown = [p for p in fc_policies if p not in methods]
    if unknown:
        log(f"fc-controller does not offer {unknown}; its --help lists {methods}")
        return 2
    fastchat_python = None
    if not args.no_fastchat:
        try:
            fastchat_python = fastchat_venv()
        except envs.BenchEnvError as exc:
            log(f"could not prepare FastChat 0.2.36's venv ({exc}); rerun with --no-fastchat")
            return 2
    logdir = Path(tempfile.mkdtemp(prefix="dispatch-quality-"))
    settings = Settings(
        rate=args.rate,
        duration=args.duration,
        seed=args.seed,
        request_timeout=args.request_timeout,
        fc_python=fc_python,
        fc_args=shlex.split(args.fc_args),
        fc_default=fc_default,
        fastchat_python=fastchat_python,
        logdir=logdir,
    )
    settings.runs = plan(args, fc_policies, fc_default)
    log(
        f"{len(settings.runs)} runs of {args.duration:g} s at {args.rate:g} req/s; "
        f"fc dispatch methods {fc_policies} (default {fc_default}); logs in {logdir}"
    )
    procs = Processes(logdir)
    ok = False
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(run_all(settings, procs))
        ok = True
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        log(f"interrupted; logs kept in {logdir}")
        return 130
    finally:
        procs.kill_all()
        if ok and not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)

    judged = checks(results, fc_default)
    report = {
        "machine": machine_info(),
        "command": " ".join(["python", "benchmarks/dispatch_quality.py", *(argv or sys.argv[1:])]),
        "settings": {
            "rate": args.rate,
            "duration": args.duration,
            "seed": args.seed,
            "slots": SLOTS,
            "service_times_skewed": list(SKEWED),
            "service_times_equal": list(EQUAL),
            "messages": MESSAGES,
            "fc_args": settings.fc_args,
            "fc_default": fc_default,
            "fc_methods": methods,
        },
        "runs": results,
        "checks": judged,
    }
    for scenario, title in (
        ("skewed", "One worker 4x slower (0.8 s vs 0.2 s), 4 slots each, all speed 1"),
        ("equal", "Equal workers (all 0.2 s)"),
    ):
        if any(r["spec"]["scenario"] == scenario for r in results):
            print(f"\n### {title}: {args.rate:g} req/s Poisson for {args.duration:g} s\n")
            print(table(results, scenario))
    if judged:
        print("\nTargets:\n" + render_checks(judged))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    log(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Instructions per request and per chunk, counted by valgrind: a CPU figure that does not swing.

CPU time per request on a small shared machine moves by tens of percent from one run to the
next (see compare.py's spreads), which hides differences of a few percent. The number of
instructions a process executes for the same work does not depend on what else the machine
is doing: run under valgrind's callgrind, the controller's instruction count for the same
requests repeats to within about one percent.

Each figure is a difference of two runs of the same server, one with ``--small`` units of work
and one with ``--large``: start-up, the first requests and shutdown cancel out, and what is left
divided by the extra units is the cost of one unit (one ``/get_worker_address`` request, or one
relayed chunk of a stream). A run under callgrind is about fifty times slower than a normal one,
so the figures are small counts of work, and background tasks (expiry, load polls) show up in
them a little more than at full speed.

Targets:
- ``ours``: ``python -m controller`` run from each ``--tree`` (default: this working tree), so
  two revisions compare by checking the older one out with ``git worktree add``;
- ``ours-tokens``: the same with client and worker tokens on, the client sending its token;
- ``bare``: ``bare_app.py``, the least an aiohttp app can do for ``/get_worker_address``.

Scenarios: ``dispatch`` (``/get_worker_address``, 16 concurrent clients) and ``stream``
(``/worker_generate_stream`` through the controller to ``bench_worker.py``, 64 concurrent
streams; the bare app has no stream). Run it with the Python that has this project installed,
e.g. ``.venv/bin/python benchmarks/instructions.py --scenario dispatch --target ours --target
bare``. Needs ``valgrind``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
MODEL = "bench-model"
TOKEN_CLIENT = "instr-client-token"
TOKEN_WORKER = "instr-worker-token"
DISPATCH_CONCURRENCY = 16
STREAM_CONCURRENCY = 64
STREAM_TOKENS = 32
#: units of work of the short and the long run, per scenario
#: what is counted: "instructions" (callgrind) or "syscalls" (strace -c)
COUNTER: dict[str, Any] = {"name": "instructions", "streams": STREAM_CONCURRENCY}
DEFAULT_UNITS = {"dispatch": (300, 1300), "stream": (2048, 8192)}  # stream: see --streams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(argv: list[str], cwd: Path, out: Path, env: dict[str, str]) -> Iterator[None]:
    """Run ``argv`` under callgrind; on exit, stop it with SIGINT and wait for its count."""
    if COUNTER["name"] == "syscalls":
        cmd = ["strace", "-f", "-c", "-o", f"{out}.log", *argv]
    else:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"]
        cmd += argv
    with open(f"{out}.out", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield
    finally:
        # strace writes its summary once its child is gone: signal the child itself.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        pids = children.read_text().split() if COUNTER["name"] == "syscalls" else []
        for pid in pids or [str(proc.pid)]:
            os.kill(int(pid), signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def collected(out: Path) -> int:
    log = Path(f"{out}.log" if COUNTER["name"] == "syscalls" else f"{out}.out")
    text = log.read_text(errors="replace")
    if COUNTER["name"] == "syscalls":
        # strace -c's summary: the last line is the total, its calls in the fourth column.
        found = [line.split()[3] for line in text.splitlines() if line.endswith(" total")]
    else:
        found = re.findall(r"Collected : (\d+)", text)
    if not found:
        raise RuntimeError(f"no count in {log}:\n{text[-2000:]}")
    return int(found[-1])


async def wait_up(session: aiohttp.ClientSession, base: str) -> None:
    for _ in range(1200):
        try:
            async with session.get(f"{base}/test_connection") as r:
                await r.read()
                return
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{base} did not come up")


async def drive(base: str, scenario: str, units: int, worker: str | None, token: str | None) -> int:
    """Send ``units`` of work; return the units done (requests, or chunks received)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await wait_up(session, base)
        if worker is not None:
            await register(session, base, worker, token is not None)
        if scenario == "dispatch":
            return await dispatch_load(session, base, units, headers)
        return await stream_load(session, base, units, headers)


async def register(session: aiohttp.ClientSession, base: str, worker: str, tokens: bool) -> None:
    headers = {"Authorization": f"Bearer {TOKEN_WORKER}"} if tokens else {}
    body = {"worker_name": worker, "check_heart_beat": False}
    async with session.post(f"{base}/register_worker", json=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"registration failed: {r.status} {await r.text()}")


async def dispatch_load(
    session: aiohttp.ClientSession, base: str, units: int, headers: dict[str, str]
) -> int:
    left = units
    body = json.dumps({"model": MODEL}).encode()

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(f"{base}/get_worker_address", data=body, headers=headers) as r:
                answer = await r.json()
                if not answer.get("address"):
                    raise RuntimeError(f"no address in {answer}")

    await asyncio.gather(*(client() for _ in range(DISPATCH_CONCURRENCY)))
    return units


async def stream_load(
    session: aiohttp.ClientSession, base: str, units: int, headers: dict[str, str]
) -> int:
    streams = max(1, units // STREAM_TOKENS)
    left = streams
    chunks = 0
    body = json.dumps({"model": MODEL, "prompt": "hi"}).encode()

    async def client() -> None:
        nonlocal left, chunks
        while left > 0:
            left -= 1
            url = f"{base}/worker_generate_stream"
            async with session.post(url, data=body, headers=headers) as r:
                data = await r.read()
                got = data.count(b"\0")
                if got != STREAM_TOKENS:
                    raise RuntimeError(f"stream gave {got} chunks: {data[-300:]!r}")
                chunks += got

    await asyncio.gather(*(client() for _ in range(COUNTER["streams"])))
    return chunks


def controller_argv(python: str, port: int, tokens: bool, tmp: Path) -> list[str]:
    argv = [python, "-m", "controller", "--host", "127.0.0.1", "--port", str(port)]
    if tokens:
        (tmp / "api").write_text(TOKEN_CLIENT + "\n")
        (tmp / "worker").write_text(TOKEN_WORKER + "\n")
        argv += ["--api-token-file", str(tmp / "api"), "--worker-token-file", str(tmp / "worker")]
    return argv


def count(
    target: str, tree: Path, scenario: str, units: int, tmp: Path, worker_port: int | None
) -> tuple[int, int]:
    """(instructions, units done) of one run of ``target`` with ``units`` of work."""
    port = free_port()
    out = tmp / f"cg.{target}.{scenario}.{units}.{port}"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if target == "bare":
        argv = [sys.executable, str(HERE / "bare_app.py"), "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--address", "http://127.0.0.1:9"]
        cwd = HERE
    else:
        argv = controller_argv(sys.executable, port, target == "ours-tokens", tmp)
        cwd = tree
    token = TOKEN_CLIENT if target == "ours-tokens" else None
    worker = f"http://127.0.0.1:{worker_port}" if worker_port and target != "bare" else None
    with server(argv, cwd, out, env):
        done = asyncio.run(drive(f"http://127.0.0.1:{port}", scenario, units, worker, token))
    return collected(out), done


@contextmanager
def bench_worker() -> Iterator[int]:
    port = free_port()
    argv = [sys.executable, str(HERE / "bench_worker.py"), "--port", str(port)]
    argv += ["--model", MODEL, "--tokens", str(STREAM_TOKENS), "--delay-ms", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready"
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def per_unit(
    target: str, tree: Path, scenario: str, args: argparse.Namespace, tmp: Path, worker: int
) -> float:
    """Instructions per unit of work: the difference of a short and a long run."""
    small, large = DEFAULT_UNITS[scenario]
    if scenario == "stream":
        # Every stream open at once in the short run, four rounds of them in the long one.
        small, large = args.streams * STREAM_TOKENS, 4 * args.streams * STREAM_TOKENS
    i1, u1 = count(target, tree, scenario, args.small or small, tmp, worker)
    i2, u2 = count(target, tree, scenario, args.large or large, tmp, worker)
    return (i2 - i1) / (u2 - u1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", action="append", choices=["dispatch", "stream"])
    parser.add_argument("--target", action="append", choices=["ours", "ours-tokens", "bare"])
    parser.add_argument(
        "--tree",
        action="append",
        type=Path,
        help="a checkout of this repository to run as `ours` (repeatable; default: this one)",
    )
    parser.add_argument(
        "--small",
        type=int,
        help="units of work of the short run (default: 300 requests, 2048 chunks)",
    )
    parser.add_argument(
        "--large",
        type=int,
        help="units of work of the long run (default: 1300 requests, 8192 chunks)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="measure each figure this often")
    parser.add_argument(
        "--count",
        choices=["instructions", "syscalls"],
        default="instructions",
        help="instructions (valgrind) or system calls (strace), which the first leaves out",
    )
    parser.add_argument(
        "--streams", type=int, default=STREAM_CONCURRENCY, help="concurrent streams (default: 64)"
    )
    args = parser.parse_args(argv)
    COUNTER["name"] = args.count
    COUNTER["streams"] = args.streams
    tool = "strace" if args.count == "syscalls" else "valgrind"
    if shutil.which(tool) is None:
        print(f"instructions.py needs {tool} (apt-get install {tool})", file=sys.stderr)
        return 1
    scenarios = args.scenario or ["dispatch", "stream"]
    targets = args.target or ["ours", "bare"]
    trees = args.tree or [HERE.parent]
    rows: list[tuple[str, str, str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmpdir, bench_worker() as worker_port:
        tmp = Path(tmpdir)
        for scenario in scenarios:
            for target in targets:
                if target == "bare" and scenario != "dispatch":
                    continue
                for tree in [HERE.parent] if target == "bare" else trees:
                    figures = [
                        per_unit(target, tree, scenario, args, tmp, worker_port)
                        for _ in range(args.repeat)
                    ]
                    label = target if target == "bare" else f"{target} @ {tree}"
                    unit = "request" if scenario == "dispatch" else "chunk"
                    rows.append((scenario, label, unit, figures))
                    shown = ", ".join(f"{f:,.1f}" for f in figures)
                    print(f"  {scenario:8} {label}: {shown}", flush=True)
    print()
    print(f"| scenario | target | {args.count} per unit (runs) | unit |")
    print("|---|---|---:|---|")
    for scenario, label, unit, figures in rows:
        shown = " / ".join(f"{f:,.1f}" for f in figures)
        print(f"| {scenario} | {label} | {shown} | {unit} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's plumbing (stdlib only): processes in their own groups, free ports, JSON
over HTTP, command-line flags. Shared by ``run.py`` and the scenario modules it imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = [
    "BenchError",
    "Processes",
    "flags",
    "free_port",
    "http_json",
    "registration",
    "wait_until_up",
]


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says why."""


# ------------------------------------------------------------------------------ processes


class Processes:
    """Every process the benchmark starts, each in its own process group, so all can be
    killed on any exit path."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.live: list[subprocess.Popen[bytes]] = []
        self._serial = 0

    def log_path(self, name: str) -> Path:
        self._serial += 1
        return self.logdir / f"{self._serial:03d}-{name}.log"

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        cores: str | None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stdout: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        if cores is not None:
            cmd = ["taskset", "-c", cores, *cmd]
        path = stdout or self.log_path(name)
        with open(path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if stdout is None else out,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        proc.args = cmd
        proc.log_path = path  # type: ignore[attr-defined]
        self.live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], *, grace: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds (0: at once)."""
        if proc in self.live:
            self.live.remove(proc)
        if proc.poll() is None and grace > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        # Always sweep the group: a server may have left children behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def stop_all(self) -> None:
        for proc in list(self.live):
            self.stop(proc, grace=1.0)

    def run_measured(
        self, name: str, cmd: list[str], *, cores: str | None, timeout: float
    ) -> tuple[str, float, float]:
        """Run a tool to completion; returns (output, its CPU seconds, wall seconds).

        CPU comes from the kernel's rusage for that child (wait4), so it is exact.
        """
        path = self.log_path(name)
        started = time.monotonic()
        proc = self.start(name, cmd, cores=cores, stdout=path)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                self.stop(proc, grace=0)
                raise BenchError(f"{name} ran longer than {timeout:.0f}s; log: {path}")
            time.sleep(0.02)
        self.live.remove(proc)
        wall = time.monotonic() - started
        output = path.read_text(errors="replace")
        if proc.returncode != 0:
            tail = "\n".join(output.strip().splitlines()[-10:])
            raise BenchError(f"{name} exited {proc.returncode}:\n{tail}")
        return output, usage.ru_utime + usage.ru_stime, wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_json(
    url: str, payload: Any = None, *, timeout: float = 10.0, token: str | None = None
) -> Any:
    """POST ``payload`` as JSON (or GET when it is None) and decode the JSON answer;
    ``token`` goes as a bearer token."""
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{url} exited {proc.returncode} while starting; see its log")
        with contextlib.suppress(OSError, ValueError):
            if http_json(f"{url}/test_connection", timeout=1.0) == "success":
                return
        time.sleep(0.05)
    raise BenchError(f"{url} did not answer /test_connection within {timeout:.0f}s")


def flags(*positional: str, **options: object) -> list[str]:
    """Command-line arguments: ``foo_bar=1`` becomes ``--foo-bar 1``; a list repeats the flag."""
    out = list(positional)
    for key, value in options.items():
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            out += [f"--{key.replace('_', '-')}", v if isinstance(v, str) else json.dumps(v)]
    return out


def registration(name: str, models: list[str], *, check_heart_beat: bool = False) -> object:
    return {
        "worker_name": name,
        "check_heart_beat": check_heart_beat,
        "worker_status": {"model_names": models, "speed": 1, "queue_length": 0},
    }

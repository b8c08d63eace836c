"""Helpers for the interoperability tests: the FastChat environment, processes, polling.

Everything here runs in the project's own interpreter. FastChat's code runs only in child
processes started with the interpreter of a separate virtual environment (see
``ensure_fastchat_venv``), so the project never imports FastChat or its dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

INTEROP_DIR = Path(__file__).resolve().parent
REPO_ROOT = INTEROP_DIR.parents[1]
REQUIREMENTS = INTEROP_DIR / "requirements.txt"
WORKER_SCRIPT = INTEROP_DIR / "fastchat_worker.py"

FASTCHAT_REQUIREMENT = "fschat==0.2.36"
#: the FastChat modules the suite runs; importing them all proves the environment works
FASTCHAT_MODULES = (
    "fastchat.serve.controller",
    "fastchat.serve.base_model_worker",
    "fastchat.serve.openai_api_server",
    "fastchat.serve.register_worker",
    "fastchat.serve.test_throughput",
)
#: where the FastChat environment is kept between runs, unless FC_INTEROP_CACHE says otherwise
DEFAULT_CACHE = REPO_ROOT / ".interop-venv"

SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
CONTROLLER_NO_WORKER = 50005
CONTROLLER_WORKER_TIMEOUT = 50006

#: what the fake model in fastchat_worker.py answers to everything, word by word
FAKE_REPLY = "Hello from the fake model."
#: the context length the fake worker reports from /model_details
FAKE_CONTEXT_LEN = 2048
#: the model name the fake workers serve unless a test asks for others
MODEL = "fake-model"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class FastChatUnavailable(Exception):
    """The FastChat environment could not be built (typically: no package index)."""


# -- the FastChat virtual environment ----------------------------------------------------


def _venv_python(venv: Path) -> Path:
    if sys.platform == "win32":  # pragma: no cover
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _environment_key() -> str:
    """Names what the environment must hold: the pins, FastChat and this interpreter."""
    digest = hashlib.sha256()
    digest.update(REQUIREMENTS.read_bytes())
    digest.update(FASTCHAT_REQUIREMENT.encode())
    digest.update(f"{sys.implementation.name}-{sys.version_info[:2]}".encode())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` so concurrent test runs build one environment."""
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run_checked(argv: Sequence[str | Path], what: str, cwd: Path, timeout: float) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    try:
        done = subprocess.run(
            [str(a) for a in argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FastChatUnavailable(f"{what} did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        tail = "\n".join([line for line in lines if not line.startswith("WARNING:")][-10:])
        raise FastChatUnavailable(f"{what} failed (exit status {done.returncode}):\n{tail}")


def ensure_fastchat_venv(cache: Path | None = None) -> Path:
    """Build (once) a virtual environment with FastChat 0.2.36; return its interpreter.

    The environment lives under ``cache`` in a directory named after the pinned
    requirements and this interpreter's version, and is reused while those stay the same.
    A marker file written last says the build completed, so an interrupted build is redone.
    Raises ``FastChatUnavailable`` when the packages cannot be installed.
    """
    cache = cache if cache is not None else Path(os.environ.get("FC_INTEROP_CACHE", DEFAULT_CACHE))
    cache.mkdir(parents=True, exist_ok=True)
    key = _environment_key()
    venv = cache / f"venv-{key}"
    marker = venv / "fc-interop-ready"
    python = _venv_python(venv)
    with _locked(cache / "lock"):
        if marker.is_file() and python.exists():
            return python
        for stale in cache.glob("venv-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory() as scratch:
            cwd = Path(scratch)
            _run_checked([sys.executable, "-m", "venv", venv], "creating a virtualenv", cwd, 120)
            pip: list[str | Path] = [python, "-m", "pip", "install", "--quiet", "--timeout", "60"]
            _run_checked([*pip, "-r", REQUIREMENTS], "installing FastChat's dependencies", cwd, 600)
            # FastChat's declared requirements include much that the modules used here never
            # import (and some of it cannot be installed without a GPU stack).
            _run_checked([*pip, "--no-deps", FASTCHAT_REQUIREMENT], "installing fschat", cwd, 300)
            imports = "; ".join(f"import {m}" for m in FASTCHAT_MODULES)
            _run_checked([python, "-c", imports], "importing FastChat's modules", cwd, 120)
        marker.write_text(key + "\n")
    return python


# -- processes ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def clean_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without settings that would change what a child does."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FASTCHAT_", "SSL_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


@attrs.define(eq=False)
class Service:
    """A long-running child process in its own process group, logging to a file.

    ``stop_signal`` is what ``stop()`` sends first; a process still alive ``STOP_TIMEOUT``
    seconds later gets SIGKILL. The whole group is signalled, so nothing it started is left.
    """

    name: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    stop_signal: signal.Signals = signal.SIGTERM
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.cwd / f"{self.name}.out"

    def start(self) -> Service:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def send_signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the process group (if the process is still there)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or ``None`` if the process is still running after ``timeout``."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, signum: signal.Signals | None = None, timeout: float = STOP_TIMEOUT) -> int:
        """Stop the process (and its group) and reap it; returns its exit status."""
        process = self.process
        if process is None:
            raise RuntimeError(f"{self.name} was never started")
        self.send_signal(signum if signum is not None else self.stop_signal)
        status = self.wait(timeout)
        if status is None:
            self.send_signal(signal.SIGKILL)
            status = process.wait()
        # Children left in the group (there should be none) must not outlive the test.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return status

    def kill(self) -> int:
        """SIGKILL the process group, as a crash or an operator's kill -9 would."""
        return self.stop(signal.SIGKILL)

    def output(self) -> str:
        """Everything the process wrote to stdout/stderr so far, plus FastChat's log files."""
        parts = []
        for path in sorted(self.cwd.glob("*")):
            if path.is_file() and path.suffix in (".out", ".log"):
                text = path.read_text(errors="replace")
                parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts)

    def fastchat_log(self) -> str:
        """What FastChat's loggers wrote to their log files (each line once)."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.cwd.glob("*.log")))

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


# -- plain blocking HTTP, for fixtures that start processes -------------------------------


def http_call(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """One blocking HTTP request; (status, body). Raises OSError when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def wait_until(
    predicate: Callable[[], bool],
    what: str,
    *,
    timeout: float = START_TIMEOUT,
    service: Service | None = None,
) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` (and the service's log) if not.

    Gives up at once when ``service`` has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass
        if service is not None and not service.running:
            raise AssertionError(
                f"{service.name} exited with status {service.returncode} before {what}:\n"
                f"{service.tail()}"
            )
        if time.monotonic() > deadline:
            log = f":\n{service.tail()}" if service is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}{log}")
        time.sleep(0.05)


def answers(method: str, url: str, expected: Callable[[int, bytes], bool]) -> Callable[[], bool]:
    """A predicate for ``wait_until``: ``url`` answers and ``expected`` likes the answer."""

    def check() -> bool:
        status, body = http_call(method, url, timeout=2.0)
        return expected(status, body)

    return check


# -- polling in async tests --------------------------------------------------------------


async def eventually(
    predicate: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
) -> float:
    """Await ``predicate`` until it returns true; returns the seconds it took.

    Connection errors count as "not yet". Fails the test after ``timeout`` seconds.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        try:
            if await predicate():
                return time.monotonic() - start
        except (aiohttp.ClientError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        await asyncio.sleep(interval)


async def consistently(
    predicate: Callable[[], Awaitable[bool]],
    duration: float,
    what: str,
    *,
    interval: float = 0.1,
) -> None:
    """Check that ``predicate`` holds at every poll for ``duration`` seconds.

    For behaviour that is defined by time passing (a worker that must *not* expire), where
    waiting is the point of the test rather than a stand-in for synchronisation.
    """
    deadline = time.monotonic() + duration
    while True:
        assert await predicate(), f"no longer true: {what}"
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(interval)


async def post_json(
    http: aiohttp.ClientSession, url: str, body: Any = None, *, timeout: float = 10.0
) -> tuple[int, Any]:
    """POST ``body`` as JSON; (status, decoded JSON body or the text if it is not JSON)."""
    async with http.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        raw = await r.read()
    try:
        return r.status, json.loads(raw)
    except ValueError:
        return r.status, raw.decode(errors="replace")


async def list_models(http: aiohttp.ClientSession, controller: str) -> list[str]:
    status, body = await post_json(http, f"{controller}/list_models")
    assert status == 200, body
    models: list[str] = body["models"]
    return sorted(models)


async def worker_address(http: aiohttp.ClientSession, controller: str, model: str) -> str:
    status, body = await post_json(http, f"{controller}/get_worker_address", {"model": model})
    assert status == 200, body
    address: str = body["address"]
    return address


async def stream_messages(
    http: aiohttp.ClientSession, url: str, body: Any, *, timeout: float = 20.0
) -> tuple[bytes, list[dict[str, Any]]]:
    """POST to a NUL-framed stream endpoint; (raw body, decoded messages)."""
    async with http.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        assert r.status == 200, await r.text()
        raw = await r.read()
    return raw, [json.loads(piece) for piece in raw.split(b"\0") if piece]


async def sse_events(
    http: aiohttp.ClientSession, url: str, body: Any, *, timeout: float = 20.0
) -> tuple[str, list[str]]:
    """POST to a server-sent-events endpoint; (content type, the ``data:`` payloads)."""
    async with http.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        assert r.status == 200, await r.text()
        content_type = r.headers.get("Content-Type", "")
        text = (await r.read()).decode()
    assert text.endswith("\n\n"), f"an event stream ends with a blank line: {text[-80:]!r}"
    events = [block for block in text.split("\n\n") if block]
    payloads = []
    for event in events:
        assert event.startswith("data: "), f"not an SSE data line: {event!r}"
        payloads.append(event.removeprefix("data: "))
    return content_type, payloads


# -- the components under test -----------------------------------------------------------

#: the controllers every comparison runs against: ours and FastChat's own
CONTROLLER_KINDS = ("fc", "fastchat")


@attrs.define(eq=False)
class ControllerProc:
    """A controller process: ``kind`` is "fc" (ours) or "fastchat" (FastChat 0.2.36's)."""

    kind: str
    port: int
    service: Service

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@attrs.define(eq=False)
class WorkerProc:
    """A FastChat-code worker (``fastchat_worker.py``) serving the fake model."""

    port: int
    service: Service

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def registrations(self) -> int:
        """How many times the worker registered with its controller, from its own log."""
        return self.service.fastchat_log().count("Register to controller")

    def heartbeats(self) -> int:
        """How many heartbeats the worker has sent, from its own log."""
        return self.service.fastchat_log().count("Send heart beat")


@attrs.define(eq=False)
class ApiServerProc:
    """FastChat's OpenAI-compatible API server."""

    port: int
    service: Service

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _is_success(status: int, body: bytes) -> bool:
    return status == 200 and body.strip() == b'"success"'


def _is_ok(status: int, body: bytes) -> bool:
    return status == 200


@attrs.define(eq=False)
class Launcher:
    """Starts controllers, workers and API servers as processes; ``close()`` stops them all.

    Each process gets its own directory under ``root`` as working directory (FastChat
    writes its log files there) and its output goes to a file in it, so a failing test can
    show what a process said.
    """

    #: ``None`` for a launcher that starts only fc-controllers
    fastchat_python: Path | None
    root: Path
    services: list[Service] = attrs.Factory(list)

    @property
    def python(self) -> str:
        """The FastChat environment's interpreter."""
        if self.fastchat_python is None:
            raise RuntimeError("this launcher starts only fc-controllers: use the launcher fixture")
        return str(self.fastchat_python)

    def _service(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> Service:
        cwd = self.root / f"{len(self.services):02d}-{name}"
        env = {**env, "LOGDIR": str(cwd)}
        service = Service(name, argv, cwd, env, stop_signal)
        self.services.append(service)
        return service

    def controller(
        self,
        kind: str,
        *,
        port: int | None = None,
        expiration: int | None = None,
        args: Sequence[str] = (),
    ) -> ControllerProc:
        """Start a controller of ``kind`` and wait until it answers ``/test_connection``."""
        port = port if port is not None else free_port()
        env = clean_environ()
        if kind == "fc":
            argv = [sys.executable, "-m", "controller", "--host", "127.0.0.1"]
            argv += ["--port", str(port), *args]
            if expiration is not None:
                argv += ["--heart-beat-expiration", str(expiration)]
            # ``-m controller`` must find this checkout whatever the working directory.
            env["PYTHONPATH"] = str(REPO_ROOT)
            service = self._service("fc-controller", argv, env)
        elif kind == "fastchat":
            if args:
                raise ValueError(f"FastChat's controller takes no extra arguments, got {args}")
            argv = [self.python, "-m", "fastchat.serve.controller"]
            argv += ["--host", "127.0.0.1", "--port", str(port)]
            if expiration is not None:
                env["FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION"] = str(expiration)
            # Its expiry thread is not a daemon: SIGTERM stops the server but not the process.
            service = self._service("fastchat-controller", argv, env, signal.SIGKILL)
        else:
            raise ValueError(f"unknown controller kind {kind!r}")
        controller = ControllerProc(kind, port, service)
        self.start_controller(controller)
        return controller

    def start_controller(self, controller: ControllerProc) -> None:
        """(Re)start ``controller``'s process on its port and wait until it answers."""
        controller.service.start()
        wait_until(
            answers("GET", f"{controller.url}/test_connection", _is_success),
            f"{controller.kind} controller on port {controller.port} is up",
            service=controller.service,
        )

    def restart_controller(self, controller: ControllerProc) -> None:
        """Kill ``controller`` (as a crash would) and start a fresh one on the same port."""
        controller.service.kill()
        self.start_controller(controller)

    def worker(
        self,
        controller_url: str,
        *,
        models: Sequence[str] = (MODEL,),
        heart_beat_interval: int = 1,
        register: bool = True,
        token_delay: float = 0.0,
    ) -> WorkerProc:
        """Start a FastChat-code worker; with ``register`` it has registered once it is up."""
        port = free_port()
        argv = [self.python, str(WORKER_SCRIPT), "--port", str(port)]
        argv += ["--controller-address", controller_url, "--model-names", ",".join(models)]
        argv += ["--token-delay", str(token_delay)]
        if not register:
            argv.append("--no-register")
        env = clean_environ({"FASTCHAT_WORKER_HEART_BEAT_INTERVAL": str(heart_beat_interval)})
        worker = WorkerProc(port, self._service("fastchat-worker", argv, env).start())
        wait_until(
            answers("POST", f"{worker.url}/worker_get_status", _is_ok),
            f"the FastChat worker on port {port} is up",
            service=worker.service,
        )
        return worker

    def api_server(self, controller_url: str) -> ApiServerProc:
        """Start FastChat's OpenAI-compatible API server against ``controller_url``."""
        port = free_port()
        argv = [self.python, "-m", "fastchat.serve.openai_api_server"]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        argv += ["--controller-address", controller_url]
        server = ApiServerProc(port, self._service("openai-api-server", argv, clean_environ()))
        server.service.start()
        wait_until(
            answers("GET", f"{server.url}/docs", _is_ok),
            f"the API server on port {port} is up",
            service=server.service,
        )
        return server

    def run_fastchat(
        self, module: str, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a FastChat command-line module to completion; its output is captured."""
        cwd = self.root / f"{len(self.services):02d}-{module.rsplit('.', 1)[-1]}"
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.run(
            [self.python, "-m", module, *args],
            cwd=cwd,
            env=clean_environ({"LOGDIR": str(cwd)}),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def close(self) -> None:
        """Stop every process started, the last started first."""
        errors = []
        for service in reversed(self.services):
            if service.process is None:
                continue
            try:
                service.stop()
            except Exception as e:  # keep stopping the others
                errors.append(f"{service.name}: {e!r}")
        if errors:
            raise RuntimeError("could not stop: " + "; ".join(errors))

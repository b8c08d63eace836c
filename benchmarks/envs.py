"""Create or reuse the benchmark's environments and tools (stdlib only).

- ``benchmarks/.venv-fc``: this repository installed editable; its aiohttp and uvloop also run
  the fake workers and the Python load generators.
- ``benchmarks/.venv-fastchat``: ``fschat==0.2.36`` without its dependencies, plus the few
  packages its controller imports (fastapi, uvicorn, requests, numpy: ``fastchat/__init__``,
  ``fastchat/constants`` and ``fastchat/utils`` import nothing else at module level). The
  versions are pinned to those current when 0.2.36 was released (February 2024). The
  controller uses no pydantic model, so pydantic 2 works.
- ``wrk``: installed with apt-get when missing (needs root).

A venv is updated in place when its stamp (the requirements, the Python version, plus
setup.cfg and pyproject.toml for ours) changes, and rebuilt only when it no longer runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = [
    "FASTCHAT_REPORTED",
    "FASTCHAT_REQUIREMENTS",
    "FC_REPORTED",
    "BenchEnvError",
    "ensure_fastchat_venv",
    "ensure_fc_venv",
    "ensure_wrk",
    "fc_controller_problem",
    "package_versions",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

# The controller's module-level imports, at the versions of fschat 0.2.36's release month.
# fschat itself goes in with --no-deps: its other requirements (tiktoken, rich, httpx, ...)
# are for the CLI, the web UI and the API server, not the controller.
FASTCHAT_REQUIREMENTS = (
    "fastapi==0.109.2",
    "starlette==0.36.3",
    "pydantic==2.6.1",
    "anyio==4.2.0",
    "uvicorn==0.27.1",
    "requests==2.31.0",
    "numpy==1.26.4",
)
FASTCHAT_PACKAGE = "fschat==0.2.36"
# What the report records about each environment.
FASTCHAT_REPORTED = ["fschat", "fastapi", "starlette", "uvicorn", "pydantic", "anyio", "numpy"]
FC_REPORTED = ["fc-controller", "aiohttp", "uvloop", "attrs"]


class BenchEnvError(RuntimeError):
    """An environment or tool the benchmark needs could not be made ready."""


def _log(message: str) -> None:
    print(f"[setup] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], *, cwd: Path | None = None) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
        raise BenchEnvError(f"{' '.join(cmd)} failed ({result.returncode}):\n" + "\n".join(tail))


def _stamp(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _python_version(python: str | Path) -> str:
    """``major.minor`` of an interpreter, or "" when it does not run."""
    try:
        result = subprocess.run(
            [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:  # not there (yet), or not executable
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def _venv(path: Path, stamp: str, base_python: str, installs: list[list[str]]) -> Path:
    """Make the venv at ``path`` hold ``installs``; returns its python.

    The stamp holds the base interpreter's version, not its path, so the same venv is
    reused whichever interpreter of that version the benchmark is started with. A venv
    whose stamp is stale is updated in place (pip install), never deleted, so another
    benchmark using it at the same time keeps working; only a broken one is rebuilt.
    """
    python = path / "bin" / "python"
    stamp_file = path / ".bench-stamp"
    version = _python_version(base_python)
    if not version:
        raise BenchEnvError(f"cannot run {base_python} to build {path.name}")
    stamp = _stamp([stamp, version])
    usable = _python_version(python) == version
    if usable and stamp_file.exists() and stamp_file.read_text() == stamp:
        return python
    if not usable:
        _log(f"creating {path.relative_to(REPO_ROOT)} (one-off, needs the package index)")
        if path.exists():
            shutil.rmtree(path)
        _run([base_python, "-m", "venv", str(path)])
    else:
        _log(f"updating {path.relative_to(REPO_ROOT)}")
    for args in installs:
        _run([str(python), "-m", "pip", "install", "--quiet", *args])
    stamp_file.write_text(stamp)
    return python


def ensure_fc_venv(base_python: str = sys.executable) -> Path:
    """The venv with this repository installed editable; returns its python."""
    stamp = _stamp(
        [
            "fc",
            (REPO_ROOT / "setup.cfg").read_text() if (REPO_ROOT / "setup.cfg").exists() else "",
            (REPO_ROOT / "pyproject.toml").read_text()
            if (REPO_ROOT / "pyproject.toml").exists()
            else "",
        ]
    )
    return _venv(BENCH_DIR / ".venv-fc", stamp, base_python, [["-e", str(REPO_ROOT)]])


def ensure_fastchat_venv(base_python: str = sys.executable) -> Path:
    """The venv with FastChat 0.2.36's controller and just what it imports."""
    stamp = _stamp(["fastchat", FASTCHAT_PACKAGE, *FASTCHAT_REQUIREMENTS])
    python = _venv(
        BENCH_DIR / ".venv-fastchat",
        stamp,
        base_python,
        [list(FASTCHAT_REQUIREMENTS), ["--no-deps", FASTCHAT_PACKAGE]],
    )
    return python


def fc_controller_problem(python: Path) -> str | None:
    """Why fc-controller cannot be benchmarked with ``python``, or None if it can."""
    result = subprocess.run(
        [str(python), "-c", "import controller.cli"],
        capture_output=True,
        text=True,
        check=False,
        cwd=BENCH_DIR,
    )
    if result.returncode == 0:
        return None
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"import controller.cli exited {result.returncode}"


def ensure_wrk() -> str:
    """Path of wrk, installing the Debian package when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchEnvError("wrk is missing: install it (Debian: sudo apt-get install -y wrk)")
    _log("installing wrk with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise BenchEnvError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-500:]}")
    found = shutil.which("wrk")
    if not found:
        raise BenchEnvError("apt-get installed wrk but it is not on PATH")
    return found


def package_versions(python: Path, names: list[str]) -> dict[str, str]:
    """Installed versions of ``names`` in the environment of ``python``."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [str(python), "-c", code, *names], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return {}
    versions: dict[str, str] = json.loads(result.stdout)
    return versions

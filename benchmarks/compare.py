#!/usr/bin/env python3
"""A/B comparison of fc-controller revisions: alternating runs of run.py, one table.

    python3 benchmarks/compare.py BASE HEAD --scenario dispatch --scenario stream
    python3 benchmarks/compare.py HEAD WORKTREE --runs 5         # uncommitted changes as B
    python3 benchmarks/compare.py HEAD~1 HEAD --quick --runs 1 --scenario dispatch  # smoke
    python3 benchmarks/compare.py --report benchmarks/results/compare-latest.json   # reprint

Each revision (any git revision, or ``WORKTREE`` / ``.`` for this working tree as it is,
uncommitted changes and untracked files included) is exported under ``benchmarks/.ab/KEY/src``
(``git archive``, so the repository's worktree list is left alone) and installed, not
editable, with its own requirements into ``benchmarks/.ab/KEY/venv``. KEY is the commit sha,
or ``worktree-`` and a hash of the files, so a venv is reused as long as the code is the same.
Dependencies are constrained to the versions in ``benchmarks/.venv-fc`` where the revision
allows it, so only the controller's code differs between revisions.

Then ``run.py --target ours --ours-python REV_VENV_PYTHON`` runs ``--runs`` times per
revision, alternating A, B, A, B, ...; the harness (run.py, workers, load generators) is this
tree's for every run. The table gives, per figure and revision, the median and the min-max
spread over the runs, the ratio of the medians to the first revision's (A), and a verdict:
"worse" when the median is beyond A's range in the bad direction (above A's max for a cost,
below A's min for a rate), "better" when beyond it in the good direction, else "within spread".

Standard library only, like run.py. Every process it starts is stopped on every exit path,
Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import envs  # noqa: E402
from report import BARE, DIRECT, FASTCHAT, OURS, TARGET_NAMES, saturation_notes  # noqa: E402

AB_DIR = BENCH_DIR / ".ab"
WORKTREE_NAMES = ("WORKTREE", ".")
SCENARIOS = ("dispatch", "heartbeat", "stream", "registry", "slow-worker")
TARGET_ORDER = (OURS, BARE, DIRECT, FASTCHAT)
# Bumped when the way a revision's venv is made changes, so old venvs are rebuilt.
VENV_FORMAT = 1
# How long run.py gets to stop its own processes after SIGTERM before its group is killed.
RUN_GRACE = 60.0


class CompareError(RuntimeError):
    """The comparison cannot go on; the message says why."""


def log(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


def interrupt(signum: int, frame: object) -> None:
    """Signals unwind like Ctrl-C, so every started process is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def ignore_signals() -> None:
    """A second Ctrl-C must not interrupt the clean-up itself."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


# -------------------------------------------------------------------------- child processes


def stop_group(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM the process's group, SIGKILL it after ``grace`` seconds; always sweep it."""
    if proc.poll() is None and grace > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError, OSError):
            # communicate() also drains a pipe the child might block on while stopping.
            proc.communicate(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def run_tool(cmd: list[str], *, cwd: Path | None = None) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; returns (exit status, output).

    The group is killed if we are interrupted meanwhile (pip, for one, starts children).
    """
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate()
    except BaseException:
        ignore_signals()
        stop_group(proc, grace=5.0)
        raise
    return proc.returncode, output


def check_tool(cmd: list[str], *, cwd: Path | None = None) -> str:
    status, output = run_tool(cmd, cwd=cwd)
    if status != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise CompareError(f"{' '.join(cmd)} failed ({status}):\n{tail}")
    return output


def git(*args: str) -> str:
    return check_tool(["git", "-C", str(REPO_ROOT), *args]).strip()


# ------------------------------------------------------------------------------- revisions


@dataclass
class Revision:
    label: str  # A, B, C, ...
    spec: str  # as given on the command line
    sha: str | None  # None: the working tree
    key: str  # directory name under benchmarks/.ab
    title: str
    python: str = ""
    controller_file: str = ""
    code_hash: str = ""  # of the installed controller package
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        where = self.sha[:7] if self.sha else self.key
        if where.startswith(self.spec):
            return f"{self.label} ({self.spec})"
        return f"{self.label} ({self.spec}, {where})"


def worktree_files() -> list[str]:
    """Tracked and untracked, not ignored, files of the working tree that exist."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    names = sorted({n for n in listed.split("\0") if n})
    return [n for n in names if os.path.lexists(REPO_ROOT / n)]


def worktree_hash(files: list[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        path = REPO_ROOT / name
        digest.update(name.encode() + b"\0")
        if path.is_symlink():
            digest.update(b"link\0" + os.readlink(path).encode())
        else:
            digest.update(b"exec\0" if os.access(path, os.X_OK) else b"file\0")
            digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def resolve(spec: str, label: str) -> Revision:
    if spec in WORKTREE_NAMES:
        files = worktree_files()
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=normal")
        title = f"working tree on {head}" + (", uncommitted changes" if dirty else ", clean")
        return Revision(label, spec, None, f"worktree-{worktree_hash(files)[:16]}", title)
    status, output = run_tool(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}"]
    )
    if status != 0:
        raise CompareError(f"{spec!r} is not a commit of {REPO_ROOT}")
    sha = output.strip()
    return Revision(label, spec, sha, sha, git("log", "-1", "--format=%s", sha))


def export(rev: Revision, dest: Path) -> None:
    """The revision's files in ``dest`` (which must not exist yet)."""
    dest.mkdir(parents=True)
    if rev.sha is None:
        for name in worktree_files():
            src, dst = REPO_ROOT / name, dest / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            else:
                shutil.copy2(src, dst)
        return
    archive = dest.parent / "src.tar"
    try:
        git("archive", "--format=tar", "-o", str(archive), rev.sha)
        check_tool(["tar", "-x", "-f", str(archive), "-C", str(dest)])
    finally:
        archive.unlink(missing_ok=True)


def python_version(python: str | Path) -> str:
    status, output = run_tool([str(python), "-c", "import sys; print(sys.version.split()[0])"])
    return output.strip() if status == 0 else ""


def tools_constraints(tools_python: Path) -> str:
    """``pip freeze`` of the tools venv, minus fc-controller itself: the versions the
    revisions' dependencies are held to where their requirements allow."""
    frozen = check_tool(
        [
            str(tools_python),
            "-m",
            "pip",
            "freeze",
            "--exclude-editable",
            "--disable-pip-version-check",
        ]
    )
    lines = []
    for line in frozen.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-")) or "@" in line:
            continue
        if line.split("==")[0].lower().replace("_", "-") == "fc-controller":
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def controller_location(python: Path) -> tuple[str, str]:
    """Where ``python -m controller`` imports from, started as run.py starts it (from an
    empty scratch directory, with our environment); ("", error) when it does not import."""
    code = "import controller, controller.cli; print(controller.__file__)"
    with tempfile.TemporaryDirectory(prefix="fc-compare-") as scratch:
        status, output = run_tool([str(python), "-c", code], cwd=Path(scratch))
    lines = output.strip().splitlines()
    if status != 0:
        return "", lines[-1] if lines else f"exit status {status}"
    return lines[-1], ""


def prepare(rev: Revision, base_python: str, constraints: str) -> None:
    """Export and install ``rev`` under benchmarks/.ab, or reuse what is there."""
    home = AB_DIR / rev.key
    venv = home / "venv"
    python = venv / "bin" / "python"
    stamp = json.dumps(
        {
            "format": VENV_FORMAT,
            "python": python_version(base_python),
            "constraints": hashlib.sha256(constraints.encode()).hexdigest(),
        },
        sort_keys=True,
    )
    stamp_file = home / "stamp.json"
    ready = python.exists() and stamp_file.exists() and stamp_file.read_text() == stamp
    if ready:
        log(f"{rev.label}: reusing {home.relative_to(REPO_ROOT)}")
    else:
        log(f"{rev.label}: installing {rev.spec} into {home.relative_to(REPO_ROOT)}")
        shutil.rmtree(home, ignore_errors=True)
        export(rev, home / "src")
        check_tool([base_python, "-m", "venv", str(venv)])
        constraints_file = home / "constraints.txt"
        constraints_file.write_text(constraints)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        status, output = run_tool([*pip, "--constraint", str(constraints_file), str(home / "src")])
        if status != 0:
            reason = (output.strip().splitlines() or ["?"])[-1]
            note = (
                "its requirements conflict with the tools venv's versions, installed "
                f"unconstrained ({reason})"
            )
            log(f"{rev.label}: {note}")
            (home / "unconstrained.txt").write_text(output)
            check_tool([*pip, str(home / "src")])
        stamp_file.write_text(stamp)
    if (home / "unconstrained.txt").exists():
        rev.notes.append("dependencies installed without the tools venv's versions")
    rev.python = str(python)
    rev.controller_file, problem = controller_location(python)
    if problem:
        raise CompareError(
            f"{rev.spec}: `import controller.cli` fails in {venv} ({problem}); "
            "run.py starts the controller as `python -m controller`"
        )
    if not Path(rev.controller_file).resolve().is_relative_to(venv.resolve()):
        raise CompareError(
            f"{rev.spec}: {python} imports controller from {rev.controller_file}, not from its "
            "venv (PYTHONPATH set?)"
        )
    rev.versions = envs.package_versions(python, envs.FC_REPORTED)
    rev.code_hash = package_hash(Path(rev.controller_file).parent)


def package_hash(package: Path) -> str:
    """Hash of an installed package's files, bytecode caches left out."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(str(path.relative_to(package)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def prune_worktree_copies(keep: set[str]) -> None:
    """Working-tree snapshots are rarely reused: drop those this comparison does not use."""
    for home in AB_DIR.glob("worktree-*"):
        if home.name not in keep:
            shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def ab_lock() -> Iterator[None]:
    """One comparison at a time per tree: they would share venvs and disturb each other."""
    AB_DIR.mkdir(exist_ok=True)
    with open(AB_DIR / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompareError(f"another compare.py is running in this tree ({AB_DIR})") from None
        yield


# ---------------------------------------------------------------------------------- figures

# Kinds of figure: lower is better, higher is better, or only there to show the noise
# (the CPU that processes outside the benchmark took; no verdict).
COST, RATE, CONTEXT = "cost", "rate", "context"
OTHER_CPU = (("other_cpu_util",), "other processes' CPU", CONTEXT)

CPU_PER_REQUEST = ("controller_cpu_us_per_req",)
# (path inside one target's result, label, lower is better)
WRK_FIGURES = (
    (CPU_PER_REQUEST, "CPU µs/request", COST),
    (("req_per_s",), "requests/s", RATE),
    (("p50_ms",), "latency p50 ms", COST),
    (("p99_ms",), "latency p99 ms", COST),
    OTHER_CPU,
)
STREAM_FIGURES = (
    (("controller_cpu_us_per_chunk",), "CPU µs/chunk", COST),
    (("chunks_per_s",), "chunks/s", RATE),
    (("ttfc_ms", "p50"), "TTFC p50 ms", COST),
    (("ttfc_ms", "p99"), "TTFC p99 ms", COST),
    OTHER_CPU,
)
REGISTRY_FIGURES = (
    (("latency_ms", "p50"), "dispatch p50 ms (paced)", COST),
    (("latency_ms", "p99"), "dispatch p99 ms (paced)", COST),
    (("wrk", "controller_cpu_us_per_req"), "CPU µs/request (wrk)", COST),
    (("wrk", "req_per_s"), "requests/s (wrk)", RATE),
    (("bytes_per_worker",), "RSS bytes/worker", COST),
)
SLOW_FIGURES = (
    (("baseline", "latency_ms", "p99"), "others' p99 ms, baseline", COST),
    (("hanging", "latency_ms", "p99"), "others' p99 ms, probe hanging", COST),
    (("hanging", "latency_ms", "max"), "others' max ms, probe hanging", COST),
)


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    kind: str  # COST, RATE or CONTEXT
    order: tuple[int, ...]


def dig(data: Any, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return float(data) if isinstance(data, int | float) and not isinstance(data, bool) else None


def figures_of(results: dict[str, Any]) -> dict[Figure, float]:
    """Every comparable figure of one run.py report's results."""
    out: dict[Figure, float] = {}

    def add(
        scenario: str,
        sub: str,
        target: str,
        data: Any,
        specs: tuple[tuple[tuple[str, ...], str, str], ...],
    ) -> None:
        if target not in TARGET_ORDER:
            return
        for index, (path, label, kind) in enumerate(specs):
            value = dig(data, path)
            if value is None:
                continue
            prefix = "" if target == OURS else f"[{TARGET_NAMES[target]}] "
            where = {
                "stream": f"{sub} streams",
                "registry": f"registry {int(sub or 0):,} workers",
            }.get(scenario, scenario)
            figure = Figure(
                key=".".join([scenario, *([sub] if sub else []), target, *path]),
                label=f"{prefix}{where}: {label}",
                kind=kind,
                order=(
                    TARGET_ORDER.index(target),
                    SCENARIOS.index(scenario),
                    int(sub or 0),
                    index,
                ),
            )
            out[figure] = value

    for scenario in ("dispatch", "heartbeat"):
        for target, data in (results.get(scenario) or {}).items():
            add(scenario, "", target, data, WRK_FIGURES)
        # Within one run, so the machine's noise mostly cancels out of it.
        ours = dig(results.get(scenario), (OURS, *CPU_PER_REQUEST))
        bare = dig(results.get(scenario), (BARE, *CPU_PER_REQUEST))
        if ours is not None and bare:
            figure = Figure(
                key=f"{scenario}.{OURS}.cpu_per_request_over_bare",
                label=f"{scenario}: CPU/request ÷ bare JSON app's (same run)",
                kind=COST,
                order=(0, SCENARIOS.index(scenario), 0, len(WRK_FIGURES)),
            )
            out[figure] = ours / bare
    for level, per_target in (results.get("stream") or {}).items():
        for target, data in per_target.items():
            add("stream", level, target, data, STREAM_FIGURES)
    for target, per_count in (results.get("registry") or {}).items():
        for count, data in per_count.items():
            add("registry", count, target, data, REGISTRY_FIGURES)
    for target, data in (results.get("slow-worker") or {}).items():
        add("slow-worker", "", target, data, SLOW_FIGURES)
    return out


def verdict(base: list[float], median: float, kind: str) -> str:
    if kind == CONTEXT:
        return "-"
    if median > max(base):
        return "worse" if kind == COST else "better"
    if median < min(base):
        return "better" if kind == COST else "worse"
    return "within spread"


def aggregate(revisions: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per figure: each revision's values, median and spread, and the verdict against A."""
    figures: dict[str, Figure] = {}
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for key, item in (run.get("figures") or {}).items():
            figures.setdefault(key, Figure(key, item["label"], item["kind"], tuple(item["order"])))
            values.setdefault(key, {}).setdefault(run["label"], []).append(item["value"])
    base = revisions[0]["label"]
    out = []
    for figure in sorted(figures.values(), key=lambda f: f.order):
        per_rev: dict[str, Any] = {}
        for rev in revisions:
            vals = values[figure.key].get(rev["label"], [])
            per_rev[rev["label"]] = {
                "values": vals,
                "n": len(vals),
                "median": statistics.median(vals) if vals else None,
                "min": min(vals) if vals else None,
                "max": max(vals) if vals else None,
            }
        a = per_rev[base]
        for rev in revisions[1:]:
            r = per_rev[rev["label"]]
            if a["n"] and r["n"]:
                context = figure.kind == CONTEXT
                r["ratio"] = r["median"] / a["median"] if a["median"] and not context else None
                r["verdict"] = verdict(a["values"], r["median"], figure.kind)
            else:
                r["ratio"], r["verdict"] = None, "n/a"
        out.append(
            {
                "key": figure.key,
                "label": figure.label,
                "kind": figure.kind,
                "order": list(figure.order),
                "revisions": per_rev,
            }
        )
    return out


def num(value: float | None) -> str:
    """Three or so significant digits, thousands separated."""
    if value is None:
        return "-"
    size = abs(value)
    spec = ",.0f" if size >= 100 else ".1f" if size >= 10 else ".2f" if size >= 1 else ".3f"
    return format(value, spec)


def percent(value: float | None) -> str:
    """A share of one core."""
    return "-" if value is None else f"{value:.0%}"


def render_table(summary: dict[str, Any]) -> str:
    revisions = summary["revisions"]
    base = revisions[0]["label"]
    runs_of = {rev["label"]: 0 for rev in revisions}
    for run in summary["runs"]:
        if run.get("figures"):
            runs_of[run["label"]] += 1
    headers = ["figure"]
    for index, rev in enumerate(revisions):
        headers.append(f"{rev['label']}: median (min-max)")
        if index:
            headers += [f"{rev['label']}/{base}", f"{rev['label']} vs {base}"]
    rows = []
    for fig in summary["figures"]:
        row = [fig["label"]]
        for index, rev in enumerate(revisions):
            r = fig["revisions"][rev["label"]]
            cell = "-"
            if r["n"]:
                show = percent if fig["kind"] == CONTEXT else num
                cell = f"{show(r['median'])} ({show(r['min'])}-{show(r['max'])})"
                if r["n"] < runs_of[rev["label"]]:
                    cell += f" n={r['n']}"
            row.append(cell)
            if index:
                ratio = r.get("ratio")
                row += ["-" if ratio is None else f"{ratio:.2f}", r.get("verdict") or "n/a"]
        rows.append(row)
    right = {i for i, h in enumerate(headers) if "median" in h or "/" in h}
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    sep = "|" + "|".join(
        ("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)
    )
    return "\n".join([line(headers), sep + "|", *(line(r) for r in rows)])


def format_summary(summary: dict[str, Any]) -> str:
    revisions = summary["revisions"]
    labels = [rev["label"] for rev in revisions]
    done = {label: sum(1 for r in summary["runs"] if r["label"] == label) for label in labels}
    lines = []
    for rev in revisions:
        where = rev["sha"][:7] if rev["sha"] else rev["key"]
        name = rev["spec"] if where.startswith(rev["spec"]) else f"{rev['spec']} ({where})"
        lines.append(f"{rev['label']} = {name}: {rev['title']}")
    order = "".join(r["label"] for r in summary["runs"])
    lines.append(
        f"runs: {', '.join(f'{n} of {label}' for label, n in done.items())}, in the order {order}"
        + ("; QUICK runs" if summary["quick"] else "")
        + f"; scenarios {', '.join(summary['scenarios'])}; targets {', '.join(summary['targets'])}"
        + ("; INTERRUPTED" if summary.get("interrupted") else "")
    )
    lines.append(
        f"median (min-max) over the runs; ratio and verdict against {labels[0]}: worse/better "
        f"when the median lies beyond {labels[0]}'s min-max range; other processes' CPU and "
        "busy before load: shares of one core, to judge the noise"
    )
    lines.append("")
    lines.append(render_table(summary) if summary["figures"] else "(no figures)")
    notes = []
    if min(done.values(), default=0) < 3:
        notes.append("fewer than 3 runs of a revision: its min-max range says little")
    for name in sorted({n for rev in revisions for n in rev["versions"]}):
        seen = {rev["label"]: rev["versions"].get(name, "-") for rev in revisions}
        if len(set(seen.values())) > 1:
            notes.append(
                f"{name} differs: " + ", ".join(f"{label} {v}" for label, v in seen.items())
            )
    for rev in revisions[1:]:
        if rev.get("code_hash") and rev["code_hash"] == revisions[0].get("code_hash"):
            same_deps = rev["versions"] == revisions[0]["versions"]
            notes.append(
                f"{labels[0]} and {rev['label']} install the same controller code"
                + (": their differences are the machine's noise" if same_deps else "")
            )
    for rev in revisions:
        notes += [f"{rev['label']}: {note}" for note in rev["notes"]]
    for run in summary["runs"]:
        tag = f"run {run['index']} ({run['label']})"
        if not run.get("figures"):
            notes.append(f"{tag}: no figures (exit status {run['exit_status']}; log {run['log']})")
        if run.get("notes"):
            notes.append(f"{tag}: " + "; ".join(run["notes"]))
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- runs


def run_once(cmd: list[str], log_path: Path, echo_prefix: str) -> tuple[int, float]:
    """One run.py, its output to ``log_path`` and its progress lines echoed; returns
    (exit status, seconds). On any interruption it gets SIGTERM to stop its processes."""
    started = time.monotonic()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if line.startswith(("[", "  ")):
                    print(f"{echo_prefix}{line}", end="", file=sys.stderr, flush=True)
            proc.wait()
        except BaseException:
            ignore_signals()
            log("stopping run.py and its processes")
            stop_group(proc, grace=RUN_GRACE)
            raise
    return proc.returncode, time.monotonic() - started


def run_record(index: int, label: str, path: Path, log_path: Path, status: int) -> dict[str, Any]:
    record: dict[str, Any] = {
        "index": index,
        "label": label,
        "json": str(path),
        "log": str(log_path),
        "exit_status": status,
        "figures": {},
        "notes": [],
    }
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return record
    results = report.get("results") or {}
    record["figures"] = {
        f.key: {"label": f.label, "kind": f.kind, "order": list(f.order), "value": v}
        for f, v in figures_of(results).items()
    }
    busy = report.get("idle_busy_before_load")
    if isinstance(busy, int | float):
        record["figures"]["machine.idle_busy"] = {
            "label": "machine: busy before any load",
            "kind": CONTEXT,
            "order": [len(TARGET_ORDER), 0, 0, 0],
            "value": float(busy),
        }
    controller_core = (report.get("pinning") or {}).get("controller_cores")
    # The CPU of processes outside the benchmark has its own rows in the table.
    record["notes"] = list(report.get("notes") or []) + saturation_notes(
        results, controller_core, other_cpu=False
    )
    record["elapsed_s"] = report.get("elapsed_s")
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare fc-controller revisions with alternating runs of run.py."
    )
    parser.add_argument(
        "revisions",
        nargs="*",
        metavar="REV",
        help="git revisions, or WORKTREE (also '.') for this working tree as it is; "
        "the first is the baseline (A)",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per revision (default: 5)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="passed to run.py (repeatable; default: dispatch and stream)",
    )
    parser.add_argument(
        "--target",
        action="append",
        choices=(BARE, DIRECT, FASTCHAT),
        help="also run this target in every run (repeatable): its rows show the machine's "
        "noise, since it is the same for every revision; with 'bare', each run's dispatch CPU "
        "per request is also given as a ratio to the bare JSON app's",
    )
    parser.add_argument("--quick", action="store_true", help="passed to run.py (smoke test)")
    parser.add_argument("--no-pin", action="store_true", help="passed to run.py")
    parser.add_argument(
        "--json",
        type=Path,
        default=BENCH_DIR / "results" / "compare-latest.json",
        help="the aggregated figures (default: %(default)s); each run's JSON and log go to a "
        "directory beside it",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter the venvs are created from (default: this one)",
    )
    parser.add_argument(
        "--report", type=Path, metavar="JSON", help="print the table of a saved comparison again"
    )
    args = parser.parse_args(argv)
    if args.report is None:
        if len(args.revisions) < 2:
            parser.error("give at least two revisions (or --report JSON)")
        if args.runs < 1:
            parser.error("--runs must be at least 1")
    args.scenario = args.scenario or ["dispatch", "stream"]
    args.target = [OURS, *dict.fromkeys(args.target or [])]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        print(format_summary(json.loads(args.report.read_text())))
        return 0
    if sys.platform != "linux":
        print("run.py reads /proc and uses taskset: Linux only", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    json_path: Path = args.json.absolute()
    run_dir = json_path.parent / f"{json_path.stem}-{stamp}"
    summary: dict[str, Any] = {
        "command": " ".join(["python3", "benchmarks/compare.py", *(argv or sys.argv[1:])]),
        "started": stamp,
        "quick": args.quick,
        "runs_per_revision": args.runs,
        "scenarios": args.scenario,
        "targets": args.target,
        "run_dir": str(run_dir),
        "revisions": [],
        "runs": [],
        "figures": [],
        "interrupted": False,
    }
    revisions: list[Revision] = []
    try:
        with ab_lock():
            try:
                labels = [chr(ord("A") + i) for i in range(len(args.revisions))]
                revisions = [resolve(s, lb) for s, lb in zip(args.revisions, labels, strict=True)]
                tools_python = envs.ensure_fc_venv(args.python)
                envs.ensure_wrk()
                if FASTCHAT in args.target:
                    envs.ensure_fastchat_venv(args.python)
                constraints = tools_constraints(tools_python)
                for rev in revisions:
                    prepare(rev, args.python, constraints)
                prune_worktree_copies({rev.key for rev in revisions})
            except (CompareError, envs.BenchEnvError) as e:
                log(str(e))
                return 2
            summary["revisions"] = [asdict(rev) for rev in revisions]
            for rev in revisions:
                log(f"{rev.name}: {rev.title}; controller from {rev.controller_file}")
            status = measure(args, revisions, run_dir, summary)
    except KeyboardInterrupt:
        ignore_signals()
        summary["interrupted"] = True
        log("interrupted")
        status = 130
    except CompareError as e:
        log(str(e))
        return 2
    if not summary["runs"]:
        return status
    summary["figures"] = aggregate(summary["revisions"], summary["runs"])
    summary["elapsed_s"] = time.monotonic() - started
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print()
    print(format_summary(summary))
    print()
    print(f"aggregate written to {json_path}; each run's JSON and log in {run_dir}")
    print(f"took {summary['elapsed_s'] / 60:.1f} min")
    return status


def measure(
    args: argparse.Namespace, revisions: list[Revision], run_dir: Path, summary: dict[str, Any]
) -> int:
    """The alternating runs; each record is appended to ``summary['runs']`` as it ends."""
    run_dir.mkdir(parents=True, exist_ok=True)
    order = [rev for _ in range(args.runs) for rev in revisions]
    failed = 0
    durations: list[float] = []
    for index, rev in enumerate(order, start=1):
        path = run_dir / f"{index:02d}-{rev.label}.json"
        log_path = path.with_suffix(".log")
        cmd = [sys.executable, "-u", str(BENCH_DIR / "run.py"), "--python", args.python]
        for target in args.target:
            cmd += ["--target", target]
        for scenario in args.scenario:
            cmd += ["--scenario", scenario]
        cmd += ["--ours-python", rev.python, "--json", str(path)]
        cmd += ["--quick"] * args.quick + ["--no-pin"] * args.no_pin
        left = ""
        if durations:
            minutes = statistics.mean(durations) * (len(order) - index + 1) / 60
            left = f", about {minutes:.0f} min left" if minutes >= 1 else ", under a minute left"
        log(f"run {index}/{len(order)}: {rev.name}{left}")
        status, seconds = run_once(cmd, log_path, "    ")
        durations.append(seconds)
        if status == 2:
            raise CompareError(f"run.py could not set up (exit status 2); see {log_path}")
        if status == 130:
            raise KeyboardInterrupt("run.py was interrupted")
        record = run_record(index, rev.label, path, log_path, status)
        record["seconds"] = seconds
        summary["runs"].append(record)
        if status != 0 or not record["figures"]:
            failed += 1
            log(f"run {index} ({rev.label}) exited {status}; see {log_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Turn a benchmark report (the JSON that run.py writes) into the summary table.

    python3 benchmarks/report.py benchmarks/results/latest.json   # print the table again

Stdlib only. The targets and their pass/fail rules live here, in ``build_table``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FASTCHAT = "fastchat"
OURS = "ours"
#: fc-controller with a token file per role; the load sends the client role's token
OURS_TOKENS = "ours-tokens"
DIRECT = "direct"
#: benchmarks/bare_app.py: parses the JSON body, answers a fixed address (dispatch only)
BARE = "bare"
TARGET_NAMES = {
    FASTCHAT: "FastChat 0.2.36",
    OURS: "fc-controller",
    OURS_TOKENS: "fc-controller, tokens on",
    BARE: "bare JSON app",
    DIRECT: "direct",
}
#: the table's columns, in order
COLUMNS = (FASTCHAT, OURS, OURS_TOKENS, BARE, DIRECT)
#: fc-controller's dispatch CPU per request may be at most this many times the bare app's
BARE_CPU_RATIO = 1.1


@dataclass
class Row:
    figure: str
    cells: dict[str, str]
    target: str = ""
    verdict: str = ""


@dataclass
class Check:
    name: str
    target: str
    value: float | None
    limit: float | None
    passed: bool | None


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def judge(
    checks: list[Check],
    name: str,
    target: str,
    value: float | None,
    limit: float | None,
    *,
    at_most: bool,
) -> str:
    if value is None or limit is None:
        checks.append(Check(name, target, value, limit, None))
        return "n/a"
    passed = value <= limit if at_most else value >= limit
    checks.append(Check(name, target, value, limit, passed))
    return "PASS" if passed else "FAIL"


def build_table(report: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    """The rows of the summary table and the pass/fail checks against the targets."""
    rows: list[Row] = []
    checks: list[Check] = []
    results = report["results"]
    workload = report["workload"]

    def cells(per_kind: dict[str, Any], fn: Callable[[Any], str]) -> dict[str, str]:
        """One cell per target: ``fn`` of that target's figures, '-' where they are missing."""
        out: dict[str, str] = {}
        for kind in COLUMNS:
            try:
                out[kind] = fn(per_kind[kind])
            except (KeyError, TypeError):
                out[kind] = "-"
        return out

    def check(name: str, target: str, value: Any, limit: Any, *, at_most: bool) -> str:
        return judge(checks, name, target, value, limit, at_most=at_most)

    def latency(r: dict[str, Any]) -> str:
        return f"{r['latency_ms']['p50']:.2f} / {r['latency_ms']['p99']:.2f}"

    def load(r: dict[str, Any]) -> str:
        return f"{percent(r['loadgen_cpu_util'])} / {percent(r['other_cpu_util'])}"

    for scenario, label in (
        ("dispatch", "`/get_worker_address`"),
        ("heartbeat", "`/receive_heart_beat`"),
    ):
        d = results.get(scenario)
        if not d:
            continue
        fc_rps = get(d, FASTCHAT, "req_per_s")
        fc_cpu = get(d, FASTCHAT, "controller_cpu_us_per_req")
        rows += [
            Row(
                f"{label} req/s, {workload['wrk_connections']} conns",
                cells(d, lambda r: f"{r['req_per_s']:,.0f}"),
                ">= 5x FastChat",
                check(
                    f"{scenario} req/s",
                    ">= 5x FastChat",
                    get(d, OURS, "req_per_s"),
                    fc_rps and fc_rps * 5,
                    at_most=False,
                ),
            ),
            Row(
                f"{label} latency p50 / p99 ms",
                cells(d, lambda r: f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}"),
            ),
            Row(
                f"{label} controller CPU us/request",
                cells(d, lambda r: f"{r['controller_cpu_us_per_req']:.0f}"),
                "<= 1/5 FastChat",
                check(
                    f"{scenario} CPU/request",
                    "<= FastChat/5",
                    get(d, OURS, "controller_cpu_us_per_req"),
                    fc_cpu and fc_cpu / 5,
                    at_most=True,
                ),
            ),
            Row(f"{label} wrk CPU / other CPU", cells(d, load)),
        ]
        ours_cpu = get(d, OURS, "controller_cpu_us_per_req")
        bare_cpu = get(d, BARE, "controller_cpu_us_per_req")
        if bare_cpu is not None:
            ratio_cells = dict.fromkeys(COLUMNS, "-")
            if ours_cpu is not None and bare_cpu:
                ratio_cells[OURS] = f"{ours_cpu / bare_cpu:.2f}x"
            rows.append(
                Row(
                    f"{label} CPU/request / bare JSON app's",
                    ratio_cells,
                    f"<= {BARE_CPU_RATIO}x bare JSON app",
                    check(
                        f"{scenario} CPU/request vs bare JSON app",
                        f"<= {BARE_CPU_RATIO} x bare JSON app",
                        ours_cpu,
                        bare_cpu * BARE_CPU_RATIO,
                        at_most=True,
                    ),
                )
            )

    for level, d in (results.get("stream") or {}).items():
        name = f"{level} streams"
        direct_rate = get(d, DIRECT, "chunks_per_s")
        direct_p99 = get(d, DIRECT, "ttfc_ms", "p99")
        fc_cpu = get(d, FASTCHAT, "controller_cpu_us_per_chunk")
        is_top = level == str(max(workload["stream_concurrency"]))
        rows += [
            Row(
                f"{name}: chunks/s",
                cells(d, lambda r: f"{r['chunks_per_s']:,.0f}"),
                ">= 95% of direct" if is_top else "",
                check(
                    f"{name} chunks/s",
                    ">= 0.95 x direct",
                    get(d, OURS, "chunks_per_s"),
                    direct_rate and direct_rate * 0.95,
                    at_most=False,
                )
                if is_top
                else "",
            ),
            Row(
                f"{name}: TTFC p50 / p99 ms",
                cells(d, lambda r: f"{r['ttfc_ms']['p50']:.1f} / {r['ttfc_ms']['p99']:.1f}"),
                "p99 <= direct + 5 ms",
                check(
                    f"{name} TTFC p99",
                    "<= direct + 5 ms",
                    get(d, OURS, "ttfc_ms", "p99"),
                    direct_p99 and direct_p99 + 5,
                    at_most=True,
                ),
            ),
            Row(
                f"{name}: controller CPU us/chunk",
                cells(d, lambda r: f"{r['controller_cpu_us_per_chunk']:.0f}"),
                "<= 1/5 FastChat",
                check(
                    f"{name} CPU/chunk",
                    "<= FastChat/5",
                    get(d, OURS, "controller_cpu_us_per_chunk"),
                    fc_cpu and fc_cpu / 5,
                    at_most=True,
                ),
            ),
            Row(
                f"{name}: worker CPU us/chunk",
                cells(d, lambda r: f"{r['worker_cpu_us_per_chunk']:.0f}"),
            ),
            Row(f"{name}: loadgen CPU / other CPU", cells(d, load)),
            Row(
                f"{name}: bad streams / errors",
                cells(d, lambda r: f"{r['streams_bad']} / {r['errors']}"),
            ),
        ]

    reg = results.get("registry") or {}
    if reg:
        sizes = [int(n) for n, _ in workload["registry_sizes"]]
        small, big = str(sizes[0]), str(sizes[-1])

        def at(count: str) -> dict[str, Any]:
            return {kind: sizes[count] for kind, sizes in reg.items() if count in sizes}

        def wrk_cost(r: dict[str, Any]) -> str:
            w = r["wrk"]
            return f"{w['req_per_s']:,.0f}, {w['controller_cpu_us_per_req']:.0f}"

        def growth(sizes: dict[str, Any]) -> str:
            ratio = sizes[big]["latency_ms"]["p99"] / sizes[small]["latency_ms"]["p99"]
            return f"{ratio:.1f}x"

        paced_rate = f"{workload['paced_rate']:.0f}/s"
        for count in sizes:
            rows.append(
                Row(
                    f"registry {count:,} workers: dispatch p50 / p99 ms ({paced_rate})",
                    cells(at(str(count)), latency),
                )
            )
        ours_small = get(reg, OURS, small, "latency_ms", "p99")
        rows.append(
            Row(
                f"registry: p99 at {int(big):,} / p99 at {int(small):,}",
                cells(reg, growth),
                "<= 2x",
                check(
                    f"registry p99 at {big} vs {small}",
                    "<= 2x",
                    get(reg, OURS, big, "latency_ms", "p99"),
                    ours_small and ours_small * 2,
                    at_most=True,
                ),
            )
        )
        for count in sizes:
            rows.append(
                Row(
                    f"registry {count:,} workers: req/s, CPU us/request (wrk)",
                    cells(at(str(count)), wrk_cost),
                )
            )
        for count in sizes:
            is_big = str(count) == big
            rows.append(
                Row(
                    f"registry {count:,} workers: RSS bytes/worker",
                    cells(at(str(count)), lambda r: f"{r['bytes_per_worker']:,.0f}"),
                    "<= 2 KiB" if is_big else "",
                    check(
                        f"registry bytes/worker at {big}",
                        "<= 2048",
                        get(reg, OURS, big, "bytes_per_worker"),
                        2048.0,
                        at_most=True,
                    )
                    if is_big
                    else "",
                )
            )

    slow = results.get("slow-worker") or {}
    if slow:
        base_p99 = get(slow, OURS, "baseline", "latency_ms", "p99")
        rows += [
            Row(
                "slow worker: others' dispatch p50 / p99 ms, baseline",
                cells(slow, lambda r: latency(r["baseline"])),
            ),
            Row(
                "slow worker: same, one status probe hanging",
                cells(slow, lambda r: latency(r["hanging"])),
                "p99 <= 1.5x baseline + 1 ms",
                check(
                    "slow-worker p99",
                    "<= 1.5 x baseline + 1 ms",
                    get(slow, OURS, "hanging", "latency_ms", "p99"),
                    base_p99 and base_p99 * 1.5 + 1,
                    at_most=True,
                ),
            ),
            Row(
                "slow worker: max ms, one status probe hanging",
                cells(slow, lambda r: f"{r['hanging']['latency_ms']['max']:,.0f}"),
            ),
        ]
    return rows, checks


def render(rows: list[Row], present: list[str]) -> str:
    headers = ["figure", *(TARGET_NAMES[k] for k in present), "target (fc-controller)", "result"]
    table = [[r.figure, *(r.cells[k] for k in present), r.target, r.verdict] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    right = set(range(1, 1 + len(present)))

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(headers), sep, *(line(r) for r in table)])


def saturation_notes(
    results: dict[str, Any], controller_core: str | None, *, other_cpu: bool = True
) -> list[str]:
    """Notes on measurements whose load side may have been the bottleneck, that had errors or,
    unless ``other_cpu`` is false, that processes outside the benchmark disturbed."""
    notes: list[str] = []

    def visit(label: str, r: dict[str, Any]) -> None:
        util = r.get("loadgen_cpu_util")
        if isinstance(util, float) and util > 0.85:
            notes.append(
                f"{label}: the load generator used {util:.0%} of a core; it may be the bottleneck"
            )
        busy = r.get("core_busy") or {}
        for core, value in busy.items():
            if core != controller_core and value > 0.95:
                notes.append(
                    f"{label}: load core {core} was {value:.0%} busy; "
                    "workers or load generator may be the bottleneck"
                )
        other = r.get("other_cpu_util")
        if other_cpu and isinstance(other, float) and other > 0.10:
            notes.append(
                f"{label}: processes outside the benchmark used {other:.0%} of a core "
                "meanwhile; this figure is disturbed"
            )
        bad = (r.get("streams_bad") or 0) + (r.get("errors") or 0)
        if bad:
            notes.append(f"{label}: {bad} bad streams or failed requests: {r.get('error_samples')}")

    for scenario in ("dispatch", "heartbeat"):
        for kind, r in (results.get(scenario) or {}).items():
            visit(f"{scenario} / {TARGET_NAMES[kind]}", r)
    for level, data in (results.get("stream") or {}).items():
        for kind, r in data.items():
            visit(f"{level} streams / {TARGET_NAMES[kind]}", r)
    for kind, data in (results.get("registry") or {}).items():
        for count, r in data.items():
            visit(f"registry {count} / {TARGET_NAMES[kind]}", r)
    for kind, data in (results.get("slow-worker") or {}).items():
        for phase in ("baseline", "hanging"):
            r = data[phase]
            if not r.get("errors"):
                visit(f"slow worker {phase} / {TARGET_NAMES[kind]}", r)
            else:
                notes.append(
                    f"slow worker / {TARGET_NAMES[kind]} / {phase}: "
                    f"{data[phase]['errors']} requests failed or timed out "
                    "(counted in the latencies at the time they failed)"
                )
    return notes


#: the hostile scenario's targets: the loop held at most this long, the normal traffic's
#: p99 at most this many times the quiet row's
HOSTILE_LAG_MS = 100.0
HOSTILE_P99_RATIO = 2.0


def hostile_table(hostile: dict[str, Any]) -> tuple[str, list[Check]]:
    """The hostile scenario's table (one row per attack) and its checks."""
    checks: list[Check] = []
    rows = hostile["rows"]
    quiet = next((r for r in rows if r["attack"] == "quiet"), None)
    base_dispatch = get(quiet, "dispatch_ms", "p99")
    base_ttfc = get(quiet, "ttfc_ms", "p99")

    def ratio(value: float | None, base: float | None) -> float | None:
        return None if value is None or not base else value / base

    def versus(value: float | None, base: float | None) -> str:
        shown = fmt(value, ".1f")
        r = ratio(value, base)
        return shown if r is None else f"{shown} ({r:.1f}x)"

    headers = [
        "attack",
        "what the attacker saw",
        "loop lag max ms",
        "dispatch p99 ms (x quiet)",
        "TTFC p99 ms (x quiet)",
        *(["floor: dispatch p99 ms (x quiet)"] if hostile.get("floor") else []),
        "peak RSS MiB",
        "peak fds",
        "result",
    ]
    table: list[list[str]] = []
    for row in rows:
        name = row["attack"]
        dispatch = get(row, "dispatch_ms", "p99")
        ttfc = get(row, "ttfc_ms", "p99")
        verdict = ""
        if name != "quiet":
            verdicts = [
                judge(
                    checks,
                    f"hostile {name}: loop lag",
                    f"< {HOSTILE_LAG_MS:.0f} ms",
                    row["loop_lag_ms"],
                    HOSTILE_LAG_MS,
                    at_most=True,
                ),
                judge(
                    checks,
                    f"hostile {name}: dispatch p99 / quiet",
                    f"<= {HOSTILE_P99_RATIO:g}x",
                    ratio(dispatch, base_dispatch),
                    HOSTILE_P99_RATIO,
                    at_most=True,
                ),
                judge(
                    checks,
                    f"hostile {name}: TTFC p99 / quiet",
                    f"<= {HOSTILE_P99_RATIO:g}x",
                    ratio(ttfc, base_ttfc),
                    HOSTILE_P99_RATIO,
                    at_most=True,
                ),
            ]
            verdict = "FAIL" if "FAIL" in verdicts else "n/a" if "n/a" in verdicts else "PASS"
        attacker = row.get("attacker") or {}
        seen = attacker.get("seen") or row.get("label", "")
        for phase, lag in (attacker.get("phase_lag_ms") or {}).items():
            seen += f"; loop lag during the {phase} {lag:.0f} ms"
        table.append(
            [
                name,
                seen,
                f"{row['loop_lag_ms']:.0f}",
                versus(dispatch, base_dispatch),
                versus(ttfc, base_ttfc),
                *(
                    [versus(get(row, "floor", "dispatch_ms", "p99"), base_dispatch)]
                    if hostile.get("floor")
                    else []
                ),
                fmt(row.get("peak_rss_mib"), ".0f"),
                str(row.get("peak_fds", "-")),
                verdict,
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    notes: list[str] = []
    for row in rows:
        floor = ratio(get(row, "floor", "dispatch_ms", "p99"), base_dispatch)
        if floor is not None and floor > HOSTILE_P99_RATIO:
            notes.append(
                f"hostile {row['attack']}: aimed at the stand-in, not the controller, the "
                f"attack alone took the normal traffic's dispatch p99 to {floor:.1f}x quiet: "
                "on this machine the load side misses the target by itself"
            )
        late = get(row, "dispatch_schedule_lag_ms", "p99")
        if late is not None and late > 20:
            notes.append(
                f"hostile {row['attack']}: the dispatch generator itself sent its requests "
                f"up to {late:.0f} ms late (p99): the load core was short of CPU"
            )
        if row.get("dispatch_errors") or row.get("stream_errors") or row.get("streams_bad"):
            notes.append(
                f"hostile {row['attack']}: {row.get('dispatch_errors')} failed dispatches, "
                f"{row.get('streams_bad')} bad streams, {row.get('stream_errors')} stream "
                f"errors: {row.get('dispatch_error_samples')} {row.get('stream_error_samples')}"
            )

    lines = [
        f"hostile: targets loop lag < {HOSTILE_LAG_MS:.0f} ms and p99 <= "
        f"{HOSTILE_P99_RATIO:g}x quiet; {hostile['window_s']:g} s windows, "
        f"{hostile['paced_rate']:.0f} dispatches/s and {hostile['streams']} streams; "
        f"controller flags: {' '.join(hostile['controller_flags'])}",
        "",
        line(headers),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *(line(r) for r in table),
    ]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines), checks


def format_report(report: dict[str, Any]) -> tuple[str, list[Check]]:
    """The printable summary of ``report`` (header, table, notes) and the checks."""
    rows, checks = build_table(report)
    present = [k for k in COLUMNS if any(r.cells[k] != "-" for r in rows)]
    m = report["machine"]
    pins = report["pinning"]
    lines = [
        f"{m['nproc']} cores, {m['cpu_model']}, Python {m['python']}, kernel {m['kernel']}; "
        + (
            f"controller pinned to core {pins['controller_cores']}, "
            f"workers and load to {pins['load_cores']}"
            if pins["controller_cores"] is not None
            else "no core pinning"
        )
        + ("; QUICK run" if report["quick"] else "")
        + f"; busy before any load: {report.get('idle_busy_before_load', 0):.0%} of a core",
    ]
    hostile = report["results"].get("hostile")
    if rows or not hostile:
        lines += ["", render(rows, present) if rows else "(no figures)"]
    if hostile:
        text, more = hostile_table(hostile)
        lines += ["", text]
        checks += more
    notes = report["notes"] + saturation_notes(report["results"], pins["controller_cores"])
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines), checks


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: report.py RESULTS.json", file=sys.stderr)
        return 2
    text, _ = format_report(json.loads(Path(argv[0]).read_text()))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

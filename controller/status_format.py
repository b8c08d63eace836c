"""The status views on the wire and on screen: the ``/api/workers`` and ``/api/models``
documents (both ways, so ``fc-controller status`` reads what the controller writes), the
table cells the status page and the terminal share, and the terminal's table itself.

The documents' schema is in docs/status.md; their field names are a contract for tools.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from .decisions.overview import ModelView, State, WorkerView, by_model, summarize

__all__ = [
    "MODEL_COLUMNS",
    "WORKER_COLUMNS",
    "About",
    "age",
    "model_cells",
    "models_document",
    "parse_workers_document",
    "text_report",
    "worker_cells",
    "worker_items",
    "workers_document",
]


@attrs.frozen
class About:
    """The controller a view was taken from, and when."""

    version: str
    dispatch_method: str
    #: seconds of silence after which a worker that heartbeats is dropped
    heart_beat_expiration: float
    #: when the view was taken, in seconds since the epoch
    time: float

    def as_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "dispatch_method": self.dispatch_method,
            "heart_beat_expiration": self.heart_beat_expiration,
            "time": self.time,
        }

    def headline(self) -> str:
        """One line saying which controller this is and how it dispatches."""
        return (
            f"fc-controller {self.version}, dispatch {self.dispatch_method}, heartbeat "
            f"expiration {self.heart_beat_expiration:g} s, as of "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.time))}"
        )


# -- documents -----------------------------------------------------------------------------


def _encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def worker_items(workers: Sequence[WorkerView]) -> bytes:
    """``workers`` as the JSON objects of an ``/api/workers`` list, comma-separated (the
    document is assembled from such pieces, each encoded between two yields to the loop)."""
    return _encode([w._asdict() for w in workers])[1:-1]


def workers_document(about: About, items: Iterable[bytes]) -> bytes:
    """The ``/api/workers`` answer, from pieces made by :func:`worker_items`."""
    head = b'{"controller":' + _encode(about.as_json()) + b',"workers":['
    return head + b",".join(piece for piece in items if piece) + b"]}"


def models_document(about: About, models: Sequence[ModelView]) -> bytes:
    """The ``/api/models`` answer."""
    return _encode({"controller": about.as_json(), "models": [m._asdict() for m in models]})


def parse_workers_document(data: Any) -> tuple[About, list[WorkerView]]:
    """Read an ``/api/workers`` answer back; :class:`ValueError` naming what is wrong."""
    try:
        about = data["controller"]
        workers = [
            WorkerView(
                name=str(w["name"]),
                models=tuple(str(m) for m in w["models"]),
                state=State(w["state"]),
                queue_estimate=int(w["queue_estimate"]),
                reported_queue_length=int(w["reported_queue_length"]),
                in_flight=int(w["in_flight"]),
                speed=float(w["speed"]),
                service_time=_optional_float(w["service_time"]),
                heartbeat_age=float(w["heartbeat_age"]),
                expires=bool(w["expires"]),
                failures_in_a_row=int(w["failures_in_a_row"]),
                last_failure_age=_optional_float(w["last_failure_age"]),
                ejected_for=float(w["ejected_for"]),
                multimodal=bool(w["multimodal"]),
            )
            for w in data["workers"]
        ]
        return (
            About(
                str(about["version"]),
                str(about["dispatch_method"]),
                float(about["heart_beat_expiration"]),
                float(about["time"]),
            ),
            workers,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not an /api/workers document ({type(e).__name__}: {e})") from None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# -- cells ---------------------------------------------------------------------------------

WORKER_COLUMNS = ("worker", "state", "queue", "in flight", "speed", "last heartbeat", "failures")
MODEL_COLUMNS = (
    "model",
    "workers",
    "healthy",
    "expiring",
    "ejected",
    "queue",
    "in flight",
    "speed",
)


def age(seconds: float) -> str:
    """A duration for people: ``0.4 s``, ``42 s``, ``3 min 5 s``, ``2 h 5 min``, ``3 d 4 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def worker_cells(w: WorkerView) -> tuple[str, ...]:
    """The cells of one worker's row, under :data:`WORKER_COLUMNS` (not escaped)."""
    state = w.state.value
    if w.state is State.EJECTED:
        state += f" ({age(w.ejected_for)} left)"
    heartbeat = f"{age(w.heartbeat_age)} ago"
    if not w.expires:
        heartbeat += " (never expires)"
    failures = str(w.failures_in_a_row)
    if w.last_failure_age is not None:
        failures += f" (last {age(w.last_failure_age)} ago)"
    return (
        w.name,
        state,
        str(w.queue_estimate),
        str(w.in_flight),
        f"{w.speed:g}",
        heartbeat,
        failures,
    )


def model_cells(m: ModelView) -> tuple[str, ...]:
    """The cells of one model's row, under :data:`MODEL_COLUMNS` (not escaped)."""
    return (
        m.name,
        str(m.workers),
        str(m.healthy),
        str(m.expiring),
        str(m.ejected),
        str(m.queue_estimate),
        str(m.in_flight),
        f"{m.speed:g}",
    )


# -- the terminal ----------------------------------------------------------------------------


def _printable(text: str) -> str:
    # What came over the network never moves the cursor or recolours the terminal.
    return text if text.isprintable() else repr(text)[1:-1]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    cells = [[h.upper() for h in header], *([_printable(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        indent + "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in cells
    ]


def text_report(about: About, workers: Sequence[WorkerView], where: str) -> str:
    """The terminal's view: the controller, a table of models, then each model's workers."""
    models = summarize(workers)
    count = f"{len(workers)} worker{'s' if len(workers) != 1 else ''}"
    lines = [
        _printable(about.headline()),
        f"{_printable(where)}: {count}, {len(models)} model{'s' if len(models) != 1 else ''}",
    ]
    if not models:
        lines.append("No workers are registered.")
        return "\n".join(lines) + "\n"
    lines.append("")
    lines += _table(MODEL_COLUMNS, [model_cells(m) for m in models])
    for model, serving in by_model(workers).items():
        lines += ["", _printable(model)]
        lines += _table(WORKER_COLUMNS, [worker_cells(w) for w in serving], indent="  ")
    return "\n".join(lines) + "\n"

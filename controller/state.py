"""Saving the registry to a file and loading it back, so a restarted controller routes at once.

The file is JSON: a format version, the wall-clock time it was written, and one entry per
worker with what it serves and the wall-clock time of its last heartbeat. Heartbeat times
are saved as wall-clock times because monotonic clocks do not survive a restart.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any

import attrs

from .errors import BadRequestError
from .models import WorkerStatus
from .protocol import parse_worker_status
from .registry import Registry

__all__ = ["SavedWorker", "StateFileError", "dump", "load", "write_atomically"]

FORMAT_VERSION = 1


class StateFileError(ValueError):
    """The state file exists but cannot be used; the message says why."""


@attrs.frozen
class SavedWorker:
    name: str
    status: WorkerStatus
    check_heart_beat: bool
    multimodal: bool
    #: seconds between the worker's last heartbeat and the moment the file was loaded
    silent_for: float


def dump(registry: Registry, wall_now: float) -> bytes:
    """The registry's live workers as the bytes of a state file."""
    mono_now = registry.clock()
    workers = [
        {
            "worker_name": w.name,
            "model_names": list(w.model_names),
            "speed": w.speed,
            "queue_length": w.queue_length,
            "check_heart_beat": w.check_heart_beat,
            "multimodal": w.multimodal,
            "last_heart_beat": wall_now - (mono_now - w.last_heart_beat),
        }
        for w in registry
    ]
    return json.dumps(
        {"version": FORMAT_VERSION, "saved_at": wall_now, "workers": workers}, indent=1
    ).encode()


def load(data: bytes, wall_now: float) -> list[SavedWorker]:
    """Parse a state file; raises :class:`StateFileError` naming the problem."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise StateFileError(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise StateFileError(f"not a version {FORMAT_VERSION} fc-controller state file")
    entries = doc.get("workers")
    if not isinstance(entries, list):
        raise StateFileError("'workers' is not a list")
    return [_entry(i, e, wall_now) for i, e in enumerate(entries)]


def _entry(index: int, entry: Any, wall_now: float) -> SavedWorker:
    where = f"workers[{index}]"
    if not isinstance(entry, dict):
        raise StateFileError(f"{where} is not an object")
    try:
        status = parse_worker_status(entry, where)
    except BadRequestError as e:
        raise StateFileError(str(e)) from None
    name = entry.get("worker_name")
    check = entry.get("check_heart_beat")
    multimodal = entry.get("multimodal")
    beat = entry.get("last_heart_beat")
    if not isinstance(name, str) or not name:
        raise StateFileError(f"{where}.worker_name is not a non-empty string")
    if not isinstance(check, bool) or not isinstance(multimodal, bool):
        raise StateFileError(f"{where}: check_heart_beat and multimodal must be true or false")
    if isinstance(beat, bool) or not isinstance(beat, int | float) or not math.isfinite(beat):
        raise StateFileError(f"{where}.last_heart_beat is not a time")
    return SavedWorker(name, status, check, multimodal, max(0.0, wall_now - beat))


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new, whole.

    Blocking: the controller runs it in a worker thread, file I/O having no non-blocking
    form.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fc-controller-state-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

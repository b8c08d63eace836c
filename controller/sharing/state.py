"""The state file: the registry saved as it changes and loaded at start-up, so a restarted
controller routes at once.

The file is JSON: a format version, the wall-clock time it was written, and one entry per
worker with what it serves and the wall-clock time of its last heartbeat. Heartbeat times
are saved as wall-clock times because monotonic clocks do not survive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import attrs

from ..decisions.changes import MEMBERSHIP
from ..decisions.models import Owner, WorkerInfo, WorkerStatus
from ..decisions.registry import Clock, Registry
from ..errors import BadRequestError, RegistryFullError
from ..protocol import parse_worker_status

__all__ = [
    "SavedWorker",
    "StateFile",
    "StateFileError",
    "dump",
    "encode",
    "load",
    "snapshot",
    "write_atomically",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# Seconds between two state-file writes at most; changes in between are saved together.
STATE_SAVE_DEBOUNCE = 0.5


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
    #: whom the registration belongs to (a principal or a host; never a token)
    owner: Owner | None = None


#: one live worker as the state file needs it, read on the loop: its registration, queue,
#: owner and the wall-clock time of its last heartbeat
Row = tuple[WorkerInfo, int, Owner | None, float]


def snapshot(registry: Registry, wall_now: float) -> list[Row]:
    """What the state file says of the registry's live workers, read without encoding
    anything: a few milliseconds on the loop for 20,000 workers."""
    # Heartbeat times are monotonic; the file keeps them as wall-clock times.
    offset = wall_now - registry.clock()
    return [(w.info, w.load.queue_length, w.owner, w.last_heart_beat + offset) for w in registry]


def encode(rows: list[Row], wall_now: float) -> bytes:
    """The bytes of a state file holding ``rows``, one worker a line.

    A tenth of a second of CPU for 20,000 workers, so the controller runs it in a worker
    thread; each line is one short call of the C encoder, so the loop's thread gets the
    interpreter back within a switch interval while it runs.
    """
    head = json.dumps({"version": FORMAT_VERSION, "saved_at": wall_now})[:-1]
    lines = [
        json.dumps(
            {
                "worker_name": info.name,
                "model_names": list(info.model_names),
                "speed": info.speed,
                "queue_length": queue_length,
                "check_heart_beat": info.check_heart_beat,
                "multimodal": info.multimodal,
                "last_heart_beat": last_heart_beat,
                "owner": None if owner is None else attrs.asdict(owner),
            }
        )
        for info, queue_length, owner, last_heart_beat in rows
    ]
    body = ",".join("\n" + line for line in lines)
    return f'{head}, "workers": [{body}\n]}}\n'.encode()


def dump(registry: Registry, wall_now: float) -> bytes:
    """The registry's live workers as the bytes of a state file."""
    return encode(snapshot(registry, wall_now), wall_now)


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
        # A probe's answer may have set a speed of 0; it is restored as it was.
        status = parse_worker_status(entry, where, allow_zero_speed=True)
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
    return SavedWorker(
        name, status, check, multimodal, max(0.0, wall_now - beat), _owner(where, entry)
    )


def _owner(where: str, entry: dict[str, Any]) -> Owner | None:
    raw = entry.get("owner")
    if raw is None:
        return None
    principal = raw.get("principal") if isinstance(raw, dict) else None
    host = raw.get("host") if isinstance(raw, dict) else None
    if not isinstance(principal, str | None) or not isinstance(host, str | None):
        raise StateFileError(f"{where}.owner must hold a principal or a host")
    try:
        return Owner(principal, host)
    except ValueError as e:
        raise StateFileError(f"{where}.owner: {e}") from None


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


class StateFile:
    """The registry's state file: restored once at start-up, then saved as it changes.

    Saving follows the registry's change feed: a registration, an update or a removal
    wakes it; changes that come in a burst (a fleet registering at once) are saved
    together, at most every ``STATE_SAVE_DEBOUNCE`` seconds. Heartbeats do not wake it,
    but it saves at least every third of the expiration anyway, so the saved heartbeat
    times stay recent enough for a restart to trust them. The file is written in a
    worker thread: file I/O (and fsync) has no non-blocking form.
    """

    def __init__(self, path: str, registry: Registry, wall_clock: Clock = time.time) -> None:
        self.path = path
        self.registry = registry
        self.wall_clock = wall_clock
        self._failed = False
        #: the write in a worker thread last started (it outlives a cancelled save)
        self._writing: asyncio.Future[None] | None = None
        # Subscribed before restore() so the restored workers are saved at once.
        self._changes = registry.feed.subscribe(MEMBERSHIP)

    def restore(self) -> None:
        """Register the workers saved in the file that have not expired meanwhile.

        Reads synchronously: this runs once, while the application starts, before any
        request is served.
        """
        path, registry = self.path, self.registry
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            log.info("No state file at %s yet: starting with an empty registry", path)
            return
        except OSError as e:
            log.warning("Cannot read state file %s (%s): starting with an empty registry", path, e)
            return
        try:
            saved = load(data, self.wall_clock())
        except StateFileError as e:
            log.warning("Ignoring state file %s: %s; starting with an empty registry", path, e)
            return
        now = registry.clock()
        expired = full = 0
        for worker in saved:
            if worker.check_heart_beat and worker.silent_for > registry.expiration:
                expired += 1
                continue
            info = WorkerInfo.from_status(
                worker.name,
                worker.status,
                check_heart_beat=worker.check_heart_beat,
                multimodal=worker.multimodal,
            )
            try:
                registry.register(
                    info,
                    worker.status.queue_length,
                    last_heart_beat=now - worker.silent_for,
                    owner=worker.owner,
                )
            except RegistryFullError:
                # A file saved under a larger --max-workers: the rest register themselves.
                full += 1
        log.info(
            "Restored %d worker(s) from %s (%d had expired meanwhile, %d past --max-workers)",
            len(saved) - expired - full,
            path,
            expired,
            full,
        )

    async def save_forever(self) -> None:
        """Save on every change of membership (see the class docstring) until cancelled."""
        subscription = self._changes
        refresh = min(self.registry.expiration / 3, 30.0)
        try:
            while True:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the
                # result when a change and this task's cancellation come in the same turn,
                # swallowing the cancellation (shutdown then waited the refresh out).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(refresh):
                        await subscription.wait()
                # What changed does not matter: the whole registry is written.
                subscription.take()
                await self.save()
                await asyncio.sleep(STATE_SAVE_DEBOUNCE)
        except asyncio.CancelledError:
            # Only when the controller stops: a run that failed is started again by its
            # supervisor and must find the changes made meanwhile still queued.
            subscription.close()
            raise

    def _write(self, rows: list[Row], wall_now: float) -> None:
        write_atomically(self.path, encode(rows, wall_now))

    async def save(self) -> None:
        """Write the registry now; a failure is logged once until saving works again.

        Only reading the registry happens on the loop; encoding and writing happen in a
        worker thread.
        """
        previous = self._writing
        if previous is not None and not previous.done():
            # A save cancelled while its thread wrote (the saver stopping at shutdown)
            # leaves that write running: it must land before this newer one, not after.
            await asyncio.wait([previous])
        if previous is not None and previous.done() and not previous.cancelled():
            previous.exception()  # its failure was logged by its own save, or never will be
        wall_now = self.wall_clock()
        rows = snapshot(self.registry, wall_now)
        writing = self._writing = asyncio.ensure_future(
            asyncio.to_thread(self._write, rows, wall_now)
        )
        try:
            await asyncio.shield(writing)
        except OSError as e:
            if not self._failed:
                log.warning("Cannot save state file %s: %s", self.path, e)
            self._failed = True
            return
        if self._failed:
            log.info("Saving state file %s works again", self.path)
        self._failed = False

"""What replicas sharing a registry keep in Redis, and how it is written and read.

Per worker one hash, ``fc-controller:worker:<name>``: its registration (models, speed,
whether it heartbeats, multimodal), its owner (a principal or a host, never a token), the
source it registered from, the queue it last reported, the Redis server time of its last
heartbeat, the version of its last change and, for a worker that left, a tombstone flag.
A live hash expires with the heartbeat expiration (never, for ``check_heart_beat: false``);
a tombstone lives one expiration, long enough for any replica's write-back to meet it.

Every change is also appended to one stream, ``fc-controller:changes`` (trimmed to about
``STREAM_LENGTH`` entries), which every replica follows. Both are written by one Lua
script, so the hash and the stream agree and versions are stamped by Redis: a version is
the Redis server time in microseconds when the change reached Redis (or, for changes a
replica made while Redis was unreachable, its estimate of that time), and a write whose
version is not above the stored one is refused, so a write-back never undoes a newer
change, an unregistration included.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import attrs

from ..decisions.changes import ChangeKind
from ..decisions.models import Owner, WorkerInfo

__all__ = [
    "INFLIGHT_PREFIX",
    "PUT_SCRIPT",
    "STREAM",
    "STREAM_LENGTH",
    "WORKER_PREFIX",
    "Entry",
    "decode_entry",
    "encode_data",
    "worker_key",
]

#: every key this controller uses starts so (choose the database to separate deployments)
PREFIX = "fc-controller:"
WORKER_PREFIX = PREFIX + "worker:"
STREAM = PREFIX + "changes"
#: per replica, the requests it sent each worker since that worker's last report
INFLIGHT_PREFIX = PREFIX + "inflight:"
#: changes the stream keeps, about (MAXLEN ~): minutes of heartbeats of a large fleet
STREAM_LENGTH = 100_000

#: KEYS: the worker's hash, the stream. ARGV: name, kind, data, version (0: stamp it now),
#: microseconds since the last heartbeat, the hash's TTL in ms (0: none), the replica,
#: the stream's length, a tombstone's TTL in ms. Returns the version, or 0 if refused.
PUT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = redis.call('HMGET', KEYS[1], 'v', 'x')
local curv = tonumber(cur[1]) or 0
local v = tonumber(ARGV[4])
local kind = ARGV[2]
if v == 0 then
  if cur[2] == '1' and kind ~= 'registered' and kind ~= 'removed' then
    return 0
  end
  v = math.max(now, curv + 1)
elseif v <= curv then
  return 0
end
local vs = string.format('%.0f', v)
local age = tonumber(ARGV[5])
local removed = '0'
if kind == 'removed' then removed = '1' end
redis.call('HSET', KEYS[1], 'n', ARGV[1], 'k', kind, 'v', vs, 'd', ARGV[3],
  'b', string.format('%.0f', now - age), 'x', removed, 'r', ARGV[7])
if removed == '1' then
  redis.call('PEXPIRE', KEYS[1], ARGV[9])
elseif tonumber(ARGV[6]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
else
  redis.call('PERSIST', KEYS[1])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'n', ARGV[1], 'k', kind,
  'v', vs, 'd', ARGV[3], 'a', string.format('%.0f', age), 'r', ARGV[7])
return vs
"""


def worker_key(name: str) -> str:
    return WORKER_PREFIX + name


class Entry(NamedTuple):
    """One worker as another replica (or Redis) tells it."""

    kind: ChangeKind
    version: int
    info: WorkerInfo
    queue_length: int
    owner: Owner | None
    source: str | None
    #: why it was removed (``REMOVED`` only)
    reason: str
    #: seconds between its last heartbeat and the moment Redis took the change
    age: float
    #: the replica that made the change
    replica: str


def encode_data(
    info: WorkerInfo, queue_length: int, owner: Owner | None, source: str | None, reason: str
) -> str:
    """A change's payload: what a replica needs to apply it (never a token)."""
    return json.dumps(
        {
            "models": list(info.model_names),
            "speed": info.speed,
            "check": info.check_heart_beat,
            "multimodal": info.multimodal,
            "queue": queue_length,
            "owner": None if owner is None else attrs.asdict(owner),
            "source": source,
            "reason": reason,
        },
        separators=(",", ":"),
    )


def decode_entry(fields: dict[Any, Any], now_us: int | None = None) -> Entry | None:
    """A stream entry (with ``a``, the age) or a hash (with ``b``, the heartbeat's time;
    ``now_us`` is Redis's time then); ``None`` for anything malformed, which is skipped:
    another program writing into our keys must not stop the replica."""
    try:
        text = {_text(k): _text(v) for k, v in fields.items()}
        data = json.loads(text["d"])
        kind = ChangeKind(text["k"])
        if "a" in text:
            age_us = float(text["a"])
        elif now_us is not None:
            age_us = now_us - float(text["b"])
        else:
            return None
        raw_owner = data.get("owner")
        owner = None if raw_owner is None else Owner(raw_owner["principal"], raw_owner["host"])
        info = WorkerInfo(
            text["n"],
            tuple(str(m) for m in data["models"]),
            float(data["speed"]),
            bool(data["check"]),
            bool(data["multimodal"]),
        )
        source = data.get("source")
        return Entry(
            kind,
            int(text["v"]),
            info,
            int(data["queue"]),
            owner,
            source if isinstance(source, str) else None,
            str(data.get("reason") or ""),
            max(age_us, 0.0) / 1e6,
            text.get("r", ""),
        )
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

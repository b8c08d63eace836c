"""What replicas sharing a registry keep in Redis, and how it is written and read.

Per worker one hash, ``fc-controller:worker:<name>``: its registration (models, speed,
whether it heartbeats, multimodal), its owner (a principal or a host, never a token), the
source it registered from, the queue it last reported, the Redis server time of its last
heartbeat, the version of its last change and, for a worker that left, a tombstone flag.
A live hash expires with the heartbeat expiration (never, for ``check_heart_beat: false``);
a tombstone lives one expiration, long enough for any replica's write-back to meet it.

Every change is also appended to one stream, ``fc-controller:changes`` (trimmed to about
``STREAM_LENGTH`` entries, each one field: see :func:`decode_stream`), which every replica
follows. Both are written by one Lua
script, so the hash and the stream agree and versions are stamped by Redis: a version is
the Redis server time in microseconds when the change reached Redis (or, for changes a
replica made while Redis was unreachable, its estimate of that time), and a write whose
version is not above the stored one is refused, so a write-back never undoes a newer
change, an unregistration included.
"""

from __future__ import annotations

import json
from typing import NamedTuple

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
    "decode_hash",
    "decode_stream",
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

#: KEYS: the stream, then one worker hash per change. ARGV: the replica, the stream's
#: length, a tombstone's TTL in ms, then six per change: name, kind, data, version (0: stamp
#: it now), microseconds since the last heartbeat, the hash's TTL in ms (0: none). Returns
#: per change its version, or 0 where refused. One call writes a whole batch.
PUT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local replica, maxlen, tomb = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 2, #KEYS do
  local key = KEYS[i]
  local a = 4 + (i - 2) * 6
  local name, kind, data = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local v, age, ttl = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local cur = redis.call('HMGET', key, 'v', 'x')
  local curv = tonumber(cur[1]) or 0
  local refused = false
  if v == 0 then
    -- After a removal only a registration brings the name back.
    refused = cur[2] == '1' and kind ~= 'registered' and kind ~= 'removed'
    v = math.max(now, curv + 1)
  else
    refused = v <= curv
  end
  if refused then
    out[i - 1] = 0
  else
    local vs = string.format('%.0f', v)
    local removed = '0'
    if kind == 'removed' then removed = '1' end
    redis.call('HSET', key, 'n', name, 'k', kind, 'v', vs, 'd', data,
      'b', string.format('%.0f', now - age), 'x', removed, 'r', replica)
    if removed == '1' then
      redis.call('PEXPIRE', key, tomb)
    elseif ttl > 0 then
      redis.call('PEXPIRE', key, ttl)
    else
      redis.call('PERSIST', key)
    end
    -- One field: a reader parses a line or two per entry, its own ones included.
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'e', kind .. '\t' .. vs .. '\t'
      .. replica .. '\t' .. string.format('%.0f', age) .. '\t' .. data .. '\t' .. name)
    out[i - 1] = vs
  end
end
return out
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


def decode_stream(fields: dict[str, str], own: str) -> Entry | None:
    """A stream entry (one field ``e``: kind, version, replica, age in µs, data and name,
    tab-separated; the data is JSON, so holds no tab), unless replica ``own`` made it;
    ``None`` too for anything malformed, which is skipped: another program writing into
    our keys must not stop the replica."""
    try:
        kind, version, replica, age, data, name = fields["e"].split("\t", 5)
        if replica == own:
            return None
        return _entry(kind, version, name, data, float(age), replica)
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def decode_hash(fields: dict[str, str], now_us: int) -> Entry | None:
    """A worker's hash, read when Redis's time was ``now_us``; ``None`` if malformed."""
    try:
        age_us = now_us - float(fields["b"])
        return _entry(fields["k"], fields["v"], fields["n"], fields["d"], age_us, fields["r"])
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def _entry(
    kind: str, version: str, name: str, data_text: str, age_us: float, replica: str
) -> Entry:
    data = json.loads(data_text)
    raw_owner = data.get("owner")
    owner = None if raw_owner is None else Owner(raw_owner["principal"], raw_owner["host"])
    info = WorkerInfo(
        name,
        tuple(str(m) for m in data["models"]),
        float(data["speed"]),
        bool(data["check"]),
        bool(data["multimodal"]),
    )
    source = data.get("source")
    return Entry(
        ChangeKind(kind),
        int(version),
        info,
        int(data["queue"]),
        owner,
        source if isinstance(source, str) else None,
        str(data.get("reason") or ""),
        max(age_us, 0.0) / 1e6,
        replica,
    )

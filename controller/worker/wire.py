"""What the heartbeat clients send to a controller and how they read its answers; no I/O.

The bodies are FastChat's (see PROTOCOL.md); ``/unregister_worker`` is this project's
extension. Both clients post these bytes with their own HTTP stack.
"""

from __future__ import annotations

import json
from typing import Any

from .config import HeartbeatConfig
from .tokens import authorization

__all__ = [
    "JSON_HEADERS",
    "BadAnswer",
    "Refused",
    "Unavailable",
    "check_register_answer",
    "describe",
    "headers",
    "heartbeat_request",
    "parse_heartbeat_answer",
    "parse_unregister_answer",
    "register_request",
    "unreachable",
    "unregister_request",
]

JSON_HEADERS = {"Content-Type": "application/json"}


class BadAnswer(Exception):
    """The controller answered, but not with something a controller would say."""


class Refused(BadAnswer):
    """The controller refused the worker's credentials (HTTP 401 or 403)."""


class Unavailable(BadAnswer):
    """The controller, or a proxy in front of it, failed to serve (HTTP 5xx): another
    controller may do better, where a 4xx would be the same anywhere."""


def headers(config: HeartbeatConfig) -> dict[str, str]:
    """The headers of every call to the controller: JSON, and the token if there is one."""
    return {**JSON_HEADERS, **authorization(config.token)}


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def register_request(config: HeartbeatConfig, address: str, queue_length: int) -> tuple[str, bytes]:
    """The URL and body of a ``/register_worker`` call to the controller at ``address``,
    as FastChat's workers send it."""
    body = {
        "worker_name": config.worker_address,
        "check_heart_beat": True,
        "worker_status": {
            "model_names": list(config.model_names),
            # FastChat's workers send the integer 1; keep whole speeds whole.
            "speed": int(config.speed) if float(config.speed).is_integer() else config.speed,
            "queue_length": queue_length,
        },
        "multimodal": config.multimodal,
    }
    return f"{address}/register_worker", _encode(body)


def heartbeat_request(
    config: HeartbeatConfig, address: str, queue_length: int
) -> tuple[str, bytes]:
    """The URL and body of a ``/receive_heart_beat`` call to the controller at ``address``."""
    body = {"worker_name": config.worker_address, "queue_length": queue_length}
    return f"{address}/receive_heart_beat", _encode(body)


def unregister_request(config: HeartbeatConfig, address: str) -> tuple[str, bytes]:
    """The URL and body of the goodbye, ``/unregister_worker``, to the controller at
    ``address``."""
    body = {"worker_name": config.worker_address}
    return f"{address}/unregister_worker", _encode(body)


def _preview(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace").strip()
    return text or "(empty body)"


def _decode(status: int, body: bytes) -> Any:
    if status in (401, 403):
        raise Refused(f"HTTP {status}: {_preview(body)}")
    if 500 <= status <= 599:
        raise Unavailable(f"HTTP {status}: {_preview(body)}")
    if status != 200:
        raise BadAnswer(f"HTTP {status}: {_preview(body)}")
    try:
        return json.loads(body)
    except ValueError:
        raise BadAnswer(f"answer is not JSON: {_preview(body)}") from None


def _flag(status: int, body: bytes, key: str) -> bool:
    data = _decode(status, body)
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, bool):
        raise BadAnswer(f"answer has no true/false {key!r}: {_preview(body)}")
    return value


def check_register_answer(status: int, body: bytes) -> None:
    """Accept the controller's answer to ``/register_worker`` (200 and JSON) or raise."""
    _decode(status, body)


def parse_heartbeat_answer(status: int, body: bytes) -> bool:
    """The ``exist`` flag of an answer to ``/receive_heart_beat``, or ``BadAnswer``."""
    return _flag(status, body, "exist")


def parse_unregister_answer(status: int, body: bytes) -> bool:
    """Whether ``/unregister_worker`` removed the worker, or ``BadAnswer``."""
    return _flag(status, body, "removed")


def describe(error: BaseException, timeout: float) -> str:
    """A short reason for a failed call, for the log."""
    # urllib wraps a timeout in URLError(reason=TimeoutError(...)).
    if isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError):
        return f"no answer within {timeout:g} s"
    return str(error) or type(error).__name__


def unreachable(error: BaseException) -> bool:
    """Whether a call that failed with ``error`` (one the clients expect: no connection, a
    reset, a timeout, an answer) failed for want of this controller, so that another one
    may answer: anything but an answer, or an answer saying it cannot serve now. A refusal
    (401/403) or another bad answer would be the same anywhere: it is not."""
    return isinstance(error, Unavailable) or not isinstance(error, BadAnswer)

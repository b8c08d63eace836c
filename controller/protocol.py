"""The wire contract: request JSON in, models out; models in, response bytes out.

Each parse function takes a body as :func:`controller.jsonbody.read` gives it, with the
fields named here (``DISPATCH``, ``REGISTER``...) decoded, and raises
:class:`~controller.errors.BadRequestError` naming the field and the problem, so handlers
can answer 400 without having touched the registry. All JSON encoding of responses lives
here too.
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.parse
from typing import Any

import attrs
import msgspec

from .decisions.models import WorkerStatus
from .errors import BadRequestError
from .jsonbody import Fields
from .worker.tokens import redact_urls

__all__ = [
    "DISPATCH",
    "HEARTBEAT",
    "NULL",
    "REGISTER",
    "SERVER_ERROR_MSG",
    "STATUS",
    "SUCCESS",
    "WORKER_NAME",
    "RegisterRequest",
    "encode",
    "error_body",
    "error_message",
    "parse_dispatch",
    "parse_heartbeat",
    "parse_register",
    "parse_worker_name",
    "parse_worker_status",
    "status_body",
    "stream_error",
    "worker_name_problem",
    "worker_url",
]

#: the text FastChat's clients show for any controller-side failure, byte for byte
SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"

NULL = b"null"
SUCCESS = b'"success"'

# What a worker may report (issue 15): past these it would draw traffic it cannot serve,
# so a registration or heartbeat claiming more is refused.
MAX_QUEUE_LENGTH = 1_000_000
MAX_SPEED = 10_000
MAX_AFFINITY_KEY = 256
#: model names one registration or status answer may carry (--max-models-per-worker)
MAX_MODELS_PER_WORKER = 1024
#: characters in one model name
MAX_MODEL_NAME = 256
#: the longest worker name accepted, in bytes (issue 15)
MAX_WORKER_NAME = 2048


@attrs.frozen
class RegisterRequest:
    worker_name: str
    check_heart_beat: bool
    #: ``None`` when the worker sent no usable status and must be asked for it
    worker_status: WorkerStatus | None
    multimodal: bool


# -- what each request's parse function reads of its body (see controller.jsonbody) --------

#: /get_worker_address and every request relayed to a worker
DISPATCH = Fields(values=("model", "affinity_key"))


class _UsualDispatch(msgspec.Struct, gc=False):
    """Nearly every DISPATCH body: a string model and no affinity key (a string and a
    None hold no reference cycle, so the garbage collector need not track it)."""

    model: str
    affinity_key: None = None


#: reads the usual DISPATCH body in one call (``jsonbody.read_as``): what
#: ``parse_dispatch(read(raw, DISPATCH))`` gives for it, ``(model, None)``, at a third of
#: the cost; any other body is read that way
USUAL_DISPATCH = msgspec.json.Decoder(_UsualDispatch)

#: /receive_heart_beat
HEARTBEAT = Fields(values=("worker_name", "queue_length"))
#: /unregister_worker
WORKER_NAME = Fields(values=("worker_name",))
#: a worker's status: in a registration and in the answer to a status probe
STATUS = Fields(values=("speed", "queue_length"), lists=("model_names",))
#: /register_worker
REGISTER = Fields(
    values=("worker_name", "check_heart_beat", "multimodal"), objects={"worker_status": STATUS}
)


def _object(data: Any, field: str | None = None) -> dict[str, Any]:
    if not isinstance(data, dict):
        what = "request body" if field is None else "value"
        raise BadRequestError(field, f"{what} must be a JSON object, got {_describe(data)}")
    return data


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        name = "an object"
    elif isinstance(value, list):
        name = "an array"
    elif isinstance(value, str):
        name = "a string"
    elif isinstance(value, int | float):
        name = "a number"
    else:
        name = type(value).__name__
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{name} ({text})" if not isinstance(value, dict | list) else name


def _require(data: dict[str, Any], key: str, field: str | None = None) -> Any:
    if key not in data:
        raise BadRequestError(field or key, "is required")
    return data[key]


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadRequestError(field, f"must be a string, got {_describe(value)}")
    return value


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequestError(field, f"must be true or false, got {_describe(value)}")
    return value


def _count(value: Any, field: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, float) and value.is_integer():
        count = int(value)
    else:
        raise BadRequestError(field, f"must be a whole number, got {_describe(value)}")
    if not 0 <= count <= MAX_QUEUE_LENGTH:
        raise BadRequestError(field, f"must be from 0 to {MAX_QUEUE_LENGTH}, got {count}")
    return count


def _speed(value: Any, field: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequestError(field, f"must be a number, got {_describe(value)}")
    # Compared as a range, not with math.isfinite: an int too large for a float (10**30)
    # would raise OverflowError there. NaN and the infinities fall outside the range.
    above_floor = value >= 0 if allow_zero else value > 0
    if not (above_floor and value <= MAX_SPEED):
        low = "from 0" if allow_zero else "more than 0 and at most"
        raise BadRequestError(field, f"must be {low} {MAX_SPEED:g}, got {value!r}")
    return value


def _worker_url(value: Any, field: str) -> str:
    name = _string(value, field)
    problem = worker_name_problem(name)
    if problem is not None:
        raise BadRequestError(
            field, f"{problem}; it must be the worker's base URL such as 'http://10.0.0.5:21002'"
        )
    return name


# scheme://authority[/path], checked on the raw string: URL libraries drop an empty '?'
# or '#', and normalise what they parse.
_URL_SHAPE = re.compile(r"(?i:https?)://(?P<authority>[^/?#]*)(?P<path>/[^?#]*)?\Z")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?\Z")
_PATH = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*\Z")


def worker_name_problem(name: str) -> str | None:
    """Which rule of a worker's address ``name`` breaks, or ``None``: ``http`` or
    ``https``, a host, an optional port and path prefix; no userinfo, query or fragment;
    ASCII only; at most ``MAX_WORKER_NAME`` bytes. Credentials in the name are never echoed."""
    if _too_long(name):
        return f"must be at most {MAX_WORKER_NAME} bytes"
    shown = redact_urls(name)
    if not name.isascii():
        return "must be ASCII: write an internationalised host in its IDNA form (xn--...)"
    if not name.isprintable() or any(c.isspace() for c in name):
        return f"must not contain spaces or control characters, got {shown!r}"
    if "?" in name:
        return "must not have a query ('?')"
    if "#" in name:
        return "must not have a fragment ('#')"
    shape = _URL_SHAPE.match(name)
    if shape is None:
        return f"must start with http:// or https://, got {shown!r}"
    if "@" in shape["authority"]:
        return "must not carry userinfo (user:password@)"
    host_port = _HOST_PORT.match(shape["authority"])
    if host_port is None:
        return f"must name a host and at most a port after it, got {shown!r}"
    if host_port["host"].startswith("["):
        try:
            ipaddress.IPv6Address(host_port["host"][1:-1])
        except ValueError:
            return f"must hold a valid IPv6 address between brackets, got {shown!r}"
    port = host_port["port"]
    if port is not None and not 0 < int(port) < 65536:
        return f"must have a port from 1 to 65535, got {shown!r}"
    path = shape["path"] or ""
    segments = [urllib.parse.unquote(s) for s in path.split("/")]
    if not _PATH.match(path) or "." in segments or ".." in segments:
        return f"must have a plain path prefix (no '.' or '..' segments), got {shown!r}"
    return None


def parse_worker_status(
    data: Any,
    field: str = "worker_status",
    *,
    allow_zero_speed: bool = False,
    max_models: int = MAX_MODELS_PER_WORKER,
) -> WorkerStatus:
    """Parse ``{model_names, speed, queue_length}`` (also used for probe answers).

    A registration must claim a speed above 0. A worker's answer to a status probe may say
    0 (a child controller with no worker left sums to 0): ``allow_zero_speed``, and
    dispatch treats such a worker as the last choice (shortest_queue) or never picks it
    (lottery).
    """
    obj = _object(data, field)
    names = _model_names(_require(obj, "model_names", f"{field}.model_names"), field, max_models)
    speed = _speed(_require(obj, "speed", f"{field}.speed"), f"{field}.speed", allow_zero_speed)
    queue = _count(_require(obj, "queue_length", f"{field}.queue_length"), f"{field}.queue_length")
    return WorkerStatus(tuple(dict.fromkeys(names)), speed, queue)


def _model_names(names: Any, field: str, max_models: int) -> list[str]:
    """Model names as a registry may hold them: a list of at most ``max_models``, each a
    printable string of 1 to ``MAX_MODEL_NAME`` characters (no control, format or
    bidirectional-override character, which would forge or garble log lines and pages)."""
    where = f"{field}.model_names"
    if not isinstance(names, list):
        raise BadRequestError(where, f"must be a list of strings, got {_describe(names)}")
    # Counted before any name is looked at: a million names is refused at once.
    if len(names) > max_models:
        raise BadRequestError(where, f"must hold at most {max_models} names, got {len(names)}")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            problem = f"must be a list of non-empty strings, got {_describe(name)} at [{i}]"
        elif len(name) > MAX_MODEL_NAME:
            problem = f"names must be at most {MAX_MODEL_NAME} characters, [{i}] has {len(name)}"
        elif not name.isprintable():
            problem = f"names must be printable, [{i}] is {name[:40]!r}"
        else:
            continue
        raise BadRequestError(where, problem)
    return names


def parse_register(data: Any, max_models: int = MAX_MODELS_PER_WORKER) -> RegisterRequest:
    obj = _object(data)
    name = _worker_url(_require(obj, "worker_name"), "worker_name")
    check = _bool(_require(obj, "check_heart_beat"), "check_heart_beat")
    raw_status = obj.get("worker_status")
    # FastChat asks the worker itself when the status is missing, null or empty.
    status = parse_worker_status(raw_status, max_models=max_models) if raw_status else None
    if raw_status is not None and not raw_status and not isinstance(raw_status, dict):
        raise BadRequestError(
            "worker_status", f"must be a JSON object or null, got {_describe(raw_status)}"
        )
    multimodal = obj.get("multimodal")
    return RegisterRequest(
        name, check, status, False if multimodal is None else _bool(multimodal, "multimodal")
    )


def parse_heartbeat(data: Any) -> tuple[str, int]:
    obj = _object(data)
    return _known_name(obj), _count(_require(obj, "queue_length"), "queue_length")


def parse_worker_name(data: Any) -> str:
    return _known_name(_object(data))


def _known_name(obj: dict[str, Any]) -> str:
    """A heartbeat's or goodbye's ``worker_name``: no longer than a registration's may be."""
    name = _string(_require(obj, "worker_name"), "worker_name")
    if _too_long(name):
        raise BadRequestError("worker_name", f"must be at most {MAX_WORKER_NAME} bytes")
    return name


def _too_long(name: str, limit: int = MAX_WORKER_NAME) -> bool:
    """Over ``limit`` bytes: a long name is told by its length, before any copy."""
    return len(name) > limit or len(name.encode("utf-8", "surrogatepass")) > limit


def parse_dispatch(data: Any) -> tuple[str, str | None]:
    """The model a request names, and its optional ``affinity_key`` (our extension)."""
    if type(data) is dict:
        # The usual request, checked on the way: a dict with a string model, no key.
        model = data.get("model")
        if type(model) is str and data.get("affinity_key") is None:
            return model, None
    obj = _object(data)
    model = _string(_require(obj, "model"), "model")
    key = obj.get("affinity_key")
    if key is None:
        return model, None
    key = _string(key, "affinity_key")
    if len(key) > MAX_AFFINITY_KEY:
        # Keys are remembered: long ones would let clients pin memory in the controller.
        raise BadRequestError(
            "affinity_key", f"must be at most {MAX_AFFINITY_KEY} characters, got {len(key)}"
        )
    return model, key


# -- encoding ---------------------------------------------------------------------------


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def error_body(error: BadRequestError) -> bytes:
    return encode({"error": "bad_request", "field": error.field, "message": error.problem})


def status_body(status: WorkerStatus) -> bytes:
    return encode(
        {
            "model_names": list(status.model_names),
            "speed": status.speed,
            "queue_length": status.queue_length,
        }
    )


def error_message(error_code: int) -> bytes:
    """A worker-shaped error answer: what a worker sends when it cannot generate."""
    return encode({"text": SERVER_ERROR_MSG, "error_code": error_code})


def stream_error(error_code: int) -> bytes:
    """One in-band error message of a generation stream, NUL included."""
    return error_message(error_code) + b"\0"


def worker_url(worker_name: str, path: str) -> str:
    """The URL of ``path`` on a worker, whether or not its name ends with a slash."""
    return worker_name.rstrip("/") + path

"""The demo worker's made-up model: request checks, fake text and embeddings; no HTTP.

It answers with the messages and error codes of FastChat's workers, so that what reaches
a controller looks like the real thing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import logging
import math
import random
import struct
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import attrs

from .settings import DemoSettings

__all__ = [
    "SERVER_ERROR_MSG",
    "Drop",
    "InvalidRequest",
    "Plan",
    "conv_template",
    "count_tokens",
    "embedding_inputs",
    "encode_embeddings",
    "fake_embedding",
    "frame",
    "generate",
    "plan_generation",
    "prompt_tokens",
]

log = logging.getLogger(__name__)

# FastChat's wording and codes (fastchat.constants), repeated here so that the worker side
# needs nothing from the server side of the package.
SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
VALIDATION_TYPE_ERROR = 40001
PARAM_OUT_OF_RANGE = 40302
INTERNAL_ERROR = 50001

#: FastChat's default when a request does not say how many tokens it wants
DEFAULT_MAX_NEW_TOKENS = 256
# FastChat's SeparatorStyle.ADD_COLON_SINGLE
_ADD_COLON_SINGLE = 1

# What the demo model says, sentence after sentence, starting where the prompt's hash
# points: the same prompt always gets the same answer.
_SENTENCES = (
    "This is a demo worker, and every word it sends is made up.",
    "Each message carries the whole text so far, followed by a NUL byte.",
    "The controller relays the stream without waiting for the end.",
    "Workers report their queues in heartbeats so that work goes where it is shortest.",
    "A worker that leaves says goodbye, and the controller stops sending it work at once.",
    "Try --token-delay, --hang-after or --fail-after to watch the controller cope.",
)


class InvalidRequest(Exception):
    """A request the model cannot take; ``message()`` is FastChat's in-band answer to it."""

    def __init__(self, message: str, error_code: int = VALIDATION_TYPE_ERROR) -> None:
        super().__init__(message)
        self.error_code = error_code

    def message(self) -> dict[str, Any]:
        return _error_message(self.error_code, str(self))


class Drop(Exception):
    """Raised inside a generation to make the handler drop the connection."""


@attrs.frozen
class Plan:
    """One generation request, checked, with the knobs that apply to it."""

    prompt: str
    max_new_tokens: int
    echo: bool
    stop: tuple[str, ...]
    token_delay: float
    first_token_delay: float
    hang_after: int | None
    fail_after: int | None
    error: bool


def _error_message(error_code: int, detail: str) -> dict[str, Any]:
    return {"text": f"{SERVER_ERROR_MSG}\n\n({detail})", "error_code": error_code}


def _message(
    text: str, prompt_tokens: int, completion_tokens: int, finish_reason: str | None
) -> dict[str, Any]:
    return {
        "text": text,
        "error_code": 0,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "finish_reason": finish_reason,
        "logprobs": None,
    }


def frame(message: Mapping[str, Any]) -> bytes:
    """One message of a stream on the wire."""
    # One JSON object then NUL, after every message including the last (see PROTOCOL.md).
    return json.dumps(message).encode() + b"\0"


def _fake_words(prompt: str) -> Iterator[str]:
    """Endless words of readable sentences, the same ones for the same prompt."""
    first = zlib.crc32(prompt.encode()) % len(_SENTENCES)
    for sentence in itertools.islice(itertools.cycle(_SENTENCES), first, None):
        yield from sentence.split()


def fake_embedding(text: str, dim: int) -> list[float]:
    """A unit vector that depends only on ``text``."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def count_tokens(text: str) -> int:
    """The demo's token count: whitespace-separated words."""
    return len(text.split())


def _find_stop(output: str, stops: tuple[str, ...]) -> int | None:
    positions = [p for p in (output.find(s) for s in stops if s) if p != -1]
    return min(positions) if positions else None


def _get_int(params: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = params.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise InvalidRequest(f"{key} must be a whole number, got {value!r}")
    if value < 0:
        raise InvalidRequest(f"{key} must be at least 0, got {value!r}", PARAM_OUT_OF_RANGE)
    return int(value)


def _get_seconds(params: Mapping[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{key} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and 0 <= value <= 3600):
        raise InvalidRequest(f"{key} must be from 0 to 3600, got {value!r}", PARAM_OUT_OF_RANGE)
    return float(value)


def plan_generation(params: Mapping[str, Any], settings: DemoSettings, rng: random.Random) -> Plan:
    """Check a generation request and decide how it will go; ``InvalidRequest`` if bad."""
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest(f"prompt must be a string, got {prompt!r}")
    wanted = _get_int(params, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    assert wanted is not None
    echo = params.get("echo", True)
    if not isinstance(echo, bool):
        raise InvalidRequest(f"echo must be true or false, got {echo!r}")
    stop = params.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidRequest(f"stop must be a string or a list of strings, got {stop!r}")
    forced_error = params.get("demo_error", False)
    if not isinstance(forced_error, bool):
        raise InvalidRequest(f"demo_error must be true or false, got {forced_error!r}")
    return Plan(
        prompt=prompt,
        max_new_tokens=min(wanted, settings.max_new_tokens_limit),
        echo=echo,
        stop=stops,
        token_delay=_get_seconds(params, "demo_token_delay", settings.token_delay),
        first_token_delay=_get_seconds(
            params, "demo_first_token_delay", settings.first_token_delay
        ),
        hang_after=_get_int(params, "demo_hang_after", settings.hang_after),
        fail_after=_get_int(params, "demo_fail_after", settings.fail_after),
        error=forced_error or rng.random() < settings.error_rate,
    )


async def generate(plan: Plan, stream_interval: int) -> AsyncIterator[dict[str, Any]]:
    """The messages of one generation: cumulative ``text``, the last with
    ``finish_reason`` and ``usage``. Raises ``Drop`` where the connection must drop.
    """
    if plan.error:
        log.info("Answering a generation with an injected error")
        yield _error_message(INTERNAL_ERROR, "demo worker: injected error")
        return
    prefix = plan.prompt if plan.echo else ""
    prompt_tokens = count_tokens(plan.prompt)
    words = _fake_words(plan.prompt)
    generated: list[str] = []
    text = prefix
    finish_reason = "length"
    total = plan.max_new_tokens
    for i in range(total):
        if plan.hang_after == i:
            log.info("Hanging after %d tokens, as told", i)
            await asyncio.get_running_loop().create_future()
        if plan.fail_after == i:
            log.info("Dropping the connection after %d tokens, as told", i)
            raise Drop
        delay = plan.token_delay + (plan.first_token_delay if i == 0 else 0.0)
        if delay:
            await asyncio.sleep(delay)
        generated.append(next(words))
        output = " ".join(generated)
        cut = _find_stop(output, plan.stop)
        if cut is not None:
            output = output[:cut].rstrip()
            finish_reason = "stop"
        text = f"{prefix} {output}" if prefix and output else prefix or output
        if cut is not None or i == total - 1:
            break
        if (i + 1) % stream_interval == 0:
            yield _message(text, prompt_tokens, len(generated), None)
    yield _message(text, prompt_tokens, len(generated), finish_reason)


def embedding_inputs(params: Mapping[str, Any]) -> list[str]:
    """The texts of an embeddings request; ``InvalidRequest`` if there are none."""
    inputs = params.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
        raise InvalidRequest(f"input must be a list of strings, got {inputs!r}")
    return inputs


def encode_embeddings(vectors: list[list[float]], encoding_format: object) -> list[Any]:
    """The vectors as FastChat sends them: lists of floats, or base64 when asked."""
    if encoding_format != "base64":
        return list(vectors)
    # FastChat's base64 form: the float32 bytes of each vector.
    return [
        base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() for vector in vectors
    ]


def prompt_tokens(params: Mapping[str, Any]) -> int:
    """The token count ``/count_token`` answers; ``InvalidRequest`` for a bad prompt."""
    prompt = params.get("prompt")
    if isinstance(prompt, str):
        return count_tokens(prompt)
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return sum(count_tokens(p) for p in prompt)
    raise InvalidRequest(f"prompt must be a string, got {prompt!r}")


def conv_template(name: str) -> dict[str, Any]:
    """A conversation template shaped like FastChat's ``Conversation``.

    FastChat's workers send the dataclass's fields, which its OpenAI-compatible API
    server reads back (``name``, ``sep_style``, ...). ``template_name`` is what
    ``Conversation.dict()`` calls the name, for readers of that form.
    """
    return {
        "name": name,
        "template_name": name,
        "system_template": "{system_message}",
        "system_message": "A chat between a curious user and a demo model that makes up words.",
        "roles": ["USER", "ASSISTANT"],
        "messages": [],
        "offset": 0,
        "sep_style": _ADD_COLON_SINGLE,
        "sep": "\n",
        "sep2": None,
        "stop_str": None,
        "stop_token_ids": None,
    }

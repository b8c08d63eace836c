"""A FastChat-compatible model worker that makes up its answers: ``fc-demo-worker``.

It speaks the whole worker API that FastChat's controller, OpenAI-compatible API server and
web UI use, generates readable fake words at a chosen pace, limits its own concurrency
like a real worker, and registers and heartbeats through ``controller.worker``. Knobs make
it slow, hang or fail, so one can watch a controller cope::

    fc-demo-worker --port 21002 --worker-address http://localhost:21002
    fc-demo-worker --port 21003 --token-delay 0.5 --hang-after 10

Requests may override the knobs for themselves with the body keys ``demo_token_delay``,
``demo_first_token_delay``, ``demo_hang_after``, ``demo_fail_after`` and ``demo_error``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import logging
import math
import os
import random
import struct
import sys
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import attrs
from aiohttp import web

from .worker import (
    DEFAULT_HEART_BEAT_INTERVAL,
    ConcurrencyLimiter,
    HeartbeatClient,
    HeartbeatConfig,
)
from .worker import heart_beat_interval_from_environ as _interval_from_environ
from .worker.runtime import loop_factory, run_until_signalled

__all__ = ["DemoSettings", "DemoWorker", "build_parser", "load_settings", "main"]

log = logging.getLogger(__name__)

# FastChat's wording and codes (fastchat.constants), repeated here so that this module
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


def _nonnegative(inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be at least 0, got {value!r}")


def _positive(inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be more than 0, got {value!r}")


def _optional_count(inst: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be at least 0, got {value!r}")


def _names(value: Sequence[str]) -> tuple[str, ...]:
    names = tuple(value)
    if not names or not all(names):
        raise ValueError(f"model_names must be one or more non-empty names, got {value!r}")
    return names


@attrs.frozen(kw_only=True)
class DemoSettings:
    """Everything that decides how a demo worker behaves. Times are in seconds."""

    host: str = "localhost"
    #: 0 asks the OS for a free port
    port: int = 21002
    #: the URL the controller and clients use to reach this worker; by default
    #: ``http://{host}:{port}`` (``localhost`` for a wildcard host)
    worker_address: str | None = None
    controller_address: str = "http://localhost:21001"
    register: bool = True
    model_names: tuple[str, ...] = attrs.field(default=("demo-model",), converter=_names)
    multimodal: bool = False
    conv_template: str = "demo"
    limit_worker_concurrency: int = attrs.field(default=5, validator=_positive)
    #: send a message every this many tokens
    stream_interval: int = attrs.field(default=1, validator=_positive)
    token_delay: float = attrs.field(default=0.05, validator=_nonnegative)
    #: extra delay before the first token, like a long prompt being read
    first_token_delay: float = attrs.field(default=0.0, validator=_nonnegative)
    #: requests asking for more new tokens get this many
    max_new_tokens_limit: int = attrs.field(default=1024, validator=_nonnegative)
    context_length: int = attrs.field(default=4096, validator=_positive)
    embedding_dim: int = attrs.field(default=16, validator=_positive)
    #: stop sending after this many tokens but keep the connection open
    hang_after: int | None = attrs.field(default=None, validator=_optional_count)
    #: drop the connection after this many tokens
    fail_after: int | None = attrs.field(default=None, validator=_optional_count)
    #: the share of generations answered with an in-band error instead
    error_rate: float = attrs.field(default=0.0, validator=_nonnegative)
    #: seeds the choice of which requests fail under ``error_rate``
    seed: int | None = None
    heart_beat_interval: float = attrs.field(
        default=DEFAULT_HEART_BEAT_INTERVAL, validator=_positive
    )
    #: how long stopping waits for requests in flight before cutting them
    shutdown_timeout: float = attrs.field(default=5.0, validator=_nonnegative)

    def __attrs_post_init__(self) -> None:
        if self.error_rate > 1:
            raise ValueError(f"error_rate must be from 0 to 1, got {self.error_rate!r}")


class _InvalidRequest(Exception):
    def __init__(self, message: str, error_code: int = VALIDATION_TYPE_ERROR) -> None:
        super().__init__(message)
        self.error_code = error_code

    def message(self) -> dict[str, Any]:
        return _error_message(self.error_code, str(self))


class _Drop(Exception):
    """Raised inside a generation to make the handler drop the connection."""


@attrs.frozen
class _Plan:
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


def _frame(message: Mapping[str, Any]) -> bytes:
    # One JSON object then NUL, after every message including the last (see PROTOCOL.md).
    return json.dumps(message).encode() + b"\0"


def _fake_words(prompt: str) -> Iterator[str]:
    """Endless words of readable sentences, the same ones for the same prompt."""
    first = zlib.crc32(prompt.encode()) % len(_SENTENCES)
    for sentence in itertools.islice(itertools.cycle(_SENTENCES), first, None):
        yield from sentence.split()


def _fake_embedding(text: str, dim: int) -> list[float]:
    """A unit vector that depends only on ``text``."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _count_tokens(text: str) -> int:
    return len(text.split())


def _find_stop(output: str, stops: tuple[str, ...]) -> int | None:
    positions = [p for p in (output.find(s) for s in stops if s) if p != -1]
    return min(positions) if positions else None


async def _read_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise _InvalidRequest("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise _InvalidRequest("the request body must be a JSON object")
    return data


def _bad_request(error: _InvalidRequest) -> web.Response:
    return web.json_response({"error": "bad_request", "message": str(error)}, status=400)


def _get_int(params: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = params.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise _InvalidRequest(f"{key} must be a whole number, got {value!r}")
    if value < 0:
        raise _InvalidRequest(f"{key} must be at least 0, got {value!r}", PARAM_OUT_OF_RANGE)
    return int(value)


def _get_seconds(params: Mapping[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _InvalidRequest(f"{key} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and 0 <= value <= 3600):
        raise _InvalidRequest(f"{key} must be from 0 to 3600, got {value!r}", PARAM_OUT_OF_RANGE)
    return float(value)


def _drop_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


class DemoWorker:
    """A fake model worker on its own listening socket.

    ``async with DemoWorker(settings) as worker:`` (or ``await start()`` and
    ``await aclose()``) serves it, registers it with the controller unless
    ``settings.register`` is false, and on close tells the controller it is leaving before
    it stops listening. ``make_app()`` gives the bare application for embedding or tests.
    """

    def __init__(
        self, settings: DemoSettings | None = None, *, rng: random.Random | None = None
    ) -> None:
        self.settings = settings if settings is not None else DemoSettings()
        self.limiter = ConcurrencyLimiter(self.settings.limit_worker_concurrency)
        self.heartbeat: HeartbeatClient | None = None
        self._rng = rng if rng is not None else random.Random(self.settings.seed)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._worker_address: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, then start registering and heartbeating (in the background)."""
        if self._runner is not None:
            raise RuntimeError("this DemoWorker is already running")
        cfg = self.settings
        runner = web.AppRunner(
            self.make_app(),
            access_log=None,
            # A client that goes away ends its generation (and frees its slot) at once.
            handler_cancellation=True,
            shutdown_timeout=cfg.shutdown_timeout,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
            await site.start()
            port = cfg.port
            for address in runner.addresses:
                if isinstance(address, tuple) and len(address) >= 2:
                    port = address[1]
                    break
            host = cfg.host if cfg.host not in ("", "0.0.0.0", "::") else None
            url_host = host or "0.0.0.0"
            self._url = f"http://{_bracket(url_host)}:{port}"
            self._worker_address = (
                cfg.worker_address or f"http://{_bracket(host or 'localhost')}:{port}"
            )
            if cfg.register:
                self.heartbeat = HeartbeatClient(
                    HeartbeatConfig(
                        controller_address=cfg.controller_address,
                        worker_address=self._worker_address,
                        model_names=cfg.model_names,
                        multimodal=cfg.multimodal,
                        interval=cfg.heart_beat_interval,
                    ),
                    self.limiter,
                )
                await self.heartbeat.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def aclose(self) -> None:
        """Say goodbye to the controller, then stop serving. Idempotent."""
        runner, self._runner = self._runner, None
        try:
            if self.heartbeat is not None:
                await self.heartbeat.aclose()
        finally:
            if runner is not None:
                await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def url(self) -> str:
        """The URL this worker listens on (with the real port if 0 was asked)."""
        if self._url is None:
            raise RuntimeError("the DemoWorker is not running: start() it first")
        return self._url

    @property
    def worker_address(self) -> str:
        """The address this worker registers with (``--worker-address``)."""
        if self._worker_address is None:
            raise RuntimeError("the DemoWorker is not running: start() it first")
        return self._worker_address

    def make_app(self) -> web.Application:
        """The worker's routes, as an application not yet started."""
        app = web.Application()
        routes: dict[str, Callable[[web.Request], Any]] = {
            "/worker_generate_stream": self.handle_generate_stream,
            "/worker_generate": self.handle_generate,
            "/worker_get_embeddings": self.handle_embeddings,
            "/worker_get_status": self.handle_status,
            "/count_token": self.handle_count_token,
            "/worker_get_conv_template": self.handle_conv_template,
            "/model_details": self.handle_model_details,
        }
        app.add_routes([web.post(path, handler) for path, handler in routes.items()])
        return app

    # -- what it says ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``/worker_get_status`` answers."""
        return {
            "model_names": list(self.settings.model_names),
            "speed": 1,
            "queue_length": self.limiter.queue_length,
        }

    def conv_template(self) -> dict[str, Any]:
        """A conversation template shaped like FastChat's ``Conversation``.

        FastChat's workers send the dataclass's fields, which its OpenAI-compatible API
        server reads back (``name``, ``sep_style``, ...). ``template_name`` is what
        ``Conversation.dict()`` calls the name, for readers of that form.
        """
        name = self.settings.conv_template
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

    def _plan(self, params: Mapping[str, Any]) -> _Plan:
        """Check a generation request and decide how it will go."""
        cfg = self.settings
        prompt = params.get("prompt")
        if not isinstance(prompt, str):
            raise _InvalidRequest(f"prompt must be a string, got {prompt!r}")
        wanted = _get_int(params, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        assert wanted is not None
        echo = params.get("echo", True)
        if not isinstance(echo, bool):
            raise _InvalidRequest(f"echo must be true or false, got {echo!r}")
        stop = params.get("stop")
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = tuple(stop)
        else:
            raise _InvalidRequest(f"stop must be a string or a list of strings, got {stop!r}")
        forced_error = params.get("demo_error", False)
        if not isinstance(forced_error, bool):
            raise _InvalidRequest(f"demo_error must be true or false, got {forced_error!r}")
        return _Plan(
            prompt=prompt,
            max_new_tokens=min(wanted, cfg.max_new_tokens_limit),
            echo=echo,
            stop=stops,
            token_delay=_get_seconds(params, "demo_token_delay", cfg.token_delay),
            first_token_delay=_get_seconds(params, "demo_first_token_delay", cfg.first_token_delay),
            hang_after=_get_int(params, "demo_hang_after", cfg.hang_after),
            fail_after=_get_int(params, "demo_fail_after", cfg.fail_after),
            error=forced_error or self._rng.random() < cfg.error_rate,
        )

    async def _generate(self, plan: _Plan) -> AsyncIterator[dict[str, Any]]:
        """The messages of one generation: cumulative ``text``, the last with
        ``finish_reason`` and ``usage``. Raises ``_Drop`` where the connection must drop.
        """
        if plan.error:
            log.info("Answering a generation with an injected error")
            yield _error_message(INTERNAL_ERROR, "demo worker: injected error")
            return
        prefix = plan.prompt if plan.echo else ""
        prompt_tokens = _count_tokens(plan.prompt)
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
                raise _Drop
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
            if (i + 1) % self.settings.stream_interval == 0:
                yield _message(text, prompt_tokens, len(generated), None)
        yield _message(text, prompt_tokens, len(generated), finish_reason)

    # -- handlers --------------------------------------------------------------------------

    async def handle_generate_stream(self, request: web.Request) -> web.StreamResponse:
        try:
            plan = self._plan(await _read_object(request))
        except _InvalidRequest as e:
            # Like every generation error, in-band with HTTP 200.
            return web.Response(body=_frame(e.message()))
        async with self.limiter:
            response = web.StreamResponse()
            await response.prepare(request)
            try:
                async for message in self._generate(plan):
                    await response.write(_frame(message))
            except _Drop:
                _drop_connection(request)
                return response
            await response.write_eof()
            return response

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        try:
            plan = self._plan(await _read_object(request))
        except _InvalidRequest as e:
            return web.json_response(e.message())
        last: dict[str, Any] = {}
        async with self.limiter:
            try:
                async for message in self._generate(plan):
                    last = message
            except _Drop:
                _drop_connection(request)
                return web.Response()
        return web.json_response(last)

    async def handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        try:
            params = await _read_object(request)
            inputs = params.get("input")
            if isinstance(inputs, str):
                inputs = [inputs]
            if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
                raise _InvalidRequest(f"input must be a list of strings, got {inputs!r}")
        except _InvalidRequest as e:
            return web.json_response(e.message())
        dim = self.settings.embedding_dim
        async with self.limiter:
            vectors = [_fake_embedding(text, dim) for text in inputs]
        embedding: list[Any] = vectors
        if params.get("encoding_format") == "base64":
            # FastChat's base64 form: the float32 bytes of each vector.
            embedding = [
                base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() for vector in vectors
            ]
        token_num = sum(_count_tokens(text) for text in inputs)
        return web.json_response({"embedding": embedding, "token_num": token_num})

    async def handle_status(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.status())

    async def handle_count_token(self, request: web.Request) -> web.StreamResponse:
        try:
            prompt = (await _read_object(request)).get("prompt")
            if isinstance(prompt, str):
                count = _count_tokens(prompt)
            elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
                count = sum(_count_tokens(p) for p in prompt)
            else:
                raise _InvalidRequest(f"prompt must be a string, got {prompt!r}")
        except _InvalidRequest as e:
            return _bad_request(e)
        return web.json_response({"count": count, "error_code": 0})

    async def handle_conv_template(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"conv": self.conv_template()})

    async def handle_model_details(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"context_length": self.settings.context_length})


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


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- command line ------------------------------------------------------------------------------


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _positive_int_arg(text: str) -> int:
    value = _count_arg(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1, got 0")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


def _rate_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text!r}")
    return value


def _names_arg(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more comma-separated names")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The ``fc-demo-worker`` flags (FastChat's model_worker names where they overlap)."""
    parser = argparse.ArgumentParser(
        prog="fc-demo-worker",
        description="A FastChat-compatible model worker that streams made-up words.",
    )
    add = parser.add_argument
    add("--host", default="localhost", help="address to listen on (default: %(default)s)")
    add("--port", type=_count_arg, default=21002, help="port to listen on (default: %(default)s)")
    add(
        "--worker-address",
        default=None,
        help="the URL the controller uses to reach this worker (default: http://HOST:PORT)",
    )
    add("--controller-address", default="http://localhost:21001", help="(default: %(default)s)")
    add(
        "--model-names",
        type=_names_arg,
        default=["demo-model"],
        help="comma-separated model names to serve (default: demo-model)",
    )
    add("--conv-template", default="demo", help="name of the conversation template it reports")
    add("--limit-worker-concurrency", type=_positive_int_arg, default=5, help="(default: 5)")
    add("--stream-interval", type=_positive_int_arg, default=1, help="tokens per message")
    add("--no-register", action="store_true", help="do not register with the controller")
    add("--multimodal", action="store_true", help="register as a multimodal worker")
    add("--seed", type=int, default=None, help="seed for --error-rate")
    knobs = parser.add_argument_group("misbehaviour")
    knobs.add_argument(
        "--token-delay", type=_seconds_arg, default=0.05, help="seconds per token (default: 0.05)"
    )
    knobs.add_argument(
        "--first-token-delay",
        type=_seconds_arg,
        default=0.0,
        help="extra seconds before the first token (default: 0)",
    )
    knobs.add_argument(
        "--max-new-tokens-limit",
        type=_count_arg,
        default=1024,
        help="cap on a request's max_new_tokens (default: 1024)",
    )
    knobs.add_argument(
        "--context-length", type=_positive_int_arg, default=4096, help="(default: 4096)"
    )
    knobs.add_argument(
        "--hang-after",
        type=_count_arg,
        default=None,
        metavar="N",
        help="after N tokens stop sending but keep the connection open",
    )
    knobs.add_argument(
        "--fail-after",
        type=_count_arg,
        default=None,
        metavar="N",
        help="after N tokens drop the connection",
    )
    knobs.add_argument(
        "--error-rate",
        type=_rate_arg,
        default=0.0,
        metavar="P",
        help="answer this share of generations with an in-band error (0 to 1)",
    )
    add(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)",
    )
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[DemoSettings, str]:
    """Settings and log level from flags and ``FASTCHAT_WORKER_HEART_BEAT_INTERVAL``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        interval = _interval_from_environ(os.environ if environ is None else environ)
        settings = DemoSettings(
            host=args.host,
            port=args.port,
            worker_address=args.worker_address,
            controller_address=args.controller_address,
            register=not args.no_register,
            model_names=args.model_names,
            multimodal=args.multimodal,
            conv_template=args.conv_template,
            limit_worker_concurrency=args.limit_worker_concurrency,
            stream_interval=args.stream_interval,
            token_delay=args.token_delay,
            first_token_delay=args.first_token_delay,
            max_new_tokens_limit=args.max_new_tokens_limit,
            context_length=args.context_length,
            hang_after=args.hang_after,
            fail_after=args.fail_after,
            error_rate=args.error_rate,
            seed=args.seed,
            heart_beat_interval=DEFAULT_HEART_BEAT_INTERVAL if interval is None else interval,
        )
        if settings.register:
            # Fail at start-up, not in the background, on a malformed address.
            HeartbeatConfig(
                controller_address=settings.controller_address,
                worker_address=settings.worker_address or "http://localhost",
                model_names=settings.model_names,
            )
    except ValueError as e:
        parser.error(str(e))
    return settings, args.log_level


async def _run(settings: DemoSettings) -> int:
    return await run_until_signalled(
        lambda stop: _serve_until(settings, stop), log, "leaving the controller and stopping"
    )


async def _serve_until(settings: DemoSettings, stop: asyncio.Event) -> int:
    worker = DemoWorker(settings)
    try:
        await worker.start()
    except OSError as e:
        log.error("Cannot listen on %s:%d: %s", settings.host, settings.port, e)
        return 1
    try:
        print(
            f"fc-demo-worker running on {worker.url} (Press CTRL+C to quit)",
            file=sys.stderr,
            flush=True,
        )
        log.info(
            "Serving %s as %s; %s",
            ", ".join(settings.model_names),
            worker.worker_address,
            f"controller {settings.controller_address}" if settings.register else "not registering",
        )
        await stop.wait()
    finally:
        await worker.aclose()
    log.info("Stopped")
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run a demo worker until SIGINT or SIGTERM; returns the process exit status."""
    settings, level = load_settings(argv, environ)
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        stream=sys.stderr,
    )
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(_run(settings))


if __name__ == "__main__":
    sys.exit(main())

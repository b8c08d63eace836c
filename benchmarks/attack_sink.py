"""A stand-in for the controller that the hostile scenario's attacks can be aimed at instead
of it (``run.py --scenario hostile --floor``).

It answers each route the attacks use the way the controller would, at once and with no
registry behind it: bodies over 64 MiB get a 413, an encoded body a 415 (neither is read
before it is refused, nor inflated), a generation a short stream of eight chunks, a
status call an empty status. Started on the controller's
core at the idle scheduling class (``chrt --idle``), it takes only CPU the controller leaves
unused and gives it up whenever the controller wakes, so the normal traffic of a row whose
attack goes here measures what the attack costs everything but the controller: the load
core's share of the attack (its own work and the kernel's loopback processing, which
belongs to the sending core), the workers' and the machine's. That is the floor the
controller's own row can be compared with on a machine where the load shares cores.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable

import uvloop
from aiohttp import web

MIB = 1024 * 1024
MAX_BODY = 64 * MIB
TOKENS = 8


async def _body(request: web.Request) -> web.Response | None:
    """Read and drop the body; an answer to give instead when it is refused."""
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        return web.json_response({"error": "encoded body"}, status=415)
    if (request.content_length or 0) > MAX_BODY:
        return web.json_response({"error": "body too large"}, status=413)
    try:
        await request.read()
    except web.HTTPRequestEntityTooLarge:
        return web.json_response({"error": "body too large"}, status=413)
    return None


async def generate(request: web.Request) -> web.StreamResponse:
    refused = await _body(request)
    if refused is not None:
        return refused
    response = web.StreamResponse()
    await response.prepare(request)
    for i in range(TOKENS):
        chunk = {"text": "x" * (i + 1), "error_code": 0}
        await response.write(json.dumps(chunk).encode() + b"\0")
    await response.write_eof()
    return response


def answering(answer: object) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        return await _body(request) or web.json_response(answer)

    return handle


def app() -> web.Application:
    application = web.Application(client_max_size=MAX_BODY)
    status = {"model_names": [], "speed": 1, "queue_length": 0}
    routes = {
        "/worker_get_status": status,
        "/list_models": {"models": []},
        "/list_language_models": {"models": []},
        "/test_connection": "success",
    }
    for path, answer in routes.items():
        application.router.add_route("*", path, answering(answer))
    application.router.add_post("/worker_generate_stream", generate)
    application.router.add_route("*", "/{tail:.*}", answering({}))
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.install()
    web.run_app(
        app(),
        host="127.0.0.1",
        port=args.port,
        backlog=2048,
        print=None,
        access_log=None,
        # as the controller, never inflate a body it refuses
        auto_decompress=False,
    )


if __name__ == "__main__":
    main()

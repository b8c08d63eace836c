"""A minimal custom FastChat worker built on ``controller.worker``.

It "generates" by spelling the prompt backwards, one word per message, and serves the two
endpoints a controller needs: ``/worker_generate_stream`` and ``/worker_get_status``.

    python examples/custom_worker.py --port 21010

Stop it with Ctrl-C: it tells the controller it is leaving before it stops listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from aiohttp import web

from controller.worker import ConcurrencyLimiter, HeartbeatClient, HeartbeatConfig

MODEL_NAMES = ["backwards"]


def make_app(controller_address: str, worker_address: str, limit: int) -> web.Application:
    limiter = ConcurrencyLimiter(limit)

    async def generate_stream(request: web.Request) -> web.StreamResponse:
        params = await request.json()
        words = str(params.get("prompt", "")).split()[::-1]
        async with limiter:  # running + waiting requests make the queue length
            response = web.StreamResponse()
            await response.prepare(request)
            for i in range(1, len(words) + 1):
                await asyncio.sleep(0.1)  # the "model" at work
                message = {"text": " ".join(words[:i]), "error_code": 0}  # the whole text so far
                if i == len(words):
                    message["finish_reason"] = "stop"
                    message["usage"] = {
                        "prompt_tokens": len(words),
                        "completion_tokens": i,
                        "total_tokens": len(words) + i,
                    }
                await response.write(json.dumps(message).encode() + b"\0")  # NUL after each
            await response.write_eof()
            return response

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(
            {"model_names": MODEL_NAMES, "speed": 1, "queue_length": limiter.queue_length}
        )

    app = web.Application()
    app.router.add_post("/worker_generate_stream", generate_stream)
    app.router.add_post("/worker_get_status", get_status)

    # The one line that joins the controller: register at start-up, heartbeat with the
    # limiter's queue length (interval from FASTCHAT_WORKER_HEART_BEAT_INTERVAL, else 45 s),
    # and say goodbye on shutdown.
    config = HeartbeatConfig.from_environ(
        controller_address=controller_address,
        worker_address=worker_address,
        model_names=MODEL_NAMES,
    )
    HeartbeatClient(config, limiter).attach(app)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=21010)
    parser.add_argument("--worker-address", default=None)
    parser.add_argument("--controller-address", default="http://localhost:21001")
    parser.add_argument("--limit-worker-concurrency", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    worker_address = args.worker_address or f"http://{args.host}:{args.port}"
    app = make_app(args.controller_address, worker_address, args.limit_worker_concurrency)
    web.run_app(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

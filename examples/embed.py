"""Embedding fc-controller in your own aiohttp application.

The host application keeps its own routes (here ``/healthz`` and ``/workers``) and serves
the controller's FastChat endpoints beside them. The controller's background work starts
and stops with the host application.

Run it with ``python examples/embed.py --port 21001`` and point FastChat workers at it.
"""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from controller import CONTROLLER_KEY, Controller, ControllerConfig
from controller.requestid import RequestIdFilter


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def workers(request: web.Request) -> web.Response:
    """An endpoint of the host's own that reads the embedded controller's registry."""
    controller = request.app[CONTROLLER_KEY]
    return web.json_response(
        [
            {"name": w.name, "models": list(w.info.model_names), "queue_length": w.queue_length}
            for w in controller.registry
        ]
    )


async def make_app(config: ControllerConfig | None = None) -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/workers", workers)
    await Controller.start(app, config)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=21001)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = parser.parse_args()
    # The controller logs through the standard logging module, as any library: the host
    # application decides where lines go. Without this it would say nothing at all.
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s | %(levelname)s | %(name)s | %(request_id)s | %(message)s",
    )
    for handler in logging.getLogger().handlers:
        # Fills %(request_id)s: the X-Request-Id of the request a line is about, else "-".
        handler.addFilter(RequestIdFilter("-"))
    web.run_app(
        make_app(ControllerConfig(host=args.host, port=args.port)), host=args.host, port=args.port
    )


if __name__ == "__main__":
    main()

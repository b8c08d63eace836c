"""Embedding fc-controller in your own aiohttp application.

The host application keeps its own routes (here ``/healthz`` and ``/workers``) and serves
the controller's FastChat endpoints beside them. The controller's background work starts
and stops with the host application.

Run it with ``python examples/embed.py --port 21001`` and point FastChat workers at it.
"""

from __future__ import annotations

import argparse

from aiohttp import web

from controller import CONTROLLER_KEY, Controller, ControllerConfig


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
    args = parser.parse_args()
    web.run_app(
        make_app(ControllerConfig(host=args.host, port=args.port)), host=args.host, port=args.port
    )


if __name__ == "__main__":
    main()

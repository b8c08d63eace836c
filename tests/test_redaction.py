"""Credentials inside URLs (a parent controller's, a registry's) never reach a log line."""

from __future__ import annotations

import io
import logging

import aiohttp
import pytest

from controller import ControllerConfig
from controller.worker.runtime import RedactUrls
from controller.worker.tokens import redact_urls

from .conftest import RunController, wait_until

SECRET = "hunter2-secret"


def test_userinfo_is_redacted_from_any_url_in_a_text() -> None:
    """Every URL's user:password@ becomes ***@; the rest of the text is untouched."""
    text = f"parent http://admin:{SECRET}@10.0.0.1:21001/x and redis://:{SECRET}@r:6379/0, a@b"
    assert redact_urls(text) == "parent http://***@10.0.0.1:21001/x and redis://***@r:6379/0, a@b"


def test_the_log_handlers_redact_every_line_tracebacks_included() -> None:
    """A line logged by any library through the programs' handlers shows no credentials,
    in its message or in its traceback."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactUrls())
    logger = logging.getLogger("some.library")
    logger.addHandler(handler)
    try:
        logger.warning("connecting to %s", f"https://u:{SECRET}@registry.example/")
        try:
            raise ConnectionError(f"cannot reach http://u:{SECRET}@host:1/")
        except ConnectionError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    written = out.getvalue()
    assert SECRET not in written
    assert "https://***@registry.example/" in written
    assert "http://***@host:1/" in written


async def test_a_parent_url_with_credentials_is_logged_redacted(
    run_controller: RunController,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A child whose --parent-controller URL carries user:password logs the parent's
    address without them, while it registers there as usual."""
    caplog.set_level(logging.DEBUG)
    parent = await run_controller()
    host_port = parent.url.removeprefix("http://")
    child = await run_controller(
        ControllerConfig(
            host="127.0.0.1",
            port=0,
            parent_controller=f"http://link:{SECRET}@{host_port}",
            parent_heart_beat_interval=60,
        )
    )
    worker_status = {"model_names": ["m"], "speed": 1, "queue_length": 0}
    body = {"worker_name": "http://10.0.0.5:21002", "check_heart_beat": False}
    async with http.post(
        f"{child.url}/register_worker", json={**body, "worker_status": worker_status}
    ) as r:
        assert r.status == 200
    await wait_until(lambda: parent.registry.get(child.url) is not None, timeout=5)
    messages = [record.getMessage() for record in caplog.records]
    assert any(f"http://***@{host_port}" in m for m in messages)
    assert not any(SECRET in m for m in messages)

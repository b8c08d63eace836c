"""The status page in a real headless browser: Debian's ``chromium`` driven by Playwright.

What a person sees: the models and their workers with their states, a hostile model name
shown as text and never run, the page's own stylesheet applied under its policy, no
console error or policy violation, and the page reloading by itself. A screenshot is
saved under ``$FC_TEST_ARTIFACTS`` (or the test's temporary directory).

Skipped with the reason when Playwright or a chromium executable is missing, unless
``FC_BROWSER_TESTS_REQUIRED=1`` (set by ``.ci/run``), which makes that a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import aiohttp
import pytest

from controller import Controller, ControllerConfig

from .conftest import FakeClock, MakeWorker, RunController, post_ok, register

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

#: a model name a worker may register that would run script if the page did not escape it
HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
#: records every Content-Security-Policy violation; injected by the browser's debugging
#: protocol, which the page's own policy does not apply to
RECORD_VIOLATIONS = (
    "window.violations = [];"
    "document.addEventListener('securitypolicyviolation',"
    " e => window.violations.push(e.violatedDirective + ' ' + e.blockedURI));"
)


def _unavailable(reason: str) -> NoReturn:
    message = f"browser tests need {reason}"
    if os.environ.get("FC_BROWSER_TESTS_REQUIRED", "") not in ("", "0"):
        pytest.fail(f"{message} (FC_BROWSER_TESTS_REQUIRED is set)")
    pytest.skip(message)


def chromium_path() -> str | None:
    """Debian's chromium (or a distribution's chromium-browser), if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless chromium, launched from the system's executable (Playwright's own browser
    download is not used)."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("the playwright package (pip install -e '.[test]')")
    executable = chromium_path()
    if executable is None:
        _unavailable("a chromium executable (apt-get install chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: ``$FC_TEST_ARTIFACTS`` if set, else the test's own tmp_path."""
    where = os.environ.get("FC_TEST_ARTIFACTS")
    directory = Path(where) if where else tmp_path
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def open_page(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """A page at ``url``, with every console error and uncaught exception collected."""
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    # A missing element fails in seconds, not Playwright's default half minute.
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    await page.add_init_script(RECORD_VIOLATIONS)
    response = await page.goto(url)
    assert response is not None and response.status == 200
    return page, errors


async def test_the_page_shows_models_and_workers_and_runs_nothing_it_was_sent(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    browser: Browser,
    artifacts: Path,
) -> None:
    """A healthy, an expiring and an ejected worker appear under their models with their
    state; the hostile model name is shown as text and its script never runs; the
    stylesheet applies; no console error and no policy violation; a screenshot is saved."""
    clock = FakeClock()
    config = ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0)
    controller: Controller = await run_controller(config, clock=clock)
    late = await make_worker(model_names=["vicuna-7b"])
    await register(http, controller, late)
    clock.advance(61)  # two thirds of the 90 s expiration: a heartbeat is late
    healthy = await make_worker(model_names=["vicuna-7b", HOSTILE], queue_length=2)
    dead = await make_worker(model_names=["llama-13b"], crashed=True)
    await register(http, controller, healthy, dead)
    await post_ok(http, controller, "/worker_generate", {"model": "llama-13b"})

    page, errors = await open_page(browser, f"{controller.url}/status")
    await page.screenshot(path=str(artifacts / "status-page.png"), full_page=True)

    assert await page.title() == "fc-controller status"
    models = await page.locator("#models tr[data-model] td:first-child").all_inner_texts()
    assert models == sorted(["vicuna-7b", "llama-13b", HOSTILE])

    async def state_of(url: str, model: str) -> str:
        section = page.locator("section.model").filter(
            has=page.get_by_role("heading", name=model, exact=True)
        )
        row = section.locator("tr[data-worker]").filter(has_text=url)
        return str(await row.locator("td.s").inner_text())

    assert await state_of(healthy.url, "vicuna-7b") == "healthy"
    assert await state_of(late.url, "vicuna-7b") == "expiring"
    assert (await state_of(dead.url, "llama-13b")).startswith("ejected (")
    assert await state_of(healthy.url, HOSTILE) == "healthy"
    # The hostile name is a heading's text; nothing it holds ran or became an element.
    assert await page.get_by_role("heading", name=HOSTILE, exact=True).count() == 1
    assert await page.evaluate("window.pwned") is None
    assert await page.locator("body script, body img").count() == 0

    ejected = page.locator(f'tr.ejected[data-worker="{dead.url}"] td.s')
    assert await ejected.evaluate("e => getComputedStyle(e).color") == "rgb(176, 0, 32)"
    assert await page.evaluate("window.violations") == []
    assert errors == []
    assert (artifacts / "status-page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_the_page_reloads_by_itself_and_shows_a_new_worker(
    run_controller: RunController,
    make_worker: MakeWorker,
    http: aiohttp.ClientSession,
    browser: Browser,
) -> None:
    """Opened on an empty registry with ?refresh=1, the page shows a worker registered
    afterwards without anyone reloading it."""
    controller = await run_controller(
        ControllerConfig(host="127.0.0.1", port=0, load_poll_interval=0)
    )
    page, errors = await open_page(browser, f"{controller.url}/status?refresh=1")
    assert "No workers are registered" in await page.inner_text("#empty")

    worker = await make_worker(model_names=["fresh-model"])
    await register(http, controller, worker)
    row = page.locator(f'tr[data-worker="{worker.url}"]')
    await row.wait_for(timeout=15_000)
    assert await row.locator("td.s").inner_text() == "healthy"
    assert errors == []

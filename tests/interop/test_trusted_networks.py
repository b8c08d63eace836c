"""Stock FastChat components, which send no credentials, keep working unchanged against a
controller with tokens on for every role, through --trust-workers-from and
--trust-clients-from (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from .support import FAKE_REPLY, MODEL, Launcher, post_json, sse_events, stream_messages

CHAT = [{"role": "user", "content": "Say hello"}]


def token_files(root: Path) -> list[str]:
    """The flags naming one token file per role."""
    args = []
    for role, flag in (
        ("worker", "--worker-token-file"),
        ("api", "--api-token-file"),
        ("admin", "--admin-token-file"),
    ):
        path = root / f"{role}.tokens"
        path.write_text(f"# the {role} role\n{role}-team:{role}-token-0123456789abcdef\n")
        args += [flag, str(path)]
    return args


async def test_stock_components_work_from_trusted_networks_while_tokens_are_on(
    launcher: Launcher, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A FastChat worker registers and heartbeats, and FastChat's OpenAI API server lists
    models, completes and streams, with no token, from 127.0.0.0/8; a wrong token from the
    same network is still a 403, so the tokens are on."""
    args = token_files(tmp_path)
    args += ["--trust-workers-from", "127.0.0.0/8", "--trust-clients-from", "127.0.0.0/8"]
    controller = launcher.controller("fc", args=args)
    worker = launcher.worker(controller.url)
    api = launcher.api_server(controller.url)

    async with http.get(f"{api.url}/v1/models") as r:
        assert r.status == 200
        assert [card["id"] for card in (await r.json())["data"]] == [MODEL]
    status, body = await post_json(
        http, f"{api.url}/v1/chat/completions", {"model": MODEL, "messages": CHAT}
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == FAKE_REPLY
    _, payloads = await sse_events(
        http, f"{api.url}/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stream": True}
    )
    assert payloads[-1] == "[DONE]"
    deltas = [json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-1]]
    assert "".join(deltas) == FAKE_REPLY

    _, messages = await stream_messages(
        http, f"{controller.url}/worker_generate_stream", {"model": MODEL, "prompt": "hi"}
    )
    assert messages[-1]["error_code"] == 0
    assert worker.registrations() == 1

    wrong = {"Authorization": "Bearer not-a-token-0123456789abcdef"}
    async with http.post(f"{controller.url}/list_models", headers=wrong) as r:
        assert r.status == 403
    admin = {"Authorization": "Bearer admin-token-0123456789abcdef"}
    async with http.get(f"{controller.url}/dispatch_decisions", headers=admin) as r:
        assert r.status == 200

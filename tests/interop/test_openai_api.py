"""FastChat's OpenAI-compatible API server, through either controller, to a FastChat worker.

Every test runs once per controller kind against the same expected answers, which is what
shows the two controllers are interchangeable for the API server.
"""

from __future__ import annotations

import json

import aiohttp

from .conftest import Stack
from .support import FAKE_REPLY, MODEL, post_json, sse_events

CHAT = [{"role": "user", "content": "Say hello"}]


async def test_models(stack: Stack, http: aiohttp.ClientSession) -> None:
    """GET /v1/models lists the worker's model."""
    async with http.get(f"{stack.api.url}/v1/models") as r:
        assert r.status == 200
        body = await r.json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == [MODEL]


async def test_chat_completion(stack: Stack, http: aiohttp.ClientSession) -> None:
    """A chat completion returns the worker's text, finish reason and token usage."""
    status, body = await post_json(
        http, f"{stack.api.url}/v1/chat/completions", {"model": MODEL, "messages": CHAT}
    )
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": FAKE_REPLY}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == len(FAKE_REPLY.split())
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_chat_completion_stream(stack: Stack, http: aiohttp.ClientSession) -> None:
    """A streamed chat completion is SSE: a role chunk, text deltas, then [DONE]."""
    content_type, payloads = await sse_events(
        http,
        f"{stack.api.url}/v1/chat/completions",
        {"model": MODEL, "messages": CHAT, "stream": True},
    )
    assert content_type.startswith("text/event-stream")
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks[1:]]
    assert "".join(deltas) == FAKE_REPLY
    assert len(deltas) == len(FAKE_REPLY.split())
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_completion_max_tokens(stack: Stack, http: aiohttp.ClientSession) -> None:
    """max_tokens reaches the worker through the controller's answer: the text is cut."""
    status, body = await post_json(
        http,
        f"{stack.api.url}/v1/chat/completions",
        {"model": MODEL, "messages": CHAT, "max_tokens": 3},
    )
    assert status == 200, body
    [choice] = body["choices"]
    assert choice["message"]["content"] == " ".join(FAKE_REPLY.split()[:3])
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


async def test_completion(stack: Stack, http: aiohttp.ClientSession) -> None:
    """A text completion returns the worker's text and usage counted from the prompt."""
    status, body = await post_json(
        http, f"{stack.api.url}/v1/completions", {"model": MODEL, "prompt": "Once upon a time"}
    )
    assert status == 200, body
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["text"] == FAKE_REPLY
    assert choice["finish_reason"] == "stop"
    words = len(FAKE_REPLY.split())
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": words,
        "total_tokens": 4 + words,
    }


async def test_completion_stream(stack: Stack, http: aiohttp.ClientSession) -> None:
    """A streamed text completion sends the text in pieces, then [DONE]."""
    content_type, payloads = await sse_events(
        http,
        f"{stack.api.url}/v1/completions",
        {"model": MODEL, "prompt": "Once upon a time", "stream": True},
    )
    assert content_type.startswith("text/event-stream")
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == FAKE_REPLY
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_embeddings(stack: Stack, http: aiohttp.ClientSession) -> None:
    """Embeddings come back one per input, in order, with the token count as usage."""
    status, body = await post_json(
        http, f"{stack.api.url}/v1/embeddings", {"model": MODEL, "input": ["one two", "three"]}
    )
    assert status == 200, body
    assert body["object"] == "list"
    assert body["model"] == MODEL
    assert [(d["index"], d["embedding"]) for d in body["data"]] == [
        (0, [7.0, 2.0, 0.5, -0.5]),
        (1, [5.0, 1.0, 0.5, -0.5]),
    ]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


async def test_unknown_model(stack: Stack, http: aiohttp.ClientSession) -> None:
    """A model no worker serves is refused by the API server with its 40301 error."""
    status, body = await post_json(
        http, f"{stack.api.url}/v1/chat/completions", {"model": "no-such-model", "messages": CHAT}
    )
    assert status == 400
    assert body["code"] == 40301
    assert "no-such-model" in body["message"]

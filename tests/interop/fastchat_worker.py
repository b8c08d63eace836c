# mypy: disable-error-code="import-not-found"
"""A model worker made of FastChat's own worker code, with a fake model instead of a real one.

Run it with the interpreter of the FastChat environment (never imported by the test suite)::

    python fastchat_worker.py --port 21002 --controller-address http://127.0.0.1:21001

Everything a client or controller talks to is FastChat 0.2.36's: the HTTP application
(``fastchat.serve.base_model_worker.app``), the registration, the heartbeat thread and its
re-registration on ``exist: false``, the concurrency semaphore and the queue length. Only
the model is fake: it answers every prompt with the words of ``REPLY``, one more per
message, the way a real worker streams the whole text so far.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn
from fastchat.conversation import Conversation, get_conv_template
from fastchat.serve.base_model_worker import BaseModelWorker, app

# Keep these in step with support.py (FAKE_REPLY, FAKE_CONTEXT_LEN).
REPLY = "Hello from the fake model."
CONTEXT_LEN = 2048
CONV_TEMPLATE = "vicuna_v1.1"


def count_tokens(text: str) -> int:
    """The fake tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def embed(text: str) -> list[float]:
    """A fake but deterministic embedding that depends on the text."""
    return [float(len(text)), float(count_tokens(text)), 0.5, -0.5]


class FakeModelWorker(BaseModelWorker):  # type: ignore[misc]
    def __init__(
        self,
        *,
        controller_addr: str,
        worker_addr: str,
        model_names: list[str],
        token_delay: float,
    ) -> None:
        super().__init__(
            controller_addr,
            worker_addr,
            uuid.uuid4().hex[:8],
            f"fake/{model_names[0]}",
            model_names,
            limit_worker_concurrency=4,
            conv_template=CONV_TEMPLATE,
        )
        self.context_len = CONTEXT_LEN
        self.token_delay = token_delay

    def make_conv_template(
        self, conv_template: str | None = None, model_path: str | None = None
    ) -> Conversation:
        # The base class would look the model up in FastChat's model adapters, which import
        # torch; the named template is all a fake model needs.
        return get_conv_template(conv_template or CONV_TEMPLATE)

    def count_token(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"count": count_tokens(params["prompt"]), "error_code": 0}

    def generate_stream_gate(self, params: dict[str, Any]) -> Iterator[bytes]:
        self.call_ct += 1
        words = REPLY.split()
        limit = params.get("max_new_tokens")
        n = min(len(words), limit) if isinstance(limit, int) and limit > 0 else len(words)
        prompt_tokens = count_tokens(str(params.get("prompt", "")))
        for i in range(1, n + 1):
            if self.token_delay:
                time.sleep(self.token_delay)
            finish_reason = None
            if i == n:
                finish_reason = "stop" if n == len(words) else "length"
            message = {
                "text": " ".join(words[:i]),
                "error_code": 0,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": i,
                    "total_tokens": prompt_tokens + i,
                },
                "finish_reason": finish_reason,
            }
            yield json.dumps(message).encode() + b"\0"

    def generate_gate(self, params: dict[str, Any]) -> dict[str, Any]:
        *_, last = self.generate_stream_gate(params)
        answer: dict[str, Any] = json.loads(last[:-1])
        return answer

    def get_embeddings(self, params: dict[str, Any]) -> dict[str, Any]:
        self.call_ct += 1
        texts = params["input"]
        return {
            "embedding": [embed(text) for text in texts],
            "token_num": sum(count_tokens(text) for text in texts),
        }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--worker-address", help="default: http://HOST:PORT")
    parser.add_argument("--controller-address", required=True)
    parser.add_argument("--model-names", default="fake-model", help="comma-separated")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds per word")
    parser.add_argument(
        "--no-register", action="store_true", help="neither register nor send heartbeats"
    )
    args = parser.parse_args(argv)
    worker = FakeModelWorker(
        controller_addr=args.controller_address,
        worker_addr=args.worker_address or f"http://{args.host}:{args.port}",
        model_names=args.model_names.split(","),
        token_delay=args.token_delay,
    )
    if not args.no_register:
        # As FastChat's model worker does: register (crashing if the controller refuses),
        # then heartbeat from a daemon thread.
        worker.init_heart_beat()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

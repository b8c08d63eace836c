"""How long a hostile request body holds the event loop: before (``json.loads`` of the
whole body, as the controller did) and after (``controller.jsonbody``: msgspec checks the
whole body and decodes the fields the controller reads, nesting is measured without
building anything, and a large body is read in pieces with the loop free in between).

Each shape is a /worker_generate_stream body of about 16 MiB (``--mib``) naming a model.
For "after" the table gives the loop time of the whole read and of its longest piece:
other requests are served between pieces, so the longest piece is what the body costs
everyone else. Times are the thread's CPU time, which other processes on a busy machine
disturb less than the clock on the wall. Run by hand; it prints a table::

    python3 benchmarks/json_shapes.py            # 16 MiB, best of 3
    python3 benchmarks/json_shapes.py --mib 64 --runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections.abc import Callable

from controller.jsonbody import BodyReader
from controller.protocol import DISPATCH


def _fill(size: int, item: bytes) -> bytes:
    head, tail = b'{"model": "m", "junk": [', b"]}"
    count = max(1, (size - len(head) - len(tail)) // (len(item) + 1))
    return head + b",".join([item] * count) + tail


def _keys(size: int) -> bytes:
    count = size // 12
    return b'{"model": "m", ' + b", ".join(b'"k%07d": 0' % i for i in range(count)) + b"}"


def _string(size: int, piece: bytes) -> bytes:
    return b'{"model": "m", "junk": "' + piece * (size // len(piece)) + b'"}'


#: name -> how to build a body of about ``size`` bytes
SHAPES: dict[str, Callable[[int], bytes]] = {
    "tiny objects [{},{},...]": lambda n: _fill(n, b"{}"),
    "tiny arrays, spaced": lambda n: _fill(n, b"[ ]"),
    "deep: nests of 64 levels": lambda n: _fill(n, b"[" * 62 + b"]" * 62),
    "nests of 3 levels": lambda n: _fill(n, b"[[[]]]"),
    "long string": lambda n: _string(n, b"lorem ipsum "),
    "long string of brackets": lambda n: _string(n, b"[{"),
    "long string of escapes": lambda n: _string(n, b'\\"\\\\\\n'),
    "strings holding brackets": lambda n: _fill(n, b'["["]'),
    "many keys": _keys,
    "numbers": lambda n: _fill(n, b"-12345.678e-9"),
    "NaN and Infinity": lambda n: _fill(n, b"NaN,-Infinity"),
    "lone surrogates": lambda n: _fill(n, b'"\\ud800"'),
    "tiny objects, one NaN": lambda n: _fill(n, b"{}").replace(b"{}]", b"NaN]"),
}


def before(raw: bytes) -> float:
    """Seconds ``json.loads`` holds the loop."""
    start = time.thread_time()
    json.loads(raw)
    return time.thread_time() - start


async def after(raw: bytes) -> tuple[float, float, int]:
    """Seconds the reader holds the loop in all, in its longest piece, and its pauses."""
    pieces: list[float] = []
    resumed = time.thread_time()

    async def pause() -> None:
        nonlocal resumed
        pieces.append(time.thread_time() - resumed)
        await asyncio.sleep(0)
        resumed = time.thread_time()

    reader = BodyReader(pause=pause)
    resumed = time.thread_time()
    await reader.read_async(raw, DISPATCH)
    pieces.append(time.thread_time() - resumed)
    return sum(pieces), max(pieces), len(pieces) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=16, help="body size in MiB (16)")
    parser.add_argument("--runs", type=int, default=3, help="best of this many runs (3)")
    args = parser.parse_args()
    size = int(args.mib * 1024 * 1024)
    per16 = 16 * 1024 * 1024
    print(f"{'shape':28} {'MiB':>5} {'json.loads':>11} {'after':>8} {'longest':>8} pauses")
    print(f"{'':28} {'':>5} {'ms/16MiB':>11} {'ms/16MiB':>8} {'ms':>8}")
    for name, build in SHAPES.items():
        raw = build(size)
        scale = per16 / len(raw)
        gc.collect()
        old = min(before(raw) for _ in range(args.runs))
        gc.collect()
        runs = [asyncio.run(after(raw)) for _ in range(args.runs)]
        total, longest, pauses = min(runs)
        print(
            f"{name:28} {len(raw) / 2**20:5.1f} {old * 1e3 * scale:11.0f} "
            f"{total * 1e3 * scale:8.1f} {longest * 1e3:8.1f} {pauses:6d}"
        )


if __name__ == "__main__":
    main()

"""Chunks joined into one buffer a step at a time, in the lane all large work shares.

A body of tens of MiB arrives, or is collected, in chunks of a few hundred KiB. Joining
them in one step copies all of it at once (63 MiB: 45 ms, most of it touching fresh
memory), and nothing else runs meanwhile. :func:`joined` copies :data:`JOIN_STEP` bytes
a step (:func:`~controller.pacing.bulk_step`) into one bytearray instead. The chunks are
kept as they came until then: growing a bytearray as they arrived copied bodies that were
refused later too, and with several growing at once, each regrowth below glibc's 32 MiB
mmap threshold could move a whole array (up to 95 ms in one step, four 64 MiB arrays
grown 1 MiB at a time in a script).
"""

from __future__ import annotations

from .pacing import bulk_step

__all__ = ["COALESCE", "JOIN_STEP", "Chunks", "joined"]

#: bytes joined into one buffer between two steps of the lane (pacing.bulk_step)
JOIN_STEP = 512 << 10
#: chunks smaller than this are kept together, in pieces of about this size
COALESCE = 64 << 10


class Chunks:
    """Bytes as they arrive, kept as they came but for small chunks, which are put
    together in pieces of about :data:`COALESCE` bytes (a peer trickling a byte at a time
    would otherwise make a list entry of some 40 bytes of each byte)."""

    __slots__ = ("_tail", "parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self._tail = bytearray()

    def add(self, data: bytes) -> None:
        self.size += len(data)
        tail = self._tail
        if len(data) >= COALESCE:
            if tail:
                self.parts.append(bytes(tail))
                tail.clear()
            self.parts.append(data)
        else:
            tail += data
            if len(tail) >= COALESCE:
                self.parts.append(bytes(tail))
                tail.clear()

    def clear(self) -> None:
        self.parts.clear()
        self._tail.clear()
        self.size = 0

    async def joined(self) -> bytes | bytearray:
        """Everything added, as one buffer (:func:`joined`); empties this."""
        if self._tail:
            self.parts.append(bytes(self._tail))
            self._tail.clear()
        self.size = 0
        return await joined(self.parts)


async def joined(chunks: list[bytes]) -> bytes | bytearray:
    """``chunks`` as one buffer, joined :data:`JOIN_STEP` bytes a step of the lane when
    they are more (``chunks`` is emptied, each chunk dropped once copied). Nothing changes
    the bytearray afterwards; it is read as bytes are."""
    if len(chunks) <= 1:
        return chunks.pop() if chunks else b""
    if sum(map(len, chunks)) <= JOIN_STEP:
        whole = b"".join(chunks)
        chunks.clear()
        return whole
    buffer = bytearray()
    chunks.reverse()
    copied = 0
    while chunks:
        chunk = chunks.pop()
        buffer += chunk
        copied += len(chunk)
        if copied >= JOIN_STEP and chunks:
            copied = 0
            await bulk_step()
    return buffer

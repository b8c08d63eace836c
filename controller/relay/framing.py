"""The framing of a worker's HTTP/1.1 answer: status line, headers, then a chunked,
length-delimited or close-delimited body, decoded incrementally as bytes arrive."""

from __future__ import annotations

__all__ = ["MAX_HEAD_SIZE", "MAX_LINE_SIZE", "ResponseFraming", "UpstreamError"]

#: status line and headers larger than this are refused
MAX_HEAD_SIZE = 64 * 1024
#: a chunk-size line (or trailer line) longer than this is refused
MAX_LINE_SIZE = 4096

# Parser states.
_HEAD, _SIZE, _DATA, _DATA_END, _TRAILER, _LENGTH, _UNTIL_CLOSE, _DONE = range(8)


class UpstreamError(Exception):
    """The worker broke the protocol, went silent, or the connection failed."""


class ResponseFraming:
    """Where one response is in its framing; :meth:`feed` it the bytes as they come."""

    __slots__ = ("buf", "keep_alive", "left", "state")

    def __init__(self) -> None:
        self.state = _HEAD
        #: an incomplete line or head kept for the next :meth:`feed`
        self.buf = b""
        #: bytes left in the current chunk or in a length-delimited body
        self.left = 0
        #: the worker may take another request on this connection after this response
        self.keep_alive = True

    @property
    def at_chunk_start(self) -> bool:
        """Between two chunks with nothing buffered: the next bytes start a chunk."""
        return self.state == _SIZE and not self.buf

    @property
    def done(self) -> bool:
        return self.state == _DONE

    @property
    def until_close(self) -> bool:
        """The body ends when the worker closes the connection."""
        return self.state == _UNTIL_CLOSE

    @property
    def reusable(self) -> bool:
        """The response ended cleanly and the connection may carry another request."""
        return self.keep_alive and self.state == _DONE and not self.buf

    def spoil(self) -> None:
        """Bytes came after the response: the connection cannot be trusted again."""
        self.buf = b"?"

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return the body bytes it held and keep any incomplete rest.

        Raises :class:`UpstreamError` when the worker breaks HTTP/1.1 framing.
        """
        buf = self.buf + data if self.buf else data
        pieces: list[bytes] = []
        pos, n = 0, len(buf)
        while pos < n:
            state = self.state
            if state == _SIZE:
                end = _line_end(buf, pos, "chunk-size")
                if end < 0:
                    break
                line = buf[pos:end].split(b";", 1)[0].strip()
                try:
                    size = int(line, 16)
                except ValueError:
                    raise UpstreamError(f"worker sent a bad chunk size {line[:20]!r}") from None
                pos = end + 2
                if size < 0:
                    raise UpstreamError("worker sent a negative chunk size")
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.left, self.state = size, _DATA
            elif state in (_DATA, _LENGTH):
                take = min(self.left, n - pos)
                pieces.append(buf[pos : pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self.state = _DATA_END if state == _DATA else _DONE
            elif state == _DATA_END:
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise UpstreamError("worker sent a chunk without its CRLF")
                pos += 2
                self.state = _SIZE
            elif state == _TRAILER:
                end = _line_end(buf, pos, "trailer")
                if end < 0:
                    break
                if end == pos:
                    self.state = _DONE
                pos = end + 2
            elif state == _UNTIL_CLOSE:
                pieces.append(buf[pos:] if pos else buf)
                pos = n
            elif state == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > MAX_HEAD_SIZE:
                        raise UpstreamError("worker sent an oversized response head")
                    break
                self._status_and_headers(buf[pos:end])
                pos = end + 4
            else:  # _DONE: bytes after the response; the connection cannot be trusted again
                self.keep_alive = False
                pos = n
        self.buf = buf[pos:] if pos < n else b""
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def _status_and_headers(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise UpstreamError(f"worker sent no HTTP status line: {lines[0][:40]!r}")
        status = int(parts[1])
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            return
        if status != 200:
            raise UpstreamError(f"worker answered HTTP {status}")
        chunked, length = False, -1
        self.keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"connection":
                if b"close" in value.lower():
                    self.keep_alive = False
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise UpstreamError("worker sent a bad Content-Length") from None
        if chunked:
            self.state = _SIZE
        elif length > 0:
            self.left, self.state = length, _LENGTH
        elif length == 0:
            self.state = _DONE
        else:
            self.state = _UNTIL_CLOSE


def _line_end(buf: bytes, pos: int, what: str) -> int:
    """Where the line starting at ``pos`` ends, or -1 while it is incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0 and len(buf) - pos > MAX_LINE_SIZE:
        raise UpstreamError(f"worker sent an overlong {what} line")
    return end

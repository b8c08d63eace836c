"""The framing of a worker's HTTP/1.1 answer, decoded by llhttp, with a proxy's checks.

llhttp (through ``httptools``) parses the status line, the headers and the chunked or
length-delimited body without a byte of it passing through Python code. It still lets a
few things through that a proxy must not pass on, so :class:`ResponseFraming` refuses them
itself: more than one ``Transfer-Encoding`` or any value but ``chunked``, a status that is
not three digits, ``101`` (the relay speaks HTTP/1.1 only), an HTTP version other than 1.0
or 1.1, and answers that never end their head, their interim answers or their trailers.
"""

from __future__ import annotations

import httptools

__all__ = [
    "MAX_HEAD_SIZE",
    "MAX_INTERIM",
    "MAX_TRAILER_SIZE",
    "ResponseFraming",
    "UpstreamError",
]

#: status line and headers larger than this are refused (about: counted per header)
MAX_HEAD_SIZE = 64 * 1024
#: interim (1xx) answers allowed before the real one
MAX_INTERIM = 8
#: trailer fields after a chunked body larger than this are refused
MAX_TRAILER_SIZE = 16 * 1024


class UpstreamError(Exception):
    """The worker broke the protocol, went silent, or the connection failed."""


class ResponseFraming:
    """Where one answer is in its framing; :meth:`feed` it the bytes as they come.

    The body bytes of each :meth:`feed` are left in :attr:`pieces` for the caller to take.
    ``boundary`` and ``chunk_events`` let the caller recognise a read that held exactly one
    whole chunk, which it may forward as it came (see :mod:`controller.relay.upstream`).
    """

    __slots__ = (
        "_content_length",
        "_head_size",
        "_interim",
        "_parser",
        "_te",
        "_trailer_size",
        "_trailing",
        "boundary",
        "chunk_events",
        "done",
        "head_done",
        "keep_alive",
        "length",
        "pieces",
        "spoiled",
        "until_close",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        #: body bytes decoded by the last :meth:`feed`
        self.pieces: list[bytes] = []
        #: the last thing decoded ended a chunk (or a chunked answer's head)
        self.boundary = False
        #: chunk starts and ends decoded since the caller last set this to 0
        self.chunk_events = 0
        #: the final (non-1xx) answer's head is complete
        self.head_done = False
        #: the answer is complete
        self.done = False
        #: the body ends when the worker closes the connection
        self.until_close = False
        #: the worker may take another request on this connection after this answer
        self.keep_alive = False
        #: bytes came after the answer, or it was malformed: never reuse the connection
        self.spoiled = False
        #: the body's Content-Length, or -1
        self.length = -1
        self._head_size = 0
        self._interim = 0
        self._trailer_size = 0
        #: after a chunk's size line with no data since: the last chunk's trailers, maybe
        self._trailing = False
        self._te: list[bytes] = []
        self._content_length: bytes | None = None

    @property
    def reusable(self) -> bool:
        """The answer ended cleanly and the connection may carry another request."""
        return self.done and self.keep_alive and not self.spoiled

    def spoil(self) -> None:
        """Bytes came after the answer: the connection cannot be trusted again."""
        self.spoiled = True

    def feed(self, data: bytes) -> None:
        """Decode ``data``; raises :class:`UpstreamError` when the worker breaks HTTP/1.1."""
        head_done, trailing = self.head_done, self._trailing
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.done:  # garbage after a complete answer: only the connection is lost
                self.spoiled = True
                return
            self.spoiled = True
            cause = e.__context__
            if isinstance(cause, UpstreamError):
                raise cause from None
            raise UpstreamError(f"worker broke HTTP/1.1: {e}") from None
        # Reads that end nothing are counted whole: llhttp keeps an unfinished header line
        # in memory, and a worker could send one forever.
        if not head_done and not self.head_done:
            self._head_size += len(data)
            if self._head_size > MAX_HEAD_SIZE:
                self._refuse("worker sent an oversized response head")
        elif trailing and self._trailing and not self.done:
            self._trailer_size += len(data)
            if self._trailer_size > MAX_TRAILER_SIZE:
                self._refuse("worker sent oversized trailers")

    def _refuse(self, reason: str) -> None:
        self.spoiled = True
        raise UpstreamError(reason)

    # -- llhttp's callbacks (an exception raised here ends feed_data) ------------------------

    def on_message_begin(self) -> None:
        if self.done:
            self.spoiled = True  # a second answer to one request
            raise UpstreamError("worker sent bytes after its answer")

    def on_status(self, status: bytes) -> None:
        self._head_size += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 4
        if self.head_done:
            self._trailer_size += size
            if self._trailer_size > MAX_TRAILER_SIZE:
                self._refuse("worker sent oversized trailers")
            return
        self._head_size += size
        if self._head_size > MAX_HEAD_SIZE:
            self._refuse("worker sent an oversized response head")
        name = name.lower()
        if name == b"transfer-encoding":
            self._te.append(value)
        elif name == b"content-length":
            # llhttp refuses a second one, even with the same value, and any non-digit.
            self._content_length = value

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 100:  # llhttp reads up to three digits: "099" is 99
            self._refuse(f"worker sent a status that is not three digits: {status:03d}")
        if parser.get_http_version() not in ("1.1", "1.0"):
            self._refuse(f"worker answered in HTTP/{parser.get_http_version()}")
        if status == 101:
            self._refuse("worker switched protocols (101): the relay speaks HTTP/1.1 only")
        te, self._te = self._te, []
        content_length, self._content_length = self._content_length, None
        if status < 200:
            self._interim += 1
            if self._interim > MAX_INTERIM:
                self._refuse(f"worker sent more than {MAX_INTERIM} interim (1xx) answers")
            return
        if status != 200:
            self._refuse(f"worker answered HTTP {status}")
        if te:
            if len(te) != 1 or te[0].strip().lower() != b"chunked":
                values = b", ".join(te).decode("latin-1")[:60]
                self._refuse(f"worker sent a Transfer-Encoding other than chunked: {values!r}")
            self.boundary = True
        elif content_length is not None:
            self.length = int(content_length)  # digits only: llhttp checked
        else:
            self.until_close = True
        self.keep_alive = parser.should_keep_alive()
        self.head_done = True

    def on_message_complete(self) -> None:
        if not self.head_done:  # the end of an interim answer
            return
        self.keep_alive = self.keep_alive and self._parser.should_keep_alive()
        self.done = True

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)
        self._trailing = False

    def on_chunk_header(self) -> None:
        self.chunk_events += 1
        self.boundary = False
        self._trailing = True

    def on_chunk_complete(self) -> None:
        self.chunk_events += 1
        self.boundary = True

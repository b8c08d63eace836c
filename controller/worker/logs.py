"""Log lines on stderr: text for people, or one JSON object a line for log pipelines.

Both programs (``fc-controller``, ``fc-demo-worker``) configure logging through
:func:`configure_logging`. Standard library only. A record may carry ``request_id`` (set by
a filter the program adds) and ``bare`` (the start-up line: printed as its message alone
in the text format, so scripts that wait for it keep working).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from .tokens import redact_urls

__all__ = [
    "LOG_FORMATS",
    "JsonFormatter",
    "RedactUrls",
    "TextFormatter",
    "announce",
    "configure_logging",
    "json_line",
]

LOG_FORMATS = ("text", "json")


class TextFormatter(logging.Formatter):
    """``time | level | logger | [request id |] message``, tracebacks on the lines after."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s | %(levelname)s | %(name)s | %(request_tag)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "bare", False):
            return record.getMessage()
        request_id = getattr(record, "request_id", None)
        record.request_tag = f"{request_id} | " if request_id else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, and where there is one ``request_id``, ``exception`` (the traceback as
    one string) and ``stack``. Non-ASCII characters are escaped, so no character of a
    message can break the line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def _timestamp(created: float) -> str:
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_line(message: str, level: int = logging.ERROR, logger: str = "controller") -> str:
    """``message`` as the JSON formatter writes it: for what is written before logging
    is configured (a command-line error)."""
    record = logging.LogRecord(logger, level, "", 0, message, None, None)
    return JsonFormatter().format(record)


class RedactUrls(logging.Filter):
    """Redacts credentials inside URLs (``http://user:password@host``) from every line a
    handler writes, whichever library logged it, tracebacks included."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if "@" in message or (record.exc_text and "@" in record.exc_text):
            record.msg, record.args = redact_urls(message), None
            record.exc_text = record.exc_text and redact_urls(record.exc_text)
        return True


def configure_logging(
    level: str, log_format: str = "text", filters: Iterable[logging.Filter] = ()
) -> None:
    """Log to stderr at ``level`` in ``log_format`` (``text`` or ``json``), credentials in
    URLs redacted, through ``filters`` too. Does nothing to a root logger that has
    handlers already (as :func:`logging.basicConfig`).

    In the JSON format, warnings and an exception that would end the program are logged
    too, so nothing multi-line reaches stderr.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RedactUrls())
    for extra in filters:
        handler.addFilter(extra)
    root = logging.getLogger()
    if root.handlers:
        return
    logging.basicConfig(level=level.upper(), handlers=[handler])
    if log_format == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        sys.unraisablehook = _log_unraisable


def _log_uncaught(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    logging.getLogger("controller").critical(
        "Uncaught exception", exc_info=(kind, value, traceback)
    )


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    # What Python would print as "Exception ignored in ...": a destructor's error, say.
    log = logging.getLogger("controller")
    value = unraisable.exc_value
    exc_info = (unraisable.exc_type, value, unraisable.exc_traceback) if value else None
    log.error(
        "%s: %r", unraisable.err_msg or "Exception ignored in", unraisable.object, exc_info=exc_info
    )


def announce(logger: logging.Logger, message: str) -> None:
    """Write ``message`` whatever the log level: the line scripts wait for. The text
    format prints it alone; the JSON format as any other line, at INFO."""
    if not logger.hasHandlers():
        print(message, file=sys.stderr, flush=True)
        return
    record = logger.makeRecord(
        logger.name, logging.INFO, "", 0, message, (), None, extra={"bare": True}
    )
    logger.handle(record)

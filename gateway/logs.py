"""Logging: plain text or JSON lines, and the one summary line per session."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, cast

from .config import LogFormat

log = logging.getLogger("smtpgate")
session_log = logging.getLogger("smtpgate.session")
_worker: int | None = None  # this process's index under a supervisor (workers > 1)


def set_worker(index: int) -> None:
    """From here every line says which worker wrote it (``worker`` after ``logger``)."""
    global _worker
    _worker = index


class _JsonFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        doc = self.head(record.created, record.levelname.lower(), record.name)
        fields = getattr(record, "fields", None)
        if fields is not None:
            doc["event"] = record.getMessage()
            doc.update(fields)
        else:
            doc["msg"] = record.getMessage()
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return _dumps(doc)

    def head(self, created: float, level: str, logger: str) -> dict[str, Any]:
        second = int(created)
        if second != self._second:  # one strftime per second, not per line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                              time.gmtime(second))
        head: dict[str, Any] = {"ts": f"{self._stamp}.{int((created - second) * 1000):03d}Z",
                                "level": level, "logger": logger}
        if _worker is not None:
            head["worker"] = _worker
        return head


_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode
# The handler the session line may be written to directly (see session_line), or None.
_direct: tuple[logging.StreamHandler[Any], _JsonFormatter] | None = None


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """ISO 8601 in UTC with milliseconds, as the JSON lines: 2026-12-07T05:07:47.123Z
        (logging's default has neither the zone nor the T)."""
        second = int(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{stamp}.{int((record.created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if _worker is not None:
            fields = {"worker": _worker, **(fields or {})}
        if fields is not None:
            # key=value, values with spaces quoted: greppable and awk-able.
            text = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
            record = logging.makeLogRecord({**record.__dict__, "msg": f"{record.msg} {text}",
                                            "args": ()})
        return super().format(record)


def _quote(value: object) -> str:
    s = str(value)
    return json.dumps(s) if (" " in s or '"' in s or not s) else s


def session_line(fields: dict[str, object]) -> None:
    """The one line per session (``event=session`` on ``smtpgate.session`` at INFO).

    Once per session, so on the hot path: with the JSON format and nothing but our own
    handler on the way, the line the formatter would make is written to the handler's
    stream directly, without a LogRecord and the handler machinery (about a third of the
    session line's cost, docs/performance.md).  Otherwise through ``logging``."""
    if not session_log.isEnabledFor(logging.INFO):
        return
    direct = _direct
    if direct is None or session_log.handlers or len(log.handlers) != 1:
        session_log.log(logging.INFO, "session", extra={"fields": fields})
        return
    handler, formatter = direct
    doc = formatter.head(time.time(), "info", "smtpgate.session")
    doc["event"] = "session"
    doc.update(fields)
    try:
        handler.stream.write(_dumps(doc) + "\n")
        handler.stream.flush()
    except (OSError, ValueError):
        # A stream that cannot be written (a closed or broken stderr): what logging does
        # with it (handleError), never an exception out of the session's end.
        session_log.log(logging.INFO, "session", extra={"fields": fields})


def setup(fmt: LogFormat, level: str) -> None:
    """Idempotent: a reload may switch format or level."""
    global _direct
    # Per record, logging would walk the stack for the caller's file and line and look up
    # thread and process names; neither formatter prints them, and the summary line is
    # written once per session (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger("smtpgate")
    handler = next((h for h in root.handlers if getattr(h, "_smtpgate", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._smtpgate = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
        # asyncio's own warnings go through the same formatter: a JSON log stays JSON.
        aio = logging.getLogger("asyncio")
        aio.addHandler(handler)
        aio.propagate = False
    else:
        # Follow the current stderr (tests swap it; setStream would flush a closed one).
        handler.stream = sys.stderr  # type: ignore[attr-defined]
    formatter = _JsonFormatter() if fmt is LogFormat.JSON else _TextFormatter()
    handler.setFormatter(formatter)
    root.setLevel(level)
    plain = not (handler.filters or root.filters or session_log.filters)
    _direct = (cast("logging.StreamHandler[Any]", handler), formatter) \
        if isinstance(formatter, _JsonFormatter) and plain else None


def event(logger: logging.Logger, name: str, level: int = logging.INFO,
          **fields: object) -> None:
    """A structured log line: ``name`` plus key/value fields (no field may be ``level``)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields})

"""The gateway's log lines as a test reads them in process: records of the "smtpgate"
logger kept while a test runs (the ``events`` fixtures of tests/test_stsfetch.py and
tests/test_tlsrptsend.py), and their fields by event name."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def kept_records(level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """The records of the "smtpgate" logger while inside, whatever handlers other tests
    left; the logger's level is put back afterwards."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("smtpgate")
    handler, before = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


def named(records: list[logging.LogRecord], name: str) -> list[dict[str, Any]]:
    """The fields (and ``level``) of the records of event ``name``."""
    return [{"level": r.levelno, **getattr(r, "fields", {})} for r in records
            if r.getMessage() == name]

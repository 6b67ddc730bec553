"""Both log formats carry the same fields."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator

import pytest

from gateway import logs
from gateway.config import LogFormat


@pytest.mark.parametrize("fmt", list(LogFormat))
def test_session_line(fmt: LogFormat, capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(fmt, "INFO")
    logs.event(logs.session_log, "session", logging.INFO, client="198.51.100.2:4000",
               outcome="relayed", reason="two words", bytes_up=12)
    logs.event(logs.session_log, "hidden", logging.DEBUG, x=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    if fmt is LogFormat.JSON:
        doc = json.loads(err[0])
        assert doc["event"] == "session" and doc["logger"] == "smtpgate.session"
        assert (doc["client"], doc["outcome"], doc["reason"], doc["bytes_up"]) == (
            "198.51.100.2:4000", "relayed", "two words", 12)
    else:
        assert err[0].endswith(' INFO smtpgate.session: session client=198.51.100.2:4000 '
                               'outcome=relayed reason="two words" bytes_up=12')
        # The same stamp as the JSON lines: ISO 8601, UTC, milliseconds.
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z",
                            err[0].split(" ", 1)[0]), err[0]


@contextlib.contextmanager
def our_handler_only() -> Iterator[None]:
    """The gateway's logger as in the gateway: our handler alone (pytest attaches capture
    handlers while a test runs; with them session_line goes through logging, and the
    direct line would go untested)."""
    logger = logging.getLogger("smtpgate")
    foreign = [h for h in logger.handlers if not getattr(h, "_smtpgate", False)]
    for h in foreign:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in foreign:
            logger.addHandler(h)


@pytest.mark.parametrize("fmt", list(LogFormat))
def test_the_session_line_written_directly_is_the_line_logging_writes(
        fmt: LogFormat, capsys: pytest.CaptureFixture[str]) -> None:
    with our_handler_only():
        _direct_line_is_logging_line(fmt, capsys)


def _direct_line_is_logging_line(fmt: LogFormat, capsys: pytest.CaptureFixture[str]) -> None:
    """session_line() skips the logging machinery for JSON; what it writes must not differ
    (but for the millisecond stamp) from the line through logging, nor in text format."""
    logs.setup(fmt, "INFO")
    assert (logs._direct is not None) == (fmt is LogFormat.JSON)  # the path under test
    fields: dict[str, object] = {"direction": "outbound", "client": "[2001:db8::5]:4000",
                                 "outcome": "relayed", "bytes_up": 12, "duration": 0.125,
                                 "reason": 'a "quoted" word'}
    logs.session_line(fields)
    logs.event(logs.session_log, "session", logging.INFO, **fields)
    logs.setup(fmt, "WARNING")
    logs.session_line(fields)  # below the level: nothing
    logs.setup(fmt, "INFO")
    direct, through = capsys.readouterr().err.splitlines()
    if fmt is LogFormat.JSON:
        a, b = json.loads(direct), json.loads(through)
        for doc in (a, b):  # the same form; the instant may differ
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc.pop("ts"))
        assert a == b and list(a) == list(b)
    else:
        assert direct.split(" ", 2)[2] == through.split(" ", 2)[2]


def test_a_session_line_to_a_broken_stream_does_not_raise(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Written directly, the line meets a broken stderr as logging would: reported by
    logging's handleError, not raised into the session's end."""

    class Broken:
        def write(self, _: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    logs.setup(LogFormat.JSON, "INFO")
    assert logs._direct is not None  # the direct path is the one under test
    with our_handler_only():
        [handler] = logging.getLogger("smtpgate").handlers
        handler.stream = Broken()  # type: ignore[attr-defined]
        try:
            logs.session_line({"outcome": "relayed"})
        finally:
            logs.setup(LogFormat.JSON, "INFO")  # back to the (captured) stderr
    assert "Logging error" in capsys.readouterr().err

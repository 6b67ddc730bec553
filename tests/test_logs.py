"""Both log formats carry the same fields."""

from __future__ import annotations

import json
import logging

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
        assert err[0].endswith('smtpgate.session: session client=198.51.100.2:4000 '
                               'outcome=relayed reason="two words" bytes_up=12')

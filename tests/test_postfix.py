"""Real Postfix through the gateway: volume with smtp-source → smtp-sink, and what Postfix's
smtp client does when the gateway cannot reach the upstream (which failure signal it
handles best)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatelab import netlab, postfix_instance
from gatelab.gatewayproc import GatewayProcess, gateway_config
from gatelab.netlab import PEER_V4, PEER_V4_ALT, PEER_V6, Lab
from gatelab.postfix_instance import PostfixInstance, SmtpSink, null_client_settings, smtp_source

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        lab.redirect_port25(10025)
        yield lab


@pytest.mark.parametrize(("dst", "count", "sessions"), [(PEER_V4, 1000, 20), (PEER_V6, 300, 10)])
def test_smtp_source_to_sink_through_gateway_loses_nothing(
        lab: Lab, tmp_path: Path, dst: str, count: int, sessions: int) -> None:
    with SmtpSink(lab.peer, dst, 25, tmp_path) as sink, \
            GatewayProcess(lab.gw, tmp_path, gateway_config()) as gw:
        # Policy none: this is the relay's volume proof (the upgrade's is in
        # tests/test_upgrade_netns.py, where a DNS lab answers the recipient checks).
        r = smtp_source(lab.mta, dst, 25, count=count, sessions=sessions, size=2000,
                        sender="from@example.com", rcpt="to@example.net", timeout=240)
        assert r.returncode == 0, r.stderr
        msgs = sink.wait_count(count, timeout=60)
        assert len(msgs) == count
        assert all(m.mail_args.startswith("<from@example.com>") for m in msgs)
        sessions_seen = gw.wait_sessions(count, timeout=60)
    assert len(sessions_seen) == count
    # smtp-source closes right after sending QUIT, so the 221 that follows meets a closed
    # socket and its kernel answers with a reset: "client_reset" after a complete session.
    assert {s["outcome"] for s in sessions_seen} <= {"relayed", "client_reset"}
    assert sum(s["bytes_up"] for s in sessions_seen) > count * 2000


# What Postfix's smtp client logs for each way the gateway can say "upstream unreachable".
POSTFIX_SAYS = {
    "reply": r"refused to talk to me: 421 4\.4\.1 smtpgate: upstream refused: "
             r"203\.0\.113\.2:25 \(Connection refused\)",
    # The reset may come before Postfix's connect() returns: then it is a connect failure.
    "reset": r"(?:lost connection with 203\.0\.113\.2\[203\.0\.113\.2\] while receiving the "
             r"initial server greeting|connect to 203\.0\.113\.2\[203\.0\.113\.2\]:25: "
             r"Connection reset by peer)",
}


@pytest.mark.parametrize("signal_", ["reply", "reset"])
def test_postfix_tries_the_next_host_when_the_upstream_is_unreachable(
        lab: Lab, tmp_path: Path, signal_: str) -> None:
    """Relayhost 203.0.113.2 has no server; the fallback 203.0.113.3 has one.  Both go
    through the gateway.  Either failure signal makes Postfix move on to the fallback in the
    same delivery attempt; only the 421 tells the operator why (in the log and the queue),
    which is why `reply` is the default."""
    text = gateway_config(on_failure=signal_)
    with SmtpSink(lab.peer, PEER_V4_ALT, 25, tmp_path) as sink, \
            GatewayProcess(lab.gw, tmp_path, text) as gw, \
            PostfixInstance(lab.mta, tmp_path, null_client_settings(
                "[203.0.113.2]:25", "[203.0.113.3]:25")) as mta:
        mta.sendmail("alice@example.com", "bob@example.net", b"Subject: t\r\n\r\nhello\r\n")
        [msg] = sink.wait_count(1)
        assert b"hello" in msg.content
        failed = mta.wait_log(rf"postfix/smtp\[(\d+)\]: .*{POSTFIX_SAYS[signal_]}")
        sent = mta.wait_log(r"postfix/smtp\[(\d+)\]: (\w+): to=<bob@example\.net>, "
                            r"relay=203\.0\.113\.3\[203\.0\.113\.3\]:25, .*status=sent")
        # Same smtp process: one delivery attempt, no deferral in between.
        assert failed.group(1) == sent.group(1)
        assert "status=deferred" not in mta.log_text()
        mta.wait_queue_empty()
        outcomes = [s["outcome"] for s in gw.wait_sessions(2)]
    assert sorted(outcomes) == ["relayed", "upstream_failed"]


def test_postfix_keeps_the_mail_with_the_reason_and_delivers_it_once_later(
        lab: Lab, tmp_path: Path) -> None:
    with GatewayProcess(lab.gw, tmp_path, gateway_config()), \
            PostfixInstance(lab.mta, tmp_path, null_client_settings("[203.0.113.2]:25")) as mta:
        mta.sendmail("alice@example.com", "bob@example.net", b"Subject: t\r\n\r\nlater\r\n")
        mta.wait_log(r"status=deferred \(host 203\.0\.113\.2\[203\.0\.113\.2\] refused to talk "
                     r"to me: 421 4\.4\.1 smtpgate: upstream refused")
        [entry] = mta.queue()
        reasons = [r["delay_reason"] for r in entry["recipients"]]
        assert any("421 4.4.1 smtpgate: upstream refused" in r for r in reasons), reasons
        # The upstream comes back: the next retry delivers it, exactly once.
        with SmtpSink(lab.peer, PEER_V4, 25, tmp_path) as sink:
            mta.flush()
            [msg] = sink.wait_count(1, timeout=20)
            assert b"later" in msg.content
            mta.wait_queue_empty()
            assert sink.count() == 1
    assert len(re.findall(r"status=sent", mta.log_text())) == 1

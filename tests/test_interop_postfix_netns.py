"""Issue 19's interoperability matrix, the Postfix 3.7 row as a sender, on the same world as
every other MTA's row (gatelab/interop.py's outbound_world): Debian's Postfix in mta, a
relayhost naming the address a test names, through the outbound gateway to the Postfix peers.
Postfix at ``smtp_tls_security_level = none`` is the legacy sender; at ``may`` (Debian's
default) it does its own STARTTLS.  Postfix as the legacy receiver behind the inbound gateway
is tests/test_inbound_netns.py's and tests/test_shield_netns.py's (docs/interop.md).

Postfix's queue (postqueue -j) and its log are the MTA's own word; the gateway's session
lines, the peers' logs and tcpdump on gw say what crossed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gatelab import dnslab, netlab, postfix_instance
from gatelab.capture import Capture
from gatelab.interop import (
    TWO_RECIPIENTS,
    Outbound,
    body_of,
    client_bytes,
    delivered_once,
    new_marker,
    outbound_world,
    peer_summary,
    tricky_body,
)
from gatelab.netlab import GW_MTA_IF, GW_PEER_IF, PEER_V4
from gatelab.postfix_instance import PostfixInstance, null_client_settings

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture(scope="module")
def outbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outbound]:
    with outbound_world(tmp_path_factory.mktemp("postfix-out")) as world:
        yield world


@contextmanager
def sender(o: Outbound, host: str, name: str, tls: str = "none") -> Iterator[PostfixInstance]:
    """Postfix in mta relaying everything to ``host`` at ``smtp_tls_security_level=tls``;
    a deferred message waits for the test's flush (no retry of its own meanwhile)."""
    settings = null_client_settings(f"[{host}]:25")
    settings.update({"smtp_tls_security_level": tls, "smtp_tls_loglevel": "1",
                     "queue_run_delay": "1h", "minimal_backoff_time": "1h",
                     "maximal_backoff_time": "1h"})
    with PostfixInstance(o.lab.mta, o.work, settings, name=name) as mta:
        yield mta


def status_line(mta: PostfixInstance, rcpt: str, status: str, since: int = 0) -> str:
    """The smtp client's log line for ``rcpt`` with ``status`` (sent, deferred)."""
    return mta.wait_log(rf"postfix\S*/smtp\[\d+\]: \w+: to=<{re.escape(rcpt)}>.*"
                        rf"status={status} .*", since=since).group(0)


def test_legacy_postfix_to_a_dane_peer_is_upgraded_and_verified(outbound: Outbound) -> None:
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    with sender(outbound, PEER_V4, "pf-dane") as mta, \
            Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "pf-dane.pcap") as cap:
        mta.sendmail("alice@example.com", "dane@example.net",
                     b"Subject: postfix dane\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
        line = status_line(mta, "dane@example.net", "sent")
        mta.wait_queue_empty()
    outbound.upgraded_by_dane(seen, cap, marker, message)
    print(f"\nPOSTFIX outbound legacy -> DANE peer: {line.split(': ', 1)[1]}")


@pytest.mark.parametrize(("host", "tls"), [
    ("203.0.113.8", None),  # policy none: the static passthrough, the bare pump
    ("203.0.113.7", "plaintext"),  # no STARTTLS offered: read by the envelope tracker
])
def test_legacy_postfix_to_a_plain_peer_passes_byte_exact(outbound: Outbound, host: str,
                                                         tls: str | None) -> None:
    """The body Postfix was given is the body the peer stored, byte for byte, and what
    Postfix put on the wire (DATA, dot-stuffed) is what reached the peer."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    body = tricky_body(marker)
    work = outbound.work
    with sender(outbound, host, f"pf-plain{host[-1]}") as mta, \
            Capture(outbound.lab.gw, GW_MTA_IF, work / f"pf-mta{host}.pcap", "tcp port 25") as m, \
            Capture(outbound.lab.gw, GW_PEER_IF, work / f"pf-peer{host}.pcap",
                    "tcp port 25") as p:
        mta.sendmail("alice@example.com", "plain@example.net", b"Subject: bytes\n\n" + body)
        message = delivered_once(outbound.plain_peer, marker)
        status_line(mta, "plain@example.net", "sent")
        mta.wait_queue_empty()
    sent, got = hashlib.sha256(body).hexdigest(), hashlib.sha256(body_of(message)).hexdigest()
    assert got == sent, (body, body_of(message))
    wire = client_bytes(m.path)
    assert marker in wire and b"\r\n..\r\n...two dots\r\n" in wire, wire  # DATA, dot-stuffed
    assert client_bytes(p.path) == wire  # the gateway's part: not one byte changed
    s = outbound.session_since(f"{host}:25", seen)
    assert (s["outcome"], s.get("tls")) == ("relayed", tls), s
    print(f"\nPOSTFIX outbound legacy -> plain {host} (tls={tls}): body sha256 {sent[:16]}… "
          f"delivered; {len(wire)} bytes from Postfix = {len(wire)} bytes to the peer")


def test_legacy_postfix_under_a_wrong_tlsa_keeps_the_message_and_delivers_once_after_the_fix(
        outbound: Outbound) -> None:
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    try:
        with sender(outbound, "203.0.113.9", "pf-fix") as mta, \
                Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "pf-fix.pcap") as cap:
            mta.sendmail("alice@example.com", "fix@fix.test",
                         b"Subject: postfix wrong tlsa\n\n" + marker + b"\n")
            deferral = status_line(mta, "fix@fix.test", "deferred")
            assert "421 4.7.5 smtpgate: TLS to peer failed: no matching record" in deferral
            [held] = mta.queue_ids()
            outbound.deferred_by_the_wrong_tlsa(seen, marker)

            outbound.fix_the_tlsa()
            mark = mta.log_mark()
            mta.flush()
            delivered_once(outbound.tls_peer, marker)
            retried = status_line(mta, "fix@fix.test", "sent", since=mark)
            assert f": {held}: to=<fix@fix.test>" in retried, retried  # the same message
            mta.wait_queue_empty()
        assert cap.packets() > 10 and not cap.contains(marker)
        outbound.verified_after_the_fix(seen)
        print(f"\nPOSTFIX outbound wrong TLSA: {deferral.split(': ', 1)[1]}\n"
              f"  after the fix: {retried.split(': ', 1)[1]}")
    finally:
        outbound.unfix_the_tlsa()


@pytest.mark.parametrize(("host", "asks", "other", "why"), TWO_RECIPIENTS)
def test_legacy_postfix_several_recipients_only_the_dane_domain_is_deferred(
        outbound: Outbound, host: str, asks: str, other: str, why: str) -> None:
    marker = new_marker()
    peer = outbound.tls_peer if host == "203.0.113.3" else outbound.plain_peer
    with sender(outbound, host, f"pf-two{host[-1]}") as mta:
        mta.sendmail("alice@example.com", [asks, other], b"Subject: two\n\n" + marker + b"\n")
        message = delivered_once(peer, marker)
        assert f"X-Original-To: {other}".encode() in message
        deferred = status_line(mta, asks, "deferred")
        assert why in deferred and "in reply to RCPT TO command" in deferred, deferred
        status_line(mta, other, "sent")
        [entry] = mta.queue()
        assert [r["address"] for r in entry["recipients"]] == [asks], entry
    print(f"\nPOSTFIX outbound two recipients via {host}: {deferred.split(': ', 1)[1]}")


@pytest.mark.parametrize(("host", "tls"), [(PEER_V4, "dane"), ("203.0.113.8", None)])
def test_legacy_postfix_pipelining_crosses_the_gateway(outbound: Outbound, host: str,
                                                       tls: str | None) -> None:
    """Postfix pipelines MAIL, RCPT and DATA in one segment (seen on the MTA's link, in
    clear); its client has no BDAT.  The peer's session summary counts each command once."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    receiver = outbound.tls_peer if tls else outbound.plain_peer
    mark = receiver.log_mark()
    with sender(outbound, host, f"pf-pipe{host[-1]}") as mta, \
            Capture(outbound.lab.gw, GW_MTA_IF, outbound.work / f"pf-pipe{host}.pcap") as cap:
        mta.sendmail("alice@example.com", "pipe@example.net",
                     b"Subject: postfix pipelining\n\n" + marker + b"\n")
        delivered_once(receiver, marker)
    assert re.search(rb"MAIL FROM:<alice@example\.com>[^\r]*\r\nRCPT TO:<pipe@example\.net>"
                     rb"[^\r]*\r\nDATA\r\n", cap.data()), "not pipelined"
    summary = peer_summary(receiver, mark, tls)
    assert "data=1" in summary and "bdat=" not in summary, summary
    s = outbound.session_since(f"{host}:25", seen)
    assert (s["outcome"], s.get("tls")) == ("relayed", tls), s
    print(f"\nPOSTFIX outbound PIPELINING via {host} (tls={tls}): peer saw {summary}")


def test_postfix_at_may_to_a_peer_without_tlsa_is_left_end_to_end(outbound: Outbound) -> None:
    """Debian's default, ``may``, toward a peer that publishes no TLSA: Postfix's STARTTLS
    is its own and the gateway steps aside.  (Toward a DANE peer the gateway takes it over:
    tests/test_takeover_netns.py::test_a_may_mta_gets_dane_and_an_attacker_gets_nothing.)"""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    mark = outbound.tls_peer.log_mark()
    with sender(outbound, "203.0.113.3", "pf-may", tls="may") as mta, \
            Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "pf-may.pcap") as cap:
        mta.sendmail("alice@example.com", "own@example.net",
                     b"Subject: postfix own tls\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
        # Its own TLS, with the peer's certificate (not the gateway's): anonymous at may.
        own = mta.wait_log(r"Untrusted TLS connection established to 203\.0\.113\.3"
                           r"\[203\.0\.113\.3\]:25: TLSv1\.[23].*").group(0)
        status_line(mta, "own@example.net", "sent")
    assert not cap.contains(marker)
    outbound.tls_peer.wait_log(r"TLS connection established from \S+\[[\d.]+\]", since=mark)
    assert b"(using TLSv1." in message
    outbound.stepped_aside(seen)
    print(f"\nPOSTFIX outbound at may -> no TLSA: {own.split(': ', 1)[1]}")

"""Issue 19's interoperability matrix, the Exim 4.96 row (Debian's binary from its private
root, gatelab/exim_client.py), with the real programs in the namespace lab.
docs/interop.md holds the matrix as these tests last printed it.

The two worlds (outbound: Exim sends; inbound: Exim receives behind the offload) are
gatelab/interop.py's.

Exim's ``-bp``, its main log and its Maildir are the MTA's own word; the gateway's session
lines, the Postfix peers' logs and tcpdump on gw say what crossed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import pytest

from gatelab import dnslab, exim_client, netlab, postfix_instance
from gatelab.capture import Capture
from gatelab.exim_client import EximClient, EximServer
from gatelab.interop import (
    CARRIERS,
    TWO_RECIPIENTS,
    Inbound,
    Outbound,
    body_of,
    client_bytes,
    dane_sender_delivers,
    delivered_once,
    ehlo_of,
    envelope_sender,
    inbound_world,
    new_marker,
    outbound_world,
    peer_summary,
    shield_holds,
    smuggled_through,
    tricky_body,
)
from gatelab.netlab import GW_MTA_IF, GW_PEER_IF, MTA_V4, PEER_V4

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable() or exim_client.exim_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

@pytest.fixture(scope="module")
def outbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outbound]:
    with outbound_world(tmp_path_factory.mktemp("exim-out")) as world:
        yield world


def test_legacy_exim_to_a_dane_peer_is_upgraded_and_verified(outbound: Outbound) -> None:
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    with EximClient(outbound.lab.mta, PEER_V4) as exim, \
            Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "dane.pcap") as cap:
        exim.send("alice@example.com", "dane@example.net",
                  b"Subject: exim dane\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
        log = exim.log()
        assert exim.queued() == "" and " Completed" in log, log
        # Exim itself spoke plaintext (no X=... on its delivery line): the TLS is the gateway's.
        [line] = re.findall(r"^.* => dane@example\.net .*$", log, re.MULTILINE)
        assert "H=203.0.113.2 [203.0.113.2]" in line and " X=" not in line, line
    outbound.upgraded_by_dane(seen, cap, marker, message)
    print(f"\nEXIM outbound legacy -> DANE peer: {line.split(' ', 2)[2]}")


@pytest.mark.parametrize(("host", "tls"), [
    ("203.0.113.8", None),  # policy none: the static passthrough, the bare pump
    ("203.0.113.7", "plaintext"),  # no STARTTLS offered: read by the envelope tracker
])
def test_legacy_exim_to_a_plain_peer_passes_byte_exact(outbound: Outbound, host: str,
                                                      tls: str | None) -> None:
    """The body Exim was given is the body the peer stored, byte for byte (dots, which a
    DATA client stuffs and BDAT does not, trailing blanks, a tab, 8-bit text, a 990-byte
    line, an empty line); and what Exim put on the wire is what reached the peer."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    body = tricky_body(marker)
    work = outbound.work
    with EximClient(outbound.lab.mta, host) as exim, \
            Capture(outbound.lab.gw, GW_MTA_IF, work / f"mta{host}.pcap", "tcp port 25") as mta, \
            Capture(outbound.lab.gw, GW_PEER_IF, work / f"peer{host}.pcap", "tcp port 25") as peer:
        exim.send("alice@example.com", "plain@example.net", b"Subject: bytes\n\n" + body)
        message = delivered_once(outbound.plain_peer, marker)
        assert exim.queued() == "", exim.log()
    sent, got = hashlib.sha256(body).hexdigest(), hashlib.sha256(body_of(message)).hexdigest()
    assert got == sent, (body, body_of(message))
    wire = client_bytes(mta.path)
    assert marker in wire and b"\r\nBDAT " in wire, wire
    assert client_bytes(peer.path) == wire  # the gateway's part: not one byte changed
    s = outbound.session_since(f"{host}:25", seen)
    assert (s["outcome"], s.get("tls")) == ("relayed", tls), s
    print(f"\nEXIM outbound legacy -> plain {host} (tls={tls}): body sha256 {sent[:16]}… "
          f"delivered; {len(wire)} bytes from Exim = {len(wire)} bytes to the peer")


def test_legacy_exim_under_a_wrong_tlsa_keeps_the_message_and_delivers_once_after_the_fix(
        outbound: Outbound) -> None:
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    try:
        with EximClient(outbound.lab.mta, "203.0.113.9") as exim, \
                Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "fix.pcap") as cap:
            exim.send("alice@example.com", "fix@fix.test",
                      b"Subject: exim wrong tlsa\n\n" + marker + b"\n")
            deferral = exim.wait_log(r"^.* == fix@fix\.test .*defer.*$").group(0)
            assert "421 4.7.5 smtpgate: TLS to peer failed: no matching record" in deferral
            [held] = exim.message_ids()
            outbound.deferred_by_the_wrong_tlsa(seen, marker)

            outbound.fix_the_tlsa()
            mark = exim.log_mark()
            exim.run_queue()
            delivered_once(outbound.tls_peer, marker)
            retried = exim.wait_log(r"^.* => fix@fix\.test .*$", since=mark).group(0)
            assert held in retried and exim.queued() == "", exim.log()
        assert cap.packets() > 10 and not cap.contains(marker)
        outbound.verified_after_the_fix(seen)
        print(f"\nEXIM outbound wrong TLSA: {deferral.split(' ', 2)[2]}\n"
              f"  after the fix: {retried.split(' ', 2)[2]}")
    finally:
        outbound.unfix_the_tlsa()


@pytest.mark.parametrize(("host", "asks", "other", "why"), TWO_RECIPIENTS)
def test_legacy_exim_several_recipients_only_the_dane_domain_is_deferred(
        outbound: Outbound, host: str, asks: str, other: str, why: str) -> None:
    """One message, two recipients, one session: the recipient whose domain's MX for this
    address publishes TLSA the hop cannot satisfy gets 450 and stays in Exim's queue; the
    other is delivered."""
    marker = new_marker()
    peer = outbound.tls_peer if host == "203.0.113.3" else outbound.plain_peer
    with EximClient(outbound.lab.mta, host) as exim:
        exim.send("alice@example.com", [asks, other], b"Subject: two\n\n" + marker + b"\n")
        message = delivered_once(peer, marker)
        assert f"X-Original-To: {other}".encode() in message
        log = exim.log()
        [deferred] = re.findall(rf"^.* == {re.escape(asks)} .*$", log, re.MULTILINE)
        assert re.search(rf"after (pipelined )?RCPT TO:<{re.escape(asks)}>: {re.escape(why)}",
                         deferred), log
        assert re.search(rf"^.* => {re.escape(other)} ", log, re.MULTILINE), log
        queued = exim.queued()
        assert asks in queued and f"D {other}" in queued, queued  # D: delivered
    print(f"\nEXIM outbound two recipients via {host}: {deferred.split(' ', 2)[2]}")


@pytest.mark.parametrize(("host", "tls"), [("203.0.113.2", "dane"), ("203.0.113.8", None)])
def test_legacy_exim_pipelining_and_bdat_cross_the_gateway(outbound: Outbound, host: str,
                                                          tls: str | None) -> None:
    """Exim pipelines MAIL, RCPT and its one BDAT LAST chunk in one segment (seen on the
    MTA's link, in clear: Exim avoids TLS); the peer's session summary counts that BDAT."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    receiver = outbound.tls_peer if tls else outbound.plain_peer
    mark = receiver.log_mark()
    with EximClient(outbound.lab.mta, host) as exim, \
            Capture(outbound.lab.gw, GW_MTA_IF, outbound.work / f"bdat{host}.pcap") as cap:
        exim.send("alice@example.com", "bdat@example.net",
                  b"Subject: exim bdat\n\n" + marker + b"\n")
        delivered_once(receiver, marker)
    assert re.search(rb"MAIL FROM:<alice@example\.com>[^\r]*\r\nRCPT TO:<bdat@example\.net>"
                     rb"[^\r]*\r\nBDAT \d+ LAST\r\n", cap.data()), "not pipelined with BDAT"
    summary = peer_summary(receiver, mark, tls)
    assert "bdat=1" in summary and "data=" not in summary, summary
    s = outbound.session_since(f"{host}:25", seen)
    assert (s["outcome"], s.get("tls")) == ("relayed", tls), s
    print(f"\nEXIM outbound PIPELINING+BDAT via {host} (tls={tls}): peer saw {summary}")


def test_exim_own_starttls_to_a_peer_without_tlsa_is_left_end_to_end(
        outbound: Outbound) -> None:
    """Exim at its default (STARTTLS when offered, verifying nothing) toward a peer that
    publishes no TLSA: its STARTTLS is its own, the gateway steps aside.  (Toward a DANE
    peer the gateway takes it over: tests/test_takeover_netns.py::
    test_exim_at_its_default_gets_dane_through_the_gateway.)"""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    mark = outbound.tls_peer.log_mark()
    with EximClient(outbound.lab.mta, "203.0.113.3", tls=True) as exim, \
            Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "own.pcap") as cap:
        exim.send("alice@example.com", "own@example.net",
                  b"Subject: exim own tls\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
        assert exim.queued() == "", exim.log()
        [line] = re.findall(r"^.* => own@example\.net .*$", exim.log(), re.MULTILINE)
    assert re.search(r" X=TLS1\.[23]:", line), line  # Exim's own TLS, with the peer
    assert not cap.contains(marker)
    outbound.tls_peer.wait_log(r"TLS connection established from \S+\[[\d.]+\]", since=mark)
    assert b"(using TLSv1." in message
    outbound.stepped_aside(seen)
    print(f"\nEXIM outbound own STARTTLS -> no TLSA: {line.split(' ', 2)[2]}")


# -- inbound: Exim receives --------------------------------------------------------------

@pytest.fixture(scope="module")
def inbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inbound]:
    # Exim's light build has no hosts_proxy: the client's address by transparent.
    with inbound_world(tmp_path_factory.mktemp("exim-in"),
                       lambda ns: EximServer(ns, MTA_V4)) as world:
        yield world


def test_exim_has_no_proxy_protocol_so_inbound_is_transparent() -> None:
    """Debian's exim4-daemon-light 4.96 is built without SUPPORT_PROXY: ``hosts_proxy`` is
    unknown, so the client's address reaches it by ``client_address: transparent``."""
    said = exim_client.main_option_error("hosts_proxy")
    assert 'main option "hosts_proxy" unknown' in said, said
    print(f"\nEXIM inbound PROXY v2: {said}")


def test_dane_sender_verifies_the_gateway_and_exim_logs_the_real_client(
        inbound: Inbound) -> None:
    marker = new_marker()
    mark = inbound.mta.log_mark()
    got = dane_sender_delivers(inbound, marker)
    assert envelope_sender(got.message) == b"alice@example.org", got.message[:300]
    received = inbound.mta.wait_log(r"^.* <= alice@example\.org .*$", since=mark).group(0)
    # The client's own address, not the gateway's (198.51.100.1).
    assert "H=(sender.example.org) [203.0.113.2]" in received, received
    assert "198.51.100.1" not in inbound.mta.log()[mark:]
    print(f"\nEXIM inbound: sender {got.verified.split(': ', 1)[1]}\n"
          f"  Exim: {received.split(' ', 2)[2]}")


def test_no_smuggling_variant_reaches_exim_through_the_shield(inbound: Inbound) -> None:
    names = shield_holds(inbound)
    print(f"\nEXIM inbound shield (normalize): smuggled {names} of {CARRIERS}")


def test_the_control_without_the_shield(inbound: Inbound) -> None:
    """``smuggling: off``: what Exim 4.96 (Debian 4.96-15+deb12u10) makes of the same
    sessions alone.  Its CVE-2023-51766 fix and its pipelining check stop every variant but
    one: an LF-only carrier whose second transaction is a pipelined BDAT is two messages to
    it.  The other test shows the shield stops that one too."""
    mark = inbound.mta.log_mark()
    names, _ = smuggled_through(inbound, "off")
    assert names == ["LF-only-BDAT"], (names, inbound.mta.log()[mark:])
    took = inbound.mta.wait_log(r"^.* <= x@tripwire\.example .*$", since=mark).group(0)
    print(f"\nEXIM inbound without the shield: smuggled {names}\n  Exim: {took.split(' ', 2)[2]}")


def test_exim_server_is_a_real_receiver(inbound: Inbound) -> None:
    """The lab's Exim answers as Exim, advertises PIPELINING and CHUNKING, and refuses to
    relay (direct, not through the gateway: from gw's own address)."""
    banner, ehlo = ehlo_of(inbound.lab.gw, MTA_V4)
    assert re.match(rb"220 legacy\.b\.test ESMTP Exim 4\.96", banner), banner
    assert b"PIPELINING" in ehlo and b"CHUNKING" in ehlo, ehlo
    with inbound.lab.gw.connect(MTA_V4, 25, timeout=10) as sock:
        sock.settimeout(10)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"EHLO gw.example\r\n")
        while f.readline().startswith(b"250-"):
            pass
        sock.sendall(b"MAIL FROM:<a@gw.example>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        assert f.readline().startswith(b"250")
        assert f.readline().startswith(b"550 relay not permitted")
        sock.sendall(b"QUIT\r\n")

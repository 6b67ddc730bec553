"""Issue 19's interoperability matrix, the Sendmail 8.17 row (Debian's binary from its
private root, gatelab/sendmail_lab.py), with the real programs in the namespace lab.
docs/interop.md holds the matrix as these tests last printed it.

The two worlds (outbound: Sendmail sends; inbound: Sendmail receives behind the offload) are
gatelab/interop.py's.

Sendmail's ``-bp``, its log (syslog, caught on a private /dev/log), the SMTP dialogue its
``-v`` prints and its Maildir are the MTA's own word; the gateway's session lines, the
Postfix peers' logs and tcpdump on gw say what crossed.
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from gatelab import dnslab, netlab, postfix_instance, sendmail_lab
from gatelab.capture import Capture
from gatelab.fakesmtp import FakeServer, Script, verb
from gatelab.interop import (
    CARRIERS,
    TWO_RECIPIENTS,
    Inbound,
    Outbound,
    body_of,
    client_bytes,
    client_segments,
    copies,
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
from gatelab.netlab import GW_MTA_IF, GW_MTA_V4, GW_PEER_IF, MTA_V4, PEER_V4
from gatelab.sendmail_lab import SendmailClient, SendmailServer

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable() or sendmail_lab.sendmail_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)


def wait_lines(log: Callable[[], str], regex: str, n: int, *, since: int = 0,
               timeout: float = 15.0) -> list[str]:
    """The lines matching ``regex`` after ``since``, once there are ``n`` (Sendmail's
    lines arrive through the syslog catcher's thread, a moment after the fact)."""
    deadline = time.monotonic() + timeout
    while len(found := re.findall(rf"^(?:{regex})$", log()[since:], re.MULTILINE)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(found)} of {n} /{regex}/:\n{log()[since:][-3000:]}")
        time.sleep(0.05)
    return found


def to_line(sm: SendmailClient, rcpt: str, since: int = 0) -> str:
    """Sendmail's one delivery line for ``rcpt`` (``<qid>: to=<rcpt>, ... stat=...``)."""
    regex = rf".*: to=<?{re.escape(rcpt)}>?, .*"
    [line] = wait_lines(sm.log, regex, 1, since=since)
    time.sleep(0.2)  # a second attempt would be right behind
    assert wait_lines(sm.log, regex, 1, since=since) == [line], sm.log()[since:]
    return line


def said(line: str) -> str:
    """A syslog line without its date, host-less tag and pid: what Sendmail said."""
    return line.split("]: ", 1)[1]


@pytest.fixture(scope="module")
def outbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outbound]:
    with outbound_world(tmp_path_factory.mktemp("sendmail-out")) as world:
        yield world


def test_legacy_sendmail_to_a_dane_peer_is_upgraded_and_verified(outbound: Outbound) -> None:
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    with SendmailClient(outbound.lab.mta, PEER_V4) as sm, \
            Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "dane.pcap") as cap:
        dialogue = sm.send("alice@example.com", "dane@example.net",
                           b"Subject: sendmail dane\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
        assert sm.queued() == "", sm.log()
        line = to_line(sm, "dane@example.net")
        # Sendmail itself spoke plaintext: STARTTLS offered to it, never used by it.
        assert "250-STARTTLS" in dialogue and ">>> STARTTLS" not in dialogue, dialogue
        assert "STARTTLS=client" not in sm.log(), sm.log()
    assert "relay=[203.0.113.2] [203.0.113.2], dsn=2.0.0, stat=Sent (Ok: queued as" in line
    outbound.upgraded_by_dane(seen, cap, marker, message)
    print(f"\nSENDMAIL outbound legacy -> DANE peer: {said(line)}")


@pytest.mark.parametrize(("host", "tls"), [
    ("203.0.113.8", None),  # policy none: the static passthrough, the bare pump
    ("203.0.113.7", "plaintext"),  # no STARTTLS offered: read by the envelope tracker
])
def test_legacy_sendmail_to_a_plain_peer_passes_byte_exact(outbound: Outbound, host: str,
                                                          tls: str | None) -> None:
    """The body Sendmail was given is the body the peer stored, byte for byte (dots, which
    Sendmail stuffs for DATA, trailing blanks, a tab, 8-bit text, a 990-byte line, an empty
    line); and what Sendmail put on the wire is what reached the peer."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    body = tricky_body(marker)
    work = outbound.work
    with SendmailClient(outbound.lab.mta, host) as sm, \
            Capture(outbound.lab.gw, GW_MTA_IF, work / f"mta{host}.pcap", "tcp port 25") as mta, \
            Capture(outbound.lab.gw, GW_PEER_IF, work / f"peer{host}.pcap", "tcp port 25") as peer:
        sm.send("alice@example.com", "plain@example.net", b"Subject: bytes\n\n" + body)
        message = delivered_once(outbound.plain_peer, marker)
        assert sm.queued() == "", sm.log()
        line = to_line(sm, "plain@example.net")
    sent, got = hashlib.sha256(body).hexdigest(), hashlib.sha256(body_of(message)).hexdigest()
    assert got == sent, (body, body_of(message))
    wire = client_bytes(mta.path)
    assert marker in wire and b"\r\n..\r\n...two dots\r\n" in wire, wire  # dot-stuffed
    assert b"\r\nDATA\r\n" in wire, wire
    assert b"BDAT" not in wire, wire
    assert client_bytes(peer.path) == wire  # the gateway's part: not one byte changed
    s = outbound.session_since(f"{host}:25", seen)
    assert (s["outcome"], s.get("tls")) == ("relayed", tls), s
    print(f"\nSENDMAIL outbound legacy -> plain {host} (tls={tls}): body sha256 {sent[:16]}… "
          f"delivered; {len(wire)} bytes from Sendmail = {len(wire)} bytes to the peer; "
          f"{said(line)}")


def test_legacy_sendmail_under_a_wrong_tlsa_keeps_the_message_and_delivers_once_after_the_fix(
        outbound: Outbound) -> None:
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    try:
        with SendmailClient(outbound.lab.mta, "203.0.113.9") as sm, \
                Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "fix.pcap") as cap:
            dialogue = sm.send("alice@example.com", "fix@fix.test",
                               b"Subject: sendmail wrong tlsa\n\n" + marker + b"\n")
            deferral = to_line(sm, "fix@fix.test")
            # The reply to its MAIL; the stat may instead say "Connection reset": Sendmail
            # sends QUIT after a 421, to a connection the gateway has closed (RST).
            assert ("reply=421 4.7.5 smtpgate: TLS to peer failed: no matching record, "
                    "stat=Deferred" in deferral), deferral
            assert re.search(r">>> MAIL From:<alice@example\.com> SIZE=\d+\n421 4\.7\.5 "
                             r"smtpgate: TLS to peer failed: no matching record\n>>> QUIT\n",
                             dialogue), dialogue
            [held] = sm.queue_ids()
            assert deferral.split("]: ", 1)[1].startswith(held), (held, deferral)
            outbound.deferred_by_the_wrong_tlsa(seen, marker)

            outbound.fix_the_tlsa()
            mark = sm.log_mark()
            sm.run_queue()
            delivered_once(outbound.tls_peer, marker)
            retried = to_line(sm, "fix@fix.test", since=mark)
            assert f"]: {held}: to=fix@fix.test, " in retried and "stat=Sent" in retried, retried
            assert sm.queued() == "", sm.log()
        assert cap.packets() > 10 and not cap.contains(marker)
        outbound.verified_after_the_fix(seen)
        print(f"\nSENDMAIL outbound wrong TLSA: {said(deferral)}\n"
              f"  after the fix (-qf): {said(retried)}")
    finally:
        outbound.unfix_the_tlsa()


@pytest.mark.parametrize(("host", "asks", "other", "why"), TWO_RECIPIENTS)
def test_legacy_sendmail_several_recipients_only_the_dane_domain_is_deferred(
        outbound: Outbound, host: str, asks: str, other: str, why: str) -> None:
    """One message, two recipients, one session: the recipient whose domain's MX for this
    address publishes TLSA the hop cannot satisfy gets 450 and stays in Sendmail's queue;
    the other is delivered."""
    marker = new_marker()
    peer = outbound.tls_peer if host == "203.0.113.3" else outbound.plain_peer
    with SendmailClient(outbound.lab.mta, host) as sm:
        sm.send("alice@example.com", [asks, other], b"Subject: two\n\n" + marker + b"\n")
        message = delivered_once(peer, marker)
        assert f"X-Original-To: {other}".encode() in message
        deferred, sent = to_line(sm, asks), to_line(sm, other)
        assert f"dsn=4.7.5, reply={why}" in deferred, deferred
        assert f"stat=Deferred: {why}" in deferred, deferred
        assert "dsn=2.0.0, stat=Sent" in sent, sent
        queued = sm.queued()
        assert "(Deferred: 450 4.7.5 smtpgate: " in queued, queued
        assert asks in queued and other not in queued, queued
    print(f"\nSENDMAIL outbound two recipients via {host}: {said(deferred)}")


@pytest.mark.parametrize(("host", "tls"), [("203.0.113.2", "dane"), ("203.0.113.8", None)])
def test_legacy_sendmail_pipelining_crosses_the_gateway_and_it_never_sends_bdat(
        outbound: Outbound, host: str, tls: str | None) -> None:
    """Sendmail sends MAIL alone and waits for its reply, then pipelines every RCPT and
    DATA in one segment (seen on the MTA's link, in clear: Sendmail avoids TLS here); it sends DATA
    even though the peer offers CHUNKING.  The peer's session summary counts it all."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    receiver = outbound.tls_peer if tls else outbound.plain_peer
    mark = receiver.log_mark()
    with SendmailClient(outbound.lab.mta, host) as sm, \
            Capture(outbound.lab.gw, GW_MTA_IF, outbound.work / f"pipe{host}.pcap",
                    "tcp port 25") as cap:
        dialogue = sm.send("alice@example.com", ["p1@example.net", "p2@example.net"],
                           b"Subject: sendmail pipelining\n\n" + marker + b"\n")
        receiver.wait_delivered(marker)
        time.sleep(0.5)  # the second recipient's copy, and no third
        found = copies(receiver, marker)
        assert sm.queued() == "", sm.log()
    assert sorted(re.findall(rb"X-Original-To: (\S+)", b"".join(found))) == [
        b"p1@example.net", b"p2@example.net"], found  # one copy per recipient
    assert "250-PIPELINING" in dialogue and "250 CHUNKING" in dialogue, dialogue
    segments = client_segments(cap.path)
    assert re.fullmatch(rb"MAIL From:<alice@example\.com> SIZE=\d+\r\n",
                        segments[1]), segments  # alone: Sendmail waits for its reply
    # then every RCPT and DATA in one segment (the last recipient first)
    assert segments[2] == (b"RCPT To:<p2@example.net>\r\nRCPT To:<p1@example.net>\r\n"
                           b"DATA\r\n"), segments
    summary = peer_summary(receiver, mark, tls)
    assert "rcpt=2 data=1" in summary and "bdat" not in summary, summary
    s = outbound.session_since(f"{host}:25", seen)
    assert (s["outcome"], s.get("tls")) == ("relayed", tls), s
    print(f"\nSENDMAIL outbound PIPELINING via {host} (tls={tls}): peer saw {summary}")


@pytest.fixture
def helo_peers(outbound: Outbound) -> Iterator[dict[str, FakeServer]]:
    """Two servers of RFC 821's (EHLO refused, HELO only; in-process: no real MTA of ours
    refuses EHLO on demand): .10 without a name, .11 named mx.helo.test, which publishes
    TLSA (so the gateway must have TLS there)."""
    o = outbound
    hosts = ("203.0.113.10", "203.0.113.11")
    for host in hosts:
        o.lab.peer.ip("addr", "add", f"{host}/24", "dev", netlab.HOST_IF)
    o.dns.set_records("113.0.203.in-addr.arpa.", "11", "PTR", ["mx.helo.test."])
    o.dns.set_records("test.", "mx.helo", "A", ["203.0.113.11"])
    o.dns.set_records("test.", "_25._tcp.mx.helo", "TLSA", [o.good])
    servers = {h: FakeServer(o.lab.peer, h, Script(name=b"old.test", refuse_ehlo=True))
               for h in hosts}
    try:
        yield servers
    finally:
        for server in servers.values():
            server.close()
        o.dns.set_records("test.", "_25._tcp.mx.helo", "TLSA", [])
        o.dns.set_records("test.", "mx.helo", "A", [])
        o.dns.set_records("113.0.203.in-addr.arpa.", "11", "PTR", [])
        for host in hosts:
            o.lab.peer.ip("addr", "del", f"{host}/24", "dev", netlab.HOST_IF)


def test_sendmail_falls_back_to_helo_and_the_gateway_follows(
        outbound: Outbound, helo_peers: dict[str, FakeServer]) -> None:
    """Sendmail's habit: EHLO refused, HELO.  Toward a peer without TLSA the gateway learns
    there is no STARTTLS (its own EHLO is refused too), says Sendmail's HELO again and the
    message goes in plaintext; toward one whose name publishes TLSA the same refusal is a
    4xx and Sendmail keeps the message: never in clear."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    plain, dane = helo_peers["203.0.113.10"], helo_peers["203.0.113.11"]
    mark = plain.arm()
    with SendmailClient(outbound.lab.mta, "203.0.113.10") as sm:
        dialogue = sm.send("alice@example.com", "old@example.net",
                           b"Subject: sendmail helo\n\n" + marker + b"\n")
        line = to_line(sm, "old@example.net")
        assert sm.queued() == "", sm.log()
    [served] = plain.settle(mark)
    assert re.search(r">>> EHLO mta\.example\.com\n502 5\.5\.1 EHLO not implemented\n"
                     r">>> HELO mta\.example\.com\n250 old\.test\n", dialogue), dialogue
    said_to_peer = [verb(line) for line, _ in served.commands]
    # Sendmail's EHLO and HELO, the gateway's probing EHLO (refused), Sendmail's HELO again.
    assert said_to_peer[:5] == [b"EHLO", b"HELO", b"EHLO", b"HELO", b"MAIL"], said_to_peer
    assert any(marker in c for c in served.contents), served.contents
    assert "stat=Sent" in line, line
    s = outbound.session_since("203.0.113.10:25", seen)
    assert (s["tls"], s["outcome"]) == ("plaintext", "relayed"), s

    mark = dane.arm()
    with SendmailClient(outbound.lab.mta, "203.0.113.11") as sm:
        sm.send("alice@example.com", "old@example.net",
                b"Subject: sendmail helo dane\n\n" + marker + b"\n")
        deferred = to_line(sm, "old@example.net")
        assert "stat=Deferred" in deferred and "refused EHLO" in deferred, deferred
        [held] = sm.queue_ids()
    [served] = dane.settle(mark)
    assert b"MAIL" not in [verb(line) for line, _ in served.commands], served.commands
    assert not served.contents
    s = outbound.session_since("203.0.113.11:25", seen)
    assert (s["plan"], s["outcome"]) == ("require-tls", "deferred"), s
    print(f"\nSENDMAIL outbound EHLO refused, HELO: {said(line)}\n"
          f"  toward a TLSA name: {said(deferred)} (kept: {held})")


def test_sendmail_own_starttls_to_a_peer_without_tlsa_is_left_end_to_end(
        outbound: Outbound) -> None:
    """Sendmail at its default (STARTTLS whenever offered, no certificate of its own,
    verifying nothing) toward a peer that publishes no TLSA: its STARTTLS is its own, the
    gateway steps aside."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    mark = outbound.tls_peer.log_mark()
    with SendmailClient(outbound.lab.mta, "203.0.113.3", tls=True) as sm, \
            Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "own.pcap") as cap:
        dialogue = sm.send("alice@example.com", "own@example.net",
                           b"Subject: sendmail own tls\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
        assert sm.queued() == "", sm.log()
        line = to_line(sm, "own@example.net")
        tls = sm.wait_log(r"^.*STARTTLS=client, relay=\[203\.0\.113\.3\], version=TLSv1\.[23], "
                          r"verify=\w+, .*$").group(0)
    assert ">>> STARTTLS" in dialogue and "stat=Sent" in line, (dialogue, line)
    assert "verify=OK" not in tls  # nothing it trusts: opportunistic
    assert not cap.contains(marker)
    outbound.tls_peer.wait_log(r"TLS connection established from \S+\[[\d.]+\]", since=mark)
    assert b"(using TLSv1." in message
    outbound.stepped_aside(seen)
    print(f"\nSENDMAIL outbound own STARTTLS -> no TLSA: {said(tls)}\n  {said(line)}")


def test_sendmail_own_starttls_toward_a_dane_peer_is_taken_over(outbound: Outbound) -> None:
    """The same Sendmail toward the DANE peer: its unverified STARTTLS would bypass the
    protection, so the gateway takes it over (``mta_starttls: terminate``, the default):
    Sendmail's TLS ends at the gateway (the certificate it logs is the gateway's), and the
    gateway's own TLS to the peer is DANE-verified."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    with SendmailClient(outbound.lab.mta, PEER_V4, tls=True) as sm, \
            Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "takeover.pcap") as cap:
        sm.send("alice@example.com", "takeover@example.net",
                b"Subject: sendmail takeover\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
        assert sm.queued() == "", sm.log()
        line = to_line(sm, "takeover@example.net")
        tls = sm.wait_log(r"^.*STARTTLS=client, relay=\[203\.0\.113\.2\], version=TLSv1\.[23], "
                          r".*$").group(0)
        cert = sm.wait_log(r"^.*STARTTLS=client, cert-subject=(\S+), .*$")
    assert "stat=Sent" in line, line
    assert cert.group(1) != "/CN=mx.b.test", cert.group(0)  # not the peer's: the gateway's
    assert not cap.contains(marker)
    assert b"(using TLSv1." in message
    s = outbound.session_since("203.0.113.2:25", seen)
    assert (s["mta_starttls"], s["tls"], s["outcome"]) == ("terminated", "dane", "relayed"), s
    assert s["verify"] in ("dane-ee match", "resumed verified session"), s
    print(f"\nSENDMAIL outbound own STARTTLS -> DANE peer: {said(tls)}\n  {said(cert.group(0))}"
          f"\n  gateway: mta_starttls={s['mta_starttls']} tls={s['tls']} verify={s['verify']}")


# -- inbound: Sendmail receives ----------------------------------------------------------

@pytest.fixture(scope="module")
def inbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inbound]:
    # Sendmail has no PROXY protocol: the client's address by transparent.
    with inbound_world(tmp_path_factory.mktemp("sendmail-in"),
                       lambda ns: SendmailServer(ns, MTA_V4)) as world:
        yield world


def proxy_v2_header(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A PROXY protocol v2 header (TCP over IPv4), as the gateway's ``client_address:
    proxy`` sends it.  Its 12-byte signature is ``\\r\\n\\r\\n\\0\\r\\nQUIT\\n``."""
    addresses = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + struct.pack("!H", len(addresses))
            + addresses)


def test_sendmail_has_no_proxy_protocol_so_inbound_is_transparent(inbound: Inbound) -> None:
    """Sendmail 8.17 has no PROXY protocol (none of its DaemonPortOptions asks for one): it
    greets at once, and a PROXY v2 header is SMTP to it, whose 12-byte signature ends in
    QUIT.  The client's address reaches it by ``client_address: transparent``."""
    mark = inbound.mta.log_mark()
    with inbound.lab.gw.connect(MTA_V4, 25, timeout=10) as sock:
        sock.settimeout(10)
        banner = sock.recv(4096)  # sent before the client says anything
        sock.sendall(proxy_v2_header(PEER_V4, MTA_V4, 40000, 25))
        replies = b""
        while chunk := sock.recv(4096):
            replies += chunk
    assert banner.startswith(b"220 legacy.b.test ESMTP Sendmail 8.17"), banner
    assert replies.endswith(b"221 2.0.0 legacy.b.test closing connection\r\n"), replies
    assert b"500 5.5.1 Command unrecognized" in replies, replies
    # Its end of that session (logged as the session's process exits), so that no later
    # test reads it as its own.
    logged = inbound.mta.wait_log(rf"^.*: \[{re.escape(GW_MTA_V4)}\] did not issue "
                                  r"MAIL/EXPN/VRFY/ETRN during connection to MTA$",
                                  since=mark).group(0)
    print(f"\nSENDMAIL inbound PROXY v2: the header answered with "
          f"{[r.decode() for r in replies.splitlines()]}; Sendmail: {said(logged)}")


def test_dane_sender_verifies_the_gateway_and_sendmail_logs_the_real_client(
        inbound: Inbound) -> None:
    marker = new_marker()
    mark = inbound.mta.log_mark()
    got = dane_sender_delivers(inbound, marker)
    assert envelope_sender(got.message) == b"alice@example.org", got.message[:300]
    m = inbound.mta.wait_log(r"^.* sendmail\[(\d+)\]: \w+: from=<alice@example\.org>, .*$",
                             since=mark)
    received, pid = m.group(0), m.group(1)
    # The client's own address, not the gateway's (198.51.100.1).
    assert received.endswith("relay=[203.0.113.2]"), received
    assert b"Received: from sender.example.org ([203.0.113.2])" in got.message, got.message
    # Every line of that session (its process id) names the client, never the gateway.
    session = re.findall(rf"^.* sendmail\[{pid}\]: .*$", inbound.mta.log()[mark:], re.MULTILINE)
    assert session[0].endswith("connect from [203.0.113.2]"), session
    assert not [line for line in session if GW_MTA_V4 in line], session
    print(f"\nSENDMAIL inbound: sender {got.verified.split(': ', 1)[1]}\n"
          f"  Sendmail: {said(received)}")


def test_no_smuggling_variant_reaches_sendmail_through_the_shield(inbound: Inbound) -> None:
    names = shield_holds(inbound)
    print(f"\nSENDMAIL inbound shield (normalize): smuggled {names} of {CARRIERS}")


# The bare line end Sendmail finds first in each carrier, and where (the LF-only carriers'
# first header line already ends in a bare LF).
FIRST_BARE = {"LF.LF": ("LF", "body"), "CR.CR": ("CR", "body"), "CRLF.CR": ("CR", "body"),
              "CRLF.LF": ("LF", "body"), "LF.CRLF": ("LF", "body"), "CR.CRLF": ("CR", "body"),
              "CRLF.CRCRLF": ("CR", "body"), "LF-only": ("LF", "header"),
              "LF-only-BDAT": ("LF", "header")}


def test_the_control_without_the_shield(inbound: Inbound) -> None:
    """``smuggling: off``: what Sendmail 8.17.1.9 (Debian 8.17.1.9-2+deb12u2) makes of
    the same sessions alone.  Debian's fix for CVE-2023-51765 refuses a bare LF or a bare
    CR anywhere in the content: every carrier is answered 421 at its end, and nothing is
    delivered, neither the carrier nor what it holds.  Through the shield (the other test)
    the same carriers arrive, normalised, as one message each."""
    assert list(FIRST_BARE) == CARRIERS
    mark = inbound.mta.log_mark()
    before = len(inbound.mta.maildir_messages())
    replies: dict[str, int] = {}
    names, got = smuggled_through(inbound, "off", replies=replies)
    assert names == [] and got == [], (names, got)
    assert replies == dict.fromkeys(CARRIERS, 421), replies
    assert len(inbound.mta.maildir_messages()) == before
    refusals = wait_lines(
        inbound.mta.log, r".*: collect: relay=\[203\.0\.113\.2\], from=<a@client\.example>, "
        r"info=Bare (?:linefeed|carriage return) \((?:LF|CR)\) not allowed, where=\w+, "
        r"status=tempfail", len(CARRIERS), since=mark)
    found = [(m.group(1), m.group(2)) for r in refusals
             if (m := re.search(r"\((LF|CR)\) not allowed, where=(\w+)", r))]
    assert found == list(FIRST_BARE.values()), (found, inbound.mta.log()[mark:])
    assert "tripwire" not in inbound.mta.log()[mark:]
    print(f"\nSENDMAIL inbound without the shield: smuggled {names}; every carrier answered "
          f"{sorted(set(replies.values()))}\n  Sendmail: {said(refusals[0])}\n"
          f"  Sendmail: {said(refusals[1])}")


def test_sendmail_server_is_a_real_receiver(inbound: Inbound) -> None:
    """The lab's Sendmail answers as Sendmail, advertises PIPELINING (no CHUNKING, no
    STARTTLS: no certificate), and refuses to relay (direct, not through the gateway: from
    gw's own address)."""
    banner, ehlo = ehlo_of(inbound.lab.gw, MTA_V4)
    assert re.match(rb"220 legacy\.b\.test ESMTP Sendmail 8\.17\.1\.9/8\.17\.1\.9; ", banner)
    assert b"PIPELINING" in ehlo and b"CHUNKING" not in ehlo and b"STARTTLS" not in ehlo, ehlo
    with inbound.lab.gw.connect(MTA_V4, 25, timeout=10) as sock:
        sock.settimeout(10)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"EHLO gw.example\r\n")
        while f.readline().startswith(b"250-"):
            pass
        sock.sendall(b"MAIL FROM:<a@gw.example>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        assert f.readline().startswith(b"250")
        refused = f.readline()
        assert refused.startswith(b"550 5.7.1 <x@elsewhere.example>... Relaying denied"), refused
        sock.sendall(b"QUIT\r\n")
    print(f"\nSENDMAIL is a real receiver: {banner.decode().strip()}; "
          f"{refused.decode().strip()}")

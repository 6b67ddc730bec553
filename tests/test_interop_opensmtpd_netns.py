"""Issue 19's interoperability matrix, the OpenSMTPD 6.8 row (Debian's binary from its private
root, gatelab/opensmtpd_lab.py: each instance in a mount namespace of its own, since its
queue and control socket paths are compiled in), with the real programs in the namespace lab.
docs/interop.md holds the matrix as these tests last printed it.

The two worlds (outbound: OpenSMTPD sends; inbound: OpenSMTPD receives behind the offload)
are gatelab/interop.py's.

``smtpctl show queue``, OpenSMTPD's log (``smtpd -d``: stderr, kept in its private tree) and
its Maildir are the MTA's own word; the gateway's session lines, the Postfix peers' logs and
tcpdump on gw say what crossed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatelab import dnslab, netlab, opensmtpd_lab, postfix_instance
from gatelab.capture import Capture
from gatelab.interop import (
    CARRIERS,
    TWO_RECIPIENTS,
    Inbound,
    Outbound,
    body_of,
    client_bytes,
    client_segments,
    dane_sender_delivers,
    delivered_once,
    envelope_sender,
    inbound_world,
    new_marker,
    outbound_world,
    peer_summary,
    shield_holds,
    smtp_send,
    smuggled_through,
    tricky_body,
)
from gatelab.netlab import GW_MTA_IF, GW_PEER_IF, MTA_V4
from gatelab.opensmtpd_lab import OpenSmtpdClient, OpenSmtpdServer
from gateway.config import Endpoint
from gateway.proxyproto import v2_header
from gateway.smtp import Reply, ReplyReader

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable() or opensmtpd_lab.opensmtpd_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)


def legacy(host: str) -> str:
    """OpenSMTPD's relay URL without TLS of its own: the gateway does the upgrade."""
    return f"smtp+notls://{host}:25"


def delivery(log: str, rcpt: str, since: int = 0) -> list[str]:
    """OpenSMTPD's ``mta delivery`` lines for ``rcpt`` (its outcome per envelope)."""
    return re.findall(rf"^\S+ mta delivery .* to=<{re.escape(rcpt)}> .*$", log[since:],
                      re.MULTILINE)


# A MIME message that says it is 8-bit: OpenSMTPD's sendmail passes its body unchanged.
EIGHT_BIT = (b"Subject: bytes\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
             b"Content-Transfer-Encoding: 8bit\n\n")


def tail(line: str) -> str:
    """A log line without its session id."""
    return line.split(" ", 1)[1]


@pytest.fixture(scope="module")
def outbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outbound]:
    with outbound_world(tmp_path_factory.mktemp("opensmtpd-out")) as world:
        yield world


def test_legacy_opensmtpd_to_a_dane_peer_is_upgraded_and_verified(outbound: Outbound) -> None:
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    with OpenSmtpdClient(outbound.lab.mta, legacy("203.0.113.2")) as osmtpd, \
            Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "dane.pcap") as cap:
        osmtpd.send("alice@example.com", "dane@example.net",
                    b"Subject: opensmtpd dane\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
        osmtpd.wait_queue_empty()
        log = osmtpd.log()
        [line] = delivery(log, "dane@example.net")
        assert 'result="Ok" stat="250 2.0.0 Ok' in line, log
        # OpenSMTPD itself spoke plaintext (no "mta tls" line): the TLS is the gateway's.
        assert "mta connecting address=smtp+notls://203.0.113.2:25" in log, log
        assert " mta tls " not in log, log
    outbound.upgraded_by_dane(seen, cap, marker, message)
    print(f"\nOPENSMTPD outbound legacy -> DANE peer: {tail(line)}")


@pytest.mark.parametrize(("host", "tls"), [
    ("203.0.113.8", None),  # policy none: the static passthrough, the bare pump
    ("203.0.113.7", "plaintext"),  # no STARTTLS offered: read by the envelope tracker
])
def test_legacy_opensmtpd_to_a_plain_peer_passes_byte_exact(outbound: Outbound, host: str,
                                                            tls: str | None) -> None:
    """The body OpenSMTPD was given is the body the peer stored, byte for byte (dots, which
    its DATA stuffs, trailing blanks, a tab, 8-bit text, a 990-byte line, an empty line);
    and what OpenSMTPD put on the wire is what reached the peer.  The message declares its
    8-bit encoding: without a Content-Transfer-Encoding, OpenSMTPD's sendmail re-encodes a
    message with a line of 990 bytes or more as quoted-printable before it is queued."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    body = tricky_body(marker)
    work = outbound.work
    with OpenSmtpdClient(outbound.lab.mta, legacy(host)) as osmtpd, \
            Capture(outbound.lab.gw, GW_MTA_IF, work / f"mta{host}.pcap", "tcp port 25") as mta, \
            Capture(outbound.lab.gw, GW_PEER_IF, work / f"peer{host}.pcap", "tcp port 25") as peer:
        osmtpd.send("alice@example.com", "plain@example.net", EIGHT_BIT + body)
        message = delivered_once(outbound.plain_peer, marker)
        osmtpd.wait_queue_empty()
    sent, got = hashlib.sha256(body).hexdigest(), hashlib.sha256(body_of(message)).hexdigest()
    assert got == sent, (body, body_of(message))
    wire = client_bytes(mta.path)
    assert marker in wire and b"\r\nDATA\r\n" in wire and b"\r\n..\r\n" in wire, wire
    assert client_bytes(peer.path) == wire  # the gateway's part: not one byte changed
    s = outbound.session_since(f"{host}:25", seen)
    assert (s["outcome"], s.get("tls")) == ("relayed", tls), s
    print(f"\nOPENSMTPD outbound legacy -> plain {host} (tls={tls}): body sha256 {sent[:16]}… "
          f"delivered; {len(wire)} bytes from OpenSMTPD = {len(wire)} bytes to the peer")


def test_legacy_opensmtpd_under_a_wrong_tlsa_keeps_the_message_and_delivers_once_after_the_fix(
        outbound: Outbound) -> None:
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    try:
        with OpenSmtpdClient(outbound.lab.mta, legacy("203.0.113.9")) as osmtpd, \
                Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "fix.pcap") as cap:
            osmtpd.send("alice@example.com", "fix@fix.test",
                        b"Subject: opensmtpd wrong tlsa\n\n" + marker + b"\n")
            deferral = osmtpd.wait_log(r"^\S+ mta delivery .* to=<fix@fix\.test> .*"
                                       r'result="TempFail".*$').group(0)
            assert "421 4.7.5 smtpgate: TLS to peer failed: no matching record" in deferral
            [held] = osmtpd.envelope_ids()
            assert f"evpid={held}" in deferral, (held, deferral)
            outbound.deferred_by_the_wrong_tlsa(seen, marker)

            outbound.fix_the_tlsa()
            mark = osmtpd.log_mark()
            osmtpd.schedule_all()
            delivered_once(outbound.tls_peer, marker)
            retried = osmtpd.wait_log(r"^\S+ mta delivery .* to=<fix@fix\.test> .*"
                                      r'result="Ok".*$', since=mark).group(0)
            assert f"evpid={held}" in retried, (held, retried)
            osmtpd.wait_queue_empty()
        assert cap.packets() > 10 and not cap.contains(marker)
        outbound.verified_after_the_fix(seen)
        print(f"\nOPENSMTPD outbound wrong TLSA: {tail(deferral)}\n"
              f"  after the fix (smtpctl schedule all): {tail(retried)}")
    finally:
        outbound.unfix_the_tlsa()


@pytest.mark.parametrize(("host", "asks", "other", "why"), TWO_RECIPIENTS)
def test_legacy_opensmtpd_several_recipients_only_the_dane_domain_is_deferred(
        outbound: Outbound, host: str, asks: str, other: str, why: str) -> None:
    """One message, two recipients, one session: the recipient whose domain's MX for this
    address publishes TLSA the hop cannot satisfy gets 450 and stays in OpenSMTPD's queue;
    the other is delivered."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    peer = outbound.tls_peer if host == "203.0.113.3" else outbound.plain_peer
    with OpenSmtpdClient(outbound.lab.mta, legacy(host)) as osmtpd:
        osmtpd.send("alice@example.com", [asks, other], b"Subject: two\n\n" + marker + b"\n")
        message = delivered_once(peer, marker)
        assert f"X-Original-To: {other}".encode() in message
        osmtpd.wait_log(rf"mta delivery .* to=<{re.escape(other)}> .*")
        log = osmtpd.log()
        [deferred] = delivery(log, asks)
        assert 'result="TempFail"' in deferred and why in deferred, log
        [done] = delivery(log, other)
        assert 'result="Ok"' in done, log
        queued = osmtpd.queued()
        assert len(queued.splitlines()) == 1 and f"|{asks}|" in queued, queued
    assert len(outbound.gw.sessions_to(f"{host}:25", after=seen)) == 1  # one session
    print(f"\nOPENSMTPD outbound two recipients via {host}: {tail(deferred)}")


@pytest.mark.parametrize(("host", "tls"), [("203.0.113.2", "dane"), ("203.0.113.8", None)])
def test_legacy_opensmtpd_uses_neither_pipelining_nor_bdat(outbound: Outbound, host: str,
                                                         tls: str | None) -> None:
    """The peers offer PIPELINING and CHUNKING; OpenSMTPD 6.8's client uses neither: it
    notes PIPELINING and never acts on it, and has no BDAT.  On the MTA's link (in clear:
    smtp+notls) every command is a segment of its own, sent after the reply to the one
    before; the peer's session summary counts DATA, not BDAT."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    receiver = outbound.tls_peer if tls else outbound.plain_peer
    mark = receiver.log_mark()
    with OpenSmtpdClient(outbound.lab.mta, legacy(host)) as osmtpd, \
            Capture(outbound.lab.gw, GW_MTA_IF, outbound.work / f"pipe{host}.pcap",
                    "tcp port 25") as cap:
        osmtpd.send("alice@example.com", "pipe@example.net",
                    b"Subject: opensmtpd pipelining\n\n" + marker + b"\n")
        delivered_once(receiver, marker)
        osmtpd.wait_queue_empty()
        # OpenSMTPD holds an idle session open a few seconds before its QUIT: the
        # session line is written when it has closed.
        s = outbound.session_since(f"{host}:25", seen)
    assert (s["outcome"], s.get("tls")) == ("relayed", tls), s
    commands = [seg for seg in client_segments(cap.path) if marker not in seg]
    verbs = [seg.split(b" ", 1)[0].split(b"\r", 1)[0] for seg in commands]
    # "." is the end of data, a segment of its own after the content's.
    assert verbs == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b".", b"QUIT"], commands
    assert all(seg.count(b"\r\n") == 1 for seg in commands), commands
    summary = peer_summary(receiver, mark, tls)
    assert "data=1" in summary and "bdat" not in summary, summary
    print(f"\nOPENSMTPD outbound via {host} (tls={tls}): one command per segment "
          f"{b' '.join(verbs).decode()}; peer saw {summary}")


def test_opensmtpd_own_starttls_to_a_peer_without_tlsa_is_left_end_to_end(
        outbound: Outbound) -> None:
    """OpenSMTPD at its default (``smtp://``: STARTTLS when offered, verifying nothing)
    toward a peer that publishes no TLSA: its STARTTLS is its own, the gateway steps
    aside."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    mark = outbound.tls_peer.log_mark()
    with OpenSmtpdClient(outbound.lab.mta, "smtp://203.0.113.3:25") as osmtpd, \
            Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "own.pcap") as cap:
        osmtpd.send("alice@example.com", "own@example.net",
                    b"Subject: opensmtpd own tls\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
        osmtpd.wait_queue_empty()
        log = osmtpd.log()
        [line] = delivery(log, "own@example.net")
        [own_tls] = re.findall(r"^\S+ mta tls .*$", log, re.MULTILINE)
        [check] = re.findall(r"^\S+ mta server-cert-check .*$", log, re.MULTILINE)
    assert 'result="Ok"' in line, log
    assert re.search(r"ciphers=TLSv1\.[23]:", own_tls), own_tls  # its own TLS, with the peer
    # It verifies nothing it needs: the peer's certificate does not verify, and it goes on.
    assert 'result="failure"' in check, check
    assert not cap.contains(marker)
    outbound.tls_peer.wait_log(r"TLS connection established from \S+\[[\d.]+\]", since=mark)
    assert b"(using TLSv1." in message
    outbound.stepped_aside(seen)
    print(f"\nOPENSMTPD outbound own STARTTLS -> no TLSA: {tail(own_tls)}; {tail(check)}\n"
          f"  {tail(line)}")


def test_opensmtpd_own_starttls_to_a_dane_peer_is_taken_over(outbound: Outbound) -> None:
    """OpenSMTPD at its default toward a DANE peer: its unverified STARTTLS would bypass the
    peer's TLSA, so the gateway takes it over (terminates it locally, the default) and
    makes the hop to the peer itself, verified by DANE."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    with OpenSmtpdClient(outbound.lab.mta, "smtp://203.0.113.2:25") as osmtpd, \
            Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "takeover.pcap") as cap:
        osmtpd.send("alice@example.com", "takeover@example.net",
                    b"Subject: opensmtpd takeover\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
        osmtpd.wait_queue_empty()
        log = osmtpd.log()
        [line] = delivery(log, "takeover@example.net")
        [own_tls] = re.findall(r"^\S+ mta tls .*$", log, re.MULTILINE)
    assert 'result="Ok"' in line, log
    assert re.search(r"ciphers=TLSv1\.[23]:", own_tls), own_tls  # its TLS, with the gateway
    assert not cap.contains(marker)
    assert b"(using TLSv1." in message
    s = outbound.session_since("203.0.113.2:25", seen)
    assert (s["mta_starttls"], s["tls"], s["outcome"]) == ("terminated", "dane", "relayed"), s
    assert s["verify"] in ("dane-ee match", "resumed verified session"), s
    print(f"\nOPENSMTPD outbound own STARTTLS -> DANE peer: gateway mta_starttls="
          f"{s['mta_starttls']} tls={s['tls']} verify={s['verify']}\n  {tail(line)}")


# -- inbound: OpenSMTPD receives ----------------------------------------------------------

@pytest.fixture(scope="module")
def inbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inbound]:
    # OpenSMTPD's listener takes PROXY v2 (proxy-v2): the client's address by the header.
    with inbound_world(tmp_path_factory.mktemp("opensmtpd-in"),
                       lambda ns: OpenSmtpdServer(ns, MTA_V4, proxy_v2=True),
                       client_address="proxy-protocol") as world:
        yield world


def ehlo_over_tls(i: Inbound) -> tuple[bytes, bytes]:
    """A client at the inbound gateway's port 25 (from the peer): EHLO, STARTTLS, the
    handshake with the gateway (its key not checked here: the DANE sender does that),
    EHLO again.  The EHLO replies before and after."""
    sock = i.lab.peer.connect(MTA_V4, 25, timeout=10)
    sock.settimeout(10)
    reader = ReplyReader()

    def reply(conn: socket.socket) -> Reply:
        while (r := reader.next()) is None:
            if not (chunk := conn.recv(65536)):
                raise ConnectionError("closed")
            reader.feed(chunk)
        return r

    with sock:
        assert reply(sock).code == 220
        sock.sendall(b"EHLO client.example\r\n")
        before = reply(sock).raw
        sock.sendall(b"STARTTLS\r\n")
        assert reply(sock).code == 220
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with context.wrap_socket(sock, server_hostname="mx.b.test") as tls:
            tls.sendall(b"EHLO client.example\r\n")
            after = reply(tls).raw
            tls.sendall(b"QUIT\r\n")
    return before, after


def test_dane_sender_verifies_the_gateway_and_opensmtpd_logs_the_real_client(
        inbound: Inbound) -> None:
    """First a client's EHLO over TLS: OpenSMTPD refuses a second greeting in a session
    (test_opensmtpd_server_is_a_real_receiver), so the offload must answer it with the
    MTA's own extensions; then the DANE sender's message, with its address."""
    mark = inbound.mta.log_mark()
    seen = len(inbound.gw.sessions())
    before, after = ehlo_over_tls(inbound)
    inbound.gw.sessions_to(None, after=seen, where=lambda s: s.get("listener") == "normalize")
    log = inbound.mta.log()[mark:]
    assert b"STARTTLS" in before, before  # the gateway's offer
    assert after.startswith(b"250-legacy.b.test Hello client.example"), (after, log)
    assert b"STARTTLS" not in after and "failed-command" not in log, (after, log)
    marker = new_marker()
    mark = inbound.mta.log_mark()
    got = dane_sender_delivers(inbound, marker)
    assert envelope_sender(got.message) == b"alice@example.org", got.message[:300]
    assert b"from sender.example.org (<unknown> [203.0.113.2])" in got.message, got.message
    log = inbound.mta.log()[mark:]
    [connected] = re.findall(r"^\S+ smtp connected .*$", log, re.MULTILINE)
    [received] = re.findall(r"^\S+ smtp message .*$", log, re.MULTILINE)
    assert connected.endswith(" connected address=203.0.113.2 host=<unknown>"), log
    assert "failed-command" not in log and "tls" not in log, log  # TLS was the gateway's
    print(f"\nOPENSMTPD inbound: EHLO over TLS answered {after.splitlines()[0].decode()}\n"
          f"  sender {got.verified.split(': ', 1)[1]}\n"
          f"  OpenSMTPD: {tail(connected)}; {tail(received)}")


def plain_client_delivers(i: Inbound) -> tuple[bytes, str, dict[str, Any]]:
    """A client without TLS through the offload (port 25, the shield on), from the peer
    (203.0.113.2): the message OpenSMTPD delivered, its log since, the session line."""
    marker = new_marker()
    mark = i.mta.log_mark()
    seen = len(i.gw.sessions())
    code = smtp_send(i, 25, b"From: a@client.example\r\nSubject: client address\r\n\r\n"
                     + marker + b"\r\n.\r\n")
    assert code == 250
    message = i.mta.wait_delivered(marker)
    assert envelope_sender(message) == b"a@client.example", message[:300]
    assert b"from client.example (<unknown> [203.0.113.2])" in message, message[:400]
    [s] = [x for x in i.gw.sessions()[seen:] if x.get("listener") == "normalize"]
    assert (s["direction"], s["tls"], s["outcome"]) == ("inbound", "plaintext", "relayed"), s
    return message, i.mta.log()[mark:], s


def test_opensmtpd_logs_the_real_client_through_proxy_v2(inbound: Inbound) -> None:
    """OpenSMTPD reads the PROXY v2 header and logs, and writes in Received, the client's
    own address; the gateway's (198.51.100.1) only in its ``event=proxy`` line, the
    header's sender."""
    _, log, _ = plain_client_delivers(inbound)
    [proxy] = re.findall(r"^\S+ smtp event=proxy .*$", log, re.MULTILINE)
    [connected] = re.findall(r"^\S+ smtp connected .*$", log, re.MULTILINE)
    assert proxy.endswith(" event=proxy address=198.51.100.1"), proxy
    assert connected.endswith(" connected address=203.0.113.2 host=<unknown>"), connected
    assert log.count("198.51.100.1") == 1, log
    print(f"\nOPENSMTPD inbound PROXY v2: {tail(proxy)}; {tail(connected)}")


def test_opensmtpd_logs_the_real_client_transparently(tmp_path: Path) -> None:
    """The other way (``client_address: transparent``, a listener without proxy-v2): the
    connection comes from the client's own address; the gateway's is nowhere."""
    with inbound_world(tmp_path, lambda ns: OpenSmtpdServer(ns, MTA_V4)) as world:
        _, log, _ = plain_client_delivers(world)
    [connected] = re.findall(r"^\S+ smtp connected .*$", log, re.MULTILINE)
    assert connected.endswith(" connected address=203.0.113.2 host=<unknown>"), connected
    assert "event=proxy" not in log and "198.51.100.1" not in log, log
    print(f"\nOPENSMTPD inbound transparent: {tail(connected)}")


def test_no_smuggling_variant_reaches_opensmtpd_through_the_shield(inbound: Inbound) -> None:
    names = shield_holds(inbound)
    print(f"\nOPENSMTPD inbound shield (normalize): smuggled {names} of {CARRIERS}")


def test_the_control_without_the_shield(inbound: Inbound) -> None:
    """``smuggling: off``: what OpenSMTPD 6.8 makes of the same sessions alone.  It ends a
    line at a bare LF too, so an end of data in bare LF ends the carrier early; but it
    refuses any command that arrives with more bytes behind it ("Pipelining not
    supported"): the rest of the carrier is refused with 500 and the session closed,
    nothing smuggled and the carrier lost.  A bare CR ends no line: one message, the
    would-be second inside."""
    mark = inbound.mta.log_mark()
    replies: dict[str, int] = {}
    names, got = smuggled_through(inbound, "off", replies=replies)
    log = inbound.mta.log()[mark:]
    assert names == [], (names, log)
    lf_ended = {"LF.LF", "CRLF.LF", "LF.CRLF", "LF-only", "LF-only-BDAT"}
    assert replies == {v: 500 if v in lf_ended else 250 for v in CARRIERS}, replies
    refused = re.findall(r"^\S+ smtp bad-input (.*)$", log, re.MULTILINE)
    assert refused == ['result="500 5.5.1 Invalid command: Pipelining not supported"'] * 5, log
    assert len(got) == 4, [m[:300] for m in got]  # the bare-CR carriers, one message each
    for m in got:
        assert b"Subject: smuggled off-" in m and m.rstrip().endswith(b"after"), m[-300:]
    print(f"\nOPENSMTPD inbound without the shield: smuggled {names}; replies {replies}\n"
          f"  OpenSMTPD: {refused[0]} (x{len(refused)})")


def test_opensmtpd_server_is_a_real_receiver(inbound: Inbound) -> None:
    """The lab's OpenSMTPD answers as OpenSMTPD (direct from gw, with a PROXY v2 header of
    its own naming 192.0.2.77), offers neither PIPELINING nor CHUNKING nor STARTTLS, takes
    the header's address as the client's, refuses a second EHLO, and refuses to relay."""
    mark = inbound.mta.log_mark()
    header = v2_header(Endpoint(ipaddress.ip_address("192.0.2.77"), 40000),
                       Endpoint(ipaddress.ip_address(MTA_V4), 25))
    with inbound.lab.gw.connect(MTA_V4, 25, timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(header)
        f = sock.makefile("rb")
        banner = f.readline()
        sock.sendall(b"EHLO gw.example\r\n")
        ehlo = b""
        while (line := f.readline()).startswith(b"250-"):
            ehlo += line
        ehlo += line
        sock.sendall(b"EHLO gw.example\r\n")
        again = f.readline()
        sock.sendall(b"MAIL FROM:<a@gw.example>\r\n")
        assert f.readline().startswith(b"250")
        sock.sendall(b"RCPT TO:<x@elsewhere.example>\r\n")
        refused = f.readline()
        sock.sendall(b"QUIT\r\n")
    assert re.match(rb"220 legacy\.b\.test ESMTP OpenSMTPD", banner), banner
    assert ehlo.startswith(b"250-legacy.b.test Hello gw.example"), ehlo
    assert not re.search(rb"PIPELINING|CHUNKING|STARTTLS", ehlo), ehlo
    # A second greeting in one session is refused (RFC 5321 4.1.4 lets a server decline).
    assert again == b"503 5.5.1 Invalid command: Already identified\r\n", again
    assert refused.startswith(b"550 Invalid recipient: <x@elsewhere.example>"), refused
    inbound.mta.wait_log(r"^\S+ smtp connected address=192\.0\.2\.77 ", since=mark)
    offered = " ".join(line[4:].decode().strip() for line in ehlo.splitlines()[1:])
    print(f"\nOPENSMTPD inbound real receiver: {banner.decode().strip()}; EHLO offers "
          f"{offered}; a second EHLO: {again.decode().strip()}; {refused.decode().strip()}")

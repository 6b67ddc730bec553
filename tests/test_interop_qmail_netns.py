"""Issue 19's interoperability matrix, the qmail row: notqmail 1.09 built from
../shared/third-party/ once per test session (gatelab/qmail_lab.py), with the real programs
in the namespace lab.  docs/interop.md holds the matrix as these tests last printed it.

The two worlds (outbound: qmail sends; inbound: qmail receives behind the offload) are
gatelab/interop.py's.

qmail's own word: qmail-remote's reports (``r``/``h``/``s`` per recipient, ``K``/``Z``/``D``
for the message), qmail-send's log and ``qmail-qread`` (its queue), the ``Received:`` line
qmail-smtpd writes and the log of the ``tcpserver`` it runs under, its Maildir.  The
gateway's session lines, the Postfix peers' logs and tcpdump on gw say what crossed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import pytest

from gatelab import dnslab, netlab, postfix_instance, qmail_lab
from gatelab.capture import Capture
from gatelab.interop import (
    CARRIERS,
    INBOUND_PORTS,
    TWO_RECIPIENTS,
    Inbound,
    Outbound,
    body_of,
    client_bytes,
    client_segments,
    dane_sender_delivers,
    delivered_once,
    ehlo_of,
    envelope_sender,
    inbound_world,
    new_marker,
    outbound_world,
    shield_holds,
    smtp_send,
    smuggled_through,
    tricky_body,
)
from gatelab.netlab import GW_MTA_IF, GW_PEER_IF, MTA_V4
from gatelab.qmail_lab import QmailBuild, QmailReceiver, QmailSender, Record
from gatelab.smuggling import lf_only, smuggling

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable() or qmail_lab.qmail_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

# The carriers with a bare LF: qmail-smtpd alone ends the session at the first one (451).
LF_CARRIERS = [c for c in CARRIERS if "LF" in c.replace("CRLF", "")]
CR_CARRIERS = [c for c in CARRIERS if c not in LF_CARRIERS]


@pytest.fixture(scope="session")
def build() -> Iterator[QmailBuild]:
    with qmail_lab.built() as b:
        yield b


def kinds(records: list[Record]) -> str:
    return "".join(r.kind for r in records)


# -- outbound: qmail sends ----------------------------------------------------------------

@pytest.fixture(scope="module")
def outbound(tmp_path_factory: pytest.TempPathFactory, build: QmailBuild) -> Iterator[Outbound]:
    with outbound_world(tmp_path_factory.mktemp("qmail-out")) as world:
        yield world


@pytest.fixture
def qmail(outbound: Outbound, build: QmailBuild) -> Iterator[QmailSender]:
    with QmailSender(build, outbound.lab.mta) as sender:
        yield sender


def test_legacy_qmail_to_a_dane_peer_is_upgraded_and_verified(outbound: Outbound,
                                                              qmail: QmailSender) -> None:
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    with Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "dane.pcap") as cap:
        records = qmail.remote("203.0.113.2", "alice@example.com", ["dane@example.net"],
                               b"Subject: qmail dane\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
    assert kinds(records) == "rK", records
    assert records[1].text.startswith("203.0.113.2 accepted message.\nRemote host said: 250 ")
    s = outbound.session_since("203.0.113.2:25", seen)
    assert (s["plan"], s["tls"]) == ("require-tls", "dane"), s
    assert s["verify"] in ("dane-ee match", "resumed verified session"), s
    assert s["outcome"] == "relayed", s
    assert cap.packets() > 10 and not cap.contains(marker)
    received = message.split(b"\n\n", 1)[0].replace(b"\n\t", b" ").decode()
    assert "from mta.example.com" in received and "(using TLSv1." in received, received
    print(f"\nQMAIL outbound legacy -> DANE peer: qmail-remote {records[0]} {records[1]}; "
          f"gateway tls={s['tls']} verify={s['verify']}")


@pytest.mark.parametrize(("host", "tls"), [
    ("203.0.113.8", None),  # policy none: the static passthrough, the bare pump
    ("203.0.113.7", "plaintext"),  # no STARTTLS offered: read by the envelope tracker
])
def test_legacy_qmail_to_a_plain_peer_passes_byte_exact(outbound: Outbound, qmail: QmailSender,
                                                       host: str, tls: str | None) -> None:
    """The body qmail-remote was given (LF line ends, as qmail queues it) is the body the
    peer stored, byte for byte; what qmail put on the wire (CRLF, dots stuffed, one command
    at a time, HELO) is what reached the peer, but for the gateway's EHLO probe."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    body = tricky_body(marker)
    work = outbound.work
    with Capture(outbound.lab.gw, GW_MTA_IF, work / f"mta{host}.pcap", "tcp port 25") as mta, \
            Capture(outbound.lab.gw, GW_PEER_IF, work / f"peer{host}.pcap",
                    "tcp port 25") as peer:
        records = qmail.remote(host, "alice@example.com", ["plain@example.net"],
                               b"Subject: bytes\n\n" + body)
        message = delivered_once(outbound.plain_peer, marker)
    assert kinds(records) == "rK", records
    sent, got = hashlib.sha256(body).hexdigest(), hashlib.sha256(body_of(message)).hexdigest()
    assert got == sent, (body, body_of(message))
    wire = client_bytes(mta.path)
    assert wire.startswith(b"HELO mta.example.com\r\nMAIL FROM:<alice@example.com>\r\n"
                           b"RCPT TO:<plain@example.net>\r\nDATA\r\n"), wire[:200]
    assert b"\r\n..\r\n...two dots\r\n" in wire and wire.endswith(b"\r\n.\r\nQUIT\r\n"), wire[-200:]
    s = outbound.session_since(f"{host}:25", seen)
    assert s.get("tls") == tls, s
    # qmail-remote sends QUIT and closes without waiting for the 221: through the bare pump,
    # which reads no SMTP, the peer's 221 may reach a socket qmail has closed, whose reset
    # ends the session (seen in the fresh root).  The message is delivered either way.
    assert s["outcome"] in (("relayed", "client_reset") if tls is None else ("relayed",)), s
    helo, rest = wire.split(b"\r\n", 1)
    # Policy none: the bare pump, not one byte changed.  Otherwise, to a HELO client's
    # session the gateway adds its own EHLO (to learn whether the peer offers STARTTLS)
    # and the client's HELO again (the state the client chose); from MAIL on, the bytes.
    probe = b"" if tls is None else b"EHLO mta.example.com\r\n" + helo + b"\r\n"
    to_peer = client_bytes(peer.path)
    assert to_peer == helo + b"\r\n" + probe + rest, (to_peer[:200], wire[:200])
    print(f"\nQMAIL outbound legacy -> plain {host} (tls={tls}): body sha256 {sent[:16]}… "
          f"delivered; {len(wire)} bytes from qmail-remote, {len(to_peer)} bytes to the peer"
          + (f" (+ the gateway's {probe!r})" if probe else " (the same bytes)"))


def test_legacy_qmail_under_a_wrong_tlsa_keeps_the_message_and_delivers_once_after_the_fix(
        outbound: Outbound, build: QmailBuild) -> None:
    """The whole qmail queue (qmail-inject, qmail-send, qmail-rspawn, qmail-remote) routing
    fix.test to 203.0.113.9 by smtproutes: the gateway's 421 is a deferral in qmail-send's
    log, the message stays in qmail-qread; after the fix, a retry (SIGALRM) delivers it
    once and the queue is empty."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    try:
        with QmailSender(build, outbound.lab.mta, routes=["fix.test:203.0.113.9"]) as q, \
                Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "fix.pcap") as cap:
            q.start_queue()
            q.inject("alice@example.com", ["fix@fix.test"],
                     b"To: fix@fix.test\nSubject: qmail wrong tlsa\n\n" + marker + b"\n")
            deferral = q.wait_log(r"^delivery (\d+): deferral: .*$").group(0)
            assert ("Connected_to_203.0.113.9_but_sender_was_rejected./Remote_host_said:_421_"
                    "4.7.5_smtpgate:_TLS_to_peer_failed:_no_matching_record/") in deferral
            held = q.queued()
            assert "remote\tfix@fix.test" in held, held
            outbound.deferred_by_the_wrong_tlsa(seen, marker)

            outbound.fix_the_tlsa()
            mark = q.log_mark()
            q.run_queue()
            delivered_once(outbound.tls_peer, marker)
            success = q.wait_log(r"^delivery \d+: success: .*$", since=mark).group(0)
            q.wait_log(r"^end msg \d+$", since=mark)
            assert q.queued() == "", q.log()
            [msg] = re.findall(r"^new msg (\d+)$", q.log(), re.MULTILINE)  # one message
        assert cap.packets() > 10 and not cap.contains(marker)
        outbound.verified_after_the_fix(seen)
        print(f"\nQMAIL outbound wrong TLSA (msg {msg}): {deferral}\n"
              f"  qmail-qread: {' '.join(held.split())}\n  after the fix: {success}")
    finally:
        outbound.unfix_the_tlsa()


@pytest.mark.parametrize("case", TWO_RECIPIENTS)
def test_legacy_qmail_several_recipients_only_the_dane_domain_is_deferred(
        outbound: Outbound, qmail: QmailSender, case: tuple[str, str, str, str]) -> None:
    """One qmail-remote, two recipients, one session: the recipient whose domain's MX for
    this address publishes TLSA the hop cannot satisfy gets 450, an ``s`` report (qmail-send
    keeps that recipient and retries it); the other ``r``, and the message ``K``."""
    host, asks, other, why = case
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    peer = outbound.tls_peer if host == "203.0.113.3" else outbound.plain_peer
    records = qmail.remote(host, "alice@example.com", [asks, other],
                           b"Subject: two\n\n" + marker + b"\n")
    message = delivered_once(peer, marker)
    assert f"X-Original-To: {other}".encode() in message
    assert f"X-Original-To: {asks}".encode() not in message
    assert kinds(records) == "srK", records
    assert records[0].text.startswith(f"{host} does not like recipient.\n"
                                      f"Remote host said: {why}"), records[0]
    assert len(outbound.gw.sessions_to(f"{host}:25", after=seen)) == 1  # one session
    print(f"\nQMAIL outbound two recipients via {host}: qmail-remote {records[0]} "
          f"{records[1]} {records[2]}")


def test_legacy_qmail_queue_sends_each_recipient_alone_and_keeps_the_deferred_one(
        outbound: Outbound, build: QmailBuild) -> None:
    """Through the queue, qmail-send gives qmail-remote one recipient per delivery: two
    sessions.  The one the gateway answers 450 is a deferral in qmail-send's log (its
    qmail-remote says ``s``, then "Giving up": still soft), and stays in qmail-qread; the
    other is delivered."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    rcpts = ["u3@wrongmx.test", "u4@example.net"]
    with QmailSender(build, outbound.lab.mta, routes=[
            "wrongmx.test:203.0.113.3", "example.net:203.0.113.3"]) as q:
        q.start_queue()
        q.inject("alice@example.com", rcpts,
                 b"To: u3@wrongmx.test, u4@example.net\nSubject: qmail queue two\n\n"
                 + marker + b"\n")
        deferral = q.wait_log(r"^delivery \d+: deferral: .*$").group(0)
        success = q.wait_log(r"^delivery \d+: success: .*$").group(0)
        message = delivered_once(outbound.tls_peer, marker)
        held, log = q.queued(), q.log()
    assert ("203.0.113.3_does_not_like_recipient./Remote_host_said:_450_4.7.5_smtpgate:_peer_"
            "key_does_not_match_the_TLSA_of_mx.wrongkey.test") in deferral, deferral
    assert "203.0.113.3_accepted_message./Remote_host_said:_250_2.0.0_Ok" in success, success
    starts = re.findall(r"^starting delivery \d+: msg \d+ to remote (\S+)$", log,
                        re.MULTILINE)
    assert sorted(starts) == rcpts, log
    assert b"X-Original-To: u4@example.net" in message
    assert "remote\tu3@wrongmx.test" in held and "done\tremote\tu4@example.net" in held, held
    assert len(outbound.gw.sessions_to("203.0.113.3:25", after=seen, n=2)) == 2
    print(f"\nQMAIL outbound queue, two recipients via 203.0.113.3: {deferral}\n  {success}\n"
          f"  qmail-qread: {' '.join(held.split())}")


@pytest.mark.parametrize(("host", "tls", "peer_saw"), [
    # The MTA's HELO, the gateway's EHLO (the peer's capabilities) and STARTTLS, then the
    # MTA's HELO again inside TLS.
    ("203.0.113.2", "dane", "helo=2 ehlo=1 starttls=1 mail=1 rcpt=1 data=1 quit=1 commands=8"),
    ("203.0.113.8", None, "helo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"),
])
def test_legacy_qmail_uses_neither_pipelining_nor_bdat(outbound: Outbound, qmail: QmailSender,
                                                       host: str, tls: str | None,
                                                       peer_saw: str) -> None:
    """qmail-remote speaks HELO, then waits for each reply: every command is a segment of its
    own on the MTA's link, DATA (never BDAT); the peer's session summary counts them."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    receiver = outbound.tls_peer if tls else outbound.plain_peer
    mark = receiver.log_mark()
    with Capture(outbound.lab.gw, GW_MTA_IF, outbound.work / f"pipe{host}.pcap",
                 "tcp port 25") as cap:
        records = qmail.remote(host, "alice@example.com", ["pipe@example.net"],
                               b"Subject: qmail pipelining\n\n" + marker + b"\n")
        delivered_once(receiver, marker)
    assert kinds(records) == "rK", records
    segments = client_segments(cap.path)
    commands = [seg for seg in segments if marker not in seg]
    assert commands == [b"HELO mta.example.com\r\n", b"MAIL FROM:<alice@example.com>\r\n",
                        b"RCPT TO:<pipe@example.net>\r\n", b"DATA\r\n", b"QUIT\r\n"], segments
    summary = receiver.wait_log(r"disconnect from \S+ (.*commands=\S+)", since=mark).group(1)
    assert summary == peer_saw, summary
    s = outbound.session_since(f"{host}:25", seen)
    assert (s["outcome"], s.get("tls")) == ("relayed", tls), s
    print(f"\nQMAIL outbound no PIPELINING, no BDAT via {host} (tls={tls}): "
          f"{len(commands)} command segments {[c.split()[0].decode() for c in commands]}; "
          f"peer saw {summary}")


def test_qmail_never_sends_ehlo_or_starttls_so_the_gateway_is_its_only_tls(
        outbound: Outbound, qmail: QmailSender) -> None:
    """The "own STARTTLS" column is "—" for qmail: toward a peer that offers STARTTLS and
    publishes no TLSA (.3), qmail-remote says HELO and never STARTTLS (the capture on its
    link); the TLS on the peer's link is the gateway's opportunistic upgrade, not
    ``end_to_end``."""
    seen = len(outbound.gw.sessions())
    marker = new_marker()
    mark = outbound.tls_peer.log_mark()
    with Capture(outbound.lab.gw, GW_MTA_IF, outbound.work / "own.pcap", "tcp port 25") as mta, \
            Capture(outbound.lab.gw, GW_PEER_IF, outbound.work / "own-peer.pcap") as peer:
        records = qmail.remote("203.0.113.3", "alice@example.com", ["own@example.net"],
                               b"Subject: qmail own tls\n\n" + marker + b"\n")
        message = delivered_once(outbound.tls_peer, marker)
    assert kinds(records) == "rK", records
    wire = client_bytes(mta.path)
    assert wire.startswith(b"HELO ") and b"EHLO" not in wire and b"STARTTLS" not in wire, wire
    assert not peer.contains(marker) and b"(using TLSv1." in message
    outbound.tls_peer.wait_log(r"TLS connection established from \S+\[[\d.]+\]", since=mark)
    s = outbound.session_since("203.0.113.3:25", seen)
    assert (s["plan"], s["tls"], s["outcome"]) == ("try-tls", "tls", "relayed"), s
    assert "mta_starttls" not in s, s  # qmail never tried: nothing to step aside from
    print(f"\nQMAIL outbound own STARTTLS: none (HELO, no EHLO/STARTTLS from qmail-remote); "
          f"gateway plan={s['plan']} tls={s['tls']} mta_starttls={s.get('mta_starttls')}")


# -- inbound: qmail receives --------------------------------------------------------------

@pytest.fixture(scope="module")
def inbound(tmp_path_factory: pytest.TempPathFactory, build: QmailBuild) -> Iterator[Inbound]:
    # qmail-smtpd has no PROXY protocol: the client's address by transparent.
    with inbound_world(tmp_path_factory.mktemp("qmail-in"),
                       lambda ns: QmailReceiver(build, ns, MTA_V4)) as world:
        yield world


def test_qmail_smtpd_has_no_proxy_protocol_so_inbound_is_transparent(
        inbound: Inbound) -> None:
    """A PROXY header is just a bad command to qmail-smtpd (directly, from gw): the client's
    address reaches it only by ``client_address: transparent`` (tcpserver's TCPREMOTEIP)."""
    with inbound.lab.gw.connect(MTA_V4, 25, timeout=10) as sock:
        sock.settimeout(10)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"PROXY TCP4 203.0.113.2 198.51.100.2 40000 25\r\n")
        said = f.readline().decode().strip()
        sock.sendall(b"QUIT\r\n")
    assert said == "502 unimplemented (#5.5.1)", said
    print(f"\nQMAIL inbound PROXY: qmail-smtpd answers the PROXY line: {said}")


def test_dane_sender_verifies_the_gateway_and_qmail_logs_the_real_client(
        inbound: Inbound) -> None:
    mta = inbound.mta
    assert isinstance(mta, QmailReceiver)  # its tcpserver log too
    marker = new_marker()
    mark, tcp_mark = mta.log_mark(), mta.tcpserver_log.mark()
    got = dane_sender_delivers(inbound, marker)
    assert envelope_sender(got.message) == b"alice@example.org", got.message[:300]
    # qmail-smtpd's Received: line: tcpserver's TCPREMOTEIP, the client's own address.
    received = re.search(rb"^Received: from (\S+ \(HELO [^)]*\) \([\d.]+\))\n  by (\S+) "
                         rb"with (\S+);", got.message, re.MULTILINE)
    assert received is not None, got.message[:600]
    assert received.group(1) == b"unknown (HELO sender.example.org) (203.0.113.2)", received
    ok = mta.tcpserver_log.wait(r"^tcpserver: ok (\d+) \S+ :([\d.]+)::\d+$",
                                since=tcp_mark)
    assert ok.group(2) == "203.0.113.2", ok.group(0)
    info = mta.wait_log(r"^info msg \d+: bytes \d+ from <alice@example\.org> qp (\d+) .*$",
                        since=mark)
    # qp: the qmail-queue that qmail-smtpd ran for this message (its Received: line says so)
    assert f"Received: (qmail {info.group(1)} invoked from network)".encode() in got.message
    assert "198.51.100.1" not in mta.tcpserver_log.text()[tcp_mark:]
    assert b"198.51.100.1" not in got.message
    print(f"\nQMAIL inbound: sender {got.verified.split(': ', 1)[1]}\n"
          f"  qmail-smtpd: Received: from {received.group(1).decode()} by "
          f"{received.group(2).decode()} with {received.group(3).decode()}\n"
          f"  {ok.group(0)}\n  qmail-send: {info.group(0)}")


def test_no_smuggling_variant_reaches_qmail_through_the_shield(inbound: Inbound) -> None:
    """Every carrier, the bare-LF ones too: the shield (``normalize``) makes their line ends
    CRLF (and stuffs the dots), so qmail-smtpd takes each as one message."""
    names = shield_holds(inbound)
    print(f"\nQMAIL inbound shield (normalize): smuggled {names} of {CARRIERS}")


def test_the_control_without_the_shield(inbound: Inbound) -> None:
    """``smuggling: off``: what qmail-smtpd makes of the same sessions alone.  A bare CR is
    content to it (the CR carriers are one message each, nothing smuggled); a bare LF ends
    the session (``451 See https://cr.yp.to/docs/smtplf.html.``, qmail-smtpd exits 1):
    the LF carriers are refused whole, so those go to it one by one here, not through
    smuggled_through (whose honest client expects 250)."""
    mta = inbound.mta
    assert isinstance(mta, QmailReceiver)  # its tcpserver log too
    names, got = smuggled_through(inbound, "off", CR_CARRIERS)
    assert names == [] and len(got) == len(CR_CARRIERS), (names, [m[:300] for m in got])
    before = len(mta.maildir_messages())
    tcp_mark = mta.tcpserver_log.mark()
    with Capture(inbound.lab.gw, GW_MTA_IF, inbound.work / "control.pcap") as cap:
        for variant in LF_CARRIERS:
            tag = f"off-{variant}"
            content = (lf_only(tag, variant.endswith("BDAT")) if variant.startswith("LF-only")
                       else smuggling(variant, tag))
            assert smtp_send(inbound, INBOUND_PORTS["off"], content) == 451, variant
        ends = [mta.tcpserver_log.wait(r"^tcpserver: end \d+ status (\d+)$", since=tcp_mark)]
        while len(ends) < len(LF_CARRIERS):
            ends.append(mta.tcpserver_log.wait(r"^tcpserver: end \d+ status (\d+)$",
                                               since=ends[-1].end()))
    said = sorted({m.decode() for m in re.findall(rb"451 [^\r\n]*", cap.data())})
    assert said == ["451 See https://cr.yp.to/docs/smtplf.html."], said
    assert [e.group(1) for e in ends] == ["256"] * len(LF_CARRIERS), ends
    mta.wait_queue_empty()
    assert len(mta.maildir_messages()) == before  # nothing of them delivered
    print(f"\nQMAIL inbound without the shield: {CR_CARRIERS} one message each, smuggled "
          f"{names};\n  {LF_CARRIERS}: qmail-smtpd said {said[0]!r}, tcpserver: "
          f"{ends[0].group(0)}, nothing delivered")


def test_qmail_smtpd_is_a_real_receiver(inbound: Inbound) -> None:
    """The lab's qmail-smtpd answers as qmail (direct, from gw's own address): ESMTP in
    name, PIPELINING and 8BITMIME its only extensions (no STARTTLS, no CHUNKING, no SIZE),
    relaying refused by rcpthosts."""
    banner, ehlo = ehlo_of(inbound.lab.gw, MTA_V4)
    assert banner == b"220 legacy.b.test ESMTP\r\n", banner
    assert ehlo == b"250-legacy.b.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n", ehlo
    with inbound.lab.gw.connect(MTA_V4, 25, timeout=10) as sock:
        sock.settimeout(10)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"HELO gw.example\r\n")
        assert f.readline() == b"250 legacy.b.test\r\n"
        sock.sendall(b"MAIL FROM:<a@gw.example>\r\n")
        assert f.readline().startswith(b"250")
        sock.sendall(b"RCPT TO:<x@elsewhere.example>\r\n")
        refused = f.readline().decode().strip()
        sock.sendall(b"QUIT\r\n")
    assert refused == ("553 sorry, that domain isn't in my list of allowed rcpthosts "
                       "(#5.7.1)"), refused
    print(f"\nQMAIL inbound real receiver: {banner.decode().strip()}; EHLO "
          f"{ehlo.decode().splitlines()}; relay: {refused}")

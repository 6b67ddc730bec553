"""Issue 19's interoperability matrix, the Exim 4.96 row (Debian's binary from its private
root, gatelab/exim_client.py), with the real programs in the namespace lab.
docs/interop.md holds the matrix as these tests last printed it.

Outbound (``outbound`` fixture), Exim the sending MTA in mta::

    mta:  Exim, a fixed route to the address a test names (hosts_avoid_tls: legacy; or
          Exim's default opportunistic STARTTLS)
    gw:   smtpgate, policy dane, 203.0.113.8 at policy none; DNS answers kept <= 1 s (the
          wrong-TLSA test fixes its record and retries); Unbound
    peer: Postfix with STARTTLS on .2 (mx.b.test, TLSA matches), .3 (mx.nodane.test, no
          TLSA), .9 (mx.fix.test, TLSA wrong until a test fixes it); Postfix without TLS on
          .7 (no PTR; mx.needdane.test's address, which publishes TLSA) and .8 (policy none)

Inbound (``inbound`` fixture), Exim the legacy receiver behind the offload::

    peer: Postfix at smtp_tls_security_level=dane (Unbound on gw), raw SMTP clients
    gw:   smtpgate inbound, offload: port 25 -> client_address transparent, smuggling
          normalize (the default); port 28 -> smuggling off (the control)
    mta:  Exim's daemon on 198.51.100.2:25, b.test into a Maildir

Exim's ``-bp``, its main log and its Maildir are the MTA's own word; the gateway's session
lines, the Postfix peers' logs and tcpdump on gw say what crossed.
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gatelab import certs, dnslab, exim_client, netlab, postfix_instance
from gatelab.capture import Capture
from gatelab.dnslab import DnsWorld
from gatelab.exim_client import EximClient, EximServer
from gatelab.gatewayproc import GatewayProcess, gateway_config
from gatelab.netlab import GW_MTA_IF, GW_PEER_IF, GW_PEER_V4, MTA_V4, PEER_V4, Lab
from gatelab.postfix_instance import (
    PostfixInstance,
    null_client_settings,
    receiver_settings,
    tls_receiver_settings,
)
from gatelab.smuggling import TRIPWIRE, VARIANTS, lf_only, smuggling
from gateway.dane import tlsa_record
from gateway.smtp import Reply, ReplyReader

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable() or exim_client.exim_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

WRONG = "3 1 1 " + "5a" * 32
DOMAINS = "example.net, dane.test, wrongmx.test, needdane.test, fix.test"


# -- outbound: Exim sends ---------------------------------------------------------------

@dataclass
class Outbound:
    lab: Lab
    dns: DnsWorld
    gw: GatewayProcess
    tls_peer: PostfixInstance
    plain_peer: PostfixInstance
    good: str  # the TLSA rdata of the peers' key
    work: Path


@pytest.fixture(scope="module")
def outbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outbound]:
    work = tmp_path_factory.mktemp("exim-out")
    leaf = certs.make_leaf(None, ["mx.b.test"])
    chain = certs.write_chain_file(work / "peer-chain.pem", leaf)
    good = str(tlsa_record(leaf.der))
    with Lab() as lab, DnsWorld.on_lab(lab, work / "dns") as dns:
        for address in ("203.0.113.7/24", "203.0.113.8/24", "203.0.113.9/24"):
            lab.peer.ip("addr", "add", address, "dev", netlab.HOST_IF)
        dns.zone("test.", [
            "mx.b A 203.0.113.2", f"_25._tcp.mx.b TLSA {good}",
            "mx.nodane A 203.0.113.3",
            "mx.fix A 203.0.113.9", f"_25._tcp.mx.fix TLSA {WRONG}",
            # Recipient domains whose MX host for an address publishes TLSA:
            "wrongmx MX 10 mx.wrongkey", "mx.wrongkey A 203.0.113.3",  # .3, key mismatch
            f"_25._tcp.mx.wrongkey TLSA {WRONG}",
            "needdane MX 10 mx.needdane", "mx.needdane A 203.0.113.7",  # .7: no STARTTLS
            f"_25._tcp.mx.needdane TLSA {good}",
        ])
        dns.zone("113.0.203.in-addr.arpa.", ["2 PTR mx.b.test.", "3 PTR mx.nodane.test.",
                                             "9 PTR mx.fix.test."])
        dns.start()
        lab.redirect_port25(10025)
        # DNS answers kept at most 1 s: a fixed TLSA is seen by the next attempt.
        config = gateway_config(policy="dane", entries=["{match: 203.0.113.8, level: none}"],
                                cache="min_ttl: 0, max_ttl: 1, negative_max_ttl: 1, "
                                      "failure_ttl: 0")
        with PostfixInstance(lab.peer, work, tls_receiver_settings(
                    "203.0.113.2, 203.0.113.3, 203.0.113.9", chain, domain=DOMAINS),
                    name="tlspeer") as tls_peer, \
                PostfixInstance(lab.peer, work, receiver_settings(
                    "203.0.113.7, 203.0.113.8", domain=DOMAINS), name="plainpeer") as plain, \
                GatewayProcess(lab.gw, work / "gw", config) as gw:
            yield Outbound(lab, dns, gw, tls_peer, plain, good, work)


def new_marker() -> bytes:
    return f"MARKER-{uuid.uuid4().hex}".encode()


def copies(peer: PostfixInstance, marker: bytes) -> list[bytes]:
    return [data for p in peer.maildir_messages() if marker in (data := p.read_bytes())]


def delivered_once(peer: PostfixInstance, marker: bytes) -> bytes:
    message = peer.wait_delivered(marker)
    time.sleep(0.5)  # a second copy would be right behind the first
    found = copies(peer, marker)
    assert len(found) == 1, f"{len(found)} copies"
    return message


def session_since(o: Outbound, destination: str, seen: int) -> dict[str, Any]:
    """The last session line to ``destination`` after the first ``seen`` lines."""
    return o.gw.sessions_to(destination, after=seen)[-1]


def body_of(message: bytes) -> bytes:
    """The body: what follows the header's end (Maildir and Exim's input: LF line ends)."""
    return message.split(b"\n\n", 1)[1]


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
    s = session_since(outbound, "203.0.113.2:25", seen)
    assert (s["plan"], s["tls"], s["outcome"]) == ("require-tls", "dane", "relayed"), s
    assert s["verify"] in ("dane-ee match", "resumed verified session"), s
    assert cap.packets() > 10 and not cap.contains(marker)
    assert b"(using TLSv1." in message  # the peer's Received: the hop was TLS
    print(f"\nEXIM outbound legacy -> DANE peer: {line.split(' ', 2)[2]}")


def client_bytes(pcap: Path) -> bytes:
    """What the client of the one port-25 connection in ``pcap`` sent, in sequence order
    (IPv4 over Ethernet, as the lab's veths carry it; a retransmission counted once)."""
    data = pcap.read_bytes()
    segments: dict[int, bytes] = {}
    offset = 24  # the pcap file header
    while offset + 16 <= len(data):
        length = struct.unpack_from("<I", data, offset + 8)[0]
        frame = data[offset + 16:offset + 16 + length]
        offset += 16 + length
        if frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4, TCP
            continue
        ip = frame[14:]
        total, ihl = struct.unpack_from("!H", ip, 2)[0], (ip[0] & 0x0F) * 4
        tcp = ip[ihl:total]
        if struct.unpack_from("!H", tcp, 2)[0] == 25 and (payload := tcp[(tcp[12] >> 4) * 4:]):
            segments.setdefault(struct.unpack_from("!I", tcp, 4)[0], payload)
    return b"".join(segments[seq] for seq in sorted(segments))


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
    body = (marker + b"\n.\n..two dots\n. dot space\nfin de ligne  \n\ttab\n"
            + "é ü ß €\n".encode() + b"x" * 990 + b"\n\nlast\n")
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
    s = session_since(outbound, f"{host}:25", seen)
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
            s = session_since(outbound, "203.0.113.9:25", seen)
            assert (s["tls"], s["outcome"], s["verify"]) == (
                "deferred", "deferred", "no matching record"), s
            assert not copies(outbound.tls_peer, marker)

            outbound.dns.set_records("test.", "_25._tcp.mx.fix", "TLSA", [outbound.good])
            time.sleep(1.2)  # the gateway's DNS cache (max_ttl 1 s) lets the old answer go
            mark = exim.log_mark()
            exim.run_queue()
            delivered_once(outbound.tls_peer, marker)
            retried = exim.wait_log(r"^.* => fix@fix\.test .*$", since=mark).group(0)
            assert held in retried and exim.queued() == "", exim.log()
        assert cap.packets() > 10 and not cap.contains(marker)
        s = outbound.gw.sessions_to("203.0.113.9:25", after=seen, n=2)[-1]
        assert (s["tls"], s["verify"], s["outcome"]) == ("dane", "dane-ee match", "relayed"), s
        print(f"\nEXIM outbound wrong TLSA: {deferral.split(' ', 2)[2]}\n"
              f"  after the fix: {retried.split(' ', 2)[2]}")
    finally:
        outbound.dns.set_records("test.", "_25._tcp.mx.fix", "TLSA", [WRONG])


@pytest.mark.parametrize(("host", "asks", "other", "why"), [
    # .3 gives TLS, but not with the key mx.wrongkey.test's TLSA names
    ("203.0.113.3", "u1@wrongmx.test", "u2@example.net",
     "450 4.7.5 smtpgate: peer key does not match the TLSA of mx.wrongkey.test"),
    # .7 gives no TLS at all, and mx.needdane.test publishes TLSA
    ("203.0.113.7", "u5@needdane.test", "u6@example.net",
     "450 4.7.5 smtpgate: mx.needdane.test publishes TLSA; this hop is not encrypted"),
])
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
    summary = receiver.wait_log(r"disconnect from \S+ (ehlo=.*commands=\S+)",
                                since=mark).group(1)
    assert "bdat=1" in summary and "data=" not in summary, summary
    assert ("starttls=1" in summary) == (tls is not None), summary
    s = session_since(outbound, f"{host}:25", seen)
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
    s = session_since(outbound, "203.0.113.3:25", seen)
    assert (s["tls"], s["mta_starttls"]) == ("end_to_end", "stepped_aside"), s
    # Inside Exim's TLS the gateway cannot see QUIT (test_takeover_netns.py says why the
    # end may read as a reset); the delivery and Exim's own TLS are what count.
    assert s["outcome"] in ("relayed", "upstream_reset", "client_reset"), s
    print(f"\nEXIM outbound own STARTTLS -> no TLSA: {line.split(' ', 2)[2]}")


# -- inbound: Exim receives --------------------------------------------------------------

@dataclass
class Inbound:
    lab: Lab
    exim: EximServer
    gw: GatewayProcess
    work: Path


INBOUND_PORTS = {"normalize": 25, "off": 28}


@pytest.fixture(scope="module")
def inbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inbound]:
    work = tmp_path_factory.mktemp("exim-in")
    leaf = certs.make_leaf(None, ["mx.b.test"])
    pki = certs.write_pki(work / "site", leaf)
    listeners = [
        f'{{name: "{name}", address: 0.0.0.0, port: {10000 + port}, direction: inbound, '
        f'starttls: offload, smuggling: {name}, client_address: transparent, '
        f'upstreams: ["{MTA_V4}:25"]}}' for name, port in INBOUND_PORTS.items()]
    with Lab() as lab, DnsWorld.on_lab(lab, work / "dns", resolver_listen=[GW_PEER_V4]) as dns:
        dns.zone("test.", ["b MX 10 mx.b", f"mx.b A {MTA_V4}",
                           f"_25._tcp.mx.b TLSA {tlsa_record(leaf.der)}"])
        dns.start()
        lab.peer.set_resolv_conf(f"nameserver {GW_PEER_V4}\noptions trust-ad\n")
        for port in INBOUND_PORTS.values():
            lab.gw.iptables(["-t", "nat", "-A", "PREROUTING", "-i", GW_PEER_IF, "-p", "tcp",
                             "--dport", str(port), "-j", "REDIRECT", "--to-ports",
                             str(10000 + port)])
        # client_address: transparent: Exim's replies to the client's address must come
        # back to the gateway's transparent socket (the routing `smtpgate firewall` prints).
        lab.gw.iptables(["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "socket",
                         "--transparent", "-j", "MARK", "--set-mark", "0x40000/0x40000"])
        lab.gw.ip("rule", "add", "fwmark", "0x40000/0x40000", "lookup", "100")
        lab.gw.ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        with EximServer(lab.mta, MTA_V4) as exim, \
                GatewayProcess(lab.gw, work / "gw", gateway_config(
                    listeners=listeners, tls=(pki["key"], pki["cert"]))) as gw:
            yield Inbound(lab, exim, gw, work)


def test_exim_has_no_proxy_protocol_so_inbound_is_transparent() -> None:
    """Debian's exim4-daemon-light 4.96 is built without SUPPORT_PROXY: ``hosts_proxy`` is
    unknown, so the client's address reaches it by ``client_address: transparent``."""
    said = exim_client.main_option_error("hosts_proxy")
    assert 'main option "hosts_proxy" unknown' in said, said
    print(f"\nEXIM inbound PROXY v2: {said}")


def test_dane_sender_verifies_the_gateway_and_exim_logs_the_real_client(
        inbound: Inbound) -> None:
    marker = new_marker()
    mark = inbound.exim.log_mark()
    seen = len(inbound.gw.sessions())
    settings = null_client_settings("", myhostname="sender.example.org")
    settings.update({"relayhost": "", "smtp_tls_security_level": "dane",
                     "smtp_dns_support_level": "dnssec", "smtp_tls_loglevel": "1"})
    with PostfixInstance(inbound.lab.peer, inbound.work, settings, name="danesender") as sender:
        sender.sendmail("alice@example.org", "bob@b.test",
                        b"Subject: inbound to exim\r\n\r\n" + marker + b"\r\n")
        verified = sender.wait_log(r"Verified TLS connection established to mx\.b\.test"
                                   r"\[198\.51\.100\.2\]:25: TLSv1\.[23].*", timeout=30).group(0)
        sender.wait_log(r"to=<bob@b\.test>.*status=sent", timeout=30)
    message = inbound.exim.wait_delivered(marker)
    assert envelope_sender(message) == b"alice@example.org", message[:300]
    received = inbound.exim.wait_log(r"^.* <= alice@example\.org .*$", since=mark).group(0)
    # The client's own address, not the gateway's (198.51.100.1).
    assert "H=(sender.example.org) [203.0.113.2]" in received, received
    assert "198.51.100.1" not in inbound.exim.log()[mark:]
    [s] = [x for x in inbound.gw.sessions()[seen:] if x.get("listener") == "normalize"]
    assert (s["direction"], s["tls"], s["outcome"]) == ("inbound", "tls", "relayed"), s
    print(f"\nEXIM inbound: sender {verified.split(': ', 1)[1]}\n"
          f"  Exim: {received.split(' ', 2)[2]}")


def smtp_send(i: Inbound, port: int, content: bytes) -> int:
    """One message, an honest client's way (each reply awaited), from the peer to
    mx.b.test's address: the code of the reply to the content (0: none)."""
    sock = i.lab.peer.connect(MTA_V4, port, timeout=10)
    sock.settimeout(10)  # connect() leaves it blocking: every wait here is bounded
    reader = ReplyReader()

    def say(data: bytes | None) -> Reply | None:
        if data is not None:
            sock.sendall(data)
        while (r := reader.next()) is None:
            if not (chunk := sock.recv(65536)):
                return None
            reader.feed(chunk)
        return r

    with sock:
        for line, code in ((None, 220), (b"EHLO client.example\r\n", 250),
                           (b"MAIL FROM:<a@client.example>\r\n", 250),
                           (b"RCPT TO:<bob@b.test>\r\n", 250), (b"DATA\r\n", 354)):
            r = say(line)
            assert r is not None and r.code == code, (line, r)
        end = say(content)
        try:
            sock.sendall(b"QUIT\r\n")
            while say(None) is not None:
                pass
        except OSError:
            pass
        return end.code if end is not None else 0


def envelope_sender(message: bytes) -> bytes:
    """The Return-path Exim's transport wrote (it spells it so) into the header."""
    m = re.search(rb"^return-path: <([^>]*)>$", message.split(b"\n\n", 1)[0],
                  re.MULTILINE | re.IGNORECASE)
    return m.group(1) if m else b""


CARRIERS = [*VARIANTS, "LF-only", "LF-only-BDAT"]


def smuggled_through(i: Inbound, listener: str) -> tuple[list[str], list[bytes]]:
    """Every shield variant and the two LF-only carriers, one session each, through
    ``listener``: the variants whose second message Exim delivered with the smuggler's
    envelope, and all it delivered."""
    before = len(i.exim.maildir_messages())
    for variant in CARRIERS:
        tag = f"{listener}-{variant}"
        content = (lf_only(tag, variant.endswith("BDAT")) if variant.startswith("LF-only")
                   else smuggling(variant, tag))
        code = smtp_send(i, INBOUND_PORTS[listener], content)
        assert code == 250, (variant, code)
    i.exim.wait_queue_empty()
    got = [p.read_bytes() for p in i.exim.maildir_messages()[before:]]
    names = sorted(m.group(1).decode() for data in got
                   if envelope_sender(data) == TRIPWIRE.encode()
                   and (m := re.search(rb"Subject: smuggled [a-z]+-(\S+)", data)))
    return names, got


def test_no_smuggling_variant_reaches_exim_through_the_shield(inbound: Inbound) -> None:
    names, got = smuggled_through(inbound, "normalize")
    assert names == [], names
    # One message per session, the carrier, holding the would-be second one as content.
    assert len(got) == len(CARRIERS), [m[:300] for m in got]
    for variant in CARRIERS:
        [m] = [m for m in got if f"Subject: carrier normalize-{variant}\n".encode() in m]
        assert f"Subject: smuggled normalize-{variant}\n".encode() in m, m
        assert m.rstrip().endswith(b"after"), (variant, m[-200:])
    print(f"\nEXIM inbound shield (normalize): smuggled {names} of {CARRIERS}")


def test_the_control_without_the_shield(inbound: Inbound) -> None:
    """``smuggling: off``: what Exim 4.96 (Debian 4.96-15+deb12u10) makes of the same
    sessions alone.  Its CVE-2023-51766 fix and its pipelining check stop every variant but
    one: an LF-only carrier whose second transaction is a pipelined BDAT is two messages to
    it.  The other test shows the shield stops that one too."""
    mark = inbound.exim.log_mark()
    names, _ = smuggled_through(inbound, "off")
    assert names == ["LF-only-BDAT"], (names, inbound.exim.log()[mark:])
    took = inbound.exim.wait_log(r"^.* <= x@tripwire\.example .*$", since=mark).group(0)
    print(f"\nEXIM inbound without the shield: smuggled {names}\n  Exim: {took.split(' ', 2)[2]}")


def test_exim_server_is_a_real_receiver(inbound: Inbound) -> None:
    """The lab's Exim answers as Exim, advertises PIPELINING and CHUNKING, and refuses to
    relay (direct, not through the gateway: from gw's own address)."""
    with inbound.lab.gw.connect(MTA_V4, 25, timeout=10) as sock:
        sock.settimeout(10)
        f = sock.makefile("rb")
        assert re.match(rb"220 legacy\.b\.test ESMTP Exim 4\.96", f.readline())
        sock.sendall(b"EHLO gw.example\r\n")
        ehlo = b""
        while (line := f.readline()).startswith(b"250-"):
            ehlo += line
        ehlo += line
        assert b"PIPELINING" in ehlo and b"CHUNKING" in ehlo, ehlo
        sock.sendall(b"MAIL FROM:<a@gw.example>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        assert f.readline().startswith(b"250")
        assert f.readline().startswith(b"550 relay not permitted")
        sock.sendall(b"QUIT\r\n")
        sock.shutdown(socket.SHUT_WR)

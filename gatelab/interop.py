"""What issue 19's interoperability tests share, MTA by MTA (docs/interop.md):

- :class:`PrivateDir`, :class:`Maildir`, :class:`LogFile`: the private tree an MTA from its
  private root (``/var/lib/smtpgate-tests/<mta>``, unpacked by scripts/bootstrap-debian, or
  built in a temporary directory) runs in, the Maildir it delivers into, the log it writes.
- :func:`outbound_world`: the lab an MTA sends through (the outbound gateway, DNSSEC, Postfix
  peers with and without TLS / TLSA) and :func:`inbound_world`: the lab an MTA receives in
  (the inbound gateway's offload in front of it, a raw port without the shield beside).
- The checks every row makes: one copy delivered, the bytes a client put on the wire, the
  smuggling variants sent through a listener.

The test modules (``tests/test_interop_<mta>_netns.py``) hold the cells; nothing here is
specific to one MTA.

Outbound world, the MTA in mta::

    gw:   smtpgate, policy dane, 203.0.113.8 at policy none; DNS answers kept <= 1 s (the
          wrong-TLSA test fixes its record and retries); Unbound
    peer: Postfix with STARTTLS on .2 (mx.b.test, TLSA matches), .3 (mx.nodane.test, no
          TLSA), .9 (mx.fix.test, TLSA wrong until a test fixes it); Postfix without TLS on
          .7 (no PTR; mx.needdane.test's address, which publishes TLSA) and .8 (policy none)

Inbound world, the MTA on 198.51.100.2:25 in mta::

    peer: Postfix at smtp_tls_security_level=dane (Unbound on gw), raw SMTP clients
    gw:   smtpgate inbound, offload: port 25 -> the client's address kept (transparent or
          PROXY v2), smuggling normalize (the default); port 28 -> smuggling off (the control)
"""

from __future__ import annotations

import contextlib
import pwd
import re
import shutil
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatelab import certs, netlab
from gatelab.capture import Capture
from gatelab.dnslab import DnsWorld
from gatelab.gatewayproc import GatewayProcess, gateway_config
from gatelab.netlab import GW_PEER_IF, GW_PEER_V4, MTA_V4, Lab, Netns
from gatelab.postfix_instance import (
    PostfixInstance,
    null_client_settings,
    receiver_settings,
    tls_receiver_settings,
)
from gatelab.smuggling import TRIPWIRE, VARIANTS, lf_only, smuggling
from gateway.dane import tlsa_record
from gateway.smtp import Reply, ReplyReader

MTA_ROOTS = Path("/var/lib/smtpgate-tests")  # scripts/bootstrap-debian's private roots
WRONG = "3 1 1 " + "5a" * 32
DOMAINS = "example.net, dane.test, wrongmx.test, needdane.test, fix.test"
CARRIERS = [*VARIANTS, "LF-only", "LF-only-BDAT"]
FIX_HOST = "203.0.113.9"  # mx.fix.test: its TLSA is wrong until a test fixes it
# The per-recipient cell, (host, the recipient whose domain asks for DANE, the other, the
# 450 the first gets): one message, two recipients, one session.
TWO_RECIPIENTS = [
    # .3 gives TLS, but not with the key mx.wrongkey.test's TLSA names
    ("203.0.113.3", "u1@wrongmx.test", "u2@example.net",
     "450 4.7.5 smtpgate: peer key does not match the TLSA of mx.wrongkey.test"),
    # .7 gives no TLS at all, and mx.needdane.test publishes TLSA
    ("203.0.113.7", "u5@needdane.test", "u6@example.net",
     "450 4.7.5 smtpgate: mx.needdane.test publishes TLSA; this hop is not encrypted"),
]
INBOUND_PORTS = {"normalize": 25, "off": 28}


def root_usable(name: str, binary: str, *users: str) -> str | None:
    """None when the private root ``name`` holds ``binary`` and every user exists, else why
    not (for skip())."""
    path = MTA_ROOTS / name / binary
    if not path.exists():
        return f"{path} missing (scripts/bootstrap-debian unpacks it)"
    for user in users:
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"user {user} missing (scripts/bootstrap-debian creates it)"
    return None


class PrivateDir:
    """A temporary tree for one MTA instance, under /tmp (not pytest's 0700 tmp_path: the
    MTA's own user must reach into it); ``owned`` subdirectories belong to ``user``."""

    def __init__(self, prefix: str, user: str | None = None, owned: Sequence[str] = (),
                 group: str | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self.path.chmod(0o755)
        for sub in owned:
            (self.path / sub).mkdir(parents=True, exist_ok=True)
            if user is not None:
                shutil.chown(self.path / sub, user, group or pwd.getpwnam(user).pw_gid)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Maildir:
    """A Maildir an MTA delivers into: its messages, oldest first, and waiting for one."""

    def __init__(self, path: Path, owner: str = "the MTA") -> None:
        self.path, self.owner = path, owner

    def messages(self) -> list[Path]:
        files = [p for d in ("new", "cur") if (self.path / d).is_dir()
                 for p in (self.path / d).iterdir()]
        return sorted(files, key=lambda p: p.stat().st_mtime_ns)

    def wait_delivered(self, marker: bytes, timeout: float = 20.0,
                       context: Callable[[], str] = str) -> bytes:
        """The delivered message that carries ``marker``; ``context()`` says why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in self.messages():
                if marker in (data := path.read_bytes()):
                    return data
            time.sleep(0.05)
        raise TimeoutError(f"{marker!r} not delivered by {self.owner}:\n{context()[-3000:]}")


class LogFile:
    """An MTA's log file, read whole; ``mark()`` and ``wait(since=)`` skip older lines."""

    def __init__(self, path: Path, owner: str = "the MTA") -> None:
        self.path, self.owner = path, owner

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    def mark(self) -> int:
        return len(self.text())

    def wait(self, regex: str, timeout: float = 15.0, *, since: int = 0) -> re.Match[str]:
        """The first match of ``regex`` (multiline) after ``since``."""
        pattern = re.compile(regex, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while not (m := pattern.search(self.text(), since)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no /{regex}/ in {self.owner}'s log after {timeout}s:\n"
                                   f"{self.text()[since:][-3000:]}")
            time.sleep(0.05)
        return m


class LabMta:
    """What every MTA of the lab offers the tests, from its own word: its log
    (``mta_log``), its queue listing (``queued()``: "" when empty) and, as a receiver, its
    Maildir (``inbox``).  Each MTA's module sets those three; the rest is here."""

    name = "the MTA"
    mta_log: LogFile
    inbox: Maildir

    def queued(self) -> str:
        raise NotImplementedError

    def log(self) -> str:
        return self.mta_log.text()

    def log_mark(self) -> int:
        """The log's length now, for wait_log(since=...) to ignore older lines."""
        return self.mta_log.mark()

    def wait_log(self, regex: str, timeout: float = 15.0, *, since: int = 0) -> re.Match[str]:
        """The first match of ``regex`` (multiline) in the log after ``since``."""
        return self.mta_log.wait(regex, timeout, since=since)

    def wait_queue_empty(self, timeout: float = 20.0) -> None:
        """Until every message received has been delivered (or bounced)."""
        deadline = time.monotonic() + timeout
        while queued := self.queued():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}'s queue not empty:\n{queued}\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.1)

    def maildir_messages(self) -> list[Path]:
        """Delivered messages, oldest first."""
        return self.inbox.messages()

    def wait_delivered(self, marker: bytes, timeout: float = 20.0) -> bytes:
        """The delivered message that carries ``marker``."""
        return self.inbox.wait_delivered(marker, timeout, self.log)


# -- outbound ---------------------------------------------------------------------------

@dataclass
class Outbound:
    lab: Lab
    dns: DnsWorld
    gw: GatewayProcess
    tls_peer: PostfixInstance
    plain_peer: PostfixInstance
    good: str  # the TLSA rdata of the peers' key
    work: Path

    def session_since(self, destination: str, seen: int) -> dict[str, Any]:
        """The last session line to ``destination`` after the first ``seen`` lines."""
        return self.gw.sessions_to(destination, after=seen)[-1]

    # What the gateway did, the same for every MTA's cell (the MTA's own word stays in the
    # MTA's test).
    def upgraded_by_dane(self, seen: int, cap: Capture, marker: bytes, message: bytes,
                         host: str = "203.0.113.2") -> dict[str, Any]:
        """The session to ``host`` since ``seen``: upgraded, DANE-verified, relayed; the
        peer link (``cap``) busy, ``marker`` never in clear; the peer's Received says TLS."""
        s = self.session_since(f"{host}:25", seen)
        assert (s["plan"], s["tls"], s["outcome"]) == ("require-tls", "dane", "relayed"), s
        assert s["verify"] in ("dane-ee match", "resumed verified session"), s
        assert cap.packets() > 10 and not cap.contains(marker)
        assert b"(using TLSv1." in message  # the peer's Received: the hop was TLS
        return s

    def stepped_aside(self, seen: int, host: str = "203.0.113.3") -> dict[str, Any]:
        """The session to ``host`` since ``seen``: the MTA's own STARTTLS left end to end."""
        s = self.session_since(f"{host}:25", seen)
        assert (s["tls"], s["mta_starttls"]) == ("end_to_end", "stepped_aside"), s
        # Inside the MTA's TLS the gateway cannot see QUIT (tests/test_takeover_netns.py
        # says why the end may read as a reset); the delivery and the MTA's own TLS count.
        assert s["outcome"] in ("relayed", "upstream_reset", "client_reset"), s
        return s

    # The wrong-TLSA cell: mx.fix.test (FIX_HOST) publishes a TLSA that matches nothing
    # until the test fixes it, then the MTA's retry must deliver the message once.
    def deferred_by_the_wrong_tlsa(self, seen: int, marker: bytes) -> None:
        """The gateway's session to FIX_HOST deferred (no matching record), no copy."""
        s = self.session_since(f"{FIX_HOST}:25", seen)
        assert (s["tls"], s["outcome"], s["verify"]) == (
            "deferred", "deferred", "no matching record"), s
        assert not copies(self.tls_peer, marker)

    def fix_the_tlsa(self) -> None:
        """mx.fix.test's TLSA right, and the gateway's cache past the old answer."""
        self.dns.set_records("test.", "_25._tcp.mx.fix", "TLSA", [self.good])
        time.sleep(1.2)  # the gateway's DNS cache (max_ttl 1 s) lets the old answer go

    def unfix_the_tlsa(self) -> None:
        """Back to the wrong TLSA for the next test (in the test's ``finally``)."""
        self.dns.set_records("test.", "_25._tcp.mx.fix", "TLSA", [WRONG])

    def verified_after_the_fix(self, seen: int) -> None:
        """The second session to FIX_HOST since ``seen``: DANE, verified, relayed."""
        s = self.gw.sessions_to(f"{FIX_HOST}:25", after=seen, n=2)[-1]
        assert (s["tls"], s["verify"], s["outcome"]) == ("dane", "dane-ee match", "relayed"), s


@contextlib.contextmanager
def outbound_world(work: Path) -> Iterator[Outbound]:
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


def peer_summary(receiver: PostfixInstance, mark: int, tls: str | None) -> str:
    """The Postfix peer's command counts for the session after ``mark`` (``ehlo=… mail=…
    commands=N``), STARTTLS among them exactly when the gateway upgraded (``tls``)."""
    summary = receiver.wait_log(r"disconnect from \S+ (ehlo=.*commands=\S+)",
                                since=mark).group(1)
    assert ("starttls=1" in summary) == (tls is not None), summary
    return summary


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


def body_of(message: bytes) -> bytes:
    """The body: what follows the header's end (Maildir files have LF line ends)."""
    return message.split(b"\n\n", 1)[1]


# A body that shows any change: dots (which a DATA client stuffs and BDAT does not), a
# dot-space, trailing blanks, a tab, 8-bit text, a 990-byte line, an empty line.
def tricky_body(marker: bytes) -> bytes:
    return (marker + b"\n.\n..two dots\n. dot space\nfin de ligne  \n\ttab\n"
            + "é ü ß €\n".encode() + b"x" * 990 + b"\n\nlast\n")


def client_bytes(pcap: Path) -> bytes:
    """What the client of the one port-25 connection in ``pcap`` sent, in sequence order
    (IPv4 over Ethernet, as the lab's veths carry it; a retransmission counted once)."""
    return b"".join(client_segments(pcap))


def client_segments(pcap: Path) -> list[bytes]:
    """client_bytes() segment by segment: what the client put in each TCP segment."""
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
    return [segments[seq] for seq in sorted(segments)]


# -- inbound ----------------------------------------------------------------------------

@dataclass
class Inbound:
    lab: Lab
    mta: LabMta  # the receiver the test module started
    gw: GatewayProcess
    work: Path


@contextlib.contextmanager
def inbound_world(work: Path,
                  receiver: Callable[[Netns], contextlib.AbstractContextManager[LabMta]],
                  client_address: str = "transparent") -> Iterator[Inbound]:
    """``receiver(lab.mta)`` is the MTA (entered here, after the lab and before the
    gateway); ``client_address`` the offload listeners' (``transparent`` or ``proxy``)."""
    leaf = certs.make_leaf(None, ["mx.b.test"])
    pki = certs.write_pki(work / "site", leaf)
    listeners = [
        f'{{name: "{name}", address: 0.0.0.0, port: {10000 + port}, direction: inbound, '
        f'starttls: offload, smuggling: {name}, client_address: {client_address}, '
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
        if client_address == "transparent":
            # The MTA's replies to the client's address must come back to the gateway's
            # transparent socket (the routing `smtpgate firewall` prints).
            lab.gw.iptables(["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "socket",
                             "--transparent", "-j", "MARK", "--set-mark", "0x40000/0x40000"])
            lab.gw.ip("rule", "add", "fwmark", "0x40000/0x40000", "lookup", "100")
            lab.gw.ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        with receiver(lab.mta) as mta, \
                GatewayProcess(lab.gw, work / "gw", gateway_config(
                    listeners=listeners, tls=(pki["key"], pki["cert"]))) as gw:
            yield Inbound(lab, mta, gw, work)


@dataclass
class DaneDelivery:
    message: bytes  # as the MTA stored it
    verified: str  # the sender's "Verified TLS connection established to ..." line


def dane_sender_delivers(i: Inbound, marker: bytes) -> DaneDelivery:
    """A Postfix at ``smtp_tls_security_level = dane`` on peer (203.0.113.2, HELO
    sender.example.org) sends alice@example.org -> bob@b.test through the inbound
    gateway; it must verify the gateway's key by DANE, and the MTA deliver the message."""
    seen = len(i.gw.sessions())
    settings = null_client_settings("", myhostname="sender.example.org")
    settings.update({"relayhost": "", "smtp_tls_security_level": "dane",
                     "smtp_dns_support_level": "dnssec", "smtp_tls_loglevel": "1"})
    with PostfixInstance(i.lab.peer, i.work, settings, name="danesender") as sender:
        sender.sendmail("alice@example.org", "bob@b.test",
                        b"Subject: inbound\r\n\r\n" + marker + b"\r\n")
        verified = sender.wait_log(r"Verified TLS connection established to mx\.b\.test"
                                   r"\[198\.51\.100\.2\]:25: TLSv1\.[23].*", timeout=30).group(0)
        sender.wait_log(r"to=<bob@b\.test>.*status=sent", timeout=30)
    message = i.mta.wait_delivered(marker)
    [s] = [x for x in i.gw.sessions()[seen:] if x.get("listener") == "normalize"]
    assert (s["direction"], s["tls"], s["outcome"]) == ("inbound", "tls", "relayed"), s
    return DaneDelivery(message, verified)


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
    """The Return-Path the MTA's delivery wrote into the header (any case)."""
    m = re.search(rb"^return-path: ?<([^>]*)>$", message.split(b"\n\n", 1)[0],
                  re.MULTILINE | re.IGNORECASE)
    return m.group(1) if m else b""


def smuggled_through(i: Inbound, listener: str, carriers: Sequence[str] = CARRIERS,
                     replies: dict[str, int] | None = None) -> tuple[list[str], list[bytes]]:
    """Every shield variant and the two LF-only carriers, one session each, through
    ``listener``: the variants whose second message the MTA delivered with the smuggler's
    envelope, and all it delivered.  Each carrier must be accepted (250), unless
    ``replies`` is given: then each variant's reply code to the content goes there."""
    before = len(i.mta.maildir_messages())
    for variant in carriers:
        tag = f"{listener}-{variant}"
        content = (lf_only(tag, variant.endswith("BDAT")) if variant.startswith("LF-only")
                   else smuggling(variant, tag))
        code = smtp_send(i, INBOUND_PORTS[listener], content)
        if replies is not None:
            replies[variant] = code
        else:
            assert code == 250, (variant, code)
    i.mta.wait_queue_empty()
    got = [p.read_bytes() for p in i.mta.maildir_messages()[before:]]
    names = sorted(m.group(1).decode() for data in got
                   if envelope_sender(data) == TRIPWIRE.encode()
                   and (m := re.search(rb"Subject: smuggled [a-z]+-(\S+)", data)))
    return names, got


def shield_holds(i: Inbound, carriers: Sequence[str] = CARRIERS) -> list[str]:
    """Through the shield (``normalize``): nothing smuggled, one message per session, the
    carrier, holding the would-be second one as content.  The names smuggled (none)."""
    names, got = smuggled_through(i, "normalize", carriers)
    assert names == [], names
    assert len(got) == len(carriers), [m[:300] for m in got]
    for variant in carriers:
        [m] = [m for m in got if f"Subject: carrier normalize-{variant}\n".encode() in m]
        assert f"Subject: smuggled normalize-{variant}\n".encode() in m, m
        assert m.rstrip().endswith(b"after"), (variant, m[-200:])
    return names


def ehlo_of(ns: Netns, address: str, port: int = 25) -> tuple[bytes, bytes]:
    """The banner and the EHLO reply of ``address:port`` seen from ``ns`` (then QUIT)."""
    with ns.connect(address, port, timeout=10) as sock:
        sock.settimeout(10)
        f = sock.makefile("rb")
        banner = f.readline()
        sock.sendall(b"EHLO gw.example\r\n")
        ehlo = b""
        while (line := f.readline()).startswith(b"250-"):
            ehlo += line
        ehlo += line
        sock.sendall(b"QUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        return banner, ehlo

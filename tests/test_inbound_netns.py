"""Inbound end to end: a DANE-validating Postfix on the internet side sends to a legacy
Postfix (no TLS) behind the gateway; the gateway offers STARTTLS with the site's key, whose
TLSA is published in the DNSSEC lab.

    peer (internet): Postfix, smtp_tls_security_level=dane, resolver = Unbound via gw
    gw:   smtpgate inbound (REDIRECT of port 25 arriving from the internet side)
    mta:  legacy Postfix on 198.51.100.2:25, no TLS
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatelab import certs, dnslab, netlab, postfix_instance
from gatelab.dnslab import DnsWorld
from gatelab.gatewayproc import GatewayProcess, gateway_config
from gatelab.netlab import GW_PEER_V4, MTA_V4, Lab
from gatelab.postfix_instance import PostfixInstance, null_client_settings, receiver_settings
from gateway.dane import tlsa_record

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Site:
    lab: Lab
    dns: DnsWorld
    key: Path
    cert: Path
    record: str  # the TLSA rdata published for mx.b.test
    work: Path


def write_key_pair(work: Path, name: str) -> tuple[Path, Path, str]:
    leaf = certs.make_leaf(None, ["mx.b.test"])
    pki = certs.write_pki(work / name, leaf)
    return pki["key"], pki["cert"], str(tlsa_record(leaf.der))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("inbound")
    key, cert, record = write_key_pair(work, "site")
    with Lab() as lab, DnsWorld.on_lab(lab, work / "dns", resolver_listen=[GW_PEER_V4]) as dns:
        dns.zone("test.", ["b MX 10 mx.b", f"mx.b A {MTA_V4}", f"_25._tcp.mx.b TLSA {record}"])
        dns.start()
        # The sending Postfix resolves through Unbound on gw (trust-ad: glibc passes AD on).
        lab.peer.set_resolv_conf(f"nameserver {GW_PEER_V4}\noptions trust-ad\n")
        lab.redirect_port25(10026, inbound=True)
        yield Site(lab, dns, key, cert, record, work)


def inbound_config(s: Site, client_address: str, key: Path | None = None,
                   cert: Path | None = None) -> str:
    return gateway_config(listeners=[
        f'{{address: 0.0.0.0, port: 10026, direction: inbound, starttls: offload, '
        f'client_address: {client_address}, upstreams: ["{MTA_V4}:25"]}}'],
        tls=(key or s.key, cert or s.cert))


def dane_sender(s: Site, name: str) -> PostfixInstance:
    settings = null_client_settings("", myhostname="sender.example.org")
    settings.update({
        "relayhost": "",
        "smtp_tls_security_level": "dane",
        "smtp_dns_support_level": "dnssec",
        "smtp_tls_loglevel": "1",
        "inet_interfaces": "loopback-only",
    })
    return PostfixInstance(s.lab.peer, s.work, settings, name=name)


def legacy_mta(s: Site, name: str, proxy: bool) -> PostfixInstance:
    settings = receiver_settings(MTA_V4, domain="b.test", myhostname="legacy.b.test")
    if proxy:
        settings["smtpd_upstream_proxy_protocol"] = "haproxy"
    return PostfixInstance(s.lab.mta, s.work, settings, name=name)


@pytest.mark.parametrize("client_address", ["proxy-protocol", "transparent"])
def test_dane_sender_verifies_the_gateway_and_the_mta_sees_the_client(
        site: Site, client_address: str) -> None:
    if client_address == "transparent":
        # Replies from the MTA to the client's address must reach the gateway's
        # transparent socket: the policy routing `smtpgate firewall` will print.
        site.lab.gw.iptables(["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "socket",
                              "--transparent", "-j", "MARK", "--set-mark", "0x40000/0x40000"])
        site.lab.gw.ip("rule", "add", "fwmark", "0x40000/0x40000", "lookup", "100")
        site.lab.gw.ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    marker = f"MARKER-{uuid.uuid4().hex}".encode()
    tag = client_address.replace("-", "")
    with legacy_mta(site, f"legacy{tag}", proxy=client_address == "proxy-protocol") as mta, \
            GatewayProcess(site.lab.gw, site.work / tag, inbound_config(site, client_address),
                           metrics_port=9125) as gw, \
            dane_sender(site, f"sender{tag}") as sender:
        sender.sendmail("alice@example.org", "bob@b.test",
                        b"Subject: inbound\r\n\r\n" + marker + b"\r\n")
        sender.wait_log(r"Verified TLS connection established to mx\.b\.test\[198\.51\.100\.2\]"
                        r":25: TLSv1\.[23]", timeout=30)
        sender.wait_log(r"to=<bob@b\.test>.*status=sent", timeout=30)
        [message] = mta.wait_maildir(1)
        assert marker in message.read_bytes()
        # The legacy MTA logged the client's real address, not the gateway's.
        mta.wait_log(r"connect from \S+\[203\.0\.113\.2\]")
        assert "203.0.113.1]" not in mta.log_text()
        [s] = [x for x in gw.wait_sessions(1) if x["direction"] == "inbound"]
        assert (s["tls"], s["outcome"]) == ("tls", "relayed")
        assert s["upstream"] == f"{MTA_V4}:25" and s["tls_version"].startswith("TLSv1.")


def test_openssl_verifies_the_published_record(site: Site) -> None:
    with legacy_mta(site, "legacyossl", proxy=False), \
            GatewayProcess(site.lab.gw, site.work / "ossl", inbound_config(site, "none")):
        r = site.lab.peer.run(
            ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{MTA_V4}:25",
             "-dane_tlsa_domain", "mx.b.test", "-dane_tlsa_rrdata", site.record,
             "-verify_return_error", "-brief"], input="QUIT\n", check=False, timeout=30)
    out = r.stdout + r.stderr
    assert "Verification: OK" in out, out
    assert "DANE TLSA 3 1 1" in out and "matched EE certificate at depth 0" in out, out


def test_never_an_open_proxy(site: Site) -> None:
    """Whatever destination the client asks for, only the configured MTA is reached;
    counted on the wire (gw's own outgoing SYNs), not from the gateway's log."""
    site.lab.gw.iptables(["-N", "SGOUT"])
    # Leaving gw on a real link (the metrics scrape on lo is not a destination).
    site.lab.gw.iptables(["-A", "OUTPUT", "!", "-o", "lo", "-p", "tcp", "--syn", "-j", "SGOUT"])
    site.lab.gw.iptables(["-A", "SGOUT", "-d", MTA_V4, "-p", "tcp", "--dport", "25",
                          "-j", "RETURN"])
    site.lab.gw.iptables(["-A", "SGOUT", "-j", "RETURN"])  # counts everything else
    with legacy_mta(site, "legacyproxy", proxy=False), \
            GatewayProcess(site.lab.gw, site.work / "proxy", inbound_config(site, "none")) as gw:
        for dst in ("198.51.100.77", "198.51.100.1", "192.0.2.10"):
            c = site.lab.peer.connect(dst, 25)
            c.settimeout(5)
            with c:
                assert c.recv(200).startswith(b"220 legacy.b.test")
        gw.wait_sessions(3)
    out = site.lab.gw.run(["iptables", "-L", "SGOUT", "-v", "-x", "-n"]).stdout
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    to_mta, elsewhere = int(rows[0][0]), int(rows[1][0])
    assert to_mta == 3 and elsewhere == 0, out


def test_key_rotation_by_reload_keeps_sessions(site: Site) -> None:
    """SIGHUP with a new key: a session in flight is untouched, new sessions get the new
    key; a key with loose permissions is refused and the old key keeps serving."""
    key2, cert2, record2 = write_key_pair(site.work, "next")
    text = inbound_config(site, "none")
    with legacy_mta(site, "legacyreload", proxy=False), \
            GatewayProcess(site.lab.gw, site.work / "reload", text) as gw:
        held = site.lab.peer.connect(MTA_V4, 25)
        held.settimeout(10)
        assert held.recv(200).startswith(b"220 ")
        gw.config_path.write_text(inbound_config(site, "none", key2, cert2))
        os.chmod(key2, 0o644)
        gw.signal(signal.SIGHUP)
        [rej] = gw.wait_event("reload rejected")
        assert "readable by group or others" in rej["error"], rej
        os.chmod(key2, 0o600)
        gw.signal(signal.SIGHUP)
        gw.wait_event("reloaded")
        r = site.lab.peer.run(
            ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{MTA_V4}:25",
             "-dane_tlsa_domain", "mx.b.test", "-dane_tlsa_rrdata", record2, "-brief"],
            input="QUIT\n", check=False, timeout=30)
        assert "Verification: OK" in r.stdout + r.stderr
        held.sendall(b"EHLO held.example\r\n")
        reply = held.recv(1000)
        assert reply.startswith(b"250-legacy.b.test") and b"STARTTLS" in reply
        held.close()


class Wire:
    """A blocking SMTP client whose TLS (after STARTTLS) runs through memory BIOs, so that
    it can half-close as TLS allows: close_notify, then shutdown(SHUT_WR), then read on
    (``ssl.SSLSocket`` cannot: its unwrap() waits for the peer's close_notify and discards
    the data before it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.tls: ssl.SSLObject | None = None
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()

    def _recv(self) -> bytes:
        """The next plaintext, b"" at the end (close_notify or FIN)."""
        while True:
            if self.tls is None:
                return self.sock.recv(65536)
            try:
                return self.tls.read(65536)
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    return b""
                self._in.write(data)

    def _flush(self) -> None:
        if data := self._out.read():
            self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        if self.tls is None:
            self.sock.sendall(data)
        else:
            self.tls.write(data)
            self._flush()

    def reply(self) -> bytes:
        """One whole (multi-line) reply."""
        lines = b""
        while True:
            while b"\n" not in self.buffer:
                chunk = self._recv()
                assert chunk, f"connection ended inside a reply: {lines + self.buffer!r}"
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            lines += line + b"\n"
            if line[3:4] != b"-":
                return lines

    def starttls(self, ctx: ssl.SSLContext, name: str) -> None:
        self.tls = ctx.wrap_bio(self._in, self._out, server_hostname=name)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                assert data, "connection ended in the handshake"
                self._in.write(data)
        self._flush()

    def half_close(self) -> None:
        if self.tls is not None:
            with contextlib.suppress(ssl.SSLWantReadError):
                self.tls.unwrap()  # our close_notify; the gateway's comes later
            self._flush()
        self.sock.shutdown(socket.SHUT_WR)

    def rest(self) -> bytes:
        data = self.buffer
        while chunk := self._recv():
            data += chunk
        return data


@pytest.mark.parametrize("tls", [True, False])
def test_a_half_closing_client_gets_every_reply_and_one_copy(site: Site, tls: bool) -> None:
    """The client pipelines the final dot and QUIT and half-closes (over TLS: close_notify,
    then FIN): the legacy MTA's 250 and 221 still reach it, and one copy is delivered."""
    marker = f"MARKER-{uuid.uuid4().hex}".encode()
    tag = f"half{int(tls)}"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with legacy_mta(site, f"legacy{tag}", proxy=True) as mta, \
            GatewayProcess(site.lab.gw, site.work / tag,
                           inbound_config(site, "proxy-protocol")) as gw:
        sock = site.lab.peer.connect(MTA_V4, 25)
        sock.settimeout(20)
        with sock:
            w = Wire(sock)
            assert w.reply().startswith(b"220 ")
            w.send(b"EHLO client.example.org\r\n")
            assert b"STARTTLS" in w.reply()
            if tls:
                w.send(b"STARTTLS\r\n")
                assert w.reply().startswith(b"220 ")
                w.starttls(ctx, "mx.b.test")
                w.send(b"EHLO client.example.org\r\n")
                assert w.reply().startswith(b"250")
            w.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@b.test>\r\nDATA\r\n")
            assert [w.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            w.send(b"Subject: half-close\r\n\r\n" + marker + b"\r\n.\r\nQUIT\r\n")
            w.half_close()
            after = w.rest()
        assert after.startswith(b"250 2.0.0 Ok: queued"), after
        assert after.endswith(b"221 2.0.0 Bye\r\n"), after
        [message] = mta.wait_maildir(1)
        assert marker in message.read_bytes()
        [s] = [x for x in gw.wait_sessions(1) if x["direction"] == "inbound"]
        assert (s["tls"], s["outcome"]) == ("tls" if tls else "plaintext", "relayed"), s

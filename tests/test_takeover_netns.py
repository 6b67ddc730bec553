"""An MTA with opportunistic TLS of its own behind the outbound gateway: the gateway takes
over its STARTTLS toward a DANE peer (``mta_starttls: terminate`` or ``hide``), and leaves
it alone for an MTA that verifies on its own (``verifying_mtas``).

    mta:  Postfix at Debian's default smtp_tls_security_level = may (198.51.100.2,
          2001:db8:1::2); Postfix at ``dane`` (198.51.100.3, 2001:db8:1::3), resolving
          through Unbound on gw
    gw:   smtpgate, policy dane, the mode under test; Unbound
    peer: Postfix with STARTTLS on 203.0.113.2 / 2001:db8:2::2, its key in
          _25._tcp.mx.b.test (DNSSEC); an attacker that can take port 25 there (a REDIRECT
          in peer) and answers STARTTLS with its own certificate, keeping what it reads

A capture on gw's peer-side interface is the witness that no message crossed in clear.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
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
from gatelab.gatewayproc import GatewayProcess, gateway_config
from gatelab.netlab import GW_MTA_V4, HOST_IF, PEER_V4, PEER_V6, Lab, Netns
from gatelab.postfix_instance import PostfixInstance, null_client_settings, tls_receiver_settings
from gateway.dane import tlsa_record

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

VERIFYING_V4, VERIFYING_V6 = "198.51.100.3", "2001:db8:1::3"
ATTACKER_PORT = 2526


class Attacker:
    """On the peer's own addresses (port 25 redirected to it while ``active``): banner,
    EHLO with STARTTLS, then TLS with its own certificate, and it keeps every byte it reads
    over that TLS: what an MTA's unverified opportunistic TLS would hand it."""

    def __init__(self, ns: Netns, work: Path) -> None:
        self.ns = ns
        self.ctx = certs.server_context(work / "attacker", certs.make_leaf(None, ["mx.b.test"]))
        self.read = b""
        self.sessions = 0
        self.lock = threading.Lock()
        self.listeners = [ns.listen("0.0.0.0", ATTACKER_PORT), ns.listen("::", ATTACKER_PORT)]
        for lst in self.listeners:
            threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        rule = ["-t", "nat", "{}", "PREROUTING", "-p", "tcp", "--dport", "25", "-j",
                "REDIRECT", "--to-ports", str(ATTACKER_PORT)]
        for v6 in (False, True):
            self.ns.iptables([a.replace("{}", "-A") for a in rule], v6=v6)
        try:
            yield
        finally:
            for v6 in (False, True):
                self.ns.iptables([a.replace("{}", "-D") for a in rule], v6=v6)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.sessions += 1
        conn.settimeout(10)
        try:
            f = conn.makefile("rb")
            conn.sendall(b"220 mx.b.test ESMTP\r\n")
            for line in f:
                verb = line.split(b" ")[0].strip().upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-mx.b.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
                elif verb == b"STARTTLS":
                    conn.sendall(b"220 2.0.0 go ahead\r\n")
                    break
                else:
                    conn.sendall(b"221 2.0.0 bye\r\n")
                    return
            else:
                return
            tls = self.ctx.wrap_socket(conn, server_side=True)
            tf = tls.makefile("rb")
            for line in tf:
                with self.lock:
                    self.read += line
                verb = line.split(b" ")[0].strip().upper()
                tls.sendall({b"DATA": b"354 go\r\n", b"QUIT": b"221 bye\r\n"}.get(
                    verb, b"250 ok\r\n"))
                if verb == b"QUIT":
                    return
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        for lst in self.listeners:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()


@dataclass
class World:
    lab: Lab
    peer: PostfixInstance
    attacker: Attacker
    work: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("takeover")
    leaf = certs.make_leaf(None, ["mx.b.test"])
    chain = certs.write_chain_file(work / "peer-chain.pem", leaf)
    good = tlsa_record(leaf.der).to_zone("").split("TLSA ", 1)[1]
    with Lab() as lab, DnsWorld.on_lab(lab, work / "dns", resolver_listen=[GW_MTA_V4]) as dns:
        dns.zone("test.", [f"mx.b A {PEER_V4}", f"mx.b AAAA {PEER_V6}",
                           f"_25._tcp.mx.b TLSA {good}"])
        dns.zone(dnslab.reverse_zone(netlab.PEER_NET_V4), ["2 PTR mx.b.test."])
        dns.zone(dnslab.reverse_zone(netlab.PEER_NET_V6),
                 [f"{dnslab.ptr_name(PEER_V6)} PTR mx.b.test."])
        dns.start()
        lab.redirect_port25(10025)
        lab.mta.ip("addr", "add", f"{VERIFYING_V4}/24", "dev", HOST_IF)
        lab.mta.ip("-6", "addr", "add", f"{VERIFYING_V6}/64", "dev", HOST_IF, "nodad")
        # The verifying Postfix resolves through Unbound on gw (trust-ad: the AD bit counts).
        lab.mta.set_resolv_conf(f"nameserver {GW_MTA_V4}\noptions trust-ad\n")
        attacker = Attacker(lab.peer, work)
        try:
            with PostfixInstance(lab.peer, work, tls_receiver_settings(
                    f"{PEER_V4}, [{PEER_V6}]", chain, domain="b.test",
                    myhostname="mx.b.test"), name="peer") as peer:
                yield World(lab, peer, attacker, work)
        finally:
            attacker.close()


def sending_mta(w: World, name: str, level: str, source: tuple[str, str],
                transports: str, **extra: str) -> PostfixInstance:
    """A Postfix that sends from its own addresses (``source``: the kernel could otherwise
    pick the other MTA's) at smtp_tls_security_level ``level``."""
    settings = null_client_settings("")
    settings.update({
        "relayhost": "",
        "smtp_tls_security_level": level,
        "smtp_tls_loglevel": "1",
        "smtp_bind_address": source[0],
        "smtp_bind_address6": source[1],
        "transport_maps": f"inline:{{ {transports} }}",
        **extra,
    })
    return PostfixInstance(w.lab.mta, w.work, settings, name=name)


def may_mta(w: World, name: str) -> PostfixInstance:
    """Debian's default: opportunistic TLS, verifying nothing."""
    return sending_mta(w, name, "may", (netlab.MTA_V4, netlab.MTA_V6),
                       f"v4@b.test=smtp:[{PEER_V4}]:25, v6@b.test=smtp:[{PEER_V6}]:25")


def dane_mta(w: World, name: str) -> PostfixInstance:
    """A Postfix that verifies DANE itself, from its own addresses (verifying_mtas)."""
    return sending_mta(w, name, "dane", (VERIFYING_V4, VERIFYING_V6),
                       "v4@b.test=smtp:[mx.b.test]:25", smtp_dns_support_level="dnssec",
                       smtp_address_preference="ipv4")


def gateway(w: World, mode: str) -> GatewayProcess:
    return GatewayProcess(w.lab.gw, w.work / mode, gateway_config(policy="dane", listeners=[
        f"{{address: 0.0.0.0, port: 10025, mta_starttls: {mode}, "
        f"verifying_mtas: [{VERIFYING_V4}]}}",
        f'{{address: "::", port: 10025, mta_starttls: {mode}, '
        f'verifying_mtas: ["{VERIFYING_V6}"]}}']))


def session_to(gw: GatewayProcess, destination: str, after: int) -> dict[str, Any]:
    return gw.sessions_to(destination, after=after)[-1]


def message(marker: bytes) -> bytes:
    return b"Subject: take-over\r\n\r\n" + marker + b"\r\n"


@pytest.mark.parametrize("mode", ["terminate", "hide"])
@pytest.mark.parametrize("family", ["v4", "v6"])
def test_a_may_mta_gets_dane_and_an_attacker_gets_nothing(
        world: World, mode: str, family: str) -> None:
    """Issue: Postfix at ``may`` toward a DANE peer, an attacker answering STARTTLS with its
    own certificate: the attacker read the message.  Now: delivered over DANE-verified TLS;
    with the attacker the MTA gets a 4xx and keeps the message, which never crosses in
    clear nor reaches the attacker; once it is gone, delivered exactly once."""
    destination = f"{PEER_V4}:25" if family == "v4" else f"[{PEER_V6}]:25"
    rcpt = f"{family}@b.test"
    with gateway(world, mode) as gw, may_mta(world, f"may{mode}{family}") as mta:
        # 1. No attacker: delivered, DANE-verified, the MTA's STARTTLS taken over.
        marker = f"MARKER-{uuid.uuid4().hex}".encode()
        with Capture(world.lab.gw, netlab.GW_PEER_IF,
                     world.work / f"{mode}{family}-ok.pcap") as cap:
            mta.sendmail("alice@a.test", rcpt, message(marker))
            delivered = world.peer.wait_delivered(marker)
            s = session_to(gw, destination, 0)
        assert not cap.contains(marker) and cap.packets() > 10
        assert (s.get("plan"), s.get("auth"), s.get("tls"), s.get("verify"), s["outcome"]) == (
            "require-tls", "dane", "dane", "dane-ee match", "relayed"), s
        assert b"(using TLSv1." in delivered
        if mode == "terminate":
            assert s["mta_starttls"] == "terminated", s
            assert str(s["mta_tls_version"]).startswith("TLSv1.")
            # The MTA did its TLS, with the gateway: it noticed nothing.
            mta.wait_log(r"(Anonymous|Untrusted) TLS connection established to "
                         r"\S+\[" + (PEER_V4 if family == "v4" else PEER_V6) + r"\]:25")
        else:
            assert s["mta_starttls"] == "hidden", s
            assert "TLS connection established" not in mta.log_text()
        assert gw.metric("smtpgate_mta_starttls_total", handling=s["mta_starttls"]) >= 1

        # 2. The attacker takes port 25: a 4xx, nothing in clear, nothing for it.
        marker = f"MARKER-{uuid.uuid4().hex}".encode()
        before = len(gw.sessions())
        mark = mta.log_mark()
        with world.attacker.active(), Capture(world.lab.gw, netlab.GW_PEER_IF,
                                              world.work / f"{mode}{family}-mitm.pcap") as cap:
            seen = world.attacker.sessions
            mta.sendmail("alice@a.test", rcpt, message(marker))
            # terminate: the 421 answers the MTA's STARTTLS, and Postfix at `may` goes on
            # to MAIL FROM on the closed connection ("lost connection"); hide: the 421
            # answers its MAIL FROM.  Either way a deferral: the MTA keeps the message.
            mta.wait_log(rf"to=<{rcpt}>.*status=deferred", timeout=30, since=mark)
            assert world.attacker.sessions > seen  # it was in the path
        s = session_to(gw, destination, before)
        assert (s["tls"], s["outcome"], s["verify"]) == (
            "deferred", "deferred", "no matching record"), s
        assert not cap.contains(marker)
        assert marker not in world.attacker.read
        assert any(r["address"] == rcpt for e in mta.queue() for r in e["recipients"])

        # 3. The attacker gone: the MTA's retry is delivered, once.
        mta.flush()
        world.peer.wait_delivered(marker, timeout=30)
        time.sleep(0.5)
        copies = [p for p in world.peer.maildir_messages() if marker in p.read_bytes()]
        assert len(copies) == 1


def test_an_mta_that_verifies_on_its_own_is_left_alone(world: World) -> None:
    """Postfix at ``dane``, listed in verifying_mtas: its STARTTLS passes through (under
    terminate it would meet the gateway's local key, not in the TLSA, and defer)."""
    with gateway(world, "terminate") as gw, dane_mta(world, "danemta") as mta:
        marker = f"MARKER-{uuid.uuid4().hex}".encode()
        mta.sendmail("alice@a.test", "v4@b.test", message(marker))
        world.peer.wait_delivered(marker)
        mta.wait_log(r"Verified TLS connection established to mx\.b\.test\[203\.0\.113\.2\]")
        # (The lab's other MTA may retry a message of an earlier test through this
        # gateway meanwhile: the session looked at is the verifying MTA's.)
        [s] = gw.sessions_to(f"{PEER_V4}:25", where=lambda s: str(s["client"]).startswith(
            VERIFYING_V4) and bool(s.get("mta_starttls")))[:1]
        assert (s["tls"], s["mta_starttls"]) == ("end_to_end", "stepped_aside"), s
        # Inside the MTA's own TLS the gateway cannot see QUIT: a reset at the end (a close
        # with the other's last record unread) ends relayed when the other side's close was
        # passed on first, and is counted as it comes when it races that close; the
        # delivery and the MTA's own verification above are what count.
        assert s["outcome"] in ("relayed", "upstream_reset", "client_reset"), s


@pytest.mark.parametrize("mode", ["terminate", "hide"])
def test_exim_at_its_default_gets_dane_through_the_gateway(world: World, mode: str) -> None:
    """Exim tries STARTTLS by default and verifies nothing: the second unmodified MTA of
    the issue.  Toward the DANE peer its STARTTLS is taken over; delivered once, DANE."""
    if (why := exim_client.exim_usable()) is not None:
        pytest.skip(why)
    marker = f"MARKER-{uuid.uuid4().hex}".encode()
    with gateway(world, mode) as gw, \
            exim_client.EximClient(world.lab.mta, PEER_V4, tls=True) as exim:
        exim.send("alice@a.test", "v4@b.test", b"Subject: exim\n\n" + marker + b"\n")
        world.peer.wait_delivered(marker)
        log = exim.log()
        assert exim.queued() == "" and " Completed" in log, log
        s = session_to(gw, f"{PEER_V4}:25", 0)
        assert (s.get("tls"), s.get("mta_starttls"), s["outcome"]) == (
            "dane", "terminated" if mode == "terminate" else "hidden", "relayed"), s
        if mode == "terminate":
            assert "X=TLS" in log, log  # Exim did its TLS, with the gateway
    copies = [p for p in world.peer.maildir_messages() if marker in p.read_bytes()]
    assert len(copies) == 1

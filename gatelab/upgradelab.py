"""The outbound upgrade's lab: a legacy Postfix (no TLS at all) sends through the gateway to
real Postfix smtpd peers, with DNSSEC from NSD + Unbound deciding the plan
(tests/test_upgrade_netns.py, and the traffic of tests/test_monitoring_netns.py).

    mta: Postfix, smtp_tls_security_level=none; transport by recipient (ROUTES)
    gw:  smtpgate (REDIRECT), Unbound on 127.0.0.1
    peer: Postfix smtpd with TLS on .2 (TLSA matches), .3 (no TLSA), .4 (TLSA wrong);
          Postfix smtpd without TLS on .5 (TLSA published: it asked for DANE), .7 and .8
          (policy none: a static passthrough); .6 offers STARTTLS with TLS 1.0/1.1 only
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatelab import certs, netlab
from gatelab.dnslab import DnsWorld
from gatelab.gatewayproc import GatewayProcess, gateway_config
from gatelab.netlab import Lab
from gatelab.postfix_instance import (
    PostfixInstance,
    null_client_settings,
    receiver_settings,
    tls_receiver_settings,
)
from gateway.dane import tlsa_record

ROUTES = {
    "dane": "smtp:[203.0.113.2]:25",
    "nodane": "smtp:[203.0.113.3]:25",
    "wrong": "smtp:[203.0.113.4]:25",
    "notls": "smtp:[203.0.113.5]:25",
    "helo": "heloonly:[203.0.113.2]:25",
    "old": "smtp:[203.0.113.6]:25",
}


@dataclass
class World:
    """The running lab (:func:`upgrade_lab`)."""

    lab: Lab
    gw: GatewayProcess
    mta: PostfixInstance
    tls_peer: PostfixInstance
    plain_peer: PostfixInstance
    old_peer: PostfixInstance
    workdir: Path


@contextlib.contextmanager
def upgrade_lab(work: Path) -> Iterator[World]:
    """The lab built in ``work``, the gateway running; all of it removed at the end."""
    leaf = certs.make_leaf(None, ["mx.b.test"])
    chain = certs.write_chain_file(work / "peer-chain.pem", leaf)
    good = str(tlsa_record(leaf.der))
    wrong = "3 1 1 " + "5a" * 32
    with Lab() as lab, DnsWorld.on_lab(lab, work / "dns") as dns:
        for address in ("203.0.113.4/24", "203.0.113.5/24", "203.0.113.6/24",
                        "203.0.113.7/24", "203.0.113.8/24"):
            lab.peer.ip("addr", "add", address, "dev", netlab.HOST_IF)
        dns.zone("test.", [
            "mx.b A 203.0.113.2", f"_25._tcp.mx.b TLSA {good}",
            "mx.nodane A 203.0.113.3",
            "mx.wrong A 203.0.113.4", f"_25._tcp.mx.wrong TLSA {wrong}",
            "mx.notls A 203.0.113.5", f"_25._tcp.mx.notls TLSA {good}",
            "mx.old A 203.0.113.6",
            # Recipient domains whose MX host for a destination publishes TLSA:
            "dane MX 10 mx.b",  # DANE, matching (destination .2)
            "wrongmx MX 10 mx.wrongkey", "mx.wrongkey A 203.0.113.3",  # .3, key mismatch
            f"_25._tcp.mx.wrongkey TLSA {wrong}",
            "needtls MX 10 mx.old2", "mx.old2 A 203.0.113.6",  # .6 ends up in plaintext
            f"_25._tcp.mx.old2 TLSA {good}",
            # .7 has no PTR at all and no STARTTLS: only the recipient's DNS can ask.
            "needdane MX 10 mx.needdane", "mx.needdane A 203.0.113.7",
            f"_25._tcp.mx.needdane TLSA {good}",
        ])
        dns.zone("113.0.203.in-addr.arpa.", ["2 PTR mx.b.test.", "3 PTR mx.nodane.test.",
                                             "4 PTR mx.wrong.test.", "5 PTR mx.notls.test.",
                                             "6 PTR mx.old.test."])
        dns.start()
        lab.redirect_port25(10025)
        transport = ", ".join([*(f"{k}@example.net={v}" for k, v in ROUTES.items()),
                               "u1@wrongmx.test=smtp:[203.0.113.3]:25",
                               "u2@example.net=smtp:[203.0.113.3]:25",
                               "u3@needtls.test=smtp:[203.0.113.6]:25",
                               "u4@dane.test=smtp:[203.0.113.2]:25",
                               "u5@needdane.test=smtp:[203.0.113.7]:25",
                               "u6@example.net=smtp:[203.0.113.7]:25"])
        sender = null_client_settings("[203.0.113.99]:25")
        sender["transport_maps"] = f"inline:{{ {transport} }}"
        domains = "example.net, dane.test, wrongmx.test, needtls.test, needdane.test"
        with PostfixInstance(lab.peer, work, tls_receiver_settings(
                    "203.0.113.2, 203.0.113.3, 203.0.113.4", chain, domain=domains),
                    name="tlspeer") as tls_peer, \
                PostfixInstance(lab.peer, work, receiver_settings(
                    "203.0.113.5, 203.0.113.7, 203.0.113.8", domain=domains),
                    name="plainpeer") as plain_peer, \
                PostfixInstance(lab.peer, work, {
                    **tls_receiver_settings("203.0.113.6", chain, domain=domains),
                    # Offers STARTTLS but speaks only TLS 1.0/1.1, which the gateway
                    # refuses: every handshake fails, as with a broken peer.
                    "smtpd_tls_protocols": ">=TLSv1 <=TLSv1.1"}, name="oldpeer") as old_peer, \
                GatewayProcess(lab.gw, work, gateway_config(
                    policy="dane", entries=["{match: 203.0.113.8, level: none}"])) as gw, \
                PostfixInstance(lab.mta, work, sender, name="mta", master_cf_overrides=[
                    "heloonly/unix = heloonly unix - - n - - smtp "
                    "-o smtp_never_send_ehlo=yes"]) as mta:
            yield World(lab, gw, mta, tls_peer, plain_peer, old_peer, work)


def send(w: World, user: str) -> bytes:
    """A message to ``user``@example.net (routed by ROUTES); returns its marker."""
    marker = f"MARKER-{uuid.uuid4().hex}".encode()
    body = b"Subject: upgrade test\r\n\r\n" + marker + b"\r\n"
    w.mta.sendmail("alice@example.com", f"{user}@example.net", body)
    return marker


def session_for(w: World, destination: str, n: int = 1) -> dict[str, Any]:
    """The ``n``-th session line to ``destination`` that says how TLS went."""
    return w.gw.sessions_to(destination, n=n, where=lambda s: bool(s.get("tls")))[n - 1]

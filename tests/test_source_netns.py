"""Outbound ``source_address: client``: the peer sees the sending MTA's own address, not the
gateway's (SPF, PTR/HELO match, per-IP reputation keep working), IPv4 and IPv6, under
REDIRECT and TPROXY, for an upgraded and a passthrough session; the rules come from
``smtpgate firewall --apply`` and ``--remove`` leaves nothing.

    mta  (198.51.100.2, 2001:db8:1::2): Postfix, sends by transport_maps to the four peers
    gw:  smtpgate outbound, source_address: client; the firewall's rules
    peer (203.0.113.2/.3, 2001:db8:2::2/::3): one receiving Postfix with STARTTLS
         .2 and ::2: policy may (the gateway upgrades); .3 and ::3: policy none (passthrough)

What the receiving Postfix logs as the client of each session decides.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import time
import uuid
from pathlib import Path

import pytest

from gatelab import certs, netlab, postfix_instance
from gatelab.fakedns import FakeDns, knows_nothing
from gatelab.gatewayproc import GatewayProcess, cli, firewall_leftovers, gateway_config
from gatelab.netlab import (
    GW_MTA_IF,
    GW_MTA_V4,
    GW_PEER_V4,
    GW_PEER_V6,
    MTA_V4,
    MTA_V6,
    PEER_V4,
    PEER_V4_ALT,
    PEER_V6,
    PEER_V6_ALT,
    Lab,
    Netns,
)
from gatelab.postfix_instance import (
    PostfixInstance,
    null_client_settings,
    tls_receiver_settings,
)
from gateway.config import Endpoint
from gateway.netfilter import InterceptError, upstream_socket

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

# domain -> (peer address, the MTA's address the peer must log, the gateway's it must not,
#            the session's tls)
ROUTES = {
    "b4.test": (PEER_V4, MTA_V4, GW_PEER_V4, "tls"),
    "b4p.test": (PEER_V4_ALT, MTA_V4, GW_PEER_V4, None),
    "b6.test": (PEER_V6, MTA_V6, GW_PEER_V6, "tls"),
    "b6p.test": (PEER_V6_ALT, MTA_V6, GW_PEER_V6, None),
}


@pytest.mark.parametrize("fmt", ["nft", "iptables"])
@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_the_peer_sees_the_mtas_own_address(tmp_path: Path, mode: str, fmt: str) -> None:
    port = 10025 if mode == "redirect" else 10027
    text = gateway_config(
        listeners=[f"{{address: 0.0.0.0, port: {port}, mode: {mode}, source_address: client}}",
                   f'{{address: "::", port: {port}, mode: {mode}, source_address: client}}'],
        policy="may", entries=[f"{{match: {PEER_V4_ALT}/32, level: none}}",
                               f"{{match: {PEER_V6_ALT}/128, level: none}}"])
    leaf = certs.make_leaf(None, ["mx.b.test"])
    chain = certs.write_pki(tmp_path / "pki", leaf)["chain"]
    receiver = tls_receiver_settings("all", chain, domain=" ".join(ROUTES),
                                     myhostname="mx.b.test")
    sender = null_client_settings("")
    sender["transport_maps"] = "inline:{" + ", ".join(
        f"{d}=smtp:[{peer}]" for d, (peer, *_rest) in ROUTES.items()) + "}"
    sender["inet_interfaces"] = "loopback-only"
    with Lab() as lab, contextlib.closing(FakeDns(knows_nothing()).serve_in(lab.gw)):
        # DNS is not the subject: a resolver that knows nothing (no recipient asks for DANE).
        gw = GatewayProcess(lab.gw, tmp_path / "gw", text)
        r = cli(lab.gw, "firewall", "-c", str(gw.config_path), "--format", fmt, "--apply",
                     "--mta-interface", GW_MTA_IF)
        assert r.returncode == 0, r.stderr
        assert "warning" not in r.stderr, r.stderr  # gw forwards: it is on the return path
        try:
            with gw, PostfixInstance(lab.peer, tmp_path, receiver, name="peer") as peer, \
                    PostfixInstance(lab.mta, tmp_path, sender, name="mta") as mta:
                markers = {}
                for domain in ROUTES:
                    markers[domain] = uuid.uuid4().hex.encode()
                    mta.sendmail("alice@mta.example.com", f"bob@{domain}",
                                 b"Subject: " + domain.encode() + b"\r\n\r\n" + markers[domain]
                                 + b"\r\n")
                mta.wait_queue_empty(timeout=40)
                got = peer.wait_maildir(len(ROUTES), timeout=20)
                texts = [p.read_bytes() for p in got]
                assert all(any(m in t for t in texts) for m in markers.values())
                log = peer.log_text()
                sessions = gw.wait_sessions(len(ROUTES))
        finally:
            r = cli(lab.gw, "firewall", "--remove")
        assert r.returncode == 0, r.stderr
        assert firewall_leftovers(lab.gw) == []
    for peer_addr, mta_addr, _gw, tls in ROUTES.values():
        # The receiving Postfix logged the MTA's own address as the client, never the edge's.
        assert re.search(rf"connect from unknown\[{re.escape(mta_addr)}\]", log), log
        [s] = [x for x in sessions if x["destination"].startswith(
            f"[{peer_addr}]" if ":" in peer_addr else f"{peer_addr}:")]
        assert s["outcome"] == "relayed", s
        # Upgraded by the gateway, or passed through (a static none plan runs no upgrade).
        assert s.get("tls") == tls if tls else s.get("tls") in (None, "passthrough"), s
    for gw_addr in (GW_PEER_V4, GW_PEER_V6):
        assert f"[{gw_addr}]" not in log, log


def test_its_own_connection_sent_back_to_it_never_loops(tmp_path: Path) -> None:
    """A6 with the MTA's address as source: the gateway's own upstream connection, sent back
    to its listener (a nat OUTPUT DNAT, no mark to exempt it), cannot become a session: the
    listener's answer goes to the MTA's address, out to the MTA, which resets it.  The MTA
    gets a 421 for its message and keeps it; nothing is relayed, nothing loops.  (Were it
    accepted, its local address, registered before the SYN leaves, would refuse it as a
    loop: tests/test_admission.py.)"""
    text = gateway_config(listeners=["{address: 0.0.0.0, port: 10025, source_address: client}"],
                          mark="0", connect=1)
    with Lab() as lab:
        lab.gw.iptables(["-t", "nat", "-A", "PREROUTING", "-i", GW_MTA_IF, "-p", "tcp",
                         "--dport", "25", "-j", "REDIRECT", "--to-ports", "10025"])
        lab.gw.iptables(["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "25",
                         "-j", "DNAT", "--to-destination", f"{GW_MTA_V4}:10025"])
        with GatewayProcess(lab.gw, tmp_path / "gw", text) as gw:
            with lab.mta.connect(PEER_V4, 25) as c:
                c.settimeout(10)
                greeting = c.recv(200)
            assert greeting.startswith(b"421 4.4.1 smtpgate: upstream timeout"), greeting
            [line] = gw.wait_sessions(1)
            time.sleep(0.5)  # a second session, had there been one, would be logged by now
            assert len(gw.sessions()) == 1, gw.sessions()
    assert line["outcome"] == "upstream_failed" and line["client"].startswith(f"{MTA_V4}:")


def test_the_upstream_port_is_never_the_clients_own() -> None:
    """Bound to the client's address, the upstream socket takes its port at bind time and
    never the client's own (its intercepted connection's conntrack tuple).  With one
    ephemeral port left, that port is taken when the client's is another, and refused when
    it is the client's."""
    client = ipaddress.ip_address(MTA_V4)
    peer = Endpoint(ipaddress.ip_address(PEER_V4), 25)
    ns = Netns("port")
    try:
        ns.ip("link", "set", "lo", "up")
        ns.sysctl("net.ipv4.ip_local_port_range", "40000 40000")
        sock = ns.call(lambda: upstream_socket(peer, 0, client, transparent=True,
                                               avoid_port=41000))
        with sock:
            assert sock.getsockname() == (MTA_V4, 40000)
        with pytest.raises(InterceptError, match="no source port other than 40000"):
            ns.call(lambda: upstream_socket(peer, 0, client, transparent=True,
                                            avoid_port=40000))
    finally:
        ns.delete()

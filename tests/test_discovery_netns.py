"""Discovery against a real DNSSEC stack: NSD serving signed lab zones, Unbound validating
with the lab's own trust anchor, the gateway's Resolver asking from the gw namespace.

One world serves every case (building it is the slow part); cases that break it (bogus
zone, server down) come last in their own tests, each with its own world.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gatelab import dnslab, netlab
from gatelab.dnslab import DnsWorld
from gatelab.gatewayproc import GatewayProcess, gateway_config
from gatelab.netlab import Lab, Server
from gateway.answers import Answer, Status
from gateway.config import DnsCache, DnsConfig, Endpoint, PolicyConfig
from gateway.discovery import discover, discover_cached, recipient_rule, recipient_rule_cached
from gateway.dns import Resolver
from gateway.policy import Action, Auth, plan
from gateway.walks import Discovery, RecipientRule

pytestmark = pytest.mark.netns

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

KEY_B = "3 1 1 " + "b0" * 32
KEY_C = "3 1 1 " + "c0" * 32
KEY_X = "3 1 1 " + "e0" * 32
PKIX = "1 1 1 " + "d0" * 32

TEST_ZONE = [
    "mx.b A 203.0.113.2",
    "mx.b AAAA 2001:db8:2::2",
    f"_25._tcp.mx.b TLSA {KEY_B}",
    "mx.nodane A 203.0.113.3",
    "alias CNAME real.c",
    "real.c A 203.0.113.4",
    f"_25._tcp.real.c TLSA {KEY_C}",
    "mx.liar A 203.0.113.99",
    "mx.pkix A 203.0.113.8",
    f"_25._tcp.mx.pkix TLSA {PKIX}",
    "mx.tcname A 203.0.113.9",
    "_25._tcp.mx.tcname CNAME tlsa.c",
    f"tlsa.c TLSA {KEY_C}",
]
REVERSE_V4 = [
    "2 PTR mx.b.test.",
    "3 PTR mx.nodane.test.",
    "4 PTR alias.test.",
    "5 PTR mx.insecure.example.",
    "6 PTR mx.bogus.test.",
    "7 PTR mx.liar.test.",
    "8 PTR mx.pkix.test.",
    "9 PTR mx.tcname.test.",
]


def declare(world: DnsWorld) -> None:
    world.zone("test.", TEST_ZONE)
    world.zone("bogus.test.", ["mx A 203.0.113.6", f"_25._tcp.mx TLSA {KEY_X}"])
    world.zone("insecure.example.", ["mx A 203.0.113.5", f"_25._tcp.mx TLSA {KEY_X}"],
               signed=False)
    world.zone("113.0.203.in-addr.arpa.", REVERSE_V4)
    world.zone(dnslab.reverse_zone("2001:db8:2::/64"),
               [f"{dnslab.ptr_name('2001:db8:2::2')} PTR mx.b.test."])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsWorld]:
    with Lab() as lab, DnsWorld.on_lab(lab, tmp_path_factory.mktemp("dns"),
                                       resolver_listen=[netlab.GW_MTA_V4]) as w:
        declare(w)
        w.start()
        yield w


def in_gw(world: DnsWorld, fn: Callable[[], T]) -> T:
    """Runs ``fn`` on a thread inside the gw namespace: its sockets reach 127.0.0.1:53 of gw."""
    return world.resolver_ns.call(fn)


def dns_config(**kw: Any) -> DnsConfig:
    return DnsConfig(resolvers=(Endpoint(ipaddress.ip_address("127.0.0.1"), 53),),
                     timeout=kw.pop("timeout", 3.0), budget=kw.pop("budget", 8.0),
                     cache=DnsCache(min_ttl=0), **kw)


def find(world: DnsWorld, address: str, **kw: Any) -> Discovery:
    async def go() -> Discovery:
        resolver = Resolver(dns_config(**kw))
        try:
            return await discover(resolver, ipaddress.ip_address(address), resolver.config.budget)
        finally:
            await resolver.close()

    return in_gw(world, lambda: asyncio.run(go()))


def statuses(d: Discovery) -> list[tuple[str, str, Status]]:
    return [(a.name, a.rdtype, a.status) for a in d.steps]


def test_secure_tlsa(world: DnsWorld) -> None:
    d = find(world, "203.0.113.2")
    assert statuses(d) == [
        ("2.113.0.203.in-addr.arpa.", "PTR", Status.SECURE),
        ("mx.b.test.", "A", Status.SECURE),
        ("_25._tcp.mx.b.test.", "TLSA", Status.SECURE),
    ]
    assert d.host == "mx.b.test." and d.host_secure and d.doubt is None
    assert [str(r) for r in d.usable] == [KEY_B]
    p = plan(d.address, d, PolicyConfig())
    assert (p.action, p.auth, p.sni) == (Action.REQUIRE_TLS, Auth.DANE, "mx.b.test")


def test_secure_tlsa_over_ipv6(world: DnsWorld) -> None:
    d = find(world, "2001:db8:2::2")
    assert [a.rdtype for a in d.steps] == ["PTR", "AAAA", "TLSA"]
    assert d.host == "mx.b.test." and [str(r) for r in d.usable] == [KEY_B]


def test_secure_absence_of_tlsa(world: DnsWorld) -> None:
    d = find(world, "203.0.113.3")
    tlsa = d.steps[-1]
    assert (tlsa.rdtype, tlsa.status, tlsa.rcode, tlsa.absent) == (
        "TLSA", Status.SECURE, "NXDOMAIN", True)
    assert d.records == () and d.doubt is None
    assert plan(d.address, d, PolicyConfig()).action is Action.TRY_TLS


def test_cname_to_the_host_looks_up_tlsa_at_the_target(world: DnsWorld) -> None:
    d = find(world, "203.0.113.4")
    fwd = d.steps[1]
    assert (fwd.cnames, fwd.canonical) == (("alias.test.",), "real.c.test.")
    assert d.tlsa_base == "real.c.test" and [str(r) for r in d.usable] == [KEY_C]


def test_tlsa_record_behind_a_cname(world: DnsWorld) -> None:
    d = find(world, "203.0.113.9")
    assert d.tlsa is not None and d.tlsa.cnames == ("_25._tcp.mx.tcname.test.",)
    assert d.tlsa.status is Status.SECURE and [str(r) for r in d.usable] == [KEY_C]


def test_unsigned_zone_gives_no_dane(world: DnsWorld) -> None:
    d = find(world, "203.0.113.5")
    assert statuses(d) == [
        ("5.113.0.203.in-addr.arpa.", "PTR", Status.SECURE),
        ("mx.insecure.example.", "A", Status.INSECURE),
    ]
    assert d.host == "mx.insecure.example." and not d.host_secure and d.records == ()
    assert plan(d.address, d, PolicyConfig()).action is Action.TRY_TLS


def test_ptr_without_forward_confirmation_is_ignored(world: DnsWorld) -> None:
    d = find(world, "203.0.113.7")
    assert [a.rdtype for a in d.steps] == ["PTR", "A"]
    assert d.steps[1].texts() == ["203.0.113.99"]
    assert d.host is None and d.records == ()


def test_pkix_usage_is_not_usable_for_smtp(world: DnsWorld) -> None:
    d = find(world, "203.0.113.8")
    assert [str(r) for r in d.records] == [PKIX] and d.usable == ()
    p = plan(d.address, d, PolicyConfig())
    assert (p.action, p.auth) == (Action.REQUIRE_TLS, Auth.NONE)


def test_no_ptr_at_all(world: DnsWorld) -> None:
    d = find(world, "203.0.113.200")
    [ptr] = d.steps
    assert (ptr.status, ptr.rcode) == (Status.SECURE, "NXDOMAIN")
    assert plan(d.address, d, PolicyConfig()).action is Action.TRY_TLS


def test_check_command_prints_the_chain_and_the_plan(world: DnsWorld) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # --no-connect: the chain and the plan are the subject (no SMTP server listens here).
    out = world.resolver_ns.run([sys.executable, "-m", "gateway", "check", "--no-connect",
                                 "203.0.113.2"], env=env, cwd=ROOT).stdout
    lines = out.splitlines()
    assert lines[0] == "destination 203.0.113.2"
    assert lines[1].startswith("  PTR   2.113.0.203.in-addr.arpa. PTR: mx.b.test. [secure, ttl ")
    assert lines[2].startswith("  A     mx.b.test. A: 203.0.113.2 [secure, ttl ")
    assert lines[2].endswith("forward-confirmed")
    assert lines[3].startswith(f"  TLSA  _25._tcp.mx.b.test. TLSA: {KEY_B} [secure, ttl ")
    assert lines[3].endswith("1 of 1 usable")
    assert lines[4] == ("  plan: TLS required, authenticate by DANE (1 usable TLSA), "
                        "SNI mx.b.test, on failure: defer (4xx) — default policy dane: "
                        "secure usable TLSA")
    by_name = world.resolver_ns.run(
        [sys.executable, "-m", "gateway", "check", "--no-connect", "mx.nodane.test"], env=env,
        cwd=ROOT).stdout
    assert "destination 203.0.113.3" in by_name
    assert "plan: TLS if offered, else plaintext" in by_name


def test_ad_from_an_untrusted_resolver_is_not_believed(world: DnsWorld) -> None:
    """Unbound also answers on gw's MTA-side address: same validated answers, but not over
    loopback, so the AD bit is ignored unless that resolver is listed as trusted."""
    remote = Endpoint(ipaddress.ip_address(netlab.GW_MTA_V4), 53)

    async def go(trusted: tuple[Endpoint, ...]) -> Answer:
        r = Resolver(DnsConfig(resolvers=(remote,), trusted=trusted, timeout=3.0,
                               cache=DnsCache(min_ttl=0)))
        try:
            return await r.lookup("mx.b.test", "A")
        finally:
            await r.close()

    untrusted = in_gw(world, lambda: asyncio.run(go(())))
    trusted = in_gw(world, lambda: asyncio.run(go((remote,))))
    assert (untrusted.status, untrusted.detail) == (Status.INSECURE,
                                                    "AD from an untrusted resolver ignored")
    assert trusted.status is Status.SECURE


def test_cache_shares_one_query_among_100_sessions(world: DnsWorld) -> None:
    async def go() -> tuple[int, set[Status]]:
        r = Resolver(dns_config())
        try:
            answers = await asyncio.gather(
                *(discover(r, ipaddress.ip_address("203.0.113.2"), 8.0) for _ in range(100)))
            return r.stats.queries, {a.tlsa.status for a in answers if a.tlsa}
        finally:
            await r.close()

    queries, tlsa_status = in_gw(world, lambda: asyncio.run(go()))
    assert queries == 3  # PTR, A, TLSA: once each for all 100
    assert tlsa_status == {Status.SECURE}


def test_cached_replay_equals_the_walk_and_asks_nothing(world: DnsWorld) -> None:
    """Sessions to a destination seen recently are planned from the cache in the accept
    callback: the replay must give exactly what the network walk gave, for every kind of
    destination, and give up (None) while anything is missing."""
    addresses = [f"203.0.113.{i}" for i in range(2, 10)] + ["2001:db8:2::2", "203.0.113.77"]

    async def go() -> list[tuple[Any, ...]]:
        r = Resolver(dns_config())
        out = []
        try:
            for text in addresses:
                a = ipaddress.ip_address(text)
                cold = discover_cached(r, a)
                walked = await discover(r, a, 8.0)
                queries = r.stats.queries
                replayed = discover_cached(r, a)
                await asyncio.sleep(0.05)  # a lookup the replay had started would be out now
                asked = r.stats.queries - queries
                rule_cold = recipient_rule_cached(r, "b.test", a)
                rule = await recipient_rule(r, "b.test", a, 8.0)
                out.append((text, cold, walked, replayed, asked,
                            rule_cold, rule, recipient_rule_cached(r, "b.test", a)))
        finally:
            await r.close()
        return out

    rows = in_gw(world, lambda: asyncio.run(go()))
    for text, cold, walked, replayed, asked, _rule_cold, rule, rule_replayed in rows:
        assert cold is None, text  # nothing cached yet: the walk must go to the network
        assert replayed == walked, text
        assert asked == 0, text  # the replay asked nothing
        assert isinstance(rule, RecipientRule) and rule_replayed == rule, text
    first = rows[0]
    # The DANE host's replay carries its TLSA; the first rule had no cached MX yet.
    assert first[3] is not None and [str(x) for x in first[3].usable] == [KEY_B]
    assert first[5] is None


def test_bogus_zone_defers(tmp_path: Path) -> None:
    with Lab() as lab, DnsWorld.on_lab(lab, tmp_path) as world:
        declare(world)
        world.start()
        assert find(world, "203.0.113.6").usable  # valid first
        world.make_bogus("bogus.test.")
        d = find(world, "203.0.113.6")
        fwd = d.steps[1]
        assert (fwd.name, fwd.status, fwd.rcode) == ("mx.bogus.test.", Status.BOGUS, "SERVFAIL")
        assert d.doubt == "A lookup of mx.bogus.test. is bogus"
        assert plan(d.address, d, PolicyConfig()).action is Action.DEFER


def test_authoritative_server_down_is_failed_and_defers(tmp_path: Path) -> None:
    with Lab() as lab, DnsWorld.on_lab(lab, tmp_path) as world:
        declare(world)
        world.start()
        find(world, "203.0.113.2")  # PTR and A now cached by Unbound (TTL 60)
        world.flush("test.")  # ... but not the TLSA zone's data
        for v6 in (False, True):
            lab.peer.iptables(["-I", "INPUT", "-p", "udp", "--dport", "53", "-j", "DROP"], v6=v6)
            lab.peer.iptables(["-I", "INPUT", "-p", "tcp", "--dport", "53", "-j", "DROP"], v6=v6)
        d = find(world, "203.0.113.2", timeout=2.0, budget=6.0)
        last = d.steps[-1]
        assert last.status is Status.FAILED, d.steps
        assert d.doubt is not None
        assert plan(d.address, d, PolicyConfig()).action is Action.DEFER


def test_check_without_resolver_config_uses_loopback(tmp_path: Path) -> None:
    """`smtpgate check` with no config asks 127.0.0.1:53; with nothing there every lookup
    is failed, and the command says so instead of crashing."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with Lab() as lab:
        r = lab.gw.run([sys.executable, "-m", "gateway", "check", "--no-connect", "203.0.113.2"],
                       env=env, cwd=ROOT, check=False, timeout=60)
        by_name = lab.gw.run([sys.executable, "-m", "gateway", "check", "mx.example"],
                             env=env, cwd=ROOT, check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1] == ("  PTR   2.113.0.203.in-addr.arpa. PTR: TIMEOUT "
                                        "[failed, ttl 0] (no answer from 127.0.0.1:53)")
    assert "plan: TLS if offered, else plaintext" in r.stdout
    # No answer is not "no addresses": the check could not be made (exit 3).
    assert by_name.returncode == 3, by_name.stdout
    assert by_name.stdout.splitlines()[-1] == (
        "mx.example: its addresses are unknown: DNS gave no answer (A: TIMEOUT, AAAA: TIMEOUT)")


def test_gateway_sessions_log_the_plan_from_dns(tmp_path: Path) -> None:
    """The running gateway discovers each outbound destination beside the connect and logs
    the plan with the session (acted on once the STARTTLS upgrade exists)."""
    with Lab() as lab, DnsWorld.on_lab(lab, tmp_path / "dns") as world:
        declare(world)
        world.start()
        lab.redirect_port25(10025)

        def banner_after_a_moment(conn: socket.socket) -> None:
            time.sleep(0.3)  # a real MTA's banner takes a moment too
            conn.sendall(b"220 peer\r\n")

        peers = [Server(lab.peer, a, banner_after_a_moment)
                 for a in ("203.0.113.2", "203.0.113.3")]
        try:
            with GatewayProcess(lab.gw, tmp_path, gateway_config(policy="dane")) as gw:
                for dst in ("203.0.113.2", "203.0.113.3", "203.0.113.2"):
                    with lab.mta.connect(dst, 25) as c:
                        c.settimeout(5)
                        assert c.recv(100) == b"220 peer\r\n"
                sessions = gw.wait_sessions(3)
                hits = gw.metric("smtpgate_dns_cache_total", result="hit")
                secure_tlsa = gw.metric("smtpgate_dns_answers_total", rdtype="TLSA",
                                        status="secure")
            for p in peers:
                p.join()
        finally:
            for p in peers:
                p.close()
    assert [(s["plan"], s["auth"]) for s in sessions] == [
        ("require-tls", "dane"), ("try-tls", "none"), ("require-tls", "dane")]
    assert hits >= 3  # the third session's PTR, A and TLSA came from the cache
    assert secure_tlsa == 2  # one positive TLSA answer, one secure NXDOMAIN

"""DNS answers and their status: classify() on crafted responses, and the Resolver against
an in-process fake for faults (drops, stalls, truncation, garbage) and for the cache."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import uvloop

from gatelab.fakedns import FakeDns, Handler, Reply, answer
from gateway.answers import Status, classify
from gateway.config import DnsCache, DnsConfig, Endpoint
from gateway.discovery import discover, discover_cached, recipient_rule, recipient_rule_cached
from gateway.dns import Resolver


def q(name: str, rdtype: str) -> dns.message.QueryMessage:
    m = dns.message.make_query(name, rdtype, want_dnssec=True)
    assert isinstance(m, dns.message.QueryMessage)
    return m


def resp(m: dns.message.Message) -> dns.message.QueryMessage:
    back = dns.message.from_wire(m.to_wire())
    assert isinstance(back, dns.message.QueryMessage)
    return back


# -- classify: one response → one Answer ---------------------------------------------------

def test_secure_answer_needs_ad_and_a_trusted_resolver() -> None:
    query = q("mx.b.test.", "A")
    r = resp(answer(query, "mx.b.test. 300 IN A 203.0.113.2", ad=True))
    a = classify(r, "mx.b.test.", "A", trusted=True)
    assert (a.status, a.rcode, a.ttl, a.texts()) == (Status.SECURE, "NOERROR", 300,
                                                    ["203.0.113.2"])
    untrusted = classify(r, "mx.b.test.", "A", trusted=False)
    assert untrusted.status is Status.INSECURE
    assert untrusted.detail == "AD from an untrusted resolver ignored"
    no_ad = classify(resp(answer(query, "mx.b.test. 300 IN A 203.0.113.2")), "mx.b.test.",
                     "A", trusted=True)
    assert no_ad.status is Status.INSECURE


def test_negative_answers_take_the_soa_minimum() -> None:
    query = q("_25._tcp.mx.b.test.", "TLSA")
    nx = classify(resp(answer(query, ad=True, rcode=dns.rcode.NXDOMAIN, soa_ttl=120)),
                  "_25._tcp.mx.b.test.", "TLSA", trusted=True)
    assert (nx.status, nx.rcode, nx.absent, nx.exists, nx.ttl) == (
        Status.SECURE, "NXDOMAIN", True, False, 120)
    nodata = classify(resp(answer(query, soa_ttl=60)), "_25._tcp.mx.b.test.", "TLSA",
                      trusted=True)
    assert (nodata.status, nodata.rcode, nodata.absent, nodata.ttl) == (
        Status.INSECURE, "NOERROR", True, 60)


def test_cname_chain_is_followed_and_reported() -> None:
    query = q("mx.b.test.", "A")
    r = resp(answer(query, "mx.b.test. 300 IN CNAME host.c.test.",
                    "host.c.test. 100 IN CNAME real.c.test.",
                    "real.c.test. 200 IN A 203.0.113.2", ad=True))
    a = classify(r, "mx.b.test.", "A", trusted=True)
    assert a.cnames == ("mx.b.test.", "host.c.test.")
    assert a.canonical == "real.c.test."
    assert a.ttl == 100 and a.texts() == ["203.0.113.2"]


def test_servfail_is_bogus_only_with_evidence() -> None:
    query = q("mx.b.test.", "A")
    plain = resp(answer(query, rcode=dns.rcode.SERVFAIL))
    assert classify(plain, "mx.b.test.", "A", True).status is Status.FAILED
    with_ede = answer(query, rcode=dns.rcode.SERVFAIL)
    with_ede.use_edns(0, options=[dns.edns.EDEOption(dns.edns.EDECode.SIGNATURE_EXPIRED)])
    b = classify(resp(with_ede), "mx.b.test.", "A", True)
    assert (b.status, b.detail) == (Status.BOGUS, "extended error 7")
    cd_ok = resp(answer(query, "mx.b.test. 300 IN A 203.0.113.2"))
    b2 = classify(plain, "mx.b.test.", "A", True, cd_response=cd_ok)
    assert (b2.status, b2.detail) == (Status.BOGUS, "data only with checking disabled")
    cd_fail = resp(answer(query, rcode=dns.rcode.SERVFAIL))
    assert classify(plain, "mx.b.test.", "A", True, cd_fail).status is Status.FAILED


def test_refused_is_failed() -> None:
    query = q("mx.b.test.", "A")
    a = classify(resp(answer(query, rcode=dns.rcode.REFUSED)), "mx.b.test.", "A", True)
    assert (a.status, a.rcode) == (Status.FAILED, "REFUSED")


# -- the Resolver against a fake ------------------------------------------------------------

def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(coro)


def cfg(port: int, **kw: Any) -> DnsConfig:
    cache = kw.pop("cache", DnsCache(min_ttl=0))
    return DnsConfig(resolvers=(Endpoint(ipaddress.ip_address("127.0.0.1"), port),),
                     timeout=kw.pop("timeout", 0.5), cache=cache, **kw)


async def with_fake(handler: Handler,
                    body: Callable[[FakeDns], Awaitable[None]]) -> None:
    fake = await FakeDns(handler).start()
    try:
        await body(fake)
    finally:
        await fake.stop()


def test_dropped_query_is_failed_not_an_exception() -> None:
    async def drop(query: dns.message.QueryMessage, transport: str) -> Reply:
        return None

    async def body(fake: FakeDns) -> None:
        r = Resolver(cfg(fake.port, timeout=0.3))
        a = await r.lookup("mx.b.test", "A")
        assert (a.status, a.rcode) == (Status.FAILED, "TIMEOUT")
        await r.close()

    run(with_fake(drop, body))


def test_truncated_answer_is_asked_again_over_tcp() -> None:
    async def handler(query: dns.message.QueryMessage, transport: str) -> Reply:
        if transport == "udp":
            r = answer(query)
            r.flags |= dns.flags.TC
            return r
        return answer(query, "mx.b.test. 60 IN A 203.0.113.2", ad=True)

    async def body(fake: FakeDns) -> None:
        r = Resolver(cfg(fake.port))
        a = await r.lookup("mx.b.test", "A")
        assert (a.status, a.texts()) == (Status.SECURE, ["203.0.113.2"])
        assert [t for _, _, t in fake.queries] == ["udp", "tcp"]
        await r.close()

    run(with_fake(handler, body))


@pytest.mark.parametrize("garbage", [b"", b"\x00\x01", b"\xff" * 40])
def test_malformed_answer_is_failed(garbage: bytes) -> None:
    async def handler(query: dns.message.QueryMessage, transport: str) -> Reply:
        return garbage

    async def body(fake: FakeDns) -> None:
        r = Resolver(cfg(fake.port, timeout=0.3))
        a = await r.lookup("mx.b.test", "A")
        assert a.status is Status.FAILED
        await r.close()

    run(with_fake(handler, body))


def test_loopback_resolver_is_trusted() -> None:
    """A resolver on loopback is trusted: its AD bit makes an answer secure.  (The
    untrusted case, a resolver elsewhere, is in tests/test_discovery_netns.py.)"""
    async def handler(query: dns.message.QueryMessage, transport: str) -> Reply:
        return answer(query, "mx.b.test. 60 IN A 203.0.113.2", ad=True)

    async def body(fake: FakeDns) -> None:
        r = Resolver(cfg(fake.port))
        assert (await r.lookup("mx.b.test", "A")).status is Status.SECURE
        await r.close()

    run(with_fake(handler, body))


def test_cache_ttl_negative_and_failure() -> None:
    now = [1000.0]
    count = {"n": 0}

    async def handler(query: dns.message.QueryMessage, transport: str) -> Reply:
        count["n"] += 1
        name = query.question[0].name.to_text()
        if name.startswith("gone."):
            return answer(query, ad=True, rcode=dns.rcode.NXDOMAIN, soa_ttl=50)
        if name.startswith("broken."):
            return answer(query, rcode=dns.rcode.SERVFAIL)
        return answer(query, f"{name} 100 IN A 203.0.113.2", ad=True)

    async def body(fake: FakeDns) -> None:
        cache = DnsCache(min_ttl=10, max_ttl=60, negative_max_ttl=30, failure_ttl=5)
        r = Resolver(cfg(fake.port, cache=cache), clock=lambda: now[0])
        for name in ("ok.test", "gone.test", "broken.test"):
            await r.lookup(name, "A")
        sent = count["n"]  # broken: SERVFAIL and the CD re-query
        for name in ("ok.test", "gone.test", "broken.test"):
            await r.lookup(name, "A")
        assert count["n"] == sent  # all three from the cache
        now[0] += 6  # failure_ttl (5) passed; negative (min(50, 30)) and positive not
        await r.lookup("broken.test", "A")  # two queries again: SERVFAIL, then with CD
        await r.lookup("gone.test", "A")  # still cached
        assert count["n"] == sent + 2
        now[0] += 25  # 31 s: negative capped at 30 expired; positive capped at 60 not
        await r.lookup("gone.test", "A")
        await r.lookup("ok.test", "A")
        assert count["n"] == sent + 3
        now[0] += 30  # 61 s: the positive answer's TTL (100, capped at 60) expired
        await r.lookup("ok.test", "A")
        assert count["n"] == sent + 4
        assert r.stats.hits == 5
        await r.close()

    run(with_fake(handler, body))


def test_one_query_for_100_concurrent_lookups() -> None:
    async def slow(query: dns.message.QueryMessage, transport: str) -> Reply:
        await asyncio.sleep(0.2)
        return answer(query, "mx.b.test. 60 IN A 203.0.113.2", ad=True)

    async def body(fake: FakeDns) -> None:
        r = Resolver(cfg(fake.port))
        answers = await asyncio.gather(*(r.lookup("MX.b.test", "A") for _ in range(100)))
        assert {a.status for a in answers} == {Status.SECURE}
        assert fake.count("mx.b.test.", "A") == 1
        assert (r.stats.misses, r.stats.shared) == (1, 99)
        await r.close()

    run(with_fake(slow, body))


def test_a_cancelled_waiter_does_not_cancel_the_shared_query() -> None:
    async def slow(query: dns.message.QueryMessage, transport: str) -> Reply:
        await asyncio.sleep(0.2)
        return answer(query, "mx.b.test. 60 IN A 203.0.113.2", ad=True)

    async def body(fake: FakeDns) -> None:
        r = Resolver(cfg(fake.port))
        loop = asyncio.get_running_loop()
        first = loop.create_task(r.lookup("mx.b.test", "A"), name="first")
        await asyncio.sleep(0.05)
        second = loop.create_task(r.lookup("mx.b.test", "A"), name="second")
        await asyncio.sleep(0.05)
        first.cancel()
        assert (await second).status is Status.SECURE
        assert fake.count("mx.b.test.", "A") == 1
        await r.close()

    run(with_fake(slow, body))


def test_concurrent_queries_are_capped() -> None:
    in_flight = {"now": 0, "max": 0}

    async def slow(query: dns.message.QueryMessage, transport: str) -> Reply:
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        await asyncio.sleep(0.05)
        in_flight["now"] -= 1
        name = query.question[0].name.to_text()
        return answer(query, f"{name} 60 IN A 203.0.113.2", ad=True)

    async def body(fake: FakeDns) -> None:
        r = Resolver(cfg(fake.port, max_queries=5))
        await asyncio.gather(*(r.lookup(f"h{i}.test", "A") for i in range(40)))
        assert in_flight["max"] == 5
        await r.close()

    run(with_fake(slow, body))


def test_a_result_from_cached_answers_lasts_until_the_first_of_them_expires() -> None:
    """discover_cached/recipient_rule_cached remember their result (the walk is the costly
    part of planning a session) exactly as long as every answer it was built from."""
    now = [1000.0]
    count = {"n": 0}
    address = ipaddress.ip_address("203.0.113.2")

    async def handler(query: dns.message.QueryMessage, transport: str) -> Reply:
        count["n"] += 1
        name, rdtype = query.question[0].name.to_text(), query.question[0].rdtype
        if rdtype == dns.rdatatype.PTR:
            return answer(query, f"{name} 100 IN PTR mx.b.test.", ad=True)
        if rdtype == dns.rdatatype.A:
            return answer(query, f"{name} 20 IN A 203.0.113.2", ad=True)  # the shortest
        if rdtype == dns.rdatatype.MX:
            return answer(query, f"{name} 100 IN MX 10 mx.b.test.", ad=True)
        return answer(query, f"{name} 100 IN TLSA 3 1 1 {'ab' * 32}", ad=True)

    async def body(fake: FakeDns) -> None:
        r = Resolver(cfg(fake.port), clock=lambda: now[0])
        walked = await discover(r, address, 2.0)
        rule = await recipient_rule(r, "b.test", address, 2.0)
        assert walked.records and rule.records  # the walk found the key both ways
        sent, hits = count["n"], r.stats.hits
        first = discover_cached(r, address)
        assert first is not None and first.records == walked.records
        assert discover_cached(r, address) is first  # remembered, not walked again
        assert recipient_rule_cached(r, "b.test", address) == rule
        again = recipient_rule_cached(r, "b.test", address)
        assert again is not None and again.records == rule.records
        assert count["n"] == sent
        # Each call stands for the answers it used: PTR, A, TLSA; MX, A, TLSA.
        assert r.stats.hits == hits + 4 * 3
        now[0] += 19  # just before the A answer (TTL 20) expires
        assert discover_cached(r, address) is first
        now[0] += 2  # the A answer expired: nothing built from it is given out
        assert discover_cached(r, address) is None
        assert recipient_rule_cached(r, "b.test", address) is None
        await discover(r, address, 2.0)  # A asked again
        assert count["n"] == sent + 1
        assert discover_cached(r, address) is not None
        r.flush()
        assert discover_cached(r, address) is None
        await r.close()

    run(with_fake(handler, body))

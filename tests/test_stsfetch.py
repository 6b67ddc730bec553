"""MTA-STS discovery and cache (gateway/stsfetch.py): the pure decisions, then Policies
against a real HTTPS server on 127.0.0.1 (a test CA, one certificate per SNI name) with the
policy host's address and the TXT record served by an in-process DNS server through the
gateway's own Resolver.  No root, no namespaces: the quick tier."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import uvloop
from prometheus_client import CollectorRegistry

from gatelab.certs import make_leaf, make_root, server_context
from gatelab.fakedns import FakeDns, Reply, answer
from gatelab.httpslab import InProcessHttps, TlsRequestHandler
from gatelab.logcapture import kept_records, named
from gateway.answers import Answer, Status
from gateway.config import DnsConfig, Endpoint, MtaSts
from gateway.dns import Resolver
from gateway.metrics import Metrics
from gateway.sts import MAX_POLICY_BYTES, Mode, Policy
from gateway.stsfetch import (
    FETCH_ERROR,
    POLICY_INVALID,
    RETRY_AFTER,
    WEBPKI_INVALID,
    Failure,
    Policies,
    Record,
    Step,
    Txt,
    cache_path,
    decide,
    next_check,
    normalize,
    read_txt,
    renew_point,
)

ENFORCE = b"version: STSv1\nmode: enforce\nmx: mx.x.test\nmx: *.mx.x.test\nmax_age: 86400\n"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(asyncio.wait_for(coro, 30))


# -- the pure core ---------------------------------------------------------------------------

def txt_answer(*texts: str, rcode: str = "NOERROR",
               status: Status = Status.INSECURE) -> Answer:
    rdata = tuple(dns.rrset.from_text_list("_mta-sts.x.test.", 300, "IN", "TXT", list(texts)))
    return Answer("_mta-sts.x.test.", "TXT", status, rcode, rdata, "_mta-sts.x.test.")


def test_read_txt() -> None:
    assert read_txt(txt_answer('"v=STSv1; id=20240101"')) == Txt("20240101")
    # strings of one record are joined; other TXT records are not ours
    assert read_txt(txt_answer('"v=STSv1; " "id=abc"', '"some other thing"')) == Txt("abc")
    assert read_txt(txt_answer()) == Txt()  # NODATA
    assert read_txt(txt_answer('"google-site-verification=x"')) == Txt()
    assert read_txt(txt_answer(rcode="NXDOMAIN")) == Txt()
    two = read_txt(txt_answer('"v=STSv1; id=1"', '"v=STSv1; id=2"'))
    assert two.policy_id is None and two.failure == POLICY_INVALID and "2 TXT" in str(two.error)
    bad = read_txt(txt_answer('"v=STSv1; id=not-valid!"'))
    assert bad.policy_id is None and bad.failure == POLICY_INVALID
    failed = read_txt(Answer("_mta-sts.x.test.", "TXT", Status.FAILED, "SERVFAIL",
                             detail="server failure"))
    assert failed.policy_id is None and failed.failure is None
    assert "SERVFAIL" in str(failed.error)
    bogus = read_txt(Answer("_mta-sts.x.test.", "TXT", Status.BOGUS, "SERVFAIL"))
    assert "DNSSEC" in str(bogus.error)


POLICY = Policy(Mode.ENFORCE, ("mx.x.test",), 1000)


def test_decide() -> None:
    rec = Record(POLICY, "1", fetched=0.0, expires=1000.0)
    fail = Failure("2", "HTTP 404", FETCH_ERROR, until=500.0)
    # nothing held: fetch when there is an id, else no policy (with the reason, if any)
    assert decide(None, None, Txt("1"), 10).step is Step.FETCH
    assert decide(None, None, Txt(), 10).step is Step.NONE
    dns_down = Txt(error="the TXT lookup failed")
    assert decide(None, None, dns_down, 10) == (d := decide(None, None, dns_down, 10))
    assert (d.step, d.error) == (Step.NONE, "the TXT lookup failed")
    # the same id: the cache; another id: fetch
    assert decide(rec, None, Txt("1"), 10).step is Step.CACHED
    assert decide(rec, None, Txt("2"), 10).step is Step.FETCH
    # no TXT, a broken one or DNS trouble: a cached policy stays in force (RFC 8461 5.1)
    assert decide(rec, None, Txt(), 10).step is Step.CACHED
    assert decide(rec, None, dns_down, 10).step is Step.CACHED
    # ... until it expires
    assert decide(rec, None, Txt(), 1000).step is Step.NONE
    assert decide(rec, None, Txt("1"), 1000).step is Step.FETCH
    # a failed fetch of id 2 is not tried again before its time: the cache meanwhile
    d = decide(rec, fail, Txt("2"), 10)
    assert (d.step, d.error, d.failure) == (Step.CACHED, "HTTP 404", FETCH_ERROR)
    assert decide(None, fail, Txt("2"), 10).step is Step.NONE
    assert decide(rec, fail, Txt("2"), 500).step is Step.FETCH
    assert decide(rec, fail, Txt("3"), 10).step is Step.FETCH  # a new id: at once
    # renewal: the same id is fetched again
    assert decide(rec, None, Txt("1"), 10, renew=True).step is Step.FETCH


def test_refresh_timing() -> None:
    rec = Record(POLICY, "1", fetched=0.0, expires=1000.0)
    assert renew_point(rec) == 750.0
    assert next_check(rec, 0.0, 1.0) == 750.0
    assert next_check(rec, 740.0, 1.0) == 800.0  # at least MIN_CHECK
    year = Record(Policy(Mode.ENFORCE, ("mx.x.test",), 31557600), "1", 0.0, 31557600.0)
    assert next_check(year, 0.0, 1.0) == 86400.0  # daily
    assert next_check(year, 0.0, 0.9) == pytest.approx(77760.0)


def test_normalize_and_cache_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert normalize("X.Test.") == "x.test"
    assert normalize("bücher.example") == "xn--bcher-kva.example"
    for bad in ("localhost", "[192.0.2.1]", "a..b", "x test.example", ""):
        assert normalize(bad) is None
    assert cache_path(None)[0] is None
    assert cache_path("/var/x.sqlite3") == ("/var/x.sqlite3", "")
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert cache_path("auto")[0] is None
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/smtpgate:/var/lib/other")
    assert cache_path("auto") == ("/var/lib/smtpgate/mta-sts.sqlite3", "")


# -- the lab: DNS, an HTTPS server, a CA -----------------------------------------------------

@dataclass
class Route:
    status: int = 200
    body: bytes = ENFORCE
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    stall: bool = False
    length: bool = True  # send Content-Length (else the body ends with the connection)


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.txt: dict[str, str | None] = {}
        self.servfail: set[str] = set()
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}
        self.release = threading.Event()
        self.stalled = 0  # requests the server holds without an answer
        root = make_root("stsfetch test root")
        other = make_root("a root nobody trusts")
        self.ca = tmp / "ca.pem"
        self.ca.write_bytes(root.pem)
        contexts: dict[str, ssl.SSLContext] = {}
        for n, (sni, issuer, names) in enumerate([
                ("mta-sts.x.test", root, ["mta-sts.x.test"]),
                ("mta-sts.y.test", root, ["mta-sts.y.test"]),
                ("mta-sts.z.test", root, ["mta-sts.z.test"]),
                ("mta-sts.untrusted.test", other, ["mta-sts.untrusted.test"]),
                ("mta-sts.wrongname.test", root, ["mta-sts.elsewhere.test"])]):
            contexts[sni] = server_context(tmp / f"pki{n}", make_leaf(issuer, names), issuer)
        default = contexts["mta-sts.x.test"]

        def pick(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            sock.context = contexts.get(name or "", default)

        self.tls = server_context(tmp / "pki", make_leaf(root, ["mta-sts.x.test"]), root)
        self.tls.sni_callback = pick
        self.http = self._serve()
        self.port = self.http.port
        self.dns = FakeDns(self._answer).serve_in(None, port=0)

    def _serve(self) -> InProcessHttps:
        lab = self

        class Handler(TlsRequestHandler):
            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
                lab.hits[host] = lab.hits.get(host, 0) + 1
                route = lab.routes.get(host, Route()) if self.path == \
                    "/.well-known/mta-sts.txt" else Route(404, b"")
                if route.stall:
                    lab.stalled += 1
                    lab.release.wait(10)
                    lab.stalled -= 1
                    return
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                if route.length:
                    self.send_header("Content-Length", str(len(route.body)))
                for k, v in route.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(route.body)

        return InProcessHttps(self.tls, Handler, "sts https")

    async def _answer(self, query: dns.message.QueryMessage, transport: str) -> Reply:
        q = query.question[0]
        name = q.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        if name.startswith("_mta-sts.") and rdtype == "TXT":
            domain = name.removeprefix("_mta-sts.").rstrip(".")
            if domain in self.servfail:
                return answer(query, rcode=dns.rcode.SERVFAIL)
            txt = self.txt.get(domain)
            if txt is None:
                return answer(query, rcode=dns.rcode.NXDOMAIN, soa_ttl=60)
            return answer(query, f'{name} 300 IN TXT "{txt}"')
        if name.startswith("mta-sts.") and rdtype == "A":
            return answer(query, f"{name} 300 IN A 127.0.0.1")
        return answer(query, soa_ttl=60)  # NODATA (AAAA)

    def publish(self, domain: str, policy_id: str | None, route: Route | None = None) -> None:
        self.txt[domain] = None if policy_id is None else f"v=STSv1; id={policy_id}"
        if route is not None:
            self.routes[f"mta-sts.{domain}"] = route

    def count(self, domain: str) -> int:
        return self.hits.get(f"mta-sts.{domain}", 0)

    def dns_config(self) -> DnsConfig:
        return DnsConfig(resolvers=(Endpoint(ipaddress.ip_address("127.0.0.1"), self.dns.port),),
                         timeout=1.0, budget=2.0)

    def close(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()
        self.dns.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def events() -> Iterator[list[logging.LogRecord]]:
    with kept_records() as records:
        yield records


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Gate:
    """What a gateway process holds: a Resolver, Metrics, and Policies."""

    lab: Lab
    policies: Policies
    resolver: Resolver
    metrics: Metrics

    def fetches(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value("smtpgate_mta_sts_fetches_total",
                                                       {"result": result})
        return value or 0.0

    def held(self, mode: str) -> float:
        value = self.metrics.registry.get_sample_value("smtpgate_mta_sts_policies",
                                                       {"mode": mode})
        return value or 0.0

    async def close(self) -> None:
        await self.policies.close()
        await self.resolver.close()
        if self.lab.stalled and not self.lab.release.is_set():
            # A fetch that timed out closed its connection politely (TLS close_notify),
            # which waits for the stalled server: let it go before the loop ends.
            self.lab.release.set()
            for _ in range(100):
                if not self.lab.stalled:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)


async def gate(lab: Lab, cache: str | None = None, clock: Clock | None = None,
               read_only: bool = False, **config: Any) -> Gate:
    resolver = Resolver(lab.dns_config())
    metrics = Metrics(CollectorRegistry())
    sts = MtaSts(cache=cache, ca_file=str(lab.ca), fetch_timeout=1.0, **config)
    policies = Policies(sts, lambda: resolver, metrics, clock or time.time,
                        read_only=read_only, https_port=lab.port)
    await policies.open()
    return Gate(lab, policies, resolver, metrics)


# -- fetching --------------------------------------------------------------------------------

def test_fetch_then_cache_then_new_id(lab: Lab, events: list[logging.LogRecord]) -> None:
    lab.publish("x.test", "1")

    async def go() -> None:
        g = await gate(lab)
        try:
            assert g.policies.cached("x.test") is None  # nothing known yet
            found = await g.policies.policy("X.Test.")
            assert (found.domain, found.source, found.policy_id, found.error) == (
                "x.test", "fetch", "1", None)
            assert found.policy == Policy(Mode.ENFORCE, ("mx.x.test", "*.mx.x.test"), 86400)
            assert found.fetched is not None and found.expires == found.fetched + 86400
            assert (lab.count("x.test"), g.fetches("ok"), g.held("enforce")) == (1, 1, 1)
            # the same id: the cache, no second fetch; cached() answers without waiting
            again = await g.policies.policy("x.test")
            assert (again.source, again.policy_id, lab.count("x.test")) == ("cache", "1", 1)
            fast = g.policies.cached("x.test")
            assert fast is not None and fast.policy == found.policy and fast.source == "cache"
            # a new id: fetched again (once the Resolver's TXT answer expired)
            lab.publish("x.test", "2", Route(body=ENFORCE.replace(b"86400", b"3600")))
            g.resolver.flush()
            assert g.policies.cached("x.test") is None  # the TXT must be asked again
            new = await g.policies.policy("x.test")
            assert (new.source, new.policy_id, lab.count("x.test")) == ("fetch", "2", 2)
            assert new.policy is not None and new.policy.max_age == 3600
            assert g.policies.size() == 1 and g.held("enforce") == 1
        finally:
            await g.close()

    run(go())
    logged = named(events, "mta-sts policy")
    assert [(e["domain"], e["id"], e["mode"], e["max_age"]) for e in logged] == [
        ("x.test", "1", "enforce", 86400), ("x.test", "2", "enforce", 3600)]


def test_concurrent_lookups_share_one_fetch(lab: Lab) -> None:
    lab.publish("x.test", "1")

    async def go() -> None:
        g = await gate(lab)
        try:
            found = await asyncio.gather(*(g.policies.policy("x.test") for _ in range(20)))
            assert {f.policy_id for f in found} == {"1"} and lab.count("x.test") == 1
        finally:
            await g.close()

    run(go())


FAILURES = {
    "redirect": (Route(302, b"", headers={"Location": "https://mta-sts.y.test/"}),
                 "redirect", FETCH_ERROR, "302"),
    "http_status": (Route(404, b"not here"), "http_status", FETCH_ERROR, "404"),
    "content_type": (Route(content_type="text/html"), "content_type", FETCH_ERROR,
                     "text/html"),
    "too_large": (Route(body=ENFORCE + b"#" * MAX_POLICY_BYTES), "too_large", FETCH_ERROR,
                  "larger"),
    "too_large_unannounced": (Route(body=ENFORCE + b"#" * MAX_POLICY_BYTES, length=False),
                              "too_large", FETCH_ERROR, "larger"),
    "invalid": (Route(body=b"version: STSv1\nmode: enforce\nmax_age: 60\n"), "invalid",
                POLICY_INVALID, "needs at least one mx"),
    "timeout": (Route(stall=True), "timeout", FETCH_ERROR, "within"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_fetch_failures(lab: Lab, case: str, events: list[logging.LogRecord]) -> None:
    route, result, failure, words = FAILURES[case]
    lab.publish("x.test", "1", route)

    async def go() -> None:
        g = await gate(lab)
        try:
            started = time.monotonic()
            found = await g.policies.policy("x.test")
            assert time.monotonic() - started < 3
            assert (found.policy, found.source, found.failure) == (None, "none", failure)
            assert words in str(found.error)
            assert g.fetches(result) == 1 and g.fetches("ok") == 0
            assert g.policies.size() == 0 and g.held("enforce") == 0
            # not tried again at once (RFC 8461 3.3: rate-limit), the error is remembered
            again = await g.policies.policy("x.test")
            assert again.error == found.error and g.fetches(result) == 1
        finally:
            await g.close()

    run(go())
    warned = named(events, "mta-sts fetch failed")
    assert len(warned) == 1 and warned[0]["level"] == logging.WARNING
    assert warned[0]["domain"] == "x.test" and warned[0]["result"] == result


@pytest.mark.parametrize(("domain", "words"), [("untrusted.test", "certificate verify"),
                                               ("wrongname.test", "mta-sts.wrongname.test")])
def test_webpki_failures(lab: Lab, domain: str, words: str) -> None:
    lab.publish(domain, "1")

    async def go() -> None:
        g = await gate(lab)
        try:
            found = await g.policies.policy(domain)
            assert (found.policy, found.failure) == (None, WEBPKI_INVALID)
            assert words in str(found.error), found.error
            assert g.fetches("tls") == 1 and lab.count(domain) == 0  # no request was sent
        finally:
            await g.close()

    run(go())


@pytest.mark.parametrize("case", ["http_status", "timeout", "invalid"])
def test_failed_fetch_keeps_the_cached_policy(lab: Lab, case: str) -> None:
    lab.publish("x.test", "1")
    clock = Clock()

    async def go() -> None:
        g = await gate(lab, clock=clock)
        try:
            first = await g.policies.policy("x.test")
            assert first.policy_id == "1"
            lab.publish("x.test", "2", FAILURES[case][0])
            g.resolver.flush()
            clock.now += 10
            found = await g.policies.policy("x.test")
            assert (found.policy, found.policy_id, found.source) == (first.policy, "1", "cache")
            assert found.failure == FAILURES[case][2] and found.error
            assert g.held("enforce") == 1
            # the cached answer carries the error until the retry, then fetches again
            fast = g.policies.cached("x.test")
            assert fast is not None and fast.policy_id == "1" and fast.error == found.error
            lab.publish("x.test", "2", Route())
            g.resolver.flush()
            clock.now += RETRY_AFTER
            fixed = await g.policies.policy("x.test")
            assert (fixed.policy_id, fixed.source, fixed.error) == ("2", "fetch", None)
        finally:
            await g.close()

    run(go())


def test_txt_gone_or_failing_keeps_the_cached_policy(lab: Lab) -> None:
    lab.publish("x.test", "1")
    lab.publish("y.test", None)
    lab.servfail.add("z.test")
    clock = Clock()

    async def go() -> None:
        g = await gate(lab, clock=clock)
        try:
            await g.policies.policy("x.test")
            lab.publish("x.test", None)
            g.resolver.flush()
            kept = await g.policies.policy("x.test")
            assert (kept.policy_id, kept.source, kept.error) == ("1", "cache", None)
            assert g.policies.cached("x.test") == kept
            lab.servfail.add("x.test")
            g.resolver.flush()
            failing = await g.policies.policy("x.test")
            assert failing.policy_id == "1" and "SERVFAIL" in str(failing.error)
            # nothing cached: no policy, and why
            none = await g.policies.policy("y.test")
            assert (none.policy, none.source, none.error) == (None, "none", None)
            down = await g.policies.policy("z.test")
            assert down.policy is None and "SERVFAIL" in str(down.error)
            assert down.failure is None
            # the cached policy expires at last
            clock.now += 86400
            lab.servfail.discard("x.test")
            g.resolver.flush()
            gone = await g.policies.policy("x.test")
            assert gone.policy is None and lab.count("x.test") == 1
            await g.policies.refresh()
            assert g.policies.size() == 0 and g.held("enforce") == 0
        finally:
            await g.close()

    run(go())


# -- the cache file --------------------------------------------------------------------------

def test_restart_keeps_policies(lab: Lab, tmp_path: Path,
                                events: list[logging.LogRecord]) -> None:
    lab.publish("x.test", "1")
    lab.publish("y.test", "7", Route(body=b"version: STSv1\nmode: none\nmax_age: 600\n"))
    db = str(tmp_path / "state" / "mta-sts.sqlite3")
    (tmp_path / "state").mkdir()

    async def go() -> None:
        g = await gate(lab, cache=db)
        try:
            assert g.policies.path == db
            await g.policies.policy("x.test")
            await g.policies.policy("y.test")
        finally:
            await g.close()
        lab.publish("x.test", None)  # the TXT record's absence removes nothing (5.1)
        g = await gate(lab, cache=db)
        try:
            assert g.policies.size() == 2 and g.held("enforce") == 1 and g.held("none") == 1
            found = await g.policies.policy("x.test")
            assert (found.source, found.policy_id) == ("cache", "1")
            assert found.policy is not None and found.policy.mode is Mode.ENFORCE
            y = await g.policies.policy("y.test")
            assert y.policy is not None and y.policy.mode is Mode.NONE and y.source == "cache"
            assert lab.count("x.test") == 1 and lab.count("y.test") == 1
        finally:
            await g.close()

    run(go())
    assert [e["where"] for e in named(events, "mta-sts cache")] == [db, db]


def test_auto_cache_is_in_the_state_directory(lab: Lab, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              events: list[logging.LogRecord]) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))

    async def go() -> None:
        g = await gate(lab, cache="auto")
        try:
            assert g.policies.path == str(tmp_path / "mta-sts.sqlite3")
        finally:
            await g.close()
        monkeypatch.delenv("STATE_DIRECTORY")
        g = await gate(lab, cache="auto")
        try:
            assert g.policies.path is None
        finally:
            await g.close()

    run(go())
    assert (tmp_path / "mta-sts.sqlite3").exists()
    where = named(events, "mta-sts cache")
    assert where[1]["where"] == "memory" and "STATE_DIRECTORY" in where[1]["reason"]


def test_workers_share_the_file(lab: Lab, tmp_path: Path) -> None:
    lab.publish("x.test", "1")
    db = str(tmp_path / "mta-sts.sqlite3")

    async def go() -> None:
        a, b = await gate(lab, cache=db), await gate(lab, cache=db)
        try:
            assert (await a.policies.policy("x.test")).source == "fetch"
            await a.policies.flush()
            found = await b.policies.policy("x.test")
            assert (found.source, found.policy_id, lab.count("x.test")) == ("cache", "1", 1)
            # b fetches the next id; a, whose memory has the old one, reads it from the file
            lab.publish("x.test", "2")
            b.resolver.flush()
            a.resolver.flush()
            assert (await b.policies.policy("x.test")).source == "fetch"
            await b.policies.flush()
            again = await a.policies.policy("x.test")
            assert (again.source, again.policy_id, lab.count("x.test")) == ("cache", "2", 2)
        finally:
            await a.close()
            await b.close()

    run(go())


def test_read_only_reads_and_never_writes(lab: Lab, tmp_path: Path) -> None:
    lab.publish("x.test", "1")
    lab.publish("y.test", "1")
    db = tmp_path / "mta-sts.sqlite3"

    async def go() -> None:
        check = await gate(lab, cache=str(db), read_only=True)
        try:
            assert check.policies.path is None and not db.exists()  # not created
        finally:
            await check.close()
        g = await gate(lab, cache=str(db))
        try:
            await g.policies.policy("x.test")
            await g.policies.flush()
            check = await gate(lab, cache=str(db), read_only=True)
            try:
                assert check.policies.path == str(db)
                assert (await check.policies.policy("x.test")).source == "cache"
                assert (await check.policies.policy("y.test")).source == "fetch"
                await check.policies.flush()
            finally:
                await check.close()
        finally:
            await g.close()
        with sqlite3.connect(db) as conn:
            rows = [r[0] for r in conn.execute("SELECT domain FROM policies")]
        conn.close()
        assert rows == ["x.test"]

    run(go())


def test_max_policies_drops_the_least_recently_used(lab: Lab, tmp_path: Path) -> None:
    for d in ("x.test", "y.test", "z.test"):
        lab.publish(d, "1")
    db = str(tmp_path / "mta-sts.sqlite3")
    clock = Clock()

    async def go() -> None:
        g = await gate(lab, cache=db, clock=clock, max_policies=2)
        try:
            for d in ("x.test", "y.test", "x.test", "z.test"):  # y is the least recent
                clock.now += 1
                assert (await g.policies.policy(d)).policy is not None
            assert g.policies.size() == 2 and g.policies.cached("y.test") is None
            assert g.policies.cached("x.test") is not None
            await g.policies.flush()
        finally:
            await g.close()
        with sqlite3.connect(db) as conn:
            rows = sorted(r[0] for r in conn.execute("SELECT domain FROM policies"))
        conn.close()
        assert rows == ["x.test", "z.test"]

    run(go())


def test_a_corrupt_file_means_memory_only(lab: Lab, tmp_path: Path,
                                         events: list[logging.LogRecord]) -> None:
    lab.publish("x.test", "1")
    db = tmp_path / "mta-sts.sqlite3"
    db.write_bytes(b"this is not a database\n" * 200)

    async def go() -> None:
        g = await gate(lab, cache=str(db))
        try:
            assert g.policies.path is None
            assert (await g.policies.policy("x.test")).source == "fetch"
        finally:
            await g.close()
        # a directory that does not exist: the same
        g = await gate(lab, cache=str(tmp_path / "missing" / "x.sqlite3"))
        try:
            assert g.policies.path is None
        finally:
            await g.close()

    run(go())
    warned = named(events, "mta-sts cache unusable")
    assert len(warned) == 2 and all(w["level"] == logging.WARNING for w in warned)
    assert warned[0]["where"] == "memory" and "not a database" in warned[0]["error"]


def test_a_file_that_fails_later_means_memory_only(lab: Lab, tmp_path: Path,
                                                   events: list[logging.LogRecord]) -> None:
    lab.publish("x.test", "1")
    lab.publish("y.test", "1")

    async def go() -> None:
        g = await gate(lab, cache=str(tmp_path / "mta-sts.sqlite3"))
        try:
            await g.policies.policy("x.test")
            await g.policies.flush()
            # what a full disk looks like to the writer, on the file's thread
            file = g.policies._file
            assert file is not None

            def full(row: Any, now: float) -> None:
                raise sqlite3.OperationalError("database or disk is full")

            file._put = full  # type: ignore[method-assign]
            assert (await g.policies.policy("y.test")).source == "fetch"
            await g.policies.flush()
            for _ in range(100):
                if g.policies._file is None:
                    break
                await asyncio.sleep(0.01)
            assert g.policies._file is None and g.policies.size() == 2
            lab.publish("x.test", "2")
            g.resolver.flush()
            assert (await g.policies.policy("x.test")).source == "fetch"
        finally:
            await g.close()

    run(go())
    warned = named(events, "mta-sts cache unusable")
    assert len(warned) == 1 and warned[0]["where"] == "memory"
    assert "disk is full" in warned[0]["error"]


def test_gauge_counts_policies_by_mode(lab: Lab) -> None:
    lab.publish("x.test", "1")
    lab.publish("y.test", "1", Route(body=ENFORCE.replace(b"enforce", b"testing")))
    lab.publish("z.test", "1", Route(body=b"version: STSv1\nmode: none\nmax_age: 60\n"))

    async def go() -> None:
        g = await gate(lab)
        try:
            for d in ("x.test", "y.test", "z.test"):
                await g.policies.policy(d)
            assert [g.held(m) for m in ("enforce", "testing", "none")] == [1, 1, 1]
            none = g.policies.cached("z.test")
            assert none is not None and none.policy is not None
            assert none.policy.mode is Mode.NONE  # mode none is a policy too, kept
        finally:
            await g.close()

    run(go())


def test_refresh_renews_policies_in_use(lab: Lab) -> None:
    lab.publish("x.test", "1")
    lab.publish("y.test", "1")
    clock = Clock()

    async def go() -> None:
        g = await gate(lab, clock=clock)
        try:
            first = await g.policies.policy("x.test")
            await g.policies.policy("y.test")
            assert await g.policies.refresh() == 0  # nothing due yet
            # past the renew point (3/4 of max_age): both renewed, sessions do not wait
            clock.now += 86400 * 0.8
            g.resolver.flush()
            assert (await g.policies.policy("x.test")).source == "cache"
            assert lab.count("x.test") == 1
            assert await g.policies.refresh() == 2
            renewed = g.policies.cached("x.test")
            assert renewed is not None and renewed.policy_id == "1"
            assert first.expires is not None and renewed.expires is not None
            assert renewed.expires == pytest.approx(first.expires + 86400 * 0.8)
            assert (lab.count("x.test"), lab.count("y.test")) == (2, 2)
            assert await g.policies.refresh() == 0  # the next look is later
            # a policy unused for its max_age is left to expire; one in use is renewed
            clock.now += 86400 * 0.8
            g.resolver.flush()
            await g.policies.policy("x.test")
            assert await g.policies.refresh() == 1
            assert (lab.count("x.test"), lab.count("y.test")) == (3, 2)
            assert await g.policies.refresh() == 0  # next look: a day or so later
        finally:
            await g.close()

    run(go())


def test_disabled_and_not_a_domain(lab: Lab) -> None:
    lab.publish("x.test", "1")

    async def go() -> None:
        g = await gate(lab, enabled=False)
        try:
            found = await g.policies.policy("x.test")
            assert (found.policy, found.error) == (None, None) and lab.count("x.test") == 0
        finally:
            await g.close()
        g = await gate(lab)
        try:
            odd = await g.policies.policy("[192.0.2.1]")
            assert odd.policy is None and "not a domain name" in str(odd.error)
        finally:
            await g.close()

    run(go())

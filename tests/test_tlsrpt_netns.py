"""TLS reports delivered with real parts (issue 18): a real Postfix as ``tlsrpt.relay``
(in gw on 127.0.0.1:25, the local MTA, taking mail for reports.test into its Maildir), the
TLSRPT records in a signed DnsWorld zone through a validating Unbound, and a real nginx
(gatelab.httpslab report sink) under a test Web PKI for ``https:`` URIs.

    gw:   the Reporter (this process, in gw through Netns.call), Unbound on 127.0.0.1,
          Postfix on 127.0.0.1:25 (virtual domain reports.test -> Maildir)
    peer: NSD; nginx on 203.0.113.43 (https://reports.test/tlsrpt keeps each POST's body)

    domain        _smtp._tls TXT
    mail.test     rua=mailto:tlsrpt@reports.test
    web.test      rua=https://reports.test/tlsrpt
    both.test     rua=mailto:both@reports.test,https://reports.test/tlsrpt
    none.test     (none)

The store is seeded with outcomes directly (the sessions' side is tested elsewhere); what
arrives is parsed back and compared with what the store counted.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import gzip
import ipaddress
import json
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from prometheus_client import CollectorRegistry, Counter

from gatelab import dnslab, httpslab, netlab, postfix_instance
from gatelab.certs import WebPki
from gatelab.dnslab import DnsWorld
from gatelab.httpslab import POLICY_V4, PolicyHost
from gatelab.netlab import Lab
from gatelab.postfix_instance import PostfixInstance, receiver_settings
from gateway.config import DnsConfig, Endpoint, TlsRpt
from gateway.dns import Resolver
from gateway.tlsrpt import STS, TLSA, Outcome, day_start
from gateway.tlsrptsend import CONTENT_TYPE, FAILED, NO_RECORD, SENT, Reporter, Summary
from gateway.tlsrptstore import Prepared, Store, prepare

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable() or postfix_instance.postfix_usable()
        or httpslab.httpslab_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

DAY = "2026-12-06"
START = day_start(DAY)
END = START + 86400
SINK = "reports.test"
URL = f"https://{SINK}/tlsrpt"
RECORDS = [
    '_smtp._tls.mail TXT "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"',
    f'_smtp._tls.web TXT "v=TLSRPTv1; rua={URL}"',
    f'_smtp._tls.both TXT "v=TLSRPTv1; rua=mailto:both@reports.test,{URL}"',
    f"reports A {POLICY_V4}",
]


@dataclass
class Site:
    lab: Lab
    world: DnsWorld
    host: PolicyHost
    relay: PostfixInstance
    ca: Path
    work: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("tlsrpt")
    pki = WebPki.make()
    with Lab() as lab, DnsWorld.on_lab(lab, work / "dns") as world, \
            PolicyHost.on_lab(lab, pki, work / "https") as host:
        world.zone("test.", RECORDS)
        world.start()
        assert host.add_report_sink(SINK, "/tlsrpt") == URL
        host.start()
        relay = PostfixInstance(lab.gw, work, receiver_settings(
            "127.0.0.1", domain=SINK, myhostname="relay.gw.test"), name="relay")
        with relay:
            yield Site(lab, world, host, relay, pki.write_bundle(work / "ca.pem"), work)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(site: Site, store: Path) -> TlsRpt:
    return TlsRpt(enabled=True, organization="Example Gateway Operator",
                  contact="mailto:tlsrpt@gw.example", sender="tlsrpt@gw.example",
                  relay=Endpoint(ipaddress.ip_address("127.0.0.1"), 25), store=str(store),
                  ca_file=str(site.ca), timeout=5.0)


def outcomes(domain: str) -> list[tuple[Outcome, int]]:
    """What a day's sessions to ``domain`` came to: successes under MTA-STS and DANE, a
    few failures."""
    sts = ("version: STSv1", "mode: enforce", f"mx: mx.{domain}", "max_age: 86400")
    return [
        (Outcome(domain, STS, sts, (f"mx.{domain}",)), 7),
        (Outcome(domain, STS, sts, (f"mx.{domain}",), "certificate-expired",
                 sending_ip="203.0.113.1", receiving_mx=f"mx.{domain}",
                 receiving_ip="203.0.113.2", detail="certificate has expired"), 2),
        (Outcome(domain, TLSA, ("3 1 1 ab12",), (f"mx.{domain}",)), 3),
    ]


def seed(site: Site, path: Path, domains: list[str]) -> None:
    async def go() -> None:
        store = Store(config(site, path), Clock(START + 3600), path=str(path))
        await store.open()
        for domain in domains:
            for outcome, n in outcomes(domain):
                store.record(outcome, n)
        await store.close()

    run(go())


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(asyncio.wait_for(coro, 60))


def in_gw(site: Site, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Runs ``fn()`` on an event loop of its own in a thread that joined gw: every socket
    it makes (DNS, SMTP, HTTPS) is the gateway's."""
    return site.lab.gw.call(lambda: run(fn()))


@dataclass
class Round:
    summary: Summary
    prepared: dict[str, Prepared]


def send_round(site: Site, path: Path, clock: Clock, reports: Counter,
               domains: list[str]) -> Round:
    """One Reporter round over DAY (store, Resolver and Reporter made and closed in gw, as
    a gateway restart would): what it did, and the reports the store makes."""
    async def go() -> Round:
        rpt = config(site, path)
        store = Store(rpt, clock, path=str(path))
        await store.open()
        resolver = Resolver(DnsConfig(
            resolvers=(Endpoint(ipaddress.ip_address("127.0.0.1"), 53),), timeout=2.0,
            budget=5.0))
        reporter = Reporter(rpt, store, lambda: resolver, reports, clock)
        try:
            summary = await reporter.send_day(DAY)
            prepared = {}
            for domain in domains:
                found = await prepare(store, rpt, DAY, domain)
                assert found is not None
                prepared[domain] = found
            return Round(summary, prepared)
        finally:
            await reporter.close()
            await store.close()
            await resolver.close()

    result: Round = in_gw(site, go)
    return result


def counter() -> Counter:
    return Counter("smtpgate_tlsrpt_reports", "TLS reports", ["method", "result"],
                   registry=CollectorRegistry())


def counted(c: Counter, method: str, result: str) -> float:
    return c.labels(method, result)._value.get()  # type: ignore[no-any-return]


def report_mail(site: Site, domain: str) -> tuple[email.message.EmailMessage, dict[str, Any],
                                                  str]:
    raw = site.relay.wait_delivered(f"TLS-Report-Domain: {domain}".encode())
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    text, part = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert part.get_content_type() == CONTENT_TYPE
    filename = part.get_filename()
    assert filename is not None
    return msg, json.loads(gzip.decompress(part.get_content())), filename


def totals(report: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {p["policy"]["policy-type"]: (p["summary"]["total-successful-session-count"],
                                         p["summary"]["total-failure-session-count"])
            for p in report["policies"]}


def test_reports_delivered_by_mail_and_https(site: Site) -> None:
    path = site.work / "delivered.sqlite3"
    domains = ["mail.test", "web.test", "none.test"]
    seed(site, path, domains)
    clock, reports = Clock(END + 1800), counter()
    posts_before = len(site.host.posts(SINK))
    done = send_round(site, path, clock, reports, domains)
    got = [(line.domain, line.rua, line.result) for line in done.summary.lines]
    assert got == [("mail.test", "mailto:tlsrpt@reports.test", SENT),
                   ("none.test", "", NO_RECORD),
                   ("web.test", URL, SENT)], done.summary.lines
    assert (counted(reports, "mailto", "sent"), counted(reports, "https", "sent")) == (1, 1)

    # By mail, through the real Postfix into its Maildir, parsed back.
    msg, report, filename = report_mail(site, "mail.test")
    expected = done.prepared["mail.test"]
    assert report == expected.report and filename == expected.filename
    assert msg["TLS-Report-Submitter"] == expected.submitter == "gw.example"
    assert msg["Subject"].startswith("Report Domain: mail.test Submitter: gw.example "
                                     "Report-ID: <")
    assert msg["Return-Path"] == "<tlsrpt@gw.example>"  # the envelope sender
    assert totals(report) == {"sts": (7, 2), "tlsa": (3, 0)}  # what the store counted
    [sts] = [p for p in report["policies"] if p["policy"]["policy-type"] == "sts"]
    assert sts["failure-details"] == [{
        "result-type": "certificate-expired", "sending-mta-ip": "203.0.113.1",
        "receiving-mx-hostname": "mx.mail.test", "receiving-ip": "203.0.113.2",
        "failed-session-count": 2, "failure-reason-code": "certificate has expired"}]

    # By HTTPS POST to the real nginx: the gzipped report, as such.
    posts = site.host.posts(SINK, at_least=posts_before + 1)[posts_before:]
    [post] = posts
    assert (post.method, post.path, post.status, post.content_type) == (
        "POST", "/tlsrpt", 200, CONTENT_TYPE)
    assert post.sni == SINK
    assert json.loads(gzip.decompress(post.body)) == done.prepared["web.test"].report

    # A second round (a restart) sends nothing again.
    again = send_round(site, path, clock, reports, ["mail.test", "web.test"])
    assert again.summary.lines == []
    assert len(site.host.posts(SINK)) == posts_before + 1
    assert len([p for p in site.relay.maildir_messages()
                if b"TLS-Report-Domain: mail.test" in p.read_bytes()]) == 1


def test_refused_delivery_is_retried_until_delivered(site: Site) -> None:
    path = site.work / "retried.sqlite3"
    seed(site, path, ["both.test"])
    clock, reports = Clock(END + 1800), counter()
    first = clock.now
    posts_before = len(site.host.posts(SINK))

    # The relay is down, the HTTPS receiver answers 503.
    site.relay.stop()
    site.host.sink_status(SINK, 503)
    try:
        down = send_round(site, path, clock, reports, ["both.test"])
        assert [(line.rua, line.result, line.attempts, line.next_try)
                for line in down.summary.lines] == [
            (URL, FAILED, 1, first + 300),
            ("mailto:both@reports.test", FAILED, 1, first + 300)]
        https, mail = down.summary.lines
        assert "127.0.0.1:25" in mail.detail and "connect" in mail.detail
        assert "HTTP 503" in https.detail
        assert (counted(reports, "mailto", "failed"), counted(reports, "https", "failed")) == (
            1, 1)
        # The relay is back but defers the recipient (a 4xx): still failed, retried later.
        site.relay.set_main_cf({"smtpd_recipient_restrictions": "defer"}, reload=False)
    finally:
        if site.relay.proc is None:
            site.relay.start()
    try:
        clock.now = first + 300
        deferred = send_round(site, path, clock, reports, ["both.test"])
        https, mail = deferred.summary.lines
        assert (mail.result, mail.attempts, mail.next_try) == (FAILED, 2, clock.now + 1800)
        assert "refused RCPT: 450" in mail.detail, mail.detail
        assert (https.result, https.attempts) == (FAILED, 2)
    finally:
        site.relay.set_main_cf({"smtpd_recipient_restrictions": ""})
        site.host.sink_status(SINK, 200)

    # Before the next try nothing is sent; at it, both are delivered.
    clock.now = first + 300 + 1799
    assert send_round(site, path, clock, reports, ["both.test"]).summary.lines == []
    clock.now = first + 300 + 1800
    back = send_round(site, path, clock, reports, ["both.test"])
    assert [(line.result, line.attempts) for line in back.summary.lines] == [
        (SENT, 3), (SENT, 3)]
    msg, report, _ = report_mail(site, "both.test")
    assert msg["To"] == "both@reports.test"
    assert report == back.prepared["both.test"].report
    assert totals(report) == {"sts": (7, 2), "tlsa": (3, 0)}
    posts = site.host.posts(SINK, at_least=posts_before + 3)[posts_before:]
    assert [p.status for p in posts] == [503, 503, 200]
    assert json.loads(gzip.decompress(posts[-1].body)) == report
    assert (counted(reports, "mailto", "sent"), counted(reports, "mailto", "failed"),
            counted(reports, "https", "sent"), counted(reports, "https", "failed")) == (
        1, 2, 1, 2)

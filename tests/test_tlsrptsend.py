"""TLS-RPT sending (gateway/tlsrptsend.py): the TLSRPT record, the report mail, the retry
schedule, then a Reporter delivering from a real store to an SMTP server and a real HTTPS
server on 127.0.0.1 (a test CA), the TLSRPT records served by an in-process DNS server
through the gateway's own Resolver.  No root, no namespaces: the quick tier."""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import email.utils
import fcntl
import gzip
import io
import ipaddress
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import uvloop
from prometheus_client import CollectorRegistry, Counter

from gatelab.certs import make_leaf, make_root, server_context
from gatelab.fakedns import FakeDns, Reply, answer
from gatelab.httpslab import InProcessHttps, TlsRequestHandler
from gatelab.logcapture import kept_records, named
from gateway import tlsrptsend
from gateway.config import Config, DnsConfig, Endpoint, TlsRpt
from gateway.dns import Resolver
from gateway.tlsrpt import STS, Outcome, day_start
from gateway.tlsrptsend import (
    CONTENT_TYPE,
    DELIVERED,
    FAILED,
    GAVE_UP,
    GIVE_UP_AFTER,
    LOOKUP,
    LOOKUP_FAILED,
    NEVER,
    NO_RECORD,
    NOTHING,
    PENDING,
    RETRY_DELAYS,
    SENT,
    TICK,
    WAITING,
    Reporter,
    _dot_stuffed,
    mailto_address,
    message,
    next_try,
    parse_record,
    read_record,
    send,
)
from gateway.tlsrptstore import Store, prepare

DAY = "2026-12-06"
START = day_start(DAY)
END = START + 86400
SUBMITTER = "gw.example"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(asyncio.wait_for(coro, 30))


# -- the pure core ---------------------------------------------------------------------------

def test_parse_record() -> None:
    one = "v=TLSRPTv1; rua=mailto:tlsrpt@a.test"
    assert parse_record([one]) == ["mailto:tlsrpt@a.test"]
    # several URIs, WSP around the delimiters, a trailing ";", other TXT records ignored
    assert parse_record(["google-site-verification=x",
                         "v=TLSRPTv1 ;rua=mailto:a@a.test , https://r.a.test/x;"]) == [
        "mailto:a@a.test", "https://r.a.test/x"]
    # several rua fields add up; unknown fields (extensions) are ignored; duplicates once
    assert parse_record(["v=TLSRPTv1; rua=mailto:a@a.test; ext_1=x.y; "
                         "rua=mailto:a@a.test,https://r.a.test/"]) == [
        "mailto:a@a.test", "https://r.a.test/"]
    # none, or two, TLSRPT records: no reporting (RFC 8460 3)
    assert parse_record([]) == [] and parse_record(["v=spf1 -all"]) == []
    two = read_record([one, "v=TLSRPTv1; rua=mailto:b@a.test"])
    assert two.uris == () and "2 TLSRPT records" in two.error and not two.dns_failed
    # not this version, or not at the start
    assert parse_record(["v=TLSRPTv10; rua=mailto:a@a.test"]) == []
    assert parse_record([" v=TLSRPTv1; rua=mailto:a@a.test"]) == []
    assert parse_record(["v=TLSRPTv1"]) == []  # no field delimiter: not a record
    # broken syntax, no rua: nothing
    for broken in ("v=TLSRPTv1; rua", "v=TLSRPTv1; =x; rua=mailto:a@a.test",
                   "v=TLSRPTv1; rua=mailto:a@a.test; ;", "v=TLSRPTv1; rua=mailto:ä@a.test",
                   "v=TLSRPTv1; ext=1"):
        assert parse_record([broken]) == [], broken
    assert "without rua" in read_record(["v=TLSRPTv1; ext=1"]).error
    # only mailto: and https:, usable ones
    assert parse_record(["v=TLSRPTv1; rua=http://r.a.test/,ftp://r.a.test/,"
                         "https://r.a.test/ok,mailto:not-an-address,"
                         "MAILTO:Ops@A.test"]) == ["https://r.a.test/ok", "MAILTO:Ops@A.test"]
    unusable = read_record(["v=TLSRPTv1; rua=http://r.a.test/"])
    assert unusable.uris == () and "no usable rua" in unusable.error
    # bounded
    many = ",".join(f"mailto:r{i}@a.test" for i in range(20))
    assert len(parse_record([f"v=TLSRPTv1; rua={many}"])) == 5


def test_mailto_address() -> None:
    assert mailto_address("mailto:tlsrpt@a.test") == "tlsrpt@a.test"
    assert mailto_address("mailto:tls%2Drpt@a.test?subject=x") == "tls-rpt@a.test"
    for bad in ("mailto:", "mailto:a.test", "mailto:a@b@", "mailto:a%2Cb@a.test",
                "mailto:a%20b@a.test", "mailto:<a@a.test>", "mailto:a@localhost",
                "mailto:ü@a.test", "https://a.test/"):
        assert mailto_address(bad) is None, bad


REPORT = {"organization-name": "Example", "report-id": "r1", "policies": []}


def test_message_is_rfc8460_5_3() -> None:
    gz = gzip.compress(json.dumps(REPORT).encode())
    name = f"{SUBMITTER}!a.test!{START}!{END - 1}!abc.json.gz"
    long_name = f"{SUBMITTER}!{'x' * 60}.a.test!{START}!{END - 1}!{'0' * 32}.json.gz"
    for filename in (name, long_name):
        raw = message(gz, domain="a.test", submitter=SUBMITTER, sender="tlsrpt@gw.example",
                      rcpt="tlsrpt@a.test", report_id="6f1d1b0c-9a53", filename=filename,
                      day=DAY, date=END + 900)
        assert raw.count(b"\n") == raw.count(b"\r\n")  # CRLF throughout
        assert max(len(line) for line in raw.split(b"\r\n")) <= 998
        # the file name as written, not RFC 2231 continuations that naive parsers miss
        assert f'filename="{filename}"'.encode() in raw
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "tlsrpt"
        assert msg["TLS-Report-Domain"] == "a.test"
        assert msg["TLS-Report-Submitter"] == SUBMITTER
        assert msg["From"] == "tlsrpt@gw.example" and msg["To"] == "tlsrpt@a.test"
        assert msg["Subject"] == (f"Report Domain: a.test Submitter: {SUBMITTER} "
                                  f"Report-ID: <6f1d1b0c-9a53@{SUBMITTER}>")
        assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == END + 900
        assert msg["Message-ID"].endswith(f"@{SUBMITTER}>")
        assert msg["MIME-Version"] == "1.0"
        text, attachment = msg.iter_parts()
        assert text.get_content_type() == "text/plain" and DAY in text.get_content()
        assert attachment.get_content_type() == CONTENT_TYPE
        assert attachment["Content-Transfer-Encoding"] == "base64"
        assert attachment.get_content_disposition() == "attachment"
        assert attachment.get_filename() == filename
        assert json.loads(gzip.decompress(attachment.get_content())) == REPORT
    # a report id that is a msg-id already stays as it is
    raw = message(gz, domain="a.test", submitter=SUBMITTER, sender="s@gw.example",
                  rcpt="r@a.test", report_id="<x.1@a.example>", filename=name, day=DAY,
                  date=END)
    assert b"Report-ID: <x.1@a.example>" in raw.replace(b"\r\n ", b" ")


def test_dot_stuffing() -> None:
    assert _dot_stuffed(b".a\r\nb\r\n.\r\n..c") == b"..a\r\nb\r\n..\r\n...c\r\n.\r\n"
    assert _dot_stuffed(b"a\nb\n") == b"a\r\nb\r\n.\r\n"


def test_next_try() -> None:
    assert RETRY_DELAYS == (300.0, 1800.0, 7200.0, 21600.0, 43200.0)
    assert [next_try(n, 1000.0) - 1000.0 for n in range(1, 6)] == list(RETRY_DELAYS)
    assert next_try(6, 1000.0) == NEVER and next_try(0, 1000.0) == NEVER
    # every retry within 24 h of the first attempt (RFC 8460 5.5)
    assert sum(RETRY_DELAYS) < 86400
    # never past GIVE_UP_AFTER after the end of the report's day
    assert next_try(1, END + 3600, day_end=END) == END + 3900
    assert next_try(5, END + GIVE_UP_AFTER - 3600, day_end=END) == NEVER


# -- the lab: a store, DNS, an SMTP server, an HTTPS server ----------------------------------

@dataclass
class Mail:
    sender: str
    rcpts: list[str]
    data: bytes


class FakeSmtp:
    """An SMTP server on 127.0.0.1 that keeps what it was given; ``refuse`` maps a verb
    (EHLO, MAIL, RCPT, DATA, "." for the message) to the reply it gets instead."""

    def __init__(self) -> None:
        self.mails: list[Mail] = []
        self.refuse: dict[str, bytes] = {}
        self.sessions = 0
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                fake.sessions += 1
                self.request.settimeout(10)
                w = self.wfile.write
                w(b"220 relay.test ESMTP\r\n")
                sender, rcpts = "", []
                while line := self.rfile.readline(4096):
                    verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper().decode()
                    if verb in fake.refuse:
                        w(fake.refuse[verb])
                        continue
                    if verb in ("EHLO", "HELO"):
                        w(b"250-relay.test\r\n250 8BITMIME\r\n")
                    elif verb == "MAIL":
                        sender = line.decode().split("<", 1)[1].split(">", 1)[0]
                        w(b"250 2.1.0 Ok\r\n")
                    elif verb == "RCPT":
                        rcpts.append(line.decode().split("<", 1)[1].split(">", 1)[0])
                        w(b"250 2.1.5 Ok\r\n")
                    elif verb == "DATA":
                        w(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                        data = bytearray()
                        while (chunk := self.rfile.readline(65536)) != b".\r\n":
                            if not chunk:
                                return
                            data += chunk[1:] if chunk.startswith(b"..") else chunk
                        if "." in fake.refuse:
                            w(fake.refuse["."])
                            continue
                        fake.mails.append(Mail(sender, rcpts, bytes(data)))
                        w(b"250 2.0.0 Ok: queued as 1\r\n")
                    elif verb == "QUIT":
                        w(b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        w(b"502 5.5.2 what\r\n")

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True,
                         name="fake smtp").start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Posted:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Lab:
    tmp: Path
    txt: dict[str, list[str]] = field(default_factory=dict)  # domain -> TXT strings
    servfail: set[str] = field(default_factory=set)
    posts: list[Posted] = field(default_factory=list)
    status: int = 200  # the HTTPS server's answer to a POST
    location: str = ""  # with a 3xx

    def __post_init__(self) -> None:
        root = make_root("tlsrptsend test root")
        self.ca = self.tmp / "ca.pem"
        self.ca.write_bytes(root.pem)
        self.tls = server_context(self.tmp / "pki", make_leaf(root, ["reports.x.test"]), root)
        self.http = self._serve()
        self.https_port = self.http.port
        self.smtp = FakeSmtp()
        self.dns = FakeDns(self._answer).serve_in(None, port=0)
        with socket.socket() as s:  # a port nobody listens on: a relay that is down
            s.bind(("127.0.0.1", 0))
            self.closed_port = s.getsockname()[1]

    def url(self, path: str = "/tlsrpt") -> str:
        return f"https://reports.x.test:{self.https_port}{path}"

    def publish(self, domain: str, *texts: str) -> None:
        self.txt[domain] = list(texts)

    def _serve(self) -> InProcessHttps:
        lab = self

        class Handler(TlsRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                lab.posts.append(Posted(self.path, {k.lower(): v for k, v in
                                                    self.headers.items()}, body))
                self.send_response(lab.status)
                if lab.location:
                    self.send_header("Location", lab.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return InProcessHttps(self.tls, Handler, "tlsrpt https")

    async def _answer(self, query: dns.message.QueryMessage, transport: str) -> Reply:
        q = query.question[0]
        name = q.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        if name.startswith("_smtp._tls.") and rdtype == "TXT":
            domain = name.removeprefix("_smtp._tls.").rstrip(".")
            if domain in self.servfail:
                return answer(query, rcode=dns.rcode.SERVFAIL)
            texts = self.txt.get(domain)
            if texts is None:
                return answer(query, rcode=dns.rcode.NXDOMAIN, soa_ttl=60)
            quoted = " ".join(f'"{t}"' for t in texts)
            return answer(query, *(f'{name} 300 IN TXT "{t}"' for t in texts)) if \
                len(texts) != 1 else answer(query, f"{name} 300 IN TXT {quoted}")
        if name == "reports.x.test." and rdtype == "A":
            return answer(query, f"{name} 300 IN A 127.0.0.1")
        return answer(query, soa_ttl=60)  # NODATA

    def dns_config(self) -> DnsConfig:
        return DnsConfig(resolvers=(Endpoint(ipaddress.ip_address("127.0.0.1"), self.dns.port),),
                         timeout=1.0, budget=2.0)

    def config(self, relay_port: int | None = None, **kw: Any) -> TlsRpt:
        port = self.smtp.port if relay_port is None else relay_port
        settings: dict[str, Any] = dict(
            enabled=True, organization="Example Gateway Operator",
            contact=f"mailto:tlsrpt@{SUBMITTER}", sender=f"tlsrpt@{SUBMITTER}",
            relay=Endpoint(ipaddress.ip_address("127.0.0.1"), port), store="unused",
            ca_file=str(self.ca), timeout=3.0)
        settings.update(kw)
        return TlsRpt(**settings)

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.smtp.close()
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
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def outcome(domain: str, result: str = "success") -> Outcome:
    return Outcome(domain, STS, ("version: STSv1", "mode: enforce", "mx: mx.a.test",
                                 "max_age: 86400"), ("mx.a.test",), result,
                   sending_ip="192.0.2.1" if result != "success" else "",
                   receiving_mx="mx.a.test" if result != "success" else "")


def counter() -> Counter:
    return Counter("smtpgate_tlsrpt_reports", "TLS reports", ["method", "result"],
                   registry=CollectorRegistry())


def counted(c: Counter, method: str, result: str) -> float:
    return c.labels(method, result)._value.get()  # type: ignore[no-any-return]


@dataclass
class Gate:
    """A store seeded with yesterday's outcomes, the Resolver and the Reporter."""

    lab: Lab
    store: Store
    resolver: Resolver
    reporter: Reporter
    clock: Clock
    reports: Counter

    async def close(self) -> None:
        await self.reporter.close()
        await self.store.close()
        await self.resolver.close()


async def gate(lab: Lab, seed: dict[str, int], relay_port: int | None = None,
               **config: Any) -> Gate:
    """Outcomes counted on DAY (``seed``: domain -> sessions, one failure among them),
    then the clock at 00:30 UTC the next day, past send_after."""
    clock = Clock(START + 3600)
    rpt = lab.config(relay_port, **config)
    store = Store(rpt, clock, path=str(lab.tmp / "tlsrpt.sqlite3"))
    await store.open()
    for domain, n in seed.items():
        store.record(outcome(domain), n - 1)
        store.record(outcome(domain, "certificate-expired"))
    await store.flush()
    clock.now = END + 1800
    resolver = Resolver(lab.dns_config())
    reports = counter()
    # The metrics object as gateway.metrics.Metrics has it (the counter as an attribute).
    reporter = Reporter(rpt, store, lambda: resolver, SimpleNamespace(tlsrpt_reports=reports),
                        clock)
    return Gate(lab, store, resolver, reporter, clock, reports)


def parse_mail(data: bytes) -> tuple[email.message.EmailMessage, dict[str, Any], str]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    part = next(p for p in msg.iter_parts() if p.get_content_type() == CONTENT_TYPE)
    filename = part.get_filename()
    assert filename is not None
    return msg, json.loads(gzip.decompress(part.get_content())), filename


# -- delivering ------------------------------------------------------------------------------

def test_send_day_delivers_by_mail_and_https(lab: Lab, events: list[logging.LogRecord]) -> None:
    lab.publish("a.test", f"v=TLSRPTv1; rua=mailto:tlsrpt@a.test,{lab.url()}")
    lab.publish("c.test", "v=TLSRPTv1; rua=mailto:reports@c.test")
    # b.test publishes nothing: no report

    async def go() -> None:
        g = await gate(lab, {"a.test": 3, "b.test": 1, "c.test": 2})
        try:
            summary = await g.reporter.send_day(DAY)
            got = [(line.domain, line.rua, line.result, line.attempts)
                   for line in summary.lines]
            assert got == [("a.test", lab.url(), SENT, 1),
                           ("a.test", "mailto:tlsrpt@a.test", SENT, 1),
                           ("b.test", "", NO_RECORD, 0),
                           ("c.test", "mailto:reports@c.test", SENT, 1)]
            assert (summary.sent, summary.failed, summary.wake) == (3, 0, NEVER)
            expected = await prepare(g.store, g.reporter.config, DAY, "a.test")
            assert expected is not None
            # by mail: the envelope, the message, the report in it
            mails = {m.rcpts[0]: m for m in lab.smtp.mails}
            assert sorted(mails) == ["reports@c.test", "tlsrpt@a.test"]
            mail = mails["tlsrpt@a.test"]
            assert mail.sender == f"tlsrpt@{SUBMITTER}" and mail.rcpts == ["tlsrpt@a.test"]
            msg, report, filename = parse_mail(mail.data)
            assert report == expected.report
            assert filename == expected.filename
            assert filename.startswith(f"{SUBMITTER}!a.test!{START}!{END - 1}!")
            assert msg["TLS-Report-Domain"] == "a.test"
            assert msg["TLS-Report-Submitter"] == SUBMITTER == expected.submitter
            assert report["policies"][0]["summary"] == {
                "total-successful-session-count": 2, "total-failure-session-count": 1}
            # by HTTPS: the gzipped report, as such
            [post] = lab.posts
            assert post.path == "/tlsrpt"
            assert post.headers["content-type"] == CONTENT_TYPE
            assert json.loads(gzip.decompress(post.body)) == expected.report
            assert (counted(g.reports, "mailto", "sent"), counted(g.reports, "https", "sent"),
                    counted(g.reports, "mailto", "failed")) == (2, 1, 0)
            # remembered: a second run sends nothing again, and looks nothing up again
            noted = {(d.domain, d.rua): (d.done, d.attempts, d.next_try)
                     for d in await g.store.deliveries(DAY)}
            assert noted == {("a.test", "mailto:tlsrpt@a.test"): (True, 1, 0.0),
                             ("a.test", lab.url()): (True, 1, 0.0),
                             ("b.test", LOOKUP): (False, 1, NEVER),
                             ("c.test", "mailto:reports@c.test"): (True, 1, 0.0)}
            again = await g.reporter.send_day(DAY)
            assert again.lines == [] and again.wake == NEVER
            forced = await g.reporter.send_day(DAY, domain="a.test", force=True)
            assert [line.result for line in forced.lines] == [DELIVERED, DELIVERED]
            assert len(lab.smtp.mails) == 2 and len(lab.posts) == 1
            unknown = await g.reporter.send_day(DAY, domain="z.test", force=True)
            assert [line.result for line in unknown.lines] == [NOTHING]
        finally:
            await g.close()

    run(go())
    sent = named(events, "tlsrpt report sent")
    assert {(e["domain"], e["rua"]) for e in sent} == {
        ("a.test", "mailto:tlsrpt@a.test"), ("a.test", lab.url()),
        ("c.test", "mailto:reports@c.test")}


def test_two_senders_on_one_store_deliver_each_report_once(
        lab: Lab, events: list[logging.LogRecord], monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's round and ``tlsrpt send --now`` on the same store at once: each reads
    which deliveries are done before it delivers, so without a lock both would deliver.
    With it the second waits, then finds them delivered; held past SEND_WAIT, it gives up
    and says so, sending nothing."""
    lab.publish("a.test", f"v=TLSRPTv1; rua=mailto:tlsrpt@a.test,{lab.url()}")

    async def go() -> None:
        g = await gate(lab, {"a.test": 2})
        other_store = Store(g.reporter.config, g.clock, path=g.store.path)
        await other_store.open()
        other = Reporter(g.reporter.config, other_store, lambda: g.resolver, clock=g.clock)
        try:
            first, second = await asyncio.gather(g.reporter.send_day(DAY, force=True),
                                                 other.send_day(DAY, force=True))
            results = sorted([line.result for line in first.lines]
                             + [line.result for line in second.lines])
            assert results == sorted([SENT, SENT, DELIVERED, DELIVERED]), (first, second)
            assert len(lab.smtp.mails) == 1 and len(lab.posts) == 1
            # Held by someone else past the wait: nothing done, said, retried later.
            monkeypatch.setattr(tlsrptsend, "SEND_WAIT", 0.3)
            assert g.store.path is not None
            held = os.open(g.store.path, os.O_RDONLY)
            try:
                fcntl.flock(held, fcntl.LOCK_EX)
                busy = await other.send_day(DAY, force=True)
            finally:
                os.close(held)
            assert busy.busy and busy.lines == [] and busy.wake == g.clock() + TICK
            assert len(lab.smtp.mails) == 1 and len(lab.posts) == 1
        finally:
            await other.close()
            await other_store.close()
            await g.close()

    run(go())
    [waited] = named(events, "tlsrpt send waits")
    assert waited["day"] == DAY, waited


def test_failed_delivery_is_retried_with_backoff(lab: Lab,
                                                 events: list[logging.LogRecord]) -> None:
    lab.publish("a.test", f"v=TLSRPTv1; rua=mailto:tlsrpt@a.test,{lab.url()}")
    lab.smtp.refuse["RCPT"] = b"451 4.3.0 try again later\r\n"
    lab.status = 503

    async def go() -> None:
        g = await gate(lab, {"a.test": 2})
        try:
            first = g.clock.now
            summary = await g.reporter.send_day(DAY)
            assert [(line.result, line.attempts) for line in summary.lines] == [
                (FAILED, 1), (FAILED, 1)]
            https, mail = summary.lines
            assert "HTTP 503" in https.detail
            assert "refused RCPT: 451 4.3.0 try again later" in mail.detail
            assert https.next_try == mail.next_try == summary.wake == first + 300
            assert (counted(g.reports, "mailto", "failed"),
                    counted(g.reports, "https", "failed")) == (1, 1)
            # not due yet: the schedule leaves them alone
            g.clock.now = first + 299
            waiting = await g.reporter.send_day(DAY)
            assert waiting.lines == [] and waiting.wake == first + 300
            assert await g.reporter.run_once() == first + 300
            # due: tried again, fails again, the next step of the backoff
            g.clock.now = first + 300
            second = await g.reporter.send_day(DAY)
            assert [(line.result, line.attempts, line.next_try) for line in second.lines] == [
                (FAILED, 2, first + 300 + 1800)] * 2
            # the relay and the server are back: delivered at the next try
            del lab.smtp.refuse["RCPT"]
            lab.status = 201
            g.clock.now = first + 300 + 1800
            third = await g.reporter.run_once()
            assert third == START + 2 * 86400 + 900  # tomorrow's round, nothing pending
            noted = {d.rua: (d.done, d.attempts, d.error) for d in
                     await g.store.deliveries(DAY)}
            assert noted == {"mailto:tlsrpt@a.test": (True, 3, ""), lab.url(): (True, 3, "")}
            assert len(lab.smtp.mails) == 1 and len(lab.posts) == 3
            assert (counted(g.reports, "mailto", "sent"), counted(g.reports, "mailto", "failed"),
                    counted(g.reports, "https", "sent"), counted(g.reports, "https", "failed")
                    ) == (1, 2, 1, 2)
        finally:
            await g.close()

    run(go())
    failed = named(events, "tlsrpt delivery failed")
    assert len(failed) == 4 and all(e["level"] == logging.WARNING for e in failed)
    assert {e["rua"] for e in failed} == {"mailto:tlsrpt@a.test", lab.url()}
    assert all(e["domain"] == "a.test" and e["error"] for e in failed)


def test_giving_up_and_forcing(lab: Lab) -> None:
    lab.publish("a.test", "v=TLSRPTv1; rua=mailto:tlsrpt@a.test")

    async def go() -> None:
        # the relay is down (connection refused) all along
        g = await gate(lab, {"a.test": 1}, relay_port=lab.closed_port)
        try:
            for n, delay in enumerate((*RETRY_DELAYS, None), start=1):
                summary = await g.reporter.send_day(DAY)
                [line] = summary.lines
                assert (line.result, line.attempts) == (FAILED, n)
                assert "connect" in line.detail
                if delay is None:
                    assert line.next_try == NEVER
                else:
                    assert line.next_try == g.clock.now + delay
                    g.clock.now = line.next_try
            # given up: the schedule tries no more, the operator still can
            assert (await g.reporter.send_day(DAY)).lines == []
            [line] = (await g.reporter.send_day(DAY, dry_run=True)).lines
            assert (line.result, line.attempts) == (GAVE_UP, 6)
            g.reporter.config = lab.config()  # the relay is back (a reload)
            forced = await g.reporter.send_day(DAY, force=True)
            assert [(line.result, line.attempts) for line in forced.lines] == [(SENT, 7)]
            assert len(lab.smtp.mails) == 1
        finally:
            await g.close()

    run(go())


def test_states_and_forcing(lab: Lab) -> None:
    """A dry run says what the schedule would do and why; force tries what is not delivered
    whatever its backoff."""
    lab.publish("a.test", f"v=TLSRPTv1; rua=mailto:tlsrpt@a.test,{lab.url()}")
    lab.status = 500

    async def go() -> None:
        g = await gate(lab, {"a.test": 1})
        try:
            await g.reporter.send_day(DAY)  # https fails, mail is delivered
            dry = await g.reporter.send_day(DAY, dry_run=True)
            assert [(line.rua, line.result) for line in dry.lines] == [
                (lab.url(), WAITING), ("mailto:tlsrpt@a.test", DELIVERED)]
            assert "HTTP 500" in dry.lines[0].detail
            assert dry.lines[0].next_try == g.clock.now + 300
            dry = await g.reporter.send_day(DAY, dry_run=True, force=True)
            assert [line.result for line in dry.lines] == [PENDING, DELIVERED]
            assert len(lab.posts) == 1  # a dry run sends nothing
            # a 3xx is a failure, never followed
            lab.status, lab.location = 302, "https://reports.x.test/elsewhere"
            g.clock.now += 10
            forced = await g.reporter.send_day(DAY, force=True)
            [https, mail] = forced.lines
            assert (https.result, https.attempts, mail.result) == (FAILED, 2, DELIVERED)
            assert "302" in https.detail and "not followed" in https.detail
            assert [p.path for p in lab.posts] == ["/tlsrpt", "/tlsrpt"]
            assert (await g.reporter.send_day(DAY)).wake == https.next_try
        finally:
            await g.close()

    run(go())


def test_lookup_failure_is_retried(lab: Lab, events: list[logging.LogRecord]) -> None:
    lab.servfail.add("a.test")

    async def go() -> None:
        g = await gate(lab, {"a.test": 1})
        try:
            first = g.clock.now
            summary = await g.reporter.send_day(DAY)
            [line] = summary.lines
            assert (line.rua, line.result, line.next_try) == ("", LOOKUP_FAILED, first + 300)
            assert "SERVFAIL" in line.detail
            assert (await g.reporter.send_day(DAY)).lines == []  # not due
            lab.servfail.clear()
            lab.publish("a.test", "v=TLSRPTv1; rua=mailto:tlsrpt@a.test")
            g.clock.now = first + 300
            g.resolver.flush()
            summary = await g.reporter.send_day(DAY)
            assert [(x.rua, x.result) for x in summary.lines] == [
                ("mailto:tlsrpt@a.test", SENT)]
            # the lookup's note no longer holds the day back
            assert (await g.reporter.send_day(DAY)).lines == []
        finally:
            await g.close()

    run(go())
    [failed] = named(events, "tlsrpt record lookup failed")
    assert failed["level"] == logging.WARNING and failed["domain"] == "a.test"


def test_schedule(lab: Lab, events: list[logging.LogRecord]) -> None:
    lab.publish("a.test", "v=TLSRPTv1; rua=mailto:tlsrpt@a.test")

    async def go() -> None:
        g = await gate(lab, {"a.test": 1}, send_after=3600.0)
        try:
            # 00:30 UTC, send_after 1 h: not yet; the next round at 01:00
            assert await g.reporter.run_once() == END + 3600
            assert lab.smtp.mails == []
            g.clock.now = END + 3600
            assert await g.reporter.run_once() == END + 86400 + 3600
            assert len(lab.smtp.mails) == 1
            # today's outcomes wait for the day to end
            g.store.record(outcome("a.test"))
            assert await g.reporter.run_once() == END + 86400 + 3600
            assert len(lab.smtp.mails) == 1
            # a day GIVE_UP_AFTER past its end is left alone
            g.clock.now = END + 86400 + GIVE_UP_AFTER
            assert await g.reporter.run_once() == END + 3 * 86400 + 3600
            assert len(lab.smtp.mails) == 1
            [line] = named(events, "tlsrpt round")
            assert (line["day"], line["sent"], line["failed"], line["next_try"]) == (
                DAY, 1, 0, "-")
            # run_forever: a task that sleeps and never raises; cancelled on close
            task = asyncio.get_running_loop().create_task(g.reporter.run_forever(),
                                                          name="tlsrpt test schedule")
            await asyncio.sleep(0.05)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await g.close()

    run(go())


def test_no_relay_configured(lab: Lab) -> None:
    lab.publish("a.test", "v=TLSRPTv1; rua=mailto:tlsrpt@a.test")

    async def go() -> None:
        g = await gate(lab, {"a.test": 1}, relay=None)
        try:
            [line] = (await g.reporter.send_day(DAY)).lines
            assert line.result == FAILED and "tlsrpt.relay is not set" in line.detail
        finally:
            await g.close()

    run(go())


# -- smtpgate tlsrpt send --------------------------------------------------------------------

def seed(lab: Lab, path: Path, domains: dict[str, int]) -> None:
    async def go() -> None:
        clock = Clock(START + 3600)
        store = Store(lab.config(), clock, path=str(path))
        await store.open()
        for domain, n in domains.items():
            for _ in range(n):
                store.record(outcome(domain))
        await store.close()

    run(go())


def test_send_command(lab: Lab) -> None:
    lab.publish("a.test", f"v=TLSRPTv1; rua=mailto:tlsrpt@a.test,{lab.url()}")
    path = lab.tmp / "store.sqlite3"
    seed(lab, path, {"a.test": 2, "b.test": 1})
    config = Config(listeners=(), dns=lab.dns_config(), tlsrpt=lab.config())
    clock = Clock(END + 1800)

    def cli(**kw: Any) -> tuple[int, str, str]:
        lines: list[str] = []
        err = io.StringIO()
        options: dict[str, Any] = {"store": str(path), "clock": clock, **kw}
        code = send(config, lines.append, err=err, **options)
        return code, "".join(f"{line}\n" for line in lines), err.getvalue()

    # without --now: what would be sent, nothing sent or noted
    code, out, _ = cli()
    assert code == 0 and lab.smtp.mails == [] and lab.posts == []
    assert out.splitlines() == [f"{DAY} a.test {lab.url()}: would-send",
                                f"{DAY} a.test mailto:tlsrpt@a.test: would-send",
                                f"{DAY} b.test: no-record: no TLSRPT record at "
                                f"_smtp._tls.b.test"]
    # --now: sent (yesterday by default)
    lab.status = 503
    code, out, _ = cli(now=True)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"{DAY} a.test {lab.url()}: failed: HTTP 503")
    assert "(attempt 1); next try" in lines[0]
    assert lines[1].startswith(f"{DAY} a.test mailto:tlsrpt@a.test: sent: 250")
    lab.status = 200
    code, out, _ = cli(now=True, domain="A.Test.")
    assert code == 0
    assert out.splitlines()[0] == f"{DAY} a.test {lab.url()}: sent: HTTP 200 (attempt 2)"
    assert out.splitlines()[1] == (f"{DAY} a.test mailto:tlsrpt@a.test: delivered-before "
                                   f"(attempt 1)")
    assert len(lab.smtp.mails) == 1 and len(lab.posts) == 2
    # today: allowed, partial
    code, _, err = cli(now=True, day="2026-12-07")
    assert code == 0 and "partial" in err
    # bad input
    assert cli(day="2026-12-32")[0] == 2
    assert cli(day="2026-12-08")[0] == 2  # the future
    assert cli(domain="not a domain")[0] == 2
    assert cli(now=True, domain="z.test")[0] == 2  # nothing recorded for it
    assert cli(store=str(lab.tmp / "none.sqlite3"))[0] == 2
    off = Config(listeners=(), dns=lab.dns_config(), tlsrpt=TlsRpt())
    code = send(off, print, err=(err_io := io.StringIO()), now=True)
    assert code == 2 and "not enabled" in err_io.getvalue()

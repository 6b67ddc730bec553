"""TLS-RPT (RFC 8460), sending: once per UTC day, to every policy domain with counted
sessions that publishes a TLSRPT record, the day's report to each of its ``rua`` URIs.

The pure half: :func:`parse_record` (the ``_smtp._tls.DOMAIN`` TXT records → the usable rua
URIs, RFC 8460 3), :func:`message` (the report mail, RFC 8460 5.3), :func:`next_try` (the
retry schedule, RFC 8460 5.5).  The shell: :class:`Reporter`, run by the gateway as one task
of its own (never on a session's path), and :func:`send` for ``smtpgate tlsrpt send``.

Delivery.  ``mailto:`` reports are handed by SMTP to ``tlsrpt.relay`` (the local MTA, which
queues, DKIM-signs as RFC 8460 5.3 requires, and delivers them); ``https:`` reports are
POSTed as ``application/tlsrpt+gzip`` (5.4), 2xx is delivered, redirects are not followed.
The SMTP client is a small asyncio one (:func:`smtp_send`: EHLO, MAIL, RCPT, DATA, QUIT on
the loop's socket calls, replies framed by gateway.smtp): it runs on the gateway's loop with
its timeouts and cancellation, takes no thread per delivery (smtplib would, in
``asyncio.to_thread``, and a thread of the pool is not where the loop's sockets live: a lab
namespace, a test's loop) and needs nothing smtplib adds for a relay on the same host (AUTH,
STARTTLS).  HTTPS goes through aiohttp with the gateway's Resolver, as MTA-STS does
(gateway.stsfetch.GatewayResolver).

What was delivered is remembered in the store (gateway.tlsrptstore, ``note_delivery``) per
day, domain and rua: a delivered report is never sent again, a failed one is tried again per
:func:`next_try`, and gives up after RETRY_DELAYS are spent or GIVE_UP_AFTER past its day.
The rua ``""`` (LOOKUP) notes the record lookup itself: no TLSRPT record (never tried again
that day: ``next_try`` infinite), or a DNS failure (tried again per :func:`next_try`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import email.utils
import fcntl
import logging
import math
import os
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, Protocol, TextIO, cast

import aiohttp

from . import __version__
from .answers import Answer, Status
from .dns import Resolver
from .logs import event
from .smtp import RemoteProtocolError, Reply, ReplyReader
from .stsfetch import GatewayResolver, normalize
from .tasks import TaskGroup
from .tlsrpt import DAY, day_start, gzipped, parse_day, shift_day, utc_day
from .tlsrptstore import Delivery, Prepared, Store, command_store, prepare

if TYPE_CHECKING:
    from .config import Config, TlsRpt

log = logging.getLogger("smtpgate")

MAILTO, HTTPS = "mailto", "https"
CONTENT_TYPE = "application/tlsrpt+gzip"  # RFC 8460 5.3, 5.4: the report is gzipped
RECORD_PREFIX = "v=TLSRPTv1"
MAX_RUA = 5  # rua URIs used per record: each is a delivery a day, a record is anyone's
MAX_URI = 1024
LOOKUP = ""  # the rua under which the record lookup of a domain is noted
# RFC 8460 5.5: redelivery for up to a day after the first attempt, backing off
# exponentially.  After the 1st..5th failed attempt; the 6th comes 20 h 35 min after the
# 1st, a 7th would be past 24 h: given up.  The first steps are short (a relay restarting, a
# receiver's blip), the last ones span a receiver's outage of hours.
RETRY_DELAYS = (300.0, 1800.0, 7200.0, 21600.0, 43200.0)
GIVE_UP_AFTER = 2 * DAY  # past the end of its day a report is stale: the next one is out
NEVER = math.inf  # next_try of a delivery given up (or a domain without a record)
TICK = 300.0  # the schedule sleeps at most this long (a clock step, a stalled wake)
PARALLEL = 4  # domains reported on at once
# How long a send waits for another's on the same store (the gateway's round and `tlsrpt
# send --now`): one round's deliveries, each bounded by its own timeouts.
SEND_WAIT = 120.0
SEND_POLL = 0.1
MAX_REPLY = 512  # bytes of a refusal kept for the log


# -- the pure core ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Record:
    """What ``_smtp._tls.DOMAIN`` said: the usable rua URIs, or why there are none."""

    uris: tuple[str, ...] = ()
    error: str = ""  # "" with no URIs: no record published
    dns_failed: bool = False  # the lookup failed: try again later


def parse_record(texts: Sequence[str]) -> list[str]:
    """The rua URIs to deliver to from the TXT records at ``_smtp._tls.DOMAIN`` (each
    record's strings joined without spaces), RFC 8460 3: records not beginning
    ``v=TLSRPTv1;`` are discarded; none, or more than one left: no reporting ([]); a record
    that breaks the syntax or has no ``rua``: []; of its URIs only ``mailto:`` (one address)
    and ``https:`` ones are kept, duplicates dropped, at most MAX_RUA."""
    return list(read_record(texts).uris)


def read_record(texts: Sequence[str]) -> Record:
    """:func:`parse_record` with the reason when there is nothing to deliver to."""
    ours = [t for t in texts if _versioned(t)]
    if not ours:
        return Record()
    if len(ours) > 1:
        return Record(error=f"{len(ours)} TLSRPT records (RFC 8460 3: none applies)")
    fields = _fields(ours[0])
    if fields is None:
        return Record(error=f"malformed TLSRPT record {_clip(ours[0])!r}")
    raw = [u for key, value in fields if key == "rua" for u in value.split(",")]
    if not raw:
        return Record(error="TLSRPT record without rua")
    uris: list[str] = []
    for uri in (u.strip(" \t") for u in raw):
        if uri and _usable(uri) and uri not in uris:
            uris.append(uri)
    if not uris:
        return Record(error=f"no usable rua (mailto: or https:) in {_clip(ours[0])!r}")
    return Record(tuple(uris[:MAX_RUA]))


def _versioned(text: str) -> bool:
    # "v=TLSRPTv1" then the field delimiter (*WSP ";"): v=TLSRPTv10 is another version.
    rest = text[len(RECORD_PREFIX):] if text.startswith(RECORD_PREFIX) else None
    return rest is not None and rest.lstrip(" \t").startswith(";")


def _fields(text: str) -> list[tuple[str, str]] | None:
    """The record's key=value fields after the version (unknown keys kept, for the caller
    to ignore: RFC 8460 3 extensions), or None when it breaks the ABNF."""
    if not text.isascii() or any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in text):
        return None
    parts = [p.strip(" \t") for p in text.split(";")]
    if parts and parts[-1] == "":
        parts.pop()  # a trailing delimiter is allowed
    found = []
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if (not eq or not key or len(key) > 32 or not key[0].isalnum()
                or not all(c.isalnum() or c in "_-." for c in key) or not value):
            return None
        found.append((key, value))
    return found


def _usable(uri: str) -> bool:
    if len(uri) > MAX_URI:
        return False
    scheme = uri.partition(":")[0].lower()
    if scheme == MAILTO:
        return mailto_address(uri) is not None
    if scheme == HTTPS:
        try:
            parts = urllib.parse.urlsplit(uri)
            _ = parts.port  # raises ValueError for a bad one
        except ValueError:
            return False
        return bool(parts.hostname) and not parts.username and " " not in uri
    return False


def method(uri: str) -> str:
    """MAILTO or HTTPS: how ``uri`` (one :func:`parse_record` kept) is delivered to."""
    return MAILTO if uri[:7].lower() == "mailto:" else HTTPS


def mailto_address(uri: str) -> str | None:
    """The one address of a ``mailto:`` URI (percent-decoded, header fields dropped), or
    None when it names none or several, or one SMTP cannot carry without SMTPUTF8."""
    if uri[:7].lower() != "mailto:":
        return None
    address = urllib.parse.unquote(uri[7:].split("?", 1)[0]).strip()
    local, at, domain = address.rpartition("@")
    if (not at or not local or not domain or not address.isascii() or len(address) > 254
            or any(c in address for c in ' \t,;<>()[]\\"') or any(ord(c) < 0x21 for c in address)
            or normalize(domain) is None):
        return None
    return address


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def next_try(attempts: int, now: float, *, day_end: float | None = None) -> float:
    """When a delivery that has failed ``attempts`` times, the last at ``now``, is tried
    again: RETRY_DELAYS, then NEVER; NEVER too when that would be GIVE_UP_AFTER past
    ``day_end`` (the end of the report's day, when given)."""
    if attempts < 1 or attempts > len(RETRY_DELAYS):
        return NEVER
    when = now + RETRY_DELAYS[attempts - 1]
    if day_end is not None and when >= day_end + GIVE_UP_AFTER:
        return NEVER
    return when


# The message's policy: CRLF, and header lines kept as written where one is given raw
# (Content-Disposition below) rather than refolded into RFC 2231 continuations, which
# report parsers that look for filename="..." miss.
_POLICY = email.policy.SMTP.clone(refold_source="none")


def message(report_gz: bytes, *, domain: str, submitter: str, sender: str, rcpt: str,
            report_id: str, filename: str, day: str, date: float) -> bytes:
    """The report mail (RFC 8460 5.3), as sent: ``multipart/report;
    report-type="tlsrpt"`` with a text/plain part for people and the gzipped report as
    ``application/tlsrpt+gzip`` (base64, an attachment named ``filename``); the headers
    TLS-Report-Domain and TLS-Report-Submitter; Subject ``Report Domain: D Submitter: S
    Report-ID: <id>``; Date ``date`` (epoch seconds); a Message-ID of the submitter's."""
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = sender
    msg["To"] = rcpt
    msg["Date"] = email.utils.format_datetime(datetime.fromtimestamp(date, UTC))
    msg["Message-ID"] = email.utils.make_msgid(domain=submitter)  # no getfqdn() (DNS)
    # The Report-ID of the subject is a msg-id (RFC 5322): id-left "@" id-right.
    rid = report_id.strip("<>")
    rid = rid if "@" in rid else f"{rid}@{submitter}"
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{rid}>"
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = 'multipart/report; report-type="tlsrpt"'
    text = EmailMessage(policy=email.policy.SMTP)
    text.set_content(f"This is an aggregate TLS report (RFC 8460) from {submitter}\n"
                     f"for {domain}, the UTC day {day}.\n", charset="us-ascii", cte="7bit")
    report = EmailMessage(policy=email.policy.SMTP)
    report.set_content(report_gz, maintype="application", subtype="tlsrpt+gzip")
    report.set_raw("Content-Disposition", f'attachment;\r\n filename="{filename}"')
    for part in (text, report):
        del part["MIME-Version"]  # only the message has one
    msg.set_payload([text, report])
    return msg.as_bytes(policy=_POLICY)


def day_end(day: str) -> float:
    """The end of the UTC ``day`` (the next 00:00) in epoch seconds."""
    return float(day_start(day) + DAY)


# -- delivery: SMTP and HTTPS ----------------------------------------------------------------

class DeliveryError(Exception):
    """One delivery attempt failed; ``str()`` says why (for the log and the store)."""


async def smtp_send(host: str, port: int, *, helo: str, sender: str, rcpt: str,
                    data: bytes, budget: float) -> str:
    """Hands ``data`` (a message, CRLF line ends) to the SMTP server at ``host:port``:
    EHLO (HELO if refused), MAIL FROM, RCPT TO, DATA, QUIT; the whole exchange within
    ``budget`` seconds.  Returns the server's reply to the data; raises DeliveryError."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    sock.setblocking(False)
    replies = ReplyReader()
    stage = "connect"

    async def reply() -> Reply:
        while (found := replies.next()) is None:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise DeliveryError(f"{where} closed the connection ({stage})")
            replies.feed(chunk)
        return found

    async def command(line: str, want: tuple[int, ...]) -> Reply:
        nonlocal stage
        stage = line.split(":", 1)[0].split(" ", 1)[0]
        await loop.sock_sendall(sock, line.encode("ascii") + b"\r\n")
        got = await reply()
        if got.code not in want:
            raise DeliveryError(f"{where} refused {stage}: {got.code} "
                                f"{_clip(got.text, MAX_REPLY)}")
        return got

    try:
        async with asyncio.timeout(budget):
            await loop.sock_connect(sock, (host, port))
            stage = "greeting"
            greeting = await reply()
            if greeting.code != 220:
                raise DeliveryError(f"{where} greeted {greeting.code} "
                                    f"{_clip(greeting.text, MAX_REPLY)}")
            try:
                await command(f"EHLO {helo}", (250,))
            except DeliveryError:
                await command(f"HELO {helo}", (250,))
            await command(f"MAIL FROM:<{sender}>", (250,))
            await command(f"RCPT TO:<{rcpt}>", (250, 251))
            await command("DATA", (354,))
            stage = "message"
            await loop.sock_sendall(sock, _dot_stuffed(data))
            done = await reply()
            if done.code != 250:
                raise DeliveryError(f"{where} refused the message: {done.code} "
                                    f"{_clip(done.text, MAX_REPLY)}")
            with contextlib.suppress(DeliveryError, OSError, RemoteProtocolError):
                await command("QUIT", (221,))  # the message is the relay's already
            return f"{done.code} {_clip(done.text, MAX_REPLY)}"
    except TimeoutError:
        raise DeliveryError(f"{where}: no answer within {budget:g}s ({stage})") from None
    except RemoteProtocolError as exc:
        raise DeliveryError(f"{where}: {exc} ({stage})") from None
    except OSError as exc:
        raise DeliveryError(f"{where}: {_describe(exc)} ({stage})") from None
    finally:
        sock.close()


def _dot_stuffed(data: bytes) -> bytes:
    """The message as the DATA stream: a leading dot doubled (RFC 5321 4.5.2), CRLF at the
    end, then the terminating dot line."""
    body = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\r\n.", b"\r\n..")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


async def https_post(session: aiohttp.ClientSession, url: str, body: bytes,
                     budget: float) -> str:
    """POSTs the gzipped report to ``url`` (RFC 8460 5.4); returns the status line on a
    2xx, raises DeliveryError otherwise (a redirect is not followed)."""
    try:
        async with asyncio.timeout(budget), session.post(
                url, data=body, allow_redirects=False,
                headers={"Content-Type": CONTENT_TYPE}) as response:
            status = response.status
            if 300 <= status < 400:
                raise DeliveryError(f"HTTP {status} redirect to "
                                    f"{_clip(response.headers.get('Location', '?'))} "
                                    f"(not followed)")
            if not 200 <= status < 300:
                raise DeliveryError(f"HTTP {status} {response.reason or ''}".rstrip())
            return f"HTTP {status}"
    except TimeoutError:
        raise DeliveryError(f"no answer within {budget:g}s") from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise DeliveryError(_describe(exc)) from None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


# -- the shell -------------------------------------------------------------------------------

class _Labelled(Protocol):
    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any: ...


class _HasReports(Protocol):
    @property
    def tlsrpt_reports(self) -> _Labelled: ...


# What a line of a Summary says.
SENT, FAILED = "sent", "failed"
NO_RECORD = "no-record"  # the domain publishes no usable TLSRPT record: nothing to send
LOOKUP_FAILED = "lookup-failed"  # DNS trouble: tried again later
DELIVERED = "delivered-before"  # sent on an earlier run: not again
WAITING = "waiting"  # failed before, its next try has not come
GAVE_UP = "gave-up"  # failed too often or too late: not tried again by the schedule
PENDING = "would-send"  # a dry run: this would be sent now
NOTHING = "nothing-recorded"  # no sessions of this domain that day


@dataclass(frozen=True, slots=True)
class Line:
    """What became of one report to one rua (or of the domain's record lookup: rua "")."""

    domain: str
    rua: str
    result: str  # one of the names above
    detail: str = ""
    attempts: int = 0
    next_try: float = NEVER  # for FAILED, LOOKUP_FAILED, WAITING

    def text(self, day: str) -> str:
        where = f"{self.domain} {self.rua}" if self.rua else self.domain
        line = f"{day} {where}: {self.result}"
        if self.detail:
            line += f": {self.detail}"
        if self.attempts:
            line += f" (attempt {self.attempts})"
        if self.result in (FAILED, LOOKUP_FAILED, WAITING):
            line += (f"; next try {_stamp(self.next_try)}" if self.next_try != NEVER
                     else "; not tried again by the schedule")
        return line


@dataclass(slots=True)
class Summary:
    """What a :meth:`Reporter.send_day` did, one Line per domain and rua."""

    day: str
    lines: list[Line] = field(default_factory=list)
    wake: float = NEVER  # the earliest next try among what is still pending
    busy: bool = False  # nothing done: another send held the store past SEND_WAIT

    @property
    def sent(self) -> int:
        return sum(1 for line in self.lines if line.result == SENT)

    @property
    def failed(self) -> int:
        return sum(1 for line in self.lines if line.result in (FAILED, LOOKUP_FAILED))


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _stamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class Reporter:
    """Sends the daily reports from ``store``'s counts (gateway.tlsrptstore.Store, opened
    read-write by the owner, who also closes it).

    ``metrics``: gateway.metrics.Metrics (its ``tlsrpt_reports`` counter is used) or that
    counter itself (``gateway.metrics.tlsrpt_reports(registry)``, for a process without
    Metrics); counted ``(method, "sent" | "failed")`` once per delivery attempt.
    ``config`` is read where used: the owner may replace it on a reload."""

    def __init__(self, config: TlsRpt, store: Store, resolver: Callable[[], Resolver],
                 metrics: _HasReports | _Labelled | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.resolver = resolver
        self.clock = clock
        self._counter: _Labelled | None = None
        if metrics is not None:
            self._counter = cast("_HasReports", metrics).tlsrpt_reports \
                if hasattr(metrics, "tlsrpt_reports") else metrics
        self._tasks = TaskGroup()
        self._http: aiohttp.ClientSession | None = None
        self._tls: ssl.SSLContext | None = None
        self._tls_for: str | None = None  # the ca_file self._tls was made from

    async def close(self) -> None:
        await self._tasks.cancel_all()
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    # -- the schedule -------------------------------------------------------------------------
    async def run_forever(self) -> None:
        """The daily schedule: SEND_AFTER (``tlsrpt.send_after``) past 00:00 UTC the days
        before that are not reported yet, and the retries as they come due.  Never raises
        (but is cancelled); sleeps at most TICK at a time."""
        while True:
            wake = self.clock() + TICK
            try:
                wake = await self.run_once()
            except Exception:  # a bug: logged, and the next round tries again
                log.exception("tlsrpt round failed")
            await asyncio.sleep(min(TICK, max(1.0, wake - self.clock())))

    async def run_once(self) -> float:
        """One round of the schedule: reports every day whose time has come (and not
        GIVE_UP_AFTER past), what is due of it.  Returns when the next round is due."""
        now = self.clock()
        today = utc_day(now)
        after = self.config.send_after
        first = day_start(today) + after
        wake = first if now < first else first + DAY  # today's send, or tomorrow's
        for day in await self.store.days():
            end = day_end(day)
            if day >= today or now >= end + GIVE_UP_AFTER:
                continue
            if now < end + after:
                wake = min(wake, end + after)
                continue
            summary = await self.send_day(day)
            wake = min(wake, summary.wake)
            if summary.lines:
                results = [line.result for line in summary.lines]
                event(log, "tlsrpt round", day=day, sent=results.count(SENT),
                      failed=summary.failed, no_record=results.count(NO_RECORD),
                      next_try=_stamp(summary.wake) if summary.wake != NEVER else "-")
        return wake

    # -- one day ------------------------------------------------------------------------------
    async def send_day(self, day: str, *, domain: str | None = None, force: bool = False,
                       dry_run: bool = False) -> Summary:
        """Reports ``day`` (YYYY-MM-DD) to every domain with counts that day (``domain``:
        that one only): the TLSRPT record looked up now, the report built once and
        delivered to each rua not delivered before.  Without ``force`` only what is due (the
        schedule's view: a failed delivery waits for its next try, one given up stays so);
        ``force`` (``smtpgate tlsrpt send --now``) tries whatever is not delivered yet.
        ``dry_run``: looks up and says what would be sent, sends and notes nothing."""
        if dry_run:
            return await self._send_day(day, domain, force, dry_run)
        async with self._sending() as mine:
            if not mine:
                event(log, "tlsrpt send waits", logging.WARNING, day=day,
                      why=f"another send on {self.store.path} for {SEND_WAIT:.0f} s")
                return Summary(day, wake=self.clock() + TICK, busy=True)
            return await self._send_day(day, domain, force, dry_run)

    @contextlib.asynccontextmanager
    async def _sending(self) -> AsyncIterator[bool]:
        """One sender at a time per store file: the gateway's schedule and ``tlsrpt send
        --now`` each read which deliveries are done, deliver the rest and note them; two at
        once would both deliver a report.  An flock(2) on the store file itself (SQLite
        locks with fcntl(2), which flock does not meet; read-only: the gateway's user and
        root can both take it), polled: a blocking flock would hold the event loop.  Yields
        whether it is ours (False: still another's after SEND_WAIT)."""
        if self.store.path is None:  # counts in memory: nobody else sees them
            yield True
            return
        fd = os.open(self.store.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            mine = _try_flock(fd)
            # Polled (another process's unlock wakes nothing here), a bounded number of times.
            for _ in range(int(SEND_WAIT / SEND_POLL)):
                if mine:
                    break
                await asyncio.sleep(SEND_POLL)
                mine = _try_flock(fd)
            yield mine
        finally:
            os.close(fd)  # the lock goes with it

    async def _send_day(self, day: str, domain: str | None, force: bool,
                        dry_run: bool) -> Summary:
        summary = Summary(day)
        domains = await self.store.domains(day)
        if domain is not None:
            if domain not in domains:
                summary.lines.append(Line(domain, "", NOTHING))
                return summary
            domains = [domain]
        noted: dict[str, list[Delivery]] = {}
        for d in await self.store.deliveries(day):
            noted.setdefault(d.domain, []).append(d)
        now = self.clock()
        todo = []
        for name in domains:
            due, wake = _due(noted.get(name, []), now)
            if due or force or dry_run:
                todo.append(name)
            else:
                summary.wake = min(summary.wake, wake)
        # A few workers over the domains, not a task each: a day may have max_domains.
        pending = iter(todo)

        async def worker() -> None:
            for name in pending:
                part = await self._guarded(day, name, noted.get(name, []), force, dry_run)
                summary.lines.extend(part.lines)
                summary.wake = min(summary.wake, part.wake)

        await asyncio.gather(*(self._tasks.spawn(worker(), name=f"tlsrpt {day} worker {i}")
                               for i in range(min(PARALLEL, len(todo)))))
        order = {name: i for i, name in enumerate(domains)}
        summary.lines.sort(key=lambda line: (order.get(line.domain, -1), line.rua))
        return summary

    async def _guarded(self, day: str, domain: str, noted: list[Delivery], force: bool,
                       dry_run: bool) -> Summary:
        try:
            return await self._domain(day, domain, noted, force, dry_run)
        except Exception as exc:  # a bug: this domain waits for the next round
            log.exception("tlsrpt report on %s for %s failed", domain, day)
            return Summary(day, [Line(domain, "", FAILED, f"internal error: "
                                      f"{_describe(exc)}", 0, self.clock() + TICK)],
                           self.clock() + TICK)

    async def _domain(self, day: str, domain: str, noted: list[Delivery], force: bool,
                      dry_run: bool) -> Summary:
        summary = Summary(day)
        end = day_end(day)
        marker = next((d for d in noted if d.rua == LOOKUP), None)
        record = await self.lookup(domain)
        now = self.clock()
        if record.dns_failed:
            attempts = (marker.attempts if marker is not None else 0) + 1
            retry = next_try(attempts, now, day_end=end)
            event(log, "tlsrpt record lookup failed", logging.WARNING, day=day,
                  domain=domain, error=record.error, attempts=attempts,
                  next_try=_stamp(retry) if retry != NEVER else "never")
            if not dry_run:
                await self.store.note_delivery(day, domain, LOOKUP, ok=False,
                                               error=record.error, attempts=attempts,
                                               next_try=retry)
            summary.lines.append(Line(domain, "", LOOKUP_FAILED, record.error, attempts,
                                      retry))
            summary.wake = retry
            return summary
        if not record.uris:
            why = record.error or f"no TLSRPT record at _smtp._tls.{domain}"
            # DEBUG: most recipient domains publish none, every day (the round's line counts).
            event(log, "tlsrpt no record", logging.DEBUG, day=day, domain=domain, reason=why)
            if not dry_run:
                await self.store.note_delivery(day, domain, LOOKUP, ok=False, error=why,
                                               attempts=1, next_try=NEVER)
            summary.lines.append(Line(domain, "", NO_RECORD, why))
            return summary
        if marker is not None and not marker.done and not dry_run:
            # The record was found after all: the lookup's note no longer holds the day.
            await self.store.note_delivery(day, domain, LOOKUP, ok=True, error="",
                                           attempts=marker.attempts, next_try=0.0)
        prepared: Prepared | None = None
        for rua in record.uris:
            before = next((d for d in noted if d.rua == rua), None)
            if before is not None and before.done:
                summary.lines.append(Line(domain, rua, DELIVERED, "", before.attempts))
                continue
            if before is not None and not force and before.next_try > now:
                kind = GAVE_UP if before.next_try == NEVER else WAITING
                summary.lines.append(Line(domain, rua, kind, before.error, before.attempts,
                                          before.next_try))
                summary.wake = min(summary.wake, before.next_try)
                continue
            if prepared is None:
                prepared = await prepare(self.store, self.config, day, domain)
                if prepared is None:
                    summary.lines.append(Line(domain, "", NOTHING))
                    return summary
            if dry_run:
                summary.lines.append(Line(domain, rua, PENDING, "",
                                          before.attempts if before else 0))
                continue
            line = await self._deliver(prepared, rua, before)
            summary.lines.append(line)
            if line.result == FAILED:
                summary.wake = min(summary.wake, line.next_try)
        return summary

    async def lookup(self, domain: str) -> Record:
        """The domain's TLSRPT record through the gateway's Resolver (within its budget)."""
        name = f"_smtp._tls.{domain}."
        resolver = self.resolver()
        try:
            async with asyncio.timeout(resolver.config.budget):
                answer = await resolver.lookup(name, "TXT")
        except TimeoutError:
            return Record(error=f"the TXT lookup of {name} took longer than "
                                f"{resolver.config.budget:g}s", dns_failed=True)
        return record_of(answer)

    async def _deliver(self, prepared: Prepared, rua: str, before: Delivery | None) -> Line:
        day, domain = prepared.day, prepared.domain
        how = method(rua)
        attempts = (before.attempts if before is not None else 0) + 1
        try:
            if how == MAILTO:
                detail = await self._mail(prepared, rua)
            else:
                detail = await self._post(prepared, rua)
        except DeliveryError as exc:
            error = str(exc)
            now = self.clock()
            retry = next_try(attempts, now, day_end=day_end(day))
            self._count(how, FAILED)
            event(log, "tlsrpt delivery failed", logging.WARNING, day=day, domain=domain,
                  rua=rua, error=error, attempts=attempts,
                  next_try=_stamp(retry) if retry != NEVER else "never")
            await self.store.note_delivery(day, domain, rua, ok=False, error=error,
                                           attempts=attempts, next_try=retry)
            return Line(domain, rua, FAILED, error, attempts, retry)
        self._count(how, SENT)
        event(log, "tlsrpt report sent", day=day, domain=domain, rua=rua, attempts=attempts,
              report_id=prepared.report_id, answer=detail)
        await self.store.note_delivery(day, domain, rua, ok=True, error="", attempts=attempts,
                                       next_try=0.0)
        return Line(domain, rua, SENT, detail, attempts)

    async def _mail(self, prepared: Prepared, rua: str) -> str:
        config = self.config
        relay = config.relay
        if relay is None:
            raise DeliveryError("tlsrpt.relay is not set: mailto: reports cannot be sent")
        rcpt = mailto_address(rua)
        assert rcpt is not None  # read_record kept only such URIs
        data = message(gzipped(prepared.report), domain=prepared.domain,
                       submitter=prepared.submitter, sender=config.sender, rcpt=rcpt,
                       report_id=prepared.report_id, filename=prepared.filename,
                       day=prepared.day, date=self.clock())
        return await smtp_send(relay.host_text, relay.port, helo=prepared.submitter or
                               "localhost", sender=config.sender, rcpt=rcpt, data=data,
                               budget=config.timeout)

    async def _post(self, prepared: Prepared, rua: str) -> str:
        session = self._session()
        if session is None:
            raise DeliveryError(f"cannot load the CA file {self.config.ca_file}")
        return await https_post(session, rua, gzipped(prepared.report), self.config.timeout)

    def _session(self) -> aiohttp.ClientSession | None:
        ca_file = self.config.ca_file
        if self._tls is None or self._tls_for != ca_file:
            try:
                tls = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError, ValueError):
                return None
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            self._tls, self._tls_for = tls, ca_file
            if self._http is not None:  # the trust anchors changed (a reload)
                old, self._http = self._http, None
                self._tasks.spawn(old.close(), name="tlsrpt https close")
        if self._http is None or self._http.closed:
            connector = aiohttp.TCPConnector(
                resolver=GatewayResolver(self.resolver), ssl=self._tls,
                use_dns_cache=False,  # the Resolver caches, for the record's TTL
                limit=PARALLEL, force_close=True)  # one POST per host a day: no keep-alive
            self._http = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False, trust_env=False,
                headers={"User-Agent": f"smtpgate/{__version__} (TLS-RPT)"})
        return self._http

    def _count(self, how: str, result: str) -> None:
        if self._counter is not None:
            self._counter.labels(how, result).inc()


def record_of(answer: Answer) -> Record:
    """A TXT answer at ``_smtp._tls.DOMAIN`` as a Record."""
    if answer.status in (Status.FAILED, Status.BOGUS):
        what = "failed DNSSEC validation" if answer.status is Status.BOGUS else \
            f"failed ({answer.rcode}{': ' + answer.detail if answer.detail else ''})"
        return Record(error=f"the TXT lookup of {answer.name} {what}", dns_failed=True)
    if not answer.exists:
        return Record()
    texts = [b"".join(r.strings).decode("utf-8", "replace")
             for r in answer.records if hasattr(r, "strings")]
    return read_record(texts)


def _due(noted: list[Delivery], now: float) -> tuple[bool, float]:
    """Whether the schedule has something to do for a domain, given what it noted that
    day; else when it has (NEVER: nothing more that day)."""
    marker = next((d for d in noted if d.rua == LOOKUP), None)
    if marker is not None and not marker.done:
        return marker.next_try <= now, marker.next_try  # no record, or DNS trouble
    pending = [d.next_try for d in noted if d.rua != LOOKUP and not d.done]
    if not [d for d in noted if d.rua != LOOKUP]:
        return True, now  # never reported on that day
    wake = min(pending, default=NEVER)
    return wake <= now, wake


# -- smtpgate tlsrpt send --------------------------------------------------------------------

def send(config: Config, out: Callable[[str], None], *, day: str | None = None,
         domain: str | None = None, now: bool = False, err: TextIO | None = None,
         store: str | None = None, clock: Callable[[], float] = time.time) -> int:
    """``smtpgate tlsrpt send``: the reports of ``day`` (YYYY-MM-DD, default yesterday UTC;
    today is allowed, a partial report) for every domain with counts, or ``domain`` only.
    With ``now`` they are sent now, whatever the schedule (a failed or given-up delivery is
    tried again, one delivered before is not); without, it only says what would be sent.
    One line per domain and rua to ``out``, problems to ``err`` (default stderr); ``store``:
    the store file instead of ``tlsrpt.store``'s.  0: all delivered (or nothing to send);
    1: some failed; 2: bad input, tlsrpt not enabled, no store file."""
    err = sys.stderr if err is None else err
    rpt = config.tlsrpt
    if not rpt.enabled:
        print("smtpgate tlsrpt send: tlsrpt is not enabled (tlsrpt.enabled: false)", file=err)
        return 2
    today = utc_day(clock())
    if day is None:
        day = shift_day(today, -1)
    elif parse_day(day) is None:
        print(f"smtpgate tlsrpt send: --day {day!r} is not a date YYYY-MM-DD", file=err)
        return 2
    if day > today:
        print(f"smtpgate tlsrpt send: --day {day} is in the future (today is {today}, UTC)",
              file=err)
        return 2
    name = None
    if domain is not None:
        name = normalize(domain)
        if name is None:
            print(f"smtpgate tlsrpt send: --domain {domain!r} is not a domain name", file=err)
            return 2
    path, why = command_store(rpt.store, store)
    if path is None:
        print(f"smtpgate tlsrpt send: no store file: {why}", file=err)
        return 2
    if not os.path.exists(path):  # not created here: the gateway makes it when it counts
        print(f"smtpgate tlsrpt send: no store file {path} (the gateway has counted nothing "
              f"there yet)", file=err)
        return 2
    if day == today:
        print(f"smtpgate tlsrpt send: {day} is not over: its report is partial", file=err)
    return asyncio.run(_send(config, out, err, path=path, day=day, domain=name, now=now,
                             clock=clock))


async def _send(config: Config, out: Callable[[str], None], err: TextIO, *, path: str,
                day: str, domain: str | None, now: bool, clock: Callable[[], float]) -> int:
    store = Store(config.tlsrpt, clock, path=path)
    resolver = Resolver(config.dns)
    await store.open()
    reporter = Reporter(config.tlsrpt, store, lambda: resolver, clock=clock)
    try:
        if store.path is None:
            print(f"smtpgate tlsrpt send: cannot use the store file {path}", file=err)
            return 2
        summary = await reporter.send_day(day, domain=domain, force=now, dry_run=not now)
        if summary.busy:
            print(f"smtpgate tlsrpt send: another send (the gateway's schedule?) has held "
                  f"{path} for {SEND_WAIT:.0f} s; nothing sent: try again", file=err)
            return 1
        for line in summary.lines:
            out(line.text(day))
        if not summary.lines:
            print(f"smtpgate tlsrpt send: no TLS outcomes recorded on {day} (UTC) in {path}",
                  file=err)
        if domain is not None and [line.result for line in summary.lines] == [NOTHING]:
            return 2
        return 1 if summary.failed else 0
    finally:
        await reporter.close()
        await store.close()
        await resolver.close()

"""MTA-STS (RFC 8461), the I/O half: finds a recipient domain's policy (the TXT record at
``_mta-sts.DOMAIN`` through the gateway's own Resolver, the policy file over HTTPS), keeps it
for its ``max_age`` in memory and in a SQLite file that survives restarts and is shared by
the workers, and refreshes the policies in use before they expire.

The decisions are pure and tested on their own: :func:`read_txt` (a TXT answer → an id or
why not), :func:`decide` (cached record + TXT → use the cache, fetch, or no policy; RFC 8461
5.1), :func:`next_check` (when the refresher looks again; RFC 8461 10.2).  :class:`Policies`
is the shell: DNS, HTTPS, the file, the refresh task.

The HTTP client is aiohttp: asyncio-native, so it runs on the gateway's uvloop without an
extra event-loop abstraction layer (httpx goes through anyio), it takes a resolver class
(the policy host's address comes from the gateway's Resolver, never from the system's), and
it is what postfix-mta-sts-resolver uses for the same job.  Its connector gets a WebPKI
context (``ssl.create_default_context``, TLS 1.2 or newer, SNI and name check for
``mta-sts.DOMAIN``); redirects are not followed, cookies not kept, proxies from the
environment not used, bodies not decompressed.

Kept: each domain's record in memory (least recently used dropped past
``mta_sts.max_policies``) and in the file (WAL, so the workers read while one writes; each
reads the file when it first meets a domain and before it fetches, so a policy one worker
fetched is not fetched again by the others).  Refreshed: a task wakes about every minute and
looks at the policies used within their max_age whose time has come: daily it re-asks the
TXT record (a new id is fetched), and past 3/4 of max_age it fetches again whatever the id,
which is what extends a policy's life (RFC 8461 10.2: a policy in use never lapses, so an
attacker who blocks the fetch when it would expire gains nothing).  Bounded: a few refreshes
at once, a few dozen per round, jittered; a failed fetch is not retried for the same id
within RETRY_AFTER, by sessions or the refresher.

Never raises for network, DNS or file trouble: :meth:`Policies.policy` returns a
:class:`Found` whose ``error`` says what went wrong, and a cache file that cannot be used is
logged and replaced by memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import sqlite3
import ssl
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import aiohttp
import dns.exception
import dns.name
from aiohttp.abc import AbstractResolver, ResolveResult

from . import __version__
from .answers import Answer, Status
from .config import MtaSts, state_file
from .dns import Resolver
from .logs import event
from .metrics import Metrics
from .sts import MAX_AGE_LIMIT, MAX_POLICY_BYTES, Policy, StsError, parse_policy, parse_txt
from .tasks import TaskGroup

log = logging.getLogger("smtpgate")
T = TypeVar("T")

# RFC 8460 4.3.2.2 failure types of policy discovery.
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"

RETRY_AFTER = 300.0  # a fetch that failed is not tried again for the same id before (3.3)
CHECK_EVERY = 86400.0  # the refresher re-checks a policy in use daily (RFC 8461 5.1, 10.2)
MIN_CHECK = 60.0  # ... and never more often than this
RENEW_AT = 0.75  # a policy in use is fetched again after this share of its max_age
REFRESH_TICK = 60.0  # the refresher wakes about this often (jittered)
REFRESH_PER_TICK = 50  # policies it looks at per wake-up, the most overdue first
REFRESH_PARALLEL = 4  # refreshes in flight at once
MAX_CONNECTIONS = 32  # HTTPS fetches in flight at once (sessions' and the refresher's)
FILE_TIMEOUT = 2.0  # SQLite waits this long for another worker's lock (busy_timeout)
FILE_NAME = "mta-sts.sqlite3"
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


@dataclass(frozen=True, slots=True)
class Found:
    domain: str  # lower case, no trailing dot (A-labels)
    policy: Policy | None  # the policy in force (mode none included), or None
    policy_id: str | None
    source: str  # "cache" (memory or file), "fetch" (just fetched), "none"
    fetched: float | None  # epoch seconds the policy was fetched
    expires: float | None  # fetched + max_age
    error: str | None  # why discovery or the last fetch failed (the policy may still hold)
    failure: str | None  # RFC 8460 type of that error, or None


# -- the pure core ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Record:
    """A fetched policy and the id it was fetched under (what the file keeps)."""

    policy: Policy
    policy_id: str
    fetched: float  # epoch seconds
    expires: float  # fetched + max_age

    def fresh(self, now: float) -> bool:
        return now < self.expires


@dataclass(frozen=True, slots=True)
class Txt:
    """What ``_mta-sts.DOMAIN`` TXT said: the policy id, or why there is none."""

    policy_id: str | None = None
    error: str | None = None  # None with no id: the domain publishes no policy
    failure: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A fetch that failed: not tried again for the same id until ``until``."""

    policy_id: str
    error: str
    failure: str
    until: float


class Step(StrEnum):
    CACHED = "cached"  # the record held is the answer
    FETCH = "fetch"
    NONE = "none"  # no policy


@dataclass(frozen=True, slots=True)
class Decision:
    step: Step
    error: str | None = None
    failure: str | None = None


def read_txt(answer: Answer) -> Txt:
    """The TXT answer at ``_mta-sts.DOMAIN`` as a policy id, or why there is none."""
    if answer.status in (Status.FAILED, Status.BOGUS):
        what = "failed DNSSEC validation" if answer.status is Status.BOGUS else \
            f"failed ({answer.rcode}{': ' + answer.detail if answer.detail else ''})"
        return Txt(error=f"the TXT lookup of {answer.name} {what}")
    if not answer.exists:
        return Txt()
    texts = [b"".join(r.strings).decode("utf-8", "replace")
             for r in answer.records if hasattr(r, "strings")]
    try:
        policy_id = parse_txt(texts)
    except StsError as exc:
        return Txt(error=f"{answer.name} TXT: {exc}", failure=POLICY_INVALID)
    return Txt(policy_id)


def decide(record: Record | None, failure: Failure | None, txt: Txt, now: float,
           renew: bool = False) -> Decision:
    """RFC 8461 5.1: what to do for a domain given the record held, the last failed fetch
    and the TXT record.  ``renew``: the record is due for a proactive refresh (10.2), so
    an unchanged id is fetched again too (a fetch is what extends its life)."""
    live = record if record is not None and record.fresh(now) else None
    held = Step.CACHED if live is not None else Step.NONE
    if txt.policy_id is None:
        # No TXT, a malformed one or DNS trouble: nothing new to fetch, and a cached policy
        # stays in force until it expires (5.1: its record's absence does not remove it).
        return Decision(held, txt.error, txt.failure)
    if live is not None and live.policy_id == txt.policy_id and not renew:
        return Decision(Step.CACHED)
    if failure is not None and failure.policy_id == txt.policy_id and now < failure.until:
        return Decision(held, failure.error, failure.failure)  # backing off (3.3)
    return Decision(Step.FETCH)


def renew_point(record: Record) -> float:
    """When a policy in use is fetched again, id unchanged or not."""
    return record.fetched + RENEW_AT * (record.expires - record.fetched)


def next_check(record: Record, now: float, jitter: float) -> float:
    """When the refresher looks at ``record`` again: daily for a changed id, or at its renew
    point when that comes first, never within MIN_CHECK; ``jitter`` (0.9 to 1.0) spreads
    the policies fetched together over time."""
    wait = min(CHECK_EVERY, max(renew_point(record) - now, MIN_CHECK))
    return now + wait * jitter


def normalize(domain: str) -> str | None:
    """The domain as A-labels, lower case, no trailing dot; None if it is no host name."""
    name = domain.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = dns.name.from_text(name).to_text(omit_final_dot=True).lower()
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return None
    labels = name.split(".")
    if (len(labels) < 2 or len(name) > 240 or not set(name) <= _NAME_CHARS
            or any(not label or len(label) > 63 for label in labels)):
        return None
    return name


# -- fetching --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Fetched:
    """One HTTPS fetch: the policy, or the metric result and why not."""

    policy: Policy | None
    result: str  # one of metrics.STS_FETCH_RESULTS
    error: str | None = None
    failure: str | None = None


class GatewayResolver(AbstractResolver):
    """aiohttp's resolver: A and AAAA through the gateway's own Resolver (cached, with its
    time budget), never the system's (a lab namespace shares the host's resolv.conf)."""

    def __init__(self, resolver: Callable[[], Resolver]) -> None:
        self._resolver = resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        types = {socket.AF_INET: ("A",), socket.AF_INET6: ("AAAA",)}.get(family, ("A", "AAAA"))
        resolver = self._resolver()
        answers = await asyncio.gather(*(resolver.lookup(host + ".", t) for t in types))
        found: list[ResolveResult] = []
        trouble = []
        for answer in answers:
            if answer.status in (Status.FAILED, Status.BOGUS):
                trouble.append(f"{answer.rdtype} {answer.status} {answer.detail}".strip())
                continue
            fam = socket.AF_INET if answer.rdtype == "A" else socket.AF_INET6
            found.extend({"hostname": host, "host": r.address, "port": port, "family": fam,
                          "proto": 0, "flags": socket.AI_NUMERICHOST}
                         for r in answer.records if hasattr(r, "address"))
        if not found:
            raise OSError(f"no address for {host}" + (f" ({'; '.join(trouble)})"
                                                      if trouble else ""))
        return found

    async def close(self) -> None:
        pass  # the gateway's Resolver is not ours to close


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


async def fetch_policy(session: aiohttp.ClientSession, domain: str, port: int,
                       budget: float) -> Fetched:
    """GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt (RFC 8461 3.3): 200 only, no
    redirect, text/plain, at most MAX_POLICY_BYTES, all within ``budget`` seconds."""
    host = f"mta-sts.{domain}"
    url = f"https://{host}{'' if port == 443 else f':{port}'}/.well-known/mta-sts.txt"
    try:
        async with asyncio.timeout(budget), session.get(
                url, allow_redirects=False,
                headers={"Accept-Encoding": "identity"}) as response:
            if 300 <= response.status < 400:
                return Fetched(None, "redirect", f"{url}: HTTP {response.status} redirect "
                               f"(not followed)", FETCH_ERROR)
            if response.status != 200:
                return Fetched(None, "http_status", f"{url}: HTTP {response.status}",
                               FETCH_ERROR)
            if response.content_type != "text/plain":
                return Fetched(None, "content_type", f"{url}: Content-Type "
                               f"{response.headers.get('Content-Type', '(none)')!r}, not "
                               f"text/plain", FETCH_ERROR)
            too_large = Fetched(None, "too_large", f"{url}: larger than {MAX_POLICY_BYTES} "
                                f"bytes", FETCH_ERROR)
            if (response.content_length or 0) > MAX_POLICY_BYTES:
                return too_large
            body = b""
            while len(body) <= MAX_POLICY_BYTES:
                chunk = await response.content.read(MAX_POLICY_BYTES + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            if len(body) > MAX_POLICY_BYTES:
                return too_large
    except aiohttp.ClientConnectorCertificateError as exc:
        return Fetched(None, "tls", f"{url}: {_describe(exc.certificate_error)}",
                       WEBPKI_INVALID)
    except aiohttp.ClientSSLError as exc:
        return Fetched(None, "tls", f"{url}: TLS: {_describe(exc)}", FETCH_ERROR)
    except TimeoutError:
        return Fetched(None, "timeout", f"{url}: no policy within {budget:g}s", FETCH_ERROR)
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return Fetched(None, "network", f"{url}: {_describe(exc)}", FETCH_ERROR)
    try:
        return Fetched(parse_policy(body), "ok")
    except StsError as exc:
        return Fetched(None, "invalid", f"{url}: {exc}", POLICY_INVALID)


# -- the cache file --------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policies (
    domain TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    policy TEXT NOT NULL,
    fetched REAL NOT NULL,
    expires REAL NOT NULL,
    used REAL NOT NULL,
    error TEXT
)"""


@dataclass(frozen=True, slots=True)
class Row:
    domain: str
    record: Record
    used: float


class CacheFile:
    """The SQLite file, one connection owned by one thread of its own.

    Every statement runs on that thread, never on the event loop: the file is shared with
    the other workers (WAL), so a write may wait up to FILE_TIMEOUT for their lock, and a
    commit that checkpoints the WAL syncs the disk; either would stall every session of
    this process.  One thread, not asyncio.to_thread's pool: a sqlite3 connection belongs
    to the thread that made it, and one thread also keeps the statements in order.
    Statements touch one row (or one batch); reads happen on open and on a memory miss."""

    def __init__(self, path: str, max_rows: int, read_only: bool = False) -> None:
        self.path = path
        self.max_rows = max_rows
        self.read_only = read_only  # reads what the gateway wrote, writes nothing
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mta-sts-file")
        self._conn: sqlite3.Connection | None = None
        self.on_error: Callable[[CacheFile, BaseException], None] | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _submit(self, fn: Callable[..., object], *args: Any) -> None:
        """A write, queued behind the others without waiting for it (a session never waits
        for the disk); a failure is passed to ``on_error`` on the event loop."""
        if self.read_only:
            return
        loop = asyncio.get_running_loop()

        def done(job: Future[object]) -> None:
            exc = None if job.cancelled() else job.exception()
            if exc is not None and self.on_error is not None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
                    loop.call_soon_threadsafe(self.on_error, self, exc)

        self._pool.submit(fn, *args).add_done_callback(done)

    async def open(self, now: float) -> list[Row]:
        return await self._run(self._open, now)

    async def get(self, domain: str, now: float) -> Row | None:
        return await self._run(self._get, domain, now)

    def put(self, row: Row, now: float) -> None:
        self._submit(self._put, row, now)

    def touch(self, used: Sequence[tuple[float, str]]) -> None:
        self._submit(self._touch, used)

    def note_error(self, domain: str, error: str) -> None:
        self._submit(self._note_error, domain, error)

    async def drain(self) -> None:
        """Waits until the writes queued so far are done."""
        await self._run(lambda: None)

    async def close(self) -> None:
        """After the queued writes (one thread: in order)."""
        try:
            await self._run(self._close)
        finally:
            self._pool.shutdown(wait=False)

    # -- on the file's thread ---------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.OperationalError("the cache file is closed")
        return self._conn

    def _open(self, now: float) -> list[Row]:
        if self.read_only:
            if not os.path.exists(self.path):
                raise FileNotFoundError(self.path)
            uri = f"file:{urllib.parse.quote(self.path)}?mode=ro"
            conn = sqlite3.connect(uri, timeout=FILE_TIMEOUT, isolation_level=None, uri=True)
        else:
            conn = sqlite3.connect(self.path, timeout=FILE_TIMEOUT, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(FILE_TIMEOUT * 1000)}")
            if not self.read_only:
                conn.execute("PRAGMA journal_mode = WAL")  # readers never wait for a writer
                conn.execute("PRAGMA synchronous = NORMAL")  # WAL: no committed row is lost
                conn.execute(_SCHEMA)
                conn.execute("CREATE INDEX IF NOT EXISTS policies_used ON policies (used)")
                conn.execute("DELETE FROM policies WHERE expires <= ?", (now,))
            rows = conn.execute(
                "SELECT domain, id, policy, fetched, expires, used FROM policies "
                "WHERE expires > ? ORDER BY used DESC LIMIT ?", (now, self.max_rows)).fetchall()
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return [r for r in map(_row, rows) if r is not None]

    def _get(self, domain: str, now: float) -> Row | None:
        found = self._db().execute(
            "SELECT domain, id, policy, fetched, expires, used FROM policies "
            "WHERE domain = ? AND expires > ?", (domain, now)).fetchone()
        return _row(found) if found is not None else None

    def _put(self, row: Row, now: float) -> None:
        db = self._db()
        r = row.record
        db.execute("BEGIN IMMEDIATE")
        try:
            # A worker that fetched earlier does not overwrite a later fetch.
            db.execute(
                "INSERT INTO policies (domain, id, policy, fetched, expires, used, error) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL) ON CONFLICT (domain) DO UPDATE SET "
                "id = excluded.id, policy = excluded.policy, fetched = excluded.fetched, "
                "expires = excluded.expires, used = max(used, excluded.used), error = NULL "
                "WHERE excluded.fetched >= policies.fetched",
                (row.domain, r.policy_id, r.policy.text(), r.fetched, r.expires, row.used))
            db.execute("DELETE FROM policies WHERE expires <= ?", (now,))
            db.execute("DELETE FROM policies WHERE domain IN (SELECT domain FROM policies "
                       "ORDER BY used DESC LIMIT -1 OFFSET ?)", (self.max_rows,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _touch(self, used: Sequence[tuple[float, str]]) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("UPDATE policies SET used = max(used, ?) WHERE domain = ?", used)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _note_error(self, domain: str, error: str) -> None:
        self._db().execute("UPDATE policies SET error = ? WHERE domain = ?", (error, domain))

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _row(values: Sequence[Any]) -> Row | None:
    """A row read back, or None when it is not one this module wrote (skipped)."""
    try:
        domain, policy_id, text, fetched, expires, used = values
        if (not isinstance(domain, str) or normalize(domain) != domain
                or not isinstance(policy_id, str) or not 0 < len(policy_id) <= 32
                or not set(policy_id) <= _ID_CHARS or not isinstance(text, str)):
            return None
        fetched, expires, used = float(fetched), float(expires), float(used)
        policy = parse_policy(text.encode())
    except (StsError, TypeError, ValueError):
        return None
    if not fetched < expires <= fetched + min(policy.max_age, MAX_AGE_LIMIT) + 1:
        return None
    return Row(domain, Record(policy, policy_id, fetched, expires), used)


def cache_path(setting: str | None) -> tuple[str | None, str]:
    """The file for ``mta_sts.cache`` and, when there is none, why (for the log)."""
    return state_file(setting, "mta_sts.cache", FILE_NAME)


# -- the shell -------------------------------------------------------------------------------

@dataclass(slots=True)
class _Slot:
    """What this process holds for one domain."""

    record: Record | None = None
    failure: Failure | None = None
    used: float = 0.0
    next_check: float = 0.0
    txt_answer: Answer | None = None  # the last TXT answer read, and what it said
    txt: Txt = field(default_factory=Txt)


class Policies:
    """MTA-STS policies of recipient domains: found, kept, refreshed.

    ``read_only``: for a one-shot user beside a running gateway (``smtpgate check``): reads
    the cache file if it exists, never creates or writes it, refreshes nothing.
    ``https_port`` is for tests only (RFC 8461 fetches from 443; a test server without root
    cannot listen there)."""

    def __init__(self, config: MtaSts, resolver: Callable[[], Resolver],
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time,
                 *, read_only: bool = False, https_port: int = 443) -> None:
        self.config = config
        self.resolver = resolver
        self.metrics = metrics
        self.clock = clock
        self.read_only = read_only
        self.https_port = https_port
        self.path: str | None = None  # the cache file in use, None: memory only
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        self._file: CacheFile | None = None
        self._http: aiohttp.ClientSession | None = None
        self._tls: ssl.SSLContext | None = None
        self._tls_error = ""
        self._inflight: dict[tuple[str, bool], asyncio.Task[Found]] = {}
        self._touched: set[str] = set()
        self._tasks = TaskGroup()
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_slots = asyncio.Semaphore(REFRESH_PARALLEL)
        self._random = random.Random()
        self._closed = False

    # -- life ---------------------------------------------------------------------------------
    async def open(self) -> None:
        if not self.config.enabled:
            return
        try:
            self._tls = ssl.create_default_context(cafile=self.config.ca_file)
            self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._tls_error = f"cannot load the CA file {self.config.ca_file}: {exc}"
            event(log, "mta-sts trust anchors unusable", logging.ERROR,
                  error=self._tls_error)
        path, why = cache_path(self.config.cache)
        if path is None:
            event(log, "mta-sts cache", where="memory", reason=why)
        else:
            cache = CacheFile(path, self.config.max_policies, self.read_only)
            try:
                rows = await cache.open(self.clock())
            except FileNotFoundError:  # read-only, and the gateway wrote none yet
                await cache.close()
                event(log, "mta-sts cache", where="memory", reason=f"no {path} yet")
            except (sqlite3.Error, OSError) as exc:
                await cache.close()
                event(log, "mta-sts cache unusable", logging.WARNING, path=path,
                      error=_describe(exc), where="memory")
            else:
                cache.on_error = self._file_failed
                self._file, self.path = cache, path
                for row in reversed(rows):  # most recently used last
                    self._adopt(row.domain, row, self._slot(row.domain))
                event(log, "mta-sts cache", where=path, policies=len(rows),
                      mode="read-only" if self.read_only else "read-write")
        self._gauge()
        if not self.read_only:
            self._refresher = self._tasks.spawn(self._refresh_loop(),
                                                name="mta-sts refresher")

    async def close(self) -> None:
        self._closed = True
        await self._tasks.cancel_all()
        if self._file is not None:
            self._flush_used()
            file, self._file = self._file, None
            await file.close()
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    async def flush(self) -> None:
        """Writes the use times and waits for the cache file's queued writes (tests, and
        whoever wants another process to see this one's fetches now)."""
        self._flush_used()
        if self._file is not None:
            with contextlib.suppress(sqlite3.Error, OSError):
                await self._file.drain()

    def size(self) -> int:
        """Policies held (unexpired or not yet purged)."""
        return sum(1 for s in self._slots.values() if s.record is not None)

    # -- lookups ------------------------------------------------------------------------------
    def cached(self, domain: str) -> Found | None:
        """Without waiting: the answer when memory and the Resolver's cache settle it (a
        policy whose id the cached TXT confirms, a fresh "no policy"), else None."""
        name = domain.lower().rstrip(".")
        slot = self._slots.get(name)
        if slot is None or not self.config.enabled:
            return None  # first sight here: policy() asks the file too
        now = self.clock()
        answer = self.resolver().cached(f"_mta-sts.{name}.", "TXT")
        if answer is None:
            # The TXT answer expired; only a fetch that failed recently settles it.
            f = slot.failure
            if f is not None and now < f.until and not (slot.record and slot.record.fresh(now)):
                return self._found(name, None, "none", f.error, f.failure)
            return None
        if answer is not slot.txt_answer:
            slot.txt_answer, slot.txt = answer, read_txt(answer)
        decision = decide(slot.record, slot.failure, slot.txt, now)
        if decision.step is Step.FETCH:
            return None
        self._use(name, slot, now)
        record = slot.record if decision.step is Step.CACHED else None
        return self._found(name, record, "cache" if record else "none", decision.error,
                           decision.failure)

    async def policy(self, domain: str) -> Found:
        """The policy in force for ``domain``: never raises; takes at most the DNS budget
        plus ``fetch_timeout`` (and the file's lock timeout)."""
        name = normalize(domain)
        if name is None:
            return Found(domain, None, None, "none", None, None,
                         f"{domain[:80]!r} is not a domain name", None)
        if not self.config.enabled or self._closed:
            return self._found(name, None, "none", None, None)
        return await self._shared(name, renew=False)

    async def _shared(self, name: str, renew: bool) -> Found:
        """One discovery per domain at a time; the callers wait for it (shielded: one
        session giving up does not cancel what others wait for)."""
        key = (name, renew)
        task = self._inflight.get(key)
        if task is None:
            task = self._tasks.spawn(self._guarded(name, renew),
                                     name=f"mta-sts {'refresh ' if renew else ''}{name}")
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._inflight.pop(key, None)
                                   if self._inflight.get(key) is t else None)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise  # our caller is cancelled: that goes on
            return self._found(name, None, "none", "MTA-STS is closing", None)

    async def _guarded(self, name: str, renew: bool) -> Found:
        # The file is read at most once per discovery, written behind its back.
        limit = self.resolver().config.budget + self.config.fetch_timeout + FILE_TIMEOUT
        failure: str | None = FETCH_ERROR
        try:
            async with asyncio.timeout(limit):
                return await self._discover(name, renew)
        except TimeoutError:
            error = f"MTA-STS discovery took longer than {limit:g}s"
        except Exception as exc:  # a bug: the session goes on with what is held
            log.exception("mta-sts discovery of %s failed", name)
            error, failure = f"MTA-STS discovery failed: {_describe(exc)}", None
        slot = self._slots.get(name)
        record = slot.record if slot is not None else None
        record = record if record is not None and record.fresh(self.clock()) else None
        return self._found(name, record, "cache" if record else "none", error, failure)

    async def _discover(self, name: str, renew: bool) -> Found:
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slot(name)
            await self._from_file(name, slot)  # first sight in this process
        resolver = self.resolver()
        try:
            async with asyncio.timeout(resolver.config.budget):
                answer = await resolver.lookup(f"_mta-sts.{name}.", "TXT")
            slot.txt_answer, slot.txt = answer, read_txt(answer)
        except TimeoutError:
            slot.txt_answer, slot.txt = None, Txt(
                error=f"the TXT lookup of _mta-sts.{name} took longer than "
                      f"{resolver.config.budget:g}s")
        txt = slot.txt
        now = self.clock()
        due = renew and slot.record is not None and now >= renew_point(slot.record)
        decision = decide(slot.record, slot.failure, txt, now, renew=due)
        if decision.step is Step.FETCH:
            # Another worker may have fetched (or renewed) this id already.
            await self._from_file(name, slot)
            now = self.clock()
            due = renew and slot.record is not None and now >= renew_point(slot.record)
            decision = decide(slot.record, slot.failure, txt, now, renew=due)
        if renew and slot.record is not None:
            slot.next_check = next_check(slot.record, now, self._random.uniform(0.9, 1.0))
        if decision.step is not Step.FETCH:
            if not renew:
                self._use(name, slot, now)
            record = slot.record if decision.step is Step.CACHED else None
            return self._found(name, record, "cache" if record else "none", decision.error,
                               decision.failure)
        assert txt.policy_id is not None
        return await self._fetch(name, slot, txt.policy_id, renew)

    async def _fetch(self, name: str, slot: _Slot, policy_id: str, renew: bool) -> Found:
        if self._tls is None:
            fetched = Fetched(None, "tls", self._tls_error or "MTA-STS is not open",
                              FETCH_ERROR)
        else:
            fetched = await fetch_policy(self._session(), name, self.https_port,
                                         self.config.fetch_timeout)
        if self.metrics is not None:
            self.metrics.child(self.metrics.sts_fetches, fetched.result).inc()
        now = self.clock()
        if not renew:
            self._use(name, slot, now)
        old = slot.record
        if fetched.policy is None:
            assert fetched.error is not None and fetched.failure is not None
            slot.failure = Failure(policy_id, fetched.error, fetched.failure, now + RETRY_AFTER)
            kept = old if old is not None and old.fresh(now) else None
            event(log, "mta-sts fetch failed", logging.WARNING, domain=name, id=policy_id,
                  result=fetched.result, error=fetched.error,
                  kept=f"{kept.policy.mode} policy {kept.policy_id}" if kept else "none")
            if kept is not None and self._file is not None:
                self._file.note_error(name, fetched.error)
            return self._found(name, kept, "cache" if kept else "none", fetched.error,
                               fetched.failure)
        policy = fetched.policy
        record = Record(policy, policy_id, now, now + policy.max_age)
        slot.record, slot.failure = record, None
        slot.next_check = next_check(record, now, self._random.uniform(0.9, 1.0))
        if old is None or old.policy_id != policy_id or old.policy != policy:
            event(log, "mta-sts policy", domain=name, id=policy_id, mode=str(policy.mode),
                  max_age=policy.max_age, mx=",".join(policy.mx) or "-")
        self._gauge()
        if self._file is not None:
            self._flush_used()  # first: the put trims the file by these use times
            self._file.put(Row(name, record, slot.used), now)
        return self._found(name, record, "fetch", None, None)

    # -- helpers ------------------------------------------------------------------------------
    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = _Slot()
            while len(self._slots) > self.config.max_policies:
                self._slots.popitem(last=False)  # least recently used
        return slot

    def _use(self, name: str, slot: _Slot, now: float) -> None:
        slot.used = now
        if self._slots.get(name) is slot:
            self._slots.move_to_end(name)
        if self._file is not None and slot.record is not None:
            self._touched.add(name)

    def _adopt(self, name: str, row: Row, slot: _Slot) -> None:
        """A record from the file, when it is newer than what this process holds."""
        now = self.clock()
        if not row.record.fresh(now):
            return
        if slot.record is None or row.record.fetched > slot.record.fetched:
            slot.record = row.record
            slot.next_check = next_check(row.record, now, self._random.uniform(0.9, 1.0))
        slot.used = max(slot.used, row.used)

    async def _from_file(self, name: str, slot: _Slot) -> None:
        file = self._file
        if file is None:
            return
        try:
            row = await file.get(name, self.clock())
        except (sqlite3.Error, OSError) as exc:
            self._file_failed(file, exc)
            return
        if row is not None:
            self._adopt(name, row, slot)
            self._gauge()

    def _file_failed(self, file: CacheFile, exc: BaseException) -> None:
        """The cache file failed (full disk, read-only, corrupt): memory only from here,
        logged once; the gateway goes on."""
        if self._file is not file:
            return
        self._file = None
        event(log, "mta-sts cache unusable", logging.WARNING, path=file.path,
              error=_describe(exc), where="memory")
        self._tasks.spawn(file.close(), name="mta-sts cache close")

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            assert self._tls is not None
            connector = aiohttp.TCPConnector(
                resolver=GatewayResolver(self.resolver), ssl=self._tls,
                use_dns_cache=False,  # the Resolver caches, for the record's TTL
                limit=MAX_CONNECTIONS,
                force_close=True)  # each domain has its own host: nothing to keep alive
            self._http = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False, trust_env=False,
                headers={"User-Agent": f"smtpgate/{__version__} (MTA-STS)"})
        return self._http

    def _found(self, name: str, record: Record | None, source: str, error: str | None,
               failure: str | None) -> Found:
        if record is None:
            return Found(name, None, None, "none", None, None, error, failure)
        return Found(name, record.policy, record.policy_id, source, record.fetched,
                     record.expires, error, failure)

    def _gauge(self) -> None:
        if self.metrics is None:
            return
        now = self.clock()
        counts = {"enforce": 0, "testing": 0, "none": 0}
        for slot in self._slots.values():
            if slot.record is not None and slot.record.fresh(now):
                counts[str(slot.record.policy.mode)] += 1
        for mode, n in counts.items():
            self.metrics.child(self.metrics.sts_policies, mode).set(n)

    # -- proactive refresh (RFC 8461 10.2) ------------------------------------------------------
    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_TICK * self._random.uniform(0.8, 1.2))
            try:
                await self.refresh()
            except Exception:  # a bug: logged, and the next round tries again
                log.exception("mta-sts refresh round failed")

    async def refresh(self) -> int:
        """One round of the refresher (the loop calls it; tests too): drops expired
        policies, re-checks those in use whose time has come (at most REFRESH_PER_TICK,
        REFRESH_PARALLEL at once), writes the use times to the file.  Returns how many
        it re-checked."""
        now = self.clock()
        for name in [n for n, s in self._slots.items() if _stale(s, now)]:
            del self._slots[name]
        due = sorted((s.next_check, n) for n, s in self._slots.items()
                     if s.record is not None and s.next_check <= now
                     and s.used >= now - s.record.policy.max_age)[:REFRESH_PER_TICK]

        async def one(name: str) -> None:
            async with self._refresh_slots:
                await self._shared(name, renew=True)

        tasks = [self._tasks.spawn(one(n), name=f"mta-sts refresh {n}") for _, n in due]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._flush_used()
        self._gauge()
        return len(tasks)

    def _flush_used(self) -> None:
        """The use times since the last flush, to the file in one transaction: another
        worker's (or the next process's) least-recently-used order counts them."""
        if self._file is None or not self._touched:
            return
        used = [(self._slots[n].used, n) for n in self._touched if n in self._slots]
        self._touched.clear()
        self._file.touch(used)


def _stale(slot: _Slot, now: float) -> bool:
    """Nothing worth keeping: no unexpired record, no failure still backing off."""
    if slot.record is not None and not slot.record.fresh(now):
        slot.record = None
    if slot.failure is not None and now >= slot.failure.until:
        slot.failure = None
    return slot.record is None and slot.failure is None


"""TLS-RPT (RFC 8460), the outcomes kept: counted per UTC day and policy domain, in memory
and in a SQLite file that survives restarts and reloads and is shared by the workers.

A session's end calls :meth:`Store.record`, which only adds to a count in memory (a dict
lookup: the event loop never waits for the disk).  Every FLUSH_EVERY seconds, and at
:meth:`Store.flush` and :meth:`Store.close`, the counts gathered since are added to the file
in one transaction on the store's own thread (as gateway.stsfetch does its cache file: one
connection on one thread, WAL so readers never wait, busy_timeout for the other workers'
locks).  Workers add, never overwrite (``count = count + excluded.count``), so their counts
add up; a restart loses at most the last few seconds, never what was flushed.

Bounded, in memory and in the file alike: at most ``tlsrpt.max_domains`` policy domains a
day (the sessions of more are counted per day as ``dropped``, logged once a day); per domain
and day at most MAX_POLICIES distinct policies (past it a policy's strings and MX patterns
are left out: a domain that changes its TLSA records every minute gets one entry, not one
per change) and MAX_FAILURES distinct failures (past it a failure is counted in one row per
policy and result type whose failure-reason-code says so); KEEP_DAYS days, older ones are
forgotten on their own.  A file that cannot be used (corrupt, unwritable) is logged and
replaced by memory; the gateway goes on.

The sender (gateway.tlsrptsend) reads the days and domains, builds the reports with
:func:`prepare` and remembers its deliveries here (:class:`Delivery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .config import state_file
from .logs import event
from .tasks import TaskGroup
from .tlsrpt import (
    OVERFLOW_DETAIL,
    SUCCESS,
    Outcome,
    filename,
    report,
    report_id,
    shift_day,
    submitter,
    utc_day,
)

if TYPE_CHECKING:
    from .config import TlsRpt

log = logging.getLogger("smtpgate")
T = TypeVar("T")

FILE_NAME = "tlsrpt.sqlite3"
FILE_TIMEOUT = 2.0  # SQLite waits this long for another worker's lock (busy_timeout)
OPEN_ATTEMPTS = 8  # opening the file while other workers create it: about 6 s in all
CLOSE_ATTEMPTS = 10  # the last write at close, while another worker holds the lock
FLUSH_EVERY = 5.0  # seconds between writes of what the sessions counted
PENDING_ROWS = 5000  # distinct outcomes held before a write is started early
MAX_POLICIES = 10  # distinct policies itemized per domain and day
MAX_FAILURES = 100  # distinct failures itemized per domain and day
KEEP_DAYS = 7  # outcomes and deliveries of days older than this are forgotten
SCHEMA_VERSION = 1  # PRAGMA user_version of the file

Policy = tuple[str, tuple[str, ...], tuple[str, ...]]


# -- the pure core ---------------------------------------------------------------------------

def policy_of(outcome: Outcome) -> Policy:
    return outcome.policy_type, outcome.policy_strings, outcome.mx_host


def is_overflow(outcome: Outcome) -> bool:
    return outcome.detail == OVERFLOW_DETAIL and not (
        outcome.sending_ip or outcome.receiving_mx or outcome.receiving_ip)


def itemized(outcome: Outcome) -> bool:
    """Whether ``outcome`` is a row that counts against MAX_FAILURES."""
    return outcome.result != SUCCESS and not is_overflow(outcome)


def counted(outcome: Outcome) -> Outcome:
    """What is counted of ``outcome``: for a success only the policy (RFC 8460 4.4 itemizes
    failures only), so all successes under one policy share a row."""
    if outcome.result == SUCCESS and (outcome.sending_ip or outcome.receiving_mx
                                      or outcome.receiving_ip or outcome.detail):
        return Outcome(outcome.policy_domain, outcome.policy_type, outcome.policy_strings,
                       outcome.mx_host)
    return outcome


def fit(outcome: Outcome, known_policy: bool, policies: int, failures: int) -> Outcome:
    """The row a new outcome is counted in, given its domain's day so far: whether its
    policy is known, how many distinct policies and itemized failures there are."""
    if not known_policy and policies >= MAX_POLICIES and (outcome.policy_strings
                                                          or outcome.mx_host):
        outcome = Outcome(outcome.policy_domain, outcome.policy_type, (), (), outcome.result,
                          outcome.sending_ip, outcome.receiving_mx, outcome.receiving_ip,
                          outcome.detail)
    if itemized(outcome) and failures >= MAX_FAILURES:
        outcome = Outcome(outcome.policy_domain, outcome.policy_type, outcome.policy_strings,
                          outcome.mx_host, outcome.result, detail=OVERFLOW_DETAIL)
    return outcome


@dataclass(slots=True)
class _Domain:
    rows: dict[Outcome, int] = field(default_factory=dict)
    policies: set[Policy] = field(default_factory=set)
    failures: int = 0  # itemized failure rows


class Tally:
    """Counts per day, policy domain and outcome in memory, bounded as the file is."""

    def __init__(self) -> None:
        self.days: dict[str, dict[str, _Domain]] = {}
        self.dropped: dict[str, int] = {}  # day -> sessions of domains past max_domains
        self.rows = 0  # distinct rows held

    def __bool__(self) -> bool:
        return bool(self.days or self.dropped)

    def sessions(self) -> int:
        """The sessions counted (for the log when they cannot be written)."""
        return sum(n for domains in self.days.values() for d in domains.values()
                   for n in d.rows.values())

    def add(self, day: str, outcome: Outcome, count: int, max_domains: int) -> bool:
        """Counts ``outcome``; False when its domain is past ``max_domains`` (dropped)."""
        domains = self.days.get(day)
        if domains is None:
            domains = self.days[day] = {}
        slot = domains.get(outcome.policy_domain)
        if slot is None:
            if len(domains) >= max_domains:
                self.dropped[day] = self.dropped.get(day, 0) + count
                return False
            slot = domains[outcome.policy_domain] = _Domain()
        rows = slot.rows
        if outcome not in rows:
            outcome = fit(outcome, policy_of(outcome) in slot.policies, len(slot.policies),
                          slot.failures)
            if outcome not in rows:
                slot.policies.add(policy_of(outcome))
                slot.failures += itemized(outcome)
                self.rows += 1
                rows[outcome] = 0
        rows[outcome] += count
        return True

    def merge(self, other: Tally, max_domains: int) -> set[str]:
        """Adds ``other``'s counts; the days on which a domain was dropped."""
        dropped = set()
        for day, domains in other.days.items():
            for slot in domains.values():
                for outcome, count in slot.rows.items():
                    if not self.add(day, outcome, count, max_domains):
                        dropped.add(day)
        for day, count in other.dropped.items():
            self.dropped[day] = self.dropped.get(day, 0) + count
        return dropped

    def items(self) -> Iterator[tuple[str, str, dict[Outcome, int]]]:
        for day, domains in self.days.items():
            for domain, slot in domains.items():
                yield day, domain, slot.rows

    def forget_before(self, day: str) -> None:
        for old in [d for d in self.days if d < day]:
            self.rows -= sum(len(s.rows) for s in self.days.pop(old).values())
        for old in [d for d in self.dropped if d < day]:
            del self.dropped[old]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the sender remembers of one report (day, domain) to one rua URI."""

    day: str
    domain: str
    rua: str
    attempts: int = 0  # tries so far
    error: str = ""  # why the last try failed, "" after a success
    done: bool = False  # delivered: never sent again
    next_try: float = 0.0  # epoch seconds: not tried again before
    updated: float = 0.0  # epoch seconds of the last note


def store_path(setting: str | None) -> tuple[str | None, str]:
    """The file for ``tlsrpt.store`` and, when there is none, why (for the log)."""
    return state_file(setting, "tlsrpt.store", FILE_NAME)


def command_store(setting: str | None, given: str | None) -> tuple[str | None, str]:
    """The store file a ``smtpgate tlsrpt`` command reads: ``given`` (its --store), else
    ``tlsrpt.store``'s; when there is none, why, with what to give instead."""
    if given is not None:
        return given, ""
    path, why = store_path(setting)
    if path is None and setting == "auto":
        why += " (give the service's: STATE_DIRECTORY=/var/lib/smtpgate, or --store PATH)"
    return path, why


# -- the file --------------------------------------------------------------------------------

_TABLES = (
    # One row per distinct outcome: its fields as JSON (outcome), a hash of them (key) and
    # of its policy (policy) so the primary key and the index stay short.
    """CREATE TABLE IF NOT EXISTS outcomes (
        day TEXT NOT NULL, domain TEXT NOT NULL, key TEXT NOT NULL, policy TEXT NOT NULL,
        outcome TEXT NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (day, domain, key)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS outcomes_policy ON outcomes (day, domain, policy)",
    # The domains of a day, and what the bounds count for each.
    """CREATE TABLE IF NOT EXISTS domains (
        day TEXT NOT NULL, domain TEXT NOT NULL, policies INTEGER NOT NULL,
        failures INTEGER NOT NULL, PRIMARY KEY (day, domain)) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS dropped (day TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS deliveries (
        day TEXT NOT NULL, domain TEXT NOT NULL, rua TEXT NOT NULL,
        attempts INTEGER NOT NULL, error TEXT NOT NULL, done INTEGER NOT NULL,
        next_try REAL NOT NULL, updated REAL NOT NULL,
        PRIMARY KEY (day, domain, rua)) WITHOUT ROWID""",
)


def _digest(value: object) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _encode(outcome: Outcome) -> str:
    return json.dumps([outcome.policy_type, outcome.policy_strings, outcome.mx_host,
                       outcome.result, outcome.sending_ip, outcome.receiving_mx,
                       outcome.receiving_ip, outcome.detail],
                      separators=(",", ":"), ensure_ascii=False)


def _decode(domain: str, text: str) -> Outcome | None:
    """A row read back, or None when it is not one this module wrote (skipped)."""
    try:
        kind, strings, mx, result, sending_ip, receiving_mx, receiving_ip, detail = \
            json.loads(text)
        if not (all(isinstance(s, str) for s in (kind, result, sending_ip, receiving_mx,
                                                  receiving_ip, detail))
                and all(isinstance(s, str) for s in [*strings, *mx])):
            return None
        return Outcome(domain, kind, tuple(strings), tuple(mx), result, sending_ip,
                       receiving_mx, receiving_ip, detail)
    except (TypeError, ValueError):
        return None


def _busy(exc: BaseException) -> bool:
    """Another worker held the lock past busy_timeout: try again later, the file is fine."""
    return isinstance(exc, sqlite3.OperationalError) and any(
        word in str(exc) for word in ("locked", "busy"))


class StoreFile:
    """The SQLite file; every method runs on the store's thread (see :class:`Store`)."""

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        if self.read_only:
            if not os.path.exists(self.path):
                raise FileNotFoundError(self.path)
            # A running gateway holds the WAL and its index: read through them.  Without
            # them nobody writes, and immutable reads create neither (no file is made).
            live = os.path.exists(self.path + "-wal") and os.path.exists(self.path + "-shm")
            uri = f"file:{urllib.parse.quote(self.path)}?mode=ro" + ("" if live else
                                                                       "&immutable=1")
            conn = sqlite3.connect(uri, timeout=FILE_TIMEOUT, isolation_level=None, uri=True,
                                   check_same_thread=False)
        else:
            conn = sqlite3.connect(self.path, timeout=FILE_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(FILE_TIMEOUT * 1000)}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {version} is newer than this "
                                            f"gateway's ({SCHEMA_VERSION})")
            if not self.read_only:
                conn.execute("PRAGMA journal_mode = WAL")  # readers never wait for a writer
                conn.execute("PRAGMA synchronous = NORMAL")  # WAL: no committed row is lost
                for statement in _TABLES:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("SELECT count(*) FROM domains").fetchone()  # a readable file
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.OperationalError("the TLS-RPT store is closed")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def write(self, batch: Tally, max_domains: int, forget: str | None) -> dict[str, int]:
        """Adds ``batch`` in one transaction, bounded by what the file holds (the lock makes
        the workers' bounds one); forgets the days before ``forget``.  The sessions dropped
        per day by this write."""
        db = self._db()
        dropped = dict(batch.dropped)
        newly: dict[str, int] = {}
        db.execute("BEGIN IMMEDIATE")
        try:
            if forget is not None:
                self._forget(forget)
            known: dict[str, int] = {}  # day -> its domains in the file
            for day, domain, rows in batch.items():
                if day not in known:
                    known[day] = db.execute("SELECT count(*) FROM domains WHERE day = ?",
                                            (day,)).fetchone()[0]
                found = db.execute("SELECT policies, failures FROM domains WHERE day = ? "
                                   "AND domain = ?", (day, domain)).fetchone()
                if found is None:
                    if known[day] >= max_domains:
                        lost = sum(rows.values())
                        dropped[day] = dropped.get(day, 0) + lost
                        newly[day] = newly.get(day, 0) + lost
                        continue
                    known[day] += 1
                    found = (0, 0)
                policies, failures = found
                for outcome, count in rows.items():
                    policies, failures = self._add(day, domain, outcome, count,
                                                   seen=(policies, failures))
                db.execute("INSERT INTO domains (day, domain, policies, failures) VALUES "
                           "(?, ?, ?, ?) ON CONFLICT (day, domain) DO UPDATE SET "
                           "policies = excluded.policies, failures = excluded.failures",
                           (day, domain, policies, failures))
            db.executemany("INSERT INTO dropped (day, count) VALUES (?, ?) ON CONFLICT (day) "
                           "DO UPDATE SET count = count + excluded.count",
                           [(d, n) for d, n in dropped.items() if n])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return newly

    def _add(self, day: str, domain: str, outcome: Outcome, count: int, *,
             seen: tuple[int, int]) -> tuple[int, int]:
        """Adds ``count`` to the row of ``outcome`` (or the row the bounds put it in);
        ``seen``: the domain's distinct policies and itemized failures, before and after."""
        policies, failures = seen
        key, row = self._row(day, domain, outcome)
        if row is None:
            fitted = fit(outcome, self._has_policy(day, domain, _digest(policy_of(outcome))),
                         policies, failures)
            if fitted != outcome:
                outcome = fitted
                key, row = self._row(day, domain, outcome)
        if row is None:
            policies += not self._has_policy(day, domain, _digest(policy_of(outcome)))
            failures += itemized(outcome)
        # Adds, never sets: the workers' counts add up (and within the lock no row appears
        # between the look above and this).
        self._db().execute(
            "INSERT INTO outcomes (day, domain, key, policy, outcome, count) VALUES "
            "(?, ?, ?, ?, ?, ?) ON CONFLICT (day, domain, key) DO UPDATE SET "
            "count = count + excluded.count",
            (day, domain, key, _digest(policy_of(outcome)), _encode(outcome), count))
        return policies, failures

    def _row(self, day: str, domain: str, outcome: Outcome) -> tuple[str, object]:
        key = _digest(_encode(outcome))
        row = self._db().execute("SELECT 1 FROM outcomes WHERE day = ? AND domain = ? AND "
                                 "key = ?", (day, domain, key)).fetchone()
        return key, row

    def _has_policy(self, day: str, domain: str, policy: str) -> bool:
        return self._db().execute(
            "SELECT 1 FROM outcomes WHERE day = ? AND domain = ? AND policy = ? LIMIT 1",
            (day, domain, policy)).fetchone() is not None

    def _forget(self, day: str) -> None:
        db = self._db()
        for table in ("outcomes", "domains", "dropped", "deliveries"):
            db.execute(f"DELETE FROM {table} WHERE day < ?", (day,))

    def forget_before(self, day: str) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            self._forget(day)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def days(self) -> list[str]:
        return [r[0] for r in self._db().execute(
            "SELECT DISTINCT day FROM domains ORDER BY day")]

    def domains(self, day: str) -> list[str]:
        return [r[0] for r in self._db().execute(
            "SELECT domain FROM domains WHERE day = ? ORDER BY domain", (day,))]

    def counts(self, day: str, domain: str) -> list[tuple[Outcome, int]]:
        found = []
        for text, count in self._db().execute(
                "SELECT outcome, count FROM outcomes WHERE day = ? AND domain = ? "
                "ORDER BY key", (day, domain)):
            outcome = _decode(domain, text)
            if outcome is not None and isinstance(count, int) and count > 0:
                found.append((outcome, count))
        return found

    def dropped(self, day: str) -> int:
        row = self._db().execute("SELECT count FROM dropped WHERE day = ?", (day,)).fetchone()
        return int(row[0]) if row is not None else 0

    def deliveries(self, day: str, domain: str | None, rua: str | None) -> list[Delivery]:
        sql = ("SELECT day, domain, rua, attempts, error, done, next_try, updated "
               "FROM deliveries WHERE day = ?")
        args: list[str] = [day]
        if domain is not None:
            sql += " AND domain = ?"
            args.append(domain)
        if rua is not None:
            sql += " AND rua = ?"
            args.append(rua)
        return [Delivery(d, dom, r, int(a), str(e), bool(done), float(nt), float(up))
                for d, dom, r, a, e, done, nt, up in self._db().execute(
                    sql + " ORDER BY domain, rua", args)]

    def note_delivery(self, delivery: Delivery) -> None:
        d = delivery
        # Done stays done: a late failure note of a second sender does not undo a success.
        self._db().execute(
            "INSERT INTO deliveries (day, domain, rua, attempts, error, done, next_try, "
            "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, domain, rua) DO "
            "UPDATE SET attempts = max(attempts, excluded.attempts), error = "
            "excluded.error, done = excluded.done, next_try = excluded.next_try, "
            "updated = excluded.updated WHERE deliveries.done = 0 OR excluded.done = 1",
            (d.day, d.domain, d.rua, d.attempts, d.error, int(d.done), d.next_try, d.updated))


# -- the shell -------------------------------------------------------------------------------

def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


class Store:
    """The outcomes of this process's sessions, counted per UTC day and policy domain.

    The gateway keeps one Store across reloads: ``config`` is read where it is used
    (``max_domains``), so a reload may replace it; the file is chosen at :meth:`open` (a
    changed ``tlsrpt.store`` takes a restart).  With ``tlsrpt.enabled`` false no file is
    opened.  ``read_only``: for a one-shot reader beside a running gateway (``smtpgate
    tlsrpt show``): reads the file if it exists, never creates or writes it; ``path``
    overrides ``tlsrpt.store`` (for such a reader, which may lack $STATE_DIRECTORY).

    Every statement runs on one thread of the store's own, never on the event loop (a write
    may wait FILE_TIMEOUT for another worker's lock); one thread, because a sqlite3
    connection belongs to one and keeps the statements in order.  Never raises for file
    trouble: the file is then given up for memory, with a WARNING."""

    def __init__(self, config: TlsRpt, clock: Callable[[], float] = time.time, *,
                 read_only: bool = False, path: str | None = None) -> None:
        self.config = config
        self.clock = clock
        self.read_only = read_only
        self.path: str | None = None  # the file in use, None: memory only
        self.problem = ""  # why not the file configured, when it is memory only
        self._path = path
        self._file: StoreFile | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending = Tally()  # counted since the last write (file), or everything (memory)
        self._memory = Tally()  # memory only: what was written
        self._delivered: dict[str, list[Delivery]] = {}  # memory only: day -> deliveries
        self._tasks = TaskGroup()
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._warned: set[str] = set()  # days whose dropped domains were logged
        self._today = ""
        self._today_ends = 0.0
        self._forgot = ""  # the day retention last ran for

    # -- life ---------------------------------------------------------------------------------
    async def open(self) -> None:
        path, why = (self._path, "") if self._path is not None else \
            store_path(self.config.store)
        if not self.config.enabled and not self.read_only:
            path, why = None, "tlsrpt.enabled is false"
        if path is None:
            self.problem = why
            event(log, "tlsrpt store", where="memory", reason=why)
        else:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tlsrpt-store")
            file = StoreFile(path, self.read_only)
            try:
                # Workers starting together contend for the file's creation and its switch
                # to WAL, which SQLite may refuse at once rather than wait: retried, since a
                # worker that gave up would count in memory and its reports would lack it.
                for attempt in range(OPEN_ATTEMPTS):
                    try:
                        await self._run(file.open)
                        break
                    except sqlite3.OperationalError as exc:
                        if not _busy(exc) or attempt == OPEN_ATTEMPTS - 1:
                            raise
                        await asyncio.sleep(0.05 * 2 ** attempt)
            except FileNotFoundError:  # read-only, and the gateway wrote none yet
                self.problem = f"no {path} yet"
                event(log, "tlsrpt store", where="memory", reason=self.problem)
            except (sqlite3.Error, OSError) as exc:
                self.problem = f"{path}: {_describe(exc)}"
                event(log, "tlsrpt store unusable", logging.WARNING, path=path,
                      error=_describe(exc), where="memory")
            else:
                self._file, self.path = file, path
                event(log, "tlsrpt store", where=path,
                      mode="read-only" if self.read_only else "read-write")
        if not self.read_only:
            self._flusher = self._tasks.spawn(self._flush_loop(), name="tlsrpt store flusher")

    async def close(self) -> None:
        """Writes what is pending, then closes the file."""
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)  # after one last write
        await self.flush()
        # Another worker holding the lock past busy_timeout: the last counts are kept in
        # _pending; try again a few times rather than drop them with the file.
        for _ in range(CLOSE_ATTEMPTS):
            if not self._pending or self._file is None:
                break
            await asyncio.sleep(0.2)
            await self.flush()
        if self._pending and self._file is not None:
            event(log, "tlsrpt store lost counts", logging.ERROR, path=self._file.path,
                  sessions=self._pending.sessions())
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(sqlite3.Error, OSError):
                await self._run(file.close)
        await self._tasks.cancel_all()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # -- counting -----------------------------------------------------------------------------
    def record(self, outcome: Outcome, count: int = 1) -> None:
        """Counts one session's outcome (``count`` of them) for the current UTC day: in
        memory, written within FLUSH_EVERY seconds.  Cheap and never blocks."""
        if self.read_only or count <= 0:
            return
        now = self.clock()
        if now >= self._today_ends or now < self._today_ends - 86400:
            self._today = utc_day(now)
            self._today_ends = (now // 86400 + 1) * 86400
        if not self._pending.add(self._today, counted(outcome), count,
                                 self.config.max_domains):
            self._dropped(self._today)
        if self._pending.rows >= PENDING_ROWS:
            self._wake.set()

    async def flush(self) -> None:
        """Writes what was counted so far (tests, the sender before it reads, close)."""
        batch, self._pending = self._pending, Tally()
        day = utc_day(self.clock())
        forget = shift_day(day, -KEEP_DAYS) if day != self._forgot else None
        file = self._file
        if file is None:
            for late in self._memory.merge(batch, self.config.max_domains):
                self._dropped(late)
            if forget is not None:
                self._forget_memory(forget)
                self._forgot = day
            return
        if self.read_only or (not batch and forget is None):
            return
        try:
            dropped = await self._run(file.write, batch, self.config.max_domains, forget)
        except (sqlite3.Error, OSError) as exc:
            if _busy(exc):  # kept for the next write
                batch.merge(self._pending, self.config.max_domains)
                self._pending = batch
                event(log, "tlsrpt store busy", logging.WARNING, path=file.path,
                      error=_describe(exc), retry=f"in {FLUSH_EVERY:g}s")
                return
            self._failed(file, exc)
            self._memory.merge(batch, self.config.max_domains)
            return
        if forget is not None:
            self._forgot = day
        for late in dropped:
            self._dropped(late)

    async def _flush_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_EVERY):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # a bug: logged, counting goes on
                log.exception("tlsrpt store write failed")

    # -- reading ------------------------------------------------------------------------------
    async def days(self) -> list[str]:
        """The days with outcomes, oldest first."""
        return await self._read(lambda f: f.days(), lambda: sorted(
            d for d, doms in self._memory.days.items() if doms))

    async def domains(self, day: str) -> list[str]:
        """The policy domains with outcomes on ``day``, sorted."""
        return await self._read(lambda f: f.domains(day),
                                lambda: sorted(self._memory.days.get(day, {})))

    async def counts(self, day: str, domain: str) -> list[tuple[Outcome, int]]:
        """What was counted for ``domain`` on ``day``: each distinct outcome and how often
        (in this process since the last write, and in the file from all workers)."""
        def memory() -> list[tuple[Outcome, int]]:
            slot = self._memory.days.get(day, {}).get(domain)
            return sorted(slot.rows.items(), key=lambda i: _encode(i[0])) if slot else []
        return await self._read(lambda f: f.counts(day, domain), memory)

    async def dropped(self, day: str) -> int:
        """Sessions of ``day`` not counted: their domains came past ``max_domains``."""
        return await self._read(lambda f: f.dropped(day),
                                lambda: self._memory.dropped.get(day, 0))

    # -- deliveries (gateway.tlsrptsend) ------------------------------------------------------
    async def delivery(self, day: str, domain: str, rua: str) -> Delivery | None:
        found = await self._read(lambda f: f.deliveries(day, domain, rua),
                                 lambda: [d for d in self._delivered.get(day, [])
                                          if d.domain == domain and d.rua == rua])
        return found[0] if found else None

    async def deliveries(self, day: str) -> list[Delivery]:
        """Every delivery noted for ``day``."""
        return await self._read(lambda f: f.deliveries(day, None, None),
                                lambda: sorted(self._delivered.get(day, []),
                                               key=lambda d: (d.domain, d.rua)))

    async def note_delivery(self, day: str, domain: str, rua: str, *, ok: bool, error: str,
                            attempts: int, next_try: float) -> None:
        """Remembers a delivery try: ``ok`` marks the report delivered for good (to this rua),
        else ``error`` says why not and ``next_try`` when to try again."""
        delivery = Delivery(day, domain, rua, attempts, "" if ok else error, ok, next_try,
                            self.clock())
        if self._file is not None and not self.read_only:
            file = self._file
            try:
                await self._run(file.note_delivery, delivery)
                return
            except (sqlite3.Error, OSError) as exc:
                self._failed(file, exc)
        held = self._delivered.setdefault(day, [])
        old = next((d for d in held if d.domain == domain and d.rua == rua), None)
        if old is not None:
            if old.done and not ok:
                return  # done stays done (as in the file)
            held.remove(old)
            delivery = Delivery(day, domain, rua, max(attempts, old.attempts), delivery.error,
                                ok, next_try, delivery.updated)
        held.append(delivery)

    async def forget_before(self, day: str) -> None:
        """Forgets the outcomes, dropped counts and deliveries of the days before ``day``."""
        self._pending.forget_before(day)
        self._forget_memory(day)
        if self._file is not None and not self.read_only:
            file = self._file
            try:
                await self._run(file.forget_before, day)
            except (sqlite3.Error, OSError) as exc:
                if not _busy(exc):
                    self._failed(file, exc)

    # -- helpers ------------------------------------------------------------------------------
    def _forget_memory(self, day: str) -> None:
        self._memory.forget_before(day)
        for old in [d for d in self._delivered if d < day]:
            del self._delivered[old]

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _read(self, from_file: Callable[[StoreFile], T], from_memory: Callable[[], T]
                    ) -> T:
        await self.flush()  # this process's counts first
        file = self._file
        if file is not None:
            try:
                return await self._run(from_file, file)
            except (sqlite3.Error, OSError) as exc:
                self._failed(file, exc)
        return from_memory()

    def _failed(self, file: StoreFile, exc: BaseException) -> None:
        """The file failed (full disk, read-only, corrupt): memory only from here, logged
        once; the gateway goes on."""
        if self._file is not file:
            return
        self._file, self.path = None, None
        self.problem = f"{file.path}: {_describe(exc)}"
        event(log, "tlsrpt store unusable", logging.WARNING, path=file.path,
              error=_describe(exc), where="memory")
        if self._pool is not None:
            self._pool.submit(file.close)

    def _dropped(self, day: str) -> None:
        if day not in self._warned:
            self._warned.add(day)
            event(log, "tlsrpt domains past the limit", logging.WARNING, day=day,
                  max_domains=self.config.max_domains,
                  effect="the sessions of further domains are counted as dropped, "
                         "not reported")


# -- reports ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Prepared:
    """One report as it is sent: its document, id and file name."""

    day: str
    domain: str
    submitter: str
    report_id: str
    report: dict[str, Any]
    filename: str


async def prepare(store: Store, config: TlsRpt, day: str, domain: str, *,
                  instance: str | None = None) -> Prepared | None:
    """The report on ``domain`` for ``day`` from what ``store`` counted, or None when there
    is nothing.  What ``smtpgate tlsrpt show`` prints and the sender sends: both build it
    here, so they cannot differ.  ``instance`` defaults to this host's name (see
    gateway.tlsrpt.report_id)."""
    rows = await store.counts(day, domain)
    if not rows:
        return None
    name = submitter(config.contact, config.sender) or socket.gethostname().lower()
    rid = report_id(day, domain, name, socket.gethostname() if instance is None else instance)
    document = report(day, domain, rows, organization=config.organization,
                      contact=config.contact, report_id=rid)
    return Prepared(day, domain, name, rid, document, filename(name, domain, day, rid))

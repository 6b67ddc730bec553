"""DNSSEC-aware lookups, the shell around ``gateway.answers``: ``Resolver`` does the
transport, the TTL cache (negative answers and failures too), one shared in-flight query
per name, a cap on concurrent queries, and remembers results computed from cached answers.
A lookup never raises for DNS trouble: it returns an ``Answer`` that says what happened.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.ttl

from .answers import EDE_DNSSEC, Answer, Status, classify, failed
from .config import DnsConfig, Endpoint
from .metrics import Metrics
from .tasks import TaskGroup


@dataclass(slots=True)
class _Entry:
    answer: Answer
    expires: float


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    shared: int = 0
    queries: int = 0  # sent to a resolver (CD re-queries and fallbacks included)
    by_key: dict[tuple[str, str], int] = field(default_factory=dict)


class Resolver:
    """Lookups through the configured resolvers, cached for their TTL."""

    def __init__(self, config: DnsConfig, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.stats = CacheStats()
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        # Results computed from cached answers alone (a discovery, a recipient rule), until
        # the first of those answers expires: the same few destinations come back all day,
        # and replaying their walk costs more than the rest of planning (docs/performance.md).
        self._memo: dict[object, tuple[object, float, int]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[Answer]] = {}
        self._sem = asyncio.Semaphore(config.max_queries)
        self._tasks = TaskGroup()

    # -- cache ---------------------------------------------------------------------------
    def _ttl_for(self, answer: Answer) -> float:
        c = self.config.cache
        if answer.status in (Status.FAILED, Status.BOGUS):
            return c.failure_ttl  # RFC 9520: briefly, so a broken zone is not hammered
        if answer.absent:
            return min(max(answer.ttl, c.min_ttl), c.negative_max_ttl)  # RFC 2308
        return min(max(answer.ttl, c.min_ttl), c.max_ttl)

    def cached(self, name: str, rdtype: str) -> Answer | None:
        found = self.cached_until(name, rdtype)
        return found[0] if found is not None else None

    def cached_until(self, name: str, rdtype: str) -> tuple[Answer, float] | None:
        """A cached answer and when it expires (``clock`` time)."""
        key = (_norm(name), rdtype)
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            del self._cache[key]
            return None
        return entry.answer, entry.expires

    def remember(self, key: object, value: object, expires: float, answers: int) -> None:
        """``value`` was computed from ``answers`` cached answers, the first of which
        expires at ``expires``: ``recall(key)`` gives it until then."""
        if len(self._memo) >= self.config.cache.max_entries:
            self._memo.clear()  # bounded; the next sessions compute their results again
        self._memo[key] = (value, expires, answers)

    def recall(self, key: object) -> object | None:
        """What ``remember`` kept under ``key``, if none of its answers expired; counted as
        the cache hits it stands for."""
        found = self._memo.get(key)
        if found is None:
            return None
        value, expires, answers = found
        if expires <= self.clock():
            del self._memo[key]
            return None
        self.count_hits(answers)
        return value

    def count_hits(self, n: int) -> None:
        """Answers taken with ``cached`` (a discovery replayed from the cache)."""
        self.stats.hits += n
        if self.metrics is not None and n:
            self.metrics.dns_cache.labels("hit").inc(n)

    def _store(self, key: tuple[str, str], answer: Answer) -> None:
        ttl = self._ttl_for(answer)
        if ttl <= 0:
            return
        self._cache[key] = _Entry(answer, self.clock() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.cache.max_entries:
            self._cache.popitem(last=False)  # oldest first

    def flush(self) -> None:
        self._cache.clear()
        self._memo.clear()

    # -- lookups -------------------------------------------------------------------------
    async def lookup(self, name: str, rdtype: str) -> Answer:
        key = (_norm(name), rdtype)
        hit = self.cached(*key)
        if hit is not None:
            self.stats.hits += 1
            self._count("hit")
            return hit
        task = self._inflight.get(key)
        if task is not None:
            self.stats.shared += 1
            self._count("shared")
        else:
            self.stats.misses += 1
            self._count("miss")
            task = self._tasks.spawn(self._resolve(key), name=f"dns {key[0]} {key[1]}")
            self._inflight[key] = task
        # Shielded: one session giving up must not cancel the query others wait for.
        return await asyncio.shield(task)

    async def _resolve(self, key: tuple[str, str]) -> Answer:
        try:
            started = self.clock()
            answer = await self._query(*key)
            if self.metrics is not None:
                self.metrics.dns_latency.labels(key[1]).observe(self.clock() - started)
                self.metrics.dns_answers.labels(key[1], answer.status.value).inc()
            self._store(key, answer)
            return answer
        finally:
            self._inflight.pop(key, None)

    async def _query(self, name: str, rdtype: str) -> Answer:
        last = failed(name, rdtype, "ERROR", "no resolver configured")
        for server in self.config.resolvers:
            trusted = server.host.is_loopback or server in self.config.trusted
            response = await self._ask(server, name, rdtype, cd=False)
            if isinstance(response, Answer):
                last = response  # transport trouble: try the next resolver
                continue
            cd = None
            if (response.rcode() == dns.rcode.SERVFAIL
                    and not {e.code for e in response.extended_errors()} & EDE_DNSSEC):
                asked = await self._ask(server, name, rdtype, cd=True)
                cd = asked if isinstance(asked, dns.message.QueryMessage) else None
            assert isinstance(response, dns.message.QueryMessage)
            return classify(response, name, rdtype, trusted, cd)
        return last

    async def _ask(self, server: Endpoint, name: str, rdtype: str,
                   cd: bool) -> dns.message.QueryMessage | Answer:
        query = dns.message.make_query(name, rdtype, want_dnssec=True, payload=1232)
        query.flags |= dns.flags.AD  # RFC 6840 5.7: ask for the AD bit explicitly
        if cd:
            query.flags |= dns.flags.CD
        self.stats.queries += 1
        self.stats.by_key[(name, rdtype)] = self.stats.by_key.get((name, rdtype), 0) + 1
        try:
            async with self._sem:
                response, _ = await dns.asyncquery.udp_with_fallback(
                    query, str(server.host), timeout=self.config.timeout, port=server.port)
        except (dns.exception.Timeout, TimeoutError):
            return failed(name, rdtype, "TIMEOUT", f"no answer from {server}")
        except (OSError, dns.exception.DNSException, ValueError) as exc:
            return failed(name, rdtype, "ERROR", f"{server}: {type(exc).__name__}: {exc}")
        if not isinstance(response, dns.message.QueryMessage):
            return failed(name, rdtype, "ERROR", f"{server}: not a query response")
        return response

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.dns_cache.labels(result).inc()

    async def close(self) -> None:
        await self._tasks.cancel_all()


def _norm(name: str) -> str:
    name = name.lower()
    return name if name.endswith(".") else name + "."

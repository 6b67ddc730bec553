"""What the process says about itself: the DNS self-test, the config it runs and how the
last reload went.  ``/healthz`` and ``/status`` (gateway.metrics) and ``smtpgate status`` /
``smtpgate reload`` (gateway.cli) read it; Prometheus reads the same facts as gauges.

A gateway whose resolver does not validate cannot do DANE: under ``dane`` it defers, under
``may`` it delivers without checking.  Neither shows in a session's log until mail is
affected, and the resolver is the part most often misconfigured (a forwarder that strips
the AD bit, a non-loopback resolver not in ``dns.trusted``, a broken trust anchor).  So the
gateway asks every resolver, at start, on every reload and every ``dns.selftest.interval``,
for a name that must validate and (when configured) one that must not.

The HTTP status of ``/healthz`` stays what probes need (200 while serving, 503 while
draining): restarting the gateway does not repair a resolver, and mail that needs no DANE
still flows.  The body says what is wrong; alert on the gauges (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from . import __version__
from .answers import Answer, Status
from .config import DnsConfig, DnsSelfTest, Endpoint
from .logs import event, log

ANSWERS, VALIDATES, REJECTS_BOGUS = "answers", "validates", "rejects_bogus"
CHECKS = (ANSWERS, VALIDATES, REJECTS_BOGUS)
# Families a worker leaves to its supervisor (gateway.workers): one process decides them.
RELOAD_OK = "smtpgate_config_last_reload_successful"
RELOAD_TIME = "smtpgate_config_last_reload_success_timestamp_seconds"
SELFTEST = "smtpgate_dns_selftest"
SELFTEST_TIME = "smtpgate_dns_selftest_timestamp_seconds"
FAMILIES = (RELOAD_OK, RELOAD_TIME, SELFTEST, SELFTEST_TIME)


@dataclass(frozen=True, slots=True)
class Check:
    resolver: str  # "127.0.0.1:53", as configured
    check: str  # one of CHECKS
    ok: bool
    detail: str  # what was asked, what came back, and what it means

    def line(self) -> str:
        return f"dns {self.resolver} {self.check}: {'ok' if self.ok else 'FAILED'}: " \
               f"{self.detail}"


def judge(resolver: Endpoint, trusted: bool, secure: Answer, bogus: Answer | None) -> list[Check]:
    """The checks from one resolver's answers (pure: tested on made-up answers)."""
    where = str(resolver)
    if secure.rcode in ("TIMEOUT", "ERROR"):
        why = secure.detail or secure.rcode
        return [Check(where, ANSWERS, False, f"{secure.name} DNSKEY: {why}"),
                Check(where, VALIDATES, False, "not asked: the resolver does not answer"),
                *([Check(where, REJECTS_BOGUS, False,
                         "not asked: the resolver does not answer")] if bogus else [])]
    checks = [Check(where, ANSWERS, True, f"{secure.name} DNSKEY: {secure.rcode}")]
    if secure.status is Status.SECURE and secure.exists:
        checks.append(Check(where, VALIDATES, True, f"{secure.name} DNSKEY is secure"))
    elif secure.status is Status.INSECURE and not trusted:
        checks.append(Check(where, VALIDATES, False,
                            f"{secure.name} DNSKEY: its AD bit is not believed: the resolver "
                            "is neither on loopback nor in dns.trusted"))
    elif secure.status is Status.INSECURE:
        checks.append(Check(where, VALIDATES, False,
                            f"{secure.name} DNSKEY came back without the AD bit: the resolver "
                            "does not validate DNSSEC (or has no trust anchor)"))
    else:
        checks.append(Check(where, VALIDATES, False,
                            f"{secure.name} DNSKEY came back {secure.status} ({secure.rcode}"
                            f"{': ' + secure.detail if secure.detail else ''}): check the "
                            "resolver's trust anchor and its clock"))
    if bogus is not None:
        if bogus.status is Status.BOGUS:
            checks.append(Check(where, REJECTS_BOGUS, True, f"{bogus.name} A is bogus"))
        else:
            checks.append(Check(where, REJECTS_BOGUS, False,
                                f"{bogus.name} A came back {bogus.status} ({bogus.rcode}), "
                                "not bogus: the resolver accepts data that fails validation"))
    return checks


async def selftest(config: DnsConfig) -> list[Check]:
    """Asks every resolver on its own (a dead second resolver shows), without the shared
    cache: the answer must be fresh, and the sessions' cache must not be touched."""
    from .dns import Resolver  # dnspython's resolver machinery only where it is used

    test = config.selftest
    if test.secure is None:
        return []

    async def one(server: Endpoint) -> list[Check]:
        single = dataclasses.replace(config, resolvers=(server,))
        resolver = Resolver(single)
        try:
            secure, bogus = await asyncio.gather(
                resolver.lookup(test.secure or ".", "DNSKEY"),
                resolver.lookup(test.bogus, "A") if test.bogus else _none())
        finally:
            await resolver.close()
        trusted = server.host.is_loopback or server in config.trusted
        return judge(server, trusted, secure, bogus)

    # Each lookup is bounded by dns.timeout (twice: the CD retry after a SERVFAIL).
    results = await asyncio.gather(*(one(server) for server in config.resolvers))
    return [check for checks in results for check in checks]


async def _none() -> None:
    return None


class Health:
    """The facts, their gauges, and the reports built from them."""

    def __init__(self, registry: CollectorRegistry, source: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.reload_ok = Gauge(RELOAD_OK, "1 when the last reload (or the start) succeeded, "
                               "0 when the last reload was rejected.", registry=registry)
        self.reload_time = Gauge(RELOAD_TIME, "When the running config was loaded (start "
                                 "or the last successful reload), seconds since the epoch.",
                                 registry=registry)
        self.dns = Gauge(SELFTEST, "DNS self-test per configured resolver: 1 passed, 0 "
                         "failed; check: answers, validates (a signed name comes back "
                         "secure), rejects_bogus (only when dns.selftest.bogus is set).",
                         ["resolver", "check"], registry=registry)
        self.dns_time = Gauge(SELFTEST_TIME, "When the DNS self-test last ran, seconds since "
                              "the epoch (0: not yet).", registry=registry)
        self.started = clock()
        self.source = source
        self.loaded = self.started
        self.reload_ok.set(1)
        self.reload_time.set(self.started)
        self.reloads = 0  # reloads decided, accepted or not: `smtpgate reload` waits for +1
        self.last_reload: dict[str, Any] | None = None
        self.checks: list[Check] | None = None  # None: not run yet (or turned off)
        self.selftest_config: DnsSelfTest | None = None

    # -- the config ----------------------------------------------------------------------
    def reloaded(self, ok: bool, source: str, error: str = "") -> None:
        now = self.clock()
        self.reloads += 1
        self.last_reload = {"at": now, "result": "ok" if ok else "rejected",
                            **({"error": error} if error else {})}
        self.reload_ok.set(1 if ok else 0)
        if ok:
            self.source, self.loaded = source, now
            self.reload_time.set(now)

    # -- DNS -----------------------------------------------------------------------------
    def dns_result(self, checks: Sequence[Check]) -> bool:
        """Records a self-test; True when its verdict differs from the last one."""
        before = None if self.checks is None else {(c.resolver, c.check, c.ok)
                                                   for c in self.checks}
        self.checks = list(checks)
        self.dns.clear()  # a reload may have changed the resolvers: no stale series
        for c in checks:
            self.dns.labels(c.resolver, c.check).set(1 if c.ok else 0)
        self.dns_time.set(self.clock())
        return before != {(c.resolver, c.check, c.ok) for c in checks}

    async def run_selftest(self, config: DnsConfig, why: str) -> list[Check]:
        """One self-test, logged: at start and reload always, periodically on a change."""
        if config.selftest.secure is None:
            self.checks = None
            self.dns.clear()
            return []
        checks = await selftest(config)
        changed = self.dns_result(checks)
        failed = [c for c in checks if not c.ok]
        if why != "interval" or changed:
            fields: dict[str, object] = {"trigger": why, "result": "failed" if failed else "ok"}
            if failed:
                fields["problems"] = "; ".join(f"{c.resolver} {c.check}: {c.detail}"
                                               for c in failed)
            event(log, "dns self-test", logging.WARNING if failed else logging.INFO, **fields)
        return checks

    async def selftest_loop(self, config: Callable[[], DnsConfig],
                            wake: asyncio.Event) -> None:
        """At start, then every interval of the config in force, and at once when ``wake``
        is set (a reload)."""
        why = "start"
        while True:
            current = config()
            await self.run_selftest(current, why)
            interval = current.selftest.interval
            try:
                async with asyncio.timeout(interval or None):
                    await wake.wait()
                why = "reload"
            except TimeoutError:
                why = "interval"
            wake.clear()

    # -- reports -------------------------------------------------------------------------
    def problems(self) -> list[str]:
        found = [c.line() for c in self.checks or () if not c.ok]
        if self.last_reload is not None and self.last_reload["result"] == "rejected":
            found.append(f"config: the last reload was rejected: {self.last_reload['error']}; "
                         f"running {self.source} as loaded at {_stamp(self.loaded)}")
        return found

    def status(self) -> dict[str, Any]:
        """The JSON of ``/status`` (without what the caller adds: sessions, workers)."""
        now = self.clock()
        return {
            "version": __version__, "pid": os.getpid(),
            "started": _stamp(self.started), "uptime_seconds": round(now - self.started, 3),
            "config": {"source": self.source, "loaded": _stamp(self.loaded),
                       "age_seconds": round(now - self.loaded, 3)},
            "reloads": self.reloads,
            "last_reload": None if self.last_reload is None else {
                **self.last_reload, "at": _stamp(self.last_reload["at"])},
            "dns": None if self.checks is None else [dataclasses.asdict(c)
                                                     for c in self.checks],
            "problems": self.problems(),
        }


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

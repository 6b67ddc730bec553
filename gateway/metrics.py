"""Every metric, defined once, on a registry passed in (tests build their own), and the
exporter that serves it.

Labels are low-cardinality by construction: direction, outcome, reason — never a peer address
or a domain, so the number of series stays flat whatever the traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import platform
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from . import __version__
from .config import Direction, Endpoint

log = logging.getLogger("smtpgate")

# Session outcomes; every value is pre-created so dashboards see zeros, not gaps.
OUTCOMES = (
    "relayed", "client_reset", "upstream_reset", "timeout_idle", "timeout_session", "aborted",
    "upstream_failed", "refused_limit", "refused_loop", "refused_intercept", "deferred",
    "refused_smuggling",
)
# Inbound smuggling shield (gateway.shield): what it did, and to what.
SMUGGLING = (("normalized", "bare_lf"), ("normalized", "bare_cr"), ("refused", "bare_lf"),
             ("refused", "bare_cr"), ("refused", "pipelining"), ("refused", "protocol"))
RECIPIENT_LABELS = (("allowed", "none"), ("allowed", "tls"), ("allowed", "dane"),
                    ("allowed", "mta_sts"), ("deferred", "dns"), ("deferred", "not_encrypted"),
                    ("deferred", "key_mismatch"), ("deferred", "policy"),
                    ("deferred", "mta_sts"))
# MTA-STS (gateway.sts, gateway.stsfetch): HTTPS fetches of policies by result, and the
# verdicts per recipient by the policy's mode and the RFC 8460 result type.
STS_FETCH_RESULTS = ("ok", "http_status", "redirect", "content_type", "too_large", "invalid",
                     "tls", "timeout", "network")
STS_MODES = ("enforce", "testing", "none")
STS_RESULTS = ("success", "starttls_not_supported", "certificate_host_mismatch",
               "certificate_not_trusted", "certificate_expired", "validation_failure", "dns",
               "no_policy")
TLS_RESULTS = ("dane", "fingerprint", "tls", "end_to_end", "plaintext", "passthrough",
               "deferred")
TLS_REASONS = ("none", "not_offered", "starttls_refused", "handshake", "verify", "injection",
               "capabilities", "policy", "dns", "protocol", "fallback", "other")
# What became of an MTA's own STARTTLS (outbound): see config.MtaStartTls.
MTA_STARTTLS = ("terminated", "hidden", "stepped_aside")
CONNECT_FAILURES = ("refused", "timeout", "unreachable", "reset", "resources", "error")
STREAMS = ("client_to_upstream", "upstream_to_client")
DNS_TYPES = ("PTR", "A", "AAAA", "MX", "TLSA")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.sessions = Counter(
            "smtpgate_sessions", "Sessions ended, by direction and outcome.",
            ["direction", "outcome"], registry=registry)
        self.active = Gauge(
            "smtpgate_sessions_active", "Sessions in progress.", ["direction"],
            registry=registry)
        self.bytes = Counter(
            "smtpgate_relayed_bytes", "Bytes relayed, by direction and stream.",
            ["direction", "stream"], registry=registry)
        self.duration = Histogram(
            "smtpgate_session_duration_seconds", "Session duration, accept to close.",
            ["direction"], registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
        self.connect_failures = Counter(
            "smtpgate_upstream_connect_failures", "Upstream connections that failed, by reason.",
            ["direction", "reason"], registry=registry)
        self.reloads = Counter(
            "smtpgate_config_reloads", "Configuration reloads, by result.", ["result"],
            registry=registry)
        self.buffered = Gauge(
            "smtpgate_relay_buffered_bytes",
            "Bytes held in user space by all sessions, waiting for a slow peer.",
            registry=registry)
        self.dns_cache = Counter(
            "smtpgate_dns_cache", "DNS lookups by cache result: hit, miss (a query was "
            "sent), shared (joined a query already in flight).", ["result"], registry=registry)
        self.dns_latency = Histogram(
            "smtpgate_dns_lookup_seconds", "Time to answer a DNS lookup that missed the cache.",
            ["rdtype"], registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.dns_answers = Counter(
            "smtpgate_dns_answers", "DNS answers by record type and DNSSEC status.",
            ["rdtype", "status"], registry=registry)
        self.tls = Counter(
            "smtpgate_upgrades", "TLS outcomes of sessions, by direction: authenticated by "
            "DANE or a pinned key, unauthenticated TLS, the MTA's own TLS, plaintext, "
            "passthrough, or deferred (4xx); reason says why it was not better.",
            ["direction", "result", "reason"], registry=registry)
        self.recipients = Counter(
            "smtpgate_recipients", "Recipients checked against their domain's DANE MX for "
            "the destination: allowed, or deferred with 450 4.7.5 (reason).",
            ["result", "reason"], registry=registry)
        self.mta_starttls = Counter(
            "smtpgate_mta_starttls", "Outbound sessions whose MTA offered or used STARTTLS "
            "itself toward a peer: terminated (the gateway answered it and verified the peer), "
            "hidden (withdrawn from the EHLO reply), stepped_aside (left to the MTA).",
            ["handling"], registry=registry)
        self.smuggling = Counter(
            "smtpgate_smuggling", "Inbound sessions in which the smuggling shield made the "
            "client's stream strict (normalized) or ended the session (refused), by what it met: "
            "bare_lf, bare_cr, pipelining (bytes before the reply to DATA), protocol.",
            ["action", "kind"], registry=registry)
        self.sts_fetches = Counter(
            "smtpgate_mta_sts_fetches", "HTTPS fetches of MTA-STS policies, by result.",
            ["result"], registry=registry)
        self.sts_policies = Gauge(
            "smtpgate_mta_sts_policies", "MTA-STS policies held (in force or kept past a "
            "failed refresh), by mode.", ["mode"], registry=registry)
        self.sts_recipients = Counter(
            "smtpgate_mta_sts_recipients", "Recipients whose domain's MTA-STS policy was "
            "applied, by the policy's mode and the result (RFC 8460 result types; "
            "no_policy: mta_sts require without a valid policy).",
            ["mode", "result"], registry=registry)
        self.tlsrpt_reports = tlsrpt_reports(registry)
        self.build = Info("smtpgate_build", "Version of smtpgate and its runtime.",
                          registry=registry)
        self.build.info({"version": __version__, "python": platform.python_version()})
        for d in Direction:
            self.active.labels(d.value)
            self.duration.labels(d.value)
            for o in OUTCOMES:
                self.sessions.labels(d.value, o)
            for r in CONNECT_FAILURES:
                self.connect_failures.labels(d.value, r)
            for s in STREAMS:
                self.bytes.labels(d.value, s)
        for result in ("ok", "rejected"):
            self.reloads.labels(result)
        for rcpt_result, rcpt_reason in RECIPIENT_LABELS:
            self.recipients.labels(rcpt_result, rcpt_reason)
        for d in Direction:
            # Every pair exists from the start: increase() cannot see a series' first step.
            for tls_result in TLS_RESULTS:
                for tls_reason in TLS_REASONS:
                    self.tls.labels(d.value, tls_result, tls_reason)
        for result in ("hit", "miss", "shared"):
            self.dns_cache.labels(result)
        for fetch in STS_FETCH_RESULTS:
            self.sts_fetches.labels(fetch)
        for sts_mode in STS_MODES:
            self.sts_policies.labels(sts_mode)
            if sts_mode != "none":
                for sts_result in STS_RESULTS:
                    self.sts_recipients.labels(sts_mode, sts_result)
        for handling in MTA_STARTTLS:
            self.mta_starttls.labels(handling)
        for action, kind in SMUGGLING:
            self.smuggling.labels(action, kind)
        for rdtype in DNS_TYPES:
            self.dns_latency.labels(rdtype)
            for status in ("secure", "insecure", "bogus", "failed"):
                self.dns_answers.labels(rdtype, status)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: label values are few by design, and
        ``labels()`` takes a lock and builds a key on every call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def track_buffered(self, fn: Callable[[], int]) -> None:
        """Computed at scrape time: no bookkeeping on the data path."""
        self.buffered.set_function(fn)


TLSRPT_REPORTS = "smtpgate_tlsrpt_reports"


def tlsrpt_reports(registry: CollectorRegistry) -> Counter:
    """TLS reports delivered or not, by method (mailto, https): one process sends them (the
    supervisor with workers), so it is defined apart for the supervisor's registry too."""
    counter = Counter(TLSRPT_REPORTS, "TLS reports (RFC 8460) by delivery method and result: "
                      "sent (the relay took it, or the HTTPS server answered 2xx) or failed "
                      "(an attempt that failed; it is retried later).", ["method", "result"],
                      registry=registry)
    for method in ("mailto", "https"):
        for result in ("sent", "failed"):
            counter.labels(method, result)
    return counter


class Report(Protocol):
    """What ``/healthz`` and ``/status`` say (gateway.health.Health and the process)."""

    def serving(self) -> bool:
        """False while draining: the probes' 503."""

    def problems(self) -> list[str]:
        """What is wrong while serving (the body of ``/healthz``)."""

    def status(self) -> dict[str, Any]:
        """The JSON of ``/status``."""


class _Exporter(asyncio.Protocol):
    """Answers one HTTP/1.0-style GET per connection; anything else is refused."""

    MAX_REQUEST = 8192
    TIMEOUT = 10.0

    def __init__(self, render: Callable[[], bytes], report: Report) -> None:
        self._render = render
        self._report = report
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # A scraper that connects and says nothing must not hold a socket for ever.
        self._timer = asyncio.get_running_loop().call_later(self.TIMEOUT,
                                                                  self._transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if b"\r\n\r\n" not in self._buf and b"\n\n" not in self._buf:
            if len(self._buf) > self.MAX_REQUEST:
                self._respond(431, b"request too large\n")
            return
        line = bytes(self._buf.split(b"\n", 1)[0]).strip()
        parts = line.split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            self._respond(405, b"only GET\n")
            return
        path = parts[1].split(b"?", 1)[0]
        if path == b"/metrics":
            self._respond(200, self._render(), CONTENT_TYPE_LATEST, head=parts[0] == b"HEAD")
        elif path in (b"/healthz", b"/"):
            # The status code is for probes: serving or not.  The body says what is wrong
            # (first line: ok, degraded or draining; then one line per problem).
            if not self._report.serving():
                self._respond(503, b"draining\n")
            elif problems := self._report.problems():
                self._respond(200, "".join(f"{line}\n"
                                           for line in ["degraded", *problems]).encode())
            else:
                self._respond(200, b"ok\n")
        elif path == b"/status":
            self._respond(200, json.dumps(self._report.status(), indent=1).encode() + b"\n",
                          "application/json")
        else:
            self._respond(404, b"not found\n")

    def _respond(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
                 head: bool = False) -> None:
        assert self._transport is not None
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 503: "Service Unavailable"}[status]
        header = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        self._transport.write(header.encode() + (b"" if head else body))
        self._transport.close()


async def serve(registry: CollectorRegistry | Callable[[], bytes], listen: Endpoint | str,
                report: Report) -> asyncio.Server:
    """The Prometheus endpoint, on the gateway's own loop (no thread, nothing to fork).

    ``registry`` may be a render function instead (the worker supervisor's aggregate);
    ``listen`` a Unix socket path (a worker answering its supervisor)."""
    loop = asyncio.get_running_loop()
    render = registry if callable(registry) else (lambda: generate_latest(registry))
    if isinstance(listen, str):
        return await loop.create_unix_server(lambda: _Exporter(render, report), listen)
    return await loop.create_server(lambda: _Exporter(render, report), str(listen.host),
                                    listen.port, reuse_address=True)


def aggregate(expositions: list[str], retired: Sequence[str] = (),
              drop: Collection[str] = ()) -> bytes:
    """Several workers' expositions as one: samples with the same name and labels are added
    (counters, gauges, histogram buckets and sums); ``_created`` takes the earliest; info
    series are the same everywhere and taken once.

    ``retired``: the last expositions of workers that have died; only their counters and
    histograms count (what they counted happened; their gauges are gone), so the sum never
    decreases while the supervisor runs.  ``drop``: families left out (the supervisor
    exports its own)."""
    families: dict[str, tuple[str, str]] = {}  # name -> (type, help)
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    order: dict[str, list[tuple[str, tuple[tuple[str, str], ...]]]] = {}
    for text, dead in [*((t, False) for t in expositions), *((t, True) for t in retired)]:
        for family in text_string_to_metric_families(text):
            # (a counter's _created comes as a gauge family of its own: dropped with it)
            if family.name.removesuffix("_created") in drop or (
                    dead and family.type not in ("counter", "histogram")):
                continue
            families.setdefault(family.name, (family.type, family.documentation))
            for sample in family.samples:
                if dead and sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    order.setdefault(family.name, []).append(key)
                    values[key] = sample.value
                elif sample.name.endswith("_created"):
                    values[key] = min(values[key], sample.value)
                elif family.type != "info" and not sample.name.endswith("_info"):
                    values[key] += sample.value
    lines: list[str] = []
    for name, (mtype, doc) in families.items():
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {mtype}")
        for sample_name, labels in order.get(name, []):
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{rendered}}} {_number(values[(sample_name, labels)])}"
                         if rendered else
                         f"{sample_name} {_number(values[(sample_name, labels)])}")
    return ("\n".join(lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))

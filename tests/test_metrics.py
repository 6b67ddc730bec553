"""Metrics live on a registry passed in, and the exporter serves it over real HTTP."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket

import uvloop
from prometheus_client import CollectorRegistry

from gateway.config import Endpoint
from gateway.metrics import OUTCOMES, Metrics, serve


def test_metrics_on_own_registry_with_preset_labels() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    ma, _ = Metrics(a), Metrics(b)
    ma.sessions.labels("outbound", "relayed").inc()
    assert a.get_sample_value("smtpgate_sessions_total",
                              {"direction": "outbound", "outcome": "relayed"}) == 1
    assert b.get_sample_value("smtpgate_sessions_total",
                              {"direction": "outbound", "outcome": "relayed"}) == 0
    for outcome in OUTCOMES:  # dashboards see zeros, not gaps
        assert a.get_sample_value("smtpgate_sessions_total",
                                  {"direction": "inbound", "outcome": outcome}) == 0
    info = a.get_sample_value("smtpgate_build_info", {"version": "0.1.0",
                                                      "python": __import__("platform")
                                                      .python_version()})
    assert info == 1


def test_no_label_carries_an_address() -> None:
    reg = CollectorRegistry()
    Metrics(reg)
    labels = {k for fam in reg.collect() for s in fam.samples for k in s.labels}
    assert labels <= {"direction", "outcome", "stream", "reason", "result", "le", "version",
                      "python", "rdtype", "status", "handling", "action", "kind", "mode",
                      "method"}


def test_buffered_gauge_is_computed_at_scrape() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    held = [0]
    m.track_buffered(lambda: held[0])
    held[0] = 12345
    assert reg.get_sample_value("smtpgate_relay_buffered_bytes") == 12345


def _get(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_exporter_serves_metrics_health_and_refuses_the_rest() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.sessions.labels("outbound", "upstream_failed").inc(3)
    draining = [False]
    problems: list[str] = []

    class Report:
        def serving(self) -> bool:
            return not draining[0]

        def problems(self) -> list[str]:
            return problems

        def status(self) -> dict[str, object]:
            return {"pid": 1, "problems": problems}

    async def main() -> None:
        server = await serve(reg, Endpoint(ipaddress.ip_address("127.0.0.1"), 0), Report())
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()

        async def get(req: bytes) -> bytes:
            return await loop.run_in_executor(None, _get, port, req)

        body = await get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert body.startswith(b"HTTP/1.1 200 OK\r\n")
        assert (b'smtpgate_sessions_total{direction="outbound",outcome="upstream_failed"} 3.0'
                in body)
        assert (await get(b"GET /healthz HTTP/1.0\r\n\r\n")).endswith(b"\r\n\r\nok\n")
        # Serving with a problem: still 200 for the probes, the body says what is wrong.
        problems.append("dns 127.0.0.1:53 answers: FAILED: . DNSKEY: no answer")
        degraded = await get(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert degraded.startswith(b"HTTP/1.1 200")
        assert degraded.endswith(b"\r\n\r\ndegraded\ndns 127.0.0.1:53 answers: FAILED: "
                                 b". DNSKEY: no answer\n")
        status = await get(b"GET /status HTTP/1.0\r\n\r\n")
        assert b"Content-Type: application/json" in status
        assert json.loads(status.split(b"\r\n\r\n", 1)[1])["problems"] == problems
        draining[0] = True
        assert (await get(b"GET /healthz HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 503")
        assert (await get(b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await get(b"GET /nope HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await get(b"GET /" + b"a" * 9000)).startswith(b"HTTP/1.1 431")
        server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())


def test_aggregate_sums_workers_and_keeps_the_format() -> None:
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.metrics import aggregate

    regs = [CollectorRegistry(), CollectorRegistry()]
    for n, reg in enumerate(regs, start=1):
        m = Metrics(reg)
        m.sessions.labels("outbound", "relayed").inc(n)
        m.duration.labels("outbound").observe(0.02 * n)
    merged = aggregate([generate_latest(r).decode() for r in regs]).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(merged) for s in f.samples}
    assert samples[("smtpgate_sessions_total",
                    (("direction", "outbound"), ("outcome", "relayed")))] == 3
    assert samples[("smtpgate_session_duration_seconds_count",
                    (("direction", "outbound"),))] == 2
    assert samples[("smtpgate_build_info",
                    (("python", __import__("platform").python_version()),
                     ("version", "0.1.0")))] == 1  # info: once, not summed


def test_a_dead_workers_counts_stay_and_its_gauges_go() -> None:
    """The supervisor keeps a dead worker's last exposition: its counters and histograms
    stay in the sum (a counter never decreases while the supervisor runs), its gauges and
    _created do not; a dropped family is left out everywhere."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.metrics import aggregate

    dead, alive = CollectorRegistry(), CollectorRegistry()
    for reg, n in ((dead, 3), (alive, 1)):
        m = Metrics(reg)
        m.sessions.labels("outbound", "relayed").inc(n)
        m.active.labels("outbound").set(5)
        m.reloads.labels("ok").inc()
    merged = aggregate([generate_latest(alive).decode()], [generate_latest(dead).decode()],
                       drop={"smtpgate_config_reloads"}).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(merged) for s in f.samples}
    relayed = ("smtpgate_sessions_total", (("direction", "outbound"), ("outcome", "relayed")))
    assert samples[relayed] == 4  # 3 from the dead worker, 1 from the live one
    assert samples[("smtpgate_sessions_active", (("direction", "outbound"),))] == 5  # live only
    assert not any(name.startswith("smtpgate_config_reloads") for name, _ in samples)

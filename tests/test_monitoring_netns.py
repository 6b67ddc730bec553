"""A real Prometheus scrapes a real gateway under real traffic; every dashboard query and
every alert expression is evaluated through Prometheus's HTTP API.

The lab is the one of tests/test_upgrade_netns.py (gatelab/upgradelab.py: a legacy
Postfix sending through the gateway to Postfix peers, with NSD + Unbound for DNSSEC), so
the traffic includes DANE, opportunistic TLS, a plaintext fallback and deferrals (a key
that does not match its TLSA, a TLSA without STARTTLS). Prometheus (the Debian binary) runs
in the gateway's namespace as a child of the test, scrapes 127.0.0.1:9125 every second and
evaluates deploy/prometheus/alerts.yaml every second; the test talks to it through an
in-process socket in that namespace.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from gatelab import dnslab, netlab, postfix_instance
from gatelab import upgradelab as upgrade
from gatelab.monitoring import (
    ALERTS,
    Prometheus,
    alert_rules,
    dashboard_queries,
    load_dashboard,
    promtool,
    substitute,
    variable_queries,
    variable_values,
)
from gatelab.netlab import Netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus")
if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)
if PROMETHEUS is None or shutil.which("promtool") is None:
    pytest.skip("prometheus not installed (Debian package prometheus; scripts/bootstrap-debian)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[upgrade.World]:
    """The upgrade lab, built once for this module."""
    with upgrade.upgrade_lab(tmp_path_factory.mktemp("upgrade")) as w:
        yield w


JOB = "smtpgate"
# Destination of each test_upgrade_netns route used here, and what the gateway does there.
TRAFFIC = {
    "dane": "203.0.113.2:25",  # TLSA matches: tls=dane
    "nodane": "203.0.113.3:25",  # no TLSA: tls=tls (opportunistic)
    "wrong": "203.0.113.4:25",  # TLSA does not match: deferred, reason verify
    "notls": "203.0.113.5:25",  # TLSA but no STARTTLS: deferred, reason not_offered
    "old": "203.0.113.6:25",  # TLS 1.0/1.1 only: plaintext after the fallback
}
# Panels that must show more than zeros after that traffic (the others must show data).
NONZERO = {
    "Sessions / s", "Encrypted (time range)", "Authenticated (time range)",
    "Deferred (time range)", "Exporters up", "Sessions by outcome", "Session duration",
    "Encrypted and authenticated share", "Upgrade results", "Why not better (time range)",
    "Deferred sessions", "Deferral reasons", "Deferral reasons (time range)",
    "Session duration distribution", "DNS lookup latency", "DNS cache", "DNS cache hit rate",
    "DNS answers by DNSSEC status", "Relayed bytes", "Versions",
}


def _free_port(ns: Netns) -> int:
    sock = ns.listen("127.0.0.1", 0)
    with sock:
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def prometheus(world: upgrade.World,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [
            {"targets": [f"{world.gw.host}:{world.gw.metrics_port}"]}]}],
    }))
    cp = promtool("check", "config", str(config))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    ns = world.lab.gw
    with Prometheus(ns, work, config, _free_port(ns), "--storage.tsdb.retention.time=1h") as prom:
        yield prom


def _send_round(w: upgrade.World, n: int) -> None:
    """One mail per route; waits for the gateway's n-th session line to each destination."""
    for user in TRAFFIC:
        upgrade.send(w, user)
    for destination in TRAFFIC.values():
        upgrade.session_for(w, destination, n)


@pytest.fixture(scope="module")
def traffic(world: upgrade.World, prometheus: Prometheus) -> dict[str, float]:
    """Two rounds of mail, each seen by a scrape, so that every counter that moves has a
    sample before and after (rate() needs two; a series first created by round 1, such as
    upgrades with reason verify, moves again in round 2). Returns timings."""
    t0 = time.monotonic()
    prometheus.wait_for(f'up{{job="{JOB}"}} == 1')
    t_scraped = time.monotonic()
    _send_round(world, 1)
    prometheus.wait_for('smtpgate_upgrades_total{result="deferred",reason="verify"} >= 1')
    _send_round(world, 2)
    prometheus.wait_for('sum(smtpgate_upgrades_total{result="dane"}) >= 2')
    # A few more scrapes and rule evaluations after the last session.
    time.sleep(2.5)
    return {"first_scrape": t_scraped - t0, "traffic": time.monotonic() - t_scraped}


def _finite(result: list[dict[str, Any]]) -> list[float]:
    return [v for v in (float(s["value"][1]) for s in result) if math.isfinite(v)]


def _values(prometheus: Prometheus) -> dict[str, str]:
    def resolve(selector: str, label: str) -> list[str]:
        result = prometheus.vector(f"count by ({label}) ({selector})")
        return sorted(s["metric"][label] for s in result)
    return variable_values(load_dashboard(), resolve)


def test_prometheus_scrapes_the_gateway(prometheus: Prometheus, traffic: dict[str, float]
                                        ) -> None:
    targets = prometheus.api("targets")["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [(JOB, "up")], targets
    assert _finite(prometheus.vector(f'up{{job="{JOB}"}}')) == [1.0]


def test_running_gateway_output_passes_promtool_check_metrics(
        world: upgrade.World, traffic: dict[str, float]) -> None:
    text = world.gw.scrape()
    assert 'result="deferred"' in text and 'reason="verify"' in text  # after traffic
    cp = promtool("check", "metrics", stdin=text)
    assert cp.returncode == 0 and not (cp.stdout + cp.stderr).strip(), cp.stdout + cp.stderr


def test_every_dashboard_query_returns_data(prometheus: Prometheus,
                                            traffic: dict[str, float]) -> None:
    dash = load_dashboard()
    values = _values(prometheus)
    assert values["job"] == JOB
    problems = []
    for name, selector, label in variable_queries(dash):
        if not prometheus.vector(f"count by ({label}) ({substitute(selector, values)})"):
            problems.append(f"variable ${name}: no values")
    for title, ref, expr in dashboard_queries(dash):
        query = substitute(expr, values)
        doc = prometheus.query(query)
        if doc["status"] != "success":
            problems.append(f"{title!r} {ref}: {doc.get('error')} in {query}")
            continue
        result = doc["data"]["result"]
        finite = _finite(result)
        if not finite:
            problems.append(f"{title!r} {ref}: no data ({len(result)} series, none finite): "
                            f"{query}")
        elif title in NONZERO and ref == "A" and not any(finite):
            problems.append(f"{title!r} {ref}: only zeros after traffic: {query}")
    assert problems == []


def test_every_alert_expression_evaluates(prometheus: Prometheus,
                                          traffic: dict[str, float]) -> None:
    for rule in alert_rules():
        doc = prometheus.query(rule["expr"])
        assert doc["status"] == "success", (rule["alert"], doc)
    # Prometheus loaded the same file and evaluates every rule without error.
    [group] = prometheus.api("rules")["data"]["groups"]
    loaded = {r["name"]: r for r in group["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" and not r.get("lastError") for r in loaded.values()), \
        loaded


def test_verify_failure_alert_fires_on_real_traffic(prometheus: Prometheus,
                                                    traffic: dict[str, float]) -> None:
    deadline = time.monotonic() + 10
    while True:
        alerts = {a["labels"]["alertname"]: a["state"]
                  for a in prometheus.api("alerts")["data"]["alerts"]}
        if alerts.get("SmtpgateTlsVerifyFailures") == "firing" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert alerts.get("SmtpgateTlsVerifyFailures") == "firing", alerts
    for quiet in ("SmtpgateExporterDown", "SmtpgateDnsFailures", "SmtpgateSessionLimit",
                  "SmtpgateForwardingLoop", "SmtpgateConfigReloadRejected",
                  "SmtpgateStartTlsInjection"):
        assert quiet not in alerts, alerts


def test_exporter_down_is_seen_when_the_gateway_stops(world: upgrade.World,
                                                      prometheus: Prometheus,
                                                      traffic: dict[str, float]) -> None:
    """Last in this module: it stops the lab's gateway."""
    world.gw.stop()
    [rule] = [r for r in alert_rules() if r["alert"] == "SmtpgateExporterDown"]
    assert prometheus.wait_for(rule["expr"], timeout=10)
    # for: 2m, so the alert is pending, not yet firing.
    deadline = time.monotonic() + 10
    while True:
        alerts = {a["labels"]["alertname"]: a["state"]
                  for a in prometheus.api("alerts")["data"]["alerts"]}
        if "SmtpgateExporterDown" in alerts or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert alerts.get("SmtpgateExporterDown") == "pending", alerts

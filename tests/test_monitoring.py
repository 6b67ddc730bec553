"""The monitoring kit checked against the exporter: Prometheus alert rules (deploy/prometheus)
with promtool, and the Grafana dashboard (grafana/) for JSON shape and metric names.

Fast tier: no namespace, no Prometheus server. tests/test_monitoring_netns.py runs a real
Prometheus against a real gateway and evaluates the same queries there; the helpers it
shares with this file live in gatelab/monitoring.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram, generate_latest

from gatelab.monitoring import (
    ALERTS,
    ALERTS_TEST,
    DASH_PROVISIONING,
    DS_PROVISIONING,
    GRAFANA_BUILTINS,
    PROM_CONFIG,
    PROMTOOL,
    alert_rules,
    all_panels,
    dashboard_queries,
    load_dashboard,
    process_registry,
    promtool,
    substitute,
    variable_queries,
    variable_values,
    variables_used,
)

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package prometheus; scripts/bootstrap-debian)")

METRIC_RE = re.compile(r"(?<![\w:])smtpgate_[a-z0-9_]+")


# -- what the exporter exposes ----------------------------------------------------------

# A plausible value per label name, to count one sample of every metric whatever its labels.
PLAUSIBLE_LABELS = {"direction": "outbound", "outcome": "deferred", "stream": "client_to_upstream",
                    "result": "deferred", "reason": "verify", "rdtype": "TLSA",
                    "status": "secure"}


def exporter_text(observe: bool = True) -> str:
    """The exporter's real output: gateway.metrics.Metrics on a fresh registry; with
    ``observe``, one sample of every counter, gauge and histogram counted (so label pairs
    that are not created at start, such as upgrades with reason verify, are there too)."""
    registry, m = process_registry()
    if observe:
        m.track_buffered(lambda: 4096)
        for metric in vars(m).values():
            if not isinstance(metric, Counter | Gauge | Histogram) or metric is m.buffered:
                continue
            names = getattr(metric, "_labelnames", ())
            child = metric.labels(**{n: PLAUSIBLE_LABELS.get(n, "other") for n in names}) \
                if names else metric
            if isinstance(child, Histogram):
                child.observe(0.3)
            else:
                child.inc()
    return generate_latest(registry).decode()


def sample_names(text: str) -> set[str]:
    """Every sample name in an exposition: what PromQL can select."""
    return {line.split("{", 1)[0].split(" ", 1)[0]
            for line in text.splitlines() if line and not line.startswith("#")}


def family_types(text: str) -> dict[str, str]:
    """``# TYPE`` lines: exposed family name → type."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            out[name] = kind
    return out


def base_name(name: str) -> str:
    """smtpgate_x_bucket / _sum / _count / _total / _created / _info → smtpgate_x."""
    return re.sub(r"_(bucket|sum|count|total|created|info)$", "", name)


def metric_names(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


# -- Prometheus ---------------------------------------------------------------------------

@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    cp = promtool("check", "rules", str(ALERTS))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in cp.stdout


@needs_promtool
def test_alert_unit_tests_pass() -> None:
    cp = promtool("test", "rules", str(ALERTS_TEST))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "SUCCESS" in cp.stdout


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    fires: set[str] = set()
    silent: set[str] = set()
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    assert doc["rule_files"] == ["alerts.yaml"]
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            assert check["alertname"] in names, f"{case['name']}: no such alert"
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert names - fires == set(), "alerts never seen firing in alerts_test.yaml"
    assert names - silent == set(), "alerts never seen silent in alerts_test.yaml"
    assert {"SmtpgateExporterDown", "SmtpgateTlsVerifyFailures", "SmtpgateDeferralSpike",
            "SmtpgateDnsFailures"} <= names


def test_alert_rules_are_labelled_and_explained() -> None:
    for rule in alert_rules():
        assert rule["alert"].startswith("Smtpgate")
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@needs_promtool
def test_prometheus_example_config_is_valid_and_scrapes_the_default_endpoint() -> None:
    cp = promtool("check", "config", str(PROM_CONFIG))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    doc = yaml.safe_load(PROM_CONFIG.read_text())
    assert doc["rule_files"] == ["alerts.yaml"]
    [job] = [j for j in doc["scrape_configs"] if j["job_name"] == "smtpgate"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9125"]
    # The exporter-down rule selects this job by name.
    assert any('up{job="smtpgate"}' in rule["expr"] for rule in alert_rules())


@needs_promtool
@pytest.mark.parametrize("observe", [False, True], ids=["at-start", "after-traffic"])
def test_exporter_output_passes_promtool_check_metrics(observe: bool) -> None:
    cp = promtool("check", "metrics", stdin=exporter_text(observe))
    # promtool prints lint problems (e.g. "counter metrics should have _total suffix")
    # and exits non-zero on them.
    assert cp.returncode == 0 and not (cp.stdout + cp.stderr).strip(), cp.stdout + cp.stderr


def test_every_metric_in_the_dashboard_and_the_alerts_is_exposed() -> None:
    """Names are checked as PromQL selects them, i.e. against the exposed sample names
    (smtpgate_sessions_total, smtpgate_session_duration_seconds_bucket, ...): a query for
    smtpgate_sessions (the Python name, without _total) would silently return nothing."""
    exposed = sample_names(exporter_text())
    used: list[tuple[str, str]] = []
    for title, ref, expr in dashboard_queries(load_dashboard()):
        used += [(f"dashboard panel {title!r} {ref}", n) for n in metric_names(expr)]
    for name, selector, _ in variable_queries(load_dashboard()):
        used += [(f"dashboard variable ${name}", n) for n in metric_names(selector)]
    for rule in alert_rules():
        used += [(f"alert {rule['alert']}", n) for n in metric_names(rule["expr"])]
    assert used
    unknown = [(where, n, sorted(e for e in exposed if base_name(e) == base_name(n)))
               for where, n in used if n not in exposed]
    assert unknown == [], "not exposed (where, name, exposed names of that family)"


def test_the_dashboard_charts_every_exposed_metric() -> None:
    """A metric added to gateway/metrics.py needs a panel (``_created`` aside)."""
    charted = {base_name(n) for _, _, e in dashboard_queries(load_dashboard())
               for n in metric_names(e)}
    families = {base_name(n) for n in family_types(exporter_text())
                if not n.endswith("_created")}
    assert families - charted == set(), "exposed but on no dashboard panel"


# -- Grafana ------------------------------------------------------------------------------

def test_dashboard_json_shape() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "smtpgate" and dash["title"] and dash["id"] is None
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    panels = list(all_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in panels if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        # Every panel has a query, and every query goes to the chosen datasource.
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        targets = p.get("targets", [])
        assert targets, f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), p["title"]
        for t in targets:
            assert t["expr"].strip(), f"panel {p['title']!r} {t['refId']}: empty query"
            assert t["datasource"] == p["datasource"], p["title"]
        assert p.get("description"), f"panel {p['title']!r} has no description"


def test_dashboard_variables() -> None:
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for var in variables.values():
        if "datasource" in var:
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    known = set(variables) | set(GRAFANA_BUILTINS)
    for title, ref, expr in dashboard_queries(dash):
        assert variables_used(expr) <= known, (title, ref, variables_used(expr) - known)
        # Every query can be limited to the chosen job and instances.
        assert {"job", "instance"} <= variables_used(expr), (title, ref)
    for name, selector, _ in variable_queries(dash):
        assert variables_used(selector) <= known, name


@needs_promtool
def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool has no "parse this expression" command, but it parses every rule of a rule
    file: each dashboard query, with the variables filled in, becomes a recording rule."""
    dash = load_dashboard()
    values = variable_values(dash)
    queries = dashboard_queries(dash)
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute(expr, values)}
             for i, (_, _, expr) in enumerate(queries)]
    rules += [{"record": f"dashboard:variable_{i}", "expr": substitute(selector, values)}
              for i, (_, selector, _) in enumerate(variable_queries(dash))]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    cp = promtool("check", "rules", str(path))
    where = "\n".join(f"query_{i}: panel {t!r} {r}" for i, (t, r, _) in enumerate(queries))
    assert cp.returncode == 0, f"{cp.stdout}{cp.stderr}\n{where}"
    assert f"SUCCESS: {len(rules)} rules found" in cp.stdout


def test_grafana_provisioning_files() -> None:
    ds = yaml.safe_load(DS_PROVISIONING.read_text())
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    assert source["jsonData"]["timeInterval"] == \
        yaml.safe_load(PROM_CONFIG.read_text())["global"]["scrape_interval"]
    dashboards = yaml.safe_load(DASH_PROVISIONING.read_text())
    assert dashboards["apiVersion"] == 1
    [provider] = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


def test_helpers_read_promql_as_intended() -> None:
    expr = ('histogram_quantile(0.9, sum by (le) (rate(smtpgate_dns_lookup_seconds_bucket'
            '{job=~"$job",instance=~"${instance}"}[$__rate_interval]))) / on() '
            'smtpgate_sessions_total')
    assert metric_names(expr) == {"smtpgate_dns_lookup_seconds_bucket",
                                  "smtpgate_sessions_total"}
    assert variables_used(expr) == {"job", "instance", "__rate_interval"}
    assert substitute(expr, {"job": "j", "instance": ".*", "__rate_interval": "1m"}) \
        .endswith('{job=~"j",instance=~".*"}[1m]))) / on() smtpgate_sessions_total')
    assert base_name("smtpgate_session_duration_seconds_bucket") == \
        "smtpgate_session_duration_seconds"

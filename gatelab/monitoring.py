"""The monitoring kit read back: the Prometheus alert rules (deploy/prometheus) and the
Grafana dashboard (grafana/), their queries with Grafana's variables filled in, and
promtool.  tests/test_monitoring.py checks the kit against the exporter, and
tests/test_monitoring_netns.py evaluates the same queries in a real Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yaml"
ALERTS_TEST = PROM_DIR / "alerts_test.yaml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
GRAFANA_DIR = ROOT / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "smtpgate.json"
DS_PROVISIONING = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yaml"
DASH_PROVISIONING = GRAFANA_DIR / "provisioning" / "dashboards" / "smtpgate.yaml"

PROMTOOL = shutil.which("promtool")

# Grafana's built-in variables, and what they stand for when a query is checked outside
# Grafana (long enough to cover a test's traffic; $__rate_interval is 4 scrapes or more).
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__range": "5m", "__interval": "15s"}
VARIABLE_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES_RE = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", re.S)


# -- the dashboard ----------------------------------------------------------------------

def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def all_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dash.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) for every query of every panel."""
    return [(p.get("title", ""), t.get("refId", ""), t.get("expr", ""))
            for p in all_panels(dash) if p.get("type") != "row"
            for t in p.get("targets", [])]


def variable_queries(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable name, selector, label) of every label_values() variable."""
    out = []
    for var in dash["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = LABEL_VALUES_RE.match(query)
        assert m, f"variable {var['name']}: only label_values(SELECTOR, LABEL) is supported"
        out.append((var["name"], m.group(1), m.group(2)))
    return out


def variables_used(expr: str) -> set[str]:
    return {a or b or c for a, b, c in VARIABLE_RE.findall(expr)}


def substitute(expr: str, values: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return values[name]
    return VARIABLE_RE.sub(sub, expr)


def variable_values(dash: dict[str, Any],
                    resolve: Callable[[str, str], list[str]] | None = None) -> dict[str, str]:
    """What Grafana would put in for each variable on first load: "All" where that is the
    current choice (its allValue), the current value of a custom variable, and the first
    value of a query variable (``resolve(selector, label)`` asks Prometheus; without it a
    placeholder that matches the shape)."""
    values = dict(GRAFANA_BUILTINS)
    for var in dash["templating"]["list"]:
        name, kind = var["name"], var["type"]
        current = var.get("current") or {}
        cur = current.get("value")
        if kind == "datasource":
            continue
        if var.get("includeAll") and cur in ("$__all", ["$__all"]):
            values[name] = var.get("allValue") or ".*"
        elif kind in ("custom", "interval", "constant", "textbox") and cur:
            values[name] = cur[0] if isinstance(cur, list) else cur
        elif kind == "query":
            _, selector, label = next(v for v in variable_queries(dash) if v[0] == name)
            found = resolve(substitute(selector, values), label) if resolve else [name]
            assert found, f"variable {name}: label_values({selector}, {label}) is empty"
            values[name] = found[0]
        else:
            raise AssertionError(f"variable {name}: no value for type {kind}")
    return values


# -- the alert rules --------------------------------------------------------------------

def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)

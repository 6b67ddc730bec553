"""The monitoring kit read back: the Prometheus alert rules (deploy/prometheus) and the
Grafana dashboard (grafana/), their queries with Grafana's variables filled in, and
promtool.  tests/test_monitoring.py checks the kit against the exporter, and
tests/test_monitoring_netns.py evaluates the same queries in a real Prometheus
(:class:`Prometheus`: Debian's binary in a lab namespace, and its HTTP API; the demo's
sites scrape with it too)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import yaml
from prometheus_client import CollectorRegistry

from gatelab.netlab import Netns, http_get
from gateway.health import Check, Health
from gateway.metrics import Metrics

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


def process_registry() -> tuple[CollectorRegistry, Metrics]:
    """A registry as a gateway process fills it: every metric of gateway.metrics and the
    health gauges of gateway.health, with one DNS self-test verdict so that the self-test's
    labelled series exist."""
    registry = CollectorRegistry()
    m = Metrics(registry)
    Health(registry, "<config>").dns_result([Check("127.0.0.1:53", "validates", True, "")])
    return registry, m

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


# -- a Prometheus server ------------------------------------------------------------------

class Prometheus:
    """Prometheus (Debian's binary) in ``ns`` on 127.0.0.1:``port``, started from the config
    file ``config`` with its data and log under ``work``, ``args`` added to its command line;
    and its HTTP API.  Use as a context manager (stopped by PID)."""

    def __init__(self, ns: Netns, work: Path, config: Path, port: int, *args: str) -> None:
        self.ns, self.work, self.config, self.port, self.args = ns, work, config, port, args
        self.log = work / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Prometheus:
        """Returns once it answers ready; stopped again if it does not."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus not installed (Debian package prometheus)")
        with self.log.open("wb") as out:
            self.proc = self.ns.popen([binary, f"--config.file={self.config}",
                                       f"--storage.tsdb.path={self.work / 'data'}",
                                       f"--web.listen-address=127.0.0.1:{self.port}",
                                       *self.args],
                                      stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, cwd=self.work)
        try:
            self._wait_ready(self.proc, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {proc.returncode}:\n"
                                   f"{self.log.read_text()}")
            try:
                if self.get("/-/ready")[0] == 200:
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.ns.stop(self.proc, timeout=10)  # by PID: SIGTERM, then SIGKILL
            self.proc = None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def get(self, path: str, **params: str) -> tuple[int, bytes]:
        """(HTTP status, body) of ``GET path?params``."""
        head, body = http_get(self.ns, "127.0.0.1", self.port,
                              f"{path}?{urlencode(params)}" if params else path)
        status = head.split(b" ", 2)[1:2]
        if not status or not status[0].isdigit():
            raise ValueError(f"not an HTTP response: {head[:80]!r}")
        return int(status[0]), body

    def api(self, path: str, **params: str) -> dict[str, Any]:
        status, body = self.get(f"/api/v1/{path}", **params)
        doc: dict[str, Any] = json.loads(body)
        assert status in (200, 400, 422), (status, body[:500])
        return doc

    def query(self, expr: str) -> dict[str, Any]:
        """The whole answer ({"status": ..., "data": ...} or the error)."""
        return self.api("query", query=expr, time=f"{time.time():.3f}")

    def vector(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        doc = self.query(expr)
        assert doc["status"] == "success", (expr, doc)
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Polls until ``expr`` has a result (e.g. a comparison that became true)."""
        deadline = time.monotonic() + timeout
        while not (result := self.vector(expr)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result for {expr!r} after {timeout}s\n"
                                   f"{self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        return result

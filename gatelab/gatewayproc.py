"""The real ``smtpgate run`` as a child process inside a lab namespace: its config written
(:func:`gateway_config`), its JSON log and its Prometheus endpoint read back by the tests
(:class:`GatewayProcess`; :class:`LogFollower` reads the log as it grows)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gatelab.netlab import Netns, http_get, wait_port

ROOT = Path(__file__).resolve().parent.parent
# The samples of one metric family: a counter's _total, a histogram's _bucket/_sum/_count.
_SAMPLE_SUFFIXES = ("_total", "_created", "_bucket", "_sum", "_count", "_info")
# Outbound on port 10025, v4 and v6: where Lab.redirect_port25(10025) sends the MTA's port 25.
OUTBOUND_LISTENERS = ("{address: 0.0.0.0, port: 10025}", '{address: "::", port: 10025}')


def gateway_config(*, listeners: Sequence[str] = OUTBOUND_LISTENERS, mark: str = "0x2525",
                   on_failure: str | None = None, max_sessions: int | None = 50,
                   buffer_bytes: int | None = None, connect: float = 2, idle: float = 30,
                   session: float = 120, drain: float = 5, metrics: str = "127.0.0.1:9125",
                   log_level: str = "debug", resolvers: Sequence[str] = (),
                   trusted: Sequence[str] = (), dns_timeout: float = 0.3, budget: float = 1,
                   cache: str | None = None, policy: str = "none", entries: Sequence[str] = (),
                   tls: tuple[Path, Path] | None = None, workers: int | None = None,
                   selftest: str | None = None) -> str:
    """A lab gateway's config (YAML).  ``listeners`` and ``entries`` (policy entries) are
    YAML flow mappings, ``cache`` and ``selftest`` (dns.selftest) the inside of one; ``tls``
    is (key, cert); a limit or setting given as None is left out.  The defaults: the
    outbound listeners above, policy ``none`` (outbound sessions are pure relays) and a DNS
    that gives up fast (no resolver in a lab without a DNS world)."""
    lines = ["listeners:", *(f"  - {listener}" for listener in listeners),
             _flow("upstream", mark=mark, on_failure=on_failure)]
    if max_sessions is not None or buffer_bytes is not None:
        lines.append(_flow("limits", max_sessions=max_sessions, buffer_bytes=buffer_bytes))
    lines += [_flow("timeouts", connect=connect, idle=idle, session=session, drain=drain),
              _flow("metrics", listen=f'"{metrics}"'),
              _flow("log", format="json", level=log_level),
              _flow("dns", resolvers=_list(resolvers), trusted=_list(trusted),
                    timeout=dns_timeout, budget=budget,
                    cache=None if cache is None else f"{{{cache}}}",
                    selftest=None if selftest is None else f"{{{selftest}}}"),
              _flow("policy", default=policy,
                    entries=f"[{', '.join(entries)}]" if entries else None)]
    if tls is not None:
        lines.append(_flow("tls", key=tls[0], cert=tls[1]))
    if workers is not None:
        lines.append(f"workers: {workers}")
    return "\n".join(lines) + "\n"


def _flow(name: str, /, **values: object) -> str:
    """``name: {a: 1, b: 2}``, the values given as None left out."""
    inner = ", ".join(f"{k}: {v}" for k, v in values.items() if v is not None)
    return f"{name}: {{{inner}}}"


def _list(items: Sequence[str]) -> str | None:
    return json.dumps(list(items)) if items else None


class GatewayProcess:
    def __init__(self, ns: Netns, workdir: Path, config: str, *, port: int = 10025,
                 host: str = "127.0.0.1", metrics_port: int = 9125,
                 profile: Path | None = None, root: Path = ROOT) -> None:
        self.ns = ns
        self.root = root  # the source tree run (bench/run --baseline: an earlier commit's)
        # bench/run --profile: the gateway under cProfile, its stats written here at exit
        self.profile = profile
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "smtpgate.yaml"
        self.config_path.write_text(config)
        self.log_path = workdir / "smtpgate.log"
        self.port, self.host, self.metrics_port = port, host, metrics_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> GatewayProcess:
        earlier = len(self.events("started"))
        env = {**os.environ, "PYTHONPATH": str(self.root), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            profiler = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
            self.proc = self.ns.popen([sys.executable, *profiler, "-m", "gateway", "run", "-c",
                                       str(self.config_path)],
                                      stdout=log, stderr=log, env=env, cwd=self.root)
        deadline = time.monotonic() + timeout
        # The log is appended to: a restarted gateway's earlier "started" does not count.
        while len(self.events("started")) <= earlier:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtpgate exited {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"smtpgate did not start:\n{self.log_text()}")
            time.sleep(0.05)
        wait_port(self.ns, self.host, self.metrics_port)
        return self

    def wait_selftest(self, timeout: float = 15.0) -> None:
        """Until the DNS self-test of the start has run (gateway.health): its series and
        its sockets come and go in the background; a test that counts either waits."""
        self.wait_event("dns self-test", timeout=timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        rc = self.ns.stop(self.proc, timeout)
        self.proc = None
        return rc

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        self.ns.stop(self.proc)
        self.proc = None
        return rc

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what it said ------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [doc for doc in log_lines(self.log_text().splitlines())
                if name is None or doc.get("event") == name]

    def sessions(self) -> list[dict[str, Any]]:
        return self.events("session")

    def wait_sessions(self, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(s := self.sessions()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(s)} of {n} session lines:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        return s

    def sessions_to(self, destination: str | None, *, after: int = 0, n: int = 1,
                    where: Callable[[dict[str, Any]], bool] | None = None,
                    timeout: float = 20.0) -> list[dict[str, Any]]:
        """The session lines after the first ``after`` that go to ``destination`` (None:
        anywhere) and pass ``where``, once there are ``n`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [s for s in self.sessions()[after:]
                     if (destination is None or s.get("destination") == destination)
                     and (where is None or where(s))]
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} of {n} sessions to {destination}:\n"
                                   f"{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def wait_event(self, name: str, n: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(e := self.events(name)) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {name!r} x{n}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        return e

    def scrape(self) -> str:
        head, body = http_get(self.ns, self.host, self.metrics_port, "/metrics")
        assert head.startswith(b"HTTP/1.1 200"), head
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value, e.g. metric("smtpgate_sessions_total", outcome="relayed").

        0.0 for a series the metric has not got (a label value never counted yet).  A
        metric the gateway does not export at all raises: a renamed or misspelt metric must
        fail the check that reads it, not read as 0."""
        known = False
        for family in text_string_to_metric_families(self.scrape()):
            if name != family.name and not (name.startswith(family.name + "_") and name[
                    len(family.name):] in _SAMPLE_SUFFIXES):
                continue
            known = True
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        if not known:
            raise KeyError(f"the gateway exports no metric {name!r}")
        return 0.0

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def cli(ns: Netns, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[Any]:
    """The real ``smtpgate`` command inside ``ns``, as an operator runs it on the gateway host
    (output captured as text; the exit status is the caller's to judge)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return ns.run([sys.executable, "-m", "gateway", *args], check=False, env=env, cwd=ROOT,
                  timeout=timeout)


def firewall_leftovers(ns: Netns, table: int = 100) -> list[str]:
    """Everything of ``smtpgate firewall``'s still in ``ns``: nft table, iptables chains and
    socket rules, ip rules and the routes of ``table`` (empty when clean)."""
    found = [line for line in ns.run(["nft", "list", "ruleset"]).stdout.splitlines()
             if "smtpgate" in line.lower()]
    for tool in ("iptables-save", "ip6tables-save"):
        found += [line for line in ns.run([tool]).stdout.splitlines()
                  if "SMTPGATE" in line or "socket --transparent" in line]
    for fam in ("-4", "-6"):
        rules = ns.run(["ip", fam, "rule", "show"]).stdout
        found += [line for line in rules.splitlines()
                  if "proto 25" in line or f"lookup {table}" in line]
        routes = ns.run(["ip", fam, "route", "show", "table", str(table)], check=False).stdout
        found += [f"table {table}: {line}" for line in routes.splitlines()]
    return found


def log_lines(lines: Iterable[str | bytes]) -> list[dict[str, Any]]:
    """The gateway's JSON log lines among ``lines`` (what else its log holds, such as a
    traceback, left out)."""
    out = []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


class LogFollower:
    """The gateway's JSON log read incrementally: each read takes only the lines appended
    since the last one (re-reading thousands of lines after each of a thousand reloads would
    cost more than the reloads).  Thread-safe."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self._offset = 0
        self._partial = b""
        self._sessions: dict[str, collections.deque[dict[str, Any]]] = \
            collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def new(self) -> list[dict[str, Any]]:
        """The lines written since the last read."""
        with self._lock:
            return self._read()

    def _read(self) -> list[dict[str, Any]]:
        try:
            with self.gw.log_path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        out = log_lines(lines)
        for doc in out:
            if doc.get("event") == "session":
                self._sessions[doc["destination"]].append(doc)
        return out

    def next_session(self, destination: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next session line to ``destination`` (``host:port``) not yet taken.  Sessions
        to one destination that run one after the other are taken in their order (not
        found by client address: where REDIRECT's NAT finds its reply tuple taken by an
        earlier connection, the gateway sees another source port than the client used)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._read()
                if self._sessions[destination]:
                    return self._sessions[destination].popleft()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no session line:\n{self.gw.log_text()[-2000:]}")
            time.sleep(0.005)

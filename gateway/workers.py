"""Several worker processes on the same listeners (SO_REUSEPORT: the kernel spreads the
connections), supervised by this process, which also serves their metrics as one.

Each worker is a plain ``smtpgate run`` of the same file with ``--worker-metrics SOCKET``:
no fork of a running event loop, nothing shared but the ports.  The supervisor forwards
SIGHUP and SIGTERM, restarts a worker that dies (not while draining), gives up when a worker
cannot start at all, and answers ``/metrics`` with the sum of the workers' expositions
(``metrics.aggregate``).  A worker that dies leaves what it counted: its last exposition
the supervisor served is kept (counters and histograms only), so no counter of the
supervisor's ``/metrics`` ever decreases while it runs.  A reload is decided once, here:
the file is read and checked as a worker would, the verdict logged and counted by the
supervisor alone (``smtpgate_config_reloads_total``), and only a good file is passed to the
workers by SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, generate_latest

from .config import Config, ConfigError, Direction, load
from .health import FAMILIES, Health
from .keys import site_pairs, webpki_store
from .logs import event, log
from .metrics import TLSRPT_REPORTS, aggregate, serve, tlsrpt_reports
from .tasks import TaskGroup

if TYPE_CHECKING:
    from .dns import Resolver
    from .tlsrptsend import Reporter
    from .tlsrptstore import Store

RELOADS = "smtpgate_config_reloads"

START_GRACE = 5.0  # a worker that exits within this after its start could not start
SCRAPE_TIMEOUT = 2.0


def _get(path: str, what: str = "/metrics") -> str:
    """One worker's answer over its Unix socket ("" when it does not answer)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(SCRAPE_TIMEOUT)
            s.connect(path)
            s.sendall(f"GET {what} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return ""
    head, _, body = data.partition(b"\r\n\r\n")
    return body.decode() if head.startswith(b"HTTP/1.1 200") else ""


class _Worker:
    def __init__(self, path: str, index: int, socket_path: str) -> None:
        self.path, self.index, self.socket_path = path, index, socket_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        # A worker answers on its socket only once its listeners are open (server.start):
        # until it has, it is not serving yet.
        self.answered = False

    def start(self) -> None:
        self.answered = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", self.path,
             "--worker-metrics", self.socket_path, "--worker-index", str(self.index)])
        self.started = time.monotonic()
        event(log, "worker started", worker=self.index, pid=self.proc.pid)

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


async def supervise(path: str, config: Config) -> int:
    loop = asyncio.get_running_loop()
    tmp = tempfile.mkdtemp(prefix="smtpgate-workers-")
    workers = [_Worker(path, i, os.path.join(tmp, f"{i}.sock"))
               for i in range(config.workers)]
    draining = asyncio.Event()
    last: dict[int, str] = {}  # each worker's exposition as last served
    retired: list[str] = []  # the last expositions of workers that died
    registry = CollectorRegistry()
    reloads = Counter(RELOADS, "Configuration reloads, by result.", ["result"],
                      registry=registry)
    for result in ("ok", "rejected"):
        reloads.labels(result)
    health = Health(registry, config.source)
    current = config  # what the workers run (the last file that passed)
    # TLS reports: the workers count outcomes into the shared store; the supervisor alone
    # sends the reports (and counts them), so that each goes out once.
    reports = tlsrpt_reports(registry)

    def render() -> bytes:
        texts = []
        for w in workers:
            if text := _get(w.socket_path):
                last[w.index] = text
                texts.append(text)
        # The workers' own reload counts and health gauges are left out: the supervisor
        # decides reloads and runs the DNS self-test for all.
        return aggregate(texts, retired, drop={RELOADS, TLSRPT_REPORTS, *FAMILIES}) \
            + generate_latest(registry)

    def retire(w: _Worker) -> None:
        if (text := last.pop(w.index, None)) is not None:
            retired.append(text)

    def up(w: _Worker) -> bool:
        return w.proc is not None and w.proc.poll() is None

    def listening(w: _Worker) -> bool:
        if not w.answered:
            w.answered = bool(_get(w.socket_path, "/status"))
        return w.answered

    def worker_status(w: _Worker) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = json.loads(_get(w.socket_path, "/status") or "null")
        except ValueError:
            return None
        return found

    class Report:
        """/healthz and /status for the whole gateway (gateway.metrics.Report)."""

        def serving(self) -> bool:
            # Healthy while not draining and every worker is up and listening (a start or a
            # restart shows as 503 until its listeners are open).
            return not draining.is_set() and all(up(w) and listening(w) for w in workers)

        def problems(self) -> list[str]:
            found = health.problems()
            for w in workers:
                st = worker_status(w) if up(w) else None
                if st is None:
                    found.append(f"worker {w.index}: not answering")
                    continue
                found += [f"worker {w.index}: {p}" for p in st.get("problems", [])]
            return found

        def status(self) -> dict[str, Any]:
            sessions = dict.fromkeys((d.value for d in Direction), 0)
            each = []
            for w in workers:
                st = worker_status(w) if up(w) else None
                for direction, n in (st or {}).get("sessions", {}).items():
                    sessions[direction] = sessions.get(direction, 0) + n
                each.append({"index": w.index, "pid": w.proc.pid if w.proc else None,
                             "alive": up(w), "reloads": (st or {}).get("reloads"),
                             "last_reload": (st or {}).get("last_reload")})
            return {**health.status(), "problems": self.problems(),
                    "state": "draining" if draining.is_set() else "serving",
                    "sessions": sessions, "listeners": [lst.label for lst in current.listeners],
                    "workers": each}

    exporter = None
    tasks: TaskGroup | None = None
    reporter: Reporter | None = None
    store: Store | None = None
    resolver: Resolver | None = None
    try:
        for w in workers:
            w.start()
        if config.metrics.listen is not None:
            exporter = await serve(render, config.metrics.listen, Report())
        wake = asyncio.Event()
        tasks = TaskGroup()
        tasks.spawn(health.selftest_loop(lambda: current.dns, wake), name="dns self-test")
        if config.tlsrpt.enabled:
            from .dns import Resolver
            from .tlsrptsend import Reporter
            from .tlsrptstore import Store

            resolver = Resolver(config.dns)
            store = Store(config.tlsrpt)
            await store.open()
            reporter = Reporter(config.tlsrpt, store, lambda: resolver, reports)
            tasks.spawn(reporter.run_forever(), name="tlsrpt reporter")

        def stop() -> None:
            draining.set()
            for w in workers:
                w.signal(signal.SIGTERM)

        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.add_signal_handler(signal.SIGINT, stop)
        def reload() -> None:
            nonlocal current
            try:
                new = load(path)
                site_pairs(new)  # as a worker reads it: the keys too
                webpki_store(new)
                if new.workers != current.workers or new.metrics != current.metrics:
                    key = "workers" if new.workers != current.workers else "metrics.listen"
                    raise ConfigError(path, key, "cannot change on reload; restart the gateway")
            except ConfigError as exc:
                reloads.labels("rejected").inc()
                health.reloaded(False, path, str(exc))
                event(log, "reload rejected", logging.ERROR, error=str(exc))
                return
            current = new
            if reporter is not None:
                reporter.config = new.tlsrpt  # organization, contact, relay, ...
            reloads.labels("ok").inc()
            health.reloaded(True, new.source)
            event(log, "reload passed to the workers", workers=len(workers))
            for w in workers:
                w.signal(signal.SIGHUP)
            wake.set()

        loop.add_signal_handler(signal.SIGHUP, reload)
        event(log, "supervising", workers=len(workers), source=path)
        code = 0
        while True:
            alive = 0
            for w in workers:
                assert w.proc is not None
                rc = w.proc.poll()
                if rc is None:
                    alive += 1
                    continue
                if draining.is_set():
                    continue
                if time.monotonic() - w.started < START_GRACE and rc != 0:
                    event(log, "worker could not start", logging.ERROR, worker=w.index,
                          code=rc)
                    stop()
                    code = 1
                    continue
                event(log, "worker exited", logging.WARNING, worker=w.index, code=rc)
                retire(w)
                w.start()
                alive += 1
            if draining.is_set() and alive == 0:
                break
            await asyncio.sleep(0.2)
        event(log, "stopped", workers=len(workers))
        return code
    finally:
        if tasks is not None:
            await tasks.cancel_all()
        if reporter is not None:
            await reporter.close()
        if store is not None:
            await store.close()
        if resolver is not None:
            await resolver.close()
        if exporter is not None:
            exporter.close()
        for w in workers:  # on an error path: none may outlive its supervisor
            w.signal(signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)

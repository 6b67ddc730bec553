"""The DNS self-test, ``smtpgate status`` and ``smtpgate reload`` against real parts: the
gateway's own resolver is the lab's Unbound (validating, the lab root as trust anchor),
authoritative NSD behind it; ``bad.test`` is signed with expired signatures (bogus).

- A validating resolver passes every check, bogus included; the status says so.
- The same Unbound told to stop validating (``unbound-control insecure_add test.``, a
  domain made insecure: what a careless negative trust anchor does) fails
  ``validates`` and ``rejects_bogus`` within one interval, and passes again when undone.
- A reload that adds a resolver where none answers shows it as one that does not answer.
- With ``workers: 2``: the supervisor alone runs the self-test (its gauge is 1, not the sum
  of two workers), ``status`` lists both workers, and ``reload`` waits for both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatelab import dnslab, netlab
from gatelab.dnslab import DnsWorld
from gatelab.gatewayproc import ROOT, GatewayProcess, cli, gateway_config, log_lines
from gatelab.netlab import Lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, DnsWorld]]:
    with Lab() as lab, DnsWorld.on_lab(lab, tmp_path_factory.mktemp("dns")) as w:
        w.zone("test.", ["mx.peer A 203.0.113.2"])
        w.zone("bad.test.", ["www A 203.0.113.9"])
        w.start()
        w.make_bogus("bad.test.")
        yield lab, w


def config(resolvers: tuple[str, ...] = ("127.0.0.1:53",), workers: int | None = None) -> str:
    return gateway_config(resolvers=resolvers, dns_timeout=0.5, workers=workers,
                          selftest="secure: test, bogus: www.bad.test, interval: 0.5")


def status(gw: GatewayProcess) -> tuple[int, dict[str, Any]]:
    r = cli(gw.ns, "status", "-c", str(gw.config_path), "--json")
    return r.returncode, json.loads(r.stdout) if r.stdout.startswith("{") else {}


def wait_for(gw: GatewayProcess, what: str, test: Any, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        code, st = status(gw)
        if st and test(code, st):
            return st
        assert time.monotonic() < deadline, f"{what}: {code} {st}"
        time.sleep(0.2)


def checks(st: dict[str, Any]) -> dict[tuple[str, str], bool]:
    return {(c["resolver"], c["check"]): c["ok"] for c in st["dns"] or ()}


ALL_OK = {("127.0.0.1:53", "answers"): True, ("127.0.0.1:53", "validates"): True,
          ("127.0.0.1:53", "rejects_bogus"): True}


def test_selftest_with_a_real_validating_resolver(world: tuple[Lab, DnsWorld],
                                                  tmp_path: Path) -> None:
    lab, w = world
    with GatewayProcess(lab.gw, tmp_path / "gw", config()) as gw:
        st = wait_for(gw, "all checks pass", lambda code, st: code == 0)
        assert checks(st) == ALL_OK
        for check in ("answers", "validates", "rejects_bogus"):
            assert gw.metric("smtpgate_dns_selftest", resolver="127.0.0.1:53",
                             check=check) == 1
        [started] = gw.events("dns self-test")
        assert (started["trigger"], started["result"]) == ("start", "ok")
        human = cli(gw.ns, "status", "-c", str(gw.config_path))
        assert "dns:         127.0.0.1:53: answers ok, validates ok, rejects_bogus ok" \
               in human.stdout, human.stdout

        # The resolver stops validating test. and below (the root's trust anchor would
        # override an insecure root: the self-test names a signed zone of the site's).
        w.unbound_control("insecure_add", "test.")
        w.flush()
        try:
            st = wait_for(gw, "validation off is seen", lambda code, st: code == 1)
            assert checks(st) == {**ALL_OK, ("127.0.0.1:53", "validates"): False,
                                  ("127.0.0.1:53", "rejects_bogus"): False}
            assert any("does not validate DNSSEC" in p for p in st["problems"]), st
            assert any("accepts data that fails validation" in p for p in st["problems"]), st
            assert gw.metric("smtpgate_dns_selftest", resolver="127.0.0.1:53",
                             check="validates") == 0
            _, body = netlab.http_get(gw.ns, "127.0.0.1", gw.metrics_port, "/healthz")
            assert body.startswith(b"degraded\n") and b"validates: FAILED" in body
        finally:
            w.unbound_control("insecure_remove", "test.")
            w.flush()
        st = wait_for(gw, "validation back", lambda code, st: code == 0)
        # Periodic runs log only changes: start, the failure, the recovery.
        assert [(e["trigger"], e["result"]) for e in gw.events("dns self-test")] == [
            ("start", "ok"), ("interval", "failed"), ("interval", "ok")]

        # A second resolver where nothing answers, by reload: reported on its own.
        gw.config_path.write_text(config(("127.0.0.1:53", "127.0.0.1:5399")))
        r = cli(gw.ns, "reload", "-c", str(gw.config_path), "--pid", str(gw.pid))
        assert r.returncode == 0 and r.stdout.startswith("reloaded: "), r.stdout + r.stderr
        st = wait_for(gw, "the dead resolver is seen",
                      lambda code, st: ("127.0.0.1:5399", "answers") in checks(st))
        assert checks(st)[("127.0.0.1:5399", "answers")] is False
        assert checks(st)[("127.0.0.1:53", "validates")] is True
        assert st["last_reload"]["result"] == "ok" and st["reloads"] == 1
        assert gw.events("dns self-test")[-1]["trigger"] == "reload"


def test_workers_status_and_reload(world: tuple[Lab, DnsWorld], tmp_path: Path) -> None:
    lab, _ = world
    with GatewayProcess(lab.gw, tmp_path / "gw", config(workers=2)) as gw:
        st = wait_for(gw, "supervisor's self-test", lambda code, st: code == 0)
        assert [(w["index"], w["alive"]) for w in st["workers"]] == [(0, True), (1, True)]
        assert st["pid"] == gw.pid
        # One self-test, the supervisor's: the gauge is 1, not 2 (summed over workers).
        assert gw.metric("smtpgate_dns_selftest", resolver="127.0.0.1:53",
                         check="validates") == 1
        assert gw.metric("smtpgate_config_last_reload_successful") == 1
        assert [e.get("worker") for e in gw.events("dns self-test")] == [None]
        gw.config_path.write_text(re.sub(r"level: \w+", "level: info", gw.config_path
                                         .read_text()))
        r = cli(gw.ns, "reload", "-c", str(gw.config_path))
        assert r.returncode == 0, r.stdout + r.stderr
        st = wait_for(gw, "both workers reloaded",
                      lambda code, st: all(w["reloads"] == 1 for w in st["workers"]))
        assert all(w["last_reload"]["result"] == "ok" for w in st["workers"])
        # workers cannot change on reload: the supervisor refuses it, and says so.
        gw.config_path.write_text(gw.config_path.read_text().replace("workers: 2",
                                                                      "workers: 3"))
        r = cli(gw.ns, "reload", "-c", str(gw.config_path))
        assert r.returncode == 1 and "workers: cannot change on reload" in r.stdout, r.stdout
        assert gw.metric("smtpgate_config_last_reload_successful") == 0


def test_workers_healthz_is_200_only_once_every_worker_listens(
        world: tuple[Lab, DnsWorld], tmp_path: Path) -> None:
    """A probe that sees 200 may send traffic: by then every worker has its listeners open
    (a worker answers its supervisor only after they are).  Polled from the moment the
    supervisor runs, not after a worker said it started."""
    lab, _ = world
    work = tmp_path / "gw"
    work.mkdir()
    (work / "smtpgate.yaml").write_text(config(workers=2))
    log = work / "smtpgate.log"
    with log.open("wb") as out:
        proc = lab.gw.popen([sys.executable, "-m", "gateway", "run", "-c",
                             str(work / "smtpgate.yaml")], stdout=out, stderr=out,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                head, _ = netlab.http_get(lab.gw, "127.0.0.1", 9125, "/healthz", timeout=2)
                if head.startswith(b"HTTP/1.1 200"):
                    break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        listening = {e.get("worker") for e in log_lines(log.read_text().splitlines())
                     if e.get("event") == "listening"}
        assert listening == {0, 1}, log.read_text()[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

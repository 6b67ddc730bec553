"""What the gateway says about itself (gateway.health, gateway.control): the DNS self-test's
verdicts, the reload gauges, ``/healthz`` and ``/status``, and ``smtpgate status`` /
``smtpgate reload`` against a real ``smtpgate run`` on loopback (no root).

The resolver here is the in-process fake (gatelab.fakedns): it is the only way, without a
lab, to have a resolver that validates, one that answers without the AD bit and one that
answers bogus on demand.  The same checks against real Unbound: tests/test_health_netns.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from prometheus_client import CollectorRegistry

from gatelab.fakedns import FakeDns, Reply, answer
from gateway.answers import Answer, Status
from gateway.config import Endpoint
from gateway.control import render
from gateway.health import Check, Health, judge

ROOT = Path(__file__).resolve().parent.parent
LOOP53 = Endpoint(ipaddress.ip_address("127.0.0.1"), 53)
FAR = Endpoint(ipaddress.ip_address("192.0.2.53"), 53)
ROOT_KEY = ". 3600 IN DNSKEY 257 3 13 mdsswUyr3DPW132mOi8V9xESWE8jTo0dxCjjnopKl+GqJxpVXckHAeF+" \
           "KkxLbxILfDLUT0rAK9iUzy1L53eKGQ=="


def secure(rcode: str = "NOERROR", status: Status = Status.SECURE) -> Answer:
    records = tuple(dns.rrset.from_text(".", 3600, "IN", "DNSKEY", ROOT_KEY.split(
        " ", 4)[4])) if rcode == "NOERROR" else ()
    return Answer(".", "DNSKEY", status, rcode, records, ".")


def verdicts(checks: list[Check]) -> dict[str, bool]:
    return {c.check: c.ok for c in checks}


# -- the verdicts, from made-up answers ------------------------------------------------------

def test_a_validating_resolver_passes() -> None:
    bogus = Answer("bad.test.", "A", Status.BOGUS, "SERVFAIL", canonical="bad.test.")
    checks = judge(LOOP53, True, secure(), bogus)
    assert verdicts(checks) == {"answers": True, "validates": True, "rejects_bogus": True}


def test_a_dead_resolver_fails_every_check_and_says_why() -> None:
    dead = Answer(".", "DNSKEY", Status.FAILED, "TIMEOUT", detail="no answer from 127.0.0.1:53")
    checks = judge(LOOP53, True, dead, None)
    assert verdicts(checks) == {"answers": False, "validates": False}
    assert checks[0].line() == ("dns 127.0.0.1:53 answers: FAILED: . DNSKEY: no answer from "
                                "127.0.0.1:53")


def test_no_ad_bit_from_a_trusted_resolver_means_it_does_not_validate() -> None:
    [_, validates] = judge(LOOP53, True, secure(status=Status.INSECURE), None)
    assert not validates.ok
    assert "does not validate DNSSEC" in validates.detail


def test_an_untrusted_resolver_is_told_apart_from_one_that_does_not_validate() -> None:
    [_, validates] = judge(FAR, False, secure(status=Status.INSECURE), None)
    assert not validates.ok
    assert "neither on loopback nor in dns.trusted" in validates.detail


def test_a_bogus_root_points_at_the_trust_anchor() -> None:
    [answers, validates] = judge(LOOP53, True, secure("SERVFAIL", Status.BOGUS), None)
    assert answers.ok and not validates.ok
    assert "trust anchor" in validates.detail


def test_a_resolver_that_accepts_bogus_data_fails_rejects_bogus() -> None:
    accepted = Answer("bad.test.", "A", Status.INSECURE, "NOERROR", canonical="bad.test.")
    checks = judge(LOOP53, True, secure(), accepted)
    assert verdicts(checks) == {"answers": True, "validates": True, "rejects_bogus": False}
    assert "accepts data that fails validation" in checks[-1].detail


# -- the facts and their gauges --------------------------------------------------------------

def test_reload_gauges_and_problems() -> None:
    reg = CollectorRegistry()
    now = [1000.0]
    h = Health(reg, "a.yaml", clock=lambda: now[0])
    assert reg.get_sample_value("smtpgate_config_last_reload_successful") == 1
    assert reg.get_sample_value("smtpgate_config_last_reload_success_timestamp_seconds") == 1000
    now[0] = 1060.0
    h.reloaded(False, "b.yaml", "b.yaml: listeners[0]: cannot listen on 127.0.0.1:25: busy")
    assert reg.get_sample_value("smtpgate_config_last_reload_successful") == 0
    assert reg.get_sample_value("smtpgate_config_last_reload_success_timestamp_seconds") == 1000
    assert h.problems() == [
        "config: the last reload was rejected: b.yaml: listeners[0]: cannot listen on "
        "127.0.0.1:25: busy; running a.yaml as loaded at 1970-01-01T00:16:40Z"]
    now[0] = 1120.0
    h.reloaded(True, "b.yaml")
    assert reg.get_sample_value("smtpgate_config_last_reload_successful") == 1
    assert reg.get_sample_value("smtpgate_config_last_reload_success_timestamp_seconds") == 1120
    assert h.problems() == []
    st = h.status()
    assert (st["reloads"], st["config"]["source"], st["last_reload"]["result"]) == (2, "b.yaml",
                                                                                    "ok")


def test_selftest_gauges_follow_the_resolvers_in_force() -> None:
    reg = CollectorRegistry()
    h = Health(reg, "a.yaml")
    assert h.dns_result(judge(LOOP53, True, secure(), None)) is True  # first verdict
    assert h.dns_result(judge(LOOP53, True, secure(), None)) is False  # unchanged
    assert reg.get_sample_value("smtpgate_dns_selftest",
                                {"resolver": "127.0.0.1:53", "check": "validates"}) == 1
    # A reload replaced the resolver: the old one's series go, not stay at their last value.
    assert h.dns_result(judge(FAR, False, secure(status=Status.INSECURE), None)) is True
    assert reg.get_sample_value("smtpgate_dns_selftest",
                                {"resolver": "127.0.0.1:53", "check": "validates"}) is None
    assert reg.get_sample_value("smtpgate_dns_selftest",
                                {"resolver": "192.0.2.53:53", "check": "validates"}) == 0


def test_status_renders_for_a_person() -> None:
    st = {"version": "1.0", "pid": 42, "state": "serving", "started": "2026-12-07T06:00:00Z",
          "uptime_seconds": 7300, "reloads": 1,
          "config": {"source": "/etc/smtpgate/smtpgate.yaml", "loaded": "2026-12-07T07:00:00Z",
                     "age_seconds": 3700},
          "last_reload": {"at": "2026-12-07T07:00:00Z", "result": "ok"},
          "sessions": {"outbound": 3, "inbound": 0}, "listeners": ["outbound-v4"],
          "dns": [{"resolver": "127.0.0.1:53", "check": "answers", "ok": True, "detail": ""},
                  {"resolver": "127.0.0.1:53", "check": "validates", "ok": False,
                   "detail": ""}],
          "problems": ["dns 127.0.0.1:53 validates: FAILED: x"]}
    assert render(st) == [
        "smtpgate 1.0, pid 42: serving since 2026-12-07T06:00:00Z (2 h 1 min)",
        "config:      /etc/smtpgate/smtpgate.yaml, loaded 2026-12-07T07:00:00Z (61 min ago)",
        "last reload: ok at 2026-12-07T07:00:00Z",
        "sessions:    outbound 3, inbound 0",
        "listeners:   outbound-v4",
        "dns:         127.0.0.1:53: answers ok, validates FAILED",
        "problems:",
        "  - dns 127.0.0.1:53 validates: FAILED: x",
    ]


# -- a real gateway on loopback --------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Resolver:
    """Answers ``.`` DNSKEY with the AD bit while ``validating``; NOERROR without it
    otherwise; counts what it was asked."""

    def __init__(self) -> None:
        self.validating = True

    async def __call__(self, query: dns.message.QueryMessage, transport: str) -> Reply:
        q = query.question[0]
        if q.name.to_text() == "." and q.rdtype == dns.rdatatype.DNSKEY:
            return answer(query, ROOT_KEY, ad=self.validating)
        return answer(query, rcode=dns.rcode.NXDOMAIN)


def smtpgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)


def config_text(listen: int, metrics: int, resolver: int, interval: float = 0.3) -> str:
    return (f"listeners: [{{name: out, address: 127.0.0.1, port: {listen}}}]\n"
            "upstream: {mark: 0}\n"
            f"metrics: {{listen: '127.0.0.1:{metrics}'}}\n"
            "log: {format: json}\n"
            f"dns: {{resolvers: ['127.0.0.1:{resolver}'], timeout: 0.5, "
            f"selftest: {{interval: {interval}}}}}\n")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes], Resolver, int]]:
    behaviour = Resolver()
    fake = FakeDns(behaviour).serve_in(None, port=0)
    metrics = free_port()
    cfg = tmp_path / "smtpgate.yaml"
    cfg.write_text(config_text(free_port(), metrics, fake.port))
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
                            stdout=log, stderr=log, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 20
        while smtpgate("status", "-c", str(cfg)).returncode == 3:
            assert proc.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield cfg, proc, behaviour, metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()
        fake.close()


def wait_status(cfg: Path, code: int, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + timeout
    while (r := smtpgate("status", "-c", str(cfg))).returncode != code:
        assert time.monotonic() < deadline, r.stdout + r.stderr
        time.sleep(0.1)
    return r


def test_status_and_healthz_follow_the_resolver(
        running: tuple[Path, subprocess.Popen[bytes], Resolver, int]) -> None:
    cfg, proc, behaviour, metrics = running
    r = wait_status(cfg, 0)
    assert f"pid {proc.pid}: serving" in r.stdout
    assert "problems:    none" in r.stdout
    st = json.loads(smtpgate("status", "-c", str(cfg), "--json").stdout)
    assert [(c["check"], c["ok"]) for c in st["dns"]] == [("answers", True),
                                                          ("validates", True)]
    behaviour.validating = False  # the resolver stops validating: the next interval sees it
    r = wait_status(cfg, 1)
    assert "does not validate DNSSEC" in r.stdout
    with socket.create_connection(("127.0.0.1", metrics), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        reply = s.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 200")  # serving: probes must not restart it
    assert b"\r\n\r\ndegraded\ndns 127.0.0.1:" in reply
    behaviour.validating = True
    wait_status(cfg, 0)


def test_reload_reports_the_gateways_verdict(
        running: tuple[Path, subprocess.Popen[bytes], Resolver, int], tmp_path: Path) -> None:
    cfg, proc, _, metrics = running
    good = cfg.read_text()
    # A port already taken: the file is valid (run --check passes), the gateway refuses it.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    try:
        cfg.write_text(re.sub(r"port: \d+", f"port: {busy}", good, count=1))
        assert smtpgate("run", "--check", "-c", str(cfg)).returncode == 0
        r = smtpgate("reload", "-c", str(cfg), "--pid", str(proc.pid))
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"reload rejected: {cfg}: listeners[0]: cannot listen on 127.0.0.1:{busy}" \
               in r.stdout
        r = smtpgate("status", "-c", str(cfg))
        assert r.returncode == 1 and "config: the last reload was rejected" in r.stdout
    finally:
        taken.close()
    # A file that does not parse never reaches the gateway: exit 2, no signal.
    cfg.write_text("listeners: [\n")
    r = smtpgate("reload", "-c", str(cfg))
    assert r.returncode == 2 and "line 2, column 1" in r.stderr
    cfg.write_text(good)
    before = json.loads(smtpgate("status", "-c", str(cfg), "--json").stdout)
    assert before["reloads"] == 1  # the refused file above was never sent
    r = smtpgate("reload", "-c", str(cfg))
    assert r.returncode == 0 and r.stdout.startswith(f"reloaded: {cfg} at "), r.stdout
    after = json.loads(smtpgate("status", "-c", str(cfg), "--json").stdout)
    assert after["reloads"] == 2 and after["last_reload"]["result"] == "ok"
    with socket.create_connection(("127.0.0.1", metrics), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        text = s.makefile("rb").read().decode()
    assert "smtpgate_config_last_reload_successful 1.0" in text
    # Another process's pid is refused (systemd passes $MAINPID: it must be this gateway).
    r = smtpgate("reload", "-c", str(cfg), "--pid", str(os.getpid()))
    assert r.returncode == 3 and f"is pid {proc.pid}, not {os.getpid()}" in r.stdout


def test_status_without_a_gateway_is_exit_3(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_text(free_port(), free_port(), 53))
    r = smtpgate("status", "-c", str(cfg))
    assert r.returncode == 3 and "no answer from http://127.0.0.1:" in r.stdout
    cfg.write_text(re.sub(r"metrics: .*", "metrics: {listen: null}",
                          config_text(free_port(), free_port(), 53)))
    r = smtpgate("status", "-c", str(cfg))
    assert r.returncode == 2 and "metrics.listen is null" in r.stdout

"""``smtpgate rollover`` against a real DNSSEC world: NSD serves the signed zone with the
TLSA records, Unbound validates in the gw namespace, and the command runs there as an
operator would run it (its own process, resolver 127.0.0.1:53).

The rollover must wait until DNS publishes the next key securely for every host, and
then swap the files.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gatelab import dnslab, netlab
from gatelab.dnslab import DnsWorld
from gatelab.netlab import Lab
from gateway import keyfiles, keygen, keys
from gateway.dane import tlsa_record

pytestmark = pytest.mark.netns

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
ZONE = "roll.test."
HOSTS = ("mx1.roll.test", "mx2.roll.test")
ADDRESSES = ["mx1 A 203.0.113.2", "mx2 A 203.0.113.3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, DnsWorld]]:
    with Lab() as lab, DnsWorld.on_lab(lab, tmp_path_factory.mktemp("dns")) as w:
        w.zone("test.", [])
        w.zone(ZONE, ADDRESSES)
        w.start()
        yield lab, w


class Site:
    """A current and a next pair made the way an operator makes them (keygen)."""

    def __init__(self, directory: Path) -> None:
        self.key, self.cert = directory / "site.key", directory / "site.pem"
        self.next_key, self.next_cert = directory / "next.key", directory / "next.pem"
        self.current = self._make(self.key, self.cert)
        self.next = self._make(self.next_key, self.next_cert)

    @staticmethod
    def _make(key_path: Path, cert_path: Path) -> str:
        key = keygen.generate_key()
        cert = keygen.self_signed(key, HOSTS)
        keyfiles.write_atomic(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), keyfiles.KEY_MODE)
        der = cert.public_bytes(serialization.Encoding.DER)
        keyfiles.write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM),
                          keyfiles.CERT_MODE)
        return str(tlsa_record(der))  # "3 1 1 <hex>"

    def files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.key.parent.iterdir())}

    def records(self, **per_host: list[str]) -> list[str]:
        """Zone lines: the TLSA RRset of each host, by host label (mx1=[...])."""
        return [*ADDRESSES,
                *(f"_25._tcp.{label} TLSA {rdata}"
                  for label, rdatas in per_host.items() for rdata in rdatas)]


def rollover(lab: Lab, site: Site, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "gateway", "rollover",
            "--key", str(site.key), "--cert", str(site.cert),
            "--next-key", str(site.next_key), "--next-cert", str(site.next_cert),
            *(a for h in HOSTS for a in ("--host", h)), *extra]
    cp: subprocess.CompletedProcess[str] = lab.gw.run(argv, check=False, env=env, cwd=ROOT,
                                                      timeout=60)
    return cp


def refusal(host: str, problem: str, answer: str) -> re.Pattern[str]:
    """The refusal line for one host; ``answer`` is what DNS returned, TTL aside."""
    return re.compile(
        re.escape(f"smtpgate: rollover refused: {host}: {problem}: DNS (127.0.0.1:53) "
                  f"returned _25._tcp.{host}. TLSA: {answer} [") + r"\w+, ttl \d+\]")


def test_refused_while_dns_publishes_only_the_current_key(world: tuple[Lab, DnsWorld],
                                                          tmp_path: Path) -> None:
    lab, w = world
    site = Site(tmp_path)
    w.update(ZONE, site.records(mx1=[site.current], mx2=[site.current]))
    before = site.files()
    r = rollover(lab, site)
    assert r.returncode == 1, r
    assert r.stdout == ""
    for host in HOSTS:
        assert refusal(host, "no record for the next key", site.current).search(r.stderr), \
            r.stderr
    assert f"publish {site.next} at _25._tcp.<host>" in r.stderr
    assert "must validate" not in r.stderr
    assert site.files() == before  # nothing moved, no .old


def test_refused_while_one_host_lacks_the_next_key(world: tuple[Lab, DnsWorld],
                                                   tmp_path: Path) -> None:
    lab, w = world
    site = Site(tmp_path)
    both = sorted([site.current, site.next])
    w.update(ZONE, site.records(mx1=both, mx2=[site.current]))
    before = site.files()
    r = rollover(lab, site)
    assert r.returncode == 1, r
    assert refusal(HOSTS[1], "no record for the next key", site.current).search(r.stderr)
    assert HOSTS[0] + ":" not in r.stderr  # the host that is ready is not blamed
    assert site.files() == before


def test_refused_when_the_zone_is_bogus(world: tuple[Lab, DnsWorld], tmp_path: Path) -> None:
    lab, w = world
    site = Site(tmp_path)
    w.update(ZONE, site.records(mx1=[site.current, site.next], mx2=[site.current, site.next]))
    before = site.files()
    w.make_bogus(ZONE)
    try:
        r = rollover(lab, site)
    finally:
        w.make_secure(ZONE)
    assert r.returncode == 1, r
    for host in HOSTS:
        assert f"smtpgate: rollover refused: {host}: not secure (bogus): " in r.stderr, r.stderr
        assert f"_25._tcp.{host}. TLSA: SERVFAIL [bogus" in r.stderr
    assert "the TLSA records must validate" in r.stderr and "publish" not in r.stderr
    assert site.files() == before


def test_refused_when_the_zone_is_insecure(world: tuple[Lab, DnsWorld],
                                           tmp_path: Path) -> None:
    lab, w = world
    site = Site(tmp_path)
    both = sorted([site.current, site.next])
    w.update(ZONE, site.records(mx1=both, mx2=both))
    before = site.files()
    w.make_insecure(ZONE)
    try:
        r = rollover(lab, site)
    finally:
        w.make_secure(ZONE)
    assert r.returncode == 1, r
    answer = "; ".join(both)
    for host in HOSTS:
        assert refusal(host, "not secure (insecure)", answer).search(r.stderr), r.stderr
    assert site.files() == before


def test_accepted_once_both_keys_are_published(world: tuple[Lab, DnsWorld],
                                               tmp_path: Path) -> None:
    lab, w = world
    site = Site(tmp_path)
    before = site.files()
    w.update(ZONE, site.records(mx1=[site.current], mx2=[site.current]))
    assert rollover(lab, site).returncode == 1
    w.update(ZONE, site.records(mx1=[site.current, site.next], mx2=[site.current, site.next]))
    r = rollover(lab, site)
    assert r.returncode == 0, r
    assert r.stderr == ""
    assert r.stdout.startswith(f"rolled over: {site.key} and {site.cert} now hold the next "
                               f"key ({site.next})")
    assert re.search(r"the TLSA TTL is \d+ s", r.stdout)
    after = site.files()
    assert after == {
        "site.key": before["next.key"], "site.pem": before["next.pem"],
        "site.key.old": before["site.key"], "site.pem.old": before["site.pem"],
    }
    for name in ("site.key", "site.key.old"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    pair = keys.load_keypair(site.key, site.cert, "c.yaml", "tls.key")
    assert str(pair.tlsa) == site.next
    # The next slot is empty now: running it again is an input error, not a second swap.
    r = rollover(lab, site)
    assert r.returncode == 2 and "cannot read: No such file or directory" in r.stderr
    assert site.files() == after

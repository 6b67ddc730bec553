"""``smtpgate check`` connects like a session would, and Postfix's own ``posttls-finger``,
run from the same namespace against the same peers, agrees with it.

    gw:   smtpgate check / posttls-finger; Unbound on 127.0.0.1 (resolv.conf: trust-ad)
    peer: Postfix smtpd with TLS on .2 (TLSA matches), .3 (no TLSA), .4 (TLSA wrong);
          Postfix smtpd without TLS on .5 (TLSA published);
          in-process fakes on .6 (breaks the TLS handshake) and .7 (never greets)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gatelab import certs, dnslab, netlab, postfix_instance
from gatelab.dnslab import DnsWorld
from gatelab.gatewayproc import cli, gateway_config
from gatelab.netlab import Lab, Server
from gatelab.postfix_instance import PostfixInstance, receiver_settings, tls_receiver_settings
from gateway.dane import tlsa_data, tlsa_record

pytestmark = pytest.mark.netns

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

FINGER = shutil.which("posttls-finger", path="/usr/sbin:/usr/bin")
needs_finger = pytest.mark.skipif(FINGER is None, reason="posttls-finger not installed")
BREAKER, SILENT = "203.0.113.6", "203.0.113.7"


@dataclass
class World:
    lab: Lab
    leaf: certs.Issued
    inter: certs.Issued
    finger_config: Path
    good: str  # the TLSA rdata published for mx.b and mx.notls


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("check")
    inter = certs.make_intermediate(certs.make_root())
    leaf = certs.make_leaf(inter, ["mx.b.test"])
    chain = certs.write_chain_file(work / "peer-chain.pem", leaf, inter)
    good = str(tlsa_record(leaf.der))
    wrong = "3 1 1 " + "5a" * 32
    with Lab() as lab, DnsWorld.on_lab(lab, work / "dns") as dns:
        for address in ("203.0.113.4", "203.0.113.5", BREAKER, SILENT):
            lab.peer.ip("addr", "add", f"{address}/24", "dev", netlab.HOST_IF)
        dns.zone("test.", [
            "mx.b A 203.0.113.2", f"_25._tcp.mx.b TLSA {good}",
            "mx.nodane A 203.0.113.3",
            "mx.wrong A 203.0.113.4", f"_25._tcp.mx.wrong TLSA {wrong}",
            "mx.notls A 203.0.113.5", f"_25._tcp.mx.notls TLSA {good}",
        ])
        dns.zone("113.0.203.in-addr.arpa.", ["2 PTR mx.b.test.", "3 PTR mx.nodane.test.",
                                             "4 PTR mx.wrong.test.", "5 PTR mx.notls.test."])
        dns.start()
        # For posttls-finger (libc's resolver); `ip netns exec` mounts it over resolv.conf.
        lab.gw.set_resolv_conf(f"nameserver {dnslab.RESOLVER_V4}\noptions trust-ad\n")
        breaker = Server(lab.peer, BREAKER, break_tls)
        try:
            with lab.peer.listen(SILENT, 25), \
                    PostfixInstance(lab.peer, work, tls_receiver_settings(
                        "203.0.113.2, 203.0.113.3, 203.0.113.4", chain), name="tlspeer"), \
                    PostfixInstance(lab.peer, work, receiver_settings("203.0.113.5"),
                                    name="plainpeer"):
                yield World(lab, leaf, inter, finger_config(work), good)
        finally:
            breaker.close()


def break_tls(conn: socket.socket) -> None:
    """A peer that offers STARTTLS, then answers the ClientHello with plaintext: the
    handshake fails, and an opportunistic session falls back to a new connection."""
    conn.settimeout(10)
    try:
        conn.sendall(b"220 breaker.test ESMTP\r\n")
        for line in conn.makefile("rb"):
            verb = line.split(b" ")[0].strip().upper()
            if verb == b"EHLO":
                conn.sendall(b"250-breaker.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            elif verb == b"STARTTLS":
                conn.sendall(b"220 2.0.0 go ahead\r\n")
                conn.recv(4096)  # the ClientHello: after it, nothing is injected
                conn.sendall(b"this is not TLS\r\n")
                break
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 bye\r\n")
                break
            else:
                conn.sendall(b"502 5.5.2 what\r\n")
    except OSError:
        pass


def smtpgate_check(w: World, *args: str) -> subprocess.CompletedProcess[Any]:
    return cli(w.lab.gw, "check", "--helo", "gw.example", *args)


def finger_config(work: Path) -> Path:
    """posttls-finger reads main.cf like every Postfix program: this test's own (Postfix's
    defaults), never the host's /etc/postfix, which an unconfigured package does not even
    write."""
    conf = work / "finger-conf"
    conf.mkdir(exist_ok=True)
    (conf / "main.cf").write_text("compatibility_level = 3.6\n")
    return conf


def posttls_finger(w: World, host: str, chat: bool = False) -> str:
    assert FINGER is not None
    args = [FINGER, *(() if chat else ("-c",)), "-l", "dane", "-t", "10", "-T", "20",
            f"[{host}]:25"]
    env = {**os.environ, "MAIL_CONFIG": str(w.finger_config)}
    cp = w.lab.gw.run(args, check=False, timeout=60, env=env)
    # posttls-finger exits 0 whatever it found: its verdict is in what it prints.
    assert cp.returncode == 0, cp.stderr
    out: str = cp.stdout + cp.stderr
    return out


def steps(out: str, *prefixes: str) -> list[str]:
    """The lines starting with each prefix (after the indent), in this order."""
    lines = [line.strip() for line in out.splitlines()]
    found, at = [], 0
    for prefix in prefixes:
        for i in range(at, len(lines)):
            if lines[i].startswith(prefix):
                found.append(lines[i])
                at = i + 1
                break
        else:
            raise AssertionError(f"no {prefix!r} after line {at} in:\n{out}")
    return found


def spki_sha256(issued: certs.Issued) -> str:
    return tlsa_data(issued.der, 1, 1).hex()


def tls_facts(out: str) -> tuple[str, str]:
    m = re.search(r"^  TLS: (TLSv1\.[23]), (\S+), SNI ", out, re.M)
    assert m, out
    return m[1], m[2]


@pytest.fixture(scope="module")
def dane_run(world: World) -> subprocess.CompletedProcess[Any]:
    return smtpgate_check(world, "203.0.113.2")


def test_dane_peer_is_verified_step_by_step(world: World,
                                            dane_run: subprocess.CompletedProcess[Any]) -> None:
    r = dane_run
    assert r.returncode == 0, r.stdout + r.stderr
    found = steps(r.stdout,
                  "plan: TLS required, authenticate by DANE (1 usable TLSA), SNI mx.b.test",
                  "connect 203.0.113.2:25: connected from 203.0.113.1 (mark 0x2525)",
                  "banner: 220 mx.example.net ESMTP Postfix",
                  "EHLO gw.example: 250 mx.example.net; STARTTLS offered",
                  "STARTTLS: 220 2.0.0 Ready to start TLS",
                  "TLS: TLSv1.",
                  "certificate 0: CN=mx.b.test, SAN mx.b.test, issuer CN=smtpgate test "
                  "intermediate, SPKI SHA-256 ",
                  "certificate 1: CN=smtpgate test intermediate, no SAN dNSName, issuer "
                  "CN=smtpgate test root, SPKI SHA-256 ",
                  "verify: dane-ee match",
                  "EHLO gw.example (over TLS): 250 mx.example.net",
                  "QUIT (over TLS): 221 ",
                  "result: ")
    assert found[5].endswith(", SNI mx.b.test")
    assert found[6].endswith(spki_sha256(world.leaf))
    assert found[7].endswith(spki_sha256(world.inter))
    assert found[8] == f"verify: dane-ee match (TLSA {world.good} at depth 0)"
    assert r.stdout.splitlines()[-1] == "  result: dane (verified: dane-ee match)"
    assert "certificate 2" not in r.stdout


@needs_finger
def test_posttls_finger_agrees_on_the_dane_peer(
        world: World, dane_run: subprocess.CompletedProcess[Any]) -> None:
    out = posttls_finger(world, "mx.b.test")
    version, cipher = tls_facts(dane_run.stdout)
    assert re.search(rf"^posttls-finger: Verified TLS connection established to "
                     rf"mx\.b\.test\[203\.0\.113\.2\]:25: {re.escape(version)} with cipher "
                     rf"{re.escape(cipher)} ", out, re.M), out
    # The same record matched the same certificate, and the key is the one we printed.
    assert f"Matched DANE EE certificate at depth 0: {world.good.upper()}\n" in out, out
    pkey = re.search(r"pkey_fingerprint=([0-9A-F:]+)", out)
    assert pkey and pkey[1].replace(":", "").lower() == spki_sha256(world.leaf)


def test_wrong_key_would_defer(world: World) -> None:
    r = smtpgate_check(world, "203.0.113.4")
    assert r.returncode == 1, r.stdout + r.stderr
    steps(r.stdout, "EHLO gw.example: 250 mx.example.net; STARTTLS offered",
          "STARTTLS: 220 ", "TLS: TLSv1.", "certificate 0: CN=mx.b.test",
          "verify: FAILED: no matching record (against 1 usable TLSA)",
          "the MTA would get: 421 4.7.5 smtpgate: TLS to peer failed: no matching record",
          "QUIT (over TLS): 221 ")
    assert r.stdout.splitlines()[-1] == ("  result: would defer: TLS to peer failed: "
                                         "no matching record")
    if FINGER is not None:
        out = posttls_finger(world, "mx.wrong.test")
        assert ("posttls-finger: server certificate verification failed for "
                "mx.wrong.test[203.0.113.4]:25: num=65:no matching DANE TLSA records") in out
        assert "Untrusted TLS connection established to mx.wrong.test" in out
        assert "Verified TLS connection" not in out


def test_peer_without_starttls_would_defer(world: World) -> None:
    r = smtpgate_check(world, "203.0.113.5")
    assert r.returncode == 1, r.stdout + r.stderr
    steps(r.stdout, "plan: TLS required, authenticate by DANE",
          "banner: 220 ", "EHLO gw.example: 250 mx.example.net; STARTTLS NOT offered",
          "the MTA would get: 421 4.7.4 smtpgate: TLS required but peer does not offer "
          "STARTTLS", "QUIT: 221 ")
    assert "STARTTLS: " not in r.stdout and "  TLS: " not in r.stdout
    assert r.stdout.splitlines()[-1] == ("  result: would defer: TLS required but peer does "
                                         "not offer STARTTLS")
    if FINGER is not None:
        # With -c posttls-finger prints nothing here at all: its chat shows the EHLO reply
        # without STARTTLS, then QUIT, and no TLS.
        out = posttls_finger(world, "mx.notls.test", chat=True)
        ehlo = re.findall(r"^posttls-finger: < 250[- ](\S+)", out, re.M)
        assert "CHUNKING" in ehlo and "STARTTLS" not in ehlo, out
        assert "> STARTTLS" not in out and "TLS connection established" not in out
        assert out.rstrip().endswith("posttls-finger: < 221 2.0.0 Bye")


def test_peer_without_tlsa_gets_unauthenticated_tls(world: World) -> None:
    r = smtpgate_check(world, "mx.nodane.test")
    assert r.returncode == 0, r.stdout + r.stderr
    steps(r.stdout, "destination 203.0.113.3", "plan: TLS if offered, else plaintext",
          "STARTTLS: 220 ", "TLS: TLSv1.",
          "verify: unauthenticated (the plan asks for no authentication)",
          "EHLO gw.example (over TLS): 250 ", "QUIT (over TLS): 221 ")
    assert r.stdout.splitlines()[-1] == "  result: tls (unauthenticated)"
    if FINGER is not None:
        # No TLSA: posttls-finger's dane level falls back to "secure" (CA-based), and
        # with no CA to trust the same session is "Untrusted": encrypted, not authenticated.
        out = posttls_finger(world, "mx.nodane.test")
        version, cipher = tls_facts(r.stdout)
        assert (f"Untrusted TLS connection established to mx.nodane.test[203.0.113.3]:25: "
                f"{version} with cipher {cipher} ") in out


def test_failed_handshake_falls_back_to_plaintext_like_a_session(world: World) -> None:
    r = smtpgate_check(world, BREAKER)
    assert r.returncode == 0, r.stdout + r.stderr
    steps(r.stdout, "plan: TLS if offered, else plaintext",
          "EHLO gw.example: 250 breaker.test; STARTTLS offered",
          "STARTTLS: 220 2.0.0 go ahead",
          "TLS handshake failed: handshake: SSLError: ",
          "fallback: TLS failed: handshake: SSLError: ",
          f"connect {BREAKER}:25: connected from ",
          "banner (fallback connection): 220 breaker.test ESMTP",
          "EHLO gw.example: 250 breaker.test",
          "QUIT: 221 2.0.0 bye")
    assert r.stdout.splitlines()[-1].startswith(
        "  result: plaintext (TLS failed: handshake: SSLError: ")


def test_unreachable_and_silent_peers_are_bounded_and_not_a_deferral(world: World) -> None:
    """Not a deferral (1): the check could not be made (3), and says why."""
    refused = smtpgate_check(world, dnslab.DNS_V4)  # a host with no SMTP server
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert refused.stdout.splitlines()[-1] == (
        f"  result: unreachable: connect to {dnslab.DNS_V4}:25: Connection refused")
    silent = smtpgate_check(world, "--timeout", "1", SILENT)
    assert silent.returncode == 3, silent.stdout + silent.stderr
    assert silent.stdout.splitlines()[-2:] == [
        f"  connect {SILENT}:25: connected from 203.0.113.1 (mark 0x2525)",
        "  result: peer failed: no complete banner within 1s"]


def test_a_name_dns_cannot_answer_for_is_not_a_name_without_addresses(
        world: World, tmp_path: Path) -> None:
    """A resolver that does not answer (a port nothing listens on) is not "no addresses"."""
    path = tmp_path / "dead-dns.yaml"
    path.write_text(gateway_config(resolvers=["127.0.0.1:5399"], dns_timeout=0.2))
    r = smtpgate_check(world, "-c", str(path), "--no-connect", "mx.b.test")
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith(
        "mx.b.test: its addresses are unknown: DNS gave no answer (A: "), r.stdout
    nx = smtpgate_check(world, "--no-connect", "nosuchhost.b.test")
    assert nx.returncode == 1 and nx.stdout.splitlines()[-1] == "nosuchhost.b.test: no addresses"


def test_an_invalid_target_is_refused_before_dns(world: World) -> None:
    r = smtpgate_check(world, "not a host!")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "'not a host!' is neither an IP address nor a host name" in r.stderr
    assert r.stdout == ""


def test_no_connect_prints_only_discovery_and_the_plan(world: World) -> None:
    r = smtpgate_check(world, "--no-connect", "mx.b.test")
    assert r.returncode == 0, r.stdout + r.stderr
    *_, plan_line, mta_line = r.stdout.splitlines()
    assert plan_line.startswith("  plan: TLS required, authenticate by DANE")
    assert mta_line == ("  an MTA doing STARTTLS itself: taken over (terminate): the gateway "
                        "verifies the peer, then answers the MTA's STARTTLS with its local key")
    assert "connect" not in r.stdout and "result:" not in r.stdout


def test_check_says_which_mta_keeps_its_own_starttls(world: World, tmp_path: Path) -> None:
    """``--mta``: an MTA in verifying_mtas keeps its STARTTLS; toward an opportunistic peer
    every MTA does."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listeners: [{address: 0.0.0.0, port: 10025, mta_starttls: hide, "
                   "verifying_mtas: [192.0.2.10]}]\n")
    lines = {}
    for mta, dest in (("192.0.2.10", "mx.b.test"), ("192.0.2.11", "mx.b.test"),
                      ("192.0.2.11", "mx.nodane.test")):
        r = smtpgate_check(world, "--no-connect", "-c", str(cfg), "--mta", mta, dest)
        assert r.returncode == 0, r.stdout + r.stderr
        lines[mta, dest] = r.stdout.splitlines()[-1]
    assert "left alone (step-aside: it verifies on its own)" in lines["192.0.2.10", "mx.b.test"]
    assert "withdrawn from the EHLO reply it sees (hide)" in lines["192.0.2.11", "mx.b.test"]
    assert "left alone (the plan authenticates nothing" in lines["192.0.2.11", "mx.nodane.test"]

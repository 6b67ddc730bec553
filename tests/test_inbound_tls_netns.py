"""Inbound STARTTLS as the internet sees it: an independent scanner, and key reloads under
load.

    peer (internet): testssl / openssl s_client / a small Python SMTP client
    gw:   smtpgate inbound, STARTTLS offload with the site's key (REDIRECT of port 25
          arriving on the internet side to the inbound listener, as in test_inbound_netns)
    mta:  legacy Postfix on 198.51.100.2:25, no TLS

**The scanner is Debian's testssl.sh** (package ``testssl.sh``, command ``testssl``:
bash + the system openssl + its own raw-socket ClientHellos), not sslyze, because:

- sslyze 6.3.1 (the current release) requires ``cryptography>=43,<47`` (and ``nassl<6``,
  ``pydantic``, ``tls-parser``).  The project's virtualenv has cryptography 50 (the
  project asks for >=41): ``pip install sslyze`` there would downgrade it, so the gateway
  would be tested against another cryptography than it runs with.
- A separate virtualenv for sslyze would have to be made by the tests themselves (a
  PyPI download at test time, in every fresh CI clone) since ``scripts/install`` builds
  only ``.venv``; testssl.sh comes from Debian like Postfix, NSD and openssl, installed by
  ``scripts/bootstrap-debian``.
- testssl.sh sends SSLv2/SSLv3/TLS 1.0/1.1 and every cipher suite it knows (about 370,
  including export, anonymous, NULL, RC4, 3DES, CBC, static RSA/DH) from its own sockets,
  so it does not depend on what the local OpenSSL still supports, and it writes
  machine-readable findings (``--jsonfile``: a flat list of ``{id, severity, finding}``).

The runs, from the peer namespace: ``testssl --quiet --color 0 --warnings off --nodns none
--openssl-timeout 10 --starttls smtp CHECKS --jsonfile OUT 198.51.100.2:25`` with CHECKS
``--protocols --cipher-per-proto --server-defaults --renegotiation --crime`` for the
ECDSA key (smtpgate keygen's default), and ``--protocols --cipher-per-proto`` for an RSA
key (with RSA, static-RSA, DHE-RSA and CBC suites would be possible, so the suite
restriction is what is tested; the other checks do not depend on the key).  The peer's
resolv.conf says ``nameserver 127.0.0.1`` and testssl gets ``NXCONNECT=127.0.0.1:0``:
testssl probes its openssl with ``s_client -connect invalid.``, and with the host's
resolver unreachable from the lab those lookups alone took 160 s; this way every lookup
fails at once and nothing leaves the lab.  ``--server-defaults`` (certificate checks,
and where the session ticket findings are) is the slow part: about 25 s for the full
scan and 15 s for the RSA one on a quiet machine, 40 s and 22 s on a busy one.

**Session resumption.**  testssl 3.0.8 reports the session ticket extension of the TLS 1.2
ServerHello (``TLS_extensions``: "session ticket/#35", gone with ``OP_NO_TICKET``) and the
lifetime hint (``TLS_session_ticket``, which alone proves little: with ``OP_NO_TICKET``
OpenSSL still sends TLS 1.3 tickets, stateful ones, with the same hint).  Its resumption
check (``sessionresumption_ticket``) runs ``openssl s_client -sess_out F </dev/null``:
with TLS 1.3 the tickets come after the handshake, and s_client, seeing end of input at
once, races them - it caught them in 8 of 20 tries against the gateway and 15 of 20
against a TLS-enabled Postfix; the other times the check ends "check failed because of
connect problem".  So that finding may be only that (never "not supported"), and
resumption itself is shown by ``openssl s_client`` that keeps its input open until the
ticket arrived, then resumes with it (TLS 1.2 and TLS 1.3: "Reused"; the gateway logs
``tls_resumed: yes``).

The second test reloads the gateway (SIGHUP) 6 times, the configured pair alternating
between an ECDSA and an RSA key, while 44 SMTP sessions with STARTTLS (half TLS 1.2, half
TLS 1.3) run 10 at a time from the peer, plus one session per reload that is in TLS
before it and held until after it - 50 messages.  None may fail, every message must
arrive exactly once, each session sees the key that was configured when it connected,
and a held session finishes with the key it started with.  About 3 s.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gatelab import certs, netlab, postfix_instance
from gatelab.gatewayproc import GatewayProcess, gateway_config
from gatelab.netlab import MTA_V4, Lab
from gatelab.postfix_instance import PostfixInstance, receiver_settings
from gateway.keys import TICKET_LIFETIME

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

INBOUND_PORT = 10026
MX_NAME = "mx.b.test"

TLS12_ALLOWED = re.compile(
    r"TLS_ECDHE_(ECDSA|RSA)_WITH_(AES_(128|256)_GCM_SHA(256|384)|CHACHA20_POLY1305_SHA256)")
TLS13_ALLOWED = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                 "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_CCM_SHA256"}
# Spelled out as well, so a failure names what slipped through: anonymous, NULL, export,
# RC4, CBC, (3)DES and the other non-AEAD ciphers; static RSA, static ECDH, finite-field DHE.
FORBIDDEN = re.compile(r"NULL|anon|EXPORT|RC4|CBC|DES|IDEA|SEED|CAMELLIA|ARIA|PSK|SRP|_SHA$"
                       r"|^TLS_(RSA|DH|DHE|ECDH)_")


@dataclass
class Pair:
    key: Path
    cert: Path
    spki_sha256: str  # what a client sees: SHA-256 of the leaf's SubjectPublicKeyInfo


def write_key_pair(work: Path, name: str, key_type: certs.KeyType = "ec") -> Pair:
    """A self-signed leaf for mx.b.test; the key file is 0600 from its creation."""
    leaf = certs.make_leaf(None, [MX_NAME], key_type=key_type)
    pki = certs.write_pki(work / name, leaf)
    return Pair(pki["key"], pki["cert"], hashlib.sha256(leaf.spki_der).hexdigest())


def inbound_config(pair: Pair) -> str:
    return gateway_config(listeners=[
        f'{{address: 0.0.0.0, port: {INBOUND_PORT}, direction: inbound, starttls: offload, '
        f'client_address: none, upstreams: ["{MTA_V4}:25"]}}'], tls=(pair.key, pair.cert))


@dataclass
class Site:
    lab: Lab
    work: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("inbound-tls")
    with Lab() as lab:
        lab.redirect_port25(INBOUND_PORT, inbound=True)
        # No resolver in this lab: lookups from the peer (the scanner's) fail at once on
        # loopback instead of waiting for the host's resolver, and never leave the lab.
        lab.peer.set_resolv_conf("nameserver 127.0.0.1\n")
        yield Site(lab, work)


def legacy_mta(s: Site, name: str) -> PostfixInstance:
    settings = receiver_settings(MTA_V4, domain="b.test", myhostname="legacy.b.test")
    return PostfixInstance(s.lab.mta, s.work, settings, name=name)


# -- 1. the scanner --------------------------------------------------------------------

TESTSSL_COMMON = ("--quiet", "--color", "0", "--warnings", "off", "--nodns", "none",
                  "--openssl-timeout", "10", "--starttls", "smtp")
SCAN_ALL = ("--protocols", "--cipher-per-proto", "--server-defaults", "--renegotiation",
            "--crime", "--fs")
SCAN_SUITES = ("--protocols", "--cipher-per-proto")

needs_testssl = pytest.mark.skipif(
    shutil.which("testssl") is None or shutil.which("openssl") is None,
    reason="testssl (Debian package testssl.sh) or openssl not installed: "
           "scripts/bootstrap-debian installs them")


@dataclass
class Scan:
    findings: dict[str, list[str]]  # id -> ["SEVERITY: finding", ...]
    report: str  # for assertion messages

    def one(self, key: str) -> str:
        got = self.findings.get(key)
        assert got and len(got) == 1, f"{key}: {got}\n{self.report}"
        return got[0]


def run_testssl(s: Site, out: Path, checks: tuple[str, ...]) -> Scan:
    """testssl from the peer against the MX, STARTTLS SMTP; its JSON findings."""
    env = {**os.environ, "NXCONNECT": "127.0.0.1:0"}  # see the module docstring
    started = time.monotonic()
    r = s.lab.peer.run(["testssl", *TESTSSL_COMMON, *checks, "--jsonfile", str(out),
                        f"{MTA_V4}:25"], check=False, timeout=150, env=env,
                       stdin=subprocess.DEVNULL)
    report = (f"testssl {' '.join(checks)}: {time.monotonic() - started:.0f} s, "
              f"rc {r.returncode}\n{r.stdout[-8000:]}\n{r.stderr[-2000:]}")
    assert out.exists(), report
    findings: dict[str, list[str]] = collections.defaultdict(list)
    for f in json.loads(out.read_text()):
        findings[f["id"]].append(f"{f['severity']}: {f['finding']}")
    scan = Scan(findings, report)
    assert not [x for x in findings.get("scanProblem", []) if x.startswith("FATAL")], report
    return scan


def check_protocols_and_suites(scan: Scan, key_type: certs.KeyType) -> None:
    # Protocols: SSL 2/3, TLS 1.0 and 1.1 refused; TLS 1.2 and 1.3 accepted.
    for proto in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert scan.one(proto).split(": ", 1)[1].startswith("not offered"), scan.report
    assert scan.one("TLS1_2") == "OK: offered", scan.report
    assert scan.one("TLS1_3").startswith("OK: offered"), scan.report
    # Suites accepted, per protocol ("cipher-tls1_2_xc02b": "TLS 1.2 xc02b ... IANA-name").
    suites: dict[str, list[str]] = collections.defaultdict(list)
    for key, found in scan.findings.items():
        if m := re.fullmatch(r"cipher-(\w+?)_x[0-9a-f]+", key):
            suites[m.group(1)] += [line.split()[-1] for line in found]
    assert set(suites) == {"tls1_2", "tls1_3"}, (dict(suites), scan.report)
    for name in suites["tls1_2"]:
        assert TLS12_ALLOWED.fullmatch(name), (name, scan.report)
        assert not FORBIDDEN.search(name), (name, scan.report)
    assert set(suites["tls1_3"]) <= TLS13_ALLOWED, (suites["tls1_3"], scan.report)
    auth = "ECDSA" if key_type == "ec" else "RSA"
    assert {f"TLS_ECDHE_{auth}_WITH_AES_128_GCM_SHA256",
            f"TLS_ECDHE_{auth}_WITH_AES_256_GCM_SHA384",
            f"TLS_ECDHE_{auth}_WITH_CHACHA20_POLY1305_SHA256"} == set(suites["tls1_2"])
    assert {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256"} <= set(suites["tls1_3"])


def s_client_resumes(s: Site, version: str) -> tuple[str, str]:
    """A full handshake that waits for the session ticket, then a resumption with it
    (openssl s_client, from the peer): the two outputs."""
    sess = s.work / f"session{version}.pem"
    sess.unlink(missing_ok=True)
    base = ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{MTA_V4}:25",
            "-servername", MX_NAME, version]
    first = s.lab.peer.popen([*base, "-sess_out", str(sess)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        # s_client writes the session when a ticket arrives (TLS 1.3: after the handshake).
        while b"END SSL SESSION PARAMETERS" not in (sess.read_bytes() if sess.exists()
                                                     else b""):
            if first.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        out1, _ = first.communicate(b"QUIT\n", timeout=15)  # "Q": s_client closes
    finally:
        s.lab.peer.stop(first)
    second = s.lab.peer.run([*base, "-sess_in", str(sess)], input="QUIT\n", check=False,
                            timeout=30)
    return out1.decode(errors="replace"), second.stdout + second.stderr


@needs_testssl
def test_scanner_sees_only_modern_tls(site: Site) -> None:
    """testssl against the inbound STARTTLS with the site's ECDSA key (smtpgate keygen's
    default): protocols, suites, tickets, compression, renegotiation; then resumption."""
    pair = write_key_pair(site.work, "scanec")
    with legacy_mta(site, "legacyscanec"), \
            GatewayProcess(site.lab.gw, site.work / "scanec", inbound_config(pair)) as gw:
        scan = run_testssl(site, site.work / "testssl-ec.json", SCAN_ALL)
        check_protocols_and_suites(scan, "ec")

        # Session tickets issued, with the lifetime the gateway documents.
        assert "session ticket/#35" in scan.one("TLS_extensions"), scan.report
        assert f"valid for {TICKET_LIFETIME} seconds" in scan.one("TLS_session_ticket")
        # testssl's own resumption check races TLS 1.3 tickets (module docstring): it may
        # fail to run; it must not find tickets unsupported.
        assert scan.one("sessionresumption_ticket") in (
            "INFO: supported", "WARN: check failed because of connect problem"), scan.report
        # Key exchange groups: Mozilla's intermediate set, no X448, P-521 or FFDHE.
        curves = scan.one("PFS_ECDHE_curves").split(": ", 1)[1].split()  # testssl 3.0 names
        assert set(curves) == {"prime256v1", "secp384r1", "X25519"}, scan.report
        assert "DH_groups" not in scan.findings, scan.report  # no finite-field DHE at all
        # No compression (CRIME: deflate offered, none chosen); no client renegotiation.
        assert scan.one("CRIME_TLS").startswith("OK: not vulnerable"), scan.report
        assert scan.one("secure_client_renego").startswith("OK: not vulnerable"), scan.report
        assert scan.one("secure_renego") == "OK: supported", scan.report  # RFC 5746 only

        # Resumption with the ticket, by a client that waits for it.
        for version, proto in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
            full, again = s_client_resumes(site, version)
            assert f"New, {proto}, Cipher is " in full, full
            assert f"TLS session ticket lifetime hint: {TICKET_LIFETIME}" in full, full
            assert f"Reused, {proto}, Cipher is " in again, again

        # The scan's malformed and refused handshakes did not hurt the gateway.
        assert gw.proc is not None and gw.proc.poll() is None, gw.log_text()[-3000:]
        # ... and it saw the resumptions too (testssl's own may be among them).
        deadline = time.monotonic() + 10
        while {x["tls_version"] for x in gw.sessions()
               if x.get("tls_resumed") == "yes"} != {"TLSv1.2", "TLSv1.3"}:
            assert time.monotonic() < deadline, gw.log_text()[-3000:]
            time.sleep(0.05)


@needs_testssl
def test_scanner_with_an_rsa_key_sees_only_ecdhe_aead(site: Site) -> None:
    """With an RSA key static-RSA, DHE-RSA and RSA CBC suites would all be possible: the
    suite restriction itself is what keeps them out.  Protocols and suites only (the rest
    does not depend on the key)."""
    pair = write_key_pair(site.work, "scanrsa", "rsa")
    with legacy_mta(site, "legacyscanrsa"), \
            GatewayProcess(site.lab.gw, site.work / "scanrsa", inbound_config(pair)):
        check_protocols_and_suites(
            run_testssl(site, site.work / "testssl-rsa.json", SCAN_SUITES), "rsa")


# -- 2. reload under load --------------------------------------------------------------

LOAD_SESSIONS = 44  # plus one straddling session per reload: 50 messages in all
RELOADS = 6
THREADS = 10
IO_TIMEOUT = 20.0
THINK = 0.05  # seconds before each command after the handshake


class SmtpError(Exception):
    pass


class Client:
    """Just enough of an SMTP client over a socket made in the peer namespace."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket = sock
        self.buf = b""

    def reply(self) -> tuple[int, list[bytes]]:
        lines: list[bytes] = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise SmtpError(f"connection closed, after {lines!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def command(self, line: bytes, expect: int) -> list[bytes]:
        self.sock.sendall(line + b"\r\n")
        code, lines = self.reply()
        if code != expect:
            raise SmtpError(f"{line[:20]!r}: {lines!r}, expected {expect}")
        return lines


@dataclass
class Outcome:
    index: int
    marker: str
    straddles: int = 0  # the reload this session was held across (0: none)
    t_connect: float = 0.0
    t_tls: float = 0.0
    t_end: float = 0.0
    spki: str = ""
    version: str = ""
    replies: dict[str, int] = field(default_factory=dict)
    error: str = ""


def client_context(tls12: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the key is recorded, and compared, instead
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def one_session(lab: Lab, o: Outcome, ctx: ssl.SSLContext, think: float = 0.0,
                hold: tuple[threading.Event, threading.Event] | None = None) -> Outcome:
    """connect, banner, EHLO, STARTTLS, handshake, EHLO, [held], MAIL, RCPT, DATA, QUIT;
    ``think`` seconds before each command after the handshake (a session lasts a while)."""
    o.t_connect = time.monotonic()
    try:
        sock = lab.peer.connect(MTA_V4, 25, timeout=IO_TIMEOUT)
        sock.settimeout(IO_TIMEOUT)
        c = Client(sock)
        try:
            code, banner = c.reply()
            if code != 220:
                raise SmtpError(f"banner {banner!r}")
            ehlo = c.command(b"EHLO load.example.org", 250)
            if not any(x[4:].upper() == b"STARTTLS" for x in ehlo):
                raise SmtpError(f"no STARTTLS in {ehlo!r}")
            c.command(b"STARTTLS", 220)
            if c.buf:
                raise SmtpError(f"bytes after the 220 to STARTTLS: {c.buf!r}")
            tls = ctx.wrap_socket(sock, server_hostname=MX_NAME)
            c.sock = tls
            o.t_tls = time.monotonic()
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            o.spki, o.version = hashlib.sha256(spki).hexdigest(), tls.version() or ""
            c.command(b"EHLO load.example.org", 250)
            if hold is not None:
                ready, release = hold
                ready.set()
                if not release.wait(IO_TIMEOUT):
                    raise SmtpError("never released")
            body = (f"Subject: reload under load {o.index}\r\n"
                    f"Message-ID: <{o.marker}@load.example.org>\r\n\r\n{o.marker}\r\n")
            for step, line, expect in (("mail", b"MAIL FROM:<alice@example.org>", 250),
                                       ("rcpt", b"RCPT TO:<bob@b.test>", 250),
                                       ("data", b"DATA", 354),
                                       ("end of data", body.encode() + b".", 250),
                                       ("quit", b"QUIT", 221)):
                time.sleep(think)
                c.sock.sendall(line + b"\r\n")
                code, lines = c.reply()
                o.replies[step] = code
                if code != expect:
                    raise SmtpError(f"{step}: {lines!r}, expected {expect}")
            # close_notify both ways, so that nothing is left unread (which would make
            # the close a reset).
            c.sock = tls.unwrap()
        finally:
            c.sock.close()
    except (OSError, SmtpError, ValueError) as exc:
        o.error = f"{type(exc).__name__}: {exc}"
    o.t_end = time.monotonic()
    return o


def test_reload_under_load_rotates_keys_and_drops_no_session(site: Site) -> None:
    """SIGHUP x RELOADS, the key alternating between an ECDSA and an RSA pair, while
    LOAD_SESSIONS sessions run THREADS at a time; plus, for each reload, one session
    established before it and held until after it."""
    pairs = [write_key_pair(site.work, "loada"), write_key_pair(site.work, "loadb", "rsa")]
    configs = [inbound_config(p) for p in pairs]
    cond = threading.Condition()
    completed = in_flight = 0
    outcomes = [Outcome(i, f"MARKER-{uuid.uuid4().hex}") for i in range(LOAD_SESSIONS + RELOADS)]
    contexts = [client_context(False), client_context(True)]  # TLS 1.3, TLS 1.2

    def load(o: Outcome) -> Outcome:
        nonlocal completed, in_flight
        with cond:
            in_flight += 1
        try:
            return one_session(site.lab, o, contexts[o.index % 2], THINK)
        finally:
            with cond:
                in_flight -= 1
                completed += 1
                cond.notify_all()

    def progressed(n: int) -> Callable[[], bool]:
        return lambda: completed >= n

    # (from, to, key index): the key configured while no reload was in progress.
    windows: list[tuple[float, float, int]] = []
    busy_at_reload: list[int] = []
    started = time.monotonic()
    with legacy_mta(site, "legacyload") as mta, \
            GatewayProcess(site.lab.gw, site.work / "load", configs[0]) as gw, \
            ThreadPoolExecutor(THREADS, thread_name_prefix="load") as pool, \
            ThreadPoolExecutor(RELOADS, thread_name_prefix="held") as held_pool:
        futures: list[Future[Outcome]] = [pool.submit(load, o)
                                          for o in outcomes[:LOAD_SESSIONS]]
        current, stable_from = 0, time.monotonic()
        for k in range(1, RELOADS + 1):
            threshold = k * LOAD_SESSIONS // (RELOADS + 1)
            with cond:
                assert cond.wait_for(progressed(threshold), 60), (k, completed)
            # One more session, in TLS with the current key, held across this reload.
            ready, release = threading.Event(), threading.Event()
            held = outcomes[LOAD_SESSIONS + k - 1]
            held.straddles = k
            futures.append(held_pool.submit(one_session, site.lab, held, contexts[k % 2],
                                            0.0, (ready, release)))
            assert ready.wait(IO_TIMEOUT), held
            gw.config_path.write_text(configs[1 - current])
            windows.append((stable_from, time.monotonic(), current))
            with cond:
                busy_at_reload.append(in_flight)
            gw.signal(signal.SIGHUP)
            gw.wait_event("reloaded", k)
            current, stable_from = 1 - current, time.monotonic()
            release.set()
        windows.append((stable_from, float("inf"), current))
        done = [f.result(timeout=120) for f in futures]
        load_took = time.monotonic() - started

        failed = [o for o in done if o.error or o.replies.get("end of data") != 250
                  or o.replies.get("quit") != 221]
        assert not failed, failed
        assert len(done) == LOAD_SESSIONS + RELOADS

        # Every message arrived, exactly once.
        sent = collections.Counter(hashlib.sha256(o.marker.encode()).hexdigest() for o in done)
        lines = gw.wait_sessions(len(done), timeout=30)
        mta.wait_maildir(len(done), timeout=60)
        mta.wait_queue_empty(timeout=30)
        got: collections.Counter[str] = collections.Counter()
        for path in mta.maildir_messages():
            for marker in re.findall(rb"^MARKER-[0-9a-f]{32}$", path.read_bytes(), re.M):
                got[hashlib.sha256(marker).hexdigest()] += 1
        assert got == sent, (len(got), len(sent), got - sent, sent - got)
        assert len(mta.maildir_messages()) == len(done)

        # The gateway: one relayed TLS session each, RELOADS reloads, none rejected.
        assert len(lines) == len(done), lines
        odd = [x for x in lines
               if (x["direction"], x.get("tls"), x["outcome"]) != ("inbound", "tls", "relayed")]
        assert not odd, odd
        assert len(gw.events("reloaded")) == RELOADS
        assert not gw.events("reload rejected"), gw.events("reload rejected")

    # Under load: sessions of the loop were running at every SIGHUP.
    assert all(n > 0 for n in busy_at_reload), busy_at_reload
    # Keys: both seen; each session saw the key configured when it connected; a session
    # held across a reload kept the key it had before.
    spkis = [p.spki_sha256 for p in pairs]
    assert {o.spki for o in done} == set(spkis)
    assert {o.version for o in done} == {"TLSv1.2", "TLSv1.3"}
    checked: collections.Counter[int] = collections.Counter()  # key index -> sessions
    for o in done:
        if o.straddles:
            before, after = windows[o.straddles - 1], windows[o.straddles]
            assert o.spki == spkis[before[2]], (o, windows)
            assert o.t_tls < before[1] < after[0] < o.t_end, (o, windows)
            continue
        for start, end, key in windows:
            if start <= o.t_connect and o.t_tls <= end:
                assert o.spki == spkis[key], (o, windows)
                checked[key] += 1
    # Most sessions connect and finish their handshake between two reloads.
    assert min(checked[0], checked[1]) >= 3, (checked, windows)
    print(f"{len(done)} sessions, {RELOADS} reloads in {load_took:.1f} s; load sessions "
          f"running at each SIGHUP: {busy_at_reload}; key checked by period: {dict(checked)}")

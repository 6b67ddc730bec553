"""STARTTLS injection against the real gateway process (issue #10, item 3): every command
and response injection vector, in both directions, as one segment, split, and byte by byte.
The figure (trials, acted on) is printed by ``test_starttls_injection_is_never_acted_on``
(``pytest -s``) and is part of its assertion message.

    mta (the MTA's side)  --  gw: smtpgate  --  peer (the internet)
    198.51.100.2             outbound :10025    203.0.113.2 encrypt, .3 fingerprint (pins),
    fake legacy MTA :25      inbound  :10026    .4 may: fake SMTP peers with TLS

Every fake endpoint is a :class:`gatelab.fakesmtp.Wire`: TLS runs on memory BIOs so the raw
bytes around STARTTLS stay visible, and every byte read and written is recorded.  Nothing is
judged from the gateway's own account alone: each trial checks what the far end actually
received.

"Acted on" means any of: an injected byte reaching the other side (the MTA gets exactly the
peer's honest replies or one ``421`` from smtpgate, nothing else); a command the gateway sends
in plaintext after STARTTLS; a held command reaching the peer when the session was refused;
the legacy MTA receiving anything of an injected command, or the client being answered after
the ``220``; a session whose log line says it went on as if nothing happened.

The vectors (literature: CVE-2011-0411; Poddebniak et al., "Why TLS is better without
STARTTLS", USENIX Security 2021):

outbound, the gateway as STARTTLS client
  response injection after the peer's ``220`` (extra reply lines, a fake EHLO reply, a fake
  ``250`` for MAIL, a whole fake transaction, a second ``220``, a ``421``, a bare CRLF, one
  byte, TLS-looking bytes, 8 KB of reply lines) delivered in the 220's segment, in a segment
  of its own, 50 ms later, byte by byte (the 220 too), or after the gateway's ClientHello;
  under ``encrypt``, ``fingerprint`` and ``may``
  early responses: a fake EHLO reply or fake ``250`` behind the banner, a fake ``220`` / fake
  ``250`` for MAIL / a whole fake transaction behind the EHLO reply (before the gateway's
  STARTTLS), in the same segment, split, byte by byte
  command direction: the MTA's held commands (one segment, split, byte by byte while the
  handshake runs): the peer must see a ClientHello right after STARTTLS, never plaintext
  end to end: the MTA's own STARTTLS with commands pipelined behind it, and a peer injecting
  after its 220: the gateway steps aside, copies bytes both ways, answers nothing
inbound, the gateway as STARTTLS server (offload)
  command injection ``STARTTLS\\r\\n`` + MAIL / RSET / EHLO / QUIT / a second STARTTLS / a
  whole transaction / a bare CRLF / one byte / a bare-LF command: one segment, a segment of
  its own before and after the 220, byte by byte, after the ClientHello
  pipelined plaintext before STARTTLS (EHLO+STARTTLS, EHLO+MAIL+STARTTLS, NOOP/RSET/MAIL
  ahead of STARTTLS, HELO then STARTTLS, two EHLOs), one segment and byte by byte
  the legacy MTA's unsolicited reply before STARTTLS (response direction)
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gatelab import certs, netlab
from gatelab.fakedns import FakeDns, knows_nothing
from gatelab.fakesmtp import (
    BYTE_GAP,
    EHLO_LINE,
    READY,
    FakeServer,
    Script,
    Served,
    Wire,
    positive,
    send_as,
    verb,
)
from gatelab.gatewayproc import GatewayProcess, LogFollower, gateway_config
from gatelab.netlab import MTA_V4, PEER_V4, PEER_V4_ALT, Lab

pytestmark = pytest.mark.netns

if (_why := netlab.netns_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

INBOUND_PORT = 10026
MAY_PEER = "203.0.113.4"
VERIFYING_MTA = "198.51.100.3"  # listed in verifying_mtas: its STARTTLS is its own
SMTPGATE_421 = re.compile(rb"421 4\.\d\.\d+ smtpgate: [ -~]*\r\n")


def tls_client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- the world ----------------------------------------------------------------------------

@dataclass
class World:
    lab: Lab
    gw: GatewayProcess
    log: LogFollower
    peer_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext
    peers: dict[str, FakeServer]  # by address: PEER_V4 encrypt, PEER_V4_ALT pins, MAY_PEER
    mta: FakeServer  # the legacy MTA behind the inbound listener
    dns: FakeDns


def injection_config(fingerprint: str, key: Path, cert: Path) -> str:
    return gateway_config(
        listeners=[f"{{address: 0.0.0.0, port: 10025, verifying_mtas: [{VERIFYING_MTA}]}}",
                   f"{{address: 0.0.0.0, port: {INBOUND_PORT}, direction: inbound, "
                   f'starttls: offload, client_address: none, upstreams: ["{MTA_V4}:25"]}}'],
        idle=10, session=60, drain=2, log_level="info", dns_timeout=0.5, budget=2,
        policy="encrypt", entries=[
            f'{{match: {PEER_V4_ALT}/32, level: fingerprint, fingerprints: ["{fingerprint}"]}}',
            f"{{match: {MAY_PEER}/32, level: may}}"], tls=(key, cert))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("injection")
    peer_leaf = certs.make_leaf(None, ["mx.peer.test"])
    site_leaf = certs.make_leaf(None, ["mx.b.test"])
    peer_ctx = certs.server_context(work / "peer", peer_leaf)
    site = certs.write_pki(work / "site", site_leaf)  # the gateway's pair
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab())
        lab.peer.ip("addr", "add", f"{MAY_PEER}/24", "dev", netlab.HOST_IF)
        lab.mta.ip("addr", "add", f"{VERIFYING_MTA}/24", "dev", netlab.HOST_IF)
        lab.redirect_port25(10025)
        lab.redirect_port25(INBOUND_PORT, inbound=True)
        dns_ = FakeDns(knows_nothing()).serve_in(lab.gw)
        stack.callback(dns_.close)
        honest = Script(context=peer_ctx)
        peers = {}
        for host in (PEER_V4, PEER_V4_ALT, MAY_PEER):
            peers[host] = FakeServer(lab.peer, host, honest)
            stack.callback(peers[host].close)
        mta = FakeServer(lab.mta, MTA_V4, Script(name=b"legacy.b.test",
                                                 caps=(b"PIPELINING", b"8BITMIME")))
        stack.callback(mta.close)
        fingerprint = hashlib.sha256(peer_leaf.der).hexdigest()
        gw = stack.enter_context(GatewayProcess(
            lab.gw, work, injection_config(fingerprint, site["key"], site["cert"])))
        yield World(lab, gw, LogFollower(gw), peer_ctx, tls_client_context(), peers, mta, dns_)


# -- trials -------------------------------------------------------------------------------

ENVELOPE = b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\nDATA\r\n"
MESSAGE = b"Subject: injection trial\r\n\r\nhello\r\n.\r\n"
CLIENT_EHLO = b"EHLO client.c.test\r\n"


@dataclass
class Tally:
    """Trials per group, and what was acted on (with the evidence)."""

    trials: collections.Counter[str] = field(default_factory=collections.Counter)
    acted: list[str] = field(default_factory=list)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)

    def record(self, group: str, name: str, problems: list[str], outcome: str) -> None:
        self.trials[group] += 1
        self.outcomes[outcome] += 1
        if problems:
            self.acted.append(f"{group} {name}: {'; '.join(problems)}")

    @property
    def figure(self) -> str:
        return f"injection: {sum(self.trials.values())} trials, {len(self.acted)} acted on"


def envelope_seen(conns: list[Served]) -> bool:
    return any(verb(line) in (b"MAIL", b"RCPT", b"DATA") for c in conns
               for line, _ in c.commands)


def outcome_of(s: dict[str, Any]) -> str:
    reason = str(s.get("tls_reason", "")).split(":", maxsplit=1)[0]
    return f"{s.get('tls', '-')}: {reason or s.get('verify', '')}"


def mta_session(w: World, dst: str, envelope_mode: str = "segment") -> Wire:
    """The MTA's side of an outbound session: EHLO, then MAIL/RCPT/DATA pipelined (as
    ``envelope_mode``), the message on a 354, QUIT.  Stops at the first 4xx/5xx."""
    c = Wire(w.lab.mta.connect(dst, 25))
    try:
        if positive(c.reply()):
            c.send(EHLO_LINE)
            if positive(c.reply()):
                send_as(c, ENVELOPE, envelope_mode)
                replies: list[bytes] = []
                while len(replies) < 3 and positive(r := c.reply()):
                    assert r is not None
                    replies.append(r)
                if len(replies) == 3 and replies[2].startswith(b"354"):
                    c.send(MESSAGE)
                    c.reply()
                    c.send(b"QUIT\r\n")
                    c.reply()
    finally:
        c.finish()
    return c


def judge_outbound(mta: Wire, conns: list[Served], s: dict[str, Any], policy: str,
                   injected: bool) -> list[str]:
    """What acting on an injection would look like, outbound; [] when nothing was."""
    problems: list[str] = []
    if not conns:
        return ["the peer was never reached"]
    first = conns[0]
    script = first.script
    if injected and (script.inject or script.after_banner or script.after_ehlo) \
            and not any(c.injected for c in conns):
        problems.append("the injection was never sent: the trial proves nothing")
    banner = first.replies[0][1]
    ehlo = next((t for v, t in first.replies if v == b"EHLO"), b"")
    got = bytes(mta.plain_in)
    # Refused: one 421 from smtpgate, last.  What came before it is whatever the plaintext
    # phase carried (a forged EHLO reply taken for the real one, say): nothing crossed TLS.
    refused = got.startswith(banner) and got.count(b" smtpgate: ") == 1 and bool(
        re.search(SMTPGATE_421.pattern + rb"\Z", got))
    carrier = next((c for c in conns if got == banner + ehlo + c.honest_tail()), None)
    if not refused and carrier is None:
        problems.append(f"the MTA got bytes that are neither the peer's replies nor one 421: "
                        f"{got[len(banner + ehlo):][:200]!r}")
    for c in conns:
        after = c.after_starttls
        if c.starttls_at >= 0 and after and not after.startswith(b"\x16\x03") \
                and after != b"QUIT\r\n":
            problems.append(f"plaintext after STARTTLS reached the peer: {after[:40]!r}")
    if refused:
        if envelope_seen(conns):
            problems.append("refused, yet the held envelope reached the peer")
        if (s["outcome"], s.get("tls")) != ("deferred", "deferred"):
            problems.append(f"the MTA got a 421 but the session says {outcome_of(s)}")
    elif carrier is not None:
        if carrier.stream != EHLO_LINE + bytes(mta.plain_out)[len(EHLO_LINE):]:
            problems.append("the peer's commands differ from the MTA's")
        want = "plaintext" if not carrier.wire.secure else {
            "encrypt": "tls", "fingerprint": "fingerprint", "may": "tls"}[policy]
        if s.get("tls") != want:
            problems.append(f"delivered, but the session says {outcome_of(s)}, not {want}")
        if policy != "may" and not carrier.wire.secure:
            problems.append(f"delivered in plaintext under {policy}")
        if injected and carrier.wire.secure and carrier is first:
            problems.append("the upgrade went on over the injected bytes")
    return problems


POLICY_PEER = {"encrypt": PEER_V4, "fingerprint": PEER_V4_ALT, "may": MAY_PEER}


def outbound_trial(w: World, policy: str, script: Script, envelope_mode: str = "segment",
                   injected: bool = True) -> tuple[list[str], str]:
    server = w.peers[POLICY_PEER[policy]]
    mark = server.arm(script)
    mta = mta_session(w, POLICY_PEER[policy], envelope_mode)
    s = w.log.next_session(f"{POLICY_PEER[policy]}:25")
    conns = server.settle(mark)
    return judge_outbound(mta, conns, s, policy, injected), outcome_of(s)


# Response injection after the peer's 220 to STARTTLS.
AFTER_220 = {
    "extra reply line": b"250 2.0.0 injected extra line\r\n",
    "fake EHLO reply": b"250-mx.evil.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n",
    "fake 250 for MAIL": b"250 2.1.0 injected sender ok\r\n",
    "fake transaction": b"250 2.1.0 inj\r\n250 2.1.5 inj\r\n354 inj\r\n250 2.0.0 inj queued\r\n",
    "second 220": b"220 2.0.0 injected ready\r\n",
    "fake 421": b"421 4.7.0 injected shutdown\r\n",
    "bare CRLF": b"\r\n",
    "one byte": b"2",
    "TLS-looking bytes": b"\x16\x03\x01\x00\x05hello",
    "8 KB of lines": b"250-injected\r\n" * 585 + b"250 injected\r\n",
}
AFTER_220_MODES = ("segment", "split", "later", "bytewise", "after-hello")

# Responses pushed before the gateway ever says STARTTLS.
EARLY = {
    "fake EHLO reply behind the banner": ("banner", b"250-evil.test\r\n250 AUTH PLAIN\r\n"),
    "fake 250 behind the banner": ("banner", b"250 2.1.0 injected sender ok\r\n"),
    "fake 220 behind the EHLO reply": ("ehlo", b"220 2.0.0 injected ready\r\n"),
    "fake 250 for MAIL behind the EHLO reply": ("ehlo", b"250 2.1.0 injected sender ok\r\n"),
    "fake transaction behind the EHLO reply": (
        "ehlo", b"250 2.1.0 inj\r\n250 2.1.5 inj\r\n354 inj\r\n250 2.0.0 inj queued\r\n"),
}

# Commands an MTA pipelines behind its own STARTTLS, and what a peer injects behind its 220.
E2E_COMMANDS = {
    "nothing": b"",
    "MAIL": b"MAIL FROM:<mallory@evil.test>\r\n",
    "RSET": b"RSET\r\n",
    "envelope": ENVELOPE,
    "bare CRLF": b"\r\n",
}
E2E_RESPONSES = {"nothing": b"", "fake 250": b"250 2.0.0 injected\r\n"}

# Client commands behind STARTTLS, inbound.
BEHIND_STARTTLS = {
    "MAIL": b"MAIL FROM:<mallory@evil.test>\r\n",
    "RSET": b"RSET\r\n",
    "EHLO": b"EHLO evil.test\r\n",
    "QUIT": b"QUIT\r\n",
    "second STARTTLS": b"STARTTLS\r\n",
    "transaction": b"MAIL FROM:<m@evil.test>\r\nRCPT TO:<bob@b.test>\r\nDATA\r\n"
                   b"Subject: injected\r\n\r\nX\r\n.\r\n",
    "bare CRLF": b"\r\n",
    "one byte": b"M",
    "bare-LF command": b"NOOP\n",
}
INBOUND_MODES = ("segment", "immediate", "split", "bytewise", "after-hello")


def inbound_client(w: World, inject: bytes, mode: str) -> Wire:
    """An internet client that says STARTTLS and injects behind it (as ``mode``), then tries
    TLS if it was answered 220, and a little SMTP if that worked."""
    c = Wire(w.lab.peer.connect(MTA_V4, 25))
    try:
        c.reply()
        c.send(CLIENT_EHLO)
        c.reply()
        c.mark = len(c.raw_in) - len(c.buf)
        line = b"STARTTLS\r\n"
        ready: bytes | None = None
        if mode == "segment":
            c.send(line + inject)
        elif mode == "immediate":
            c.send(line)
            c.send(inject)
        elif mode == "split":
            c.send(line)
            ready = c.reply()
            c.send(inject)
        elif mode == "bytewise":
            send_as(c, inject, "bytewise", line)
        elif mode == "after-hello":
            c.send(line)
            ready = c.reply()
            if ready == READY:
                c.begin_tls(w.client_ctx, server_side=False, hostname="mx.b.test")
                c.send_raw(inject)
                c.handshake_done()
        if mode != "after-hello":
            ready = ready or c.reply()
            if ready == READY:
                c.start_tls(w.client_ctx, server_side=False, hostname="mx.b.test")
        if c.secure:
            c.send(CLIENT_EHLO)
            c.reply()
            c.send(b"QUIT\r\n")
            c.reply()
    finally:
        c.finish()
    return c


TLS_RECORD = re.compile(rb"[\x15\x16]\x03[\x01-\x04]", re.S)


def judge_inbound_injection(c: Wire, legacy: list[Served], s: dict[str, Any]) -> list[str]:
    problems = []
    if len(legacy) != 1 or legacy[0].wire.plain_in != CLIENT_EHLO:
        problems.append(f"the legacy MTA received "
                        f"{[bytes(x.wire.plain_in)[len(CLIENT_EHLO):][:120] for x in legacy]}")
    rest = bytes(c.raw_in)[c.mark:]
    ok = SMTPGATE_421.fullmatch(rest) or (rest.startswith(READY) and (
        rest == READY or SMTPGATE_421.fullmatch(rest[len(READY):])
        or TLS_RECORD.match(rest[len(READY):])))
    if not ok:
        problems.append(f"the client was answered: {rest[:160]!r}")
    if c.tls_in:
        problems.append(f"the client got data over TLS: {bytes(c.tls_in)[:120]!r}")
    if s["outcome"] not in ("deferred", "client_reset") or s.get("tls") != "deferred":
        problems.append(f"the session says {s['outcome']} / {outcome_of(s)}")
    return problems


def inbound_injection_trial(w: World, inject: bytes, mode: str) -> tuple[list[str], str]:
    mark = w.mta.arm()
    c = inbound_client(w, inject, mode)
    s = w.log.next_session(f"{MTA_V4}:25")
    legacy = w.mta.settle(mark)
    return judge_inbound_injection(c, legacy, s), outcome_of(s)


# Pipelined plaintext before STARTTLS, inbound: steps of (bytes to send, replies to read).
PIPELINED: dict[str, list[tuple[bytes, int]]] = {
    "EHLO+STARTTLS": [(CLIENT_EHLO + b"STARTTLS\r\n", 2)],
    "EHLO+MAIL+STARTTLS": [(CLIENT_EHLO + b"MAIL FROM:<a@c.test>\r\nSTARTTLS\r\n", 3)],
    "NOOP+STARTTLS": [(CLIENT_EHLO, 1), (b"NOOP\r\nSTARTTLS\r\n", 2)],
    "RSET+STARTTLS+MAIL": [(CLIENT_EHLO, 1),
                           (b"RSET\r\nSTARTTLS\r\nMAIL FROM:<a@c.test>\r\n", 2)],
    "MAIL+RCPT, then STARTTLS": [(CLIENT_EHLO, 1),
                                 (b"MAIL FROM:<a@c.test>\r\nRCPT TO:<bob@b.test>\r\n", 2),
                                 (b"STARTTLS\r\n", 1)],
    "HELO, then STARTTLS": [(b"HELO client.c.test\r\n", 1), (b"STARTTLS\r\n", 1)],
    "two EHLOs+STARTTLS": [(CLIENT_EHLO + b"EHLO again.c.test\r\nSTARTTLS\r\n", 3)],
}


def transaction(c: Wire, greeting: bytes) -> None:
    """Over TLS: the greeting again, the envelope pipelined, the message."""
    c.send(greeting)
    c.reply()
    c.send(ENVELOPE)
    for _ in range(3):
        c.reply()
    c.send(MESSAGE)
    c.reply()


def pipelined_client(w: World, steps: list[tuple[bytes, int]], mode: str,
                     pause: float = 0.0) -> Wire:
    """``pause``: seconds to wait after each step's replies (lets a slow peer finish)."""
    c = Wire(w.lab.peer.connect(MTA_V4, 25))
    try:
        c.reply()
        last = None
        for data, n in steps:
            send_as(c, data, mode)
            for _ in range(n):
                last = c.reply()
            time.sleep(pause)
        if last == READY and c.start_tls(w.client_ctx, server_side=False):
            transaction(c, CLIENT_EHLO)
        c.send(b"QUIT\r\n")
        c.reply()
    finally:
        c.finish()
    return c


# A MAIL pipelined behind a STARTTLS that the plaintext phase still allowed (RSET first): the
# CVE-2011-0411 pattern, refused before any handshake or byte of it reaches the MTA.
REFUSED = {"RSET+STARTTLS+MAIL"}
# What the MTA may see before TLS: the plaintext phase's commands (gateway/offload.py).
PLAINTEXT_PHASE = {b"EHLO", b"HELO", b"NOOP", b"RSET", b"HELP", b"VRFY", b"EXPN"}


def judge_pipelined(c: Wire, legacy: list[Served], s: dict[str, Any],
                    refused: bool = False) -> list[str]:
    problems = []
    if len(legacy) != 1:
        return [f"{len(legacy)} connections to the legacy MTA"]
    m = legacy[0]
    if refused:
        got = bytes(m.wire.plain_in)
        if b"STARTTLS" in got or b"MAIL" in got:
            problems.append(f"refused, yet the MTA got {got[:200]!r}")
        if c.tls_in:
            problems.append(f"refused, yet the client got data over TLS: {bytes(c.tls_in)!r}")
        if s.get("tls") != "deferred":
            problems.append(f"the session says {outcome_of(s)}")
    elif c.secure:
        # Before TLS the MTA saw only the plaintext phase's commands; after it, exactly the
        # client's bytes but for its greeting over TLS, which the gateway answers with the
        # MTA's reply to the last EHLO before (gateway/offload.py: to the MTA it would be a
        # second greeting); and the client saw over TLS that, then exactly the MTA's replies
        # to the rest.
        greetings = [line for line in bytes(c.plain_out).splitlines(keepends=True)
                     if verb(line) in PLAINTEXT_PHASE]
        sent = bytes(m.wire.plain_in)
        tls_out, answered = bytes(c.tls_out), b""
        ehlos = [i for i, line in enumerate(greetings) if verb(line) == b"EHLO"]
        last_greeting = max((i for i, line in enumerate(greetings)
                             if verb(line) in (b"EHLO", b"HELO")), default=-1)
        first = tls_out.split(b"\r\n", 1)[0] + b"\r\n"
        if ehlos and ehlos[-1] == last_greeting and verb(first) in (b"EHLO", b"HELO"):
            caps = m.replies[1 + ehlos[-1]][1]
            answered = (caps if verb(first) == b"EHLO"
                        else b"250 " + caps.split(b"\r\n", 1)[0][4:] + b"\r\n")
            tls_out = tls_out[len(first):]
        if sent != b"".join(greetings) + tls_out:
            problems.append(f"the MTA got {sent[:300]!r}")
        if bytes(c.tls_in) != answered + b"".join(t for _, t in m.replies[1 + len(greetings):]):
            problems.append(f"over TLS the client got {bytes(c.tls_in)[:300]!r}")
        if s.get("tls") != "tls":
            problems.append(f"the session says {outcome_of(s)}")
    else:
        if READY in c.plain_in:
            problems.append("the gateway answered STARTTLS after plaintext went through")
        if bytes(m.wire.plain_in) != bytes(c.plain_out):
            problems.append("the MTA's bytes differ from the client's")
        if s.get("tls") != "plaintext":
            problems.append(f"the session says {outcome_of(s)}")
    return problems


def pipelined_trial(w: World, name: str, steps: list[tuple[bytes, int]], mode: str) -> tuple[
        list[str], str]:
    mark = w.mta.arm()
    c = pipelined_client(w, steps, mode)
    s = w.log.next_session(f"{MTA_V4}:25")
    return judge_pipelined(c, w.mta.settle(mark), s, name in REFUSED), outcome_of(s)


def unasked_trial(w: World, mode: str) -> tuple[list[str], str]:
    """The legacy MTA sends a reply nobody asked for right behind its EHLO reply (as
    ``mode``); the client goes on with STARTTLS.  That reply must never be given to the
    client over TLS (as the answer to its first command there)."""
    stale = b"250 2.0.0 stale reply from before STARTTLS\r\n"
    mark = w.mta.arm(Script(name=b"legacy.b.test", caps=(b"PIPELINING", b"8BITMIME"),
                            after_ehlo=stale, early_mode=mode))
    # The client says STARTTLS once the MTA has sent it all: bytes the MTA sends only after
    # the gateway passed the client's EHLO over TLS on to it cannot be told from its answer
    # (the stream has no other clock), so "before STARTTLS" must mean before.
    c = pipelined_client(w, [(CLIENT_EHLO, 1), (b"STARTTLS\r\n", 1)], mode,
                         pause=len(stale) * BYTE_GAP + 0.2 if mode == "bytewise" else 0.0)
    s = w.log.next_session(f"{MTA_V4}:25")
    [m] = w.mta.settle(mark)
    problems = []
    if stale in c.tls_in:
        problems.append("the MTA's reply from before STARTTLS was given over TLS")
    refused = c.tls_in == b"" or SMTPGATE_421.fullmatch(bytes(c.tls_in))
    if refused and m.wire.plain_in != CLIENT_EHLO:
        problems.append(f"refused, yet the MTA got {bytes(m.wire.plain_in)!r}")
    if refused and (s["outcome"], s.get("tls")) != ("deferred", "deferred"):
        problems.append(f"refused, yet the session says {s['outcome']} / {outcome_of(s)}")
    if not refused:
        problems += judge_pipelined(c, [m], s)
    return problems, outcome_of(s)


def e2e_trial(w: World, commands: bytes, response: bytes, mode: str) -> tuple[list[str], str]:
    """An MTA listed in ``verifying_mtas`` does STARTTLS itself (pipelining ``commands``
    behind it, as ``mode``); the peer answers 220 (with ``response`` behind it, as
    ``mode``).  The gateway must step aside: every byte copied unchanged both ways, nothing
    of its own."""
    server = w.peers[PEER_V4]
    mark = server.arm(Script(context=w.peer_ctx, inject=response, mode=mode))
    c = Wire(w.lab.mta.connect(PEER_V4, 25, source=VERIFYING_MTA))
    try:
        c.reply()
        c.send(EHLO_LINE)
        c.reply()
        send_as(c, commands, mode, b"STARTTLS\r\n")
        if c.reply() == READY and c.start_tls(w.client_ctx, server_side=False):
            transaction(c, EHLO_LINE)
            c.send(b"QUIT\r\n")
            c.reply()
    finally:
        c.finish()
    s = w.log.next_session(f"{PEER_V4}:25")
    [p] = server.settle(mark)
    problems = []
    if bytes(p.wire.raw_in) != bytes(c.raw_out):
        problems.append("the peer did not get the MTA's bytes unchanged")
    if bytes(c.raw_in) != bytes(p.wire.raw_out):
        problems.append("the MTA did not get the peer's bytes unchanged")
    if s.get("tls") != "end_to_end" or s["outcome"] == "deferred":
        problems.append(f"the session says {s['outcome']} / {outcome_of(s)}")
    if not commands and not response and not (c.secure and p.contents == [MESSAGE]):
        problems.append("the end-to-end control did not deliver over TLS")
    return problems, outcome_of(s)


def takeover_trial(w: World, commands: bytes, mode: str) -> tuple[list[str], str]:
    """Any other MTA's own STARTTLS toward this ``encrypt`` peer is taken over: commands it
    pipelines behind STARTTLS (as ``mode``) are never sent anywhere, the MTA gets a 421."""
    server = w.peers[PEER_V4]
    mark = server.arm(Script(context=w.peer_ctx))
    c = Wire(w.lab.mta.connect(PEER_V4, 25))
    reply = b""
    try:
        c.reply()
        c.send(EHLO_LINE)
        c.reply()
        send_as(c, commands, mode, b"STARTTLS\r\n")
        reply = c.reply() or b""
    finally:
        c.finish()
    s = w.log.next_session(f"{PEER_V4}:25")
    served = server.settle(mark)
    problems = []
    if not SMTPGATE_421.fullmatch(reply) or b"4.7.0" not in reply:
        problems.append(f"the MTA got {reply!r}, not a 421 4.7.0")
    if any(commands.strip() and commands in bytes(p.wire.raw_in) for p in served):
        problems.append("the commands behind STARTTLS reached the peer")
    if (s["outcome"], s.get("tls")) != ("deferred", "deferred"):
        problems.append(f"the session says {s['outcome']} / {outcome_of(s)}")
    return problems, outcome_of(s)


def test_starttls_injection_is_never_acted_on(world: World) -> None:
    started = time.monotonic()
    tally = Tally()
    w = world

    # 1. Outbound response injection after the peer's 220 to STARTTLS.
    for policy in ("encrypt", "fingerprint", "may"):
        for mode in AFTER_220_MODES:
            for name, data in AFTER_220.items():
                script = Script(context=w.peer_ctx, inject=data, mode=mode)
                problems, outcome = outbound_trial(w, policy, script)
                tally.record("outbound-after-220", f"{policy}/{mode}/{name}", problems, outcome)

    # 2. Responses pushed before the gateway says STARTTLS.
    for policy in ("encrypt", "fingerprint"):
        for mode in ("segment", "split", "bytewise"):
            for name, (where, data) in EARLY.items():
                script = Script(context=w.peer_ctx, early_mode=mode,
                                after_banner=data if where == "banner" else b"",
                                after_ehlo=data if where == "ehlo" else b"")
                problems, outcome = outbound_trial(w, policy, script)
                tally.record("outbound-early", f"{policy}/{mode}/{name}", problems, outcome)

    # 3. The command direction: held commands never follow STARTTLS in plaintext (these
    #    sessions are delivered: they are also the harness's control).
    delivered = 0
    for policy in ("encrypt", "fingerprint", "may"):
        for mode in ("segment", "split", "bytewise"):
            problems, outcome = outbound_trial(w, policy, Script(context=w.peer_ctx), mode,
                                               injected=False)
            delivered += outcome.startswith(("tls", "fingerprint"))
            tally.record("outbound-held-commands", f"{policy}/{mode}", problems, outcome)
    assert delivered == 9, tally.acted

    # 4. End to end: a verifying MTA's own STARTTLS; the gateway steps aside.
    for mode in ("segment", "split", "bytewise"):
        for cname, commands in E2E_COMMANDS.items():
            for rname, response in E2E_RESPONSES.items():
                problems, outcome = e2e_trial(w, commands, response, mode)
                tally.record("end-to-end", f"{mode}/{cname}/{rname}", problems, outcome)

    # 4b. Any other MTA's own STARTTLS toward a peer that requires TLS is taken over:
    #     commands behind it are an injection (A4).
    for mode in ("segment", "split"):
        for cname, commands in E2E_COMMANDS.items():
            if commands:
                problems, outcome = takeover_trial(w, commands, mode)
                tally.record("take-over", f"{mode}/{cname}", problems, outcome)

    # 5. Inbound command injection behind the client's STARTTLS.
    for mode in INBOUND_MODES:
        for name, data in BEHIND_STARTTLS.items():
            problems, outcome = inbound_injection_trial(w, data, mode)
            tally.record("inbound-behind-starttls", f"{mode}/{name}", problems, outcome)

    # 6. Inbound pipelined plaintext before STARTTLS.
    for mode in ("segment", "bytewise"):
        for name, steps in PIPELINED.items():
            problems, outcome = pipelined_trial(w, name, steps, mode)
            tally.record("inbound-pipelined", f"{mode}/{name}", problems, outcome)

    # 7. The legacy MTA says something unasked before STARTTLS (response direction).
    for mode in ("segment", "split", "bytewise"):
        problems, outcome = unasked_trial(w, mode)
        tally.record("inbound-mta-unasked", mode, problems, outcome)

    took = time.monotonic() - started
    groups = ", ".join(f"{g} {n}" for g, n in tally.trials.items())
    print(f"\n{tally.figure} ({groups}; {took:.1f} s)")
    print("  outcomes: " + ", ".join(f"{k} x{v}" for k, v in tally.outcomes.most_common()))
    for line in tally.acted[:60]:
        print("  ACTED ON: " + line)
    assert not tally.acted, f"{tally.figure}:\n" + "\n".join(tally.acted[:20])


def test_regression_a_reply_pushed_before_starttls_never_reaches_the_mta(world: World) -> None:
    """Found by the early vectors: a peer's reply nobody asked for, pushed behind its EHLO
    reply, was passed to the MTA, which took it for the reply to MAIL, sent over TLS later:
    with a whole fake transaction behind it the MTA took the real reply to MAIL for the one
    to its message (a 2xx the peer never gave it).  Now only a 421 may come unasked; anything
    else defers the session before the upgrade."""
    fake = b"250 2.1.0 inj\r\n250 2.1.5 inj\r\n354 inj\r\n250 2.0.0 inj queued\r\n"
    server = world.peers[PEER_V4]
    mark = server.arm(Script(context=world.peer_ctx, after_ehlo=fake))
    mta = mta_session(world, PEER_V4)
    s = world.log.next_session(f"{PEER_V4}:25")
    conns = server.settle(mark)
    assert bytes(mta.plain_in).endswith(
        b"421 4.7.0 smtpgate: peer protocol error: unsolicited reply 250\r\n"), mta.plain_in
    assert b"inj" not in mta.plain_in
    assert not envelope_seen(conns)
    assert (s["outcome"], s["tls"], s["tls_reason"]) == (
        "deferred", "deferred", "peer protocol error: unsolicited reply 250")


def test_regression_the_mtas_unasked_reply_is_never_given_over_tls(world: World) -> None:
    """Found by the reply-direction vector, inbound: a reply the legacy MTA sent unasked
    before STARTTLS was kept and given to the client over TLS as the reply to its EHLO there
    (every later reply one behind).  Now the session ends with a 421 instead."""
    problems, outcome = unasked_trial(world, "segment")
    assert not problems
    assert outcome == "deferred: MTA sent a reply nobody asked for", outcome


def test_a_peer_breaking_framing_after_the_upgrade_ends_the_session_with_resets(
        world: World) -> None:
    """After the TLS phase the envelope tracker reads the peer's replies; one that breaks
    the framing (a reply line over 4096 bytes) has no reply of the gateway's own to answer
    it (A1): the session ends with resets both ways and the reason is logged.  (It used to
    escape the transport callback and end the session by accident.)"""
    server = world.peers[PEER_V4]
    mark = server.arm(Script(context=world.peer_ctx,
                             mail_reply=b"250 " + b"x" * 5000 + b"\r\n"))
    mta = mta_session(world, PEER_V4)
    s = world.log.next_session(f"{PEER_V4}:25")
    [conn] = server.settle(mark)
    assert conn.wire.secure  # the hop was upgraded: the tracker read the long line
    assert b"x" * 100 not in mta.plain_in  # the MTA never got it as a reply
    assert (s["outcome"], s["tls"]) == ("aborted", "tls"), s
    assert s["reason"] == "peer protocol error: reply line too long", s

"""No downgrade (A3), issue #10 item 2: thousands of randomized adversarial sessions against a
destination that publishes a secure usable TLSA, through the real ``smtpgate run``.

    mta:  an in-process MTA client, one message per session (EHLO s<N>.mta.a.test, MAIL,
          RCPT bob@b.test, DATA with a per-session marker), pipelined or not at random
    gw:   smtpgate (REDIRECT, policy dane), Unbound on 127.0.0.1 validating the lab's
          DNSSEC, and an on-path DNS attacker between Unbound and the authoritative server
    peer: NSD (signed zones: 2 PTR mx.b.test, mx.b A 203.0.113.2, TLSA 3 1 1 of the peer's
          key, b.test MX mx.b) and an in-process adversarial SMTP peer on 203.0.113.2:25

Each session picks (seeded; the seed is printed, ``SMTPGATE_SEED`` repeats a run) what the
peer does to it: honest, STARTTLS stripped from the EHLO reply, STARTTLS answered 454 or
502, another key than the TLSA's, plaintext lines injected behind the 220 (in its segment
or a moment later), a TCP reset in the middle of the handshake, or right after it.  Sessions
run in batches, and each batch has one DNS mode: honest, or an attacker on the path between
the validating resolver and the authority who forges the TLSA (the attacker's own key),
forges "no TLSA" (NXDOMAIN without a denial of existence), answers SERVFAIL or nothing for
the TLSA, forges the host's address or its PTR, or strips every signature.  Unbound
validates, so the forgeries arrive at the gateway as bogus or failed (SERVFAIL, the CD
re-query, timeouts), which is what a real attacker gets; an AD bit forged or removed on
that path means nothing (Unbound sets its own).  A forged answer *from* the trusted resolver
is out of scope (docs/threat-model.md), and so is an untrusted one, whose AD bit the gateway
never believes (tests/test_discovery_netns.py).  Both caches are emptied between
batches: Unbound's by unbound-control, the gateway's by short ``dns.cache`` TTLs.

The peer is the witness: it records every MAIL, RCPT and message content it receives, and
over what: plaintext, TLS with the key of the TLSA, or TLS with another key.  Required: no
recipient and no content in plaintext or under another key, ever; for every DNS mode that
leaves the PTR alone not even a MAIL; every honest session delivered over TLS to the right
key; every session the peer attacked, under honest DNS, ends without the MTA seeing its
message accepted (a 4xx, or a closed connection, which an MTA treats the same).

Counts: the default (CI) runs 600 sessions in 25 batches (about 45 s here);
``SMTPGATE_TRIALS=full`` runs 4,000 in 61 batches (about 100 s), a number runs that many::

    SMTPGATE_TRIALS=full .venv/bin/pytest -q -s -p no:cacheprovider \\
        tests/test_downgrade_netns.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import uvloop

from gatelab import certs, dnslab, netlab
from gatelab.adversary import (
    HOST,
    AdversarialPeer,
    Channel,
    DnsMode,
    PeerAttack,
    Trial,
    mta_session,
    trials,
)
from gatelab.dnslab import DNS_V4, DNS_V6, DnsWorld
from gatelab.gatewayproc import OUTBOUND_LISTENERS, GatewayProcess, gateway_config
from gatelab.netlab import MTA_V4, PEER_V4, Lab
from gateway.dane import tlsa_record

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)


def seed() -> int:
    value = os.environ.get("SMTPGATE_SEED", "")
    return int(value) if value.isdigit() else random.SystemRandom().randrange(1 << 32)


SESSIONS = trials(600, 4000)
FULL = SESSIONS >= 2000
CONCURRENCY = 24
# Sessions per batch: honest DNS (where the peer's attacks decide) and DNS attack batches.
HONEST_BATCH, ATTACK_BATCH = (100, 30) if FULL else (36, 12)

# -- DNS: an attacker on the path between the validating resolver and the authority --------

# Modes that break the PTR step: the plan can only be opportunistic (a PTR is no evidence
# of DANE), and the recipient-bound check (the recipient domain's own MX) is the defence.
PTR_MODES = {DnsMode.PTR_FORGED, DnsMode.STRIP_RRSIG}
# Modes whose lookups end in a timeout: the gateway's last query may outlive its session.
SLOW_MODES = {DnsMode.TLSA_DROP, DnsMode.TLSA_SERVFAIL}
EXPECTED_PLAN = {mode: "try-tls" if mode in PTR_MODES else "defer" for mode in DnsMode}
EXPECTED_PLAN[DnsMode.HONEST] = "require-tls"

TLSA_NAME = dns.name.from_text(f"_25._tcp.{HOST}.")
HOST_NAME = dns.name.from_text(f"{HOST}.")
PTR_NAME = dns.name.from_text(dnslab.ptr_name(PEER_V4))
ATTACK_PORT = 5300


def _replace(section: list[dns.rrset.RRset], name: dns.name.Name, rdtype: str,
             rdata: str) -> bool:
    for i, rrset in enumerate(section):
        if rrset.name == name and rrset.rdtype == dns.rdatatype.from_text(rdtype):
            section[i] = dns.rrset.from_text(name, rrset.ttl, "IN", rdtype, rdata)
            return True
    return False


def forge(mode: DnsMode, query: dns.message.Message,
          upstream: Callable[[], dns.message.Message | None],
          attacker_tlsa: str) -> tuple[dns.message.Message | None, bool]:
    """The attacker's answer to one of Unbound's queries: (response or None to drop it,
    whether it differs from the authority's)."""
    q = query.question[0]
    tlsa = q.name == TLSA_NAME and q.rdtype == dns.rdatatype.TLSA
    if mode is DnsMode.TLSA_DROP and tlsa:
        return None, True
    if mode in (DnsMode.TLSA_SERVFAIL, DnsMode.TLSA_NXDOMAIN) and tlsa:
        r = dns.message.make_response(query)
        r.flags |= dns.flags.AA
        if mode is DnsMode.TLSA_SERVFAIL:
            r.set_rcode(dns.rcode.SERVFAIL)
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
            r.authority.append(dns.rrset.from_text(
                "test.", 60, "IN", "SOA", "ns1.test. hostmaster.test. 1 60 60 600 60"))
        return r, True
    response = upstream()
    if response is None:
        return None, False
    changed = False
    if mode is DnsMode.TLSA_FORGED and tlsa:
        changed = _replace(response.answer, TLSA_NAME, "TLSA", attacker_tlsa)
    elif mode is DnsMode.A_FORGED and q.name == HOST_NAME and q.rdtype == dns.rdatatype.A:
        changed = _replace(response.answer, HOST_NAME, "A", "203.0.113.66")
    elif mode is DnsMode.PTR_FORGED and q.name == PTR_NAME:
        changed = _replace(response.answer, PTR_NAME, "PTR", "mx.evil.test.")
    elif mode is DnsMode.STRIP_RRSIG:
        for section in (response.answer, response.authority):
            kept = [r for r in section if r.rdtype != dns.rdatatype.RRSIG]
            changed |= len(kept) != len(section)
            section[:] = kept
    return response, changed


class DnsAttacker:
    """Unbound (in gw) asks the lab's authority at DNS_V4/DNS_V6: iptables REDIRECT in gw's
    OUTPUT chain brings those queries (UDP and TCP) here instead; each is answered by asking
    NSD from the peer namespace (where its address is local, so no redirect applies) and
    then, depending on ``mode``, forwarding the answer or forging one."""

    def __init__(self, lab: Lab, attacker_tlsa: str) -> None:
        self.lab = lab
        self.attacker_tlsa = attacker_tlsa
        self.mode = DnsMode.HONEST
        self.queries = 0
        self.forged: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        gw = self.lab.gw
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            udp = gw.socket(family, socket.SOCK_DGRAM)
            udp.bind((host, ATTACK_PORT))
            self._socks += [udp, gw.listen(host, ATTACK_PORT)]
        for sock in self._socks:
            sock.settimeout(0.2)
            serve = self._serve_udp if sock.type == socket.SOCK_DGRAM else self._serve_tcp
            self._spawn(serve, sock)
        for v6, server in ((False, DNS_V4), (True, DNS_V6)):
            for proto in ("udp", "tcp"):
                gw.iptables(["-t", "nat", "-A", "OUTPUT", "-d", server, "-p", proto,
                             "--dport", "53", "-j", "REDIRECT", "--to-ports",
                             str(ATTACK_PORT)], v6=v6)

    def stop(self) -> None:
        self._stop.set()
        for sock in self._socks:
            sock.close()
        for t in self._threads:
            t.join(5)

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name="dns attacker")
        self._threads = [x for x in self._threads if x.is_alive()]
        self._threads.append(t)
        t.start()

    def _serve_udp(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data, addr = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._answer_udp, sock, data, addr)

    def _answer_udp(self, sock: socket.socket, data: bytes, addr: Any) -> None:
        wire = self._answer(data, tcp=False)
        if wire is not None:
            with contextlib.suppress(OSError):
                sock.sendto(wire, addr)

    def _serve_tcp(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._answer_tcp, conn)

    def _answer_tcp(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                while (head := _recv_exactly(conn, 2)) is not None:
                    query = _recv_exactly(conn, struct.unpack("!H", head)[0])
                    if query is None:
                        return
                    wire = self._answer(query, tcp=True)
                    if wire is None:
                        return  # dropped: close without an answer
                    conn.sendall(struct.pack("!H", len(wire)) + wire)

    def _answer(self, data: bytes, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        self.queries += 1
        mode = self.mode
        if not query.question:
            return self._ask(data, tcp)
        raw: list[bytes | None] = []

        def upstream() -> dns.message.Message | None:
            raw.append(self._ask(data, tcp))
            return dns.message.from_wire(raw[0]) if raw[0] is not None else None

        try:
            response, changed = forge(mode, query, upstream, self.attacker_tlsa)
        except Exception as exc:  # a bug here must fail the test, not hang Unbound
            self.errors.append(exc)
            return None
        if changed:
            self.forged[mode] += 1
            return response.to_wire() if response is not None else None
        return raw[0] if raw else None

    def _ask(self, data: bytes, tcp: bool) -> bytes | None:
        """The authority's answer, asked from the peer namespace."""
        try:
            if tcp:
                conn = self.lab.peer.connect(DNS_V4, 53, timeout=2)
                with conn:
                    conn.settimeout(2)
                    conn.sendall(struct.pack("!H", len(data)) + data)
                    head = _recv_exactly(conn, 2)
                    return _recv_exactly(conn, struct.unpack("!H", head)[0]) if head else None
            udp = self.lab.peer.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with udp:
                udp.settimeout(2)
                udp.sendto(data, (DNS_V4, 53))
                return udp.recv(65535)
        except OSError:
            return None


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


# -- the adversarial peer --------------------------------------------------------------------

# -- the campaign ----------------------------------------------------------------------------

@dataclass
class Batch:
    dns: DnsMode
    trials: list[Trial]


def schedule(rng: random.Random, total: int) -> list[Batch]:
    """Honest-DNS batches alternate with DNS attack batches; the attack modes are cycled in
    a shuffled order, so a run of at least len(DnsMode) - 1 pairs has every one of them."""
    attacks = [m for m in DnsMode if m is not DnsMode.HONEST]
    peer = list(PeerAttack)
    order: list[DnsMode] = []
    batches: list[Batch] = []
    sid = 0
    while sid < total:
        if len(batches) % 2 == 0:
            mode = DnsMode.HONEST
        else:
            if not order:
                order = rng.sample(attacks, len(attacks))
            mode = order.pop()
        size = min(HONEST_BATCH if mode is DnsMode.HONEST else ATTACK_BATCH, total - sid)
        batch = Batch(mode, [])
        for _ in range(size):
            attack = PeerAttack.HONEST if rng.random() < 0.25 else rng.choice(peer[1:])
            batch.trials.append(Trial(sid, mode, attack, rng.random() < 0.5))
            sid += 1
        batches.append(batch)
    return batches


def switch_dns(world: DnsWorld, attacker: DnsAttacker, mode: DnsMode, previous: DnsMode) -> None:
    """Sets the attacker's mode and empties both caches, so the batch meets it from the
    first lookup: Unbound's at once (answers, keys, bogus and negative entries, the servers'
    state, queries still pending), the gateway's by waiting out its TTLs."""
    attacker.mode = mode
    world.flush()
    world.unbound_control("flush_infra", "all")
    world.unbound_control("flush_requestlist")
    # dns.cache TTLs are 0.5 s; a query still running from a slow mode may take 2 x 1 s
    # (dns.timeout, then the CD re-query) before it is cached.
    time.sleep(2.7 if previous in SLOW_MODES else 0.7)


async def gated(gate: asyncio.Semaphore, trial: Trial) -> None:
    async with gate:
        await mta_session(trial)


def campaign(world: DnsWorld, attacker: DnsAttacker, peer: AdversarialPeer,
             listen: socket.socket, batches: list[Batch]) -> float:
    """Runs on a thread in the mta namespace: every client socket is made there."""

    async def main() -> float:
        server = await asyncio.start_server(peer.serve, sock=listen,  # noqa: TID251
                                            limit=1 << 20)
        started = time.monotonic()
        previous = DnsMode.HONEST
        try:
            for batch in batches:
                await asyncio.to_thread(switch_dns, world, attacker, batch.dns, previous)
                previous = batch.dns
                gate = asyncio.Semaphore(CONCURRENCY)
                await asyncio.gather(*(gated(gate, t) for t in batch.trials))
        finally:
            server.close()
        return time.monotonic() - started

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def join_gateway_lines(gw: GatewayProcess, all_trials: list[Trial]) -> None:
    """Each trial's session line, by the MTA's source port (in order, should a port come
    back in a later session)."""
    by_port: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in gw.sessions():
        by_port[s["client"]].append(s)
    for t in all_trials:  # sid order is start order within a port's reuse
        lines = by_port.get(f"{MTA_V4}:{t.port}")
        if lines:
            t.gateway = lines.pop(0)


def table(title: str, rows: dict[str, Counter[str]]) -> str:
    columns = sorted({c for row in rows.values() for c in row})
    width = max([len(title), *map(len, rows)])
    out = [f"  {title:<{width}}  " + "  ".join(f"{c:>9}" for c in columns) + "     total"]
    for name, row in rows.items():
        out.append(f"  {name:<{width}}  " + "  ".join(f"{row.get(c, 0):>9}" for c in columns)
                   + f"  {sum(row.values()):>8}")
    return "\n".join(out)


# -- the lab ---------------------------------------------------------------------------------

def downgrade_config() -> str:
    """Short cache TTLs, so that each batch meets its DNS mode; a query timeout and budget
    generous enough that a busy machine does not turn an honest lookup into doubt (which
    the gateway rightly answers with a 4xx)."""
    return gateway_config(
        listeners=OUTBOUND_LISTENERS[:1], max_sessions=500, connect=10, log_level="info",
        resolvers=["127.0.0.1:53"], dns_timeout=1, budget=3,
        cache="min_ttl: 0, max_ttl: 0.5, negative_max_ttl: 0.5, failure_ttl: 0.5", policy="dane")


@dataclass
class World:
    lab: Lab
    dns: DnsWorld
    gw: GatewayProcess
    attacker: DnsAttacker
    peer: AdversarialPeer
    listen: socket.socket


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    good_leaf = certs.make_leaf(None, [HOST])
    wrong_leaf = certs.make_leaf(None, [HOST])  # same name, another key
    attacker_tlsa = str(tlsa_record(wrong_leaf.der))
    peer = AdversarialPeer(certs.server_context(tmp_path / "good", good_leaf),
                           certs.server_context(tmp_path / "wrong", wrong_leaf))
    with Lab() as lab, DnsWorld.on_lab(lab, tmp_path / "dns") as dns_world:
        dnslab.dane_destination(dns_world, good_leaf.der)
        dns_world.start()
        lab.redirect_port25(10025)
        attacker = DnsAttacker(lab, attacker_tlsa)
        attacker.start()
        listen = lab.peer.listen(PEER_V4, 25, backlog=1024)
        try:
            with GatewayProcess(lab.gw, tmp_path / "gw", downgrade_config()) as gw:
                yield World(lab, dns_world, gw, attacker, peer, listen)
        finally:
            listen.close()
            attacker.stop()


@pytest.mark.timeout(600 + SESSIONS // 4)
def test_no_downgrade_under_randomized_attacks(world: World) -> None:
    run_seed = seed()
    rng = random.Random(run_seed)
    batches = schedule(rng, SESSIONS)
    all_trials = [t for b in batches for t in b.trials]
    world.peer.attacks = {t.sid: t.attack for t in all_trials}
    elapsed = world.lab.mta.call(lambda: campaign(world.dns, world.attacker, world.peer,
                                                  world.listen, batches))
    world.gw.wait_sessions(len(all_trials), timeout=60)
    join_gateway_lines(world.gw, all_trials)
    rec = world.peer.record

    by_attack: dict[str, Counter[str]] = defaultdict(Counter)
    by_dns: dict[str, Counter[str]] = defaultdict(Counter)
    plans: dict[str, Counter[str]] = defaultdict(Counter)
    for t in all_trials:
        by_attack[t.attack if t.dns is DnsMode.HONEST else f"dns {t.dns}"][t.outcome] += 1
        by_dns[t.dns][t.outcome] += 1
        plans[t.dns][t.gateway.get("plan", "-")] += 1
    deliveries: dict[str, Counter[str]] = {
        ch: Counter({what: rec.counts[what, ch] for what in ("MAIL", "RCPT", "content",
                                                            "foreign content",
                                                            "partial content", "accepted")})
        for ch in Channel}
    report = "\n".join([
        f"downgrade: seed {run_seed} (SMTPGATE_SEED), {len(all_trials)} sessions in "
        f"{len(batches)} batches, {elapsed:.1f} s ({len(all_trials) / elapsed:.0f}/s), "
        f"{CONCURRENCY} concurrent",
        "MTA outcome by peer attack (honest DNS) and by DNS attack:",
        table("attack", dict(sorted(by_attack.items()))),
        "gateway plan by DNS mode:",
        table("dns mode", dict(sorted(plans.items()))),
        "what reached the peer, by channel:",
        table("channel", {str(k): v for k, v in deliveries.items()}),
        f"peer TLS: {dict(sorted(world.peer.record.handshakes.items()))}",
        "envelope sender only (MAIL, never a recipient or content), all in DNS modes that "
        f"break the PTR: plaintext {rec.counts['MAIL', Channel.PLAINTEXT]}, another key "
        f"{rec.counts['MAIL', Channel.WRONG]}",
        f"DNS attacker: {world.attacker.queries} queries from Unbound, forged or dropped: "
        f"{ {str(k): v for k, v in sorted(world.attacker.forged.items())} }",
    ])
    print("\n" + report)
    assert not world.peer.errors and not world.attacker.errors, (
        world.peer.errors, world.attacker.errors, report)

    # A3: nothing of a recipient or a message in plaintext or under another key, ever.
    for ch in (Channel.PLAINTEXT, Channel.WRONG):
        for what in ("RCPT", "content", "foreign content", "partial content", "accepted"):
            assert rec.counts[what, ch] == 0, f"{what} over {ch}\n{report}"
    # Where the PTR is left alone the plan knows the TLSA: not even the MAIL crosses.
    for t in all_trials:
        if t.dns not in PTR_MODES:
            leaked = [e for e in rec.events.get(t.sid, []) if e[1] is not Channel.MATCHING]
            assert not leaked, f"session {t.sid} ({t.dns}, {t.attack}): {leaked}\n{report}"
    # Every delivery the MTA saw is one the peer accepted over TLS with the TLSA's key (A1).
    for t in all_trials:
        accepted = [ch for what, ch in rec.events.get(t.sid, []) if what == "accepted"]
        if t.outcome == "delivered":
            assert accepted == [Channel.MATCHING], (t, accepted, report)
        else:
            assert not accepted, (t, accepted, report)
    # Every honest session delivered; every attacked one under honest DNS, and every one
    # whose DNS was attacked beyond the PTR, ends in a 4xx or a closed connection.
    failed = [t for t in all_trials if t.honest and t.outcome != "delivered"]
    assert not failed, f"{len(failed)} honest sessions not delivered: {failed[:5]}\n{report}"
    for t in all_trials:
        if t.honest or (t.dns in PTR_MODES and t.outcome == "delivered"):
            continue
        assert t.outcome == "closed" or t.outcome.startswith("4"), (t, report)
    # The handshake attacks took effect: under honest DNS every wrong-key and reset trial
    # got as far as the handshake (else they would pass whatever the gateway does).
    for t in all_trials:
        if t.dns is DnsMode.HONEST and t.attack in (
                PeerAttack.WRONG_KEY, PeerAttack.RESET_HANDSHAKE, PeerAttack.RESET_AFTER_TLS):
            assert t.sid in rec.reached_tls, (t, report)
    # The attacks took effect: each DNS mode gave the plan it must give.
    for mode, seen in plans.items():
        assert set(seen) == {EXPECTED_PLAN[DnsMode(mode)]}, (mode, seen, report)
    assert set(world.attacker.forged) == {b.dns for b in batches} - {DnsMode.HONEST}, report
    if len(all_trials) >= 100:
        assert {t.attack for t in all_trials} == set(PeerAttack), report

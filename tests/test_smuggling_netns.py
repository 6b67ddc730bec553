"""SMTP smuggling against the real gateway process (issue #10, item 4): the known
end-of-data variants cross the gateway byte for byte, and the gateway takes no action inside
message content.  The figure (variants, byte-equal) is printed by
``test_end_of_data_variants_cross_byte_exact`` (``pytest -s``) and is part of its assertion
message.

    mta: the sender (in-process)  --  gw: smtpgate :10025  --  peer: fake receivers
                                                              203.0.113.2 TLS     (dane)
                                                              203.0.113.3 no TLS  (dane)
                                                              203.0.113.4 no TLS  (none)

Three gateway modes: an upgraded session (policy ``dane``, no TLSA: the gateway does
STARTTLS and its envelope tracker frames DATA to CRLF.CRLF and BDAT by count, looking up
each RCPT's domain as DANE per recipient wants), the same tracker on a plaintext session
(the peer offers no STARTTLS), and pure passthrough (``none``).
Each session sends one variant in a first transaction and a plain second one, then QUIT.

Per session, what the receiver actually got decides:

- its bytes from the first command to QUIT equal the sender's exactly (after TLS, its whole
  stream equals the sender's, the gateway's re-greeting being the sender's own EHLO line);
- the message contents it framed (DATA to the first CRLF.CRLF, BDAT by count) are exactly
  the sender's, variant and second message;
- the sender got exactly the receiver's replies: no reply of the gateway's own (no 450, no
  421), none lost, none added;
- the fake resolver saw no lookup for ``tripwire.test`` (the smuggled RCPTs' domain: had the
  gateway read one as a command it would have looked it up, and its SERVFAIL would have made
  a 450), and, where the tracker runs, a lookup for both real recipients (it read the second
  transaction's RCPT: its framing stayed in step with the receiver's).

DATA variants: bare LF ``\\n.\\n``, bare CR ``\\r.\\r``, ``\\r\\n.\\r``, ``\\r\\n.\\n``,
``\\n.\\r\\n``, ``\\r.\\r\\n``, ``\\r\\n.\\r\\r\\n``, NULs around the dot, a dot-stuffed line, a
space before the dot, bare CR/LF mixtures, a fake end at the very start, an empty message,
commands (RCPT, QUIT, BDAT) inside the content, all 256 byte values, 1 MB without CRLF, a
fake end right at a 64 KB boundary; each in one segment and (the short ones) byte by byte.
BDAT variants: a LAST chunk holding CRLF.CRLF and commands, CRLF.CRLF in a non-last chunk,
an end-of-data cut across two chunks, ``BDAT 0 LAST``, a chunk holding a BDAT command, 1 MB
of binary, NULs, twenty small chunks; all pipelined behind MAIL/RCPT in one segment, and the
short ones byte by byte.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gatelab import certs, netlab
from gatelab.fakedns import FakeDns, knows_nothing
from gatelab.fakesmtp import (
    EHLO_LINE,
    END_OF_DATA,
    FakeServer,
    Script,
    Served,
    Wire,
    positive,
    send_as,
)
from gatelab.gatewayproc import OUTBOUND_LISTENERS, GatewayProcess, LogFollower, gateway_config
from gatelab.netlab import PEER_V4, PEER_V4_ALT, Lab

pytestmark = pytest.mark.netns

if (_why := netlab.netns_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

NONE_PEER = "203.0.113.4"
MODES = {"tls": PEER_V4, "plaintext": PEER_V4_ALT, "passthrough": NONE_PEER}
CAPS = (b"PIPELINING", b"8BITMIME", b"CHUNKING", b"BINARYMIME")
SECOND = b"Subject: second\r\n\r\nthe framing is still in step\r\n.\r\n"
SMALL = 400  # variants up to this size are also sent byte by byte
# While the gateway upgrades, it holds what the MTA sends, up to 64 KB (gateway.smtp.LIMITS.held,
# then 421 4.3.0): an MTA that pipelines more BDAT than that before the first reply is
# deferred, not relayed.  Larger BDAT variants wait for the MAIL/RCPT replies.
BDAT_HELD = 32 * 1024


def smuggle(eol: bytes, end: bool = False) -> bytes:
    """Commands a lenient receiver would take for a second transaction (its own end of
    data only where ``end``: with CRLF line ends that would be a real end)."""
    lines = [b"MAIL FROM:<x@tripwire.test>", b"RCPT TO:<y@tripwire.test>", b"DATA",
             b"Subject: smuggled", b"", b"smuggled"]
    return eol.join([*lines, *([b".", b"QUIT"] if end else []), b""])


def pseudo_random(n: int, seed: bytes) -> bytes:
    out = bytearray()
    block = seed
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


HEAD = b"Subject: variant\r\n\r\nbefore"
ONE_MB = 1024 * 1024

# Content up to the real end of data (the DATA line's CRLF counts as the first CRLF).
DATA_VARIANTS: dict[str, bytes] = {
    "LF.LF": HEAD + b"\n.\n" + smuggle(b"\n", end=True) + b"after" + END_OF_DATA,
    "CR.CR": HEAD + b"\r.\r" + smuggle(b"\r", end=True) + b"after" + END_OF_DATA,
    "CRLF.CR": HEAD + b"\r\n.\r" + smuggle(b"\r\n") + b"after" + END_OF_DATA,
    "CRLF.LF": HEAD + b"\r\n.\n" + smuggle(b"\r\n") + b"after" + END_OF_DATA,
    "LF.CRLF": HEAD + b"\n.\r\n" + smuggle(b"\r\n") + b"after" + END_OF_DATA,
    "CR.CRLF": HEAD + b"\r.\r\n" + smuggle(b"\r\n") + b"after" + END_OF_DATA,
    "CRLF.CRCRLF": HEAD + b"\r\n.\r\r\n" + smuggle(b"\r\n") + b"after" + END_OF_DATA,
    "CRLF NUL.CRLF": HEAD + b"\r\n\x00.\r\n" + smuggle(b"\r\n") + b"after" + END_OF_DATA,
    "CRLF.NUL CRLF": HEAD + b"\r\n.\x00\r\n" + smuggle(b"\r\n") + b"after" + END_OF_DATA,
    "NUL in lines": HEAD + b"\x00\r\n\x00\x00\r\n\x00" + END_OF_DATA,
    "dot-stuffed": HEAD + b"\r\n..\r\n" + smuggle(b"\r\n") + b"after" + END_OF_DATA,
    "space-dot": HEAD + b"\r\n .\r\n" + smuggle(b"\r\n") + b"after" + END_OF_DATA,
    "bare CR/LF mixture": HEAD + b"\r\r\n\n\r\n\r\r.\n\r\n\n.\r\r\n\r\r" + smuggle(b"\n")
                          + b"x" + END_OF_DATA,
    "fake end at the start": b".\n" + smuggle(b"\n") + b"after" + END_OF_DATA,
    "bare-CR end at the start": b".\r" + smuggle(b"\r") + b"after" + END_OF_DATA,
    "empty message": b".\r\n",
    "commands as content": b"RCPT TO:<z@tripwire.test>\r\nQUIT\r\nBDAT 5 LAST\r\nxxxxx\r\n"
                           b"DATA\r\n" + END_OF_DATA,
    "all 256 byte values": HEAD + bytes(range(256)) * 4 + END_OF_DATA,
    "1 MB without CRLF": HEAD + pseudo_random(ONE_MB, b"line").replace(b"\r", b"r")
                         .replace(b"\n", b"n") + END_OF_DATA,
    "fake end at 64 KB": HEAD + b"y" * (65536 - len(HEAD) - 2) + b"\n.\n" + smuggle(b"\n")
                         + b"z" * 70000 + END_OF_DATA,
}

# BDAT: chunks, the last one sent as BDAT n LAST.
BDAT_VARIANTS: dict[str, list[bytes]] = {
    "LAST chunk with CRLF.CRLF": [HEAD + b"\r\n.\r\n" + smuggle(b"\r\n", end=True)],
    "CRLF.CRLF in a non-last chunk": [HEAD + b"\r\n.\r\n" + smuggle(b"\r\n", end=True),
                                      b"tail\r\n"],
    "end cut across chunks": [HEAD + b"\r\n.", b"\r\n" + smuggle(b"\r\n", end=True)],
    "BDAT 0 LAST": [HEAD + b"\r\n.\r\n", b""],
    "a BDAT command inside": [b"BDAT 5 LAST\r\nxxxxx\r\nRCPT TO:<z@tripwire.test>\r\n"],
    "1 MB binary": [pseudo_random(ONE_MB, b"bdat")],
    "NULs": [b"\x00" * 1000],
    "twenty small chunks": [b"x\r\n.\r\n"] * 19 + [b""],
}


@dataclass
class World:
    lab: Lab
    gw: GatewayProcess
    log: LogFollower
    peers: dict[str, FakeServer]  # by mode
    dns: FakeDns
    ids: Iterator[int] = field(default_factory=lambda: iter(range(1, 1_000_000)))


def smuggling_config() -> str:
    return gateway_config(listeners=OUTBOUND_LISTENERS[:1], idle=10, session=60, drain=2,
                          log_level="info", dns_timeout=0.5, budget=2, policy="dane",
                          entries=[f"{{match: {NONE_PEER}/32, level: none}}"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work: Path = tmp_path_factory.mktemp("smuggling")
    ctx = certs.server_context(work / "peer", certs.make_leaf(None, ["mx.peer.test"]))
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab())
        lab.peer.ip("addr", "add", f"{NONE_PEER}/24", "dev", netlab.HOST_IF)
        lab.redirect_port25(10025)
        # A short delay: a RCPT waits for its lookup while the pipelined BDAT behind it
        # arrives, so the tracker's holding path is crossed too.
        resolver = FakeDns(knows_nothing(delay=0.01)).serve_in(lab.gw)
        stack.callback(resolver.close)
        peers = {}
        for mode, host in MODES.items():
            script = Script(context=ctx if mode == "tls" else None, caps=CAPS)
            peers[mode] = FakeServer(lab.peer, host, script)
            stack.callback(peers[mode].close)
        gw = stack.enter_context(GatewayProcess(lab.gw, work, smuggling_config()))
        yield World(lab, gw, LogFollower(gw), peers, resolver)


@dataclass
class Variant:
    name: str
    data: bytes | None = None  # DATA content, real end included
    chunks: list[bytes] = field(default_factory=list)  # or BDAT chunks

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else sum(map(len, self.chunks))

    def transaction(self, rcpt: bytes) -> tuple[bytes, bytes, int]:
        """(commands up to the content, what follows, replies to read before ``what
        follows`` is sent): DATA waits for its 354; BDAT is pipelined behind MAIL/RCPT,
        except a large one, which waits for their replies (see BDAT_HELD)."""
        envelope = b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<" + rcpt + b">\r\n"
        if self.data is not None:
            return envelope + b"DATA\r\n", self.data, 3
        body = b""
        for i, chunk in enumerate(self.chunks):
            last = b" LAST" if i == len(self.chunks) - 1 else b""
            body += b"BDAT %d%s\r\n" % (len(chunk), last) + chunk
        return envelope, body, 2 if len(body) > BDAT_HELD else 0

    def contents(self) -> list[bytes]:
        return [self.data] if self.data is not None else list(self.chunks)

    def replies(self) -> int:
        return 4 if self.data is not None else 2 + len(self.chunks)


def sender(w: World, dst: str, v: Variant, how: str, rcpts: tuple[bytes, bytes]) -> Wire:
    """The sending MTA: the variant's transaction (its content as ``how``), a plain second
    one, QUIT."""
    c = Wire(w.lab.mta.connect(dst, 25), timeout=15)
    try:
        if not (positive(c.reply()) and c.send(EHLO_LINE) and positive(c.reply())):
            return c
        head, body, before = v.transaction(rcpts[0])
        if before:
            c.send(head)
            if not all(positive(c.reply()) for _ in range(before)):
                return c
        else:
            body = head + body  # pipelined: MAIL, RCPT, the BDATs and their chunks
        send_as(c, body, how)
        for _ in range(v.replies() - before):
            if not positive(c.reply()):
                return c
        c.send(b"MAIL FROM:<s2@sender.test>\r\nRCPT TO:<" + rcpts[1] + b">\r\nDATA\r\n")
        if all(positive(c.reply()) for _ in range(3)):
            c.send(SECOND)
            c.reply()
        c.send(b"QUIT\r\n")
        c.reply()
    finally:
        c.finish()
    return c


def judge(mode: str, v: Variant, c: Wire, *, conns: list[Served], s: dict[str, Any],
          queries: list[str], domains: tuple[str, str]) -> list[str]:
    problems: list[str] = []
    if len(conns) != 1:
        return [f"{len(conns)} connections to the receiver"]
    [p] = conns
    if mode == "tls" and not p.wire.secure:
        problems.append("the hop was not upgraded")
    # The receiver's bytes are the sender's.
    if p.stream != bytes(c.plain_out):
        a, b = p.stream, bytes(c.plain_out)
        at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        problems.append(f"the receiver's bytes differ from the sender's at {at} "
                        f"({len(a)} vs {len(b)}): {a[at:at + 60]!r} / {b[at:at + 60]!r}")
    if p.contents != [*v.contents(), SECOND]:
        problems.append(f"framed contents differ: {[x[:40] for x in p.contents]}")
    # The sender's replies are the receiver's (minus what the upgrade consumed).
    replies = p.replies
    if mode == "tls":
        ehlos = [i for i, (verb, _) in enumerate(replies) if verb == b"EHLO"]
        replies = replies[:ehlos[0] + 1] + replies[ehlos[-1] + 1:]
    want = b"".join(text for _, text in replies)
    if bytes(c.plain_in) != want:
        problems.append(f"the sender's replies differ: {bytes(c.plain_in)[-300:]!r}")
    if any("tripwire" in q for q in queries):
        problems.append("a recipient inside the content was looked up")
    asked = {q.rstrip(".") for q in queries}
    if mode == "passthrough":
        if asked & set(domains):
            problems.append("passthrough looked up a recipient")
    elif not set(domains) <= asked:
        problems.append(f"the tracker did not read both RCPTs: {sorted(asked & set(domains))}")
    want_tls = {"tls": "tls", "plaintext": "plaintext", "passthrough": None}[mode]
    if s["outcome"] != "relayed" or s.get("tls") != want_tls:
        problems.append(f"session: {s['outcome']} tls={s.get('tls')} {s.get('tls_reason')}")
    return problems


def run_mode(w: World, mode: str, trials: list[tuple[Variant, str]], since: int) -> list[str]:
    """One mode's sessions, one after the other; the problems found (DNS queries counted
    from ``since``)."""
    dst = MODES[mode]
    peer = w.peers[mode]
    failures: list[str] = []
    for v, how in trials:
        n = next(w.ids)
        domains = (f"first-{n}.test", f"second-{n}.test")
        mark = peer.arm()
        c = sender(w, dst, v, how, (f"r@{domains[0]}".encode(), f"r@{domains[1]}".encode()))
        s = w.log.next_session(f"{dst}:25", timeout=20)
        conns = peer.settle(mark, timeout=20)
        problems = judge(mode, v, c, conns=conns, s=s, queries=w.dns.names(since),
                         domains=domains)
        if problems:
            failures.append(f"{mode}/{v.name}/{how}: {'; '.join(problems)}")
    return failures


def test_end_of_data_variants_cross_byte_exact(world: World) -> None:
    started = time.monotonic()
    variants = [Variant(k, data=d) for k, d in DATA_VARIANTS.items()]
    variants += [Variant(f"BDAT {k}", chunks=ch) for k, ch in BDAT_VARIANTS.items()]
    for v in variants:
        if v.data is not None:  # the real end is the first one: nothing else ends it
            assert (b"\r\n" + v.data).find(END_OF_DATA) == len(v.data) - 3, v.name
    trials = [(v, how) for v in variants
              for how in ("segment", "bytewise") if how == "segment" or v.size <= SMALL]
    # The modes run side by side (each one's sessions in order).
    with concurrent.futures.ThreadPoolExecutor(len(MODES)) as pool:
        since = len(world.dns.queries)
        runs = {mode: pool.submit(run_mode, world, mode, trials, since) for mode in MODES}
        failures = [f for run in runs.values() for f in run.result()]
    sessions = len(trials) * len(MODES)
    equal = sessions - len({f.split(":")[0] for f in failures})
    figure = (f"smuggling: {len(variants)} variants ({len(DATA_VARIANTS)} DATA, "
              f"{len(BDAT_VARIANTS)} BDAT) x {len(MODES)} gateway modes, {sessions} sessions, "
              f"{equal} byte-equal")
    print(f"\n{figure} ({time.monotonic() - started:.1f} s)")
    for f in failures[:30]:
        print("  DIFFERS: " + f)
    assert not failures, f"{figure}:\n" + "\n".join(failures[:30])


def test_the_detectors_see_a_command_the_gateway_does_act_on(world: World) -> None:
    """Control: the same judge on a session whose RCPT to tripwire.test is a real command.
    The tracker looks it up, the SERVFAIL makes the gateway answer 450 itself: both
    detectors fire, so their silence above means something."""
    peer = world.peers["tls"]
    mark = peer.arm()
    v = Variant("control", data=b"Subject: control\r\n\r\nx" + END_OF_DATA)
    c = sender(world, MODES["tls"], v, "segment", (b"y@tripwire.test", b"r@control.test"))
    s = world.log.next_session(f"{MODES['tls']}:25", timeout=20)
    problems = judge("tls", v, c, conns=peer.settle(mark), s=s, queries=world.dns.names(),
                     domains=("tripwire.test", "control.test"))
    assert b"450 4.7.5 smtpgate: cannot check DANE for tripwire.test" in c.plain_in, \
        bytes(c.plain_in)
    assert any("looked up" in p for p in problems), problems
    assert any("replies differ" in p for p in problems), problems

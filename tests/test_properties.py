"""Property tests (hypothesis) for the byte paths: the relay is the identity on bytes; the
sans-I/O machines frame the same at every read size; the envelope tracker never alters what
it forwards (A2); the parsers raise nothing but RemoteProtocolError on any input.

Deterministic in CI: the ``ci`` profile derandomizes and bounds the examples.  For a long
random run: ``SMTPGATE_HYPOTHESIS=long .venv/bin/pytest tests/test_properties.py``.

"Framing is the same at every read size": every transcript is a list of turns (what one side
says before the other answers); each turn is fed whole, cut at the drawn sizes, and byte by
byte, and the commands must be the same.  The drivers below play the shell's part the way
gateway/outbound.py and gateway/inbound.py do, with its own events (the plan, the TLS
handshake, the new connection) at the end of the turn in which the machine asked for them:
bytes of the same turn after the 220 are still delivered (the A4 case), a reconnect drops what
the old connection still says, and after the handoff the shell copies bytes (collected into
the final Relay).  Limits run at their production values and shrunk, so that small inputs
reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import Sequence

import pytest
import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gatelab.certs import make_leaf, make_root
from gatelab.machines import (
    PLANS,
    TLS_OUTCOMES,
    Cutter,
    a4_normalized,
    held_never_sent_without_tls,
    limits,
    offload_run,
    same_offload,
    upgrade_run,
    whole,
)
from gateway import dane
from gateway.commands import Relay, Result, SendClient, SendPeer
from gateway.envelope import (
    CheckRecipient,
    Envelope,
    EnvelopeCommand,
    ToClient,
    ToPeer,
    recipient_domain,
)
from gateway.offload import MTA_UNASKED, Reject
from gateway.policy import Plan
from gateway.relay import End, Pump
from gateway.smtp import (
    LIMITS,
    Limits,
    RemoteProtocolError,
    Reply,
    ReplyReader,
    capabilities,
    edit_ehlo,
    lost_capabilities,
    take_line,
    verb,
)
from gateway.upgrade import Defer, Reconnect, defer_reply

settings.register_profile(
    "ci", derandomize=True, max_examples=60, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "long", max_examples=5000, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile(os.environ.get("SMTPGATE_HYPOTHESIS", "ci"))
# The relay examples cost real sockets: fewer of them.
RELAY_PROFILE = settings(PROFILE, max_examples=max(PROFILE.max_examples // 3, 1))


def cut(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    """``data`` in pieces of the given sizes, cycled."""
    pieces, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        pieces.append(data[i:i + n])
        i, k = i + n, k + 1
    return pieces


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


SIZES = st.lists(st.integers(1, 24), min_size=1, max_size=6)

# -- strategies: SMTP-shaped byte streams, with arbitrary bytes mixed in ------------------------

ENDING = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])
REPLY_WORDS = [
    b"220 mx.b.test ESMTP", b"220-mx.b.test", b"220 2.0.0 go ahead", b"250-mx.b.test",
    b"250-PIPELINING", b"250-STARTTLS", b"250-SIZE 1000", b"250-SIZE 10", b"250-SIZE",
    b"250-CHUNKING", b"250 8BITMIME", b"250 STARTTLS", b"250 starttls", b"250 ok",
    b"250 SIZE 500", b"354 go on", b"421 4.3.0 bye", b"450 busy", b"554 no", b"500 what",
    b"2500 x", b"25", b"250", b"250-",
]
CLIENT_WORDS = [
    b"EHLO mta.a.test", b"HELO mta.a.test", b"ehlo", b"MAIL FROM:<a@a.test>",
    b"RCPT TO:<b@ok.test>", b"RCPT TO:<c@deny.test>", b"RCPT TO:<postmaster>",
    b"RCPT TO:<x@>", b"DATA", b"BDAT 3", b"BDAT 0 LAST", b"BDAT 5 LAST", b"BDAT x",
    b"BDAT -2", b"BDAT +2", b"STARTTLS", b"QUIT", b"RSET", b"NOOP", b".", b"..",
    b"Subject: s", b"",
]


def lines(words: list[bytes]) -> st.SearchStrategy[bytes]:
    line = st.tuples(st.one_of(st.sampled_from(words), st.binary(max_size=12)), ENDING)
    return st.lists(line, max_size=12).map(lambda ls: b"".join(w + e for w, e in ls))


@st.composite
def good_replies(draw: st.DrawFn) -> bytes:
    """Well-formed (possibly multi-line) replies: the envelope tracker's peer."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        code = draw(st.sampled_from([b"250", b"354", b"450", b"550", b"221", b"421"]))
        texts = draw(st.lists(st.sampled_from([b"ok", b"2.1.0 Ok", b"go", b""]),
                              min_size=1, max_size=3))
        out += b"".join(code + (b" " if i == len(texts) - 1 else b"-") + t + b"\r\n"
                        for i, t in enumerate(texts))
    return out


BANNER = b"220 mx.b.test ESMTP\r\n"
EHLO = b"EHLO mta.a.test\r\n"
CAPS = b"250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-STARTTLS\r\n250 CHUNKING\r\n"
CAPS_AFTER = b"250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 CHUNKING\r\n"
CAPS_LESS = b"250-mx.b.test\r\n250-SIZE 10\r\n250 8BITMIME\r\n"
PEER_TURNS = [BANNER, CAPS, CAPS_AFTER, CAPS_LESS, b"250 mx.b.test\r\n", b"220 2.0.0 go\r\n",
              b"454 4.7.0 no TLS\r\n", b"554 5.7.1 no\r\n", b"421 4.3.0 bye\r\n", b"250-x\r\n",
              b"2x0 junk\r\n", b"354 go\r\n"]
CLIENT_TURNS = [EHLO, b"HELO mta.a.test\r\n", b"HELO\r\n", b"MAIL FROM:<a@a.test>\r\n",
                b"RCPT TO:<b@b.test>\r\nDATA\r\n", b"STARTTLS\r\n", b"QUIT\r\n", b"NOOP\r\n",
                b"\r\n", b"EHLO"]
MTA_TURNS = [BANNER, CAPS, CAPS_AFTER, b"250 mx.b.test\r\n", b"554 no\r\n", b"501 what\r\n",
             b"250-x\r\n", b"x\r\n"]
INBOUND_CLIENT_TURNS = [EHLO, b"HELO c.test\r\n", b"STARTTLS\r\n", b"MAIL FROM:<a@b>\r\n",
                        b"starttls\r\n", b"QUIT\r\n", b"\r\n", b"EHL", b"NOOP\r\n",
                        b"rset\r\n"]


def turns(sides: dict[str, list[bytes]]) -> st.SearchStrategy[list[tuple[str, bytes]]]:
    """Conversations: each turn one to three utterances of one side, or stray bytes."""
    def side(name: str, words: list[bytes]) -> st.SearchStrategy[tuple[str, bytes]]:
        utterance = st.one_of(st.sampled_from(words), st.binary(min_size=1, max_size=6))
        data = st.lists(utterance, min_size=1, max_size=3).map(b"".join)
        return st.tuples(st.just(name), data)
    return st.lists(st.one_of(*(side(n, w) for n, w in sides.items())), max_size=9)


# -- (a) the relay is the identity on bytes -------------------------------------------------------

async def relay_rig(pump: Pump, early: bytes) -> tuple[socket.socket, socket.socket]:
    """client ⇄ [pump.client | pump.upstream] ⇄ server over loopback TCP, in this loop."""
    loop = asyncio.get_running_loop()
    gw_listen = socket.create_server(("127.0.0.1", 0))
    up_listen = socket.create_server(("127.0.0.1", 0))
    with gw_listen, up_listen:
        gw_listen.setblocking(False)
        up_listen.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, gw_listen.getsockname())
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_sendall(client, early)  # before the upstream leg exists
        accepted, _ = await loop.sock_accept(gw_listen)
        await loop.connect_accepted_socket(lambda: pump.client, accepted)
        await loop.create_connection(lambda: pump.upstream, *up_listen.getsockname()[:2])
        server, _ = await loop.sock_accept(up_listen)
        server.setblocking(False)
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pump.start()
    return client, server


async def send(sock: socket.socket, chunks: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    for chunk in chunks:
        await loop.sock_sendall(sock, chunk)
        await asyncio.sleep(0)  # let the pump see the chunk on its own, mostly
    sock.shutdown(socket.SHUT_WR)


async def receive(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while data := await loop.sock_recv(sock, 65536):
        got += data
    return bytes(got)


payloads = st.tuples(st.binary(max_size=600), st.integers(1, 200)).map(lambda t: t[0] * t[1])
WRITE_SIZES = st.lists(st.integers(1, 20000), min_size=1, max_size=6)


@RELAY_PROFILE
@given(up=payloads, down=payloads, up_sizes=WRITE_SIZES, down_sizes=WRITE_SIZES,
       order=st.sampled_from(["together", "client first", "server first"]),
       early=st.booleans(), high_water=st.sampled_from([256, 64 * 1024]))
@example(up=b"", down=b"", up_sizes=[1], down_sizes=[1], order="together", early=False,
         high_water=256)
def test_relay_is_the_identity_on_bytes_both_ways_with_half_close(
        *, up: bytes, down: bytes, up_sizes: list[int], down_sizes: list[int], order: str,
        early: bool, high_water: int) -> None:
    """Whatever the payloads, chunkings and order of the half-closes: each side receives
    exactly what the other sent, then EOF, and the pump ends cleanly."""
    # At most a few hundred writes each way: each costs a loop iteration.
    up_chunks = cut(up, [max(n, len(up) // 256) for n in up_sizes])
    down_chunks = cut(down, [max(n, len(down) // 256) for n in down_sizes])
    first = up_chunks.pop(0) if early and up_chunks else b""

    async def main() -> None:
        pump = Pump(high_water, 30.0, 60.0)
        client, server = await relay_rig(pump, first)
        with client, server:
            if order == "together":
                got_up, got_down, *_ = await asyncio.gather(
                    receive(server), receive(client), send(client, up_chunks),
                    send(server, down_chunks))
            elif order == "client first":  # the client half-closes; the server still talks
                await send(client, up_chunks)
                got_up = await receive(server)
                await send(server, down_chunks)
                got_down = await receive(client)
            else:
                await send(server, down_chunks)
                got_down = await receive(client)
                await send(client, up_chunks)
                got_up = await receive(server)
            assert got_up == up
            assert got_down == down
            assert await asyncio.wait_for(pump.done, 5) is End.DONE

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 20))


# -- (b) framing is the same at every read size ---------------------------------------------------

def read_replies(pieces: list[bytes], limits: Limits = LIMITS
                 ) -> tuple[list[Reply], str | None, bytes]:
    """Replies framed, then the RemoteProtocolError that ended the stream or the bytes left."""
    reader = ReplyReader(limits)
    replies: list[Reply] = []
    for piece in pieces:
        reader.feed(piece)
        try:
            while (reply := reader.next()) is not None:
                replies.append(reply)
        except RemoteProtocolError as exc:
            return replies, str(exc), b""
    return replies, None, bytes(reader.buffer)


@PROFILE
@given(data=st.one_of(lines(REPLY_WORDS), st.binary(max_size=300)), sizes=SIZES,
       small=st.booleans())
@example(data=b"250 " + b"x" * 60 + b"\r\n", sizes=[1], small=True)
def test_reply_framing_is_the_same_at_every_read_size(data: bytes, sizes: list[int],
                                                      small: bool) -> None:
    lim = limits(small)
    expected = read_replies(whole(data), lim)
    assert read_replies(cut(data, sizes), lim) == expected
    assert read_replies(bytewise(data), lim) == expected
    replies, error, rest = expected
    framed = b"".join(r.raw for r in replies)
    assert data.startswith(framed)  # no byte invented, none reordered
    if error is None:
        assert data.endswith(rest)


def envelope_run(script: list[tuple[str, bytes]], chop: Cutter, deny: str = "deny",
                 at_once: bool = True, limits: Limits = LIMITS
                 ) -> tuple[list[EnvelopeCommand], Envelope]:
    """Domains containing ``deny`` are refused; at once (the shell's cached path), or when
    the turn is over (a lookup: then the decision does not move with the reads)."""
    env = Envelope(limits=limits)
    out: list[EnvelopeCommand] = []

    def decide(c: CheckRecipient) -> None:
        run(env.recipient(c.ident, deny not in c.domain, c.domain, "no DANE"))

    def run(cmds: list[EnvelopeCommand]) -> None:
        for c in cmds:
            out.append(c)
            if isinstance(c, CheckRecipient) and at_once:
                decide(c)

    for side, data in script:
        start = len(out)
        feed = env.client_data if side == "client" else env.peer_data
        for piece in chop(data):
            run(feed(piece))
        if not at_once:
            for c in [c for c in out[start:] if isinstance(c, CheckRecipient)]:
                decide(c)
    return out, env


def sides(cmds: Sequence[EnvelopeCommand]) -> tuple[bytes, bytes, list[CheckRecipient]]:
    """What reached the peer, what reached the MTA, which recipients were asked about.  Content
    goes out as it arrives, and a write to one side has no order relative to a write to the
    other: each side's stream is what counts."""
    return (b"".join(c.data for c in cmds if isinstance(c, ToPeer)),
            b"".join(c.data for c in cmds if isinstance(c, ToClient)),
            [c for c in cmds if isinstance(c, CheckRecipient)])


ENVELOPE_SCRIPTS = st.lists(st.one_of(st.tuples(st.just("client"), lines(CLIENT_WORDS)),
                                      st.tuples(st.just("peer"), good_replies())), max_size=8)


@PROFILE
@given(script=ENVELOPE_SCRIPTS, sizes=SIZES)
@example(script=[("client", b"BDAT -2\r\nRCPT TO:<b@ok.test>\r\n")], sizes=[1])
def test_envelope_framing_is_the_same_at_every_read_size(
        script: list[tuple[str, bytes]], sizes: list[int]) -> None:
    """Recipients are decided when the turn is over.  Decided at once, the commands held
    behind a RCPT go out between two reads of one turn, and a reply the peer sent before it
    could have seen the command (an unsolicited one) then matches it or not depending on the
    reads: the peer's doing, not framing."""
    expected = sides(envelope_run(script, whole, at_once=False)[0])
    assert sides(envelope_run(script, lambda d: cut(d, sizes), at_once=False)[0]) == expected
    assert sides(envelope_run(script, bytewise, at_once=False)[0]) == expected


UPGRADE_SCRIPTS = turns({"peer": PEER_TURNS, "client": CLIENT_TURNS})


@PROFILE
@given(script=UPGRADE_SCRIPTS, sizes=SIZES, plan=st.sampled_from(PLANS),
       tls=st.sampled_from(TLS_OUTCOMES), small=st.booleans())
@example(script=[("peer", BANNER), ("client", EHLO + b"MAIL FROM:<a@a.test>\r\n"),
                 ("peer", CAPS + b"250 ok\r\n")], sizes=[1], plan=PLANS[1], tls=TLS_OUTCOMES[0],
         small=False)
@example(script=[("peer", BANNER), ("client", EHLO), ("peer", CAPS),
                 ("client", b"MAIL FROM:<a@a.test>\r\n"), ("peer", b"220 2.0.0 go\r\n"),
                 ("client", EHLO), ("peer", b"554 no\r\n" + BANNER + CAPS)],
         sizes=[1], plan=PLANS[1], tls=TLS_OUTCOMES[0], small=False)
def test_upgrade_framing_is_the_same_at_every_read_size(
        script: list[tuple[str, bytes]], sizes: list[int], plan: Plan,
        tls: tuple[bool, Result, str], small: bool) -> None:
    lim = limits(small)
    expected = upgrade_run(script, whole, plan, tls, lim)
    for chop in (lambda d: cut(d, sizes), bytewise):
        got = upgrade_run(script, chop, plan, tls, lim)
        assert a4_normalized(got.log) == a4_normalized(expected.log)
        assert got.result is expected.result


@PROFILE
@given(script=UPGRADE_SCRIPTS, sizes=SIZES, tls=st.sampled_from(TLS_OUTCOMES))
def test_upgrade_required_tls_sends_nothing_held_before_the_handshake(
        script: list[tuple[str, bytes]], sizes: list[int],
        tls: tuple[bool, Result, str]) -> None:
    """A3: once the plan requires TLS, the peer gets only STARTTLS or one greeting line (the
    MTA's, or our EHLO probe) until a handshake succeeded; the MTA's held commands never."""
    held_never_sent_without_tls(upgrade_run(script, lambda d: cut(d, sizes), PLANS[2], tls).log)


OFFLOAD_SCRIPTS = turns({"mta": MTA_TURNS, "client": INBOUND_CLIENT_TURNS})


@PROFILE
@given(script=OFFLOAD_SCRIPTS, sizes=SIZES, tls_ok=st.booleans(), small=st.booleans())
@example(script=[("mta", BANNER), ("client", EHLO), ("mta", CAPS), ("client", EHLO)],
         sizes=[1], tls_ok=True, small=True)
def test_offload_framing_is_the_same_at_every_read_size(
        script: list[tuple[str, bytes]], sizes: list[int], tls_ok: bool, small: bool) -> None:
    lim = limits(small)
    expected = offload_run(script, whole, tls_ok, lim)
    last = expected.log[-1] if expected.log else None
    unasked = isinstance(last, Reject) and last.reason == MTA_UNASKED
    for chop in (lambda d: cut(d, sizes), bytewise):
        got = offload_run(script, chop, tls_ok, lim)
        assert same_offload(expected.log, got.log)
        if not unasked:
            assert got.result is expected.result


# -- (c) the envelope tracker forwards the client's bytes unaltered (A2) --------------------------

@PROFILE
@given(script=ENVELOPE_SCRIPTS, sizes=SIZES)
def test_envelope_forwards_exactly_the_client_bytes_when_all_recipients_pass(
        script: list[tuple[str, bytes]], sizes: list[int]) -> None:
    """Concatenated, what reaches the peer is the client's stream up to what the tracker
    still holds (a line not ended yet, commands waiting for the reply to DATA)."""
    out, env = envelope_run(script, lambda d: cut(d, sizes), deny="\x00none")
    sent = b"".join(c.data for c in out if isinstance(c, ToPeer))
    client = b"".join(data for side, data in script if side == "client")
    assert sent + bytes(env._client) == client  # what it holds back: never sent
    assert env.deferred == []


# -- (d) parsers raise nothing but RemoteProtocolError ---------------------------------------

@PROFILE
@given(data=st.one_of(lines(REPLY_WORDS), st.binary(max_size=400)), small=st.booleans())
@example(data=b"250 STARTTLS\r\n", small=False)
def test_reply_parsers_raise_only_protocol_errors(data: bytes, small: bool) -> None:
    lim = limits(small)
    replies, _, _ = read_replies(whole(data), lim)
    for reply in replies:
        caps = capabilities(reply)
        assert all(k == k.upper() and k for k in caps)
        lost_capabilities(caps, caps)
        lost_capabilities({"SIZE": "100", "PIPELINING": ""}, caps)
        if reply.code != 250:
            continue  # the only replies the inbound side edits
        for offer in (True, False):
            edited = read_replies([edit_ehlo(reply, offer)])
            assert edited[1] is None and len(edited[0]) == 1
            assert edited[0][0].code == reply.code
            assert edited[0][0].lines[0] == reply.lines[0]  # the greeting line stays
            kept = [line for line in reply.lines[1:] if line.strip().upper() != b"STARTTLS"]
            assert list(edited[0][0].lines[1:]) == kept + ([b"STARTTLS"] if offer else [])


@PROFILE
@given(data=st.binary(max_size=200), small=st.booleans())
def test_command_parsers_raise_only_protocol_errors(data: bytes, small: bool) -> None:
    buffer = bytearray(data)
    lim = limits(small)
    try:
        while (line := take_line(buffer, lim)) is not None:
            assert line.endswith(b"\n")
            assert verb(line) == verb(line).upper()
            found = recipient_domain(line)
            if found is not None:
                address, domain = found
                assert "@" in address and domain == domain.lower()
    except RemoteProtocolError:
        pass


@PROFILE
@given(script=st.lists(st.tuples(st.sampled_from(["client", "peer"]), st.binary(max_size=80)),
                       max_size=6), small=st.booleans())
def test_machines_survive_arbitrary_bytes(script: list[tuple[str, bytes]], small: bool) -> None:
    """The upgrade and offload machines turn any garbage into a Defer/Reject; the envelope
    tracker may raise RemoteProtocolError (the peer's fault), nothing else."""
    lim = limits(small)
    for plan in PLANS:
        upgrade_run(script, whole, plan, TLS_OUTCOMES[0], lim)
    offload_run([("mta" if s == "peer" else s, d) for s, d in script], whole, True, lim)
    with contextlib.suppress(RemoteProtocolError):
        envelope_run(script, whole, limits=lim)


DER_WORDS = [b"\x30\x82\x01\x00", b"\x30\x03", b"\x02\x01\x01", b"\xa0\x03\x02\x01\x02",
             b"\x30\x00", b"\x30\x80", b"\x1f", b"\x30\x84\xff\xff\xff\xff"]
der_like = st.lists(st.one_of(st.sampled_from(DER_WORDS), st.binary(max_size=8)),
                    max_size=12).map(b"".join)
records = st.builds(dane.TLSARecord, st.integers(0, 4), st.integers(0, 2), st.integers(0, 3),
                    st.one_of(st.binary(max_size=40), st.binary(min_size=32, max_size=32)))


@PROFILE
@given(chain=st.lists(st.one_of(der_like, st.binary(max_size=60)), max_size=3),
       tlsa=st.lists(records, max_size=4))
def test_dane_on_garbage_fails_or_matches_honestly(chain: list[bytes],
                                                   tlsa: list[dane.TLSARecord]) -> None:
    for cert in chain:
        for selector in (0, 1, 2):
            for mtype in (0, 1, 2, 3):
                with contextlib.suppress(ValueError):  # documented: not a certificate
                    dane.tlsa_data(cert, selector, mtype)
    records_ = [*tlsa]
    if chain:
        with contextlib.suppress(ValueError):
            records_.append(dane.tlsa_record(chain[0], 3, 0, 0))  # a 3 0 0 of the garbage
    verdict = dane.verify(chain, records_, ["mx.b.test"])
    assert isinstance(verdict, dane.Verdict)
    if verdict.ok:  # only a DANE-EE record equal to the leaf's own data can pass garbage
        assert verdict.reason == dane.Reason.EE_MATCH and verdict.record is not None
        r = verdict.record
        assert dane.tlsa_data(chain[0], r.selector, r.mtype) == r.data
    fp = dane.fingerprint_matches(chain, [bytes(32)])
    assert not fp.ok


# -- regressions: what the properties and the fuzzers found, fixed in gateway/ --------------------

def test_a_line_over_the_limit_is_refused_even_when_its_end_came_in_the_same_read() -> None:
    assert read_replies([b"250 " + b"9" * 5000 + b"\r\n"])[1] == "reply line too long"
    with pytest.raises(RemoteProtocolError):
        take_line(bytearray(b"NOOP " + b"x" * 5000 + b"\r\n"))
    played = upgrade_run([("peer", BANNER), ("client", b"EHLO " + b"x" * 5000 + b"\r\n")],
                         whole, PLANS[1], TLS_OUTCOMES[0])
    assert played.log[-1] == Defer(defer_reply("4.3.0", "command line too long"),
                                   "command line too long")


def test_a_huge_size_after_tls_is_the_peers_protocol_error_not_a_crash() -> None:
    """int() refuses more than 4300 digits: a SIZE parameter that long, in one read, used to
    raise ValueError out of peer_data (through lost_capabilities)."""
    huge = b"250-mx.b.test\r\n250 SIZE " + b"9" * 5000 + b"\r\n"
    played = upgrade_run([("peer", BANNER), ("client", EHLO), ("peer", CAPS),
                          ("client", b"MAIL FROM:<a@a.test>\r\n"), ("peer", b"220 2.0.0 go\r\n"),
                          ("peer", huge)], whole, PLANS[2], TLS_OUTCOMES[0])
    last = played.log[-1]
    assert isinstance(last, Defer) and "reply line too long" in last.reason


def test_replies_wait_while_the_plan_is_made_however_they_were_read() -> None:
    """Whole, the unsolicited 250 used to be parsed in state PLAN (a protocol error); read
    later, it waited for the handoff."""
    script = [("peer", BANNER), ("client", EHLO + b"MAIL FROM:<a@a.test>\r\n"),
              ("peer", CAPS + b"250 ok\r\n")]
    for chop in (whole, bytewise):
        played = upgrade_run(script, chop, PLANS[0], TLS_OUTCOMES[0])
        assert played.log[-1] == Relay(b"MAIL FROM:<a@a.test>\r\n", b"250 ok\r\n")


def test_what_the_abandoned_connection_says_is_not_the_new_ones_banner() -> None:
    """After a refusal over TLS the old connection's next bytes used to be taken as the
    fallback connection's banner and greeting reply, and the held commands relayed."""
    played = upgrade_run([("peer", BANNER), ("client", EHLO), ("peer", CAPS),
                          ("client", b"MAIL FROM:<a@a.test>\r\n"), ("peer", b"220 2.0.0 go\r\n"),
                          ("peer", b"554 no\r\n" + BANNER + CAPS)], whole, PLANS[1],
                         TLS_OUTCOMES[0])
    assert isinstance(played.log[-1], Reconnect)
    assert played.result is Result.DANE  # still pending the fallback: nothing relayed


def test_bounds_hold_however_the_read_was_cut() -> None:
    """Each bound used to be checked before the read was parsed (inbound) or skipped after
    the commands were (outbound): one large read and many small ones ended differently."""
    many = b"EHLO c.test\r\n" + b"NOOP\r\n" * 9
    banner = b"220-" + b"a" * 30 + b"\r\n220 " + b"b" * 30 + b"\r\n"
    lim = limits(small=True)
    for chop in (whole, bytewise):
        held = upgrade_run([("peer", BANNER), ("client", EHLO + b"N" * 60)], chop,
                           PLANS[1], TLS_OUTCOMES[0], lim)
        assert isinstance(held.log[-1], Defer), chop
        assert held.log[-1].reason == "too much held before the TLS upgrade"
        inbound = offload_run([("mta", banner), ("client", many)], chop, True, lim)
        assert inbound.log[:2] == [SendClient(banner), SendPeer(b"EHLO c.test\r\n")]
        assert isinstance(inbound.log[-1], Reject), chop
        assert inbound.log[-1].reason == "too much before the MTA answered"


def test_edit_ehlo_keeps_the_greeting_line() -> None:
    reply = read_replies([b"250 STARTTLS\r\n"])[0][0]  # a host that calls itself STARTTLS
    assert edit_ehlo(reply, False) == b"250 STARTTLS\r\n"  # was b"": no reply at all
    assert edit_ehlo(reply, True) == b"250-STARTTLS\r\n250 STARTTLS\r\n"


@pytest.mark.parametrize("size", [b"-2", b"+2", b"1_0"])
def test_bdat_size_is_digits_only(size: bytes) -> None:
    """int() takes "-2", "+2" and "1_0": the RCPT after such a BDAT used to be copied as
    chunk content, never checked (and the peer, refusing the BDAT, would read it)."""
    bdat = b"BDAT " + size + b"\r\n"
    out, _ = envelope_run([("client", bdat + b"RCPT TO:<x@deny.test>\r\n"),
                           ("peer", b"501 5.5.4 syntax\r\n")], whole)
    assert sides(out) == (bdat, b"501 5.5.4 syntax\r\n450 4.7.5 smtpgate: no DANE\r\n",
                          [CheckRecipient(1, "x@deny.test", "deny.test")])


def test_dane_ta_key_of_an_unsupported_curve_is_no_match_not_an_exception() -> None:
    """load_der_public_key raises UnsupportedAlgorithm (not a ValueError) for a curve
    cryptography lacks: a "2 1 0" record in DNS used to make verify() raise."""
    root = make_root()
    leaf = make_leaf(root, ["mx.b.test"])
    p256 = bytes.fromhex("06082a8648ce3d030107")  # OID 1.2.840.10045.3.1.7
    assert root.spki_der.count(p256) == 1
    odd = root.spki_der.replace(p256, bytes.fromhex("06082a8648ce3d03010f"))
    verdict = dane.verify([leaf.der], [dane.TLSARecord(2, 1, 0, odd)], ["mx.b.test"])
    assert (verdict.ok, verdict.reason) == (False, dane.Reason.NO_MATCH)


def test_a_certificate_with_an_impossible_version_fails_verification() -> None:
    """load_der_x509_certificate raises InvalidVersion (not a ValueError) for version 96: a
    peer's chain used to make verify() raise."""
    root = make_root()
    leaf = make_leaf(root, ["mx.b.test"])
    v3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2
    assert leaf.der.count(v3) == 1
    bad = leaf.der.replace(v3, bytes.fromhex("a003020160"))
    verdict = dane.verify([bad], [dane.TLSARecord(2, 1, 0, root.spki_der)], ["mx.b.test"])
    assert (verdict.ok, verdict.reason) == (False, dane.Reason.NO_MATCH)


def test_a_certificate_whose_issuer_does_not_parse_fails_verification() -> None:
    """cryptography parses a certificate's names lazily: an issuer that is not valid UTF-8
    used to raise ValueError out of verify() when a "2 1 0" key was tried against it."""
    root = make_root("smtpgate test root")
    leaf = make_leaf(root, ["mx.b.test"])
    name = b"\x0c\x12smtpgate test root"  # UTF8String, 18 bytes
    assert leaf.der.count(name) == 1
    bad = leaf.der.replace(name, b"\x0c\x12" + b"\xff" * 18)
    verdict = dane.verify([bad], [dane.TLSARecord(2, 1, 0, root.spki_der)], ["mx.b.test"])
    assert (verdict.ok, verdict.reason) == (False, dane.Reason.NO_MATCH)


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    width = (size.bit_length() + 7) // 8
    return bytes([tag, 0x80 | width]) + size.to_bytes(width, "big") + content


def _inside(element: bytes) -> list[bytes]:
    """The elements of a constructed DER element."""
    _, pos, end = dane._tlv(element, 0)
    out = []
    while pos < end:
        _, _, next_pos = dane._tlv(element, pos)
        out.append(element[pos:next_pos])
        pos = next_pos
    return out


def test_a_certificate_with_a_duplicate_extension_fails_verification() -> None:
    """Extensions are parsed on first access, and a duplicate raises DuplicateExtension (not a
    ValueError): a leaf matching a DANE-TA record used to make verify() raise."""
    leaf = make_leaf(make_root(), ["mx.b.test"])
    tbs, algorithm, signature = _inside(leaf.der)
    *head, wrapper = _inside(tbs)  # [3] EXPLICIT Extensions
    extensions = _inside(_inside(wrapper)[0])
    twice = _der(0xA3, _der(0x30, b"".join([*extensions, extensions[0]])))
    bad = _der(0x30, _der(0x30, b"".join([*head, twice])) + algorithm + signature)
    record = dane.TLSARecord(2, 0, 1, hashlib.sha256(bad).digest())  # the leaf as its own TA
    verdict = dane.verify([bad], [record], ["mx.b.test"])
    assert (verdict.ok, verdict.reason) == (False, dane.Reason.BAD_CERTIFICATE)
    assert "Duplicate" in verdict.detail


def test_a_certificate_whose_subject_does_not_parse_fails_path_validation() -> None:
    """The path verifier parses a name only when it needs it (here: to report a signature
    algorithm that differs from the certificate's outer one) and raises ValueError when it
    does not parse: a leaf that is its own DANE-TA anchor used to make verify() raise."""
    leaf = make_leaf(make_root(), ["mx.b.test"])
    cn = bytes.fromhex("06035504030c09") + b"mx.b.test"  # CN, UTF8String "mx.b.test"
    ecdsa_sha256 = bytes.fromhex("06082a8648ce3d040302")  # in the TBS, then outside it
    assert leaf.der.count(cn) == 1 and leaf.der.count(ecdsa_sha256) == 2
    bad = leaf.der.replace(cn, cn[:5] + b"\x7b" + cn[6:])  # an application tag, no string
    bad = bad.replace(ecdsa_sha256, bytes.fromhex("06082a8648ce3d020302"), 1)
    record = dane.TLSARecord(2, 0, 1, hashlib.sha256(bad).digest())
    verdict = dane.verify([bad], [record], ["mx.b.test"])
    assert (verdict.ok, verdict.reason) == (False, dane.Reason.BAD_CERTIFICATE)

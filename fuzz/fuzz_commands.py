#!/usr/bin/env python3
"""Fuzz the SMTP command side: line framing (take_line, verb), recipient_domain, and the
envelope tracker (gateway.envelope.Envelope) on a conversation.  Input: one byte for the
read size, the limits and whether recipients of domains starting with "d" are refused; then
turns separated by NUL, the MTA's and the peer's in alternation.

Invariants: only RemoteProtocolError is raised; lines come out whole, in order, within the limit;
a recipient's domain is lower case without a trailing dot; the tracker's output per side is
the same whole and cut at the read size; with every recipient allowed, the bytes forwarded
to the peer followed by what the tracker still holds are exactly the MTA's bytes (A2).
"""

from __future__ import annotations

import common
from common import cut, limits, whole

from gateway.envelope import (
    CheckRecipient,
    Envelope,
    EnvelopeCommand,
    ToClient,
    ToPeer,
    recipient_domain,
)
from gateway.smtp import Limits, RemoteProtocolError, take_line, verb


def lines(stream: bytes, lim: Limits) -> None:
    buffer = bytearray(stream)
    taken = bytearray()
    try:
        while (line := take_line(buffer, lim)) is not None:
            assert line.endswith(b"\n") and line.count(b"\n") == 1
            assert len(line) <= lim.line + 1, "line over the limit"
            taken += line
            assert verb(line) == verb(line).upper()
            found = recipient_domain(line)
            if found is not None:
                address, domain = found
                assert "@" in address and domain == domain.lower()
                assert not domain.endswith("."), domain
    except RemoteProtocolError:
        assert len(buffer) > lim.line or buffer.find(b"\n") > lim.line
    assert bytes(taken) + bytes(buffer) == stream, "bytes lost or invented"


Sides = tuple[bytes, bytes, list[CheckRecipient]]


def envelope(script: list[tuple[str, bytes]], chop: common.Cutter,
             refuse: bool, lim: Limits) -> tuple[Sides, Envelope, bool]:
    """Per side: what reached the peer, what reached the MTA, the recipients asked about;
    and whether the peer's bytes broke framing (RemoteProtocolError).  Recipients are decided when
    the turn is over (the shell's lookup), so the decision does not move with the reads."""
    env = Envelope(limits=lim)
    out: list[EnvelopeCommand] = []
    broken = False
    try:
        for side, data in script:
            asked: list[CheckRecipient] = []
            for piece in chop(data):
                cmds = (env.client_data if side == "client" else env.peer_data)(piece)
                out.extend(cmds)
                asked += [c for c in cmds if isinstance(c, CheckRecipient)]
            for c in asked:
                allow = not (refuse and c.domain.startswith("d"))
                out.extend(env.recipient(c.ident, allow, c.domain, "no DANE"))
    except RemoteProtocolError:
        broken = True
    sides = (b"".join(c.data for c in out if isinstance(c, ToPeer)),
             b"".join(c.data for c in out if isinstance(c, ToClient)),
             [c for c in out if isinstance(c, CheckRecipient)])
    return sides, env, broken


def test_one_input(data: bytes) -> None:
    if not data:
        return
    size, small, refuse = 1 + (data[0] & 0x1F), bool(data[0] & 0x80), bool(data[0] & 0x40)
    turns = data[1:].split(b"\x00")
    script = [("client" if i % 2 == 0 else "peer", t) for i, t in enumerate(turns)]
    client = b"".join(t for side, t in script if side == "client")
    lim = limits(small)
    lines(client, lim)
    expected, env, broken = envelope(script, whole, refuse, lim)
    got, _, broken_cut = envelope(script, lambda d: cut(d, size), refuse, lim)
    if not (broken or broken_cut):
        # After a RemoteProtocolError the session ends: what one read emitted before the
        # error is lost with it, so only unbroken conversations compare.
        assert got == expected, "envelope output depends on the read size"
    sent = expected[0]
    if not refuse:  # (a refused RCPT line is the one thing never forwarded)
        assert client.startswith(sent), "forwarded bytes are not the MTA's, in order"
        if not broken:
            assert sent + bytes(env._client) == client, "the tracker lost or held bytes"


def seeds() -> list[bytes]:
    return [
        b"\x05MAIL FROM:<a@a.test>\r\nRCPT TO:<b@ok.test>\r\nRCPT TO:<c@dane.test>\r\nDATA\r\n"
        b"\x00250 ok\r\n250 ok\r\n354 go\r\n\x00Subject: s\r\n\r\n..dot\r\n.\r\nQUIT\r\n"
        b"\x00250 queued\r\n221 bye\r\n",
        b"\x41MAIL FROM:<a@a.test>\r\nRCPT TO:<x@d.test>\r\nBDAT 5 LAST\r\nabcdeQUIT\r\n"
        b"\x00250 ok\r\n250 ok\r\n250 ok\r\n221 bye\r\n",
        b"\x81RCPT TO:<Postmaster@Example.ORG.>\r\nBDAT 0 LAST\r\nNOOP\r\n",
    ]


if __name__ == "__main__":
    common.main(test_one_input, seeds)

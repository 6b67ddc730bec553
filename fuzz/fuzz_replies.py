#!/usr/bin/env python3
"""Fuzz the SMTP reply framing (gateway.smtp.ReplyReader) and the envelope tracker's peer
side.  Input: one byte for the read size and the limits, then the peer's byte stream.

Invariants: only RemoteProtocolError is raised; the replies (and the error) are the same whole,
cut at the read size, and byte by byte; every reply's raw bytes are a prefix of the stream in
order and parse again to the same reply; each line and each reply stays within the limits;
the envelope tracker passes unsolicited replies to the MTA byte for byte.
"""

from __future__ import annotations

import common
from common import cut, limits, whole

from gateway.envelope import Envelope, ToClient
from gateway.smtp import Limits, RemoteProtocolError, Reply, ReplyReader


def read_replies(pieces: list[bytes], limits: Limits) -> tuple[list[Reply], str | None]:
    reader = ReplyReader(limits)
    replies: list[Reply] = []
    for piece in pieces:
        reader.feed(piece)
        try:
            while (reply := reader.next()) is not None:
                replies.append(reply)
        except RemoteProtocolError as exc:
            return replies, str(exc)
    return replies, None


def test_one_input(data: bytes) -> None:
    if not data:
        return
    size, small, stream = 1 + (data[0] & 0x3F), bool(data[0] & 0x80), data[1:]
    lim = limits(small)
    expected = read_replies(whole(stream), lim)
    assert read_replies(cut(stream, size), lim) == expected, "framing depends on read size"
    if len(stream) <= 128:  # (byte by byte is slow; the cut size covers the rest)
        assert read_replies(cut(stream, 1), lim) == expected, "framing differs byte by byte"
    replies, _ = expected
    assert stream.startswith(b"".join(r.raw for r in replies)), "bytes lost or invented"
    for r in replies:
        assert 0 <= r.code <= 999 and 1 <= len(r.lines) <= lim.reply_lines
        assert all(len(line) <= lim.line for line in r.lines), "line over the limit"
        assert read_replies([r.raw], lim) == ([r], None), "a reply does not parse again"
    # No command pending: every reply is unsolicited and goes to the MTA unchanged.
    env = Envelope(limits=lim)
    try:
        out = env.peer_data(stream)
    except RemoteProtocolError:
        return
    assert b"".join(c.data for c in out if isinstance(c, ToClient)) == b"".join(
        r.raw for r in replies)


def seeds() -> list[bytes]:
    return [b"\x10220 mx.b.test ESMTP\r\n",
            b"\x05250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 STARTTLS\r\n",
            b"\x81250-a\r\n250-b\r\n250-c\r\n250-d\r\n250 e\r\n",
            b"\x02421 4.3.0 bye\n354 go\r\n250 ok\r\n",
            b"\x83250 " + b"x" * 60 + b"\r\n"]


if __name__ == "__main__":
    common.main(test_one_input, seeds)

#!/usr/bin/env python3
"""Fuzz the EHLO capability code of gateway.smtp: capabilities(), lost_capabilities() and
edit_ehlo() (the inbound side's STARTTLS offer).  Input: the EHLO reply shown before TLS,
NUL, the one seen after it.

Invariants: only RemoteProtocolError (while framing) is raised; keywords are upper case, one word;
every extension line's keyword is found; a reply loses nothing against itself and only
what it was shown; edit_ehlo() gives one well-formed reply with the same code, the greeting
line first, every other line kept in order except bare STARTTLS lines, STARTTLS offered
last exactly when asked, and editing its own output changes nothing (for 250 replies: the
only ones the inbound side edits).
"""

from __future__ import annotations

import common

from gateway.smtp import (
    MATTERS,
    RemoteProtocolError,
    Reply,
    ReplyReader,
    capabilities,
    edit_ehlo,
    lost_capabilities,
)


def parse(data: bytes) -> Reply | None:
    reader = ReplyReader()
    reader.feed(data)
    try:
        return reader.next()
    except RemoteProtocolError:
        return None


def check_caps(reply: Reply) -> dict[str, str]:
    caps = capabilities(reply)
    for keyword, params in caps.items():
        assert keyword and keyword == keyword.upper() and " " not in keyword, keyword
        assert params == params.strip(), params
    for line in reply.lines[1:]:
        word = line.decode("ascii", "replace").strip().partition(" ")[0]
        assert not word or word.upper() in caps, f"keyword {word!r} lost"
    assert lost_capabilities(caps, caps) == [], "a reply loses against itself"
    return caps


def check_edit(reply: Reply, offer: bool) -> None:
    edited = edit_ehlo(reply, offer)
    again = parse(edited)
    assert again is not None and again.raw == edited, "edited reply is not one reply"
    assert again.code == reply.code and again.lines[0] == reply.lines[0]
    kept = [line for line in reply.lines[1:] if line.strip().upper() != b"STARTTLS"]
    assert list(again.lines[1:]) == kept + ([b"STARTTLS"] if offer else []), "lines changed"
    assert edit_ehlo(again, offer) == edited, "editing is not idempotent"


def test_one_input(data: bytes) -> None:
    shown_bytes, _, now_bytes = data.partition(b"\x00")
    shown, now = parse(shown_bytes), parse(now_bytes)
    for reply in (shown, now):
        if reply is not None:
            check_caps(reply)
            # Offload edits 250 replies only (a code below 100, "074", would come out with
            # two digits; no such reply is ever edited).
            if reply.code == 250:
                check_edit(reply, True)
                check_edit(reply, False)
    if shown is not None and now is not None:
        before, after = capabilities(shown), capabilities(now)
        lost = lost_capabilities(before, after)
        assert len(lost) == len(set(lost)) and set(lost) <= set(MATTERS)
        assert all(k in before for k in lost), "lost what was never shown"
        assert all(k == "SIZE" or k not in after for k in lost)


CAPS = b"250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n250 CHUNKING\r\n"


def seeds() -> list[bytes]:
    return [CAPS + b"\x00" + CAPS.replace(b"250-STARTTLS\r\n", b""),
            CAPS + b"\x00250-mx\r\n250-SIZE 100\r\n250 8BITMIME\r\n",
            b"250-starttls\r\n250-  Dsn  \r\n250 SIZE\r\n\x00250 STARTTLS\r\n",
            b"250-mx\r\n250-SMTPUTF8\r\n250-REQUIRETLS\r\n250 BINARYMIME\r\n\x00250 mx\n"]


if __name__ == "__main__":
    common.main(test_one_input, seeds)

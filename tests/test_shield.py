"""Transcripts of the smuggling shield (gateway/shield.py) at read sizes 4096/128/16/1, and a
property: whatever the client sends as content, the MTA sees CRLF line ends only and one end
of data, the client's own; a message with CRLF line ends passes byte for byte."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gatelab.machines import cut, transcript
from gateway.commands import Relay, SendClient, SendPeer, ShutdownClient, ShutdownPeer
from gateway.config import Smuggling
from gateway.shield import Refuse, Shield, ShieldState

SIZES = (4096, 128, 16, 1)
END = b"\r\n.\r\n"
GREET = [("client", b"EHLO c.example\r\n"), ("mta", b"250-mx\r\n250 PIPELINING\r\n")]
ENVELOPE = b"MAIL FROM:<a@a.example>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n"
ENVELOPE_OK = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"
HONEST = (b"Subject: honest\r\n\r\n..a stuffed dot\r\n.\x00 NUL after a dot\r\n"
          b" .\r\nlast" + END)

SMUGGLE = (b"MAIL FROM:<x@tripwire.test>\nRCPT TO:<y@tripwire.test>\nDATA\n"
           b"Subject: smuggled\n\nsmuggled\n")
VARIANTS = {
    "LF.LF": b"\n.\n", "CR.CR": b"\r.\r", "CRLF.CR": b"\r\n.\r", "CRLF.LF": b"\r\n.\n",
    "LF.CRLF": b"\n.\r\n", "CR.CRLF": b"\r.\r\n", "CRLF.CRCRLF": b"\r\n.\r\r\n",
}


def play(script: list[tuple[Any, ...]], size: int,
         mode: Smuggling = Smuggling.NORMALIZE) -> tuple[Shield, list[Any]]:
    shield = Shield(mode)
    return shield, transcript(shield, script, size)


def to_mta(out: list[Any]) -> bytes:
    return b"".join(c.data for c in out if isinstance(c, SendPeer))


def to_client(out: list[Any]) -> bytes:
    return b"".join(c.data for c in out if isinstance(c, SendClient))


def same(script: list[tuple[Any, ...]],
         mode: Smuggling = Smuggling.NORMALIZE) -> tuple[Shield, list[Any]]:
    """The same bytes to each side, and the same end, at every read size."""
    runs = [play(script, n, mode) for n in SIZES]
    first = runs[0][1]
    for n, (_, out) in zip(SIZES, runs, strict=True):
        assert to_mta(out) == to_mta(first), f"read size {n}"
        assert to_client(out) == to_client(first), f"read size {n}"
        assert [c for c in out if not isinstance(c, SendPeer | SendClient)] == [
            c for c in first if not isinstance(c, SendPeer | SendClient)], f"read size {n}"
    return runs[0]


def strict_ends(mta_stream: bytes) -> list[int]:
    """Where any reader, however lenient about line ends, finds an end of data in what the
    MTA got after a 354: a "." line between two line ends of any kind."""
    ends: list[int] = []
    at = 0
    while True:
        at = min((p for p in (mta_stream.find(e, at) for e in (b"\n.\n", b"\n.\r", b"\r.\r",
                                                               b"\r.\n")) if p >= 0),
                 default=-1)
        if at < 0:
            return ends
        ends.append(at)
        at += 1


@pytest.mark.parametrize("mode", [Smuggling.NORMALIZE, Smuggling.REJECT])
def test_an_honest_session_passes_byte_for_byte(mode: Smuggling) -> None:
    client = ENVELOPE + HONEST + ENVELOPE + b"second" + END + b"QUIT\r\n"
    shield, out = same([*GREET, ("client", ENVELOPE), ("mta", ENVELOPE_OK),
                        ("client", HONEST), ("mta", b"250 2.0.0 queued\r\n"),
                        ("client", ENVELOPE), ("mta", ENVELOPE_OK),
                        ("client", b"second" + END + b"QUIT\r\n"),
                        ("mta", b"250 2.0.0 queued\r\n221 bye\r\n"), ("client_eof",),
                        ("mta_eof",)], mode)
    assert to_mta(out) == b"EHLO c.example\r\n" + client
    assert to_client(out) == (b"250-mx\r\n250 PIPELINING\r\n" + ENVELOPE_OK
                              + b"250 2.0.0 queued\r\n" + ENVELOPE_OK
                              + b"250 2.0.0 queued\r\n221 bye\r\n")
    assert out[-2:] == [ShutdownPeer(), ShutdownClient()]
    assert shield.normalized == set() and shield.refused == ""
    assert shield.quit_answered  # a reset after this ends nothing (outcome relayed)


@pytest.mark.parametrize("variant", VARIANTS)
def test_normalize_keeps_a_smuggled_message_inside_the_first(variant: str) -> None:
    content = b"Subject: v\r\n\r\nbefore" + VARIANTS[variant] + SMUGGLE + b"after" + END
    shield, out = same([*GREET, ("client", ENVELOPE), ("mta", ENVELOPE_OK),
                        ("client", content + b"QUIT\r\n")])
    sent = to_mta(out)
    body = sent[sent.index(b"DATA\r\n") + 4:]  # from the DATA line's CRLF
    # One end of data, the client's own, and nothing after it but the QUIT.
    assert body.count(END) == 1 and body.endswith(END + b"QUIT\r\n"), body
    assert strict_ends(body) == [body.index(END) + 1]
    assert b"\r\n" + b"\r\n".join(body.split(b"\r\n")) == b"\r\n" + body  # CRLF only:
    assert b"\n" not in body.replace(b"\r\n", b"") and b"\r" not in body.replace(b"\r\n", b"")
    assert shield.normalized and shield.refused == ""
    assert not any(isinstance(c, Refuse) for c in out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reject_ends_the_session_before_any_end_of_data(variant: str) -> None:
    content = b"Subject: v\r\n\r\nbefore" + VARIANTS[variant] + SMUGGLE + b"after" + END
    shield, out = same([*GREET, ("client", ENVELOPE), ("mta", ENVELOPE_OK),
                        ("client", content + b"QUIT\r\n")], Smuggling.REJECT)
    assert isinstance(out[-1], Refuse) and out[-1].reply.startswith(b"550 5.5.2 smtpgate: "
                                                                    b"bare <")
    body = to_mta(out)[to_mta(out).index(b"DATA\r\n") + 4:]
    assert strict_ends(body) == [] and END not in body  # the MTA never saw an end
    assert b"tripwire" not in body and shield.state is ShieldState.DONE


def test_normalize_exact_bytes() -> None:
    """Bare ends become CRLF; a dot line beside one is stuffed (the MTA takes a dot away)."""
    content = b"a\nb\rc\r\n.\n..x\n.\r\nz" + END
    _, out = same([*GREET, ("client", ENVELOPE), ("mta", ENVELOPE_OK), ("client", content)])
    assert to_mta(out).endswith(b"DATA\r\n" + b"a\r\nb\r\nc\r\n..\r\n...x\r\n..\r\nz" + END)


def test_content_before_the_reply_to_data() -> None:
    """Content pipelined behind DATA: normalize holds it for the 354; reject ends at once;
    after a refused DATA it would be read as commands: never sent, the session ends."""
    early = [*GREET, ("client", ENVELOPE + b"Subject: early\r\n\r\nx" + END)]
    _, out = same([*early, ("mta", ENVELOPE_OK), ("mta", b"250 2.0.0 queued\r\n")])
    assert to_mta(out).endswith(ENVELOPE + b"Subject: early\r\n\r\nx" + END)
    assert to_client(out).endswith(b"354 go\r\n250 2.0.0 queued\r\n")
    _, out = same(early, Smuggling.REJECT)
    assert isinstance(out[-1], Refuse) and out[-1].kind == "pipelining"
    assert out[-1].reply.startswith(b"554 5.5.0 ")
    _, out = same([*early, ("mta", b"250 2.1.0 Ok\r\n554 5.7.1 no\r\n554 5.5.1 no rcpt\r\n")])
    assert isinstance(out[-1], Refuse) and out[-1].kind == "pipelining"
    assert b"Subject: early" not in to_mta(out)


def test_a_refused_data_without_early_content_goes_on() -> None:
    _, out = same([*GREET, ("client", ENVELOPE), ("mta", b"250 Ok\r\n554 no\r\n554 no\r\n"),
                   ("client", b"QUIT\r\n"), ("mta", b"221 bye\r\n")])
    assert to_mta(out).endswith(b"DATA\r\nQUIT\r\n") and not any(
        isinstance(c, Refuse) for c in out)


def test_bdat_chunks_are_copied_by_count_untouched() -> None:
    chunk = b"line\n.\nMAIL FROM:<x@tripwire.test>\r\n\r.\r"
    client = (b"MAIL FROM:<a@a.example>\r\nRCPT TO:<b@b.test>\r\n"
              + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n")
    shield, out = same([*GREET, ("client", client)])
    assert to_mta(out) == b"EHLO c.example\r\n" + client
    assert shield.normalized == set() and shield.state is ShieldState.COMMANDS


@pytest.mark.parametrize(("mode", "expect"), [(Smuggling.NORMALIZE, b"NOOP\r\n"),
                                              (Smuggling.REJECT, None)])
def test_a_command_ended_by_a_bare_lf(mode: Smuggling, expect: bytes | None) -> None:
    _, out = same([*GREET, ("client", b"NOOP\n")], mode)
    if expect is None:
        assert isinstance(out[-1], Refuse) and out[-1].kind == "bare_lf"
        assert to_mta(out) == b"EHLO c.example\r\n"
    else:
        assert to_mta(out).endswith(expect)


def test_a_bare_cr_inside_a_command_is_refused_in_every_mode() -> None:
    for mode in (Smuggling.NORMALIZE, Smuggling.REJECT):
        _, out = same([*GREET, ("client", b"RCPT TO:<a@b>\rDATA\r\n")], mode)
        assert isinstance(out[-1], Refuse) and out[-1].kind == "bare_cr"
        assert b"RCPT" not in to_mta(out)


def test_passthrough_starttls_stops_reading_at_the_220() -> None:
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a ClientHello's first bytes
    shield, out = same([*GREET, ("client", b"STARTTLS\r\n" + hello),
                        ("mta", b"220 2.0.0 Ready to start TLS\r\n")])
    assert out[-1] == Relay(hello, b"") and shield.state is ShieldState.DONE
    _, out = same([*GREET, ("client", b"STARTTLS\r\n"), ("mta", b"454 4.7.0 no TLS\r\n"),
                   ("client", b"MAIL FROM:<a@a.example>\n")])
    assert to_mta(out).endswith(b"STARTTLS\r\nMAIL FROM:<a@a.example>\r\n")


# -- a property over arbitrary content ------------------------------------------------------

CONTENT = st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\x00"]),
                   max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(content=CONTENT, size=st.sampled_from(SIZES[1:]))
def test_any_content_reaches_the_mta_strictly_framed(content: bytes, size: int) -> None:
    """Whatever the client sends as content, the MTA sees CRLF line ends only, and an end of
    data only where the client's CRLF "." CRLF is; CRLF-only content is not changed at all."""
    client = content + END
    assume((b"\r\n" + client).index(END) == 2 + len(content))  # the data ends at END
    whole_shield, whole = play([("client", ENVELOPE), ("mta", ENVELOPE_OK), ("client", client)],
                               4096)
    pieces = play([("client", ENVELOPE), ("mta", ENVELOPE_OK),
                   *[("client", p) for p in cut(client, size)]], size)[1]
    assert to_mta(pieces) == to_mta(whole)
    body = b"\r\n" + to_mta(whole)[len(ENVELOPE):]  # from the DATA line's CRLF
    assert body.count(END) == 1 and body.endswith(END), body
    assert strict_ends(body) == [len(body) - 4]  # no lenient reader ends it sooner
    assert b"\r" not in body.replace(b"\r\n", b"") and b"\n" not in body.replace(b"\r\n", b"")
    assert whole_shield.state is ShieldState.COMMANDS
    if b"\r" not in content.replace(b"\r\n", b"") and b"\n" not in content.replace(b"\r\n", b""):
        assert body == b"\r\n" + client  # nothing to normalize: byte for byte


def test_the_reply_to_the_end_of_data_is_owed_too() -> None:
    """The final dot has a reply of its own.  A client that pipelines its next transaction
    behind the dot (RFC 2920 allows it after the end of data) gets its replies counted in
    order: the second DATA's 354 opens the second content, which is framed as content, not
    read as commands."""
    second = b"Subject: second\r\n\r\nx" + VARIANTS["LF.LF"] + SMUGGLE + b"after" + END
    _, out = same([*GREET, ("client", ENVELOPE), ("mta", ENVELOPE_OK),
                   ("client", b"one" + END + ENVELOPE),
                   ("mta", b"250 2.0.0 queued\r\n" + ENVELOPE_OK),
                   ("client", second + b"QUIT\r\n"),
                   ("mta", b"250 2.0.0 queued\r\n221 bye\r\n")])
    sent = to_mta(out)
    body = sent[sent.index(ENVELOPE, sent.index(b"one")) + len(ENVELOPE) - 2:]  # from CRLF
    # One end of data in the second message, its own: the bare "\n.\n" stayed content.
    assert body.count(END) == 1 and body.endswith(END + b"QUIT\r\n"), body
    assert b"\r\n..\r\nMAIL FROM:<x@tripwire.test>" in body

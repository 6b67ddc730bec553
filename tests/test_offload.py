"""Transcripts of the inbound machine (gateway/offload.py: the STARTTLS offload), at read
sizes 4096/128/16/1."""

from __future__ import annotations

from typing import Any

import pytest

from gatelab.machines import transcript
from gateway.commands import Relay, Result, SendClient, SendPeer, ShutdownClient, ShutdownPeer
from gateway.offload import MTA_UNASKED, InboundCommand, Offload, Reject, StartTlsServer
from gateway.smtp import STARTTLS_READY

SIZES = (4096, 128, 16, 1)
BANNER = b"220 mx.b.test ESMTP legacy\r\n"
EHLO = b"EHLO client.example\r\n"
MTA_CAPS = b"250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n"
OFFERED = (b"250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
           b"250 STARTTLS\r\n")


def play(script: list[tuple[Any, ...]], size: int) -> tuple[Offload, list[InboundCommand]]:
    m = Offload()
    return m, transcript(m, script, size, shell_copies=True)


def same(script: list[tuple[Any, ...]]) -> tuple[Offload, list[InboundCommand]]:
    runs = [play(script, n) for n in SIZES]
    for n, (_, out) in zip(SIZES, runs, strict=True):
        assert out == runs[0][1], f"read size {n}"
    return runs[0]


def test_starttls_is_offered_answered_and_handed_over_after_ehlo_over_tls() -> None:
    """The EHLO over TLS is answered with the MTA's reply to the EHLO before (without
    STARTTLS), never sent to the MTA: to it, that would be a second greeting."""
    m, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                   ("client", b"STARTTLS\r\n"), ("tls", True, "TLSv1.3"),
                   ("client", EHLO)])
    assert out == [SendClient(BANNER), SendPeer(EHLO), SendClient(OFFERED),
                   SendClient(STARTTLS_READY), StartTlsServer(),
                   SendClient(MTA_CAPS), Relay(b"", b"")]
    assert (m.tls, m.result) == (True, Result.TLS)


def test_helo_over_tls_gets_the_mta_greeting_line() -> None:
    _, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                   ("client", b"STARTTLS\r\n"), ("tls", True, "TLSv1.3"),
                   ("client", b"HELO client.example\r\nMAIL FROM:<a@b>\r\n")])
    assert out[-2:] == [SendClient(b"250 mx.b.test\r\n"), Relay(b"MAIL FROM:<a@b>\r\n", b"")]


@pytest.mark.parametrize(("greeting", "reply"), [
    (b"HELO client.example\r\n", b"250 mx.b.test\r\n"),  # no extensions to repeat
    (EHLO, b"502 5.5.2 EHLO not supported\r\n"),  # refused
])
def test_greeting_over_tls_goes_to_the_mta_when_it_gave_no_ehlo_reply(
        greeting: bytes, reply: bytes) -> None:
    _, out = same([("mta", BANNER), ("client", greeting), ("mta", reply),
                   ("client", b"STARTTLS\r\n"), ("tls", True, "TLSv1.3"),
                   ("client", EHLO), ("mta", MTA_CAPS)])
    assert out[-3:] == [SendPeer(EHLO), SendClient(MTA_CAPS), Relay(b"", b"")]


def test_starttls_straight_after_the_banner_forwards_the_ehlo_over_tls() -> None:
    _, out = same([("mta", BANNER), ("client", b"STARTTLS\r\n"), ("tls", True, "TLSv1.3"),
                   ("client", EHLO), ("mta", MTA_CAPS)])
    assert out[-3:] == [SendPeer(EHLO), SendClient(MTA_CAPS), Relay(b"", b"")]


def test_mta_offering_starttls_itself_is_not_offered_twice_nor_after_tls() -> None:
    own = b"250-mx\r\n250-STARTTLS\r\n250 PIPELINING\r\n"
    _, out = same([("mta", BANNER), ("client", EHLO), ("mta", own),
                   ("client", b"STARTTLS\r\n"), ("tls", True, "ok"), ("client", EHLO)])
    assert out[2] == SendClient(b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
    assert out[-2] == SendClient(b"250-mx\r\n250 PIPELINING\r\n")


@pytest.mark.parametrize("after", [b"RSET\r\nMAIL FROM:<x@y>\r\n", b"\r\n", b"R"])
def test_bytes_after_starttls_are_rejected_never_forwarded(after: bytes) -> None:
    """STARTTLS\\r\\nRSET\\r\\nMAIL FROM:<x@y>\\r\\n in one segment, split, byte by byte."""
    for size in SIZES:
        m, out = play([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                       ("client", b"STARTTLS\r\n" + after)], size)
        assert isinstance(out[-1], Reject), size
        assert out[-1].reply.startswith(b"421 4.7.0 smtpgate: data ")
        forwarded = b"".join(c.data for c in out if isinstance(c, SendPeer))
        assert forwarded == EHLO, size  # nothing after STARTTLS reached the MTA
        assert m.result is Result.DEFERRED


def test_client_without_starttls_goes_on_in_plaintext() -> None:
    m, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                   ("client", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")])
    assert out[-1] == Relay(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n", b"")
    assert m.result is Result.PLAINTEXT


# The plaintext phase before MAIL: commands that leave STARTTLS possible, and their replies.
PLAINTEXT_PHASE = [(b"NOOP\r\n", b"250 2.0.0 Ok\r\n"), (b"RSET\r\n", b"250 2.0.0 Ok\r\n"),
                   (b"HELP\r\n", b"214-2.0.0 Commands:\r\n214 2.0.0 EHLO MAIL\r\n"),
                   (b"VRFY postmaster\r\n", b"252 2.0.0 postmaster\r\n"),
                   (b"EXPN staff\r\n", b"502 5.5.1 Error: command not implemented\r\n"),
                   (EHLO, MTA_CAPS)]


@pytest.mark.parametrize(("command", "reply"), PLAINTEXT_PHASE)
def test_starttls_is_still_answered_after_any_plaintext_phase_command(
        command: bytes, reply: bytes) -> None:
    """The STARTTLS offered is never withdrawn: a client that sends NOOP (RSET, HELP, VRFY,
    EXPN, EHLO again) first still gets the gateway's 220, and the MTA sees neither STARTTLS
    nor TLS bytes."""
    m, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                   ("client", command), ("mta", reply),
                   ("client", b"STARTTLS\r\n"), ("tls", True, "TLSv1.3"),
                   ("client", EHLO)])
    shown = OFFERED if command == EHLO else reply  # an EHLO reply is offered STARTTLS again
    assert out == [SendClient(BANNER), SendPeer(EHLO), SendClient(OFFERED),
                   SendPeer(command), SendClient(shown),
                   SendClient(STARTTLS_READY), StartTlsServer(),
                   SendClient(MTA_CAPS), Relay(b"", b"")]
    assert (m.tls, m.result) == (True, Result.TLS)


def test_plaintext_phase_commands_pipelined_with_starttls() -> None:
    """NOOP, RSET and STARTTLS in one segment (STARTTLS last, as RFC 2920 wants it): each
    command waits for the reply before it (the MTA answers what it was sent), and STARTTLS
    is still the gateway's."""
    m, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                   ("client", b"NOOP\r\nRSET\r\nSTARTTLS\r\n"),
                   ("mta", b"250 2.0.0 Ok\r\n"), ("mta", b"250 2.0.0 Ok\r\n"),
                   ("tls", True, "TLSv1.3"),
                   ("client", EHLO), ("mta", MTA_CAPS)])
    assert out[3:9] == [SendPeer(b"NOOP\r\n"), SendClient(b"250 2.0.0 Ok\r\n"),
                        SendPeer(b"RSET\r\n"), SendClient(b"250 2.0.0 Ok\r\n"),
                        SendClient(STARTTLS_READY), StartTlsServer()]
    assert m.result is Result.TLS


def test_after_plaintext_phase_commands_mail_goes_on_in_plaintext() -> None:
    m, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                   ("client", b"NOOP\r\n"), ("mta", b"250 2.0.0 Ok\r\n"),
                   ("client", b"MAIL FROM:<a@b>\r\n")])
    assert out[-1] == Relay(b"MAIL FROM:<a@b>\r\n", b"")
    assert (m.tls, m.result) == (False, Result.PLAINTEXT)


@pytest.mark.parametrize("command", [b"AUTH PLAIN AGFAAGI=\r\n", b"QUIT\r\n",
                                     b"XCLIENT ADDR=1.2.3.4\r\n", b"DATA\r\n"])
def test_other_commands_hand_over_as_before(command: bytes) -> None:
    _, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                   ("client", command)])
    assert out[-1] == Relay(command, b"")


def test_the_mta_closing_after_a_plaintext_phase_reply() -> None:
    m, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                   ("client", b"NOOP\r\n"), ("mta", b"421 4.3.2 going down\r\n"),
                   ("mta_eof",)])
    assert out[-3:] == [SendClient(b"421 4.3.2 going down\r\n"), Relay(b"", b""),
                        ShutdownClient()]
    assert m.result is Result.PLAINTEXT


def test_mta_speaking_unasked_in_the_plaintext_phase() -> None:
    """A second reply to one NOOP would be read as the reply to the client's next command."""
    _, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                   ("client", b"NOOP\r\n"), ("mta", b"250 Ok\r\n250 again\r\n"),
                   ("client", b"RSET\r\n")])
    assert isinstance(out[-1], Reject) and out[-1].reason == MTA_UNASKED


def test_helo_is_passed_as_it_is() -> None:
    _, out = same([("mta", BANNER), ("client", b"HELO c\r\n"), ("mta", b"250 mx\r\n"),
                   ("client", b"MAIL FROM:<a@b>\r\n")])
    assert out == [SendClient(BANNER), SendPeer(b"HELO c\r\n"), SendClient(b"250 mx\r\n"),
                   Relay(b"MAIL FROM:<a@b>\r\n", b"")]


def test_mta_refusing_at_the_banner() -> None:
    _, out = same([("mta", b"554 no\r\n")])
    assert out == [SendClient(b"554 no\r\n"), Relay(b"", b"")]


def test_failed_handshake_closes_without_a_word() -> None:
    _, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                   ("client", b"STARTTLS\r\n"), ("tls", False, "handshake failed")])
    assert out[-1] == Reject(b"", "handshake failed")


# -- half-close -----------------------------------------------------------------------------

def test_quit_and_fin_over_tls_reach_the_mta_in_order() -> None:
    """A client that pipelines QUIT after its EHLO over TLS and half-closes: the EHLO reply,
    then the QUIT handed to the pump (which passes the FIN on after it: test_relay.py);
    with the FIN before the MTA's reply to a forwarded greeting, the FIN after the QUIT."""
    m, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS),
                   ("client", b"STARTTLS\r\n"), ("tls", True, "TLSv1.3"),
                   ("client", EHLO + b"QUIT\r\n"), ("client_eof",)])
    assert out[-2:] == [SendClient(MTA_CAPS), Relay(b"QUIT\r\n", b"")]
    assert m.result is Result.TLS
    _, out = same([("mta", BANNER), ("client", b"STARTTLS\r\n"), ("tls", True, "TLSv1.3"),
                   ("client", EHLO + b"QUIT\r\n"), ("client_eof",), ("mta", MTA_CAPS)])
    assert out[-2:] == [Relay(b"QUIT\r\n", b""), ShutdownPeer()]


def test_fin_in_plaintext_after_a_lone_quit() -> None:
    """Sent before the banner: the FIN follows the QUIT.  (After the handoff the pump
    passes a FIN on by itself: tests/test_relay.py.)"""
    _, out = same([("client", b"QUIT\r\n"), ("client_eof",), ("mta", BANNER)])
    assert out == [SendClient(BANNER), Relay(b"QUIT\r\n", b""), ShutdownPeer()]


def test_fin_with_nothing_pending_is_passed_on() -> None:
    _, out = same([("mta", BANNER), ("client", EHLO), ("mta", MTA_CAPS), ("client_eof",)])
    assert out[-2:] == [Relay(b"", b""), ShutdownPeer()]


def test_mta_closing_after_its_refusal_reaches_the_client_after_it() -> None:
    _, out = same([("mta", b"554 5.7.1 go away\r\n"), ("mta_eof",)])
    assert out == [SendClient(b"554 5.7.1 go away\r\n"), Relay(b"", b"")]
    m = Offload()
    m.mta_data(BANNER)
    assert m.mta_closed() == [Relay(b"", b""), ShutdownClient()]

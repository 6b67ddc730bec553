"""Transcripts of the outbound upgrade machine (gateway/upgrade.py): events in, commands out.

Every transcript runs at read sizes 4096, 128, 16 and 1: framing bugs live at odd
boundaries.  The commands must not depend on how the bytes were cut.
"""

from __future__ import annotations

from typing import Any

import pytest

from gatelab.machines import transcript
from gateway.commands import Relay, Result, SendClient, SendPeer, ShutdownClient, ShutdownPeer
from gateway.config import Level, MtaStartTls
from gateway.policy import Action, Auth, Plan
from gateway.smtp import STARTTLS_READY
from gateway.upgrade import Command, Defer, NeedPlan, Reconnect, StartTls, StartTlsMta, Upgrade

SIZES = (4096, 128, 16, 1)

BANNER = b"220 mx.b.test ESMTP\r\n"
EHLO = b"EHLO mta.a.test\r\n"
HELO = b"HELO mta.a.test\r\n"
CAPS = (b"250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n"
        b"250-8BITMIME\r\n250 CHUNKING\r\n")
CAPS_TLS = (b"250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-AUTH PLAIN\r\n"
            b"250-8BITMIME\r\n250 CHUNKING\r\n")
NO_TLS_CAPS = b"250-mx.b.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
ENVELOPE = b"MAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n"

REQ_DANE = Plan(Action.REQUIRE_TLS, Auth.DANE, Level.DANE, "secure usable TLSA")
TRY = Plan(Action.TRY_TLS, Auth.NONE, Level.DANE, "opportunistic")
PASS = Plan(Action.PASSTHROUGH, Auth.NONE, Level.NONE, "none")
DEFER_PLAN = Plan(Action.DEFER, Auth.NONE, Level.DANE, "cannot trust DNS: TLSA is bogus")


def play(script: list[tuple[Any, ...]], size: int,
         mode: MtaStartTls = MtaStartTls.TERMINATE) -> tuple[Upgrade, list[Command]]:
    m = Upgrade(mode)
    return m, transcript(m, script, size)


def same_at_all_sizes(script: list[tuple[Any, ...]],
                      mode: MtaStartTls = MtaStartTls.TERMINATE) -> tuple[Upgrade, list[Command]]:
    results = [play(script, n, mode) for n in SIZES]
    first = results[0][1]
    for n, (_, out) in zip(SIZES, results, strict=True):
        assert out == first, f"read size {n}"
    return results[0]


def opening(caps: bytes = CAPS) -> list[tuple[Any, ...]]:
    return [("peer", BANNER), ("client", EHLO), ("peer", caps), ("client", ENVELOPE)]


OPENED = [SendClient(BANNER), SendPeer(EHLO), SendClient(CAPS), NeedPlan()]


def test_dane_upgrade_holds_the_pipelined_envelope_until_tls() -> None:
    m, out = same_at_all_sizes([
        *opening(), ("plan", REQ_DANE), ("peer", b"220 2.0.0 Ready to start TLS\r\n"),
        ("tls", True, Result.DANE, "dane-ee match"), ("peer", CAPS_TLS)])
    assert out == [*OPENED, SendPeer(b"STARTTLS\r\n"), StartTls(), SendPeer(EHLO),
                   Relay(ENVELOPE, b"")]
    assert (m.result, m.reason) == (Result.DANE, "dane-ee match")


def test_the_mta_never_sees_the_gateways_own_exchanges() -> None:
    _, out = same_at_all_sizes([
        *opening(), ("plan", REQ_DANE), ("peer", b"220 go\r\n"),
        ("tls", True, Result.DANE, "ok"), ("peer", CAPS_TLS)])
    to_client = b"".join(c.data for c in out if isinstance(c, SendClient))
    assert to_client == BANNER + CAPS  # not the 220 to STARTTLS, not the second EHLO reply


@pytest.mark.parametrize(("plan", "expect"), [
    (REQ_DANE, Defer(b"421 4.7.4 smtpgate: TLS required but peer does not offer "
                     b"STARTTLS\r\n", "TLS required but peer does not offer STARTTLS")),
    (TRY, Relay(ENVELOPE, b"")),
])
def test_starttls_not_offered(plan: Plan, expect: Command) -> None:
    _, out = same_at_all_sizes([("peer", BANNER), ("client", EHLO), ("peer", NO_TLS_CAPS),
                                ("client", ENVELOPE), ("plan", plan)])
    assert out[-1] == expect
    assert not any(isinstance(c, SendPeer) and c.data == ENVELOPE for c in out)


@pytest.mark.parametrize("reply", [b"502 5.5.1 not here\r\n", b"454 4.7.0 TLS not available\r\n",
                                   b"354 go ahead\r\n", b"250 ok?\r\n"])
def test_starttls_refused(reply: bytes) -> None:
    _, out = same_at_all_sizes([*opening(), ("plan", REQ_DANE), ("peer", reply)])
    # RFC 3463 X.7.4: security features not supported
    assert isinstance(out[-1], Defer) and out[-1].reply.startswith(b"421 4.7.4 ")
    assert f"answered STARTTLS with {reply[:3].decode()}" in out[-1].reason
    # Opportunistic: the same connection goes on in plaintext with the held commands.
    _, out = same_at_all_sizes([*opening(), ("plan", TRY), ("peer", reply)])
    assert out[-1] == Relay(ENVELOPE, b"")


@pytest.mark.parametrize("garbage", [b"hello there\r\n", b"22\r\n", b"2200 x\r\n",
                                     b"x" * 5000])
def test_garbage_from_the_peer_defers(garbage: bytes) -> None:
    _, out = same_at_all_sizes([*opening(), ("plan", REQ_DANE), ("peer", garbage)])
    assert isinstance(out[-1], Defer) and b"peer protocol error" in out[-1].reply
    _, out = same_at_all_sizes([("peer", garbage)])
    assert isinstance(out[-1], Defer) and out[-1].reply.startswith(b"421 4.4.2 ")


@pytest.mark.parametrize("plan", [REQ_DANE, TRY])
@pytest.mark.parametrize("injected", [b"250 fake\r\n", b"250-AUTH\r\n250 X\r\n", b"\r\n"])
def test_lines_after_the_220_to_starttls_are_an_attack(plan: Plan, injected: bytes) -> None:
    """A4: plaintext bytes after the 220, before the handshake, are never acted on: not
    even an opportunistic plan falls back; the session ends with a 4xx."""
    for size in SIZES:
        _, out = play([*opening(), ("plan", plan),
                       ("peer", b"220 go ahead\r\n" + injected)], size)
        assert isinstance(out[-1], Defer), size
        assert out[-1].reason == "data injected after STARTTLS reply"
        assert not any(isinstance(c, Relay | Reconnect) for c in out)


def test_reset_mid_handshake() -> None:
    script = [*opening(), ("plan", REQ_DANE), ("peer", b"220 go\r\n"),
              ("tls", False, Result.DEFERRED, "handshake: connection reset", "4.7.0")]
    _, out = same_at_all_sizes(script)
    assert out[-1] == Defer(b"421 4.7.0 smtpgate: TLS to peer failed: handshake: connection "
                            b"reset\r\n", "TLS to peer failed: handshake: connection reset")


def test_opportunistic_handshake_failure_falls_back_on_a_new_connection() -> None:
    m, out = same_at_all_sizes([
        *opening(), ("plan", TRY), ("peer", b"220 go\r\n"),
        ("tls", False, Result.DEFERRED, "handshake: bad record mac", "4.7.0"),
        ("reconnected",), ("peer", BANNER), ("peer", CAPS)])
    assert out[-3:] == [Reconnect("TLS failed: handshake: bad record mac"), SendPeer(EHLO),
                        Relay(ENVELOPE, b"")]
    assert m.result is Result.PLAINTEXT


def test_wrong_key_defers_with_a_cryptographic_failure_code() -> None:
    _, out = same_at_all_sizes([*opening(), ("plan", REQ_DANE), ("peer", b"220 go\r\n"),
                                ("tls", False, Result.DEFERRED, "no matching record")])
    assert out[-1] == Defer(b"421 4.7.5 smtpgate: TLS to peer failed: no matching record\r\n",
                            "TLS to peer failed: no matching record")


def test_helo_client_gets_the_same_protection() -> None:
    """qmail's client (and Postfix with smtp_never_send_ehlo) says HELO: the gateway asks
    EHLO itself to learn the capabilities, and says HELO again after TLS."""
    m, out = same_at_all_sizes([
        ("peer", BANNER), ("client", HELO), ("peer", b"250 mx.b.test\r\n"),
        ("client", ENVELOPE), ("plan", REQ_DANE), ("peer", CAPS), ("peer", b"220 go\r\n"),
        ("tls", True, Result.DANE, "dane-ee match"), ("peer", b"250 mx.b.test\r\n")])
    assert out == [SendClient(BANNER), SendPeer(HELO), SendClient(b"250 mx.b.test\r\n"),
                   NeedPlan(), SendPeer(b"EHLO mta.a.test\r\n"), SendPeer(b"STARTTLS\r\n"),
                   StartTls(), SendPeer(HELO), Relay(ENVELOPE, b"")]
    assert m.result is Result.DANE


def test_helo_client_opportunistic_without_starttls_says_helo_again() -> None:
    _, out = same_at_all_sizes([
        ("peer", BANNER), ("client", HELO), ("peer", b"250 mx.b.test\r\n"),
        ("client", ENVELOPE), ("plan", TRY), ("peer", NO_TLS_CAPS),
        ("peer", b"250 mx.b.test\r\n")])
    assert out[-3:] == [SendPeer(b"EHLO mta.a.test\r\n"), SendPeer(HELO),
                        Relay(ENVELOPE, b"")]


def test_ehlo_refused_then_helo() -> None:
    _, out = same_at_all_sizes([
        ("peer", BANNER), ("client", EHLO), ("peer", b"502 5.5.2 no EHLO\r\n"),
        ("client", HELO), ("peer", b"250 ok\r\n"), ("client", ENVELOPE), ("plan", TRY),
        ("peer", NO_TLS_CAPS), ("peer", b"250 ok\r\n")])
    assert out[:6] == [SendClient(BANNER), SendPeer(EHLO), SendClient(b"502 5.5.2 no EHLO\r\n"),
                       SendPeer(HELO), SendClient(b"250 ok\r\n"), NeedPlan()]
    assert out[-1] == Relay(ENVELOPE, b"")


def test_the_mta_doing_starttls_itself_is_left_alone_where_the_plan_is_opportunistic() -> None:
    """Toward a peer the gateway cannot authenticate either, the MTA's TLS is as good as
    the gateway's: it steps aside."""
    m, out = same_at_all_sizes([("peer", BANNER), ("client", EHLO), ("peer", CAPS),
                                ("client", b"STARTTLS\r\n"), ("plan", TRY)])
    assert out[-2:] == [NeedPlan(), Relay(b"STARTTLS\r\n", b"")]
    assert m.result is Result.END_TO_END


def test_an_mta_that_verifies_on_its_own_is_always_left_alone() -> None:
    """step-aside (verifying_mtas): no plan is waited for; its TLS is its own business."""
    m, out = same_at_all_sizes([("peer", BANNER), ("client", EHLO), ("peer", CAPS),
                                ("client", b"STARTTLS\r\n")], MtaStartTls.STEP_ASIDE)
    assert out[-1] == Relay(b"STARTTLS\r\n", b"") and m.result is Result.END_TO_END
    assert NeedPlan() not in out


TAKEOVER = [("peer", BANNER), ("client", EHLO), ("peer", CAPS), ("client", b"STARTTLS\r\n"),
            ("plan", REQ_DANE), ("peer", b"220 2.0.0 go ahead\r\n")]


def test_terminate_takes_over_the_mtas_starttls_toward_a_dane_peer() -> None:
    """Issue: an MTA at Postfix's default ``may`` sent STARTTLS and the gateway stepped
    aside from a DANE peer.  Now the peer is verified first, then the MTA gets its 220 from
    the gateway and its TLS is terminated locally; its EHLO over TLS goes to the peer."""
    m, out = same_at_all_sizes([*TAKEOVER, ("tls", True, Result.DANE, "dane-ee match"),
                                ("mta_tls", True, "")])
    assert out == [SendClient(BANNER), SendPeer(EHLO), SendClient(CAPS), NeedPlan(),
                   SendPeer(b"STARTTLS\r\n"), StartTls(),
                   SendClient(STARTTLS_READY), StartTlsMta(), Relay(b"", b"")]
    assert (m.result, m.takeover) == (Result.DANE, True)


def test_terminate_defers_when_the_peer_fails_verification() -> None:
    """The attacker's certificate: the MTA's STARTTLS gets a 421 (it keeps the mail), and
    nothing of the MTA's reaches anyone."""
    m, out = same_at_all_sizes([*TAKEOVER, ("tls", False, Result.DEFERRED,
                                            "no matching record")])
    assert out[-1] == Defer(b"421 4.7.5 smtpgate: TLS to peer failed: no matching record\r\n",
                            "TLS to peer failed: no matching record")
    assert StartTlsMta() not in out and m.result is Result.DEFERRED


@pytest.mark.parametrize("after", [b"EHLO x\r\n", b"\x16\x03\x01"])
def test_bytes_after_the_mtas_starttls_are_never_taken(after: bytes) -> None:
    """Pipelined behind STARTTLS (or a ClientHello before the 220): A4, both sides."""
    _, out = same_at_all_sizes([("peer", BANNER), ("client", EHLO), ("peer", CAPS),
                                ("client", b"STARTTLS\r\n" + after), ("plan", REQ_DANE)])
    assert out[-1] == Defer(b"421 4.7.0 smtpgate: data pipelined after STARTTLS\r\n",
                            "data pipelined after STARTTLS")
    _, out = same_at_all_sizes([*TAKEOVER[:5], ("client", after)])
    assert isinstance(out[-1], Defer) and b"pipelined after STARTTLS" in out[-1].reply


def test_a_failed_local_handshake_closes_without_a_word() -> None:
    m, out = same_at_all_sizes([*TAKEOVER, ("tls", True, Result.DANE, "ok"),
                                ("mta_tls", False, "SSLError")])
    assert out[-1] == Defer(b"", "the MTA's TLS with the gateway failed: SSLError")
    assert m.result is Result.DEFERRED


def test_doubt_at_the_mtas_starttls_defers() -> None:
    _, out = same_at_all_sizes([*TAKEOVER[:4], ("plan", DEFER_PLAN)])
    assert isinstance(out[-1], Defer) and out[-1].reply.startswith(b"421 4.7.5 ")


def test_hide_withdraws_starttls_where_the_plan_fails_closed() -> None:
    """hide: the EHLO reply waits for the plan; toward a DANE peer the MTA never sees
    STARTTLS and is upgraded like a legacy MTA."""
    m, out = same_at_all_sizes([("peer", BANNER), ("client", EHLO), ("peer", CAPS),
                                ("plan", REQ_DANE), ("client", ENVELOPE), ("plan", REQ_DANE),
                                ("peer", b"220 go\r\n"), ("tls", True, Result.DANE, "ok"),
                                ("peer", CAPS_TLS)], MtaStartTls.HIDE)
    shown = CAPS.replace(b"250-STARTTLS\r\n", b"")
    assert out[:4] == [SendClient(BANNER), SendPeer(EHLO), NeedPlan(), SendClient(shown)]
    assert out[-1] == Relay(ENVELOPE, b"") and (m.hidden, m.result) == (True, Result.DANE)


def test_hide_shows_starttls_where_the_plan_is_opportunistic() -> None:
    m, out = same_at_all_sizes([("peer", BANNER), ("client", EHLO), ("peer", CAPS),
                                ("plan", TRY)], MtaStartTls.HIDE)
    assert out[-1] == SendClient(CAPS) and not m.hidden


def test_plan_passthrough_and_defer() -> None:
    m, out = same_at_all_sizes([*opening(), ("plan", PASS)])
    assert out[-1] == Relay(ENVELOPE, b"") and m.result is Result.PASSTHROUGH
    m, out = same_at_all_sizes([*opening(), ("plan", DEFER_PLAN)])
    assert out[-1] == Defer(b"421 4.7.5 smtpgate: cannot trust DNS: TLSA is bogus\r\n",
                            "cannot trust DNS: TLSA is bogus")


@pytest.mark.parametrize(("after", "lost"), [
    (CAPS_TLS.replace(b"250 CHUNKING", b"250 HELP"), ["CHUNKING"]),
    (CAPS_TLS.replace(b"SIZE 10240000", b"SIZE 1000"), ["SIZE"]),
    (b"250 mx.b.test\r\n", ["PIPELINING", "CHUNKING", "8BITMIME", "SIZE"]),
])
def test_capabilities_lost_after_tls(after: bytes, lost: list[str]) -> None:
    """The MTA chose its commands from what it was shown before TLS: if the peer withdraws
    any of it, forwarding could earn a 5xx (a bounce).  Required TLS defers; opportunistic
    TLS goes back to plaintext on a new connection, where the MTA's view is true again."""
    script = [*opening(), ("plan", REQ_DANE), ("peer", b"220 go\r\n"),
              ("tls", True, Result.DANE, "ok"), ("peer", after)]
    _, out = same_at_all_sizes(script)
    assert isinstance(out[-1], Defer)
    assert out[-1].reason == f"peer dropped {', '.join(lost)} after TLS"
    _, out = same_at_all_sizes([*opening(), ("plan", TRY), ("peer", b"220 go\r\n"),
                                ("tls", True, Result.TLS, "ok"), ("peer", after)])
    assert isinstance(out[-1], Reconnect)


def test_peer_refusing_at_the_banner_is_shown_to_the_mta() -> None:
    _, out = same_at_all_sizes([("peer", b"554 5.7.1 go away\r\n")])
    assert out == [SendClient(b"554 5.7.1 go away\r\n"), Relay(b"", b"")]


def test_unsolicited_421_while_waiting_for_the_mta() -> None:
    _, out = same_at_all_sizes([("peer", BANNER), ("peer", b"421 4.4.2 idle\r\n")])
    assert out == [SendClient(BANNER), SendClient(b"421 4.4.2 idle\r\n")]


def test_too_much_held_defers() -> None:
    _, out = play([*opening(), ("client", b"NOOP\r\n" * 20000)], 4096)
    assert isinstance(out[-1], Defer) and out[-1].reply.startswith(b"421 4.3.0 ")


def test_tls_sessions_are_keyed_by_what_they_were_verified_against() -> None:
    from gateway.context import SessionCache
    from gateway.dane import TLSARecord

    a = Plan(Action.REQUIRE_TLS, Auth.DANE, Level.DANE, "x", sni="mx.b.test",
             tlsa=(TLSARecord(3, 1, 1, b"\1" * 32),))
    rolled = Plan(Action.REQUIRE_TLS, Auth.DANE, Level.DANE, "x", sni="mx.b.test",
                  tlsa=(TLSARecord(3, 1, 1, b"\2" * 32),))
    assert SessionCache.key("203.0.113.2:25", a) == SessionCache.key("203.0.113.2:25", a)
    assert SessionCache.key("203.0.113.2:25", a) != SessionCache.key("203.0.113.2:25", rolled)
    assert SessionCache.key("203.0.113.2:25", a) != SessionCache.key("203.0.113.3:25", a)
    cache = SessionCache(size=2)
    for i in range(3):
        cache.put(("k", i), object())  # type: ignore[arg-type]
    assert cache.get(("k", 0)) is None and cache.get(("k", 2)) is not None


def test_a_client_that_speaks_before_the_banner_is_answered_in_order() -> None:
    _, out = same_at_all_sizes([("client", EHLO), ("peer", BANNER), ("peer", CAPS),
                                ("client", ENVELOPE), ("plan", TRY),
                                ("peer", b"454 4.7.0 not now\r\n")])
    assert out == [SendClient(BANNER), SendPeer(EHLO), SendClient(CAPS), NeedPlan(),
                   SendPeer(b"STARTTLS\r\n"), Relay(ENVELOPE, b"")]


def test_helo_client_whose_starttls_is_refused_says_helo_again() -> None:
    _, out = same_at_all_sizes([
        ("peer", BANNER), ("client", HELO), ("peer", b"250 mx.b.test\r\n"),
        ("client", ENVELOPE), ("plan", TRY), ("peer", CAPS),
        ("peer", b"454 4.7.0 not now\r\n"), ("peer", b"250 mx.b.test\r\n")])
    assert out[-4:] == [SendPeer(b"EHLO mta.a.test\r\n"), SendPeer(b"STARTTLS\r\n"),
                        SendPeer(HELO), Relay(ENVELOPE, b"")]


# -- half-close: an EOF is passed on after everything sent before it ----------------------

def test_lone_quit_then_fin_after_the_handoff_is_the_envelopes() -> None:
    """QUIT is the decision point: the handoff comes first, and the FIN after it is the
    envelope tracker's event (tests/test_envelope.py), not this machine's."""
    m, out = same_at_all_sizes([("peer", BANNER), ("client", EHLO), ("peer", CAPS),
                                ("client", b"QUIT\r\n"), ("client_eof",)])
    assert out == [SendClient(BANNER), SendPeer(EHLO), SendClient(CAPS),
                   Relay(b"QUIT\r\n", b"")]
    assert m.result is Result.PASSTHROUGH


def test_quit_and_fin_in_one_go_before_the_ehlo_reply() -> None:
    """An MTA that pipelines EHLO and QUIT and half-closes gets both replies in order."""
    _, out = same_at_all_sizes([("peer", BANNER), ("client", EHLO + b"QUIT\r\n"),
                                ("client_eof",), ("peer", CAPS)])
    assert out == [SendClient(BANNER), SendPeer(EHLO), SendClient(CAPS),
                   Relay(b"QUIT\r\n", b""), ShutdownPeer()]


def test_fin_while_the_envelope_is_held_follows_it_through_the_upgrade() -> None:
    m, out = same_at_all_sizes([
        *opening(), ("client_eof",), ("plan", REQ_DANE), ("peer", b"220 go\r\n"),
        ("tls", True, Result.DANE, "dane-ee match"), ("peer", CAPS_TLS)])
    assert out == [*OPENED, SendPeer(b"STARTTLS\r\n"), StartTls(), SendPeer(EHLO),
                   Relay(ENVELOPE, b""), ShutdownPeer()]
    assert m.result is Result.DANE  # the FIN changed nothing about the protection


def test_fin_before_the_banner_is_passed_on_after_the_mtas_commands() -> None:
    """The MTA spoke early and left: its commands are still answered in order."""
    _, out = same_at_all_sizes([("client", EHLO + b"QUIT\r\n"), ("client_eof",),
                                ("peer", BANNER), ("peer", CAPS)])
    assert out == [SendClient(BANNER), SendPeer(EHLO), SendClient(CAPS),
                   Relay(b"QUIT\r\n", b""), ShutdownPeer()]


def test_an_unterminated_line_before_fin_is_no_command() -> None:
    _, out = same_at_all_sizes([("peer", BANNER), ("client", EHLO), ("peer", CAPS),
                                ("client", b"MAIL FROM:<a@a.te"), ("client_eof",)])
    assert out[-2:] == [Relay(b"", b""), ShutdownPeer()]
    assert not any(isinstance(c, NeedPlan) for c in out)


def test_peer_fin_before_the_decision_reaches_the_mta_after_its_replies() -> None:
    _, out = same_at_all_sizes([("peer", BANNER), ("client", EHLO),
                                ("peer", b"421 4.3.2 shutting down\r\n"), ("peer_eof",)])
    assert out[-3:] == [SendClient(b"421 4.3.2 shutting down\r\n"), Relay(b"", b""),
                        ShutdownClient()]


def test_peer_fin_during_the_upgrade_defers_the_held_commands() -> None:
    m, out = same_at_all_sizes([*opening(), ("plan", REQ_DANE), ("peer_eof",)])
    assert isinstance(out[-1], Defer) and out[-1].reply.startswith(b"421 4.4.2 ")
    assert not any(isinstance(c, SendPeer) and c.data == ENVELOPE for c in out)
    assert m.result is Result.DEFERRED

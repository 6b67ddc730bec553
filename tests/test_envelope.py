"""Transcripts of the envelope tracker (gateway/envelope.py) at read sizes 4096/128/16/1:
pipelined envelopes, several transactions, DATA and BDAT content copied untouched, and the
gateway's own 450 4.7.5 for a recipient, in the order the MTA sent its commands."""

from __future__ import annotations

from typing import Any

import pytest

from gatelab.machines import transcript
from gateway.commands import ShutdownClient, ShutdownPeer
from gateway.envelope import CheckRecipient, Envelope, EnvelopeCommand, ToClient, ToPeer

SIZES = (4096, 128, 16, 1)
DENY = "mx.b.test publishes DANE; this session is not DANE-verified"


def play(script: list[tuple[Any, ...]], size: int, deny: set[str]) -> tuple[
        Envelope, bytes, bytes, list[str]]:
    """Returns what reached the peer, what reached the MTA, and the recipients checked;
    recipients are decided the moment they are asked (deny: by domain)."""
    env = Envelope()

    def decide(c: object) -> list[EnvelopeCommand] | None:
        if not isinstance(c, CheckRecipient):
            return None
        return env.recipient(c.ident, c.domain not in deny, c.domain, DENY)

    log = transcript(env, script, size, answer=decide)
    return (env, b"".join(c.data for c in log if isinstance(c, ToPeer)),
            b"".join(c.data for c in log if isinstance(c, ToClient)),
            [c.address for c in log if isinstance(c, CheckRecipient)])


def same(script: list[tuple[Any, ...]], deny: set[str] = frozenset()) -> tuple[  # type: ignore[assignment]
        Envelope, bytes, bytes, list[str]]:
    runs = [play(script, n, set(deny)) for n in SIZES]
    for n, r in zip(SIZES, runs, strict=True):
        assert r[1:] == runs[0][1:], f"read size {n}"
    return runs[0]


ENVELOPE = (b"MAIL FROM:<a@a.test>\r\nRCPT TO:<x@ok.test>\r\nRCPT TO:<y@dane.test>\r\n"
            b"RCPT TO:<z@ok.test>\r\nDATA\r\n")
BODY = b"Subject: s\r\n\r\nline\r\n..dot-stuffed\r\n\r\n.\r\n"


def test_pipelined_envelope_with_one_recipient_deferred_in_order() -> None:
    env, to_peer, to_client, checked = same([
        ("client", ENVELOPE),
        ("peer", b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
        ("client", BODY), ("peer", b"250 2.0.0 queued\r\n"),
        ("client", b"QUIT\r\n"), ("peer", b"221 bye\r\n")], deny={"dane.test"})
    assert to_peer == (b"MAIL FROM:<a@a.test>\r\nRCPT TO:<x@ok.test>\r\nRCPT TO:<z@ok.test>\r\n"
                       b"DATA\r\n" + BODY + b"QUIT\r\n")
    assert to_client == (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
                         b"450 4.7.5 smtpgate: " + DENY.encode() + b"\r\n"
                         b"250 2.1.5 Ok\r\n354 go\r\n250 2.0.0 queued\r\n221 bye\r\n")
    assert checked == ["x@ok.test", "y@dane.test", "z@ok.test"]
    assert env.deferred == [("dane.test", DENY)] and env.allowed == 2


def test_every_recipient_deferred_no_content_reaches_the_peer() -> None:
    _env, to_peer, to_client, _ = same([
        ("client", b"MAIL FROM:<a@a.test>\r\nRCPT TO:<y@dane.test>\r\nDATA\r\n"),
        ("peer", b"250 Ok\r\n554 5.5.1 Error: no valid recipients\r\n"),
        ("client", b"RSET\r\n"), ("peer", b"250 Ok\r\n")], deny={"dane.test"})
    assert b"RCPT" not in to_peer and b"Subject" not in to_peer
    assert to_client.splitlines()[1].startswith(b"450 4.7.5 ")
    assert to_client.splitlines()[2].startswith(b"554 ")


@pytest.mark.parametrize("trick", [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\x00.\r\n"])
def test_smuggling_variants_are_content_not_end_of_data(trick: bytes) -> None:
    """Only CRLF "." CRLF ends DATA: bare LF/CR variants are copied as content, and a
    command hidden behind them is never parsed, checked or answered by the gateway."""
    body = b"x" + trick + b"RCPT TO:<evil@dane.test>\r\nmore\r\n.\r\n"
    _env, to_peer, _, checked = same([
        ("client", b"MAIL FROM:<a@a.test>\r\nRCPT TO:<x@ok.test>\r\nDATA\r\n"),
        ("peer", b"250 Ok\r\n250 Ok\r\n354 go\r\n"), ("client", body),
        ("peer", b"250 queued\r\n")], deny={"dane.test"})
    assert to_peer.endswith(body) and checked == ["x@ok.test"]


def test_several_transactions_and_rset() -> None:
    script = []
    for _i in range(3):
        script += [("client", ENVELOPE),
                   ("peer", b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n"),
                   ("client", BODY + b"RSET\r\n"), ("peer", b"250 queued\r\n250 Ok\r\n")]
    _env, to_peer, to_client, checked = same(script, deny={"dane.test"})
    assert to_peer.count(BODY) == 3 and to_peer.count(b"RSET\r\n") == 3
    assert to_client.count(b"450 4.7.5") == 3 and len(checked) == 9


def test_bdat_chunks_are_copied_by_count() -> None:
    chunk1 = b"Subject: b\r\n\r\n.\r\nRCPT TO:<evil@dane.test>\r\n"  # looks like commands
    chunk2 = b"last bytes\r\n"
    script = [("client", b"MAIL FROM:<a@a.test>\r\nRCPT TO:<x@ok.test>\r\n"
                         b"BDAT %d\r\n" % len(chunk1) + chunk1
                         + b"BDAT %d LAST\r\n" % len(chunk2) + chunk2),
              ("peer", b"250 Ok\r\n250 Ok\r\n250 chunk\r\n250 queued\r\n")]
    _env, to_peer, to_client, checked = same(script, deny={"dane.test"})
    assert to_peer.endswith(chunk1 + b"BDAT %d LAST\r\n" % len(chunk2) + chunk2)
    assert checked == ["x@ok.test"]
    assert to_client == b"250 Ok\r\n250 Ok\r\n250 chunk\r\n250 queued\r\n"


def test_bdat_behind_a_deferred_recipient_keeps_order() -> None:
    chunk = b"data\r\n"
    env = Envelope()
    out = env.client_data(b"MAIL FROM:<a@a.test>\r\nRCPT TO:<y@dane.test>\r\n"
                          b"BDAT 6 LAST\r\n" + chunk)
    check = next(c for c in out if isinstance(c, CheckRecipient))
    sent = b"".join(c.data for c in out if isinstance(c, ToPeer))
    assert sent == b"MAIL FROM:<a@a.test>\r\n"  # the rest waits for the verdict
    out = env.recipient(check.ident, False, "dane.test", "no")
    sent = b"".join(c.data for c in out if isinstance(c, ToPeer))
    assert sent == b"BDAT 6 LAST\r\n" + chunk


def test_recipients_of_several_domains_sharing_one_mx_address() -> None:
    """Each domain is decided on its own, even when all their MX hosts are this address."""
    env, to_peer, to_client, checked = same([
        ("client", b"MAIL FROM:<a@a.test>\r\nRCPT TO:<a@one.test>\r\nRCPT TO:<b@two.test>\r\n"
                   b"RCPT TO:<c@three.test>\r\nRCPT TO:<d@two.test>\r\nDATA\r\n"),
        ("peer", b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n"),
        ("client", BODY), ("peer", b"250 queued\r\n")], deny={"two.test"})
    assert to_peer.count(b"RCPT") == 2 and b"two.test" not in to_peer
    replies = to_client.splitlines()
    assert [r[:3] for r in replies] == [b"250", b"250", b"450", b"250", b"450", b"354", b"250"]
    assert checked == ["a@one.test", "b@two.test", "c@three.test", "d@two.test"]
    assert [d for d, _ in env.deferred] == ["two.test", "two.test"]


def test_quit_answered_is_noted() -> None:
    env = Envelope()
    env.client_data(b"QUIT\r\n")
    assert not env.quit_answered
    env.peer_data(b"221 2.0.0 Bye\r\n")
    assert env.quit_answered


# -- half-close -----------------------------------------------------------------------------

def eof_play(script: list[tuple[Any, ...]], size: int, decide_late: bool = False) -> list[
        tuple[str, bytes]]:
    """The commands in order as (kind, bytes): "peer"/"client" writes merged, "shut-peer"
    (or "shut-peer-after-quit"), "shut-client".  With ``decide_late`` recipients are
    decided at the ("decide",) step (a DNS answer arriving after the MTA's FIN)."""
    env = Envelope()
    pending: list[CheckRecipient] = []

    def decide(c: object) -> list[EnvelopeCommand] | None:
        if not isinstance(c, CheckRecipient):
            return None
        if decide_late:
            pending.append(c)
            return None
        return env.recipient(c.ident, True, c.domain)

    def late() -> list[EnvelopeCommand]:
        out = [cmd for c in pending for cmd in env.recipient(c.ident, True, c.domain)]
        pending.clear()
        return out

    log: list[tuple[str, bytes]] = []
    for c in transcript(env, script, size, answer=decide, also={"decide": late}):
        kind, data = {ToPeer: "peer", ToClient: "client"}.get(type(c), ""), b""
        if isinstance(c, ToPeer | ToClient):
            data = c.data
        elif isinstance(c, ShutdownPeer):
            # After QUIT only a FIN goes (see ShutdownPeer): the kind says which.
            kind = "shut-peer-after-quit" if c.after_quit else "shut-peer"
        elif isinstance(c, ShutdownClient):
            kind = "shut-client"
        else:
            continue  # a recipient asked about
        if log and log[-1][0] == kind and kind in ("peer", "client"):
            log[-1] = (kind, log[-1][1] + data)
        else:
            log.append((kind, data))
    return log


def eof_same(script: list[tuple[Any, ...]], decide_late: bool = False) -> list[
        tuple[str, bytes]]:
    runs = [eof_play(script, n, decide_late) for n in SIZES]
    for n, r in zip(SIZES, runs, strict=True):
        assert r == runs[0], f"read size {n}"
    return runs[0]


def test_fin_right_after_the_final_dot_and_quit() -> None:
    """Exim's habit: ``.``, QUIT and FIN in one go; the 250 and 221 still reach it, then the
    peer's FIN."""
    log = eof_same([
        ("client", b"MAIL FROM:<a@a.test>\r\nRCPT TO:<x@ok.test>\r\nDATA\r\n"),
        ("peer", b"250 Ok\r\n250 Ok\r\n354 go\r\n"),
        ("client", BODY + b"QUIT\r\n"), ("client_eof",),
        ("peer", b"250 2.0.0 queued\r\n221 2.0.0 Bye\r\n"), ("peer_eof",)])
    assert log[-4:] == [("peer", BODY + b"QUIT\r\n"), ("shut-peer-after-quit", b""),
                        ("client", b"250 2.0.0 queued\r\n221 2.0.0 Bye\r\n"),
                        ("shut-client", b"")]


def test_fin_after_bdat_last_pipelined_with_quit() -> None:
    chunk = b"Subject: b\r\n\r\nbody\r\n"
    last = b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n"
    log = eof_same([
        ("client", b"MAIL FROM:<a@a.test>\r\nRCPT TO:<x@ok.test>\r\n" + last),
        ("client_eof",), ("peer", b"250 Ok\r\n250 Ok\r\n250 queued\r\n221 Bye\r\n"),
        ("peer_eof",)])
    assert log == [("peer", b"MAIL FROM:<a@a.test>\r\nRCPT TO:<x@ok.test>\r\n" + last),
                   ("shut-peer-after-quit", b""),
                   ("client", b"250 Ok\r\n250 Ok\r\n250 queued\r\n221 Bye\r\n"),
                   ("shut-client", b"")]


def test_fin_after_a_lone_quit() -> None:
    log = eof_same([("client", b"QUIT\r\n"), ("client_eof",), ("peer", b"221 Bye\r\n"),
                    ("peer_eof",)])
    assert log == [("peer", b"QUIT\r\n"), ("shut-peer-after-quit", b""), ("client", b"221 Bye\r\n"),
                   ("shut-client", b"")]


def test_fin_waits_for_an_undecided_recipient_and_its_bdat_chunk() -> None:
    """The FIN must not overtake commands the gateway still holds (a DNS answer pending)."""
    chunk = b"body\r\n"
    log = eof_same([
        ("client", b"MAIL FROM:<a@a.test>\r\nRCPT TO:<x@ok.test>\r\nBDAT %d LAST\r\n"
                   % len(chunk) + chunk + b"QUIT\r\n"),
        ("client_eof",), ("decide",)], decide_late=True)
    assert log == [("peer", b"MAIL FROM:<a@a.test>\r\nRCPT TO:<x@ok.test>\r\n"
                            b"BDAT 6 LAST\r\n" + chunk + b"QUIT\r\n"),
                   ("shut-peer-after-quit", b"")]


def test_fin_while_waiting_for_the_reply_to_data() -> None:
    """Bytes after DATA wait for its reply (content or commands?): so does the FIN."""
    log = eof_same([("client", b"MAIL FROM:<a@a.test>\r\nRCPT TO:<x@ok.test>\r\n"
                               b"DATA\r\n"), ("client_eof",),
                    ("peer", b"250 Ok\r\n250 Ok\r\n354 go\r\n")])
    assert log[-2:] == [("client", b"250 Ok\r\n250 Ok\r\n354 go\r\n"), ("shut-peer", b"")]


def test_peer_fin_is_passed_on_once() -> None:
    log = eof_same([("client", b"NOOP\r\n"), ("peer", b"250 Ok\r\n"), ("peer_eof",),
                    ("peer_eof",)])
    assert log == [("peer", b"NOOP\r\n"), ("client", b"250 Ok\r\n"), ("shut-client", b"")]


@pytest.mark.parametrize(("line", "sender"), [
    (b"MAIL FROM:<TLSRPT@A.test> SIZE=100\r\n", "tlsrpt@a.test"),
    (b"MAIL FROM:<>\r\n", ""),
    (b"MAIL FROM: no brackets\r\n", ""),
])
def test_the_transaction_sender_is_known(line: bytes, sender: str) -> None:
    """What TLS reporting needs to leave the delivery of its own reports out (RFC 8460
    5.3); each transaction's MAIL replaces the last."""
    e = Envelope()
    e.client_data(b"MAIL FROM:<other@a.test>\r\n")
    e.client_data(line)
    assert e.sender == sender

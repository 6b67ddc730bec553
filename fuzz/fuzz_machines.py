#!/usr/bin/env python3
"""Fuzz the two STARTTLS machines on whole conversations: Upgrade (gateway.upgrade, outbound;
the peer's replies and the MTA's commands) and Offload (gateway.offload, inbound; the MTA's
replies and the client's commands).  Input: one byte for the read size and the limits, one
for the plan and the TLS outcome; then turns separated by NUL, the server side's first.

Invariants: no exception at all (a peer's garbage is a Defer/Reject, never an exception, and
the shell's events are always ones the machine asked for); nothing after the end of the
session; the same commands whole and cut at the read size (plaintext after STARTTLS: the
same abort either way); with a plan that requires TLS, nothing held reaches the peer before
a successful handshake (A3); inbound, nothing the client sends after STARTTLS reaches the MTA
before the handshake (A4).
"""

from __future__ import annotations

import common
from common import (
    PLANS,
    TLS_OK,
    TLS_OUTCOMES,
    a4_normalized,
    cut,
    held_never_sent_without_tls,
    limits,
    offload_run,
    same_offload,
    upgrade_run,
    whole,
)

from gateway.commands import SendPeer
from gateway.offload import StartTlsServer


def nothing_after_starttls_reaches_the_mta(log: list[object]) -> None:
    waiting = False
    for c in log:
        if isinstance(c, StartTlsServer):
            waiting = True
        elif c == TLS_OK:
            waiting = False
        assert not (waiting and isinstance(c, SendPeer)), "plaintext after STARTTLS forwarded"


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    size, small = 1 + (data[0] & 0x3F), bool(data[0] & 0x80)
    plan, tls = PLANS[data[1] % 4], TLS_OUTCOMES[(data[1] >> 2) % 3]
    turns = data[2:].split(b"\x00")
    outbound = [("peer" if i % 2 == 0 else "client", t) for i, t in enumerate(turns)]
    inbound = [("mta" if side == "peer" else side, t) for side, t in outbound]
    lim = limits(small)
    log = upgrade_run(outbound, whole, plan, tls, lim).log
    assert a4_normalized(upgrade_run(outbound, lambda d: cut(d, size), plan, tls, lim).log) == (
        a4_normalized(log)), "upgrade commands depend on the read size"
    if plan is PLANS[2]:
        held_never_sent_without_tls(log)
    log = offload_run(inbound, whole, tls[0], lim).log
    cut_log = offload_run(inbound, lambda d: cut(d, size), tls[0], lim).log
    assert same_offload(log, cut_log), "offload depends on the read size"
    nothing_after_starttls_reaches_the_mta(log)
    nothing_after_starttls_reaches_the_mta(cut_log)


BANNER = b"220 mx.b.test ESMTP\r\n"
CAPS = b"250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-STARTTLS\r\n250 CHUNKING\r\n"


def seeds() -> list[bytes]:
    def conversation(first: int, second: int, *turns: bytes) -> bytes:
        return bytes([first, second]) + b"\x00".join(turns)

    mail = b"MAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\n"
    return [
        # outbound DANE upgrade; inbound the same bytes are an offload with STARTTLS
        conversation(0x05, 0x02, BANNER, b"EHLO mta.a.test\r\n", CAPS, mail,
                     b"220 2.0.0 go\r\n", b"", CAPS.replace(b"250-STARTTLS\r\n", b"")),
        conversation(0x01, 0x01, BANNER, b"HELO mta.a.test\r\n", b"250 mx\r\n", mail, CAPS,
                     b"", b"454 4.7.0 no\r\n"),
        conversation(0x83, 0x06, BANNER, b"EHLO mta.a.test\r\n", CAPS, b"STARTTLS\r\nRSET\r\n",
                     b"220 go\r\n"),
        conversation(0x02, 0x09, BANNER, b"EHLO mta.a.test\r\n", CAPS, mail,
                     b"220 go\r\n", b"", b"554 no\r\n", b"", BANNER, b"", CAPS),
    ]


if __name__ == "__main__":
    common.main(test_one_input, seeds)

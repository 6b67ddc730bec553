"""The shell's part for the sans-I/O SMTP machines.

Two drivers.  ``transcript`` plays a script that names every event, the shell's own too, at
one read size: the transcript tests (tests/test_upgrade.py, tests/test_offload.py,
tests/test_envelope.py).  ``upgrade_run`` and ``offload_run`` play the machines from bytes
alone, the shell's events coming when asked for: the property tests
(tests/test_properties.py) and the fuzz harnesses (fuzz/).

The shell's own events (the plan, the handshake, the new connection) come at the end of the
turn in which the machine asked for them, so the commands may depend on the bytes only,
never on how they were cut into reads: bytes of the same turn after the 220 are still
delivered (the A4 case), a reconnect drops what the old connection still says, and after the
handoff the shell copies bytes (collected into the final Relay).  Limits run at their
production values or shrunk, so that small inputs reach them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.commands import Relay, Result, SendClient, SendPeer
from gateway.config import Level
from gateway.offload import MTA_UNASKED, InboundCommand, Offload, Reject, StartTlsServer
from gateway.policy import Action, Auth, Plan
from gateway.smtp import LIMITS, STARTTLS_READY, Limits, verb
from gateway.upgrade import Command, Defer, NeedPlan, Reconnect, StartTls, StartTlsMta, Upgrade

# Limits small enough for short inputs to cross them.
SMALL = Limits(line=40, reply_lines=4, held=48)


def limits(small: bool) -> Limits:
    """The production limits, or SMALL."""
    return SMALL if small else LIMITS


# A transcript's event names: bytes, cut into reads, or one of the shell's events.
FEEDS = {"peer": "peer_data", "client": "client_data", "mta": "mta_data"}
EVENTS = {"plan": "plan_ready", "tls": "tls_done", "mta_tls": "mta_tls_done",
          "reconnected": "reconnected", "client_eof": "client_closed",
          "peer_eof": "peer_closed", "mta_eof": "mta_closed"}


def transcript(machine: Any, script: Sequence[tuple[Any, ...]], size: int, *,
               answer: Callable[[Any], list[Any] | None] | None = None,
               also: dict[str, Callable[[], list[Any]]] | None = None,
               shell_copies: bool = False) -> list[Any]:
    """The commands ``machine`` gives for ``script``, in order.

    Each step is (event, *args): bytes events (FEEDS) are cut into reads of ``size``, the
    shell's (EVENTS) are called with their args, and ``also`` names the test's own (e.g. a
    late DNS answer).  ``answer`` sees every command and may feed the machine at once (a
    recipient decided from the cache): what that returns follows the command.
    ``shell_copies``: after the handoff (Relay) or a Reject the shell copies bytes itself;
    they are folded into the Relay, so that a transcript reads the same at every size."""
    log: list[Any] = []
    copied = {"peer": bytearray(), "client": bytearray(), "mta": bytearray()}

    def carry_out(commands: list[Any]) -> None:
        for c in commands:
            log.append(c)
            more = answer(c) if answer is not None else None
            if more:
                carry_out(more)

    for event, *args in script:
        if event in FEEDS:
            data: bytes = args[0]
            for piece in cut(data, size):
                if shell_copies and any(isinstance(c, Relay | Reject) for c in log):
                    copied[event] += piece
                else:
                    carry_out(getattr(machine, FEEDS[event])(piece))
        elif also is not None and event in also:
            carry_out(also[event]())
        else:
            carry_out(getattr(machine, EVENTS[event])(*args))
    at = next((i for i, c in enumerate(log) if isinstance(c, Relay)), None)
    if shell_copies and at is not None:
        end = log[at]
        log[at] = Relay(end.to_peer + bytes(copied["client"]),
                        end.to_client + bytes(copied["mta"] + copied["peer"]))
    return log


def cut(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def whole(data: bytes) -> list[bytes]:
    return [data] if data else []


Cutter = Callable[[bytes], list[bytes]]

PLANS = (
    Plan(Action.PASSTHROUGH, Auth.NONE, Level.NONE, "none"),
    Plan(Action.TRY_TLS, Auth.NONE, Level.DANE, "opportunistic"),
    Plan(Action.REQUIRE_TLS, Auth.DANE, Level.DANE, "secure usable TLSA"),
    Plan(Action.DEFER, Auth.NONE, Level.DANE, "cannot trust DNS"),
)
TLS_OUTCOMES = ((True, Result.DANE, "dane-ee match"), (True, Result.TLS, "unauthenticated"),
                (False, Result.DEFERRED, "handshake: SSLError"))
TLS_OK = "tls ok"  # marks a successful handshake in a log
A4_ABORT = "A4 abort"  # the session ended for plaintext after STARTTLS


@dataclass
class Played:
    """What the shell carried out, in order (``TLS_OK`` marks a successful handshake), and
    the machine's result."""

    log: list[object] = field(default_factory=list)
    result: Result = Result.PENDING


def upgrade_run(script: Sequence[tuple[str, bytes]], chop: Cutter, plan: Plan,
                tls: tuple[bool, Result, str], limits: Limits = LIMITS) -> Played:
    m = Upgrade(limits=limits)
    log: list[object] = []
    end: Relay | Defer | None = None
    after = {"client": bytearray(), "peer": bytearray()}  # copied by the shell after Relay
    wants: set[type] = set()

    def carry_out(cmds: list[Command]) -> None:
        nonlocal end
        assert end is None or not cmds, f"commands after the end: {cmds}"
        log.extend(cmds)
        for c in cmds:
            assert end is None, f"{c} after {end}"
            if isinstance(c, Relay | Defer):
                end = c
            elif isinstance(c, NeedPlan | StartTls | StartTlsMta | Reconnect):
                wants.add(type(c))

    for side, data in script:
        for piece in chop(data):
            if end is not None:
                if isinstance(end, Relay):
                    after[side] += piece
                continue
            if Reconnect in wants:
                continue  # the abandoned connection's bytes: its leg is detached
            carry_out((m.client_data if side == "client" else m.peer_data)(piece))
        while wants and end is None:
            if Reconnect in wants:
                wants.discard(Reconnect)
                carry_out(m.reconnected())
            elif NeedPlan in wants:
                wants.discard(NeedPlan)
                carry_out(m.plan_ready(plan))
            elif StartTlsMta in wants:
                # The MTA's own TLS, terminated by the shell (take-over): it succeeds.
                wants.discard(StartTlsMta)
                carry_out(m.mta_tls_done(True, ""))
            else:
                wants.discard(StartTls)
                ok, result, reason = tls
                if ok:
                    log.append(TLS_OK)
                carry_out(m.tls_done(ok, result, reason))
    if isinstance(end, Relay):
        log[log.index(end)] = Relay(end.to_peer + after["client"], end.to_client + after["peer"])
    return Played(log, m.result)


def offload_run(script: Sequence[tuple[str, bytes]], chop: Cutter, tls_ok: bool,
                limits: Limits = LIMITS) -> Played:
    m = Offload(limits=limits)
    log: list[object] = []
    end: Relay | Reject | None = None
    after = {"client": bytearray(), "mta": bytearray()}

    def carry_out(cmds: list[InboundCommand]) -> bool:
        nonlocal end
        log.extend(cmds)
        for c in cmds:
            assert end is None, f"{c} after {end}"
            if isinstance(c, Relay | Reject):
                end = c
        return any(isinstance(c, StartTlsServer) for c in cmds)

    for side, data in script:
        handshake = False
        for piece in chop(data):
            if end is not None:
                if isinstance(end, Relay):
                    after[side] += piece
                continue
            handshake |= carry_out((m.client_data if side == "client" else m.mta_data)(piece))
        if handshake and end is None:
            if tls_ok:
                log.append(TLS_OK)
            carry_out(m.tls_done(tls_ok, "TLSv1.3" if tls_ok else "handshake failed"))
    if isinstance(end, Relay):
        log[log.index(end)] = Relay(end.to_peer + after["client"], end.to_client + after["mta"])
    return Played(log, m.result)


# Inbound, the MTA speaking unasked when a command is about to go to it ends the session (its
# bytes would be read as the reply: A4, the reply direction).  That is decided by what has
# arrived by then, and a later read can only bring the same bytes later, where they read as the
# reply: so a run that ends there whole may go on when cut, and the two agree up to that point.



def a4_normalized(log: list[object]) -> list[object]:
    """Plaintext after STARTTLS (either way) ends the session before the handshake when it
    came in the same read, right after the machine asked for the handshake when it came
    later: one outcome (nothing crosses, the session ends)."""
    out: list[object] = []
    for c in log:
        if isinstance(c, Defer | Reject) and (
                "injected" in c.reason or "pipelined" in c.reason or c.reason == MTA_UNASKED):
            while out and (isinstance(out[-1], StartTls | StartTlsServer | StartTlsMta)
                           or out[-1] == SendClient(STARTTLS_READY)):
                out.pop()
            out.append(A4_ABORT)
        else:
            out.append(c)
    return out


def same_offload(whole_log: list[object], cut_log: list[object]) -> bool:
    last = whole_log[-1] if whole_log else None
    whole_log, cut_log = a4_normalized(whole_log), a4_normalized(cut_log)
    if isinstance(last, Reject) and last.reason == MTA_UNASKED:
        return cut_log[:len(whole_log) - 1] == whole_log[:-1]
    return cut_log == whole_log


def held_never_sent_without_tls(log: list[object]) -> None:
    """A3 for a plan that requires TLS: after NeedPlan, until a handshake succeeded, the peer
    gets only STARTTLS or one greeting line (the MTA's, or our EHLO probe); held commands
    never."""
    planned = False
    for c in log:
        if c == TLS_OK:
            return
        planned |= isinstance(c, NeedPlan)
        if planned and isinstance(c, SendPeer):
            assert c.data == b"STARTTLS\r\n" or is_greeting(c.data), f"sent: {c.data[:60]!r}"
        assert not (planned and isinstance(c, Relay)), "held commands relayed without TLS"


def is_greeting(data: bytes) -> bool:
    return data.count(b"\n") == 1 and data.endswith(b"\n") and verb(data) in (b"EHLO", b"HELO")

"""The inbound offload machine, sans I/O: STARTTLS for a legacy receiving MTA.

It relays the MTA's banner and EHLO reply (with STARTTLS added), answers the client's STARTTLS
itself, and hands over to the byte pump after the client's EHLO over TLS, or as soon as the
client goes on without TLS.  "Goes on" means a command that starts or belongs to a
transaction (MAIL, RCPT, DATA, BDAT), AUTH, QUIT or one it does not know: before that, the
plaintext phase may hold any number of EHLO, HELO, NOOP, RSET, HELP, VRFY and EXPN (each
forwarded, its reply passed on unchanged), and STARTTLS after any of them is still answered
by the gateway (RFC 3207 allows it anywhere in the plaintext phase): the STARTTLS it offered
is never withdrawn, and the MTA never sees a STARTTLS or TLS bytes.

The EHLO over TLS is answered by the gateway with the MTA's own reply to the last EHLO in
plaintext (STARTTLS left out): the MTA never saw the STARTTLS, so to it a second greeting is
just that, which some MTAs refuse (OpenSMTPD: ``503 5.5.1 Invalid command: Already
identified``).  Only when the MTA gave no EHLO reply before (HELO, a refusal, or STARTTLS
straight after the banner) does the greeting over TLS go to the MTA.

A4: bytes the client pipelines after its STARTTLS line, before the handshake, are an
injection attempt (CVE-2011-0411): the session is rejected, they never reach the MTA.  The
reply direction likewise: the MTA speaking unasked when a command is about to go to it ends
the session (its bytes would be read as that command's reply).

Half-close: the client's EOF (``client_closed``) reaches the MTA after the commands it sent
before it; the MTA's (``mta_closed``) reaches the client after the MTA's replies.

Events in: ``client_data``, ``mta_data``, ``client_closed``, ``mta_closed`` (any state), and
the shell's ``tls_done`` (only in HANDSHAKE: anything else is a ``LocalProtocolError``).
Commands out: SendPeer (to the MTA), SendClient, StartTlsServer, Relay, Reject,
ShutdownPeer, ShutdownClient.  Where each state may go: ``TRANSITIONS``, checked on every
move; which method reads an MTA reply in each state: ``Offload.ON_REPLY``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from .commands import Relay, Result, SendClient, SendPeer, ShutdownClient, ShutdownPeer
from .smtp import (
    LIMITS,
    STARTTLS_READY,
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    ReplyReader,
    edit_ehlo,
    take_line,
    verb,
)

MTA_UNASKED = "MTA sent a reply nobody asked for"

# Commands of the plaintext phase that leave it open: forwarded one at a time, their replies
# passed on unchanged, and the machine stays in charge (STARTTLS may still follow).
BEFORE_MAIL = frozenset({b"NOOP", b"RSET", b"HELP", b"VRFY", b"EXPN"})


@dataclass(frozen=True, slots=True)
class StartTlsServer:
    """Reply already queued (220); handshake as the server with the site's key, then feed
    ``tls_done``."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Tell the client ``reply``, close both; nothing more reaches the MTA."""

    reply: bytes
    reason: str


InboundCommand = (SendPeer | SendClient | StartTlsServer | Relay | Reject | ShutdownPeer
                  | ShutdownClient)


class OffloadState(Enum):
    BANNER = "banner"  # waiting for the MTA's greeting
    COMMAND = "command"  # waiting for the client's next command
    EHLO_REPLY = "ehlo_reply"  # the client's EHLO/HELO went to the MTA
    REPLY = "reply"  # a plaintext-phase command (BEFORE_MAIL) went to the MTA
    HANDSHAKE = "handshake"  # the shell does TLS with the client
    DONE = "done"  # relayed or rejected: bytes are the shell's business


St = OffloadState

# Where each state may go; checked on every move (anything else: LocalProtocolError).
TRANSITIONS: dict[OffloadState, frozenset[OffloadState]] = {
    St.BANNER: frozenset({St.COMMAND, St.DONE}),
    St.COMMAND: frozenset({St.EHLO_REPLY, St.REPLY, St.HANDSHAKE, St.DONE}),
    St.EHLO_REPLY: frozenset({St.COMMAND, St.DONE}),
    St.REPLY: frozenset({St.COMMAND, St.DONE}),
    St.HANDSHAKE: frozenset({St.COMMAND, St.DONE}),
    St.DONE: frozenset(),
}


@dataclass
class Offload:
    """The inbound machine for one session."""

    limits: Limits = LIMITS
    state: OffloadState = St.BANNER
    tls: bool = False
    result: Result = Result.PENDING
    reason: str = ""
    _client: bytearray = field(default_factory=bytearray)
    _mta: ReplyReader = field(init=False)
    _greet: bytes = b""
    _caps: Reply | None = None  # the MTA's 250 to the last greeting in plaintext, if EHLO
    _client_eof: bool = False
    _mta_eof: bool = False

    def __post_init__(self) -> None:
        self._mta = ReplyReader(self.limits)

    def _go(self, state: OffloadState) -> None:
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise LocalProtocolError(f"no move from {self.state.value} to {state.value}")
        self.state = state

    def _at(self, *states: OffloadState) -> bool:
        return self.state in states

    # -- events -------------------------------------------------------------------------
    def client_closed(self) -> list[InboundCommand]:
        if self._client_eof or self.state is St.DONE:
            return []
        self._client_eof = True
        return self._commands() if self.state is St.COMMAND else []

    def mta_closed(self) -> list[InboundCommand]:
        if self._mta_eof or self.state is St.DONE:
            return []
        self._mta_eof = True
        if self.state is St.HANDSHAKE:
            return []  # tls_done hands over, and the client hears of it then
        if self.result is Result.PENDING:
            self.result, self.reason = Result.PLAINTEXT, "MTA closed"
        return self._relay()

    def mta_data(self, data: bytes) -> list[InboundCommand]:
        self._mta.feed(data)
        out: list[InboundCommand] = []
        try:
            while self._at(*self.ON_REPLY) and (r := self._mta.next()):
                out += self.ON_REPLY[self.state](self, r)
        except RemoteProtocolError as exc:
            return [*out, *self._reject(f"MTA protocol error: {exc}", b"421 4.3.0")]
        # What is left unread after the replies: the same however the bytes were cut.
        if not self._at(St.DONE) and len(self._mta.buffer) > self.limits.held:
            return [*out, *self._reject("MTA sent too much unasked", b"421 4.3.0")]  # A5
        return out

    def client_data(self, data: bytes) -> list[InboundCommand]:
        if self.state is St.HANDSHAKE:
            return self._reject("data injected after STARTTLS", b"421 4.7.0")
        self._client += data
        out = self._commands() if self.state is St.COMMAND else []
        if not self._at(St.DONE) and len(self._client) > self.limits.held:
            return [*out, *self._reject("too much before the MTA answered", b"421 4.3.0")]
        return out

    def tls_done(self, ok: bool, reason: str) -> list[InboundCommand]:
        if self.state is not St.HANDSHAKE:
            raise LocalProtocolError(f"tls_done in state {self.state.value}")
        if not ok:
            self._go(St.DONE)
            self.result, self.reason = Result.DEFERRED, reason
            return [Reject(b"", reason)]  # nothing can be said: the TLS layer is broken
        if self._mta.buffer:
            # The MTA spoke unasked before or during the handshake: read after it, that would
            # be the reply to the client's first command over TLS (A4, the reply direction).
            return self._reject(MTA_UNASKED, b"421 4.3.0")
        self.tls, self.result, self.reason = True, Result.TLS, reason
        self._go(St.COMMAND)
        return self._relay() if self._mta_eof else self._commands()

    # -- the client's commands ------------------------------------------------------------
    def _commands(self) -> list[InboundCommand]:
        out: list[InboundCommand] = []
        try:
            while self.state is St.COMMAND and (
                    line := take_line(self._client, self.limits)) is not None:
                v = verb(line)
                if v in (b"EHLO", b"HELO") and self.tls and self._caps is not None:
                    # Answered here (see the module's docstring); the MTA goes on from its
                    # greeting in plaintext, and the rest is its business.
                    caps = self._caps
                    said = (edit_ehlo(caps, starttls=False) if v == b"EHLO"
                            else b"250 " + caps.lines[0] + b"\r\n")
                    return [*out, SendClient(said), *self._relay()]
                if v in (b"EHLO", b"HELO"):
                    if self._mta.buffer:  # see tls_done: it would be read as this reply
                        return out + self._reject(MTA_UNASKED, b"421 4.3.0")
                    self._go(St.EHLO_REPLY)
                    self._greet = v
                    out.append(SendPeer(line))
                    continue
                if v == b"STARTTLS" and not self.tls:
                    if self._client:
                        return out + self._reject("data pipelined after STARTTLS",
                                                  b"421 4.7.0")
                    if self._mta.buffer:  # see tls_done
                        return out + self._reject(MTA_UNASKED, b"421 4.3.0")
                    self._go(St.HANDSHAKE)
                    return [*out, SendClient(STARTTLS_READY), StartTlsServer()]
                if v in BEFORE_MAIL and not self.tls:
                    if self._mta.buffer:  # see tls_done
                        return out + self._reject(MTA_UNASKED, b"421 4.3.0")
                    self._go(St.REPLY)
                    out.append(SendPeer(line))
                    continue
                # Anything else: the client goes on (in plaintext, or over TLS without a new
                # EHLO): from here the bytes are the MTA's business.
                self._client[:0] = line
                if not self.tls:
                    self.result, self.reason = Result.PLAINTEXT, "client did not use STARTTLS"
                return out + self._relay()
        except RemoteProtocolError as exc:
            return out + self._reject(str(exc), b"500 5.5.2")
        if self.state is St.COMMAND and self._client_eof:
            # Nothing more will come (an unterminated line at the end is no command).
            self._client.clear()
            return out + self._relay()
        return out

    # -- the MTA's replies, one method per state (ON_REPLY) ---------------------------------
    def _banner_reply(self, r: Reply) -> list[InboundCommand]:
        self._go(St.COMMAND)
        if r.code != 220:
            return [SendClient(r.raw), *self._relay()]
        return [SendClient(r.raw), *self._commands()]

    def _ehlo_reply(self, r: Reply) -> list[InboundCommand]:
        if not self.tls:
            self._caps = r if r.code == 250 and self._greet == b"EHLO" else None
        if r.code != 250 or self._greet == b"HELO":
            # Refused, or HELO (no extensions to offer STARTTLS in): passed on as it is.
            if r.code == 250 and self.tls:
                return [SendClient(r.raw), *self._relay()]
            self._go(St.COMMAND)
            return [SendClient(r.raw), *self._commands()]
        edited = edit_ehlo(r, starttls=not self.tls)
        if self.tls:
            return [SendClient(edited), *self._relay()]
        self._go(St.COMMAND)
        return [SendClient(edited), *self._commands()]

    def _passed_reply(self, r: Reply) -> list[InboundCommand]:
        """The reply to NOOP, RSET, HELP, VRFY or EXPN: the client's business, unchanged."""
        self._go(St.COMMAND)
        return [SendClient(r.raw), *self._commands()]

    ON_REPLY: ClassVar[dict[OffloadState, Callable[[Offload, Reply], list[InboundCommand]]]] = {
        St.BANNER: _banner_reply,
        St.EHLO_REPLY: _ehlo_reply,
        St.REPLY: _passed_reply,
    }

    # -- ends ----------------------------------------------------------------------------------
    def _relay(self) -> list[InboundCommand]:
        self._go(St.DONE)
        if self.result is Result.PENDING:
            self.result, self.reason = Result.PLAINTEXT, "client did not use STARTTLS"
        rest = bytes(self._client)
        self._client.clear()
        leftover = bytes(self._mta.buffer)
        self._mta.buffer.clear()
        return [Relay(rest, leftover), *([ShutdownPeer()] if self._client_eof else []),
                *([ShutdownClient()] if self._mta_eof else [])]

    def _reject(self, why: str, code: bytes) -> list[InboundCommand]:
        self._go(St.DONE)
        self.result, self.reason = Result.DEFERRED, why
        self._client.clear()  # never reaches the MTA (A4)
        return [Reject(code + b" smtpgate: " + why.encode() + b"\r\n", why)]

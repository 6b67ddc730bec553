"""Sans-I/O envelope tracking for the outbound session after the TLS phase (RFC 5321,
RFC 2920 pipelining, RFC 3030 BDAT): which command each peer reply answers, where message
content starts and ends, and the gateway's own per-recipient replies kept in order.

Message content is never inspected for policy and never altered (A2): DATA content is
copied until the end-of-data sequence the peer will honour (CRLF "." CRLF); a BDAT chunk is
copied by its byte count.  Only commands are read.

A RCPT the gateway must refuse (its domain's MX for this destination asks for DANE the session
does not have) is answered by the gateway with ``450 4.7.5`` and never forwarded; replies reach
the MTA in exactly the order of its commands.  The shell decides recipients
(``CheckRecipient`` → ``recipient``); everything else is decided here.

Half-close: the MTA's EOF (``client_closed``) is passed on (ShutdownPeer) once every command
before it is out, undecided recipients included; the peer's (``peer_closed``) at once, after
the replies it sent (ShutdownClient).

Events in: ``client_data``, ``peer_data``, ``recipient``, ``client_closed``, ``peer_closed``.
Commands out: ToPeer, ToClient, CheckRecipient, ShutdownPeer, ShutdownClient.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from .commands import SendClient, SendPeer, ShutdownClient, ShutdownPeer
from .smtp import LIMITS, Limits, ReplyReader, take_line, verb

END_OF_DATA = b"\r\n.\r\n"


# The upgrade machines' own write commands: the shell carries out all of them alike.
ToPeer = SendPeer
ToClient = SendClient


@dataclass(frozen=True, slots=True)
class CheckRecipient:
    """Decide whether ``address`` may be forwarded; answer with ``recipient(ident, ...)``."""

    ident: int
    address: str
    domain: str


EnvelopeCommand = ToPeer | ToClient | CheckRecipient | ShutdownPeer | ShutdownClient


class Mode(Enum):
    COMMANDS = "commands"
    DATA = "data"  # copying DATA content up to the end-of-data sequence
    BDAT = "bdat"  # copying a BDAT chunk by count


@dataclass
class _Pending:
    """One client command, in order: forwarded (awaits the peer's reply) or answered by us."""

    verb: bytes
    line: bytes
    forwarded: bool = False
    held: bool = False  # a RCPT waiting for its verdict
    reply: bytes | None = None  # our own reply (not forwarded)
    ident: int = 0
    payload: bytearray = field(default_factory=bytearray)  # BDAT chunk held with it


def recipient_domain(line: bytes) -> tuple[str, str] | None:
    """(address, domain) from ``RCPT TO:<local@domain> ...``; None when there is none."""
    text = line.decode("ascii", "replace")
    start, end = text.find("<"), text.find(">")
    if start < 0 or end < start:
        return None
    address = text[start + 1:end]
    if "@" not in address:
        return None
    return address, address.rsplit("@", 1)[1].rstrip(".").lower()


def reverse_path(line: bytes) -> str:
    """The address of ``MAIL FROM:<address> ...``, lower case ("" for the null path)."""
    text = line.decode("ascii", "replace")
    start, end = text.find("<"), text.find(">")
    return text[start + 1:end].lower() if 0 <= start < end else ""


def defer_recipient(reason: str) -> bytes:
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in reason)[:300]
    return f"450 4.7.5 smtpgate: {clean}\r\n".encode("ascii")


@dataclass
class Envelope:
    mode: Mode = Mode.COMMANDS
    limits: Limits = LIMITS
    deferred: list[tuple[str, str]] = field(default_factory=list)  # (domain, reason)
    quit_answered: bool = False
    allowed: int = 0
    sender: str = ""  # the current transaction's MAIL FROM address
    _client: bytearray = field(default_factory=bytearray)
    _peer: ReplyReader = field(init=False)
    _order: deque[_Pending] = field(default_factory=deque)  # replies owed, in order
    _queue: deque[_Pending] = field(default_factory=deque)  # not yet forwarded (behind a hold)
    _tail: bytes = b""  # last bytes of DATA content, to find the end across chunks
    _bdat_left: int = 0
    _bdat_target: _Pending | None = None
    _await_data_reply: bool = False
    _next_ident: int = 0
    _client_eof: bool = False
    quit_sent: bool = False  # a QUIT went to the peer: nothing the MTA says matters after it
    _peer_eof_sent: bool = False  # ShutdownPeer said
    _client_eof_sent: bool = False  # ShutdownClient said

    def __post_init__(self) -> None:
        self._peer = ReplyReader(self.limits)

    # -- events -------------------------------------------------------------------------
    def client_data(self, data: bytes) -> list[EnvelopeCommand]:
        out: list[EnvelopeCommand] = []
        view = memoryview(data)
        while view:
            if self.mode is Mode.DATA:
                used, done = self._data_content(view)
                out.append(ToPeer(bytes(view[:used])))
                view = view[used:]
                if done:
                    self.mode = Mode.COMMANDS
                    self._order.append(_Pending(b".", b".", forwarded=True))
                continue
            if self.mode is Mode.BDAT:
                used = min(self._bdat_left, len(view))
                target = self._bdat_target
                if target is not None and not target.forwarded:
                    target.payload += view[:used]  # still behind an undecided RCPT
                else:
                    out.append(ToPeer(bytes(view[:used])))
                self._bdat_left -= used
                view = view[used:]
                if self._bdat_left == 0:
                    self.mode = Mode.COMMANDS
                continue
            self._client += view
            view = memoryview(b"")
            out += self._commands()
        return out

    def peer_data(self, data: bytes) -> list[EnvelopeCommand]:
        self._peer.feed(data)
        out: list[EnvelopeCommand] = []
        while (reply := self._peer.next()) is not None:
            if not self._order or not self._order[0].forwarded:
                # A reply nobody asked for (an idle 421 from the peer): the MTA's business.
                out.append(ToClient(reply.raw))
                continue
            pending = self._order.popleft()
            out.append(ToClient(reply.raw))
            if pending.verb == b"QUIT":
                self.quit_answered = True  # whatever happens to the sockets now, it ended well
            if pending.verb == b"DATA":
                self._await_data_reply = False
                if reply.code == 354:
                    self.mode = Mode.DATA
                    self._tail = b"\r\n"  # content starts at the beginning of a line
                out += self._drain_client()
            out += self._flush_own_replies()
        return out + self._pass_client_eof()

    def recipient(self, ident: int, allow: bool, domain: str, reason: str = "") -> list[
            EnvelopeCommand]:
        for p in self._queue:
            if p.ident == ident and p.held:
                p.held = False
                if allow:
                    self.allowed += 1
                else:
                    p.reply = defer_recipient(reason)
                    self.deferred.append((domain, reason))
                break
        return self._release() + self._pass_client_eof()

    def client_closed(self) -> list[EnvelopeCommand]:
        self._client_eof = True
        return self._pass_client_eof()

    def peer_closed(self) -> list[EnvelopeCommand]:
        if self._client_eof_sent:
            return []
        self._client_eof_sent = True
        # Replies still owed never come; our own replies queued behind them cannot be given
        # out of order.  The MTA sees the end of the connection (A1: never a 2xx unsent).
        return [ShutdownClient()]

    def _pass_client_eof(self) -> list[EnvelopeCommand]:
        """ShutdownPeer once nothing the MTA sent is still held: undecided recipients
        (with any BDAT chunk behind them) and bytes waiting for the reply to DATA."""
        if not self._client_eof or self._peer_eof_sent or self._queue \
                or self._await_data_reply:
            return []
        self._peer_eof_sent = True
        self._client.clear()  # an unterminated line at the end is no command
        return [ShutdownPeer(after_quit=self.quit_sent)]

    # -- client commands ----------------------------------------------------------------
    def _commands(self) -> list[EnvelopeCommand]:
        out: list[EnvelopeCommand] = []
        # Commands after DATA wait for its reply: only a 354 says content follows.
        while self.mode is Mode.COMMANDS and not self._await_data_reply:
            line = take_line(self._client, self.limits)
            if line is None:
                break
            v = verb(line)
            p = _Pending(v, line)
            self._queue.append(p)
            if v == b"MAIL":
                self.sender = reverse_path(line)
            if v == b"RCPT" and (rcpt := recipient_domain(line)) is not None:
                self._next_ident += 1
                p.ident, p.held = self._next_ident, True
                # What came before goes out first: a verdict may arrive at once.
                out += self._release()
                out.append(CheckRecipient(p.ident, *rcpt))
                continue
            if v == b"BDAT":
                out += self._release()
                out += self._bdat(line)
                continue
            if v == b"DATA":
                self._await_data_reply = True
        return out + self._release()

    def _bdat(self, line: bytes) -> list[EnvelopeCommand]:
        parts = line.split()
        # RFC 3030 chunk-size is 1*DIGIT; int() would also take "-2", "+2" or "1_0".
        if len(parts) < 2 or not parts[1].isdigit():
            return []  # malformed: the peer will say so; there is no chunk to copy
        size = int(parts[1])
        # The BDAT command just released or queued is the one its chunk belongs to.
        self._bdat_target = self._queue[-1] if self._queue else None
        self._bdat_left = size
        if size:
            self.mode = Mode.BDAT
            return self._drain_client()
        return []

    def _release(self) -> list[EnvelopeCommand]:
        """Forward queued commands in order, up to the first undecided RCPT."""
        out: list[EnvelopeCommand] = []
        while self._queue and not self._queue[0].held:
            p = self._queue.popleft()
            if p.reply is None:
                p.forwarded = True
                self.quit_sent = self.quit_sent or p.verb == b"QUIT"
                out.append(ToPeer(p.line + bytes(p.payload)))
                p.payload.clear()
            self._order.append(p)
        return out + self._flush_own_replies()

    def _flush_own_replies(self) -> list[EnvelopeCommand]:
        out: list[EnvelopeCommand] = []
        while self._order and not self._order[0].forwarded:
            p = self._order.popleft()
            assert p.reply is not None
            out.append(ToClient(p.reply))
        return out

    def _drain_client(self) -> list[EnvelopeCommand]:
        data = bytes(self._client)
        self._client.clear()
        return self.client_data(data) if data else []

    def _data_content(self, view: memoryview) -> tuple[int, bool]:
        """How much of ``view`` is content (end-of-data included), and whether it ended."""
        chunk = bytes(view)
        joined = self._tail + chunk
        at = joined.find(END_OF_DATA)
        if at < 0:
            self._tail = joined[-(len(END_OF_DATA) - 1):]
            return len(chunk), False
        end = at + len(END_OF_DATA) - len(self._tail)
        self._tail = b""
        return end, True


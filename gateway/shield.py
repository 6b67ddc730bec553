"""The smuggling shield, sans I/O: the legacy MTA behind the inbound gateway never sees an end
of data, or a command, that the client's side could not have meant.

SMTP smuggling (CVE-2023-51764/51765/51766) composes two servers that disagree on where a
message ends: the sender's side honours only CRLF "." CRLF, the receiving MTA also a dot
line ended by a bare LF or CR (``\\n.\\n``, ``\\n.\\r\\n``, ``\\r.\\r``), so what one side
relays as message content the other executes as a second transaction.  A second source of
the same confusion is content sent before the MTA's reply to DATA: if DATA fails, the MTA
reads that content as commands.  The MTA behind the gateway cannot be changed; the shield
sits in front of it and frames the client's stream the strict way (RFC 5321 2.3.8: lines end
in CRLF, nothing else; RFC 2920: DATA ends a pipelined group):

* ``normalize`` (the default, as Postfix 3.9's ``smtpd_forbid_bare_newline = normal``): a line
  ending in a bare LF or a bare CR reaches the MTA ending in CRLF, and a line beside such an
  ending that starts with "." reaches it with one more "." (dot-stuffed), so the MTA's end of
  data is exactly the client's CRLF "." CRLF and a smuggled "second message" stays content of
  the first.  Bytes after DATA wait for the MTA's reply: 354, they are content; any other
  reply, they would be read as commands: the session ends (554 5.5.0).  A message with CRLF
  line ends only passes byte for byte.
* ``reject`` (as ``smtpd_forbid_bare_newline = reject`` with
  ``smtpd_forbid_unauth_pipelining``): the first bare LF or CR, or a byte pipelined after
  DATA before its reply, ends the session: the client gets ``550 5.5.2`` / ``554 5.5.0``, the
  MTA's connection is closed (an unfinished message is discarded), nothing is delivered.
* ``off``: the shield is not used.

Command lines: a bare LF ending is made CRLF (``normalize``) or refused (``reject``); a bare
CR inside a command is refused in both (splitting it into two commands would be a guess).
BDAT chunks are copied by their byte count, untouched (binary content has no line ends to
misread).  With ``starttls: passthrough`` the shield reads the plaintext part: after the MTA
answers STARTTLS with 220 the bytes are TLS and pass unread (``Relay``).

Replies: the MTA's pass to the client unchanged as they come; the shield counts them to know
which command each answers (pipelining keeps them in order).

Events in: ``client_data``, ``mta_data``, ``client_closed``, ``mta_closed``.  Commands out:
SendPeer (to the MTA), SendClient, Refuse, Relay (stop reading: TLS follows), ShutdownPeer,
ShutdownClient.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from .commands import Relay, SendClient, SendPeer, ShutdownClient, ShutdownPeer
from .config import Smuggling
from .smtp import LIMITS, Limits, RemoteProtocolError, ReplyReader, take_line, verb


@dataclass(frozen=True, slots=True)
class Refuse:
    """Tell the client ``reply`` and close both connections: nothing more reaches the MTA
    (inside DATA it discards the message it never saw end)."""

    reply: bytes
    reason: str
    kind: str  # a metric label: bare_lf, bare_cr, pipelining, protocol


ShieldCommand = SendPeer | SendClient | Refuse | Relay | ShutdownPeer | ShutdownClient


class ShieldState(Enum):
    COMMANDS = "commands"  # the client's command lines
    DATA_REPLY = "data_reply"  # DATA went to the MTA: the client's bytes wait for its reply
    CONTENT = "content"  # after 354: message content up to CRLF "." CRLF
    BDAT = "bdat"  # a BDAT chunk, copied by count
    STARTTLS_REPLY = "starttls_reply"  # passthrough: STARTTLS went to the MTA
    DONE = "done"  # refused, or TLS between client and MTA: nothing read any more


Sh = ShieldState
_ENDING = re.compile(rb"[\r\n]")
DOT, CR = ord("."), ord("\r")


@dataclass
class Shield:
    """The client's stream toward the MTA, for one inbound session."""

    mode: Smuggling = Smuggling.NORMALIZE
    limits: Limits = LIMITS
    state: ShieldState = Sh.COMMANDS
    normalized: set[str] = field(default_factory=set)  # what was made strict (metric labels)
    refused: str = ""  # why the session was refused ("" when it was not)
    quit_answered: bool = False  # the MTA answered QUIT: a reset after it ends nothing
    _client: bytearray = field(default_factory=bytearray)  # unread commands, held bytes
    _mta: ReplyReader = field(init=False)
    _owed: deque[bytes] = field(default_factory=deque)  # verbs whose replies are owed
    _bdat_left: int = 0
    # Content framing: at the start of a line; the line ending before it was bare (LF or CR
    # alone); bytes of an undecided line start ("." or ".\r") or a CR waiting for its LF.
    _line_start: bool = True
    _after_bare: bool = False
    _hold: bytes = b""
    _client_eof: bool = False

    def __post_init__(self) -> None:
        self._mta = ReplyReader(self.limits)

    def _done(self) -> bool:
        # A method, not an inline test: the handlers change self.state behind mypy's back.
        return self.state is Sh.DONE

    # -- events -------------------------------------------------------------------------
    def client_data(self, data: bytes) -> list[ShieldCommand]:
        if self.state is Sh.DONE:
            return []
        if self.state in (Sh.DATA_REPLY, Sh.STARTTLS_REPLY):
            if self.state is Sh.DATA_REPLY and self.mode is Smuggling.REJECT:
                return self._refuse(b"554 5.5.0", "SMTP protocol synchronization: data "
                                    "before the reply to DATA", "pipelining")
            self._client += data
            if len(self._client) > self.limits.held:
                return self._refuse(b"421 4.3.0", "too much before the MTA answered",
                                    "protocol")
            return []
        return self._read(bytes(data))

    def mta_data(self, data: bytes) -> list[ShieldCommand]:
        if self.state is Sh.DONE:
            return []
        self._mta.feed(data)
        out: list[ShieldCommand] = []
        try:
            while not self._done() and (reply := self._mta.next()) is not None:
                out.append(SendClient(reply.raw))
                if not self._owed:
                    continue  # unasked (an idle 421): the client's business
                asked = self._owed.popleft()
                self.quit_answered = self.quit_answered or asked == b"QUIT"
                if asked == b"DATA" and self.state is Sh.DATA_REPLY:
                    out += self._data_answered(reply.code)
                elif asked == b"STARTTLS" and self.state is Sh.STARTTLS_REPLY:
                    out += self._starttls_answered(reply.code)
        except RemoteProtocolError as exc:
            return [*out, *self._refuse(b"421 4.3.0", f"MTA protocol error: {exc}",
                                        "protocol")]
        return out

    def client_closed(self) -> list[ShieldCommand]:
        if self.state is Sh.DONE or self._client_eof:
            return []
        self._client_eof = True
        if self.state in (Sh.DATA_REPLY, Sh.STARTTLS_REPLY):
            return []  # passed on once the held bytes are decided
        self._client.clear()  # an unterminated line at the end is no command
        return [ShutdownPeer()]

    def mta_closed(self) -> list[ShieldCommand]:
        if self.state is Sh.DONE:
            return []
        return [ShutdownClient()]

    # -- the client's stream ------------------------------------------------------------
    def _read(self, data: bytes) -> list[ShieldCommand]:
        out: list[ShieldCommand] = []
        while data and not self._done():
            if self.state is Sh.CONTENT:
                data = self._content(data, out)
            elif self.state is Sh.BDAT:
                used = min(self._bdat_left, len(data))
                out.append(SendPeer(data[:used]))
                self._bdat_left -= used
                data = data[used:]
                if self._bdat_left == 0:
                    self.state = Sh.COMMANDS
            elif self.state is Sh.COMMANDS:
                self._client += data
                data = b""
                out += self._commands()
            else:  # waiting for a reply: held
                self._client += data
                data = b""
        return out

    def _commands(self) -> list[ShieldCommand]:
        out: list[ShieldCommand] = []
        while self.state is Sh.COMMANDS:
            try:
                line = take_line(self._client, self.limits)
            except RemoteProtocolError as exc:
                return out + self._refuse(b"500 5.5.2", str(exc), "protocol")
            if line is None:
                return out
            body = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if b"\r" in body:
                return out + self._refuse(b"500 5.5.2", "bare <CR> in a command", "bare_cr")
            if not line.endswith(b"\r\n"):
                if self.mode is Smuggling.REJECT:
                    return out + self._refuse(b"550 5.5.2", "bare <LF> received", "bare_lf")
                self.normalized.add("bare_lf")
                line = body + b"\r\n"
            out.append(SendPeer(line))
            word = verb(line)
            self._owed.append(word)
            if word == b"DATA":
                self.state = Sh.DATA_REPLY
                if self._client and self.mode is Smuggling.REJECT:
                    return out + self._refuse(b"554 5.5.0", "SMTP protocol synchronization: "
                                              "data before the reply to DATA", "pipelining")
            elif word == b"STARTTLS":
                self.state = Sh.STARTTLS_REPLY
            elif word == b"BDAT":
                parts = line.split()
                # RFC 3030 chunk-size is 1*DIGIT (malformed: the MTA says so, no chunk).
                if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) > 0:
                    self._bdat_left = int(parts[1])
                    self.state = Sh.BDAT
                    rest = bytes(self._client)
                    self._client.clear()
                    return out + self._read(rest)
        return out

    def _data_answered(self, code: int) -> list[ShieldCommand]:
        held = bytes(self._client)
        self._client.clear()
        if code != 354:
            self.state = Sh.COMMANDS
            if held:
                # Sent as content before the reply; the MTA would read it as commands.
                return self._refuse(b"554 5.5.0", "SMTP protocol synchronization: data "
                                    "before the reply to DATA", "pipelining")
            return self._eof_if_closed()
        self.state = Sh.CONTENT
        self._line_start, self._after_bare, self._hold = True, False, b""
        return self._read(held) + self._eof_if_closed()

    def _starttls_answered(self, code: int) -> list[ShieldCommand]:
        held = bytes(self._client)
        self._client.clear()
        if code == 220:
            # From here the client and the MTA speak TLS: nothing to read.
            self.state = Sh.DONE
            return [Relay(held, b""), *([ShutdownPeer()] if self._client_eof else [])]
        self.state = Sh.COMMANDS
        return self._read(held) + self._eof_if_closed()

    def _eof_if_closed(self) -> list[ShieldCommand]:
        if self._client_eof and self.state is Sh.COMMANDS:
            self._client.clear()
            return [ShutdownPeer()]
        return []

    # -- message content ----------------------------------------------------------------
    def _content(self, data: bytes, out: list[ShieldCommand]) -> bytes:
        """Copies content from ``data`` into ``out``, strictly framed; returns what follows
        the end of data (commands), b"" while the content goes on or after a refusal."""
        buf = self._hold + data
        self._hold = b""
        sent = bytearray()
        i, n = 0, len(buf)
        while i < n:
            if self._line_start and buf[i] == DOT:
                # A line that starts with a dot: the end of data, a dot the client stuffed,
                # or one the MTA could misread: decided by the next one or two bytes.
                nxt = buf[i + 1:i + 3]
                if len(nxt) < 1 or nxt == b"\r":
                    self._hold = buf[i:]
                    break
                if nxt == b"\r\n":
                    if not self._after_bare:  # CRLF "." CRLF
                        out.append(SendPeer(bytes(sent + b".\r\n")))
                        self._owed.append(b".")  # the message's own reply (250 or 5xx)
                        self.state = Sh.COMMANDS
                        return buf[i + 3:]
                    sent += b"..\r\n"  # after a bare ending: content, stuffed
                    self._after_bare = False
                    i += 3
                    continue
                if nxt[:1] in (b"\r", b"\n"):  # "." ended by a bare CR or LF
                    kind = "bare_lf" if nxt[:1] == b"\n" else "bare_cr"
                    if self.mode is Smuggling.REJECT:
                        return self._refuse_content(sent, kind, out)
                    self.normalized.add(kind)
                    sent += b"..\r\n"
                    self._after_bare = True
                    i += 2
                    continue
                sent += b".." if self._after_bare else b"."
                self._line_start = False
                i += 1
                continue
            m = _ENDING.search(buf, i)
            if m is None:
                sent += buf[i:]
                self._line_start = False
                break
            j = m.start()
            if j > i:
                sent += buf[i:j]
                self._line_start = False
            if buf[j] == CR and j + 1 == n:
                self._hold = b"\r"  # its LF may come with the next read
                break
            if buf[j:j + 2] == b"\r\n":
                sent += b"\r\n"
                self._line_start, self._after_bare = True, False
                i = j + 2
                continue
            kind = "bare_cr" if buf[j] == CR else "bare_lf"
            if self.mode is Smuggling.REJECT:
                return self._refuse_content(sent, kind, out)
            self.normalized.add(kind)
            sent += b"\r\n"
            self._line_start, self._after_bare = True, True
            i = j + 1
        if sent:
            out.append(SendPeer(bytes(sent)))
        return b""

    def _refuse_content(self, sent: bytearray, kind: str,
                        out: list[ShieldCommand]) -> bytes:
        if sent:
            out.append(SendPeer(bytes(sent)))  # the MTA's close discards the unended message
        out += self._refuse(b"550 5.5.2", f"bare <{kind[5:].upper()}> received", kind)
        return b""

    # -- the end --------------------------------------------------------------------------
    def _refuse(self, code: bytes, why: str, kind: str) -> list[ShieldCommand]:
        self.state = Sh.DONE
        self.refused = kind
        self._client.clear()  # never reaches the MTA
        return [Refuse(code + b" smtpgate: " + why.encode() + b"\r\n", why, kind)]

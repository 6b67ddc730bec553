"""SMTP on the wire, sans I/O: reply framing (RFC 5321 4.2.1), command lines, EHLO
capabilities, the limits that bound them, and the two kinds of protocol error.

The machines (``gateway.upgrade``, ``gateway.offload``) and the envelope tracker
(``gateway.envelope``) read the wire through these; nothing here keeps session state.

Errors, as h11 draws the line: :class:`RemoteProtocolError` is the other side's fault (the
peer or the MTA broke SMTP: the session ends with a reply code and a log line);
:class:`LocalProtocolError` is ours (the shell fed a machine an event its state does not
accept): a bug, never a reply to anyone.
"""

from __future__ import annotations

from dataclasses import dataclass

STARTTLS_READY = b"220 2.0.0 Ready to start TLS\r\n"  # the gateway's own, to a STARTTLS

# Extensions whose absence after TLS would make the MTA's commands fail (5xx: a bounce):
# the MTA decided on them from the capabilities it was shown before TLS.
MATTERS = ("PIPELINING", "CHUNKING", "BINARYMIME", "8BITMIME", "SMTPUTF8", "DSN", "SIZE",
           "REQUIRETLS")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one side may make the gateway keep (A5); the machines take them as a
    parameter (the property tests shrink them so that short inputs cross them)."""

    line: int = 4096  # RFC 5321 says 512 for replies and commands; be lenient, but bounded
    reply_lines: int = 200
    held: int = 64 * 1024  # bytes held while the gateway decides (no message content)


LIMITS = Limits()


class ProtocolError(Exception):
    """SMTP was broken; catch one of the two kinds below, not this."""


class RemoteProtocolError(ProtocolError):
    """The peer or the MTA broke SMTP framing: their fault, answered with a reply code."""


class LocalProtocolError(ProtocolError):
    """The shell fed a machine an event that its state does not accept: our bug."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[bytes, ...]  # text after "ddd-" / "ddd "
    raw: bytes

    @property
    def text(self) -> str:
        return " / ".join(line.decode("ascii", "replace") for line in self.lines)


class ReplyReader:
    """Frames multi-line replies (RFC 5321 4.2.1) from a byte stream."""

    def __init__(self, limits: Limits = LIMITS) -> None:
        self.buffer = bytearray()
        self.limits = limits
        self._lines: list[bytes] = []
        self._raw = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next(self) -> Reply | None:
        while True:
            end = self.buffer.find(b"\n")
            # The bound holds however the line was cut into reads (with its end or not).
            if (end if end >= 0 else len(self.buffer)) > self.limits.line:
                raise RemoteProtocolError("reply line too long")
            if end < 0:
                return None
            line = bytes(self.buffer[:end + 1])
            del self.buffer[:end + 1]
            body = line.rstrip(b"\r\n")
            if len(body) < 3 or not body[:3].isdigit() or body[3:4] not in (b"", b" ", b"-"):
                raise RemoteProtocolError(f"malformed reply line {body[:40]!r}")
            if self._lines and int(body[:3]) != int(self._raw[:3]):
                raise RemoteProtocolError("reply code changed inside a multi-line reply")
            self._raw += line
            self._lines.append(body[4:])
            if len(self._lines) > self.limits.reply_lines:
                raise RemoteProtocolError("reply has too many lines")
            if body[3:4] != b"-":
                reply = Reply(int(body[:3]), tuple(self._lines), bytes(self._raw))
                self._lines, self._raw = [], bytearray()
                return reply


def take_line(buffer: bytearray, limits: Limits = LIMITS) -> bytes | None:
    """The next complete line (with its ending) from ``buffer``, or None; bounded."""
    end = buffer.find(b"\n")
    if (end if end >= 0 else len(buffer)) > limits.line:
        raise RemoteProtocolError("command line too long")
    if end < 0:
        return None
    line = bytes(buffer[:end + 1])
    del buffer[:end + 1]
    return line


def verb(line: bytes) -> bytes:
    return line.split(None, 1)[0].upper() if line.strip() else b""


def capabilities(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) → their parameters; the first line is the greeting."""
    caps: dict[str, str] = {}
    for line in reply.lines[1:]:
        word, _, params = line.decode("ascii", "replace").strip().partition(" ")
        if word:
            caps[word.upper()] = params.strip()
    return caps


def lost_capabilities(shown: dict[str, str], now: dict[str, str]) -> list[str]:
    """What the MTA was promised before TLS that the peer no longer offers after it."""
    lost = [k for k in MATTERS if k in shown and k not in now]
    if "SIZE" in shown and "SIZE" in now:
        before, after = _size(shown["SIZE"]), _size(now["SIZE"])
        if after and (before == 0 or after < before):
            lost.append("SIZE")  # a message the MTA may send would now be refused
    return lost


def _size(value: str) -> int:
    """SIZE parameter; 0 when no limit is stated (RFC 1870)."""
    return int(value) if value.isdigit() else 0


def edit_ehlo(reply: Reply, starttls: bool) -> bytes:
    """An EHLO reply with STARTTLS offered or withdrawn; the rest as the MTA or peer said."""
    # The first line is the greeting, never a keyword (a host may be called "starttls").
    lines = [reply.lines[0], *(line for line in reply.lines[1:]
                               if line.strip().upper() != b"STARTTLS")]
    if starttls:
        lines.append(b"STARTTLS")
    code = str(reply.code).encode()
    return b"".join(code + (b" " if i == len(lines) - 1 else b"-") + line + b"\r\n"
                    for i, line in enumerate(lines))

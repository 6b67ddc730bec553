"""Fake SMTP endpoints that record every byte, for the injection and smuggling trials.

:class:`Wire` is one TCP connection as a fake endpoint sees it: buffered SMTP reads, TLS on
memory BIOs (the raw bytes around STARTTLS stay visible), every byte read and written kept.
:class:`FakeServer` is a scripted SMTP server in a lab namespace (:class:`Script` says how it
behaves on a connection, :class:`Served` is what it saw and said); :func:`send_as` delivers
bytes in one segment, split, later or byte by byte."""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from gatelab.netlab import Netns

END_OF_DATA = b"\r\n.\r\n"
BYTE_GAP = 0.001  # between the sends of a byte-by-byte delivery (TCP_NODELAY: a segment each)
LATER = 0.05  # "later": long after the gateway took the 220 and started its handshake
READY = b"220 2.0.0 Ready to start TLS\r\n"
EHLO_LINE = b"EHLO mta.a.test\r\n"  # the sending MTA's greeting


def positive(reply: bytes | None) -> bool:
    """A 2xx or 3xx reply."""
    return reply is not None and reply[:1] in (b"2", b"3")


# -- a fake endpoint's view of one connection ---------------------------------------------

class Wire:
    """One TCP connection as a fake endpoint sees it: buffered SMTP reads, TLS on memory
    BIOs (the raw bytes around STARTTLS stay visible), every byte recorded."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.mark = -1  # a position in raw_in a dialogue notes for its judge
        self.buf = bytearray()  # application bytes read, not yet consumed
        self.raw_in = bytearray()  # every byte off the wire
        self.raw_out = bytearray()  # every byte put on the wire
        self.plain_in = bytearray()  # application bytes before TLS
        self.plain_out = bytearray()
        self.tls_in = bytearray()  # application bytes over TLS (decrypted)
        self.tls_out = bytearray()
        self.handshake = ""  # "" (not tried), "ok", or why it failed
        self.error = ""
        self.eof = False
        self._tls: ssl.SSLObject | None = None
        self._bio_in = ssl.MemoryBIO()
        self._bio_out = ssl.MemoryBIO()

    @property
    def secure(self) -> bool:
        return self.handshake == "ok"

    # -- raw --------------------------------------------------------------------------
    def recv_raw(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except OSError as exc:  # reset, timeout
            self.error = self.error or f"{type(exc).__name__}: {exc}"
            return b""
        self.raw_in += data
        return data

    def send_raw(self, data: bytes) -> bool:
        if not data:
            return True
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.error = self.error or f"{type(exc).__name__}: {exc}"
            return False
        self.raw_out += data
        return True

    def _flush_tls(self) -> bool:
        return self.send_raw(self._bio_out.read())

    # -- application bytes ------------------------------------------------------------
    def fill(self) -> bool:
        """More application bytes into ``buf``; False at EOF, reset, timeout or TLS error."""
        if self.eof or (self._tls is not None and not self.secure):
            return False  # ended, or TLS that never came up: see finish()
        while True:
            if self._tls is None:
                data = self.recv_raw()
                if not data:
                    self.eof = True
                    return False
                self.plain_in += data
                self.buf += data
                return True
            try:
                data = self._tls.read(65536)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:  # close_notify or an alert
                self.error = self.error or f"TLS: {exc}"
                self.eof = True
                return False
            else:
                if not data:
                    self.eof = True
                    return False
                self.tls_in += data
                self.buf += data
                return True
            self._flush_tls()
            raw = self.recv_raw()
            if not raw:
                self.eof = True
                return False
            self._bio_in.write(raw)

    def send(self, data: bytes) -> bool:
        if self._tls is None or not self.secure:
            ok = self.send_raw(data)
            if ok:
                self.plain_out += data
            return ok
        self.tls_out += data
        self._tls.write(data)
        return self._flush_tls()

    def line(self) -> bytes | None:
        while (end := self.buf.find(b"\n")) < 0:
            if not self.fill():
                return None
        line = bytes(self.buf[:end + 1])
        del self.buf[:end + 1]
        return line

    def reply(self) -> bytes | None:
        """One whole (multi-line) SMTP reply, or None at the end."""
        text = b""
        while (line := self.line()) is not None:
            text += line
            if line[3:4] != b"-":
                return text
        return None

    def exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self.fill():
                return None
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def data_content(self) -> bytes | None:
        """DATA content up to and including the first CRLF.CRLF, the CRLF that ended the
        DATA line counting as the first (RFC 5321 4.1.1.4): exactly what a receiver takes."""
        self.buf[0:0] = b"\r\n"
        start = 0
        while (at := self.buf.find(END_OF_DATA, start)) < 0:
            start = max(0, len(self.buf) - len(END_OF_DATA) + 1)
            if not self.fill():
                return None
        content = bytes(self.buf[2:at + len(END_OF_DATA)])
        del self.buf[:at + len(END_OF_DATA)]
        return content

    # -- TLS --------------------------------------------------------------------------
    def begin_tls(self, context: ssl.SSLContext, server_side: bool,
                  hostname: str | None = None) -> None:
        """Sets up TLS; bytes already read past the STARTTLS exchange go to the TLS layer,
        as a real stack's would.  A client's ClientHello is written at once."""
        leftover = bytes(self.buf)
        self.buf.clear()
        self._tls = context.wrap_bio(self._bio_in, self._bio_out, server_side=server_side,
                                     server_hostname=hostname)
        self._bio_in.write(leftover)
        if not server_side:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:  # the leftover was no TLS
                self.handshake = f"{type(exc).__name__}: {exc}"
            self._flush_tls()

    def handshake_done(self) -> bool:
        assert self._tls is not None
        while not self.handshake:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                if not self._flush_tls():
                    self.handshake = f"closed: {self.error}"
                    return False
                raw = self.recv_raw()
                if not raw:
                    self.handshake = f"closed: {self.error or 'EOF'}"
                    return False
                self._bio_in.write(raw)
                continue
            except ssl.SSLError as exc:
                self._flush_tls()  # the alert
                self.handshake = f"{type(exc).__name__}: {exc}"
                return False
            self._flush_tls()
            self.handshake = "ok"
        return self.secure

    def start_tls(self, context: ssl.SSLContext, server_side: bool,
                  hostname: str | None = None) -> bool:
        self.begin_tls(context, server_side, hostname)
        return self.handshake_done()

    def finish(self) -> None:
        """Half-close, read until the other side closes (everything recorded), close."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        while self.fill():
            pass
        while self.recv_raw():
            pass
        self.sock.close()


def send_as(w: Wire, data: bytes, mode: str, first: bytes = b"") -> bool:
    """``first`` then ``data``: in one segment, in two ("split"), in two 50 ms apart
    ("later"), or one byte per segment ("bytewise", ``first`` included).  Whether any of
    ``data`` went out (a gateway that notices the first injected byte may close at once,
    and the rest is refused)."""
    if mode == "segment" or not data:
        return bool(w.send(first + data)) and bool(data)
    if mode in ("split", "later"):
        if first and not w.send(first):
            return False
        if mode == "later":
            time.sleep(LATER)
        return bool(w.send(data))
    if mode == "bytewise":
        whole = first + data
        for i in range(len(whole)):
            if not w.send(whole[i:i + 1]):
                return i > len(first)
            time.sleep(BYTE_GAP)
        return True
    raise ValueError(mode)


def verb(line: bytes) -> bytes:
    return line.split(None, 1)[0].upper() if line.strip() else b""


def ehlo_reply(name: bytes, caps: list[bytes]) -> bytes:
    lines = [name, *caps]
    return b"".join(b"250" + (b" " if i == len(lines) - 1 else b"-") + text + b"\r\n"
                    for i, text in enumerate(lines))


# -- a fake SMTP server -------------------------------------------------------------------

@dataclass
class Script:
    """How a fake SMTP server behaves on one connection."""

    context: ssl.SSLContext | None = None  # offers and honours STARTTLS when set
    name: bytes = b"peer.test"
    caps: tuple[bytes, ...] = (b"PIPELINING", b"8BITMIME", b"CHUNKING")
    after_banner: bytes = b""  # injected behind the banner ...
    after_ehlo: bytes = b""  # ... or behind the first EHLO reply, delivered as `early_mode`
    early_mode: str = "segment"
    inject: bytes = b""  # plaintext behind the 220 to STARTTLS, delivered as `mode`
    mode: str = "segment"  # segment | split | later | bytewise | after-hello
    mail_reply: bytes | None = None  # instead of "250 2.1.0 sender ok"
    refuse_ehlo: bool = False  # EHLO gets 502: a server of RFC 821's, HELO only


@dataclass
class Served:
    """What a fake server saw and said on one connection."""

    wire: Wire
    script: Script
    commands: list[tuple[bytes, bool]] = field(default_factory=list)  # (line, over TLS)
    replies: list[tuple[bytes, bytes]] = field(default_factory=list)  # (verb, reply)
    contents: list[bytes] = field(default_factory=list)  # DATA content / BDAT chunks
    starttls_at: int = -1  # where in wire.raw_in the bytes after the STARTTLS line begin
    injected: bool = False  # some of the script's injection went out (a trial that never
    # sent any would pass whatever the gateway does)

    @property
    def after_starttls(self) -> bytes:
        """The first raw bytes the client sent after its STARTTLS line."""
        if self.starttls_at < 0:
            return b""
        return bytes(self.wire.raw_in[self.starttls_at:self.starttls_at + 64])

    @property
    def stream(self) -> bytes:
        """The application bytes of the connection's last phase (TLS if it got there)."""
        return bytes(self.wire.tls_in if self.wire.secure else self.wire.plain_in)

    def honest_tail(self) -> bytes:
        """The replies after the last EHLO/HELO reply: what an MTA behind a gateway that
        re-greets sees of this connection."""
        last = max((i for i, (v, _) in enumerate(self.replies) if v in (b"EHLO", b"HELO")),
                   default=0)
        return b"".join(text for _, text in self.replies[last + 1:])


def serve(out: Served) -> None:
    """An SMTP server that answers everything with numbered replies and records it all."""
    w, s = out.wire, out.script
    n = 0

    def answer(v: bytes, text: bytes) -> None:
        out.replies.append((v, text))
        w.send(text)

    banner = b"220 " + s.name + b" ESMTP fake\r\n"
    out.replies.append((b"", banner))
    out.injected |= send_as(w, s.after_banner, s.early_mode, banner)
    after_ehlo = s.after_ehlo  # once, behind the first EHLO reply
    while (line := w.line()) is not None:
        v = verb(line)
        out.commands.append((line, w.secure))
        n += 1
        if v == b"EHLO" and s.refuse_ehlo:
            answer(v, b"502 5.5.1 EHLO not implemented\r\n")
        elif v == b"EHLO":
            starttls = [b"STARTTLS"] if s.context is not None and not w.secure else []
            text = ehlo_reply(s.name, [*s.caps, *starttls])
            out.replies.append((v, text))
            out.injected |= send_as(w, after_ehlo, s.early_mode, text)
            after_ehlo = b""
        elif v == b"HELO":
            answer(v, b"250 " + s.name + b"\r\n")
        elif v == b"STARTTLS" and s.context is not None and not w.secure:
            out.starttls_at = len(w.raw_in) - len(w.buf)
            out.replies.append((v, READY))
            if s.mode == "after-hello":
                w.send(READY)
                w.fill()  # the ClientHello
                out.injected |= bool(s.inject) and bool(w.send(s.inject))
            else:
                out.injected |= send_as(w, s.inject, s.mode, READY)
            if not w.start_tls(s.context, server_side=True):
                return
        elif v == b"DATA":
            answer(v, b"354 3.0.0 go ahead #%d\r\n" % n)
            content = w.data_content()
            if content is None:
                return
            out.contents.append(content)
            answer(b".", b"250 2.0.0 queued as Q%d\r\n" % n)
        elif v == b"BDAT":
            parts = line.split()
            try:
                size = int(parts[1])
            except (IndexError, ValueError):
                answer(v, b"501 5.5.4 bad BDAT\r\n")
                continue
            chunk = w.exact(size)
            if chunk is None:
                return
            out.contents.append(chunk)
            last = b" last" if len(parts) > 2 and parts[2].upper() == b"LAST" else b""
            answer(v, b"250 2.0.0 %d octets%s #%d\r\n" % (size, last, n))
        elif v == b"MAIL":
            answer(v, s.mail_reply if s.mail_reply is not None
                   else b"250 2.1.0 sender ok #%d\r\n" % n)
        elif v == b"RCPT":
            answer(v, b"250 2.1.5 recipient ok #%d\r\n" % n)
        elif v in (b"RSET", b"NOOP"):
            answer(v, b"250 2.0.0 ok #%d\r\n" % n)
        elif v == b"QUIT":
            answer(v, b"221 2.0.0 bye\r\n")
            return
        else:
            answer(v, b"500 5.5.2 what? #%d\r\n" % n)


class FakeServer:
    """Accepts on ``host:25`` in ``ns``; each connection follows the next armed Script (or
    ``default``) on a thread of its own; what it saw goes to ``served`` when it closes."""

    def __init__(self, ns: Netns, host: str, default: Script, port: int = 25) -> None:
        self.sock = ns.listen(host, port)
        self.default = default
        self.armed: collections.deque[Script] = collections.deque()
        self.served: list[Served] = []
        self.errors: list[BaseException] = []
        self.active = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"fake {host}")
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._cond:
                script = self.armed.popleft() if self.armed else self.default
                self.active += 1
            threading.Thread(target=self._serve, args=(conn, script), daemon=True).start()

    def _serve(self, conn: socket.socket, script: Script) -> None:
        record = Served(Wire(conn), script)
        try:
            serve(record)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            record.wire.finish()
            with self._cond:
                self.served.append(record)
                self.active -= 1
                self._cond.notify_all()

    def arm(self, *scripts: Script) -> int:
        """The next connections follow ``scripts``; returns the mark for :meth:`settle`."""
        with self._cond:
            self.armed.clear()
            self.armed.extend(scripts)
            return len(self.served)

    def settle(self, mark: int, timeout: float = 10.0) -> list[Served]:
        """Once no connection is open: the connections served since ``mark``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.active:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("fake server connections still open")
                self._cond.wait(left)
            self.armed.clear()
            if self.errors:
                raise self.errors[0]
            return self.served[mark:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.sock.close()
        self._thread.join(5)

"""TLS on a leg's own TCP transport, through memory BIOs.

Why not ``loop.start_tls``: asyncio's and uvloop's SSL transports have no half-close.  Their
``close()`` sends close_notify and then *discards* whatever the peer still sends, so an MTA
that pipelines ``.`` and ``QUIT`` and then half-closes would lose the peer's ``250`` and
``221`` (a delivered message that the MTA retries: a duplicate).  TLS 1.3 (RFC 8446 6.1) and
OpenSSL allow reading on after one's own close_notify; owning the record layer lets the pump
pass a FIN on as close_notify + FIN and keep relaying the peer's replies until it closes.

This class does no I/O: bytes in, (plaintext, bytes to send) out.  ``gateway.relay.Leg``
carries the results to its transport.
"""

from __future__ import annotations

import ssl

READ_SIZE = 256 * 1024  # one SSL_read returns at most a record (16 KiB); this bounds a call


class TlsLayer:
    __slots__ = ("_in", "_out", "established", "obj", "peer_closed", "sent_close")

    def __init__(self, context: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None, session: ssl.SSLSession | None = None) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                    server_hostname=server_hostname, session=session)
        self.established = False
        self.peer_closed = False  # the peer's close_notify arrived
        self.sent_close = False  # ours went out

    def handshake(self, data: bytes = b"") -> bytes:
        """Feeds handshake bytes; returns what to send.  ``established`` says when it is
        done.  Raises ``ssl.SSLError`` when the handshake fails."""
        if data:
            self._in.write(data)
        try:
            self.obj.do_handshake()
            self.established = True
        except ssl.SSLWantReadError:
            pass
        return self._out.read()

    def receive(self, data: bytes = b"") -> tuple[bytes, bytes]:
        """Feeds records; returns (plaintext, bytes to send: post-handshake messages such
        as a KeyUpdate reply).  Sets ``peer_closed`` on the peer's close_notify."""
        if data:
            self._in.write(data)
        chunks: list[bytes] = []
        try:
            while not self.peer_closed:
                chunk = self.obj.read(READ_SIZE)
                if not chunk:
                    self.peer_closed = True  # close_notify before ours
                    break
                chunks.append(chunk)
        except ssl.SSLZeroReturnError:
            self.peer_closed = True  # close_notify after ours
        except ssl.SSLWantReadError:
            pass
        out = self._out.read() if self._out.pending else b""
        return b"".join(chunks) if len(chunks) != 1 else chunks[0], out

    def send(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self._out.read()

    def close_notify(self) -> bytes:
        """Our close_notify (once): the TLS half of a half-close.  Reading goes on."""
        if self.sent_close or not self.established:
            return b""
        self.sent_close = True
        # receive() leaves no complete record unread, so unwrap's own read (which would
        # discard application data) finds at most part of one and waits.
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # the peer's close_notify is still to come: exactly the half-close
        except ssl.SSLError:
            pass  # a broken session: the FIN that follows says enough
        return self._out.read()

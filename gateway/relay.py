"""A byte pump between two TCP legs, on asyncio Protocols.

Backpressure: each leg's transport has a write high-water mark; when a leg's outgoing buffer
rises above it, asyncio calls ``pause_writing`` on that leg and we stop *reading the other
leg* until it drains (``resume_writing``).  So a session holds at most the high-water mark
plus one socket read per direction, however slow either peer is.

Half-close: EOF from one leg becomes ``shutdown(SHUT_WR)`` on the other (``write_eof``,
issued after the buffered bytes are flushed; on a TLS leg close_notify first), and the other
direction goes on until its peer closes too.  While a machine reads the bytes (the tap), the
EOF is its event like any other (``tap(leg, b"")``): it passes the EOF on after whatever it
still holds.  The pump is finished when both directions have seen EOF, or when either leg is
lost.

TLS: a leg's TLS is its own record layer over the same TCP transport (``gateway.tls``), so a
leg keeps one transport for its whole life and TLS legs half-close like TCP ones.

Timeouts: idle (no byte read in either direction) and total, on one timer, re-armed lazily
so the hot path only stores a timestamp.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Callable
from enum import StrEnum
from typing import cast

from .tls import TlsLayer

_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(transport: asyncio.Transport) -> None:
    """Closes with a TCP RST instead of a FIN: the peer must not mistake it for a clean end."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already gone: abort() is all that is left
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class End(StrEnum):
    """How a pump finished; becomes the session outcome."""

    DONE = "relayed"  # both directions closed cleanly
    CLIENT_RESET = "client_reset"
    UPSTREAM_RESET = "upstream_reset"
    IDLE = "timeout_idle"
    TOTAL = "timeout_session"
    ABORTED = "aborted"  # the gateway ended it (drain deadline)
    DEFERRED = "deferred"  # the gateway answered the MTA with a 4xx (upgrade impossible)
    SMUGGLING = "refused_smuggling"  # inbound: the shield refused the client (gateway.shield)


# Ends whose last words (a 421, a 550) must reach the other side: closed, not reset.  An MTA
# whose connection closes inside DATA discards the message it never saw end.
_FLUSHED = frozenset({End.DONE, End.DEFERRED, End.SMUGGLING})


class Leg(asyncio.Protocol):
    """One TCP connection of the pump; forwards what it reads to its partner leg."""

    # Slots: two legs per session, thousands of sessions held idle.
    __slots__ = (
        "_flight",
        "_gated",
        "_handshake",
        "_paused_by_partner",
        "bytes_in",
        "detached",
        "eof",
        "held",
        "lost",
        "name",
        "partner",
        "pump",
        "tls",
        "transport",
        "wrote_eof",
    )

    def __init__(self, pump: Pump, name: str) -> None:
        self.pump = pump
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.partner: Leg | None = None
        self.bytes_in = 0
        self.eof = False  # this leg's peer closed its sending side
        self.wrote_eof = False  # we closed ours (FIN, after close_notify on TLS)
        self.lost = False
        self.held: list[bytes] = []  # read while nobody may act on it yet
        self.detached = False  # replaced by a new connection: its end is not the session's
        self.tls: TlsLayer | None = None
        self._handshake: asyncio.Future[None] | None = None
        self._gated = False  # handshake done, its outcome not yet acted on
        self._flight = b""  # the handshake's last flight, sent with the first record after it
        self._paused_by_partner = False

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=self.pump.high_water,
                                               low=self.pump.high_water // 4)
        # Nothing moves before the pump starts: both legs must exist first.
        self.transport.pause_reading()
        self.pump.leg_made(self)

    def data_received(self, data: bytes) -> None:
        if self.detached:
            return  # a replaced connection: whatever it still says is not the session's
        self.pump.touch()
        tls = self.tls
        if tls is not None:
            data = self._decrypt(data)
        if data:
            self.bytes_in += len(data)
            partner = self.partner
            assert partner is not None
            if partner.transport is None or not self.pump.started or self._gated \
                    or self.held:
                # uvloop starts reading right after connection_made, whatever that said;
                # hold this read and stop until the pump starts (or until the handshake's
                # owner has acted on its outcome: release()).
                self.held.append(data)
                assert self.transport is not None
                self.transport.pause_reading()
            else:
                self._deliver(data)
        if tls is not None and tls.peer_closed and not self._gated and not self.held:
            self._peer_closed()

    def _deliver(self, data: bytes) -> None:
        if self.pump.tap is not None:
            self.pump.tap(self, data)  # the upgrade phase: the session's machine reads it
            return
        partner = self.partner
        # A lost partner means the pump is finishing: nothing more can be delivered.
        if partner is not None and not partner.lost:
            partner.write(data)

    def eof_received(self) -> bool:
        if self._handshake is not None:
            self._handshake_failed(ConnectionResetError("connection closed in TLS handshake"))
            return False
        self._peer_closed()
        # Keep our own sending side open: the other direction may still have replies.
        return True

    def _peer_closed(self) -> None:
        if not self.eof:
            self.eof = True
            self.pump.leg_eof(self)

    def pause_writing(self) -> None:
        # Our outgoing buffer is full: stop reading whoever fills it.
        if self.partner is not None and self.partner.transport is not None:
            self.partner._paused_by_partner = True
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        partner = self.partner
        if partner is not None and partner.transport is not None and partner._paused_by_partner:
            partner._paused_by_partner = False
            if not partner.transport.is_closing() and not partner.held:
                partner.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._handshake is not None:
            self._handshake_failed(exc or ConnectionResetError("connection lost in TLS "
                                                               "handshake"))
            return
        if not self.detached:
            self.pump.leg_lost(self, exc)

    # -- writing -----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        t = self.transport
        if not data or t is None or t.is_closing() or self.wrote_eof:
            return
        if self.tls is not None:
            if not self.tls.established:
                return  # a failed handshake: nothing can be said on it
            data = self.tls.send(data)
            if self._flight:
                data, self._flight = self._flight + data, b""
        t.write(data)

    def _send_flight(self) -> None:
        t = self.transport
        if self._flight and t is not None:
            t.write(self._flight)
            self._flight = b""

    def write_eof(self, close_notify: bool = True) -> None:
        """Half-close toward this leg's peer, after what is buffered; reading goes on.  On
        TLS, close_notify first unless the caller knows the peer no longer reads (see
        ``gateway.commands.ShutdownPeer``)."""
        t = self.transport
        if self.wrote_eof or t is None or t.is_closing():
            return
        self.wrote_eof = True
        self._send_flight()
        if self.tls is not None and close_notify:
            t.write(self.tls.close_notify())
        t.write_eof()

    def close(self) -> None:
        """A clean close: buffered bytes flushed, close_notify on TLS."""
        t = self.transport
        if t is None or t.is_closing():
            return
        self._send_flight()
        if self.tls is not None and not self.wrote_eof:
            t.write(self.tls.close_notify())
        t.close()

    # -- TLS ---------------------------------------------------------------------------
    def start_tls(self, context: ssl.SSLContext, server_side: bool,
                  server_hostname: str | None,
                  session: ssl.SSLSession | None = None) -> asyncio.Future[None]:
        """TLS from here on this leg's connection.  The future resolves when the handshake
        is done (or raises why it failed); the leg then stays paused, holding anything it
        read, until ``release()``: the caller acts on the outcome first.

        Only bytes read from now on are TLS: the caller paused reading at STARTTLS, so no
        plaintext read after it exists here (A4)."""
        assert self.transport is not None and self.tls is None
        self._handshake = self.pump.loop.create_future()
        self.tls = TlsLayer(context, server_side, server_hostname, session)
        try:
            self.transport.write(self.tls.handshake())
        except ssl.SSLError as exc:
            self._handshake_failed(exc)
        else:
            self.transport.resume_reading()
        return self._handshake

    def _decrypt(self, data: bytes) -> bytes:
        """Records in, plaintext out (b"" while handshaking or when nothing is complete)."""
        tls, t = self.tls, self.transport
        assert tls is not None and t is not None
        try:
            if self._handshake is None:
                plain, out = tls.receive(data)
            else:
                flight = tls.handshake(data)
                if not tls.established:
                    t.write(flight)
                    return b""
                # A client's last flight (TLS 1.3: its Finished) goes out with the first
                # record the shell writes while acting on the outcome (after STARTTLS the
                # client speaks next), in one write and one segment; at the latest at
                # release(), so a peer never waits on it (the take-over speaks to the peer
                # only once the MTA has greeted over its own TLS).  A server's goes at once:
                # a TLS 1.2 client waits for its Finished, and a client that reads its
                # tickets before it speaks must get them.
                if tls.obj.server_side:
                    t.write(flight)
                else:
                    self._flight = flight
                # Done: the caller acts on the outcome before any byte of the new session.
                waiter, self._handshake = self._handshake, None
                self._gated = True
                t.pause_reading()
                plain, out = tls.receive()
                if not waiter.done():  # not given up on meanwhile (the handshake timeout)
                    waiter.set_result(None)
        except ssl.SSLError as exc:
            if self._handshake is not None:
                self._handshake_failed(exc)
            else:
                # The peer broke TLS after the handshake: no clean end, so a reset.
                self.pump.finish(self.pump.reset_by(self))
            return b""
        if out:
            self._send_flight()
            t.write(out)
        return plain

    def _handshake_failed(self, exc: BaseException) -> None:
        waiter, self._handshake = self._handshake, None
        # Its end is the machine's event (fallback or deferral), not the session's.
        self.detached = True
        if self.transport is not None:
            self.transport.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def release(self) -> None:
        """After the handshake: delivers what was read meanwhile, and reads on."""
        if self.detached:
            return  # the handshake failed, or the connection was replaced since
        self._gated = False
        self._send_flight()  # nothing was written while acting on the outcome
        while self.held and not self.pump.done.done():
            self._deliver(self.held.pop(0))
        if self.tls is not None and self.tls.peer_closed:
            self._peer_closed()
        t = self.transport
        if t is not None and not t.is_closing() and not self._paused_by_partner:
            t.resume_reading()

    # -- helpers -----------------------------------------------------------------------
    def buffered(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None and not t.is_closing() else 0


class Pump:
    """Couples two Legs.  ``done`` resolves with an End once the session is over."""

    __slots__ = (
        "_deadline",
        "_last",
                "_on_made",
        "_timer",
        "_want_start",
        "client",
        "done",
        "high_water",
        "idle_timeout",
        "loop",
        "quit_sent",
        "tap",
        "total_timeout",
        "upstream",
    )

    def __init__(self, high_water: int, idle_timeout: float, total_timeout: float,
                 on_made: Callable[[Leg], None] | None = None) -> None:
        self.high_water = high_water
        self.idle_timeout = idle_timeout
        self.total_timeout = total_timeout
        self.client = Leg(self, "client")
        self.upstream = Leg(self, "upstream")
        self.client.partner = self.upstream
        self.upstream.partner = self.client
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[End] = self.loop.create_future()
        self._on_made = on_made
        self._last = self.loop.time()
        # One timer for both limits (a timer per session is memory when thousands idle).
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # the session limit, absolute
        self._want_start = False
        # While set, bytes read go to this callback instead of across (the upgrade phase).
        self.tap: Callable[[Leg, bytes], None] | None = None
        # Set where a machine follows the commands: whether the MTA's QUIT went out.
        self.quit_sent: Callable[[], bool] | None = None

    def replace_upstream(self) -> Leg:
        """A new upstream leg (opportunistic fallback to a new connection); the old one is
        detached, so its closing does not end the session."""
        old = self.upstream
        old.detached = True
        if old.transport is not None and not old.transport.is_closing():
            old.transport.abort()
        new = Leg(self, "upstream")
        new.partner = self.client
        self.client.partner = new
        self.upstream = new
        return new

    def leg_made(self, leg: Leg) -> None:
        if self.done.done():
            # Connected after the session ended (the client left during the connect).
            assert leg.transport is not None
            leg.transport.abort()
            return
        if self._on_made is not None:
            self._on_made(leg)
        self._maybe_start()

    def start(self) -> None:
        """Both legs are connected: start moving bytes and the clocks.

        uvloop calls ``connection_made`` one loop iteration *after* ``create_connection``
        returns, so the real start waits until both legs have their transports: reading the
        client earlier would have nowhere to put its bytes.
        """
        self._want_start = True
        self._maybe_start()

    def _maybe_start(self) -> None:
        if (not self._want_start or self.started or self.done.done()
                or self.client.transport is None or self.upstream.transport is None):
            return
        for leg in (self.client, self.upstream):
            if leg.held and leg.partner is not None and leg.partner.transport is not None:
                data = b"".join(leg.held)
                leg.held.clear()
                if self.tap is not None:
                    self.tap(leg, data)
                else:
                    leg.partner.write(data)
        now = self.loop.time()
        self._last = now
        self._deadline = now + self.total_timeout
        self._timer = self.loop.call_at(min(now + self.idle_timeout, self._deadline),
                                         self._check_timeouts)
        for leg in (self.client, self.upstream):
            if leg.transport is not None and not leg.transport.is_closing():
                leg.transport.resume_reading()
        for leg in (self.client, self.upstream):
            if leg.eof:  # EOF that came before the pump started
                self.leg_eof(leg)

    @property
    def started(self) -> bool:
        return self._timer is not None

    def touch(self) -> None:
        self._last = self.loop.time()

    def _check_timeouts(self) -> None:
        now = self.loop.time()
        if now >= self._deadline:
            self.finish(End.TOTAL)
            return
        due = self._last + self.idle_timeout
        if now >= due:
            self.finish(End.IDLE)
        else:
            self._timer = self.loop.call_at(min(due, self._deadline), self._check_timeouts)

    def leg_eof(self, leg: Leg) -> None:
        if not self.started:
            return  # start() replays it
        if self.tap is not None:
            # A machine reads the bytes: the EOF is its event too, passed on after what it
            # still holds (``Leg.write_eof`` when it says so).
            self.tap(leg, b"")
        else:
            partner = leg.partner
            assert partner is not None
            partner.write_eof()
        if self.client.eof and self.upstream.eof:
            self.finish(End.DONE)

    def leg_lost(self, leg: Leg, exc: Exception | None) -> None:
        # Before finish(), a transport is only lost by the peer's doing: a reset, or a
        # clean close after its EOF.
        if exc is None and leg.eof:
            self.finish(End.DONE)
        elif leg is self.client and self.quit_sent is not None and self.quit_sent():
            # The MTA closed without waiting for the 221 (Postfix's smtp_skip_quit_response)
            # and its kernel answered the reply with a reset.  The session is complete: end
            # it as a close, after the peer's own, not with a reset it would count as a
            # cut-off session.
            if not leg.eof:
                leg.eof = True
                self.leg_eof(leg)
        else:
            self.finish(self.reset_by(leg))

    def closed_before_reset(self, outcome: str) -> bool:
        """Whether a reset came only after the other side had closed its sending side and
        that close was passed on: the conversation was over (an end-to-end TLS session,
        where no QUIT can be read, ends this way when a side closes with the other's last
        record unread)."""
        if outcome == End.CLIENT_RESET:
            return self.upstream.eof and self.client.wrote_eof
        if outcome == End.UPSTREAM_RESET:
            return self.client.eof and self.upstream.wrote_eof
        return False

    def reset_by(self, leg: Leg) -> End:
        """The end of a session that ``leg``'s peer cut off."""
        return End.CLIENT_RESET if leg is self.client else End.UPSTREAM_RESET

    def buffered(self) -> int:
        """Bytes held in user space for both directions."""
        return self.client.buffered() + self.upstream.buffered()

    def finish(self, end: End) -> None:
        """Ends the session.  A clean end flushes what is buffered (close); any other end is
        mirrored as a reset, so neither peer takes a cut-off session for a complete one."""
        if self.done.done():
            return
        if self._timer is not None:
            self._timer.cancel()
        for leg in (self.client, self.upstream):
            t = leg.transport
            if t is None or t.is_closing():
                continue
            if end in _FLUSHED:
                leg.close()  # the 421 of a deferral must reach the MTA: flush, no reset
            else:
                reset(t)
        if end in _FLUSHED:
            # close() waits for the buffer to drain; a peer that never reads must not keep
            # the socket forever.
            self.loop.call_later(self.idle_timeout, self._abort_lingering)
        self.done.set_result(end)

    def _abort_lingering(self) -> None:
        for leg in (self.client, self.upstream):
            if leg.transport is not None and not leg.lost:
                leg.transport.abort()

"""What the outbound upgrade and the inbound offload shells share: the pump's tap while a
machine reads the bytes, writes to either leg, the handoff, and the TLS handshake itself."""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING

from .relay import Leg
from .smtp import SendClient, SendPeer

if TYPE_CHECKING:
    from .session import Session

HANDSHAKE_ERRORS = (OSError, ssl.SSLError, TimeoutError, ConnectionError)


class TlsPhase:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.pump = session.pump
        self.tls: dict[str, str] = {}  # facts for the session line
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        """Before the pump starts: bytes go to the machine until it hands over."""
        self.pump.tap = self._tap

    def _tap(self, leg: Leg, data: bytes) -> None:
        if leg is self.pump.client:
            self.from_client(data)
        else:
            self.from_upstream(data)

    def from_client(self, data: bytes) -> None:
        raise NotImplementedError

    def from_upstream(self, data: bytes) -> None:
        raise NotImplementedError

    @staticmethod
    def write(leg: Leg, data: bytes) -> None:
        if data and leg.transport is not None and not leg.transport.is_closing():
            leg.transport.write(data)

    def forward(self, cmd: object) -> bool:
        """Carries out the commands both machines share; False for any other."""
        if isinstance(cmd, SendPeer):
            self.write(self.pump.upstream, cmd.data)
        elif isinstance(cmd, SendClient):
            self.write(self.pump.client, cmd.data)
        else:
            return False
        return True

    def hand_over(self, to_upstream: bytes, to_client: bytes) -> None:
        """The machine is done: from here the pump copies bytes."""
        self.pump.tap = None
        self.write(self.pump.upstream, to_upstream)
        self.write(self.pump.client, to_client)

    def pause(self, leg: Leg) -> None:
        """At STARTTLS: nothing read after this may be acted on as plaintext (A4)."""
        assert leg.transport is not None
        leg.transport.pause_reading()

    async def handshake(self, leg: Leg, context: ssl.SSLContext, server_side: bool,
                        server_hostname: str | None) -> ssl.SSLObject | None:
        """TLS on ``leg``; returns its SSLObject, or None when the session ended meanwhile.
        Raises one of HANDSHAKE_ERRORS when the handshake fails."""
        assert leg.transport is not None
        # A failed handshake closes the connection under us: that is the machine's event,
        # not the end of the session, so the leg is detached until it succeeds.
        leg.detached = True
        transport = await self._loop.start_tls(
            leg.transport, leg, context, server_side=server_side,
            server_hostname=server_hostname,
            ssl_handshake_timeout=self.session.config.timeouts.connect)
        leg.detached = False
        if self.pump.done.done() or transport is None:
            if transport is not None:
                transport.abort()
            return None
        leg.transport = transport
        transport.set_write_buffer_limits(high=self.pump.high_water,
                                          low=self.pump.high_water // 4)
        ssl_object: ssl.SSLObject = transport.get_extra_info("ssl_object")
        self.tls.update(tls_version=str(ssl_object.version()),
                        cipher=str((transport.get_extra_info("cipher") or ("-",))[0]),
                        tls_resumed="yes" if ssl_object.session_reused else "no")
        return ssl_object

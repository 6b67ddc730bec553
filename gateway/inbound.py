"""The inbound offload, carried out: drives ``gateway.smtp.Offload`` with the session's legs,
terminates TLS toward the client with the site's key, and hands over to the byte pump.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING

from .relay import End, Leg
from .smtp import InboundCommand, Offload, Reject, Relay, SendClient, SendPeer, StartTlsServer

if TYPE_CHECKING:
    from .session import Session


class InboundOffload:
    def __init__(self, session: Session, context: ssl.SSLContext) -> None:
        self.session = session
        self.pump = session.pump
        self.context = context
        self.machine = Offload()
        self.tls: dict[str, str] = {}
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        self.pump.tap = self._tap

    def _tap(self, leg: Leg, data: bytes) -> None:
        if leg is self.pump.client:
            self._apply(self.machine.client_data(data))
        else:
            self._apply(self.machine.mta_data(data))

    def _apply(self, commands: list[InboundCommand]) -> None:
        for cmd in commands:
            if self.pump.done.done():
                return
            if isinstance(cmd, SendPeer):
                self._write(self.pump.upstream, cmd.data)
            elif isinstance(cmd, SendClient):
                self._write(self.pump.client, cmd.data)
            elif isinstance(cmd, StartTlsServer):
                # Nothing the client sent after STARTTLS may be read as plaintext (A4).
                t = self.pump.client.transport
                assert t is not None
                t.pause_reading()
                self.session.gw.tasks.spawn(self._handshake(), name="inbound starttls")
            elif isinstance(cmd, Relay):
                self.pump.tap = None
                self._write(self.pump.upstream, cmd.to_peer)
                self._write(self.pump.client, cmd.to_client)
            elif isinstance(cmd, Reject):
                self._write(self.pump.client, cmd.reply)
                self.pump.finish(End.DEFERRED)

    @staticmethod
    def _write(leg: Leg, data: bytes) -> None:
        if data and leg.transport is not None and not leg.transport.is_closing():
            leg.transport.write(data)

    async def _handshake(self) -> None:
        leg = self.pump.client
        assert leg.transport is not None
        # Let the queued 220 reach the client before the TLS layer takes the transport.
        leg.detached = True  # a failed handshake closes it: the machine decides, not the close
        try:
            transport = await self._loop.start_tls(
                leg.transport, leg, self.context, server_side=True,
                ssl_handshake_timeout=self.session.config.timeouts.connect)
            leg.detached = False
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.tls["verify"] = "handshake failed"
            self._apply(self.machine.tls_done(False, f"handshake: {type(exc).__name__}"))
            self.pump.finish(End.CLIENT_RESET)
            return
        if self.pump.done.done() or transport is None:
            if transport is not None:
                transport.abort()
            return
        leg.transport = transport
        transport.set_write_buffer_limits(high=self.pump.high_water,
                                          low=self.pump.high_water // 4)
        ssl_object = transport.get_extra_info("ssl_object")
        version = str(ssl_object.version())
        self.tls.update(tls_version=version,
                        cipher=str((transport.get_extra_info("cipher") or ("-",))[0]),
                        tls_resumed="yes" if ssl_object.session_reused else "no")
        self._apply(self.machine.tls_done(True, version))

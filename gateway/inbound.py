"""The inbound offload, carried out: drives ``gateway.offload.Offload`` with the session's legs,
terminates TLS toward the client with the site's key, and hands over to the byte pump.
"""

from __future__ import annotations

import ssl

from .commands import Relay
from .config import Config
from .context import Context
from .offload import InboundCommand, Offload, Reject, StartTlsServer
from .phase import HANDSHAKE_ERRORS, TlsPhase
from .relay import End, Pump


class InboundOffload(TlsPhase):
    def __init__(self, ctx: Context, config: Config, pump: Pump,
                 context: ssl.SSLContext) -> None:
        super().__init__(ctx, config, pump)
        self.context = context
        self.machine = Offload()

    def from_client(self, data: bytes) -> None:
        self._apply(self.machine.client_data(data))

    def from_upstream(self, data: bytes) -> None:
        self._apply(self.machine.mta_data(data))

    def client_closed(self) -> None:
        self._apply(self.machine.client_closed())

    def upstream_closed(self) -> None:
        self._apply(self.machine.mta_closed())

    def _apply(self, commands: list[InboundCommand]) -> None:
        for cmd in commands:
            if self.pump.done.done():
                return
            if self.forward(cmd):
                continue
            if isinstance(cmd, StartTlsServer):
                self.pause(self.pump.client)
                self.ctx.tasks.spawn(self._handshake(), name="inbound starttls")
            elif isinstance(cmd, Relay):
                self.hand_over(cmd.to_peer, cmd.to_client)
            elif isinstance(cmd, Reject):
                self.write(self.pump.client, cmd.reply)
                self.pump.finish(End.DEFERRED)

    async def _handshake(self) -> None:
        try:
            ssl_object = await self.handshake(self.pump.client, self.context, True, None)
        except HANDSHAKE_ERRORS as exc:
            self.tls["verify"] = "handshake failed"
            why = f"handshake: {type(exc).__name__}: {exc}"[:200]
            if not self.pump.done.done():
                self._apply(self.machine.tls_done(False, why))  # a Reject: the pump finishes
            return
        if ssl_object is not None:
            self.tls.update(self.facts(ssl_object))
            self._apply(self.machine.tls_done(True, str(ssl_object.version())))
            self.pump.client.release()

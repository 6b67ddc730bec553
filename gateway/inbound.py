"""The inbound side, carried out: drives ``gateway.offload.Offload`` with the session's legs
(``starttls: offload``: TLS toward the client with the site's key), then, unless
``smuggling: off``, ``gateway.shield.Shield`` between the client and the MTA for the rest of
the session; with ``starttls: passthrough`` the shield reads from the first byte.
"""

from __future__ import annotations

import ssl

from .commands import Relay, ShutdownClient, ShutdownPeer
from .config import Config, Smuggling
from .context import Context
from .offload import InboundCommand, Offload, Reject, StartTlsServer
from .phase import HANDSHAKE_ERRORS, TlsPhase
from .relay import End, Leg, Pump
from .shield import Refuse, Shield, ShieldCommand


class InboundOffload(TlsPhase):
    def __init__(self, ctx: Context, config: Config, pump: Pump,
                 context: ssl.SSLContext | None, smuggling: Smuggling) -> None:
        super().__init__(ctx, config, pump)
        self.context = context
        # No context: STARTTLS is the MTA's (passthrough), and only the shield reads.
        self.machine = Offload() if context is not None else None
        self.smuggling = smuggling
        self.shield: Shield | None = None

    def start(self) -> None:
        super().start()
        if self.machine is None:
            self._shield_from(b"", b"")

    def from_client(self, data: bytes) -> None:
        if self.shield is not None:
            self._shield_apply(self.shield.client_data(data))
        elif self.machine is not None:
            self._apply(self.machine.client_data(data))

    def from_upstream(self, data: bytes) -> None:
        if self.shield is not None:
            self._shield_apply(self.shield.mta_data(data))
        elif self.machine is not None:
            self._apply(self.machine.mta_data(data))

    def client_closed(self) -> None:
        if self.shield is not None:
            self._shield_apply(self.shield.client_closed())
        elif self.machine is not None:
            self._apply(self.machine.client_closed())

    def upstream_closed(self) -> None:
        if self.shield is not None:
            self._shield_apply(self.shield.mta_closed())
        elif self.machine is not None:
            self._apply(self.machine.mta_closed())

    def _apply(self, commands: list[InboundCommand]) -> None:
        assert self.machine is not None
        for cmd in commands:
            if self.pump.done.done():
                return
            if self.shield is not None and isinstance(cmd, ShutdownPeer | ShutdownClient):
                # After the hand-over the shield owns the streams: an EOF follows what it
                # still holds.
                self._shield_apply(self.shield.client_closed() if isinstance(cmd, ShutdownPeer)
                                   else self.shield.mta_closed())
                continue
            if self.forward(cmd):
                continue
            if isinstance(cmd, StartTlsServer):
                self.pause(self.pump.client)
                self.ctx.tasks.spawn(self._handshake(), name="inbound starttls")
            elif isinstance(cmd, Relay):
                if self.smuggling is Smuggling.OFF:
                    self.hand_over(cmd.to_peer, cmd.to_client)
                else:
                    self._shield_from(cmd.to_peer, cmd.to_client)
            elif isinstance(cmd, Reject):
                self.write(self.pump.client, cmd.reply)
                self.pump.finish(End.DEFERRED)

    def _shield_from(self, to_mta: bytes, to_client: bytes) -> None:
        """From here the shield reads both streams (the pump's tap stays on)."""
        shield = self.shield = Shield(self.smuggling)
        self._shield_apply(shield.mta_data(to_client))
        self._shield_apply(shield.client_data(to_mta))

    def _shield_apply(self, commands: list[ShieldCommand]) -> None:
        for cmd in commands:
            if self.pump.done.done():
                return
            if self.forward(cmd):
                continue
            if isinstance(cmd, Relay):  # TLS between client and MTA (passthrough)
                self.hand_over(cmd.to_peer, cmd.to_client)
            elif isinstance(cmd, Refuse):
                self.write(self.pump.client, cmd.reply)
                self.reason = f"smuggling: {cmd.reason}"
                self.pump.finish(End.SMUGGLING)

    async def _handshake(self) -> None:
        assert self.context is not None and self.machine is not None
        leg: Leg = self.pump.client
        try:
            ssl_object = await self.handshake(leg, self.context, True, None)
        except HANDSHAKE_ERRORS as exc:
            self.tls["verify"] = "handshake failed"
            why = f"handshake: {type(exc).__name__}: {exc}"[:200]
            if not self.pump.done.done():
                self._apply(self.machine.tls_done(False, why))  # a Reject: the pump finishes
            return
        if ssl_object is not None:
            self.tls.update(self.facts(ssl_object))
            self._apply(self.machine.tls_done(True, str(ssl_object.version())))
            leg.release()

"""What the outbound upgrade and the inbound offload shells share: the pump's tap while a
machine reads the bytes, writes to either leg, the handoff, and the TLS handshake itself."""

from __future__ import annotations

import asyncio
import ssl

from .commands import SendClient, SendPeer, ShutdownClient, ShutdownPeer
from .config import Config
from .context import Context
from .relay import Leg, Pump

HANDSHAKE_ERRORS = (OSError, ssl.SSLError, TimeoutError, ConnectionError)


class TlsPhase:
    """Receives the process's context, the session's config snapshot and its pump; what it
    needs of the session beyond that comes as callbacks (see the subclasses)."""

    def __init__(self, ctx: Context, config: Config, pump: Pump) -> None:
        self.ctx = ctx
        self.config = config
        self.pump = pump
        self.tls: dict[str, str] = {}  # facts for the session line
        self.reason = ""  # why the session ended abnormally, for its line

    def start(self) -> None:
        """Before the pump starts: bytes go to the machine until it hands over."""
        self.pump.tap = self._tap

    def _tap(self, leg: Leg, data: bytes) -> None:
        """The pump's bytes while the machine reads them; b"" is that leg's EOF."""
        if leg is self.pump.client:
            if data:
                self.from_client(data)
            else:
                self.client_closed()
        elif data:
            self.from_upstream(data)
        else:
            self.upstream_closed()

    def from_client(self, data: bytes) -> None:
        raise NotImplementedError

    def from_upstream(self, data: bytes) -> None:
        raise NotImplementedError

    def client_closed(self) -> None:
        raise NotImplementedError

    def upstream_closed(self) -> None:
        raise NotImplementedError

    @staticmethod
    def write(leg: Leg, data: bytes) -> None:
        leg.write(data)

    def forward(self, cmd: object) -> bool:
        """Carries out the commands both machines share; False for any other."""
        if isinstance(cmd, SendPeer):
            self.write(self.pump.upstream, cmd.data)
        elif isinstance(cmd, SendClient):
            self.write(self.pump.client, cmd.data)
        elif isinstance(cmd, ShutdownPeer):
            self.pump.upstream.write_eof(close_notify=not cmd.after_quit)
        elif isinstance(cmd, ShutdownClient):
            self.pump.client.write_eof()
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
                        server_hostname: str | None,
                        session: ssl.SSLSession | None = None) -> ssl.SSLObject | None:
        """TLS on ``leg`` (paused by the caller, see ``pause``); returns its SSLObject, or
        None when the session ended meanwhile.  Raises one of HANDSHAKE_ERRORS when the
        handshake fails.  The leg then holds what it reads until ``leg.release()``: call it
        once the outcome is acted on."""
        waiter = leg.start_tls(context, server_side, server_hostname, session)
        async with asyncio.timeout(self.config.timeouts.connect):
            await waiter
        if self.pump.done.done() or leg.tls is None:
            return None
        return leg.tls.obj

    @staticmethod
    def facts(ssl_object: ssl.SSLObject, prefix: str = "") -> dict[str, str]:
        """What the session line says of one TLS connection."""
        return {f"{prefix}tls_version": str(ssl_object.version()),
                f"{prefix}cipher": str((ssl_object.cipher() or ("-",))[0]),
                f"{prefix}tls_resumed": "yes" if ssl_object.session_reused else "no"}

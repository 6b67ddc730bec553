"""One intercepted connection, accept to close: admission, the upstream leg, the pump, and
the summary line.  Pure decisions (what to refuse, what to tell the MTA) live in
``gateway.admission``; this module carries them out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from . import admission
from .commands import Result
from .config import (
    ClientAddress,
    Config,
    Direction,
    Endpoint,
    FailureSignal,
    Listener,
    Smuggling,
    SourceAddress,
    StartTls,
)
from .context import Context
from .inbound import InboundOffload
from .logs import event, session_line, session_log
from .netfilter import (
    InterceptError,
    connect,
    local_socket_mark,
    original_destination,
    sock_endpoint,
    socket_mark,
    upstream_socket,
)
from .outbound import OutboundUpgrade
from .planning import Planner
from .policy import Action, Plan
from .proxyproto import v2_header
from .relay import End, Leg, Pump, reset
from .shield import Shield
from .upgrade import Upgrade, mta_starttls, reason_label


class Session:
    __slots__ = (
        "_ended",
        "_failure",
        "_own_addr",
        "_task",
        "client",
        "client_text",
        "config",
        "ctx",
        "destination",
        "destination_text",
        "direction",
        "listener",
        "planner",
        "pump",
        "reason",
        "started",
        "upgrade",
        "upstream",
    )

    def __init__(self, ctx: Context, listener: Listener) -> None:
        self.ctx = ctx
        self.config: Config = ctx.config  # the config at accept time, for the whole session
        self.listener = listener
        self.direction = listener.direction
        t = self.config.timeouts
        self.pump = Pump(self.config.limits.buffer_bytes, t.idle, t.session,
                         on_made=self._leg_made)
        self.started = time.monotonic()
        self.client: Endpoint | None = None
        self.destination: Endpoint | None = None
        self.upstream: Endpoint | None = None
        self.reason = ""
        # Formatted once: task names and the summary line would otherwise format each
        # address several times per session (ipaddress's str is slow on the hot path).
        self.client_text = "-"
        self.destination_text = "-"
        self._own_addr: tuple[str, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.planner: Planner | None = None  # outbound only
        self.upgrade: OutboundUpgrade | InboundOffload | None = None
        self._ended = False
        self._failure = ""  # the last connect failure's label

    # -- accept ------------------------------------------------------------------------
    def _leg_made(self, leg: Leg) -> None:
        if leg is self.pump.client:
            self._accepted()

    def _accepted(self) -> None:
        transport = self.pump.client.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        if peer is None:
            # Reset between the kernel's accept and ours: there is no one to answer.
            transport.abort()
            self._summary(End.CLIENT_RESET.value)
            return
        self.client = sock_endpoint(peer)
        self.client_text = str(self.client)
        ctx = self.ctx
        try:
            self.destination = original_destination(sock, self.listener.mode)
        except InterceptError as exc:
            if self.direction is Direction.OUTBOUND:
                self._refuse(admission.Refusal.NO_DESTINATION, str(exc))
                return
            # Inbound forwards to its configured MTAs whatever was asked: the original
            # destination is only for the log, and a client sent here without NAT is fine.
            self.destination = sock_endpoint(sock.getsockname())
        self.destination_text = str(self.destination)
        own_mark = self.config.upstream.mark
        client_mark = socket_mark(sock)  # the SYN's, with net.ipv4.tcp_fwmark_accept=1
        if own_mark and client_mark != own_mark and ctx.is_local(self.client.host):
            # From this host: ask the kernel for the connecting socket's mark (another
            # worker's upstream socket is not in our own_upstreams).
            client_mark = local_socket_mark(self.client, self.destination) or client_mark
        verdict = admission.admit(
            active=len(ctx.sessions),
            max_sessions=self.config.limits.max_sessions,
            direction=self.direction,
            client=self.client,
            destination=self.destination,
            own_mark=own_mark,
            client_mark=client_mark,
            own_upstreams=ctx.own_upstreams,
            is_gateway=ctx.is_gateway_endpoint,
        )
        if verdict is not None:
            self._refuse(verdict, "")
            return
        ctx.session_started(self)
        ctx.metrics.child(ctx.metrics.active, self.direction).inc()
        self._task = ctx.tasks.spawn(self._run(),
                                    name=f"session {self.client_text}->{self.destination_text}")
        if self.direction is Direction.OUTBOUND:
            self.planner = Planner(ctx, self.config, self.destination)
            # After the session task's first step: the upstream connect goes out before
            # any planning work is done, and planning runs while the SYN is in flight.
            ctx.loop.call_soon(self._start_planning)

    def _start_planning(self) -> None:
        if self.planner is not None and not self.pump.done.done():
            self.planner.start()  # unless nothing is left to plan for

    @property
    def plan(self) -> Plan | None:
        return self.planner.plan if self.planner is not None else None

    def _refuse(self, refusal: admission.Refusal, detail: str) -> None:
        transport = self.pump.client.transport
        assert transport is not None
        self.reason = detail or refusal.text
        transport.write(refusal.reply)
        transport.close()
        self._summary(refusal.outcome)

    # -- upstream and relay ------------------------------------------------------------
    def _targets(self) -> tuple[Endpoint, ...]:
        if self.direction is Direction.INBOUND:
            return self.listener.upstreams  # configured MTAs only, whatever was asked (A6)
        assert self.destination is not None
        return (self.destination,)

    async def _run(self) -> None:
        """Connects and starts the pump, then returns: an idle session holds no task and
        no coroutine frame (measured: a large part of its memory); the pump's ``done``
        callback ends it."""
        # A client that resets while we are still connecting ends the session at once.
        self.pump.done.add_done_callback(self._pump_done)
        try:
            connected = await self._connect()
            if not connected:
                self._signal_failure()
                self._end("upstream_failed")
                return
            planner = self.planner
            if planner is not None:
                planner.start()  # normally done already, while connecting
            passthrough = planner is not None and planner.plan is not None \
                and planner.plan.action is Action.PASSTHROUGH
            if planner is not None and not passthrough:
                assert self.client is not None and self.destination is not None \
                    and self.upstream is not None
                self.upgrade = OutboundUpgrade(
                    self.ctx, self.config, self.pump,
                    mta_starttls=self.listener.mta_starttls_for(self.client.host),
                    destination=self.destination, upstream=self.upstream,
                    when_planned=planner.when_planned, connect_leg=self.connect_leg)
                self.upgrade.start()
            elif self.direction is Direction.INBOUND:
                offload = (self.listener.starttls is StartTls.OFFLOAD
                           and self.ctx.tls_server is not None)
                smuggling = self.listener.smuggling
                if offload or smuggling is not Smuggling.OFF:
                    context = self.ctx.tls_server.get() if offload and self.ctx.tls_server \
                        else None
                    self.upgrade = InboundOffload(self.ctx, self.config, self.pump, context,
                                                  smuggling)
                    self.upgrade.start()
            self.pump.start()
        except asyncio.CancelledError:
            if not self.pump.done.done():
                self._end(End.ABORTED.value)
                raise
            self._end(self.pump.done.result().value)
            return
        except BaseException:
            self.pump.finish(End.ABORTED)
            self._end(End.ABORTED.value)
            raise
        if self.pump.done.done():
            self._end(self.pump.done.result().value)
        else:
            self.pump.done.add_done_callback(lambda done: self._end(done.result().value))

    def _shield_facts(self, shield: Shield, fields: dict[str, object]) -> None:
        """The smuggling shield's part of the session line and its metric (once a kind)."""
        m = self.ctx.metrics
        if shield.refused:
            fields["smuggling"] = f"refused {shield.refused}"
            m.child(m.smuggling, "refused", shield.refused).inc()
        elif shield.normalized:
            kinds = sorted(shield.normalized)
            fields["smuggling"] = "normalized " + ",".join(kinds)
            for kind in kinds:
                m.child(m.smuggling, "normalized", kind).inc()

    def _end(self, end: str) -> None:
        if self._ended:
            return
        self._ended = True
        if self.planner is not None:
            self.planner.cancel()
        self._unregister_own()
        self.ctx.session_ended(self)
        self.ctx.metrics.child(self.ctx.metrics.active, self.direction).dec()
        self._summary(end)

    async def _connect(self) -> bool:
        failure = ""
        for target in self._targets():
            failure = await self._connect_one(target, self.pump.upstream)
            if not failure:
                self.upstream = target
                self.reason = ""  # an earlier target's failure is not this session's outcome
                return True
        self.reason = self.reason or failure
        self._failure = failure
        return False

    async def connect_leg(self, leg: Leg) -> str:
        """A new connection to the same upstream (the opportunistic fallback): "" when
        made, else why not."""
        assert self.upstream is not None
        if not await self._connect_one(self.upstream, leg):
            return ""
        return self.reason or "connect"

    async def _connect_one(self, target: Endpoint, leg: Leg) -> str:
        """Connects ``leg`` to ``target``; returns "" or the failure's metric label."""
        loop = self.ctx.loop
        cfg = self.config
        source = cfg.upstream.source_ipv6 if target.host.version == 6 \
            else cfg.upstream.source_ipv4
        # Inbound: the MTA sees the client's own address; outbound: the peer sees the MTA's.
        transparent = (self.listener.client_address is ClientAddress.TRANSPARENT
                       or self.listener.source_address is SourceAddress.CLIENT)
        avoid = 0
        if transparent:
            assert self.client is not None
            source, avoid = self.client.host, self.client.port
        try:
            sock = upstream_socket(target, cfg.upstream.mark, source, transparent=transparent,
                                   avoid_port=avoid)
        except (OSError, InterceptError) as exc:
            failure = admission.classify_connect_error(exc)
            self._connect_failed(target, failure, exc)
            return failure
        try:
            async with asyncio.timeout(cfg.timeouts.connect):
                await connect(sock, target, self._register_own)
            if self.listener.client_address is ClientAddress.PROXY_PROTOCOL:
                assert self.client is not None and self.destination is not None
                # First bytes on a fresh socket: a few dozen, the send buffer takes them.
                sock.send(v2_header(self.client, self.destination))
            await loop.create_connection(lambda: leg, sock=sock)
        except BaseException as exc:
            sock.close()
            self._unregister_own()
            if not isinstance(exc, OSError | TimeoutError):
                raise
            failure = admission.classify_connect_error(exc)
            self._connect_failed(target, failure, exc)
            return failure
        return ""

    def _register_own(self, addr: tuple[str, int]) -> None:
        self._unregister_own()  # a fallback connection replaces the first
        self._own_addr = addr
        self.ctx.own_upstreams.add(addr)

    def _unregister_own(self) -> None:
        if self._own_addr is not None:
            self.ctx.own_upstreams.discard(self._own_addr)
            self._own_addr = None

    def _connect_failed(self, target: Endpoint, reason: str, exc: BaseException) -> None:
        self.ctx.metrics.child(self.ctx.metrics.connect_failures, self.direction, reason).inc()
        errno_ = getattr(exc, "errno", None)
        detail = os.strerror(errno_) if errno_ else "timed out" if isinstance(
            exc, TimeoutError) else type(exc).__name__
        self.reason = f"{reason}: {target} ({detail})"
        event(session_log, "upstream", logging.DEBUG, target=str(target), reason=reason,
              error=detail)

    def _signal_failure(self) -> None:
        """Tells the MTA the way it already understands: see docs/architecture.md."""
        transport = self.pump.client.transport
        if transport is None or transport.is_closing():
            return
        if self.config.upstream.on_failure is FailureSignal.RESET:
            reset(transport)
        else:
            transport.write(admission.unreachable_reply(self.reason, self._failure))
            transport.close()

    def _pump_done(self, _: object) -> None:
        if self.upstream is None and self._task is not None and not self._task.done():
            self._task.cancel()  # still connecting: the task holds the socket

    def abort(self) -> None:
        """Drain deadline passed: end now."""
        self.pump.finish(End.ABORTED)

    def buffered(self) -> int:
        return self.pump.buffered()

    # -- the one line per session ------------------------------------------------------
    def _summary(self, outcome: str) -> None:
        duration = time.monotonic() - self.started
        # The tracker that read the commands (outbound envelope, inbound shield), if any.
        tracker = getattr(self.upgrade, "envelope", None) or getattr(self.upgrade, "shield", None)
        if outcome in (End.CLIENT_RESET, End.UPSTREAM_RESET) and tracker is not None \
                and tracker.quit_answered:
            # A reset after QUIT was answered (MTAs close without waiting for our close, or
            # TLS's close_notify): the session was complete.
            outcome = End.DONE.value
        elif self.pump.closed_before_reset(outcome):
            # Unread bytes (TLS's close_notify) made one side's close a reset after the other
            # side had ended the conversation and its end was passed on: nothing was cut.
            outcome = End.DONE.value
        m = self.ctx.metrics
        d = self.direction.value
        up, down = self.pump.client.bytes_in, self.pump.upstream.bytes_in
        m.child(m.sessions, d, outcome).inc()
        m.child(m.duration, d).observe(duration)
        if up:
            m.child(m.bytes, d, "client_to_upstream").inc(up)
        if down:
            m.child(m.bytes, d, "upstream_to_client").inc(down)
        fields: dict[str, object] = {
            "direction": d,
            "listener": self.listener.label,
            "client": self.client_text,
            "destination": self.destination_text,
            "upstream": str(self.upstream) if self.upstream else "-",
            "outcome": outcome,
            "bytes_up": up,
            "bytes_down": down,
            "duration": round(duration, 3),
        }
        if self.plan is not None:
            fields["plan"] = self.plan.action.value
            fields["auth"] = self.plan.auth.value
        if self.upgrade is not None:
            machine = self.upgrade.machine
            if isinstance(machine, Upgrade) and (handling := mta_starttls(machine)):
                fields["mta_starttls"] = handling
                m.child(m.mta_starttls, handling).inc()
            if isinstance(self.upgrade, InboundOffload) and self.upgrade.shield is not None:
                self._shield_facts(self.upgrade.shield, fields)
            if machine is not None and machine.result is not Result.PENDING:
                fields["tls"] = machine.result.value
                label = reason_label(machine.result, machine.reason)
                m.child(m.tls, d, machine.result.value, label).inc()
                if label != "none" and machine.reason:
                    fields["tls_reason"] = machine.reason
            fields.update(self.upgrade.tls)
        if reason := self.reason or (self.upgrade.reason if self.upgrade else ""):
            fields["reason"] = reason
        session_line(fields)

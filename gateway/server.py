"""The process: listeners, the metrics endpoint, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import socket
import time
from pathlib import Path

import uvloop
from prometheus_client import CollectorRegistry

from . import config as config_mod
from . import logs
from .config import ClientAddress, Config, ConfigError, Endpoint, IPAddress, Listener
from .dns import Resolver
from .keys import RotatingContext, load_keypair, local_context
from .logs import event, log
from .metrics import Metrics, serve
from .netfilter import (
    IP_TRANSPARENT,
    IPV6_TRANSPARENT,
    SO_MARK,
    is_local_address,
    listening_socket,
)
from .outbound import SessionCache, client_context
from .policy import Plan, static_plan
from .session import Session
from .tasks import TaskGroup

ListenerKey = tuple[object, ...]
STATIC_PLAN_CACHE = 10_000
LOCAL_ADDRESS_TTL = 30.0  # seconds: addresses added to or removed from the host


class Gateway:
    def __init__(self, config: Config, metrics: Metrics,
                 metrics_socket: str | None = None) -> None:
        self.config = config
        self.metrics_socket = metrics_socket  # a worker answers its supervisor here
        self.metrics = metrics
        self.resolver = Resolver(config.dns, metrics)
        self.tls_client = client_context()  # built once, not per session
        # Outbound take-over of an MTA's STARTTLS: an ephemeral local key (keys.local_context).
        self.tls_local = local_context()
        self.tls_sessions = SessionCache()
        # Inbound STARTTLS with tls.key; rebuilt hourly so session-ticket keys rotate.
        self.tls_server: RotatingContext | None = None
        self.sessions: set[Session] = set()
        # Local addresses of our upstream sockets: a connection *from* one of these that
        # reaches a listener is our own traffic intercepted again (A6).
        self.own_upstreams: set[tuple[str, int]] = set()
        self.tasks = TaskGroup()
        # static_plan per destination address for the current config (cleared on reload):
        # the same few MX addresses come back all day.
        self._static_plans: dict[IPAddress, Plan | None] = {}
        self._local: dict[IPAddress, bool] = {}
        self._local_since = time.monotonic()
        self._servers: dict[ListenerKey, tuple[Listener, asyncio.Server]] = {}
        self._metrics_server: asyncio.Server | None = None
        self.draining = False
        self._idle = asyncio.Event()  # set when the last session ends (drain waits on it)
        self._reloading = asyncio.Lock()  # two quick SIGHUPs must not interleave
        metrics.track_buffered(self.buffered)

    # -- listeners ---------------------------------------------------------------------
    async def _open(self, listener: Listener) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        sock = listening_socket(listener.address, listener.port, listener.mode)
        try:
            # The listener is looked up at accept time: a reload that only renames it keeps
            # the socket, and sessions must see the current name.
            key = listener.key
            server = await loop.create_server(
                lambda: Session(self, self._servers[key][0] if key in self._servers
                                else listener).pump.client,
                sock=sock)
        except BaseException:
            sock.close()
            raise
        event(log, "listening", listener=listener.label, address=str(listener.endpoint),
              mode=listener.mode.value, direction=listener.direction.value)
        return server

    async def _apply_listeners(self, config: Config) -> None:
        """Opens the new listeners first; if one fails nothing changes (it raises)."""
        wanted = {lst.key: lst for lst in config.listeners}
        opened: dict[ListenerKey, tuple[Listener, asyncio.Server]] = {}
        try:
            for i, lst in enumerate(config.listeners):
                if lst.key in self._servers:
                    continue
                try:
                    opened[lst.key] = (lst, await self._open(lst))
                except OSError as exc:
                    raise ConfigError(config.source, f"listeners[{i}]",
                                      f"cannot listen on {lst.endpoint}: "
                                      f"{exc.strerror or exc}") from None
        except BaseException:
            for _, server in opened.values():
                server.close()
            raise
        for key in list(self._servers):
            if key not in wanted:
                lst, server = self._servers.pop(key)
                server.close()  # stops accepting; its sessions go on (asyncio keeps them)
                event(log, "listener closed", listener=lst.label)
        self._servers.update(opened)
        # Same socket, possibly a new name: keep the Listener object current.
        for key, lst in wanted.items():
            self._servers[key] = (lst, self._servers[key][1])

    def is_gateway_endpoint(self, ep: Endpoint) -> bool:
        """A destination that is one of our listeners: a connection that was not redirected,
        or was redirected to a local address at our port.  Forwarding it would loop."""
        return any(
            ep.port == lst.port and ep.host.version == lst.address.version
            and (ep.host == lst.address or self.is_local(ep.host))
            for lst, _ in self._servers.values())

    def static_plan(self, address: IPAddress) -> Plan | None:
        try:
            return self._static_plans[address]
        except KeyError:
            pass
        if len(self._static_plans) >= STATIC_PLAN_CACHE:
            self._static_plans.clear()  # bounded: traffic from many addresses cannot grow it
        found = self._static_plans[address] = static_plan(address, self.config.policy)
        return found

    def is_local(self, address: IPAddress) -> bool:
        """Whether this host owns ``address``; remembered for a while (a probe costs a
        socket and a bind, and the same few addresses come back)."""
        now = time.monotonic()
        if now - self._local_since > LOCAL_ADDRESS_TTL or len(self._local) > 1024:
            self._local, self._local_since = {}, now
        found = self._local.get(address)
        if found is None:
            found = self._local[address] = is_local_address(address)
        return found

    def session_ended(self, session: Session) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._idle.set()

    def buffered(self) -> int:
        return sum(s.pump.buffered() for s in self.sessions)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        check_upstream(self.config)
        warn_open_files(self.config)
        self.tls_server = site_context(self.config)
        await self._apply_listeners(self.config)
        target = self.metrics_socket or self.config.metrics.listen
        if target is not None:
            self._metrics_server = await serve(self.metrics.registry, target,
                                               lambda: not self.draining)
            event(log, "metrics", address=str(target))

    async def reload(self, path: str | Path) -> bool:
        """SIGHUP: a bad new config is refused and the old one stays."""
        async with self._reloading:
            return await self._reload(path)

    async def _reload(self, path: str | Path) -> bool:
        if self.draining:
            event(log, "reload ignored", logging.WARNING, reason="draining")
            return False
        try:
            new = config_mod.load(path)
            check_upstream(new)
            # Keys are read again: a bad key is refused here and the old one keeps serving.
            tls_server = site_context(new)
            if new.metrics != self.config.metrics:
                raise ConfigError(str(path), "metrics.listen",
                                  "cannot change on reload; restart the gateway")
            await self._apply_listeners(new)
        except (ConfigError, OSError) as exc:
            self.metrics.reloads.labels("rejected").inc()
            event(log, "reload rejected", logging.ERROR, error=str(exc))
            return False
        warn_open_files(new)
        if new.dns != self.config.dns:
            # The old resolver is left to finish the queries running sessions wait on.
            self.resolver = Resolver(new.dns, self.metrics)
        self.config = new  # sessions already running keep the config they started with
        self._static_plans = {}
        self.tls_server = tls_server
        logs.setup(new.logging.format, new.logging.level)
        self.metrics.reloads.labels("ok").inc()
        event(log, "reloaded", source=new.source, listeners=len(new.listeners))
        return True

    async def drain(self) -> None:
        """SIGTERM: stop accepting, let sessions finish until the deadline, then end them."""
        self.draining = True
        for _, server in self._servers.values():
            server.close()
        deadline = self.config.timeouts.drain
        event(log, "draining", sessions=len(self.sessions), deadline=deadline)
        self._idle.clear()
        if self.sessions:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline):
                    await self._idle.wait()
        left = list(self.sessions)
        for s in left:
            s.abort()
        if left:
            await self.tasks.cancel_all()
            await asyncio.sleep(0)  # the pumps' done callbacks write the summaries
        await self.resolver.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        event(log, "stopped", aborted=len(left))


def site_context(config: Config) -> RotatingContext | None:
    """The inbound TLS server context from tls.key/cert (and the next pair, validated so a
    rollover cannot fail later); None when no key is configured."""
    t = config.tls
    if not (t.key and t.cert):
        return None
    pair = load_keypair(t.key, t.cert, config.source, "tls.key", cert_path_name="tls.cert")
    following = (load_keypair(t.next_key, t.next_cert, config.source, "tls.next_key",
                              cert_path_name="tls.next_cert")
                 if t.next_key and t.next_cert else None)
    for warning in (*pair.warnings, *(following.warnings if following else ())):
        event(log, "key warning", logging.WARNING, warning=warning)
    return RotatingContext(pair, following)


def check_upstream(config: Config) -> None:
    """Fails at start (or reload), naming the key, what would otherwise fail every session:
    a mark the process may not set, a source address this host does not have."""
    u = config.upstream
    if u.mark:
        try:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, SO_MARK, u.mark)
        except OSError as exc:
            raise ConfigError(config.source, "upstream.mark",
                              f"cannot mark sockets: {exc.strerror} (needs CAP_NET_ADMIN)"
                              ) from None
    for i, lst in enumerate(config.listeners):
        if lst.client_address is ClientAddress.TRANSPARENT:
            level, opt = ((socket.IPPROTO_IPV6, IPV6_TRANSPARENT) if lst.address.version == 6
                          else (socket.SOL_IP, IP_TRANSPARENT))
            try:
                with socket.socket(socket.AF_INET6 if lst.address.version == 6
                                   else socket.AF_INET) as probe:
                    probe.setsockopt(level, opt, 1)
            except OSError as exc:
                raise ConfigError(config.source, f"listeners[{i}].client_address",
                                  f"transparent needs IP_TRANSPARENT: {exc.strerror} "
                                  "(needs CAP_NET_ADMIN)") from None
    for key, address in (("source_ipv4", u.source_ipv4), ("source_ipv6", u.source_ipv6)):
        if address is not None and not is_local_address(address):
            raise ConfigError(config.source, f"upstream.{key}",
                              f"{address} is not an address of this host")


def warn_open_files(config: Config) -> None:
    """Two sockets per session: a limit below that fails sessions with EMFILE long before
    limits.max_sessions (and connections the event loop itself must close unanswered)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * config.limits.max_sessions + 64
    if soft != resource.RLIM_INFINITY and soft < need:
        event(log, "open-file limit too low", logging.WARNING, limit=soft, needed=need,
              max_sessions=config.limits.max_sessions,
              hint="raise LimitNOFILE (systemd) or ulimit -n, or lower limits.max_sessions")


def raise_open_files_limit() -> None:
    """Soft limit up to the hard one: every session holds two sockets, and containers
    often start with a soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(path: str, config: Config, metrics_socket: str | None = None) -> int:
    loop = asyncio.get_running_loop()
    gw = Gateway(config, Metrics(CollectorRegistry()), metrics_socket)
    try:
        await gw.start()
    except (ConfigError, OSError) as exc:
        event(log, "cannot start", logging.ERROR, error=str(exc))
        return 1
    # Everything built so far (modules, config, contexts) lives as long as the process:
    # keep it out of the cyclic collector's scans, which otherwise walk it again and again
    # while sessions (which hold cycles: legs <-> pump) come and go.
    gc.freeze()
    stop = asyncio.Event()
    holder = TaskGroup()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP,
                            lambda: holder.spawn(gw.reload(path), name="reload"))
    event(log, "started", source=path, listeners=len(config.listeners))
    await stop.wait()
    await gw.drain()
    await holder.cancel_all()
    return 0


def run(path: str, config: Config, worker_metrics: str | None = None) -> int:
    logs.setup(config.logging.format, config.logging.level)
    raise_open_files_limit()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if worker_metrics is None and config.workers > 1:
            from .workers import supervise

            return runner.run(supervise(path, config))
        return runner.run(_serve(path, config, worker_metrics))

"""The process: listeners, the metrics endpoint, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import resource
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop
from prometheus_client import CollectorRegistry

from . import config as config_mod
from . import logs
from .config import ClientAddress, Config, ConfigError, Direction, Listener
from .context import Context
from .health import Health
from .keys import RotatingContext, site_pairs, webpki_store
from .logs import event, log
from .metrics import Metrics, serve
from .netfilter import (
    IP_TRANSPARENT,
    IPV6_TRANSPARENT,
    SO_MARK,
    is_local_address,
    listening_socket,
)
from .session import Session
from .tasks import TaskGroup

if TYPE_CHECKING:
    from .tlsrptsend import Reporter

ListenerKey = tuple[object, ...]


class Gateway:
    def __init__(self, config: Config, metrics: Metrics,
                 metrics_socket: str | None = None) -> None:
        self.ctx = Context(config, metrics)  # what the sessions share
        self.metrics_socket = metrics_socket  # a worker answers its supervisor here
        self.metrics = metrics
        self._servers: dict[ListenerKey, tuple[Listener, asyncio.Server]] = {}
        self._metrics_server: asyncio.Server | None = None
        self.draining = False
        self._reloading = asyncio.Lock()  # two quick SIGHUPs must not interleave
        metrics.track_buffered(self.ctx.buffered)
        self.health = Health(metrics.registry, config.source)
        # A worker leaves the DNS self-test to its supervisor (gateway.workers), which
        # answers for the whole gateway.
        self.selftest = metrics_socket is None
        self._selftest_wake = asyncio.Event()
        self._tasks = TaskGroup()
        self._reporter: Reporter | None = None

    @property
    def config(self) -> Config:
        return self.ctx.config

    # -- listeners ---------------------------------------------------------------------
    async def _open(self, listener: Listener) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        sock = listening_socket(listener.address, listener.port, listener.mode)
        try:
            # The listener is looked up at accept time: a reload that only renames it keeps
            # the socket, and sessions must see the current name.
            key, ctx = listener.key, self.ctx
            server = await loop.create_server(
                lambda: Session(ctx, self._servers[key][0] if key in self._servers
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
        self.ctx.listening = tuple(lst for lst, _ in self._servers.values())

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        check_upstream(self.config)
        warn_open_files(self.config)
        self.ctx.tls_server = site_context(self.config)
        self.ctx.webpki = webpki_store(self.config)
        await self._apply_listeners(self.config)
        if self.config.sts_wanted:
            await self._start_sts(self.config)
        if self.config.tlsrpt.enabled:
            await self._start_tlsrpt(self.config)
        target = self.metrics_socket or self.config.metrics.listen
        if target is not None:
            self._metrics_server = await serve(self.metrics.registry, target, self)
            event(log, "metrics", address=str(target))
        if self.selftest:
            self._tasks.spawn(self.health.selftest_loop(lambda: self.config.dns,
                                                        self._selftest_wake),
                              name="dns self-test")

    async def _start_sts(self, config: Config) -> None:
        from .stsfetch import Policies  # the HTTP client only where MTA-STS is on

        ctx = self.ctx
        policies = Policies(dataclasses.replace(config.mta_sts, enabled=True),
                            lambda: ctx.resolver, self.metrics)
        await policies.open()
        ctx.sts = policies

    async def _start_tlsrpt(self, config: Config) -> None:
        """Sessions count their outcomes in the store; one process reports them: this
        one, unless it is a worker (its supervisor does)."""
        from .tlsrptstore import Store

        store = Store(config.tlsrpt)
        await store.open()
        self.ctx.tlsrpt = store
        if self.metrics_socket is None:
            from .tlsrptsend import Reporter

            ctx = self.ctx
            self._reporter = Reporter(config.tlsrpt, store, lambda: ctx.resolver,
                                      self.metrics.tlsrpt_reports)
            self._tasks.spawn(self._reporter.run_forever(), name="tlsrpt reporter")

    # -- what /healthz and /status say (gateway.metrics.Report) --------------------------
    def serving(self) -> bool:
        return not self.draining

    def problems(self) -> list[str]:
        return self.health.problems()

    def status(self) -> dict[str, object]:
        reg = self.metrics.registry
        sessions = {d.value: int(reg.get_sample_value("smtpgate_sessions_active",
                                                      {"direction": d.value}) or 0)
                    for d in Direction}
        return {**self.health.status(), "state": "draining" if self.draining else "serving",
                "sessions": sessions, "listeners": [lst.label for lst in self.ctx.listening]}

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
            if new.mta_sts.cache != self.config.mta_sts.cache and self.ctx.sts is not None:
                raise ConfigError(str(path), "mta_sts.cache",
                                  "cannot change on reload; restart the gateway")
            webpki = webpki_store(new)
            await self._apply_listeners(new)
        except (ConfigError, OSError) as exc:
            self.metrics.reloads.labels("rejected").inc()
            self.health.reloaded(False, str(path), str(exc))
            event(log, "reload rejected", logging.ERROR, error=str(exc))
            return False
        warn_open_files(new)
        # Sessions already running keep the config they started with.
        self.ctx.reconfigure(new, tls_server)
        self.ctx.webpki = webpki
        if self.ctx.tlsrpt is None and new.tlsrpt.enabled:
            await self._start_tlsrpt(new)
        elif self.ctx.tlsrpt is not None:
            self.ctx.tlsrpt.config = new.tlsrpt  # max_domains
            if self._reporter is not None:
                self._reporter.config = new.tlsrpt  # organization, contact, relay, ...
        if self.ctx.sts is not None:
            # (enabled: false with an entry that turns it on: the policies are looked up)
            self.ctx.sts.config = dataclasses.replace(new.mta_sts, enabled=True)
        elif new.sts_wanted:
            await self._start_sts(new)
        logs.setup(new.logging.format, new.logging.level)
        self.metrics.reloads.labels("ok").inc()
        self.health.reloaded(True, new.source)
        event(log, "reloaded", source=new.source, listeners=len(new.listeners))
        self._selftest_wake.set()  # the resolvers may have changed
        return True

    async def drain(self) -> None:
        """SIGTERM: stop accepting, let sessions finish until the deadline, then end them."""
        self.draining = True
        for _, server in self._servers.values():
            server.close()
        deadline = self.config.timeouts.drain
        ctx = self.ctx
        event(log, "draining", sessions=len(ctx.sessions), deadline=deadline)
        ctx.idle.clear()
        if ctx.sessions:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline):
                    await ctx.idle.wait()
        left = list(ctx.sessions)
        for s in left:
            s.abort()
        if left:
            await ctx.tasks.cancel_all()
            await asyncio.sleep(0)  # the pumps' done callbacks write the summaries
        await ctx.resolver.close()
        if ctx.sts is not None:
            await ctx.sts.close()
        await self._tasks.cancel_all()
        if self._reporter is not None:
            await self._reporter.close()
        if ctx.tlsrpt is not None:
            await ctx.tlsrpt.close()  # what the sessions counted last is written
        if self._metrics_server is not None:
            self._metrics_server.close()
        event(log, "stopped", aborted=len(left))


def site_context(config: Config) -> RotatingContext | None:
    """The inbound TLS server context from tls.key/cert (and the next pair, validated so a
    rollover cannot fail later); None when no key is configured."""
    pairs = site_pairs(config)
    if pairs is None:
        return None
    pair, following = pairs
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


def run(path: str, config: Config, worker_metrics: str | None = None,
        worker_index: int | None = None) -> int:
    if worker_index is not None:
        logs.set_worker(worker_index)
    logs.setup(config.logging.format, config.logging.level)
    raise_open_files_limit()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if worker_metrics is None and config.workers > 1:
            from .workers import supervise

            return runner.run(supervise(path, config))
        return runner.run(_serve(path, config, worker_metrics))

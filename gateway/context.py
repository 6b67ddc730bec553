"""What every session of one process shares, below the sessions: the config snapshot, the
resolver, caches, metrics, the task group, TLS contexts and the set of our own upstream
sockets.  ``gateway.server`` owns one and replaces parts of it on reload; sessions and the
TLS phases receive it and never see the server (no import of it, and no cycle).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

from cryptography.x509.verification import Store

from .config import Config, Endpoint, IPAddress, Listener
from .dns import Resolver
from .keys import RotatingContext, local_context
from .metrics import Metrics
from .netfilter import is_local_address
from .policy import Plan, static_plan
from .tasks import TaskGroup

if TYPE_CHECKING:
    from .stsfetch import Policies
    from .tlsrptstore import Store as TlsRptStore

STATIC_PLAN_CACHE = 10_000
LOCAL_ADDRESS_TTL = 30.0  # seconds: addresses added to or removed from the host


class Live(Protocol):
    """A running session, as the process sees it: drain and the buffered gauge."""

    def abort(self) -> None: ...

    def buffered(self) -> int: ...


class SessionCache:
    """TLS sessions toward peers, keyed by what they were verified against: a session is
    resumed only while the destination, SNI and the TLSA set (or pins) are unchanged, so a
    key rollover in DNS forces a full handshake and a fresh verification."""

    def __init__(self, size: int = 10000) -> None:
        self.size = size
        # With each session, the chain its full handshake presented: a resumed handshake
        # presents none (OpenSSL keeps only the leaf), and the recipient checks (DANE-TA,
        # MTA-STS's Web PKI path) need the chain the session was authenticated with.
        self._sessions: OrderedDict[tuple[object, ...],
                                    tuple[ssl.SSLSession, tuple[bytes, ...]]] = OrderedDict()

    @staticmethod
    def key(destination: str, plan: Plan) -> tuple[object, ...]:
        return (destination, plan.sni, plan.auth.value,
                tuple(sorted(str(r) for r in plan.tlsa)), tuple(sorted(plan.fingerprints)))

    def get(self, key: tuple[object, ...]) -> ssl.SSLSession | None:
        found = self._sessions.get(key)
        return found[0] if found is not None else None

    def chain(self, key: tuple[object, ...], session: ssl.SSLSession | None) -> list[bytes]:
        """The chain presented when ``session`` (the one resumed) was made; [] if unknown."""
        found = self._sessions.get(key)
        return list(found[1]) if found is not None and found[0] is session else []

    def put(self, key: tuple[object, ...], session: ssl.SSLSession,
            chain: tuple[bytes, ...] = ()) -> None:
        self._sessions[key] = (session, chain)
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.size:
            self._sessions.popitem(last=False)


def client_context() -> ssl.SSLContext:
    """Built once per process: TLS 1.2+, no CA verification (DANE or pins do it, or nothing
    for opportunistic TLS, RFC 7435)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Context:
    """One per process.  ``config`` is the current snapshot: a session copies it at accept
    and keeps it (a reload changes only sessions that start after it)."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.loop = asyncio.get_running_loop()  # built inside the process's running loop
        self.config = config
        self.metrics = metrics
        self.resolver = Resolver(config.dns, metrics)
        self.tasks = TaskGroup()
        self.tls_client = client_context()  # built once, not per session
        # Outbound take-over of an MTA's STARTTLS: an ephemeral local key (keys.local_context).
        self.tls_local = local_context()
        self.tls_sessions = SessionCache()
        # Inbound STARTTLS with tls.key; rebuilt hourly so session-ticket keys rotate.
        self.tls_server: RotatingContext | None = None
        self.sessions: set[Live] = set()
        # MTA-STS: the policies of recipient domains and the Web PKI roots their MX
        # certificates must chain to (set by gateway.server when mta_sts is enabled).
        self.sts: Policies | None = None
        self.webpki: Store | None = None
        # TLS-RPT: where sessions count their outcomes (gateway.server, tlsrpt.enabled).
        self.tlsrpt: TlsRptStore | None = None
        self.idle = asyncio.Event()  # set when the last session ends (drain waits on it)
        # Local addresses of our upstream sockets: a connection *from* one of these that
        # reaches a listener is our own traffic intercepted again (A6).
        self.own_upstreams: set[tuple[str, int]] = set()
        self.listening: tuple[Listener, ...] = ()  # what the server listens on now
        # static_plan per destination address for the current config (cleared on reload):
        # the same few MX addresses come back all day.
        self._static_plans: dict[IPAddress, Plan | None] = {}
        self._local: dict[IPAddress, bool] = {}
        self._local_since = time.monotonic()

    def reconfigure(self, config: Config, tls_server: RotatingContext | None) -> None:
        """A reload that passed every check: sessions from now on see ``config``."""
        if config.dns != self.config.dns:
            # The old resolver is left to finish the queries running sessions wait on.
            self.resolver = Resolver(config.dns, self.metrics)
        self.config = config
        self._static_plans = {}
        self.tls_server = tls_server

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

    def is_gateway_endpoint(self, ep: Endpoint) -> bool:
        """A destination that is one of our listeners: a connection that was not redirected,
        or was redirected to a local address at our port.  Forwarding it would loop."""
        return any(
            ep.port == lst.port and ep.host.version == lst.address.version
            and (ep.host == lst.address or self.is_local(ep.host))
            for lst in self.listening)

    def session_started(self, session: Live) -> None:
        self.sessions.add(session)

    def session_ended(self, session: Live) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self.idle.set()

    def buffered(self) -> int:
        return sum(s.buffered() for s in self.sessions)

"""YAML configuration → frozen, typed objects, validated once.

Every error names the file and the key path (``limits.max_sessions: must be a positive
integer``), so an operator can fix a config without reading code.  Unknown keys are errors
too: a misspelt ``max_sesions`` silently ignored is a limit that is not there.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import yaml

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A config file that cannot be used; ``str()`` is the line to show the operator."""

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source = source
        self.path = path
        self.message = message
        where = f"{path}: " if path else ""
        super().__init__(f"{source}: {where}{message}")


class Direction(StrEnum):
    OUTBOUND = "outbound"  # the local MTA is the client; forward to the original destination
    INBOUND = "inbound"  # the local MTA is the server; forward only to configured MTAs


class InterceptMode(StrEnum):
    REDIRECT = "redirect"  # NAT: destination from SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST
    TPROXY = "tproxy"  # no NAT: destination is the accepted socket's own address


class FailureSignal(StrEnum):
    """What the MTA sees when the upstream cannot be reached."""

    REPLY = "reply"  # a 421 greeting that carries the reason into the MTA's log and queue
    RESET = "reset"  # a TCP reset, once the connect to every target has failed


class Level(StrEnum):
    """Per-destination TLS policy, named as Postfix names its smtp_tls_security_level."""

    NONE = "none"  # never TLS: the bytes pass through
    MAY = "may"  # opportunistic TLS, plaintext when the peer offers none
    ENCRYPT = "encrypt"  # TLS required, peer not authenticated
    DANE = "dane"  # opportunistic, DANE-authenticated where a secure usable TLSA exists
    DANE_ONLY = "dane-only"  # DANE authentication required
    FINGERPRINT = "fingerprint"  # TLS required, peer key or certificate pinned by SHA-256


class StsUse(StrEnum):
    """What MTA-STS (RFC 8461) a destination or a recipient domain gets (``mta_sts``)."""

    ON = "on"  # as the recipient domain publishes it (the default)
    OFF = "off"  # not looked up, not applied
    REQUIRE = "require"  # a testing policy counts as enforce; no valid policy: 450


class StartTls(StrEnum):
    """Inbound: who gives the client STARTTLS."""

    OFFLOAD = "offload"  # the gateway, with the site's key (the MTA knows no TLS)
    PASSTHROUGH = "passthrough"  # the MTA itself: bytes pass unchanged


class Smuggling(StrEnum):
    """Inbound: what reaches the MTA when a client's line endings or pipelining would let the
    MTA find an end of data (or a command) the client's side could not have meant."""

    NORMALIZE = "normalize"  # bare CR/LF made CRLF, lines they start dot-stuffed; hold after DATA
    REJECT = "reject"  # 550/554 to the client, the MTA's connection reset: nothing delivered
    OFF = "off"  # bytes pass unchanged (an MTA hardened on its own)


class MtaStartTls(StrEnum):
    """Outbound: what becomes of the MTA's own STARTTLS toward a peer the gateway would
    authenticate (or must encrypt to).  Elsewhere the MTA's TLS is left alone."""

    TERMINATE = "terminate"  # answer it locally, then the verified upgrade to the peer
    HIDE = "hide"  # withdraw STARTTLS from the EHLO reply: the MTA goes on in plaintext
    STEP_ASIDE = "step-aside"  # leave it to the MTA (one that verifies on its own)


class SourceAddress(StrEnum):
    """Outbound: the address the peer sees the connection come from."""

    GATEWAY = "gateway"  # this host's (upstream.source_ipv4/6, or the kernel's choice)
    CLIENT = "client"  # the MTA's own (IP_TRANSPARENT; the edge must route the MTA's traffic)


class ClientAddress(StrEnum):
    """Inbound: how the MTA learns the client's real address."""

    NONE = "none"  # it sees the gateway's address
    TRANSPARENT = "transparent"  # upstream from the client's own address (IP_TRANSPARENT)
    PROXY_PROTOCOL = "proxy-protocol"  # a PROXY v2 header first (Postfix: haproxy)


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: IPAddress
    port: int
    # The host's text, once: ipaddress formats an address in Python, slowly, and a session
    # needs it several times (netfilter passes it in from a cache of recent addresses).
    host_text: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.host_text:
            object.__setattr__(self, "host_text", str(self.host))

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host_text}]:{self.port}"
        return f"{self.host_text}:{self.port}"


@dataclass(frozen=True, slots=True)
class Listener:
    address: IPAddress
    port: int
    direction: Direction = Direction.OUTBOUND
    mode: InterceptMode = InterceptMode.REDIRECT
    # Inbound only: the MTAs this listener may forward to, tried in order (A6).
    upstreams: tuple[Endpoint, ...] = ()
    name: str = ""
    starttls: StartTls = StartTls.OFFLOAD  # inbound only
    client_address: ClientAddress = ClientAddress.NONE  # inbound only
    smuggling: Smuggling = Smuggling.NORMALIZE  # inbound only
    mta_starttls: MtaStartTls = MtaStartTls.TERMINATE  # outbound only
    # Outbound only: MTAs that verify on their own (Postfix dane/secure, Exim
    # hosts_require_dane): their STARTTLS is always theirs (step-aside).
    verifying_mtas: tuple[IPNetwork, ...] = ()
    source_address: SourceAddress = SourceAddress.GATEWAY  # outbound only

    def mta_starttls_for(self, client: IPAddress) -> MtaStartTls:
        if any(client in net for net in self.verifying_mtas):
            return MtaStartTls.STEP_ASIDE
        return self.mta_starttls

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.address, self.port)

    @property
    def key(self) -> tuple[str, int, str, str, tuple[Endpoint, ...], str, str]:
        """Identity for reload: a listener whose key is unchanged keeps its socket."""
        return (str(self.address), self.port, self.direction, self.mode, self.upstreams,
                self.starttls, self.client_address)  # the rest is read per session

    @property
    def label(self) -> str:
        return self.name or f"{self.direction}@{self.endpoint}"


@dataclass(frozen=True, slots=True)
class Upstream:
    # SO_MARK on every upstream socket, so firewall rules can exempt the gateway's own
    # traffic from interception; also how a looped connection is recognised.
    mark: int = 0x2525
    source_ipv4: ipaddress.IPv4Address | None = None
    source_ipv6: ipaddress.IPv6Address | None = None
    on_failure: FailureSignal = FailureSignal.REPLY


@dataclass(frozen=True, slots=True)
class Limits:
    max_sessions: int = 2000
    # High-water mark of the user-space buffer per direction: reading the other side pauses
    # above it.  Memory per session is about twice this plus two socket reads.
    buffer_bytes: int = 256 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 30.0  # Postfix's own smtp_connect_timeout
    idle: float = 300.0  # RFC 5321 4.5.3.2 server timeouts are 2-10 minutes
    session: float = 3600.0
    drain: float = 60.0  # SIGTERM: how long active sessions may finish


@dataclass(frozen=True, slots=True)
class Metrics:
    listen: Endpoint | None = Endpoint(ipaddress.ip_address("127.0.0.1"), 9125)


@dataclass(frozen=True, slots=True)
class DnsCache:
    min_ttl: float = 30.0  # floor: a 0-TTL record must not cost a query per session
    max_ttl: float = 3600.0
    negative_max_ttl: float = 900.0  # RFC 2308 NXDOMAIN/NODATA, capped
    failure_ttl: float = 5.0  # RFC 9520: SERVFAIL, bogus and timeouts, briefly
    max_entries: int = 20000


@dataclass(frozen=True, slots=True)
class DnsSelfTest:
    """Asked of every resolver at start, on reload and every ``interval`` (0: never again):
    a name that must validate (a signed zone's apex: its DNSKEY is asked) and, when one is
    configured, a name that must fail validation.  The root's DNSKEY validates wherever a
    validating resolver works; a known-bogus name is the operator's to choose (none is
    guaranteed to stay bogus)."""

    secure: str | None = "."  # None: no self-test at all
    bogus: str | None = None
    interval: float = 300.0


@dataclass(frozen=True, slots=True)
class DnsConfig:
    # Validating resolvers, tried in order when one does not answer.
    resolvers: tuple[Endpoint, ...] = (Endpoint(ipaddress.ip_address("127.0.0.1"), 53),)
    # The AD bit is believed only from loopback resolvers and from these.
    trusted: tuple[Endpoint, ...] = ()
    timeout: float = 2.0  # one query to one resolver
    budget: float = 5.0  # one whole discovery (PTR, forward, TLSA)
    max_queries: int = 200  # concurrent queries in flight
    cache: DnsCache = field(default_factory=DnsCache)
    selftest: DnsSelfTest = field(default_factory=DnsSelfTest)


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    match: str  # as written: "192.0.2.0/24", "mx.example.com" or ".example.com"
    level: Level
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    host: str | None = None  # absolute, lower case; a leading "." matches subdomains
    fingerprints: tuple[bytes, ...] = ()  # SHA-256 of the certificate or of its public key
    mta_sts: StsUse | None = None  # None: as mta_sts.enabled says


@dataclass(frozen=True, slots=True)
class RecipientPolicy:
    """What a recipient domain requires of the hop, whatever its DNS says."""

    domain: str  # absolute, lower case; a leading "." matches subdomains
    level: Level | None  # encrypt or dane-only; None: only mta_sts was said
    mta_sts: StsUse | None = None


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    default: Level = Level.DANE
    entries: tuple[PolicyEntry, ...] = ()
    recipients: tuple[RecipientPolicy, ...] = ()

    def recipient_entry(self, domain: str) -> RecipientPolicy | None:
        name = domain.lower().rstrip(".") + "."
        for r in self.recipients:
            if name == r.domain or (r.domain.startswith(".") and name.endswith(r.domain)):
                return r
        return None

    def for_recipient(self, domain: str) -> Level | None:
        entry = self.recipient_entry(domain)
        return entry.level if entry is not None else None


@dataclass(frozen=True, slots=True)
class MtaSts:
    """MTA-STS (RFC 8461): policies of recipient domains, fetched and kept (gateway.stsfetch)."""

    enabled: bool = True
    # The policy cache file (SQLite): policies survive a restart, so the first message
    # after it is protected too.  "auto": $STATE_DIRECTORY/mta-sts.sqlite3 where systemd
    # gives the unit a state directory, else memory only; null: memory only.
    cache: str | None = "auto"
    ca_file: str | None = None  # PEM trust anchors; None: this host's (OpenSSL's default)
    fetch_timeout: float = 10.0  # the whole HTTPS fetch of one policy
    max_policies: int = 10000  # domains kept; the least recently used go first


@dataclass(frozen=True, slots=True)
class TlsRpt:
    """TLS-RPT (RFC 8460): daily reports to the recipient domains that ask for them
    (gateway.tlsrpt, gateway.tlsrptstore, gateway.tlsrptsend).  Off until configured."""

    enabled: bool = False
    organization: str = ""  # organization-name of the reports
    contact: str = ""  # contact-info: an address or URI the receiving domain may write to
    sender: str = ""  # the From: address of reports sent by mail
    relay: Endpoint | None = None  # the MTA that takes reports sent by mail (SMTP)
    # The outcomes collected (SQLite, shared by workers): "auto" = $STATE_DIRECTORY/
    # tlsrpt.sqlite3, else memory only (reports then lose what a restart drops).
    store: str | None = "auto"
    ca_file: str | None = None  # for https: report URIs; None: this host's roots
    max_domains: int = 10000  # policy domains recorded per day; more are counted, not kept
    send_after: float = 900.0  # seconds after 00:00 UTC before the day's reports go out
    timeout: float = 30.0  # one delivery attempt (SMTP or HTTPS)


@dataclass(frozen=True, slots=True)
class TlsKeys:
    """The site's key for inbound STARTTLS, and the next one during a rollover."""

    key: str | None = None
    cert: str | None = None
    next_key: str | None = None
    next_cert: str | None = None


@dataclass(frozen=True, slots=True)
class Logging:
    format: LogFormat = LogFormat.TEXT
    level: str = "INFO"


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[Listener, ...]
    upstream: Upstream = field(default_factory=Upstream)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    metrics: Metrics = field(default_factory=Metrics)
    logging: Logging = field(default_factory=Logging)
    dns: DnsConfig = field(default_factory=DnsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    tls: TlsKeys = field(default_factory=TlsKeys)
    mta_sts: MtaSts = field(default_factory=MtaSts)
    tlsrpt: TlsRpt = field(default_factory=TlsRpt)
    # Processes sharing the listeners (SO_REUSEPORT); 1 runs everything in this process.
    workers: int = 1
    source: str = "<config>"

    @property
    def sts_wanted(self) -> bool:
        """Whether any recipient can get MTA-STS: on by default, or turned on by an entry."""
        said = [e.mta_sts for e in self.policy.entries]
        said += [r.mta_sts for r in self.policy.recipients]
        return self.mta_sts.enabled or StsUse.ON in said or StsUse.REQUIRE in said


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Defaults are read from instances: slotted dataclasses keep no class-level field values.
_UPSTREAM, _LIMITS, _TIMEOUTS, _METRICS, _LOGGING, _DNS, _CACHE, _SELFTEST, _STS, _RPT = (
    Upstream(), Limits(), Timeouts(), Metrics(), Logging(), DnsConfig(), DnsCache(),
    DnsSelfTest(), MtaSts(), TlsRpt())
E = TypeVar("E", bound=StrEnum)


class _Section:
    """A mapping being read, with its key path; every read is checked, leftovers are errors."""

    def __init__(self, source: str, path: str, data: object) -> None:
        self.source = source
        self.path = path
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(source, path, "must be a mapping")
        self._data: Mapping[Any, Any] = data
        self._seen: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, self._join(key), message)

    def _join(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self._data

    def raw(self, key: str) -> object:
        self._seen.add(key)
        return self._data.get(key)

    def section(self, key: str) -> _Section:
        return _Section(self.source, self._join(key), self.raw(key))

    def items(self, key: str) -> Iterator[tuple[str, object]]:
        """Yields (path, item) for a list value."""
        value = self.raw(key)
        if value is None:
            return
        if not isinstance(value, list):
            raise self.error(key, "must be a list")
        for i, item in enumerate(value):
            yield f"{self._join(key)}[{i}]", item

    def integer(self, key: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
        if not self.has(key):
            return default
        value = self.raw(key)
        # bool is an int in Python; `max_sessions: yes` is a mistake, not 1.
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and value >= minimum and (maximum is None or value <= maximum):  # type: ignore[operator]
            return value  # type: ignore[return-value]
        if minimum == 1 and maximum is None:
            raise self.error(key, "must be a positive integer")
        upper = "" if maximum is None else f" and at most {maximum}"
        raise self.error(key, f"must be an integer of at least {minimum}{upper}")

    def seconds(self, key: str, default: float, zero_ok: bool = False) -> float:
        if not self.has(key):
            return default
        value = self.raw(key)
        if (isinstance(value, int | float) and not isinstance(value, bool)
                and (value > 0 or (zero_ok and value == 0))):
            return float(value)
        kind = "a non-negative" if zero_ok else "a positive"
        raise self.error(key, f"must be {kind} number of seconds")

    def string(self, key: str, default: str) -> str:
        if not self.has(key):
            return default
        value = self.raw(key)
        if isinstance(value, str) and value:
            return value
        raise self.error(key, "must be a non-empty string")

    def choice(self, key: str, enum: type[E], default: E) -> E:
        if not self.has(key):
            return default
        value = self.raw(key)
        try:
            return enum(str(value)) if isinstance(value, str) else enum(value)  # type: ignore[arg-type]
        except ValueError:
            allowed = ", ".join(e.value for e in enum)
            raise self.error(key, f"must be one of: {allowed}") from None

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false")
        return value

    def state_file(self, key: str, default: str | None) -> str | None:
        """A file path, ``auto`` (see :func:`state_file`) or null."""
        if not self.has(key):
            return default
        value = self.raw(key)
        if value is not None and not (isinstance(value, str) and value):
            raise self.error(key, "must be a file path, auto or null")
        return value

    def optional_path(self, key: str) -> str | None:
        return (self.string(key, "") or None) if self.raw(key) is not None else None

    def address(self, key: str, default: IPAddress | None = None) -> IPAddress | None:
        if not self.has(key) or self.raw(key) is None:
            return default
        return _parse_ip(self.raw(key), self.source, self._join(key))

    def done(self) -> None:
        unknown = sorted(str(k) for k in self._data if k not in self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _parse_ip(value: object, source: str, path: str) -> IPAddress:
    if isinstance(value, str):
        try:
            return ipaddress.ip_address(value.strip("[]"))
        except ValueError:
            pass
    raise ConfigError(source, path, "must be an IP address")


def parse_endpoint(value: object, source: str, path: str) -> Endpoint:
    """``192.0.2.1:25`` or ``[2001:db8::1]:25``; host names are refused on purpose (A6)."""
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if sep and port.isdigit() and 0 < int(port) < 65536:
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            elif ":" in host:
                host = ""  # a bare IPv6 literal with a port is ambiguous
            try:
                return Endpoint(ipaddress.ip_address(host), int(port))
            except ValueError:
                pass
    raise ConfigError(source, path, "must be IP:PORT (IPv6 as [ADDRESS]:PORT)")


def _listener(source: str, path: str, data: object) -> Listener:
    s = _Section(source, path, data)
    if not s.has("address"):
        raise s.error("address", "is required")
    if not s.has("port"):
        raise s.error("port", "is required")
    address = s.address("address")
    assert address is not None
    port = s.integer("port", 0, 1, 65535)
    direction = s.choice("direction", Direction, Direction.OUTBOUND)
    mode = s.choice("mode", InterceptMode, InterceptMode.REDIRECT)
    upstreams = tuple(parse_endpoint(v, source, p) for p, v in s.items("upstreams"))
    name = s.string("name", "")
    inbound_only = [k for k in ("starttls", "client_address", "smuggling") if s.has(k)]
    outbound_only = [k for k in ("mta_starttls", "verifying_mtas", "source_address")
                     if s.has(k)]
    starttls = s.choice("starttls", StartTls, StartTls.OFFLOAD)
    client_address = s.choice("client_address", ClientAddress, ClientAddress.NONE)
    # YAML 1.1 reads a bare `off` as false: that is what the operator wrote.
    smuggling = Smuggling.OFF if s.has("smuggling") and s.raw("smuggling") is False \
        else s.choice("smuggling", Smuggling, Smuggling.NORMALIZE)
    mta_starttls = s.choice("mta_starttls", MtaStartTls, MtaStartTls.TERMINATE)
    verifying = tuple(_network(v, source, p) for p, v in s.items("verifying_mtas"))
    source_address = s.choice("source_address", SourceAddress, SourceAddress.GATEWAY)
    s.done()
    if direction is Direction.OUTBOUND and inbound_only:
        raise s.error(inbound_only[0], "only for inbound listeners")
    if direction is Direction.INBOUND and outbound_only:
        raise s.error(outbound_only[0], "only for outbound listeners")
    if direction is Direction.INBOUND and not upstreams:
        raise s.error("upstreams", "an inbound listener needs at least one MTA (IP:PORT)")
    if direction is Direction.OUTBOUND and upstreams:
        raise s.error("upstreams", "only for inbound listeners: outbound goes to the original "
                                   "destination")
    return Listener(address, port, direction, mode, upstreams, name, starttls, client_address,
                    smuggling, mta_starttls, verifying, source_address)


def _network(value: object, source: str, path: str) -> IPNetwork:
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
    raise ConfigError(source, path, "not an IP network (192.0.2.10, 2001:db8::/64)")


def _hostname(value: str) -> str | None:
    """``mx.example.com`` / ``.example.com`` → absolute lower-case form, or None."""
    text = value.strip().lower().rstrip(".")
    suffix = text.startswith(".")
    labels = text.lstrip(".").split(".")
    ok = len(labels) >= 1 and all(
        0 < len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum()
        and label.isascii() and not label.startswith("-") and not label.endswith("-")
        for label in labels)
    if not ok:
        return None
    return ("." if suffix else "") + ".".join(labels) + "."


def _fingerprint(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    text = value.replace(":", "").strip().lower()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return raw if len(raw) == 32 else None


def _policy_entry(source: str, path: str, data: object) -> PolicyEntry:
    s = _Section(source, path, data)
    if not s.has("match"):
        raise s.error("match", "is required")
    match = s.raw("match")
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    host: str | None = None
    if isinstance(match, str):
        try:
            network = ipaddress.ip_network(match, strict=False)
        except ValueError:
            # Anything with "/" or ":" was meant as a network: don't read it as a name.
            host = None if ("/" in match or ":" in match) else _hostname(match)
    if network is None and host is None:
        raise s.error("match", "not an IP network or hostname")
    level = s.choice("level", Level, Level.DANE)
    sts = _sts_use(s)
    prints: list[bytes] = []
    for p, v in s.items("fingerprints"):
        fp = _fingerprint(v)
        if fp is None:
            raise ConfigError(source, p, "must be a SHA-256 digest in hex (64 digits, "
                                         "colons allowed)")
        prints.append(fp)
    s.done()
    if level is Level.FINGERPRINT and not prints:
        raise s.error("fingerprints", "level fingerprint needs at least one fingerprint")
    if prints and level is not Level.FINGERPRINT:
        raise s.error("fingerprints", "only with level: fingerprint")
    return PolicyEntry(str(match), level, network, host, tuple(prints), sts)


def _sts_use(s: _Section) -> StsUse | None:
    if not s.has("mta_sts"):
        return None
    raw = s.raw("mta_sts")
    if raw is False:  # YAML 1.1 reads a bare `off` as false, `on` as true
        return StsUse.OFF
    if raw is True:
        return StsUse.ON
    return s.choice("mta_sts", StsUse, StsUse.ON)


def _selftest(t: _Section) -> DnsSelfTest:
    names: dict[str, str | None] = {}
    for key, default in (("secure", _SELFTEST.secure), ("bogus", _SELFTEST.bogus)):
        value = t.raw(key) if t.has(key) else default
        if value is None or value is False:  # `secure: null` (or off) turns the test off
            names[key] = None
            continue
        name = _hostname(value) if isinstance(value, str) and value.strip() != "." else (
            "." if value == "." else None)
        if name is None or (name.startswith(".") and name != "."):
            raise t.error(key, "must be a DNS name (the root is \".\") or null")
        names[key] = name
    if names["secure"] is None and names["bogus"] is not None:
        raise t.error("bogus", "the self-test is off (dns.selftest.secure: null)")
    interval = t.seconds("interval", _SELFTEST.interval, zero_ok=True)
    t.done()
    return DnsSelfTest(secure=names["secure"], bogus=names["bogus"], interval=interval)


def _dns(top: _Section) -> DnsConfig:
    d = top.section("dns")
    resolvers = tuple(parse_endpoint(v, d.source, p) for p, v in d.items("resolvers")) \
        if d.has("resolvers") else _DNS.resolvers
    if not resolvers:
        raise d.error("resolvers", "at least one resolver is required")
    trusted = tuple(parse_endpoint(v, d.source, p) for p, v in d.items("trusted"))
    for i, t in enumerate(trusted):
        if t not in resolvers:
            raise ConfigError(d.source, f"dns.trusted[{i}]", "is not one of dns.resolvers")
    c = d.section("cache")
    cache = DnsCache(
        min_ttl=c.seconds("min_ttl", _CACHE.min_ttl, zero_ok=True),
        max_ttl=c.seconds("max_ttl", _CACHE.max_ttl),
        negative_max_ttl=c.seconds("negative_max_ttl", _CACHE.negative_max_ttl, zero_ok=True),
        failure_ttl=c.seconds("failure_ttl", _CACHE.failure_ttl, zero_ok=True),
        max_entries=c.integer("max_entries", _CACHE.max_entries),
    )
    c.done()
    if cache.min_ttl > cache.max_ttl:
        raise c.error("min_ttl", "must not exceed dns.cache.max_ttl")
    selftest = _selftest(d.section("selftest"))
    config = DnsConfig(
        resolvers=resolvers,
        trusted=trusted,
        timeout=d.seconds("timeout", _DNS.timeout),
        budget=d.seconds("budget", _DNS.budget),
        max_queries=d.integer("max_queries", _DNS.max_queries),
        cache=cache,
        selftest=selftest,
    )
    d.done()
    return config


def _policy(top: _Section) -> PolicyConfig:
    p = top.section("policy")
    default = p.choice("default", Level, Level.DANE)
    if default is Level.FINGERPRINT:
        raise p.error("default", "fingerprint needs pins: use it in an entry with "
                                 "fingerprints")
    entries = tuple(_policy_entry(p.source, path, item) for path, item in p.items("entries"))
    recipients = tuple(_recipient_policy(p.source, path, item)
                       for path, item in p.items("recipients"))
    p.done()
    return PolicyConfig(default, entries, recipients)


def _recipient_policy(source: str, path: str, data: object) -> RecipientPolicy:
    s = _Section(source, path, data)
    if not s.has("domain"):
        raise s.error("domain", "is required")
    raw = s.raw("domain")
    domain = _hostname(raw) if isinstance(raw, str) else None
    if domain is None:
        raise s.error("domain", "not a domain name or .suffix")
    sts = _sts_use(s)
    # An entry that says only mta_sts asks nothing else of the hop.
    level: Level | None = s.choice("level", Level, Level.ENCRYPT) \
        if s.has("level") or sts is None else None
    s.done()
    if level not in (Level.ENCRYPT, Level.DANE_ONLY, None):
        raise s.error("level", "must be one of: encrypt, dane-only")
    return RecipientPolicy(domain, level, sts)


def state_file(setting: str | None, key: str, name: str) -> tuple[str | None, str]:
    """The file a ``path | auto | null`` setting names and, when there is none, why (for
    the log): ``auto`` is ``name`` in systemd's state directory ($STATE_DIRECTORY, the first
    of its colon-separated list), memory only without one."""
    if setting is None:
        return None, f"{key} is null"
    if setting != "auto":
        return setting, ""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if not state:
        return None, f"{key} is auto and STATE_DIRECTORY is not set"
    return os.path.join(state, name), ""


def _tlsrpt(top: _Section) -> TlsRpt:
    t = top.section("tlsrpt")
    relay = parse_endpoint(t.raw("relay"), t.source, "tlsrpt.relay") \
        if t.has("relay") and t.raw("relay") is not None else None
    rpt = TlsRpt(
        enabled=t.boolean("enabled", _RPT.enabled),
        organization=t.string("organization", "") if t.has("organization") else "",
        contact=t.string("contact", "") if t.has("contact") else "",
        sender=t.string("sender", "") if t.has("sender") else "",
        relay=relay,
        store=t.state_file("store", _RPT.store),
        ca_file=t.optional_path("ca_file"),
        max_domains=t.integer("max_domains", _RPT.max_domains),
        send_after=t.seconds("send_after", _RPT.send_after, zero_ok=True),
        timeout=t.seconds("timeout", _RPT.timeout),
    )
    t.done()
    if rpt.enabled:
        for key in ("organization", "contact", "sender"):
            if not getattr(rpt, key):
                raise t.error(key, "is required when tlsrpt.enabled is true")
        if "@" not in rpt.sender or any(c in rpt.sender for c in "<> \t\r\n"):
            raise t.error("sender", "must be an address user@domain")
    if rpt.send_after >= 86400:
        raise t.error("send_after", "must be less than a day (86400 s)")
    return rpt


def _mta_sts(top: _Section) -> MtaSts:
    m = top.section("mta_sts")
    sts = MtaSts(enabled=m.boolean("enabled", _STS.enabled),
                 cache=m.state_file("cache", _STS.cache), ca_file=m.optional_path("ca_file"),
                 fetch_timeout=m.seconds("fetch_timeout", _STS.fetch_timeout),
                 max_policies=m.integer("max_policies", _STS.max_policies))
    m.done()
    return sts


def parse(data: object, source: str = "<config>") -> Config:
    """Validates a loaded YAML document; raises ConfigError naming the key path."""
    top = _Section(source, "", data)

    listeners: list[Listener] = []
    endpoints: set[Endpoint] = set()
    for path, item in top.items("listeners"):
        listener = _listener(source, path, item)
        if listener.endpoint in endpoints:
            raise ConfigError(source, path, f"duplicate listener {listener.endpoint}")
        endpoints.add(listener.endpoint)
        listeners.append(listener)
    if not listeners:
        raise top.error("listeners", "at least one listener is required")

    u = top.section("upstream")
    src4 = u.address("source_ipv4")
    src6 = u.address("source_ipv6")
    if src4 is not None and src4.version != 4:
        raise u.error("source_ipv4", "must be an IPv4 address")
    if src6 is not None and src6.version != 6:
        raise u.error("source_ipv6", "must be an IPv6 address")
    upstream = Upstream(
        mark=u.integer("mark", _UPSTREAM.mark, 0, 0xFFFFFFFF),
        source_ipv4=src4 if isinstance(src4, ipaddress.IPv4Address) else None,
        source_ipv6=src6 if isinstance(src6, ipaddress.IPv6Address) else None,
        on_failure=u.choice("on_failure", FailureSignal, _UPSTREAM.on_failure),
    )
    u.done()

    lim = top.section("limits")
    limits = Limits(
        max_sessions=lim.integer("max_sessions", _LIMITS.max_sessions),
        buffer_bytes=lim.integer("buffer_bytes", _LIMITS.buffer_bytes, 4096, 64 * 1024 * 1024),
    )
    lim.done()

    t = top.section("timeouts")
    timeouts = Timeouts(
        connect=t.seconds("connect", _TIMEOUTS.connect),
        idle=t.seconds("idle", _TIMEOUTS.idle),
        session=t.seconds("session", _TIMEOUTS.session),
        drain=t.seconds("drain", _TIMEOUTS.drain),
    )
    t.done()

    m = top.section("metrics")
    listen = _METRICS.listen
    if m.has("listen"):
        raw = m.raw("listen")
        listen = None if raw is None else parse_endpoint(raw, source, "metrics.listen")
    m.done()

    lg = top.section("log")
    level = lg.string("level", _LOGGING.level).upper()
    if level not in _LOG_LEVELS:
        raise lg.error("level", f"must be one of: {', '.join(_LOG_LEVELS)}")
    logging_ = Logging(format=lg.choice("format", LogFormat, _LOGGING.format), level=level)
    lg.done()

    dns_config = _dns(top)
    policy = _policy(top)
    mta_sts = _mta_sts(top)
    tlsrpt = _tlsrpt(top)
    workers = 1
    if top.has("workers"):
        raw_workers = top.raw("workers")
        if raw_workers == "auto":
            workers = os.cpu_count() or 1
        elif (isinstance(raw_workers, int) and not isinstance(raw_workers, bool)
              and 1 <= raw_workers <= 256):
            workers = raw_workers
        else:
            raise top.error("workers", "must be auto or an integer from 1 to 256")
    t = top.section("tls")
    keys = TlsKeys(*(t.string(k, "") or None for k in ("key", "cert", "next_key", "next_cert")))
    t.done()
    if bool(keys.key) != bool(keys.cert):
        raise t.error("cert" if keys.key else "key", "key and cert go together")
    if bool(keys.next_key) != bool(keys.next_cert):
        raise t.error("next_cert" if keys.next_key else "next_key",
                      "next_key and next_cert go together")
    for i, lst in enumerate(listeners):
        if lst.client_address is ClientAddress.TRANSPARENT and any(
                u.host.version != lst.address.version for u in lst.upstreams):
            raise ConfigError(source, f"listeners[{i}].upstreams",
                              "transparent mode connects from the client's address: every "
                              "MTA must be of the listener's address family")
        if (lst.direction is Direction.INBOUND and lst.starttls is StartTls.OFFLOAD
                and not keys.key):
            raise ConfigError(source, f"listeners[{i}].starttls",
                              "offload needs tls.key and tls.cert (see smtpgate keygen)")
    top.done()
    return Config(
        listeners=tuple(listeners),
        upstream=upstream,
        limits=limits,
        timeouts=timeouts,
        metrics=Metrics(listen),
        logging=logging_,
        dns=dns_config,
        policy=policy,
        tls=keys,
        mta_sts=mta_sts,
        tlsrpt=tlsrpt,
        workers=workers,
        source=source,
    )


MAX_CONFIG_BYTES = 1 << 20  # far beyond any real config; bounds the time a file can take
MAX_DEPTH = 100  # no config nests deeper than a handful of levels

class _Loader(yaml.SafeLoader):
    """``safe_load``, stricter where YAML 1.1 surprises an operator: a repeated key is an
    error, not a silent win; an integer with a leading zero (octal in YAML 1.1) or with
    colons (base 60) is refused rather than read as another number."""


def _strict_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            repeated = key in seen
        except TypeError:
            continue  # unhashable: construct_mapping says so
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"found a repeated key {key!r}: the second would silently win",
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


def _number(kind: str) -> Callable[[yaml.SafeLoader, yaml.ScalarNode], Any]:
    construct = getattr(yaml.constructor.SafeConstructor, f"construct_yaml_{kind}")

    def strict(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        text = str(node.value).replace("_", "")
        if ":" in text:
            problem = "digits with ':' are a base-60 number in YAML; write the number plainly"
        elif re.fullmatch(r"[-+]?0[0-9]+", text):
            problem = "a number with a leading zero is octal in YAML; write it without the zero"
        else:
            return construct(loader, node)
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.value}: {problem} (or quote it to mean the text)",
            node.start_mark)
    return strict


_Loader.add_constructor("tag:yaml.org,2002:map", _strict_mapping)
_Loader.add_constructor("tag:yaml.org,2002:int", _number("int"))
_Loader.add_constructor("tag:yaml.org,2002:float", _number("float"))


_OPEN = (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken,
         yaml.BlockSequenceStartToken, yaml.BlockMappingStartToken)
_CLOSE = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)


def _yaml(text: str) -> object:
    """The document in ``text``; yaml.YAMLError (with a mark where there is one).

    The nesting is measured on the scanner's tokens first: the parser and constructors
    recurse once per level, and 5,000 levels would exhaust Python's stack."""
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise yaml.constructor.ConstructorError(
                    None, None, f"nested more than {MAX_DEPTH} deep", token.start_mark)
        elif isinstance(token, _CLOSE):
            depth -= 1
    return yaml.load(text, Loader=_Loader)  # a SafeLoader


def load(path: str | Path) -> Config:
    """Reads and validates a config file; every failure is a ConfigError naming the file."""
    source = str(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(source, "", f"is {size} bytes: a config file is at most "
                                          f"{MAX_CONFIG_BYTES} bytes")
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "", "is not UTF-8 text") from None
    try:
        data = _yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", _yaml_problem(exc, text)) from None
    return parse(data, source)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """One line: where, and what."""
    mark = getattr(exc, "problem_mark", None)
    problem = str(getattr(exc, "problem", None) or "invalid YAML")
    position = getattr(exc, "position", None)  # a ReaderError: a character YAML refuses
    if mark is None and isinstance(position, int):
        line = text.count("\n", 0, position)
        column = position - (text.rfind("\n", 0, position) + 1)
        return (f"line {line + 1}, column {column + 1}: a NUL byte (or another control "
                "character) is not allowed")
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"{where}{problem}"

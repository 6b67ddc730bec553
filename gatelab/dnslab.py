"""A real, offline DNSSEC world for tests: NSD serves signed lab zones, Unbound validates.

Shape::

    [server_ns]  nsd -d          authoritative for "." and every declared zone,
                                 on server_v4 / server_v6 port 53
    [resolver_ns] unbound -d     validating resolver on 127.0.0.1 / ::1 port 53,
                                 root-hints -> the lab root, trust anchor = lab root DS

Everything is made under a work directory: one ECDSAP256SHA256 (algorithm 13) key per
signed zone (``ldns-keygen``; a single key with the SEP bit, a "CSK", that signs every
RRset), zone files signed offline with ``ldns-signzone`` so the signature inception and
expiration are ours to choose, ``nsd.conf`` and ``unbound.conf``. Both daemons are our
children (started with ``ip netns exec``, stopped by PID); nothing on the host is
started, stopped or changed. Nothing goes to the internet: the only root server is
ours.

Zones and delegation:

* The lab root zone "." always exists (signed; its DS is Unbound's static trust anchor).
  ``zone(".", records)`` adds records to it.
* A declared zone is delegated by its **nearest declared ancestor zone**, else by the
  root. The names in between are empty non-terminals of that parent: declaring only
  "113.0.203.in-addr.arpa." makes the root delegate it directly (no "arpa." zone needed);
  declare "test." and "b.test." and "b.test." is delegated by "test.". Declare
  intermediate zones yourself only when you want them as zones of their own.
* Every zone gets a SOA, ``NS ns1.<zone>`` and ``ns1.<zone>`` A/AAAA (the server
  addresses); the parent gets the NS, the glue and, when the child is signed and
  ``delegate_secure``, the child's DS (SHA-256). The root's name server is
  ``a.root-servers.lab.`` (so "lab." cannot be declared).
* Status a validating resolver sees: secure = signed zone whose whole chain up to the
  root has DS records; insecure = a zone below a delegation without DS (unsigned child,
  ``delegate_secure=False``, or :meth:`DnsWorld.make_insecure`); bogus = a secure
  delegation whose signatures do not validate (:meth:`DnsWorld.make_bogus`: re-signed
  with signatures that expired days ago, beyond Unbound's clock-skew allowance).

Records are zone-file lines, exactly as in a zone file with ``$ORIGIN <zone>`` and
``$TTL <ttl>`` in effect: relative or absolute owners, ``@`` for the apex, a line
starting with blanks continues the previous owner (the first such line: the apex).
They are parsed by dnspython first, so a bad record fails in :meth:`DnsWorld.zone` /
:meth:`DnsWorld.update` with the zone's name in the message, not in NSD's log.

Unbound's default "static" local zones for the documentation ranges and RFC 6761 names
("test.", "invalid.", 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32 reverse)
and for every declared zone and its ancestors are switched off (``nodefault``), so
those names are resolved in the lab world instead of being answered locally.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rdtypes.ANY.SOA
import dns.zone

from gatelab.netlab import (
    PEER_NET_V4,
    PEER_V4,
    CommandError,
    Lab,
    Netns,
    alive,
    descendants,
    wait_port,
)
from gateway.dane import tlsa_record

# Where DnsWorld.on_lab() puts the authoritative server (on the peer's eth0).
DNS_V4 = "203.0.113.53"
DNS_V6 = "2001:db8:2::53"
RESOLVER_V4 = "127.0.0.1"
RESOLVER_V6 = "::1"

ROOT_NS = "a.root-servers.lab."
NS_LABEL = "ns1"
ALGORITHM = "ECDSAP256SHA256"  # DNSSEC algorithm 13

# Unbound answers these itself by default (RFC 6761 / AS112 / documentation ranges);
# in the lab they are ordinary names under the lab root.
UNBOUND_NODEFAULT = (
    "test.",
    "invalid.",
    "2.0.192.in-addr.arpa.",
    "100.51.198.in-addr.arpa.",
    "113.0.203.in-addr.arpa.",
    "8.b.d.0.1.0.0.2.ip6.arpa.",
)

# Valid signatures: from an hour ago for 30 days. Expired ones (make_bogus): ended a
# week ago; Unbound tolerates at most val-sig-skew-max (default 1 day) of skew.
VALID_BEFORE = timedelta(hours=1)
VALID_FOR = timedelta(days=30)
EXPIRED_INCEPTION = timedelta(days=30)
EXPIRED_EXPIRATION = timedelta(days=7)

TOOLS = ("nsd", "nsd-control", "unbound", "unbound-control", "ldns-keygen", "ldns-signzone")

# `nsd -d` forks: the process we start becomes xfrd, its child "main" forks the
# servers. On SIGTERM, main exits without waiting for the servers, which end as orphans
# (zombies of PID 1 for a while). NSD therefore runs under this small reaper: a child
# subreaper that forwards SIGTERM/SIGINT/SIGHUP to NSD and exits once every descendant
# has been reaped, so stop() returns with nothing of NSD left.
REAPER = r"""
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
child = 0
def forward(signum, frame):
    if child:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)
child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
code = 0
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""

_live: list[DnsWorld] = []
_live_lock = threading.Lock()


class DnsLabError(RuntimeError):
    """A daemon of the DNS world failed; the message carries its log tail."""


class QueryResult(NamedTuple):
    """What a test asserts on: ``rcode, ad, answers = world.query(...)``."""

    rcode: str  # "NOERROR", "NXDOMAIN", "SERVFAIL", ...
    ad: bool  # the resolver's Authenticated Data bit
    answers: list[str]  # rdata text of the answer RRs of the queried type, sorted


def dnslab_usable() -> str | None:
    """None when the DNS world can run here, else why not (for skip())."""
    if os.geteuid() != 0:
        return "the DNS lab needs root (network namespaces, port 53)"
    missing = [t for t in TOOLS if shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install nsd unbound ldnsutils)"
    return None


def reverse_zone(network: str) -> str:
    """Reverse zone of a network on an octet/nibble boundary.

    ``"203.0.113.0/24"`` -> ``"113.0.203.in-addr.arpa."``,
    ``"2001:db8:2::/64"`` -> ``"2.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."``.
    """
    net = ipaddress.ip_network(network, strict=True)
    step = 8 if net.version == 4 else 4
    if net.prefixlen % step:
        raise ValueError(f"{network}: prefix not on a {step}-bit boundary")
    full = dns.name.from_text(net.network_address.reverse_pointer)
    drop = (net.max_prefixlen - net.prefixlen) // step
    return dns.name.Name(full.labels[drop:]).to_text()


def ptr_name(address: str) -> str:
    """``"203.0.113.2"`` -> ``"2.113.0.203.in-addr.arpa."``."""
    return ipaddress.ip_address(address).reverse_pointer + "."


# The lab's DANE destination (see dane_destination): the peer's name.
DANE_HOST = "mx.b.test"


def dane_destination(world: DnsWorld, cert_der: bytes) -> str:
    """Declares the lab's DANE destination in ``world``: mx.b.test at the peer (PEER_V4)
    with a TLSA 3 1 1 record for the key in ``cert_der``, b.test's MX, and the peer's PTR
    (the zones ``test.`` and the peer network's reverse zone).  Returns the TLSA rdata."""
    rdata = str(tlsa_record(cert_der))
    world.zone("test.", [f"mx.b A {PEER_V4}", f"_25._tcp.mx.b TLSA {rdata}", "b MX 10 mx.b"])
    world.zone(reverse_zone(PEER_NET_V4), [f"{ptr_name(PEER_V4)} PTR {DANE_HOST}."])
    return rdata


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name if name.endswith(".") else name + ".")


def _family(host: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text.splitlines()[-lines:])


def _run(args: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=False, **kw)
    if cp.returncode != 0:
        raise CommandError(cp.returncode, cp.args, cp.stdout, cp.stderr)
    return cp


def exchange(
    ns: Netns, query: dns.message.Message, server: str, port: int = 53, timeout: float = 5.0
) -> dns.message.Message:
    """Send ``query`` from inside ``ns`` (UDP, TCP if truncated); in-process sockets."""
    udp = ns.socket(_family(server), socket.SOCK_DGRAM)
    with udp:
        udp.setblocking(False)
        response = dns.query.udp(query, server, timeout=timeout, port=port, sock=udp)
    if response.flags & dns.flags.TC:
        tcp = ns.connect(server, port, timeout=timeout)
        with tcp:
            tcp.setblocking(False)
            response = dns.query.tcp(query, server, timeout=timeout, port=port, sock=tcp)
    return response


@dataclass
class _Zone:
    name: dns.name.Name
    records: list[str]
    signed: bool
    delegate_secure: bool
    ttl: int
    serial: int = 0
    expired: bool = False  # signed with expired signatures (bogus)
    key: str = ""  # ldns key base name (in the keys directory)
    dnskey: dns.rdtypes.ANY.DNSKEY.DNSKEY | None = None
    mtime_ns: int = 0
    children: list[_Zone] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.name.to_text()

    @property
    def file_stem(self) -> str:
        return "root" if self.name == dns.name.root else self.text.rstrip(".")


class DnsWorld:
    """NSD (authoritative, signed lab zones) + Unbound (validating), in namespaces.

    Use as a context manager; declare zones with :meth:`zone`, then :meth:`start`::

        with DnsWorld.on_lab(lab) as world:
            world.zone("test.", ["mx.b A 203.0.113.2"])
            world.start()
            assert world.query("mx.b.test.", "A").ad
    """

    def __init__(
        self,
        server_ns: Netns,
        server_v4: str,
        server_v6: str | None,
        resolver_ns: Netns,
        workdir: Path | str | None = None,
        *,
        server_dev: str | None = None,
        resolver_listen: Sequence[str] = (),
        ttl: int = 60,
        cache_max_ttl: int = 60,
        cache_max_negative_ttl: int = 10,
        keep_files: bool = False,
    ) -> None:
        """
        server_dev: when given, server_v4/32 and server_v6/128 are added to that device in
            server_ns at start() and removed at stop(); otherwise they must exist already.
        resolver_listen: extra addresses (in resolver_ns) Unbound answers on, besides
            127.0.0.1 and ::1 (e.g. the gateway's MTA-side address for the MTA).
        workdir: a directory to work in (a fresh subdirectory is made there), default a
            temporary directory; removed by stop() unless keep_files.
        ttl: default TTL of every record (SOA minimum too); zone() can override.
        """
        self.server_ns = server_ns
        self.server_v4 = server_v4
        self.server_v6 = server_v6
        self.resolver_ns = resolver_ns
        self.server_dev = server_dev
        self.resolver_listen = list(resolver_listen)
        self.ttl = ttl
        self.cache_max_ttl = cache_max_ttl
        self.cache_max_negative_ttl = cache_max_negative_ttl
        self.keep_files = keep_files
        base = Path(workdir) if workdir is not None else None
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="dnslab-", dir=base))
        # Unix control sockets: sun_path is 108 bytes, a pytest tmp_path can be longer.
        self._sockdir = Path(tempfile.mkdtemp(prefix="dnslab-", dir="/tmp"))
        self.keys_dir = self.workdir / "keys"
        self.zones_dir = self.workdir / "zones"
        self.nsd_conf = self.workdir / "nsd.conf"
        self.nsd_log = self.workdir / "nsd.log"
        self.unbound_conf = self.workdir / "unbound.conf"
        self.unbound_log = self.workdir / "unbound.log"
        self.trust_anchor_file = self.workdir / "root.ds"
        self.root_hints_file = self.workdir / "root.hints"
        self._zones: dict[dns.name.Name, _Zone] = {}
        self._nsd: subprocess.Popen[Any] | None = None
        self._unbound: subprocess.Popen[Any] | None = None
        self._addresses: list[str] = []
        self._started = False
        self._stopped = False
        self._lock = threading.RLock()
        try:
            self.zone(".", [])  # the lab root, with its key (the trust anchor)
        except BaseException:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        with _live_lock:
            _live.append(self)

    @classmethod
    def on_lab(cls, lab: Lab, workdir: Path | str | None = None, **kw: Any) -> DnsWorld:
        """NSD on the peer side (DNS_V4/DNS_V6 on peer eth0), Unbound in gw."""
        return cls(lab.peer, DNS_V4, DNS_V6, lab.gw, workdir, server_dev="eth0", **kw)

    # -- declaring -------------------------------------------------------------------

    def zone(
        self,
        name: str,
        records: Iterable[str] = (),
        *,
        signed: bool = True,
        delegate_secure: bool = True,
        ttl: int | None = None,
    ) -> None:
        """Declare a zone (before start()). ``"."`` adds records to the lab root."""
        with self._lock:
            if self._started:
                raise RuntimeError("declare zones before start()")
            zname = _absolute(name)
            lab = dns.name.from_text("lab.")
            if zname != dns.name.root and (zname.is_subdomain(lab) or lab.is_subdomain(zname)):
                raise ValueError(f"{name}: 'lab.' is reserved for the lab root server name")
            if zname == dns.name.root and not signed:
                raise ValueError("the lab root is always signed (it is the trust anchor)")
            existing = self._zones.get(zname)
            if existing is not None and zname != dns.name.root:
                raise ValueError(f"zone {name} declared twice")
            z = _Zone(zname, list(records), signed, delegate_secure, self.ttl)
            if ttl is not None:
                z.ttl = ttl
            if existing is not None:  # the root, declared again: keep its key
                z.key, z.dnskey = existing.key, existing.dnskey
            elif signed:
                self._keygen(z)
            self._zones[zname] = z
            self._link()
            try:
                self._zone_text(z)  # parse now: a bad record fails here, naming the zone
            except ValueError:
                if existing is None:
                    del self._zones[zname]
                else:
                    self._zones[zname] = existing
                self._link()
                raise

    def _link(self) -> None:
        for z in self._zones.values():
            z.children = []
        for z in self._zones.values():
            if z.name != dns.name.root:
                self._parent(z).children.append(z)

    def _parent(self, z: _Zone) -> _Zone:
        up = z.name
        while up != dns.name.root:
            up = up.parent()
            if up in self._zones:
                return self._zones[up]
        raise AssertionError("unreachable: the root zone always exists")

    def _get(self, name: str) -> _Zone:
        z = self._zones.get(_absolute(name))
        if z is None:
            raise KeyError(f"no zone {name!r} declared (zones: {self.zones})")
        return z

    @property
    def zones(self) -> list[str]:
        return sorted(z.text for z in self._zones.values())

    # -- zone files --------------------------------------------------------------------

    def _ns_name(self, z: _Zone) -> dns.name.Name:
        if z.name == dns.name.root:
            return dns.name.from_text(ROOT_NS)
        return dns.name.Name((NS_LABEL.encode(), *z.name.labels))

    def _addr_lines(self, owner: dns.name.Name, ttl: int) -> list[str]:
        lines = [f"{owner} {ttl} IN A {self.server_v4}"]
        if self.server_v6:
            lines.append(f"{owner} {ttl} IN AAAA {self.server_v6}")
        return lines

    def _zone_text(self, z: _Zone) -> str:
        """The unsigned zone, validated and normalised (absolute names) by dnspython."""
        ns = self._ns_name(z)
        rname = dns.name.Name((b"hostmaster", *z.name.labels))
        own = [
            f"{z.name} {z.ttl} IN SOA {ns} {rname} {z.serial} 60 60 600 {z.ttl}",
            f"{z.name} {z.ttl} IN NS {ns}",
            *self._addr_lines(ns, z.ttl),
        ]
        for child in z.children:
            child_ns = self._ns_name(child)
            own.append(f"{child.name} {z.ttl} IN NS {child_ns}")
            own.extend(self._addr_lines(child_ns, z.ttl))
            if z.signed and child.signed and child.delegate_secure:
                own.append(f"{child.name} {z.ttl} IN DS {self._ds(child)}")
        head = [f"$ORIGIN {z.name}", f"$TTL {z.ttl}"]

        def parse(lines: list[str], origin: dns.name.Name) -> dns.zone.Zone:
            text = "\n".join([*head, *lines]) + "\n"
            try:
                return dns.zone.from_text(text, origin, relativize=False, check_origin=False)
            except (dns.exception.DNSException, KeyError, ValueError) as exc:
                # ValueError: dnspython's "add() has non-origin SOA".
                why = "give no SOA record, the lab makes it" if "SOA" in str(exc) else exc
                raise ValueError(f"zone {z.text}: {why}") from exc

        # dnspython silently drops records outside the zone's origin: parse the caller's
        # lines alone under the root to see them. (The sentinel gives a leading
        # continuation line the apex as owner, as in the real parse.)
        theirs = parse(["@ 0 IN TYPE65280 \\# 0", *z.records], dns.name.root)
        outside = sorted(str(n) for n in theirs.nodes if not n.is_subdomain(z.name))
        if outside:
            raise ValueError(f"zone {z.text}: names outside the zone: {outside}")
        if theirs.get_rdataset(z.name, dns.rdatatype.SOA) is not None:
            raise ValueError(f"zone {z.text}: give no SOA record, the lab makes it")
        # The caller's lines first, so a continuation line cannot attach to ours.
        parsed = parse([*z.records, *own], z.name)
        return parsed.to_text(relativize=False)

    def _ds(self, z: _Zone) -> str:
        if z.dnskey is None:
            raise AssertionError(f"no key yet for {z.text}")
        return dns.dnssec.make_ds(z.name, z.dnskey, "SHA256").to_text()

    def _keygen(self, z: _Zone) -> None:
        self.keys_dir.mkdir(exist_ok=True)
        base = _run(["ldns-keygen", "-a", ALGORITHM, "-k", z.text], cwd=self.keys_dir)
        z.key = base.stdout.strip()
        line = (self.keys_dir / f"{z.key}.key").read_text().split(";", 1)[0].split()
        rdata = " ".join(line[line.index("DNSKEY") + 1 :])
        key = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.DNSKEY, rdata)
        assert isinstance(key, dns.rdtypes.ANY.DNSKEY.DNSKEY)
        z.dnskey = key

    def _write(self, z: _Zone) -> Path:
        """Sign (or not) ``z`` with a new serial; atomically replace its served file."""
        self.zones_dir.mkdir(exist_ok=True)
        z.serial += 1
        unsigned = self.zones_dir / f"{z.file_stem}.zone"
        served = self.zones_dir / f"{z.file_stem}.served"
        unsigned.write_text(self._zone_text(z))
        tmp = served.with_suffix(".tmp")
        if z.signed:
            now = datetime.now(UTC)
            if z.expired:
                inception, expiration = now - EXPIRED_INCEPTION, now - EXPIRED_EXPIRATION
            else:
                inception, expiration = now - VALID_BEFORE, now + VALID_FOR
            # fmt: off
            _run(["ldns-signzone", "-i", _stamp(inception), "-e", _stamp(expiration),
                  "-o", z.text, "-f", str(tmp), str(unsigned), z.key], cwd=self.keys_dir)
            # fmt: on
        else:
            shutil.copyfile(unsigned, tmp)
        # NSD re-reads a zone file only when its mtime changed: make it strictly newer.
        z.mtime_ns = max(time.time_ns(), z.mtime_ns + 1_000_000_000)
        os.utime(tmp, ns=(z.mtime_ns, z.mtime_ns))
        tmp.replace(served)
        return served

    # -- configuration -----------------------------------------------------------------

    def _write_nsd_conf(self) -> None:
        state = self.workdir / "nsd"
        (state / "xfr").mkdir(parents=True, exist_ok=True)
        addrs = [self.server_v4, *([self.server_v6] if self.server_v6 else [])]
        lines = [
            "server:",
            *[f"    ip-address: {a}" for a in addrs],
            "    port: 53",
            "    server-count: 1",
            '    username: ""',
            '    chroot: ""',
            '    database: ""',
            f'    zonesdir: "{self.zones_dir}"',
            f'    zonelistfile: "{state / "zone.list"}"',
            f'    xfrdfile: "{state / "xfrd.state"}"',
            f'    xfrdir: "{state / "xfr"}"',
            f'    pidfile: "{state / "nsd.pid"}"',
            f'    logfile: "{self.nsd_log}"',
            "    verbosity: 2",
            "    hide-version: yes",
            "    reuseport: no",
            "    refuse-any: no",
            "remote-control:",
            "    control-enable: yes",
            f'    control-interface: "{self._sockdir / "nsd.ctl"}"',
        ]
        for z in sorted(self._zones.values(), key=lambda z: z.name):
            lines += ["zone:", f'    name: "{z.text}"', f'    zonefile: "{z.file_stem}.served"']
        self.nsd_conf.write_text("\n".join(lines) + "\n")

    def _write_unbound_conf(self) -> None:
        root = self._zones[dns.name.root]
        self.trust_anchor_file.write_text(f". IN DS {self._ds(root)}\n")
        hints = [
            f". 3600000 IN NS {ROOT_NS}",
            *self._addr_lines(dns.name.from_text(ROOT_NS), 3600000),
        ]
        self.root_hints_file.write_text("\n".join(hints) + "\n")
        nodefault = set(UNBOUND_NODEFAULT)
        for z in self._zones.values():
            name = z.name
            while name != dns.name.root:
                nodefault.add(name.to_text())
                name = name.parent()
        listen = [RESOLVER_V4, RESOLVER_V6, *self.resolver_listen]
        server_ips = [self.server_v4, *([self.server_v6] if self.server_v6 else [])]
        loopback = any(ipaddress.ip_address(a).is_loopback for a in server_ips)
        lines = [
            "server:",
            *[f"    interface: {a}" for a in listen],
            "    port: 53",
            "    do-ip4: yes",
            "    do-ip6: yes",
            "    access-control: 0.0.0.0/0 allow",
            "    access-control: ::/0 allow",
            '    chroot: ""',
            '    username: ""',
            f'    directory: "{self.workdir}"',
            f'    logfile: "{self.unbound_log}"',
            "    use-syslog: no",
            "    log-time-ascii: yes",
            "    verbosity: 1",
            "    val-log-level: 2",
            "    log-servfail: yes",
            "    num-threads: 1",
            "    so-reuseport: no",
            f'    root-hints: "{self.root_hints_file}"',
            f'    trust-anchor-file: "{self.trust_anchor_file}"',
            '    module-config: "validator iterator"',
            "    harden-dnssec-stripped: yes",
            f"    cache-max-ttl: {self.cache_max_ttl}",
            f"    cache-max-negative-ttl: {self.cache_max_negative_ttl}",
            "    val-bogus-ttl: 5",
            "    infra-host-ttl: 60",
            "    infra-keep-probing: yes",
            "    prefetch: no",
            *([] if not loopback else ["    do-not-query-localhost: no"]),
            *[f'    local-zone: "{n}" nodefault' for n in sorted(nodefault)],
            "remote-control:",
            "    control-enable: yes",
            f'    control-interface: "{self._sockdir / "unbound.ctl"}"',
        ]
        self.unbound_conf.write_text("\n".join(lines) + "\n")

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        """Generate keys, sign, start NSD and Unbound; returns once the root validates."""
        with self._lock:
            if self._started:
                raise RuntimeError("already started")
            self._started = True
            try:
                self._start(timeout)
            except BaseException:
                self.stop()
                raise

    def _start(self, timeout: float) -> None:
        for z in self._zones.values():
            self._write(z)
        self._write_nsd_conf()
        self._write_unbound_conf()
        if self.server_dev is not None:
            for addr in [self.server_v4, *([self.server_v6] if self.server_v6 else [])]:
                v6 = ":" in addr
                cidr = f"{addr}/128" if v6 else f"{addr}/32"
                self.server_ns.ip(
                    "addr", "add", cidr, "dev", self.server_dev, *(["nodad"] if v6 else [])
                )
                self._addresses.append(cidr)
        deadline = time.monotonic() + timeout
        nsd_err = (self.workdir / "nsd.stderr").open("wb")
        with nsd_err:
            self._nsd = self.server_ns.popen(
                [sys.executable, "-c", REAPER, "nsd", "-d", "-c", str(self.nsd_conf)],
                stdin=subprocess.DEVNULL,
                stdout=nsd_err,
                stderr=subprocess.STDOUT,
            )
        # TCP first: a UDP query sent before the daemon listens would just time out.
        self._wait_tcp(self.server_ns, self.server_v4, deadline)
        for z in self._zones.values():
            self._wait_serial(z, deadline)
        ub_err = (self.workdir / "unbound.stderr").open("wb")
        with ub_err:
            self._unbound = self.resolver_ns.popen(
                ["unbound", "-d", "-p", "-c", str(self.unbound_conf)],
                stdin=subprocess.DEVNULL,
                stdout=ub_err,
                stderr=subprocess.STDOUT,
            )
        self._wait_tcp(self.resolver_ns, RESOLVER_V4, deadline)
        self._wait_resolver(deadline)

    def _wait_tcp(self, ns: Netns, host: str, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                wait_port(ns, host, 53, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise

    def _check_alive(self) -> None:
        for proc, what, logs in (
            (self._nsd, "nsd", ("nsd.stderr", "nsd.log")),
            (self._unbound, "unbound", ("unbound.stderr", "unbound.log")),
        ):
            if proc is not None and proc.poll() is not None:
                tails = "\n".join(_tail(self.workdir / log) for log in logs)
                raise DnsLabError(f"{what} exited with {proc.returncode}:\n{tails}")

    def _wait_serial(self, z: _Zone, deadline: float) -> None:
        """Until NSD serves ``z`` with its current serial (after start or a reload)."""
        last: object = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                msg = exchange(
                    self.server_ns,
                    dns.message.make_query(z.name, "SOA"),
                    self.server_v4,
                    timeout=0.5,
                )
                rrset = msg.get_rrset(msg.answer, z.name, dns.rdataclass.IN, dns.rdatatype.SOA)
                if rrset is not None:
                    soa = rrset[0]
                    assert isinstance(soa, dns.rdtypes.ANY.SOA.SOA)
                    if soa.serial == z.serial:
                        return
                    last = f"serial {soa.serial}"
                else:
                    last = dns.rcode.to_text(msg.rcode())
            except (OSError, dns.exception.DNSException) as exc:
                last = exc
            time.sleep(0.02)
        raise DnsLabError(
            f"nsd does not serve {z.text} serial {z.serial} ({last}):\n{_tail(self.nsd_log)}"
        )

    def _wait_resolver(self, deadline: float) -> None:
        last: object = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                result = self.query(".", "SOA", timeout=1.0)
                if result.rcode == "NOERROR" and result.ad:
                    return
                last = result
            except (OSError, dns.exception.DNSException) as exc:
                last = exc
            time.sleep(0.05)
        raise DnsLabError(
            f"unbound does not validate the lab root ({last}):\n{_tail(self.unbound_log)}"
        )

    def stop(self) -> None:
        """Stop both daemons (by PID), remove added addresses and files. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            errors: list[BaseException] = []
            for ns, attr in ((self.resolver_ns, "_unbound"), (self.server_ns, "_nsd")):
                proc = getattr(self, attr)
                if proc is None:
                    continue
                try:
                    self._stop_tree(ns, proc)
                except BaseException as exc:
                    errors.append(exc)
                setattr(self, attr, None)
            for cidr in self._addresses:
                if self.server_ns.path.exists() and self.server_dev is not None:
                    # fmt: off
                    subprocess.run(
                        ["ip", "-n", self.server_ns.name, "addr", "del", cidr,
                         "dev", self.server_dev],
                        capture_output=True, check=False,
                    )
                    # fmt: on
            self._addresses.clear()
            shutil.rmtree(self._sockdir, ignore_errors=True)
            if not self.keep_files:
                shutil.rmtree(self.workdir, ignore_errors=True)
            with _live_lock, contextlib.suppress(ValueError):
                _live.remove(self)
            if errors:
                raise errors[0]

    @staticmethod
    def _stop_tree(ns: Netns, proc: subprocess.Popen[Any]) -> None:
        # Descendants are collected first, so any left behind are killed by their PIDs.
        children = descendants(proc.pid)
        ns.stop(proc, timeout=5)
        for pid in reversed(children):  # deepest first: a parent still alive reaps
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not alive(pid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                for _ in range(50):
                    if not alive(pid):
                        break
                    time.sleep(0.02)

    @property
    def pids(self) -> list[int]:
        """PIDs of the running daemons (NSD's forked children included)."""
        out = []
        for proc in (self._nsd, self._unbound):
            if proc is not None and proc.poll() is None:
                out += [proc.pid, *descendants(proc.pid)]
        return out

    def __enter__(self) -> DnsWorld:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- changing the world -------------------------------------------------------------

    def _require_running(self) -> None:
        if not self._started or self._stopped or self._nsd is None:
            raise RuntimeError("the DNS world is not running")

    def _republish(self, zones: Sequence[_Zone], flush: Sequence[_Zone]) -> None:
        """Re-sign ``zones``, make NSD load them, then flush ``flush`` from Unbound."""
        self._require_running()
        for z in zones:
            self._write(z)
        for z in zones:
            self._nsd_control("reload", z.text)
        deadline = time.monotonic() + 10
        for z in zones:
            self._wait_serial(z, deadline)
        for z in flush:
            self.flush(z.text)

    def update(self, name: str, records: Iterable[str]) -> None:
        """Replace a zone's records; re-sign (its current validity state kept), reload,
        flush Unbound's cache for the zone."""
        with self._lock:
            z = self._get(name)
            old = z.records
            z.records = list(records)
            try:
                self._zone_text(z)
            except ValueError:
                z.records = old
                raise
            self._republish([z], [z])

    def set_records(
        self, zone: str, owner: str, rdtype: str, rdatas: Iterable[str], ttl: int | None = None
    ) -> None:
        """Replace one RRset of a declared zone (``owner`` relative to it or absolute;
        no ``rdatas``: remove it), the zone's other records kept. Before start() this
        changes the declaration; once running, it is published as by :meth:`update`."""
        with self._lock:
            z = self._get(zone)
            name = dns.name.from_text(owner, z.name)
            qtype = dns.rdatatype.RdataType.make(rdtype)
            # The caller's lines as dnspython reads them (owners resolved, continuation
            # lines attached), minus the RRset, back as absolute zone-file lines.
            text = "\n".join([f"$ORIGIN {z.name}", f"$TTL {z.ttl}", *z.records]) + "\n"
            try:
                parsed = dns.zone.from_text(text, z.name, relativize=False, check_origin=False)
            except dns.exception.DNSException as exc:
                raise ValueError(f"zone {z.text}: {exc}") from exc
            parsed.delete_rdataset(name, qtype)
            kept = [line for line in parsed.to_text(relativize=False).splitlines() if line]
            new = [f"{name} {ttl or z.ttl} IN {qtype.name} {rd}" for rd in rdatas]
            old = z.records
            z.records = [*kept, *new]
            try:
                self._zone_text(z)
            except ValueError:
                z.records = old
                raise
            if self._started:
                self._republish([z], [z])

    def make_bogus(self, name: str) -> None:
        """Re-sign the zone with signatures that expired a week ago: under a secure
        delegation every answer from it is bogus (SERVFAIL; data only with CD)."""
        with self._lock:
            z = self._get(name)
            if not z.signed:
                raise ValueError(f"{name}: an unsigned zone cannot be bogus")
            z.expired = True
            self._republish([z], [z])

    def make_insecure(self, name: str) -> None:
        """Remove the zone's DS from its parent: the zone (still signed) becomes insecure."""
        with self._lock:
            z = self._get(name)
            if z.name == dns.name.root:
                raise ValueError("the root has no parent")
            z.delegate_secure = False
            self._republish([self._parent(z)], [z])

    def make_secure(self, name: str) -> None:
        """Undo make_bogus/make_insecure: valid signatures, DS back in the parent."""
        with self._lock:
            z = self._get(name)
            if not z.signed:
                raise ValueError(f"{name}: an unsigned zone cannot be secure")
            z.expired = False
            z.delegate_secure = True
            changed = [z] if z.name == dns.name.root else [z, self._parent(z)]
            self._republish(changed, [z])

    def flush(self, name: str | None = None) -> None:
        """Forget what Unbound knows at and below ``name`` (everything when None):
        RRsets, messages, validated keys, plus all bogus and negative entries."""
        self._require_running()
        self._unbound_control("flush_zone", _absolute(name).to_text() if name else ".")
        self._unbound_control("flush_bogus")
        self._unbound_control("flush_negative")

    def _nsd_control(self, *args: str) -> str:
        try:
            return _run(["nsd-control", "-c", str(self.nsd_conf), *args]).stdout
        except CommandError as exc:
            raise DnsLabError(f"{exc}\n{_tail(self.nsd_log)}") from exc

    def _unbound_control(self, *args: str) -> str:
        try:
            return _run(["unbound-control", "-c", str(self.unbound_conf), *args]).stdout
        except CommandError as exc:
            raise DnsLabError(f"{exc}\n{_tail(self.unbound_log)}") from exc

    def unbound_control(self, *args: str) -> str:
        """Any ``unbound-control`` command against this world's Unbound."""
        self._require_running()
        return self._unbound_control(*args)

    # -- looking ------------------------------------------------------------------------

    @property
    def resolver_address(self) -> str:
        return RESOLVER_V4

    @property
    def trust_anchor(self) -> str:
        """The lab root's DS, as in Unbound's trust-anchor-file."""
        return f". IN DS {self._ds(self._zones[dns.name.root])}"

    def ds(self, name: str) -> str | None:
        """The DS rdata (SHA-256) of a signed zone, whether or not its parent has it."""
        z = self._get(name)
        return self._ds(z) if z.signed and z.dnskey is not None else None

    def zone_file(self, name: str) -> Path:
        """The file NSD serves for the zone (signed, when signed)."""
        return self.zones_dir / f"{self._get(name).file_stem}.served"

    def query_message(
        self,
        name: str,
        rdtype: str | dns.rdatatype.RdataType = "A",
        *,
        cd: bool = False,
        dnssec: bool = True,
        server: str | None = None,
        port: int = 53,
        timeout: float = 5.0,
    ) -> dns.message.Message:
        """The full response of the resolver (or ``server``), asked from resolver_ns."""
        q = dns.message.make_query(_absolute(name), rdtype, want_dnssec=dnssec)
        if cd:
            q.flags |= dns.flags.CD
        return exchange(self.resolver_ns, q, server or self.resolver_address, port, timeout)

    def query(
        self,
        name: str,
        rdtype: str | dns.rdatatype.RdataType = "A",
        *,
        cd: bool = False,
        dnssec: bool = True,
        server: str | None = None,
        port: int = 53,
        timeout: float = 5.0,
    ) -> QueryResult:
        """(rcode, AD bit, sorted answer rdata of the queried type) from the resolver."""
        msg = self.query_message(
            name, rdtype, cd=cd, dnssec=dnssec, server=server, port=port, timeout=timeout
        )
        qtype = dns.rdatatype.RdataType.make(rdtype)
        answers = sorted(
            rd.to_text() for rrset in msg.answer if rrset.rdtype == qtype for rd in rrset
        )
        return QueryResult(dns.rcode.to_text(msg.rcode()), bool(msg.flags & dns.flags.AD), answers)

    def dig(self, *args: str, server: str | None = None) -> str:
        """``dig @resolver ARGS`` run inside resolver_ns (an independent client)."""
        cp = self.resolver_ns.run(["dig", f"@{server or self.resolver_address}", *args])
        return str(cp.stdout)


@atexit.register
def _stop_leftovers() -> None:
    # Safety net for worlds not stopped by their owner (interrupted run). Registered
    # after gatelab.netlab's handler, so it runs before the namespaces are deleted.
    with _live_lock:
        leftovers = list(_live)
    for world in leftovers:
        with contextlib.suppress(Exception):
            world.stop()


__all__ = [
    "DANE_HOST",
    "DNS_V4",
    "DNS_V6",
    "RESOLVER_V4",
    "RESOLVER_V6",
    "DnsLabError",
    "DnsWorld",
    "QueryResult",
    "dane_destination",
    "dnslab_usable",
    "exchange",
    "ptr_name",
    "reverse_zone",
]

"""``smtpgate firewall``: the config → the kernel rules that hand port 25 to the gateway.

A pure generator: :func:`generate` turns a :class:`~gateway.config.Config` and the
site's :class:`Options` (which interfaces face the MTA and the internet) into a
:class:`Ruleset` in one of two formats:

- ``nft``: one dedicated table, ``inet smtpgate`` (both families), loaded atomically;
  removing it is ``nft delete table inet smtpgate``.
- ``iptables``: dedicated chains ``SMTPGATE-PREROUTING`` / ``SMTPGATE-OUTPUT`` in the
  ``nat`` and ``mangle`` tables, jumped to from the built-in chains, as
  ``iptables-restore`` / ``ip6tables-restore`` input.

TPROXY and transparent upstreams also need policy routing (``ip rule`` / ``ip route``),
tagged ``protocol 25`` so that removal finds exactly these and nothing an operator added.

What is intercepted (see docs/deployment.md, where each rule was verified by hand):

- outbound listeners: TCP to port 25 arriving from the MTA side (``--mta-interface``
  and/or ``--mta-network``, in PREROUTING) or made by this host itself (``--local-mta``,
  nat OUTPUT, redirect only) → REDIRECT (DNAT for a listener bound to one address) or
  TPROXY to the listener;
- inbound listeners: TCP to port 25 arriving on ``--internet-interface`` → the same;
- inbound ``client_address: transparent``: the MTA's replies to the client's address are
  marked by socket match and routed to this host, where the transparent socket is;
- always first in every chain: packets carrying ``upstream.mark`` return untouched, so the
  gateway's own upstream connections are never intercepted again.

The TPROXY/transparent mark bit is computed to never overlap ``upstream.mark``: the
``ip rule`` matching it would otherwise send the gateway's own upstream packets to the
local table, and they would never leave the host.

:func:`apply` and :func:`remove` carry a ruleset out through a ``run`` function the caller
passes in (the CLI runs programs; tests pass a fake), so this module does no I/O itself.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .config import (
    ClientAddress,
    Config,
    ConfigError,
    Direction,
    Endpoint,
    InterceptMode,
    IPAddress,
    SourceAddress,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

NFT_TABLE = "smtpgate"  # family inet
CHAIN_PREFIX = "SMTPGATE-"
# `ip rule` / `ip route` protocol tag of everything this command adds (rtnetlink protocol
# numbers 19-41 are unassigned; 25 for SMTP).  Removal deletes only what carries it.
ROUTE_PROTOCOL = 25
DEFAULT_TABLE = 100
PREFERRED_BIT = 0x40000  # the bit docs/deployment.md uses
SMTP_PORT = 25
_RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")


class Format(StrEnum):
    NFT = "nft"
    IPTABLES = "iptables"


class FirewallError(ConfigError):
    """A ruleset that cannot be made: names the config key path or the option."""


@dataclass(frozen=True, slots=True)
class Options:
    """What the config does not know: the site's interfaces and networks."""

    format: Format = Format.NFT
    mta_interfaces: tuple[str, ...] = ()  # outbound: where the MTAs' connections arrive
    mta_networks: tuple[Network, ...] = ()  # outbound: the MTAs' source networks
    local_mta: bool = False  # outbound: the MTA runs on this host (nat OUTPUT)
    internet_interfaces: tuple[str, ...] = ()  # inbound: where the internet's arrive
    table: int = DEFAULT_TABLE  # routing table for TPROXY / transparent


@dataclass(frozen=True, slots=True)
class Intercept:
    """One listener's interception rule in one hook."""

    where: str  # "listeners[0]"
    family: int  # 4 or 6
    output: bool  # nat OUTPUT (this host's own connections), else PREROUTING
    tproxy: bool
    interfaces: tuple[str, ...]
    networks: tuple[Network, ...]
    listener: Endpoint


@dataclass(frozen=True, slots=True)
class Transparent:
    """Replies to a transparent socket (one bound to someone else's address): from an
    inbound upstream MTA to a client's address, or from any peer's port 25 to an outbound
    MTA's address (``source_address: client``)."""

    where: str  # "listeners[0].upstreams[1]", "listeners[0].source_address"
    family: int
    host: IPAddress | None  # the replies' source address; None: any
    port: int  # their source port


@dataclass(frozen=True, slots=True)
class Ruleset:
    source: str
    format: Format
    upstream_mark: int
    bit: int | None  # the TPROXY/transparent mark bit; None when no policy routing is needed
    table: int
    intercepts: tuple[Intercept, ...]
    transparent: tuple[Transparent, ...]
    nft: str  # an nft -f script: replaces table inet smtpgate atomically
    iptables: str  # iptables-restore --noflush input ("" when no IPv4 rule)
    ip6tables: str  # ip6tables-restore --noflush input ("" when no IPv6 rule)
    routing: tuple[tuple[str, ...], ...]  # argv of each ip rule / ip route command
    notes: tuple[str, ...] = ()  # comment lines: what is intercepted, what is not
    sysctls: tuple[str, ...] = ()  # comment lines: kernel settings that matter

    def text(self) -> str:
        """The ruleset as a shell script in the chosen format, to read or to run once."""
        out = [
            "#!/bin/sh",
            f"# smtpgate firewall for {self.source} (format {self.format})",
            "# Made by `smtpgate firewall`; `--apply` loads these rules (replacing earlier",
            "# smtpgate rules), `--remove` removes them. This script assumes none are loaded.",
            "#",
            *(f"# {n}" for n in self.notes),
        ]
        if self.sysctls:
            out += ["#", "# sysctls that matter (not set by this command):",
                    *(f"#   {s}" for s in self.sysctls)]
        out += ["", "set -e"]
        if self.format is Format.NFT:
            out += ["nft -f - <<'EOF'", self.nft.rstrip("\n"), "EOF"]
        else:
            for tool, body in (("iptables-restore", self.iptables),
                               ("ip6tables-restore", self.ip6tables)):
                if body:
                    out += [f"{tool} --noflush <<'EOF'", body.rstrip("\n"), "EOF"]
        out += [shlex.join(argv) for argv in self.routing]
        return "\n".join(out) + "\n"


# -- the generator ----------------------------------------------------------------------

def return_path_problems(ruleset: Ruleset, sysctl: Callable[[str], str | None]) -> list[str]:
    """Why this host, as it is now, cannot see the peers' replies to an outbound MTA's own
    address (``source_address: client``): it does not forward that family, so it is not the
    MTA's router, and the replies go to the MTA, which resets them.  ``sysctl`` reads a
    /proc/sys path (None when absent)."""
    problems = []
    for t in ruleset.transparent:
        if t.host is not None:
            continue
        key = "net/ipv4/ip_forward" if t.family == 4 else "net/ipv6/conf/all/forwarding"
        if sysctl(key) == "0":
            problems.append(f"{t.where}: this host does not forward IPv{t.family} "
                            f"({key.replace('/', '.')} = 0): the peers' replies to the MTA's "
                            "address cannot reach the gateway; route the MTA's traffic "
                            "through this host (docs/deployment.md)")
    return problems


def mark_bit(upstream_mark: int) -> int:
    """A single mark bit clear of ``upstream_mark``: 0x40000 when free, else the nearest."""
    order = [18, *range(19, 32), *range(17, -1, -1)]
    for n in order:
        bit: int = 1 << n
        if not upstream_mark & bit:
            return bit
    raise ValueError("no free bit")


def generate(config: Config, options: Options) -> Ruleset:
    """Config + options → the ruleset; FirewallError names the key path or the option."""
    src = config.source

    def fail(path: str, message: str) -> FirewallError:
        return FirewallError(src, path, message)

    _check_options(options, fail)
    mark = config.upstream.mark
    intercepts: list[Intercept] = []
    transparent: list[Transparent] = []
    notes: list[str] = []
    taken: dict[tuple[Direction, int], str] = {}
    outbound = inbound = False
    for i, lst in enumerate(config.listeners):
        where = f"listeners[{i}]"
        family = lst.address.version
        first = taken.setdefault((lst.direction, family), where)
        if first != where:
            raise fail(where, f"a second {lst.direction} IPv{family} listener: the firewall "
                              f"sends every intercepted IPv{family} connection to {first}")
        tproxy = lst.mode is InterceptMode.TPROXY
        desc = f"{where} {lst.direction} {lst.endpoint} ({lst.mode})"
        if lst.direction is Direction.OUTBOUND:
            outbound = True
            nets = tuple(n for n in options.mta_networks if n.version == family)
            if not (options.mta_interfaces or options.mta_networks or options.local_mta):
                raise fail(where, "outbound: say where the MTA's connections come from: "
                                  "--mta-interface, --mta-network or --local-mta")
            if options.local_mta and tproxy:
                raise fail(f"{where}.mode", "tproxy cannot take this host's own connections "
                                            "(--local-mta): use mode redirect")
            # Networks, once given, bound each family: a family without any is not taken
            # from the MTA side (interfaces alone would widen it to every source).
            froms = []
            from_mta_side = bool(nets) if options.mta_networks else bool(options.mta_interfaces)
            if from_mta_side:
                froms.append(_from(options.mta_interfaces, nets))
                _check_prerouting_target(lst.endpoint, tproxy, where, fail)
                intercepts.append(Intercept(where, family, False, tproxy,
                                            options.mta_interfaces, nets, lst.endpoint))
            if options.local_mta:
                intercepts.append(Intercept(where, family, True, False, (), (), lst.endpoint))
                froms.append("this host's own processes (nat OUTPUT)")
            if froms:
                notes.append(f"{desc}: TCP port 25 from {' and '.join(froms)}")
            else:
                notes.append(f"{desc}: not intercepted (no IPv{family} --mta-network)")
            if lst.source_address is SourceAddress.CLIENT and from_mta_side:
                # The peer's replies go to the MTA's address: this host must be on their
                # way (the MTA's router), and take them for its transparent socket.
                spath = f"{where}.source_address"
                if all((t.host, t.port, t.family) != (None, SMTP_PORT, family)
                       for t in transparent):
                    transparent.append(Transparent(spath, family, None, SMTP_PORT))
                notes.append(f"{spath} client: replies from port 25 to the MTA's address are "
                             "routed to the gateway's transparent socket; this host must "
                             "route the MTA's traffic to and from the internet")
        else:
            inbound = True
            if not options.internet_interfaces:
                raise fail(where, "inbound: say where the internet's connections arrive: "
                                  "--internet-interface")
            _check_prerouting_target(lst.endpoint, tproxy, where, fail)
            intercepts.append(Intercept(where, family, False, tproxy,
                                        options.internet_interfaces, (), lst.endpoint))
            notes.append(f"{desc}: TCP port 25 from {_from(options.internet_interfaces, ())}")
            if lst.client_address is ClientAddress.TRANSPARENT:
                for j, up in enumerate(lst.upstreams):
                    upath = f"{where}.upstreams[{j}]"
                    if up.host.version != family:
                        raise fail(upath, "client_address transparent needs upstreams of the "
                                          f"listener's address family (IPv{family})")
                    if all((t.host, t.port) != (up.host, up.port) for t in transparent):
                        transparent.append(Transparent(upath, family, up.host, up.port))
                        notes.append(f"{upath} {up}: replies to client addresses are routed "
                                     "to the gateway's transparent socket")
    unused = [opt for opt, given in (("--mta-interface", options.mta_interfaces and not outbound),
                                     ("--mta-network", options.mta_networks and not outbound),
                                     ("--local-mta", options.local_mta and not outbound),
                                     ("--internet-interface",
                                      options.internet_interfaces and not inbound)) if given]
    if unused:
        kind = "inbound" if unused[0] == "--internet-interface" else "outbound"
        raise fail(unused[0], f"no {kind} listener in the config")
    if options.local_mta and not mark:
        raise fail("upstream.mark", "0 leaves the gateway's own connections unmarked: "
                                    "--local-mta needs a mark to exempt them from interception")

    bit: int | None = None
    if any(x.tproxy for x in intercepts) or transparent:
        try:
            bit = mark_bit(mark)
        except ValueError:
            raise fail("upstream.mark", f"{mark:#x} uses every mark bit: none is left for "
                                        "TPROXY / transparent routing") from None
        notes.append(f"TPROXY/transparent mark bit {bit:#x} (clear of upstream.mark), "
                     f"routing table {options.table}")
    notes.append(f"upstream.mark {mark:#x}: the gateway's own connections are never "
                 "intercepted" if mark else
                 "upstream.mark 0: the gateway's connections carry no mark to exempt")
    routed = sorted({x.family for x in intercepts if x.tproxy} | {t.family for t in transparent})
    routing: list[tuple[str, ...]] = []
    for fam in routed:
        ip = ("ip",) if fam == 4 else ("ip", "-6")
        assert bit is not None
        routing.append((*ip, "rule", "add", "fwmark", f"{bit:#x}/{bit:#x}", "lookup",
                        str(options.table), "protocol", str(ROUTE_PROTOCOL)))
        routing.append((*ip, "route", "add", "local", "0.0.0.0/0" if fam == 4 else "::/0",
                        "dev", "lo", "table", str(options.table), "proto", str(ROUTE_PROTOCOL)))

    sysctls = []
    if any(not x.output for x in intercepts):
        sysctls += ["net.ipv4.ip_forward=1            when this host routes between the MTA "
                    "and the internet",
                    "net.ipv6.conf.all.forwarding=1   the same for IPv6"]
    if mark:
        sysctls += ["net.ipv4.tcp_fwmark_accept=1     an accepted socket keeps its SYN's "
                    "mark: a connection carrying",
                    f"                                 upstream.mark ({mark:#x}) is refused "
                    "as a loop (IPv4 and IPv6)"]
    xs, ts = tuple(intercepts), tuple(transparent)
    return Ruleset(
        source=src, format=options.format, upstream_mark=mark, bit=bit, table=options.table,
        intercepts=xs, transparent=ts,
        nft=_nft(xs, ts, mark, bit),
        iptables=_iptables(xs, ts, mark, bit, 4),
        ip6tables=_iptables(xs, ts, mark, bit, 6),
        routing=tuple(routing), notes=tuple(notes), sysctls=tuple(sysctls))


def _check_options(options: Options, fail: Callable[[str, str], FirewallError]) -> None:
    for opt, names in (("--mta-interface", options.mta_interfaces),
                       ("--internet-interface", options.internet_interfaces)):
        for name in names:
            if not _IFNAME.fullmatch(name) or name in (".", ".."):
                raise fail(opt, f"not an interface name: {name!r}")
    both = sorted(set(options.mta_interfaces) & set(options.internet_interfaces))
    if both:
        raise fail("--internet-interface", f"{both[0]} is also an --mta-interface")
    if options.table in _RESERVED_TABLES or not 0 < options.table < 2**32:
        what = _RESERVED_TABLES.get(options.table, "out of range")
        raise fail("--table", f"{options.table} is not usable ({what}): use 1-252 or "
                              "256-4294967295")


def _check_prerouting_target(listener: Endpoint, tproxy: bool, where: str,
                             fail: Callable[[str, str], FirewallError]) -> None:
    if not tproxy and listener.host.is_loopback:
        raise fail(f"{where}.address", "a loopback address cannot receive connections "
                                       "redirected from another interface: bind 0.0.0.0 "
                                       "or \"::\"")


def _from(interfaces: Sequence[str], networks: Sequence[Network]) -> str:
    parts = []
    if interfaces:
        parts.append(f"interface {' or '.join(interfaces)}")
    if networks:
        parts.append(f"source {' or '.join(map(str, networks))}")
    return ", ".join(parts)


# -- nft --------------------------------------------------------------------------------

def _nft_set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _nft_intercept(x: Intercept, bit: int | None) -> str:
    ip = "ip" if x.family == 4 else "ip6"
    parts = []
    if x.interfaces:
        parts.append("iifname " + _nft_set([f'"{i}"' for i in x.interfaces]))
    if x.networks:
        parts.append(f"{ip} saddr " + _nft_set([str(n) for n in x.networks]))
    else:
        parts.append(f"meta nfproto ipv{x.family}")
    parts.append(f"tcp dport {SMTP_PORT}")
    specific = not x.listener.host.is_unspecified
    if x.tproxy:
        assert bit is not None
        to = str(x.listener) if specific else f":{x.listener.port}"
        parts.append(f"tproxy {ip} to {to} meta mark set meta mark | {bit:#x} accept")
    elif specific:
        parts.append(f"dnat {ip} to {x.listener}")
    else:
        parts.append(f"redirect to :{x.listener.port}")
    return " ".join(parts)


def _nft_transparent(t: Transparent, bit: int) -> str:
    ip = "ip" if t.family == 4 else "ip6"
    match = f"{ip} saddr {t.host}" if t.host is not None else \
        f"meta nfproto {'ipv4' if t.family == 4 else 'ipv6'}"
    return (f"{match} tcp sport {t.port} socket transparent 1 "
            f"meta mark set meta mark | {bit:#x}")


def _nft(xs: Sequence[Intercept], ts: Sequence[Transparent], mark: int,
         bit: int | None) -> str:
    exempt = [f"meta mark {mark:#x} return"] if mark else []
    chains: list[tuple[str, str, list[str]]] = []
    mangle = [_nft_intercept(x, bit) for x in xs if x.tproxy]
    mangle += [_nft_transparent(t, bit) for t in ts if bit is not None]
    if mangle:
        chains.append(("mangle_prerouting", "type filter hook prerouting priority mangle - 5",
                       exempt + mangle))
    nat = [_nft_intercept(x, bit) for x in xs if not x.tproxy and not x.output]
    if nat:
        chains.append(("nat_prerouting", "type nat hook prerouting priority dstnat - 5",
                       exempt + nat))
    out = [_nft_intercept(x, bit) for x in xs if x.output]
    if out:
        chains.append(("nat_output", "type nat hook output priority -105",
                       [*exempt, "fib daddr type local return", *out]))
    lines = [f"table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}",
             f"table inet {NFT_TABLE} {{"]
    for n, (name, hook, rules) in enumerate(chains):
        if n:
            lines.append("")
        lines += [f"\tchain {name} {{", f"\t\t{hook}; policy accept;",
                  *(f"\t\t{r}" for r in rules), "\t}"]
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- iptables ---------------------------------------------------------------------------

def _ipt_intercepts(x: Intercept, chain: str, bit: int | None) -> list[str]:
    specific = not x.listener.host.is_unspecified
    if x.tproxy:
        assert bit is not None
        on_ip = f" --on-ip {x.listener.host}" if specific else ""
        target = (f"-j TPROXY --on-port {x.listener.port}{on_ip} "
                  f"--tproxy-mark {bit:#x}/{bit:#x}")
    elif specific:
        target = f"-j DNAT --to-destination {x.listener}"
    else:
        target = f"-j REDIRECT --to-ports {x.listener.port}"
    rules = []
    for iface in x.interfaces or (None,):
        for net in x.networks or (None,):
            match = (f" -i {iface}" if iface else "") + (f" -s {net}" if net else "")
            rules.append(f"-A {chain}{match} -p tcp --dport {SMTP_PORT} {target}")
    return rules


def _ipt_source(host: IPAddress | None) -> str:
    return f" -s {host}/{host.max_prefixlen}" if host is not None else ""


def _iptables(xs: Sequence[Intercept], ts: Sequence[Transparent], mark: int,
              bit: int | None, family: int) -> str:
    xs = [x for x in xs if x.family == family]
    ts = [t for t in ts if t.family == family]
    pre, out = f"{CHAIN_PREFIX}PREROUTING", f"{CHAIN_PREFIX}OUTPUT"
    exempt = [f"-m mark --mark {mark:#x} -j RETURN"] if mark else []
    tables: list[tuple[str, list[tuple[str, str, list[str]]]]] = []
    mangle = [r for x in xs if x.tproxy for r in _ipt_intercepts(x, pre, bit)]
    if bit is not None:
        mangle += [f"-A {pre}{_ipt_source(t.host)} -p tcp "
                   f"--sport {t.port} -m socket --transparent "
                   f"-j MARK --set-mark {bit:#x}/{bit:#x}" for t in ts]
    if mangle:
        tables.append(("mangle", [("PREROUTING", pre, mangle)]))
    nat: list[tuple[str, str, list[str]]] = []
    rules = [r for x in xs if not x.tproxy and not x.output for r in _ipt_intercepts(x, pre, bit)]
    if rules:
        nat.append(("PREROUTING", pre, rules))
    rules = [r for x in xs if x.output for r in _ipt_intercepts(x, out, bit)]
    if rules:
        nat.append(("OUTPUT", out, [f"-A {out} -m addrtype --dst-type LOCAL -j RETURN",
                                    *rules]))
    if nat:
        tables.append(("nat", nat))
    lines: list[str] = []
    for table, chains in tables:
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for _, chain, _ in chains]
        # Inserted first: an operator's own port-25 DNAT (a port forward to the MTA) must
        # not take the connection before the gateway does.
        lines += [f"-I {builtin} 1 -p tcp -j {chain}" for builtin, chain, _ in chains]
        for _, chain, body in chains:
            lines += [f"-A {chain} {e}" for e in exempt]
            lines += body
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


# -- removal (pure: from what the tools list to what deletes it) --------------------------

def nft_removal() -> str:
    """Deletes table inet smtpgate; no error when it is not there."""
    return f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"


def iptables_removal(save: str) -> str:
    """``iptables-save`` output → ``iptables-restore --noflush`` input that deletes every
    jump to a SMTPGATE-* chain and the chains themselves ("" when there is none)."""
    out: list[str] = []
    table = ""
    jumps: list[str] = []
    chains: list[str] = []

    def flush_table() -> None:
        if jumps or chains:
            out.append(f"*{table}")
            out.extend(f"-D {rule}" for rule in jumps)
            out.extend(f"-F {c}" for c in chains)
            out.extend(f"-X {c}" for c in chains)
            out.append("COMMIT")

    for line in save.splitlines():
        if line.startswith("*"):
            table, jumps, chains = line[1:].strip(), [], []
        elif line.startswith(":" + CHAIN_PREFIX):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            rule = line[3:]
            words = rule.split()
            targets = {words[k + 1] for k, w in enumerate(words[:-1]) if w in ("-j", "-g")}
            if not words[0].startswith(CHAIN_PREFIX) and any(
                    t.startswith(CHAIN_PREFIX) for t in targets):
                jumps.append(rule)
        elif line.strip() == "COMMIT":
            flush_table()
            table, jumps, chains = "", [], []
    return "\n".join(out) + "\n" if out else ""


def routing_removal(rules: str, routes: str, family: int) -> list[tuple[str, ...]]:
    """``ip -o rule show`` and ``ip -o route show table all proto 25`` → the commands that
    delete the rules and routes tagged with ROUTE_PROTOCOL."""
    ip = ("ip", f"-{family}")
    tag = str(ROUTE_PROTOCOL)
    out: list[tuple[str, ...]] = []
    for line in rules.splitlines():
        pref, _, spec = line.partition(":")
        words = spec.split()
        if not pref.strip().isdigit() or _after(words, "proto") != tag:
            continue
        sel: list[str] = ["priority", pref.strip()]
        for key in ("fwmark", "lookup"):
            if (value := _after(words, key)) is not None:
                sel += [key, value]
        out.append((*ip, "rule", "del", *sel, "protocol", tag))
    for line in routes.splitlines():
        words = line.split()
        if len(words) < 2:
            continue
        kind, dst = (words[0], words[1]) if words[0] in (
            "local", "unicast", "blackhole", "unreachable", "prohibit") else ("unicast", words[0])
        if dst == "default":  # spelt out: unambiguous in either family
            dst = "0.0.0.0/0" if family == 4 else "::/0"
        sel = [kind, dst]
        if (dev := _after(words, "dev")) is not None:
            sel += ["dev", dev]
        sel += ["table", _after(words, "table") or "main"]
        out.append((*ip, "route", "del", *sel, "proto", tag))
    return out


def _after(words: Sequence[str], key: str) -> str | None:
    for k, w in enumerate(words[:-1]):
        if w == key:
            return words[k + 1]
    return None


# -- carrying it out -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Result:
    returncode: int  # 127: the program is not installed
    stdout: str = ""
    stderr: str = ""


Run = Callable[[Sequence[str], str | None], Result]  # (argv, stdin) → result
MISSING = 127


class ApplyError(Exception):
    """A command failed; ``str()`` names it and carries its stderr."""


@dataclass(frozen=True, slots=True)
class _Log:
    """Runs one command; anything but an expected return code is an ApplyError."""

    run: Run

    def __call__(self, argv: Sequence[str], stdin: str | None = None, *,
                 ok: Sequence[int] = (0,)) -> Result:
        r = self.run(argv, stdin)
        if r.returncode not in ok:
            detail = (r.stderr or r.stdout).strip() or f"exit status {r.returncode}"
            raise ApplyError(f"{shlex.join(argv)}: {detail}")
        return r


def remove(run: Run) -> list[str]:
    """Removes every smtpgate rule, chain, table, ip rule and route, whatever the format it
    was applied in; returns what was removed ([] when nothing was there).  Programs that are
    not installed are skipped: there is nothing of theirs to remove."""
    log = _Log(run)
    removed: list[str] = []
    listed = log(["nft", "list", "table", "inet", NFT_TABLE], ok=(0, 1, MISSING))
    if listed.returncode == 0:
        log(["nft", "-f", "-"], nft_removal())
        removed.append(f"nft table inet {NFT_TABLE}")
    for save, restore in (("iptables-save", "iptables-restore"),
                          ("ip6tables-save", "ip6tables-restore")):
        saved = log([save], ok=(0, MISSING))
        script = iptables_removal(saved.stdout) if saved.returncode == 0 else ""
        if script:
            log([restore, "--noflush"], script)
            removed.append(f"{save.removesuffix('-save')} chains {_chains(script, '-X ')}")
    for family in (4, 6):
        ip = ["ip", f"-{family}"]  # `ip route show table all` alone lists both families
        rules = log([*ip, "-o", "rule", "show"], ok=(0, 2, MISSING))  # 2: IPv6 disabled
        routes = log([*ip, "-o", "route", "show", "table", "all", "proto", str(ROUTE_PROTOCOL)],
                     ok=(0, 2, MISSING))  # 2: IPv6 disabled
        if MISSING in (rules.returncode, routes.returncode):
            continue
        for argv in routing_removal(rules.stdout if rules.returncode == 0 else "",
                                    routes.stdout if routes.returncode == 0 else "", family):
            log(argv)
            removed.append(shlex.join(argv))
    return removed


def _chains(restore: str, prefix: str) -> str:
    """"nat/SMTPGATE-PREROUTING, ..." from iptables-restore input (chains after ``prefix``)."""
    table, out = "", []
    for line in restore.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(prefix + CHAIN_PREFIX):
            out.append(f"{table}/{line[len(prefix):].split()[0]}")
    return ", ".join(out)


def apply(ruleset: Ruleset, run: Run) -> list[str]:
    """Replaces any smtpgate rules with ``ruleset``; returns what was loaded.  On a failure
    everything smtpgate is removed again (no half-loaded state) and ApplyError raised."""
    remove(run)
    log = _Log(run)
    loaded: list[str] = []
    try:
        if ruleset.format is Format.NFT:
            log(["nft", "-f", "-"], ruleset.nft)
            loaded.append(f"nft table inet {NFT_TABLE}")
        else:
            for tool, body in (("iptables-restore", ruleset.iptables),
                               ("ip6tables-restore", ruleset.ip6tables)):
                if body:
                    log([tool, "--noflush"], body)
                    loaded.append(f"{tool.removesuffix('-restore')} chains {_chains(body, ':')}")
        for argv in ruleset.routing:
            log(argv)
            loaded.append(shlex.join(argv))
    except ApplyError:
        with contextlib.suppress(ApplyError):  # the first error is the one to show
            remove(run)
        raise
    return loaded


def parse_networks(values: Sequence[str], source: str) -> tuple[Network, ...]:
    """``--mta-network`` values → networks (host bits are dropped: 198.51.100.7/24 is the /24)."""
    out = []
    for text in values:
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise FirewallError(source, "--mta-network", f"not an IP network: {text!r}") from None
    return tuple(out)

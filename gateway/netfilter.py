"""The kernel side of interception: original destinations, transparent and marked sockets.

REDIRECT rewrites the destination to the gateway, and conntrack remembers the original:
``SO_ORIGINAL_DST`` (IPv4) / ``IP6T_SO_ORIGINAL_DST`` (IPv6) read it back.  TPROXY leaves
the packet alone and delivers it to an ``IP_TRANSPARENT`` listener, so the accepted socket's
own address *is* the original destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable

from .config import Endpoint, InterceptMode, IPAddress

# linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h: both are 80.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
# linux/in.h, linux/in6.h; not all exported by the socket module.
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_BIND_ADDRESS_NO_PORT = 24
SO_MARK = getattr(socket, "SO_MARK", 36)


class InterceptError(Exception):
    """The connection cannot be attributed to an original destination."""


# Recent addresses, parsed and formatted once: a session needs its client's and its
# destination's, and the same MTAs and MX hosts come back all day.  Bounded.
_ADDRESSES: dict[bytes | str, tuple[IPAddress, str]] = {}
_ADDRESSES_MAX = 4096


def _address(key: bytes | str) -> tuple[IPAddress, str]:
    found = _ADDRESSES.get(key)
    if found is None:
        if len(_ADDRESSES) >= _ADDRESSES_MAX:
            _ADDRESSES.clear()
        ip = ipaddress.ip_address(key.split("%", 1)[0] if isinstance(key, str) else key)
        found = _ADDRESSES[key] = (ip, str(ip))
    return found


def _endpoint(family: int, raw: bytes) -> Endpoint:
    if family == socket.AF_INET:
        port, packed = struct.unpack_from("!2xH4s", raw)
    else:
        port, packed = struct.unpack_from("!2xH4x16s", raw)
    ip, text = _address(packed)
    return Endpoint(ip, port, text)


def sock_endpoint(addr: tuple[str, int] | tuple[str, int, int, int]) -> Endpoint:
    """socket-module address tuple → Endpoint (scope ids are dropped: global addresses only)."""
    ip, text = _address(addr[0])
    return Endpoint(ip, addr[1], text)


def original_destination(sock: socket.socket, mode: InterceptMode) -> Endpoint:
    """Where the client meant to connect before the firewall sent it to us."""
    if mode is InterceptMode.TPROXY:
        return sock_endpoint(sock.getsockname())
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        else:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    except OSError as exc:
        # ENOENT: no conntrack entry (nf_conntrack not loaded for this family).
        raise InterceptError(f"no original destination: {exc.strerror}") from None
    return _endpoint(sock.family, raw)


def socket_mark(sock: socket.socket) -> int:
    """The mark of an accepted socket; with net.ipv4.tcp_fwmark_accept=1 it is the SYN's."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_MARK)
    except OSError:
        return 0


def listening_socket(address: IPAddress, port: int, mode: InterceptMode,
                     backlog: int = 1024) -> socket.socket:
    """A bound, listening, non-blocking socket for one listener."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Workers (and a restarted gateway during drain) share the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # One family per listener: a v4-mapped client on a v6 socket would need the v4
            # conntrack lookup, and the operator configures both families explicitly anyway.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if mode is InterceptMode.TPROXY:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((str(address), port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def upstream_socket(destination: Endpoint, mark: int, source: IPAddress | None = None, *,
                    source_port: int = 0, transparent: bool = False,
                    avoid_port: int = 0) -> socket.socket:
    """A non-blocking socket for the upstream leg: marked, optionally bound to a source.

    ``transparent`` binds to a non-local address: the client's own (inbound
    ``client_address: transparent``, outbound ``source_address: client``).  Then the port is
    taken at bind time and never ``avoid_port``, the client's own port: the client's
    intercepted connection to the same destination port has a conntrack entry with that
    tuple, and a second connection with the same one would be taken for it (under REDIRECT,
    sent back to this gateway).
    """
    for _ in range(8):
        sock = _upstream_socket(destination, mark, source, source_port=source_port,
                                transparent=transparent,
                                defer_port=not (transparent and avoid_port))
        if not (transparent and avoid_port) or sock.getsockname()[1] != avoid_port:
            return sock
        sock.close()  # the kernel's pick was the client's own port: take another
    raise InterceptError(f"no source port other than {avoid_port} for {source}")


def _upstream_socket(destination: Endpoint, mark: int, source: IPAddress | None, *,
                     source_port: int, transparent: bool, defer_port: bool) -> socket.socket:
    family = socket.AF_INET6 if destination.host.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if transparent:
            level, opt = ((socket.IPPROTO_IPV6, IPV6_TRANSPARENT) if family == socket.AF_INET6
                          else (socket.SOL_IP, IP_TRANSPARENT))
            sock.setsockopt(level, opt, 1)
        if source is not None:
            if source.version != destination.host.version:
                raise InterceptError(f"source {source} and destination {destination} differ "
                                     "in address family")
            if source_port == 0 and defer_port:
                # Defer port choice to connect(): the 4-tuple, not the 2-tuple, must be unique,
                # so many sessions can share one source address.
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((str(source), source_port))
    except BaseException:
        sock.close()
        raise
    return sock


def is_local_address(address: IPAddress) -> bool:
    """True when this host (this network namespace) owns ``address``."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    if address.is_unspecified:
        return True
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


async def connect(sock: socket.socket, destination: Endpoint,
                  on_bound: Callable[[tuple[str, int]], None]) -> None:
    """Non-blocking connect that reports the local address as soon as the kernel picks it.

    ``on_bound`` runs right after the connect() syscall, before the handshake can complete
    and before this process can accept anything: if the firewall sends the connection back
    to us, the accepting side already knows it is our own (A6).  ``loop.sock_connect`` only
    returns once connected, which is too late for that.
    """
    loop = asyncio.get_running_loop()
    with contextlib.suppress(BlockingIOError):  # EINPROGRESS: the normal case
        sock.connect((destination.host_text, destination.port))
    on_bound(sock.getsockname()[:2])
    fd = sock.fileno()
    writable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not writable.done():
            writable.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


# -- sock_diag: is this connection one of ours? -----------------------------------------------
# linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
INET_DIAG_MARK = 15
_NOCOOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
_DIAG_MSG = struct.Struct("=BBBB48sIIIII")  # inet_diag_msg: family .. inode, 72 bytes


def _sockid(src: Endpoint, dst: Endpoint) -> bytes:
    """inet_diag_sockid for an exact lookup (no interface, no cookie)."""
    return (struct.pack("!HH", src.port, dst.port) + src.host.packed.ljust(16, b"\0")
            + dst.host.packed.ljust(16, b"\0") + struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE))


def local_socket_mark(src: Endpoint, dst: Endpoint, timeout: float = 0.2) -> int | None:
    """The mark of this host's TCP socket ``src`` → ``dst``, whichever process owns it;
    None when there is none or the lookup failed, 0 when the kernel reports no mark.

    An accepted connection from a local address is looked up the other way round: the
    connecting socket is ours when it carries ``upstream.mark``.  Unlike the set of
    upstream addresses a process remembers, this also sees the sockets of the other
    workers, and needs no ``net.ipv4.tcp_fwmark_accept``.  The kernel reports the mark
    to a requester with CAP_NET_ADMIN (which SO_MARK needs anyway).
    """
    family = socket.AF_INET6 if src.host.version == 6 else socket.AF_INET
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, _ALL_STATES) \
        + _sockid(src, dst)
    msg = struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + req
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(timeout)
            nl.send(msg)
            reply = nl.recv(8192)
    except OSError:
        return None
    if len(reply) < 16:
        return None
    length, kind = struct.unpack_from("=IH", reply)
    if kind != SOCK_DIAG_BY_FAMILY or length < 16 + _DIAG_MSG.size:
        return None  # NLMSG_ERROR: no such socket
    pos = 16 + _DIAG_MSG.size
    while pos + 4 <= length:
        alen, atype = struct.unpack_from("=HH", reply, pos)
        if alen < 4:
            break
        if atype == INET_DIAG_MARK and alen >= 8:
            return int(struct.unpack_from("=I", reply, pos + 4)[0])
        pos += (alen + 3) & ~3
    return 0  # found, but no mark reported (no CAP_NET_ADMIN): unknown counts as unmarked

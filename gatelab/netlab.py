"""Network-namespace lab for tests: several "hosts" on one machine.

Topology built by :class:`Lab` (all addresses from documentation ranges)::

    [mta] eth0 ---- mta0 [gw] peer0 ---- eth0 [peer]
    198.51.100.2/24     198.51.100.1   203.0.113.1     203.0.113.2/24, .3/24
    2001:db8:1::2/64    2001:db8:1::1  2001:db8:2::1   2001:db8:2::2/64, ::3/64

``gw`` routes v4 and v6 between the two links; it is where the gateway under test
runs and where the REDIRECT rules go. Everything is created with ``ip``/``iptables``
*inside* namespaces that this module creates; the host's own network namespace is
never touched.

Sockets can be made inside a namespace in-process (:meth:`Netns.socket`), so tests
can drive asyncio code against the lab without spawning helper processes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ipaddress
import itertools
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")
# Netns.socket() shadows the module name inside the class body (for annotations).
Socket = socket.socket

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")
# `ip netns exec` bind-mounts /etc/netns/NAME/* over /etc/* (resolv.conf, hosts).
NETNS_ETC_DIR = Path("/etc/netns")

# Linux netfilter: getsockopt(SOL_IP, SO_ORIGINAL_DST) / (SOL_IPV6, IP6T_SO_ORIGINAL_DST).
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

# Lab addresses.
MTA_V4 = "198.51.100.2"
GW_MTA_V4 = "198.51.100.1"
GW_PEER_V4 = "203.0.113.1"
PEER_V4 = "203.0.113.2"
PEER_V4_ALT = "203.0.113.3"
MTA_V6 = "2001:db8:1::2"
GW_MTA_V6 = "2001:db8:1::1"
GW_PEER_V6 = "2001:db8:2::1"
PEER_V6 = "2001:db8:2::2"
PEER_V6_ALT = "2001:db8:2::3"
MTA_NET_V4 = "198.51.100.0/24"
PEER_NET_V4 = "203.0.113.0/24"
MTA_NET_V6 = "2001:db8:1::/64"
PEER_NET_V6 = "2001:db8:2::/64"
# Interface names. They live only inside the lab namespaces, so fixed names cannot
# collide between parallel runs.
GW_MTA_IF = "mta0"
GW_PEER_IF = "peer0"
HOST_IF = "eth0"

_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count(1)
_live: dict[str, Netns] = {}
_live_lock = threading.Lock()


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes stderr (the useful part when `ip` fails)."""

    def __str__(self) -> str:
        err = self.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        return f"{super().__str__()}: {(err or '').strip()}"


def _run(args: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[Any]:
    if not any(k in kw for k in ("stdout", "stderr", "capture_output")):
        kw["capture_output"] = True
    if not any(k in kw for k in ("text", "encoding", "universal_newlines")) and not isinstance(
        kw.get("input"), bytes
    ):
        kw["text"] = True
    kw.setdefault("timeout", 60)
    cp = subprocess.run(list(args), check=False, **kw)
    if check and cp.returncode != 0:
        raise CommandError(cp.returncode, cp.args, cp.stdout, cp.stderr)
    return cp


def netns_usable() -> str | None:
    """None when this process can build a lab, else the reason it cannot (for skip())."""
    if os.geteuid() != 0:
        return "network-namespace tests need root"
    if shutil.which("ip") is None:
        return "iproute2 'ip' not installed"
    try:
        ns = Netns("probe")
    except (OSError, subprocess.SubprocessError) as exc:
        return f"'ip netns' unusable: {exc}"
    try:
        ns.socket(socket.AF_INET).close()
    except OSError as exc:
        return f"setns() unusable: {exc}"
    finally:
        ns.delete()
    return None


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """Terminate one process we started, by its PID; SIGKILL if it ignores SIGTERM."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


class Netns:
    """One network namespace, named ``sg<pid>-<n>-<role>`` so parallel runs never collide."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.name = f"sg{os.getpid()}-{next(_counter)}-{role}"
        self.path = NETNS_RUN_DIR / self.name
        self._procs: list[subprocess.Popen[Any]] = []
        self._deleted = False
        _run(["ip", "netns", "add", self.name])
        with _live_lock:
            _live[self.name] = self
        try:
            self.ip("link", "set", "lo", "up")
            # No DAD for anything configured later: addresses (incl. link-local) are
            # usable at once instead of "tentative" for ~1 s.
            self.sysctl("net.ipv6.conf.default.accept_dad", "0")
            self.sysctl("net.ipv6.conf.all.accept_dad", "0")
        except BaseException:
            self.delete()
            raise

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    # -- processes -------------------------------------------------------------------

    def cmd(self, args: Sequence[str]) -> list[str]:
        """The argv that runs ``args`` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self, args: Sequence[str], check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run to completion inside the namespace; output captured as text by default."""
        return _run(self.cmd(args), check=check, **kw)

    def popen(self, args: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in the namespace. `ip netns exec` execs, so proc.pid is the program."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.cmd(args), **kw)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
        rc = stop_process(proc, timeout)
        if proc in self._procs:
            self._procs.remove(proc)
        return rc

    def ip(self, *args: str) -> subprocess.CompletedProcess[Any]:
        # `ip -n` does setns itself: cheaper than `ip netns exec` (no mount namespace).
        return _run(["ip", "-n", self.name, *args])

    def sysctl(self, key: str, value: str | int) -> None:
        # /proc/sys/net is per network namespace of the writer; write it from a thread
        # inside the namespace rather than spawning `sysctl`.
        path = Path("/proc/sys") / key.replace(".", "/")

        def write() -> None:
            path.write_text(f"{value}\n")

        self.call(write)

    def iptables(self, rule: Sequence[str], v6: bool = False) -> None:
        """Run ``iptables``/``ip6tables`` (nft backend) here, e.g. ``["-t","nat","-A",...]``."""
        tool = "ip6tables" if v6 else "iptables"
        # -w: wait for the xtables lock instead of failing when tests run in parallel.
        self.run([tool, "-w", *rule])

    def nft(self, script: str) -> None:
        self.run(["nft", "-f", "-"], input=script)

    def set_resolv_conf(self, text: str) -> None:
        """resolv.conf seen by processes started with run()/popen() (not in-process sockets)."""
        etc = NETNS_ETC_DIR / self.name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(text)

    # -- in-process --------------------------------------------------------------------

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a short-lived thread that has joined this namespace.

        setns(CLONE_NEWNET) affects only the calling thread, and that thread ends right
        after, so the rest of the process stays in its own namespace. Objects made
        there (sockets) keep the namespace they were created in.
        """
        result: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        errno = ctypes.get_errno()
                        raise OSError(errno, os.strerror(errno), str(self.path))
                finally:
                    os.close(fd)
                result.append(fn())
            except BaseException as exc:  # re-raised in the caller's thread
                error.append(exc)

        thread = threading.Thread(target=target, name=f"setns-{self.name}", daemon=True)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> Socket:
        """A socket living in this namespace, usable from any thread or event loop."""
        return self.call(lambda: Socket(family, type, proto))

    def connect(self, host: str, port: int, timeout: float = 5.0,
                source: str | None = None) -> Socket:
        """A TCP connection made from inside the namespace (blocking socket returned),
        from ``source`` when given (one of the namespace's addresses)."""
        sock = self.socket(_family(host))
        sock.settimeout(timeout)
        try:
            if source is not None:
                sock.bind((source, 0))
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def listen(self, host: str, port: int, backlog: int = 128) -> Socket:
        """A listening TCP socket in the namespace (port 0 picks a free one)."""
        sock = self.socket(_family(host))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def ping(self, host: str, timeout: float = 2.0) -> float:
        """One ICMP echo from this namespace (raw socket, no `ping` binary); returns RTT s."""
        v6 = _family(host) == socket.AF_INET6
        if v6:
            sock = self.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        else:
            sock = self.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        with sock:
            ident = os.getpid() & 0xFFFF
            seq = next(_counter) & 0xFFFF
            payload = b"smtpgate-netlab"
            icmp_type, reply_type = (128, 129) if v6 else (8, 0)
            header = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq)
            # The kernel fills in ICMPv6 checksums (pseudo-header); ICMPv4 is ours to do.
            if not v6:
                header = struct.pack(
                    "!BBHHH", icmp_type, 0, _checksum(header + payload), ident, seq
                )
            start = time.monotonic()
            sock.sendto(header + payload, (host, 0))
            deadline = start + timeout
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                data, _ = sock.recvfrom(2048)
                if not v6:
                    data = data[(data[0] & 0x0F) * 4 :]  # v4 raw sockets include the IP header
                if len(data) < 8:
                    continue
                r_type, _, _, r_ident, r_seq = struct.unpack("!BBHHH", data[:8])
                if r_type == reply_type and r_ident == ident and r_seq == seq:
                    return time.monotonic() - start
        raise TimeoutError(f"no ICMP echo reply from {host} in {self.name}")

    # -- teardown ----------------------------------------------------------------------

    def pids(self) -> list[int]:
        cp = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in cp.stdout.split()] if cp.returncode == 0 else []

    def delete(self) -> None:
        """Stop our processes, then remove the namespace (its veths go with it)."""
        if self._deleted:
            return
        self._deleted = True
        for proc in list(self._procs):
            self.stop(proc, timeout=3)
        # Stragglers are descendants of what we started (e.g. Postfix daemons whose
        # master got SIGKILLed); they would keep the namespace and its veths alive.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(0.2)
        shutil.rmtree(NETNS_ETC_DIR / self.name, ignore_errors=True)
        _run(["ip", "netns", "delete", self.name], check=self.path.exists())
        with _live_lock:
            _live.pop(self.name, None)


def _link_ready(ns: Netns, dev: str) -> bool:
    link = ns.ip("-o", "link", "show", "dev", dev).stdout
    addrs = ns.ip("-o", "-6", "addr", "show", "dev", dev, "scope", "link").stdout
    return "state UP" in link and "fe80::" in addrs and "tentative" not in addrs


def _family(host: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Destination before REDIRECT/DNAT, for a socket accepted on a redirected port."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)  # sockaddr_in6
        port = struct.unpack("!H", raw[2:4])[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # sockaddr_in
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_close(conn: socket.socket | asyncio.BaseTransport | asyncio.StreamWriter) -> None:
    """Closes with a TCP RST (SO_LINGER on, linger time 0), not a FIN: a peer that resets.
    A socket, or an asyncio transport or stream writer (aborted)."""
    sock = conn if isinstance(conn, socket.socket) else conn.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    if isinstance(conn, socket.socket):
        with contextlib.suppress(OSError):
            conn.close()
    elif isinstance(conn, asyncio.StreamWriter):
        conn.transport.abort()
    else:
        conn.abort()  # type: ignore[attr-defined]


class Server:
    """A TCP server in a namespace: each accepted connection runs ``handler`` on a thread of
    its own and is closed after it.  ``clients`` are the connections' (address, port) in
    the order accepted; what a handler raises is kept and raised by :meth:`join`."""

    def __init__(self, ns: Netns, host: str, handler: Callable[[socket.socket], None],
                 port: int = 25) -> None:
        self.sock = ns.listen(host, port)
        self.handler = handler
        self.clients: list[tuple[str, int]] = []
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._loop, daemon=True, name=f"server {host}")
        self._accept.start()

    @property
    def addresses(self) -> list[str]:
        """The clients' addresses, in the order accepted."""
        return [address for address, _ in self.clients]

    @property
    def accepting(self) -> bool:
        return self._accept.is_alive()

    def _loop(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            self.clients.append(addr[:2])
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(conn)
            except BaseException as exc:
                self.errors.append(exc)

    def join(self, timeout: float = 60) -> None:
        """Waits for every handler; raises the first thing one raised."""
        deadline = time.monotonic() + timeout
        for t in list(self.threads):
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "server handlers still running"
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        """Stops accepting (the handlers still running go on)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self.sock.close()
        self._accept.join(5)


def http_get(ns: Netns, host: str, port: int, path: str,
             timeout: float = 10.0) -> tuple[bytes, bytes]:
    """``GET path`` (HTTP/1.0) from inside ``ns``: the response's head (status line and
    headers) and its body."""
    sock = ns.connect(host, port, timeout=timeout)
    with sock:
        sock.settimeout(timeout)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (via /proc/<pid>/task/*/children), depth first: what a
    daemon we started forked, to wait for or stop by PID."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                out.append(int(child))
                out.extend(descendants(int(child)))
    return out


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_port(ns: Netns, host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until ``host:port`` accepts TCP connections as seen from ``ns``."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            ns.connect(host, port, timeout=0.5).close()
            return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not accepting in {ns.name} after {timeout}s: {last}")


def reap_stale_namespaces() -> list[str]:
    """Delete ``sg<pid>-*`` namespaces left by test runs whose process is gone (SIGKILL)."""
    removed = []
    for path in NETNS_RUN_DIR.glob("sg*-*-*") if NETNS_RUN_DIR.is_dir() else []:
        pid_text = path.name[2:].split("-", 1)[0]
        if not pid_text.isdigit() or Path(f"/proc/{pid_text}").exists():
            continue
        _run(["ip", "netns", "delete", path.name], check=False)
        shutil.rmtree(NETNS_ETC_DIR / path.name, ignore_errors=True)
        removed.append(path.name)
    return removed


@atexit.register
def _delete_leftovers() -> None:
    # Safety net for labs not closed by their owner (interrupted test run).
    with _live_lock:
        leftovers = list(_live.values())
    for ns in leftovers:
        ns.delete()


def delete_all(namespaces: list[Netns]) -> None:
    """Deletes ``namespaces`` in reverse order and empties the list; each delete is
    independent, so one failure cannot leak the rest (the first is raised at the end)."""
    errors: list[BaseException] = []
    for ns in reversed(namespaces):
        try:
            ns.delete()
        except BaseException as exc:
            errors.append(exc)
    namespaces.clear()
    if errors:
        raise errors[0]


class Lab:
    """mta -- gw -- peer, v4 and v6, gw forwarding. Use as a context manager."""

    def __init__(self) -> None:
        self.namespaces: list[Netns] = []
        try:
            self.mta = self._add("mta")
            self.gw = self._add("gw")
            self.peer = self._add("peer")
            self._build()
        except BaseException:
            self.close()
            raise

    def _add(self, role: str) -> Netns:
        ns = Netns(role)
        self.namespaces.append(ns)
        return ns

    def _build(self) -> None:
        gw, mta, peer = self.gw, self.mta, self.peer
        gw.sysctl("net.ipv4.ip_forward", 1)
        gw.sysctl("net.ipv6.conf.all.forwarding", 1)
        # Created from inside gw with the other end placed straight into mta/peer:
        # the veths never appear in the root namespace.
        gw.ip("link", "add", GW_MTA_IF, "type", "veth", "peer", "name", HOST_IF, "netns", mta.name)
        gw.ip(
            "link", "add", GW_PEER_IF, "type", "veth", "peer", "name", HOST_IF, "netns", peer.name
        )
        for ns, dev, addrs in (
            (gw, GW_MTA_IF, [f"{GW_MTA_V4}/24", f"{GW_MTA_V6}/64"]),
            (gw, GW_PEER_IF, [f"{GW_PEER_V4}/24", f"{GW_PEER_V6}/64"]),
            (mta, HOST_IF, [f"{MTA_V4}/24", f"{MTA_V6}/64"]),
            (
                peer,
                HOST_IF,
                [f"{PEER_V4}/24", f"{PEER_V4_ALT}/24", f"{PEER_V6}/64", f"{PEER_V6_ALT}/64"],
            ),
        ):
            for addr in addrs:
                extra = ["nodad"] if ":" in addr else []
                ns.ip("addr", "add", addr, "dev", dev, *extra)
            # A lost ARP/ND probe is retried after 1 s by default; 100 ms keeps such a
            # hiccup from stalling a test. (No neigh/default sysctl outside init_net.)
            for proto in ("ipv4", "ipv6"):
                ns.sysctl(f"net.{proto}.neigh.{dev}.retrans_time_ms", 100)
            ns.ip("link", "set", dev, "up")
        for ns, v4, v6 in ((mta, GW_MTA_V4, GW_MTA_V6), (peer, GW_PEER_V4, GW_PEER_V6)):
            ns.ip("route", "add", "default", "via", v4)
            ns.ip("-6", "route", "add", "default", "via", v6)
        self._wait_links_ready()

    def _wait_links_ready(self, timeout: float = 5.0) -> None:
        # A few ms after "up", IPv6 on a veth is not yet running: no link-local address,
        # solicited-node groups not joined, so a neighbor solicitation sent now is
        # ignored and the first packet waits for the ND retransmit. The link-local
        # address appearing is the visible sign that the device is ready.
        links = [
            (self.gw, GW_MTA_IF),
            (self.gw, GW_PEER_IF),
            (self.mta, HOST_IF),
            (self.peer, HOST_IF),
        ]
        deadline = time.monotonic() + timeout
        while links:
            links = [(ns, dev) for ns, dev in links if not _link_ready(ns, dev)]
            if links and time.monotonic() > deadline:
                raise TimeoutError(f"links not ready after {timeout}s: {links}")
            if links:
                time.sleep(0.005)

    def redirect_port25(self, to_port: int, *, inbound: bool = False) -> None:
        """On gw: TCP to any :25 arriving from the mta link (``inbound``: from the peer
        link, the internet's side) goes to gw's local ``to_port``, v4 and v6."""
        link = GW_PEER_IF if inbound else GW_MTA_IF
        for v6 in (False, True):
            # fmt: off
            self.gw.iptables(
                ["-t", "nat", "-A", "PREROUTING", "-i", link, "-p", "tcp", "--dport", "25",
                 "-j", "REDIRECT", "--to-ports", str(to_port)],
                v6=v6,
            )
            # fmt: on

    def close(self) -> None:
        delete_all(self.namespaces)

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

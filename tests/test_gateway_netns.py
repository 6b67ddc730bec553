"""The real gateway process in a lab: mta → gw (REDIRECT/TPROXY, smtpgate) → peer.

Every test builds its own namespaces on documentation ranges and removes them.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gatelab import netlab
from gatelab.gatewayproc import GatewayProcess, gateway_config
from gatelab.netlab import (
    GW_PEER_V4,
    GW_PEER_V6,
    MTA_V4,
    MTA_V6,
    PEER_V4,
    PEER_V4_ALT,
    PEER_V6,
    Lab,
    Server,
    reset_close,
)
from gateway.workers import START_GRACE

pytestmark = pytest.mark.netns

if (_why := netlab.netns_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        lab.redirect_port25(10025)
        yield lab


@pytest.fixture
def gateway(lab: Lab, tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(text: str | None = None) -> GatewayProcess:
        gw = GatewayProcess(lab.gw, tmp_path, text or gateway_config()).start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def greet_and_hold(release: threading.Event, then: bytes = b"", wait: float = 30) -> Callable[
        [socket.socket], None]:
    """A peer's handler: its banner, then nothing until ``release`` is set (``wait`` seconds
    at most), then ``then``."""
    def handle(conn: socket.socket) -> None:
        conn.sendall(b"220 peer\r\n")
        release.wait(wait)
        if then:
            conn.sendall(then)
    return handle


def greeted_session(lab: Lab, banner: bytes = b"220 peer\r\n") -> None:
    """One session from mta to the peer's port 25 through the gateway: the peer's banner
    must arrive unchanged; the peer is gone afterwards."""
    peer = Server(lab.peer, PEER_V4, lambda c: c.sendall(banner))
    try:
        with lab.mta.connect(PEER_V4, 25) as c:
            c.settimeout(5)
            assert c.recv(100) == banner
        peer.join()
    finally:
        peer.close()


def recv_all(sock: socket.socket, read_size: int) -> tuple[bytes, int]:
    h = hashlib.sha256()
    n = 0
    while chunk := sock.recv(read_size):
        h.update(chunk)
        n += len(chunk)
    return h.digest(), n


def exchange(client: socket.socket, peer_conn_data: dict[str, object], up: bytes,
             read_size: int) -> tuple[bytes, int]:
    """Client sends ``up`` and reads everything the peer sends until EOF."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            client.sendall(up)
            client.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    result = recv_all(client, read_size)
    t.join(60)
    if errors:
        raise errors[0]
    return result


def stream_handler(down: bytes, read_size: int, got: dict[str, object]) -> Callable[
        [socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        got["original_port_peer_sees"] = conn.getsockname()[1]
        def send() -> None:
            conn.sendall(down)
            conn.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        got["digest"], got["size"] = recv_all(conn, read_size)
        t.join(60)
    return handle


@pytest.mark.parametrize(("family", "size", "read_size"), [
    ("v4", 50 * 1024 * 1024, 65536),
    ("v4", 50 * 1024 * 1024, 4096),
    ("v6", 50 * 1024 * 1024, 65536),
    ("v6", 1024 * 1024, 16),
])
def test_redirect_recovers_destination_and_relays_byte_exact(
        lab: Lab, gateway: Callable[..., GatewayProcess], family: str, size: int,
        read_size: int) -> None:
    gw = gateway()
    dst, gw_addr = (PEER_V4, GW_PEER_V4) if family == "v4" else (PEER_V6, GW_PEER_V6)
    up, down = os.urandom(size), os.urandom(size)
    got: dict[str, object] = {}
    peer = Server(lab.peer, dst, stream_handler(down, read_size, got))
    try:
        client = lab.mta.connect(dst, 25)
        with client:
            digest, n = exchange(client, got, up, read_size)
        peer.join()
    finally:
        peer.close()
    assert (digest, n) == (hashlib.sha256(down).digest(), size)
    assert (got["digest"], got["size"]) == (hashlib.sha256(up).digest(), size)
    # The peer was reached by the gateway (outbound: its own address), at the port asked for.
    assert peer.clients[0][0] == gw_addr
    [s] = gw.wait_sessions(1)
    assert s["outcome"] == "relayed"
    assert s["destination"] == (f"{dst}:25" if family == "v4" else f"[{dst}]:25")
    assert s["client"].startswith(MTA_V4 if family == "v4" else f"[{MTA_V6}]")
    assert (s["bytes_up"], s["bytes_down"]) == (size, size)
    assert gw.metric("smtpgate_sessions_total", direction="outbound", outcome="relayed") == 1
    assert gw.metric("smtpgate_relayed_bytes_total", direction="outbound",
                     stream="client_to_upstream") == size
    # A series not counted yet reads 0; a metric the gateway does not export is an error
    # (a renamed metric must fail the checks that read it).
    assert gw.metric("smtpgate_sessions_total", direction="outbound", outcome="aborted") == 0
    with pytest.raises(KeyError, match="smtpgate_session_total"):
        gw.metric("smtpgate_session_total", direction="outbound", outcome="relayed")


def test_upstream_sockets_carry_the_mark(lab: Lab, gateway: Callable[..., GatewayProcess]
                                         ) -> None:
    """The firewall exempts the gateway's traffic by mark: prove the mark is on the wire
    path by counting packets with it in gw's OUTPUT chain."""
    lab.gw.iptables(["-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--dport", "25",
                     "-m", "mark", "--mark", "0x2525", "-j", "ACCEPT"])
    gateway()
    greeted_session(lab)
    out = lab.gw.run(["iptables", "-t", "mangle", "-L", "OUTPUT", "-v", "-x", "-n"]).stdout
    row = next(line for line in out.splitlines() if "0x2525" in line)
    assert int(row.split()[0]) > 0, out


def test_connection_to_the_listener_itself_is_refused(
        lab: Lab, gateway: Callable[..., GatewayProcess]) -> None:
    """Not redirected: the original destination is the gateway's own listener (A6)."""
    gw = gateway()
    fds = 0
    for i in range(21):
        if i == 1:  # after the first, lazily opened descriptors (epoll, ...) exist
            time.sleep(0.2)
            fds = gw.open_fds()
        with lab.mta.connect(netlab.GW_MTA_V4, 10025) as c:
            c.settimeout(5)
            assert c.recv(200).startswith(b"421 4.4.6 ")
    sessions = gw.wait_sessions(21)
    assert {s["outcome"] for s in sessions} == {"refused_loop"}
    assert gw.metric("smtpgate_sessions_total", direction="outbound",
                     outcome="refused_loop") == 21
    time.sleep(0.2)
    assert gw.open_fds() <= fds


def test_own_traffic_intercepted_again_is_refused(
        lab: Lab, gateway: Callable[..., GatewayProcess]) -> None:
    """A firewall without the mark exemption sends the gateway's upstream connection back to
    itself; the gateway recognises its own connection and refuses it, without leaking."""
    for v6 in (False, True):
        lab.gw.iptables(["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "25",
                         "-j", "REDIRECT", "--to-ports", "10025"], v6=v6)
    gw = gateway()
    fds = 0
    for i, dst in enumerate((PEER_V4, PEER_V6) * 10):
        if i == 2:  # lazily opened descriptors exist after the first sessions
            time.sleep(0.2)
            fds = gw.open_fds()
        with lab.mta.connect(dst, 25) as c:
            c.settimeout(5)
            # The inner session's refusal is what the outer session relays to the MTA.
            assert c.recv(200).startswith(b"421 4.4.6 ")
    sessions = gw.wait_sessions(40)
    outcomes = sorted(s["outcome"] for s in sessions)
    assert outcomes.count("refused_loop") == 20
    time.sleep(0.3)
    assert gw.open_fds() <= fds
    assert gw.metric("smtpgate_sessions_active", direction="outbound") == 0


def test_session_limit_answers_421_and_closes(
        lab: Lab, gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(gateway_config(max_sessions=3))
    release = threading.Event()
    peer = Server(lab.peer, PEER_V4, greet_and_hold(release))
    held = []
    try:
        for _ in range(3):
            c = lab.mta.connect(PEER_V4, 25)
            c.settimeout(5)
            assert c.recv(100) == b"220 peer\r\n"
            held.append(c)
        for _ in range(5):
            with lab.mta.connect(PEER_V4, 25) as extra:
                extra.settimeout(5)
                assert extra.recv(200) == (b"421 4.3.2 smtpgate: too many sessions, "
                                           b"try again later\r\n")
                assert extra.recv(10) == b""  # and closed
        assert gw.metric("smtpgate_sessions_active", direction="outbound") == 3
        assert len(peer.clients) == 3  # the refused ones never reached the peer
    finally:
        release.set()
        for c in held:
            c.close()
        peer.join()
        peer.close()
    assert gw.metric("smtpgate_sessions_total", direction="outbound",
                     outcome="refused_limit") == 5


def test_unreachable_upstream_gets_a_421_greeting_with_the_reason(
        lab: Lab, gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway()
    # Nothing listens on PEER_V4_ALT:25: the peer's kernel answers with a reset.
    with lab.mta.connect(PEER_V4_ALT, 25) as c:
        c.settimeout(5)
        reply = c.recv(500)
        assert c.recv(10) == b""
    assert reply == (b"421 4.4.1 smtpgate: upstream refused: 203.0.113.3:25 "
                     b"(Connection refused)\r\n")
    # A peer that drops SYNs: the connect timeout (2 s here) ends it.
    lab.peer.iptables(["-A", "INPUT", "-p", "tcp", "--dport", "25", "-j", "DROP"])
    t0 = time.monotonic()
    with lab.mta.connect(PEER_V4, 25) as c:
        c.settimeout(10)
        reply = c.recv(500)
    assert 1.8 < time.monotonic() - t0 < 5
    assert reply.startswith(b"421 4.4.1 smtpgate: upstream timeout: 203.0.113.2:25")
    assert gw.metric("smtpgate_upstream_connect_failures_total", direction="outbound",
                     reason="refused") == 1
    assert gw.metric("smtpgate_upstream_connect_failures_total", direction="outbound",
                     reason="timeout") == 1
    assert [s["outcome"] for s in gw.wait_sessions(2)] == ["upstream_failed"] * 2


def test_unreachable_upstream_reset_mode(lab: Lab, gateway: Callable[..., GatewayProcess]
                                         ) -> None:
    gw = gateway(gateway_config(on_failure="reset"))
    # The reset can come so fast that the client's connect() already reports it.
    with pytest.raises(ConnectionResetError), lab.mta.connect(PEER_V4_ALT, 25) as c:
        c.settimeout(5)
        c.recv(500)
    assert gw.wait_sessions(1)[0]["outcome"] == "upstream_failed"


def test_idle_timeout_ends_a_silent_session(lab: Lab, gateway: Callable[..., GatewayProcess]
                                            ) -> None:
    gw = gateway(gateway_config(idle=0.5))
    release = threading.Event()
    peer = Server(lab.peer, PEER_V4, greet_and_hold(release, wait=10))
    try:
        with lab.mta.connect(PEER_V4, 25) as c:
            c.settimeout(5)
            assert c.recv(100) == b"220 peer\r\n"
            t0 = time.monotonic()
            with pytest.raises(ConnectionResetError):
                c.recv(100)
            assert 0.4 < time.monotonic() - t0 < 3
    finally:
        release.set()
        peer.join()
        peer.close()
    assert gw.wait_sessions(1)[0]["outcome"] == "timeout_idle"


def test_slow_reader_keeps_gateway_buffer_bounded(
        lab: Lab, gateway: Callable[..., GatewayProcess]) -> None:
    """The peer sends 32 MB at full speed; the MTA reads 64 KiB every 20 ms.  The gateway's
    user-space buffer (its own metric, sampled all along) stays under high-water + one read."""
    high = 65536
    gw = gateway(gateway_config(buffer_bytes=high))
    size = 32 * 1024 * 1024
    down = os.urandom(size)

    def handler(conn: socket.socket) -> None:
        conn.sendall(down)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(10)

    peer = Server(lab.peer, PEER_V4, handler)
    peak = 0
    samples = 0
    try:
        client = lab.mta.socket(socket.AF_INET)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.connect((PEER_V4, 25))
        result: list[tuple[bytes, int]] = []

        def slow() -> None:
            h = hashlib.sha256()
            n = 0
            while chunk := client.recv(65536):
                h.update(chunk)
                n += len(chunk)
                time.sleep(0.02)
            result.append((h.digest(), n))

        t = threading.Thread(target=slow, daemon=True)
        t.start()
        deadline = time.monotonic() + 120
        while t.is_alive():
            assert time.monotonic() < deadline
            peak = max(peak, int(gw.metric("smtpgate_relay_buffered_bytes")))
            samples += 1
            time.sleep(0.05)
        client.close()
        peer.join()
    finally:
        peer.close()
    assert result == [(hashlib.sha256(down).digest(), size)]
    assert samples >= 20
    assert 0 < peak <= high + 256 * 1024, peak


def test_tproxy_mode_destination_from_the_socket(tmp_path: Path) -> None:
    """TPROXY: no NAT; the accepted socket's own address is the original destination."""
    with Lab() as lab:
        tproxy_session(lab, tmp_path)


def tproxy_session(lab: Lab, tmp_path: Path) -> None:
    gw_ns = lab.gw
    gw_ns.iptables(["-t", "mangle", "-A", "PREROUTING", "-i", netlab.GW_MTA_IF, "-p", "tcp",
                    "--dport", "25", "-j", "TPROXY", "--on-port", "10027",
                    "--tproxy-mark", "0x40000/0x40000"])
    # The TPROXY mark bit must not overlap upstream.mark (0x2525), or the gateway's own
    # upstream packets would be routed to the local table too.
    gw_ns.ip("rule", "add", "fwmark", "0x40000/0x40000", "lookup", "100")
    gw_ns.ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    text = gateway_config(listeners=["{address: 0.0.0.0, port: 10027, mode: tproxy}"])
    with GatewayProcess(gw_ns, tmp_path, text) as gw:
        greeted_session(lab, b"220 tproxy peer\r\n")
        [s] = gw.wait_sessions(1)
        assert s["destination"] == f"{PEER_V4}:25" and s["outcome"] == "relayed"


def test_sighup_reload_keeps_sessions_and_refuses_bad_config(
        lab: Lab, gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(gateway_config(max_sessions=5))
    release = threading.Event()
    peer = Server(lab.peer, PEER_V4, greet_and_hold(release, then=b"221 bye\r\n"))
    try:
        c = lab.mta.connect(PEER_V4, 25)
        c.settimeout(10)
        assert c.recv(100) == b"220 peer\r\n"
        # A bad config is refused; the old one stays.
        good = gw.config_path.read_text()
        gw.config_path.write_text(good.replace("max_sessions: 5", "max_sessions: 0"))
        gw.signal(signal.SIGHUP)
        [rej] = gw.wait_event("reload rejected")
        assert rej["error"] == f"{gw.config_path}: limits.max_sessions: must be a positive integer"
        assert gw.metric("smtpgate_config_reloads_total", result="rejected") == 1
        # A good one applies to new sessions: max_sessions 1 now, and one is running.
        gw.config_path.write_text(good.replace("max_sessions: 5", "max_sessions: 1"))
        gw.signal(signal.SIGHUP)
        gw.wait_event("reloaded")
        with lab.mta.connect(PEER_V4, 25) as extra:
            extra.settimeout(5)
            assert extra.recv(200).startswith(b"421 4.3.2 ")
        # The session that started before both reloads is untouched.
        release.set()
        assert c.recv(100) == b"221 bye\r\n"
        c.close()
        peer.join()
    finally:
        release.set()
        peer.close()
    outcomes = sorted(s["outcome"] for s in gw.wait_sessions(2))
    assert outcomes == ["refused_limit", "relayed"]


def test_reload_changes_the_plan_of_a_destination_seen_before(
        lab: Lab, gateway: Callable[..., GatewayProcess]) -> None:
    """Plans decided by the config alone are remembered per destination; a reload must
    forget them, or the old policy would go on applying to every address seen before."""
    gw = gateway(gateway_config())
    greeted_session(lab)
    greeted_session(lab)
    good = gw.config_path.read_text()
    gw.config_path.write_text(good.replace(
        "policy: {default: none}",
        "policy: {default: none, entries: [{match: 203.0.113.0/24, level: encrypt}]}"))
    gw.signal(signal.SIGHUP)
    gw.wait_event("reloaded")
    greeted_session(lab)
    plans = [s.get("plan") for s in gw.wait_sessions(3)]
    assert plans == ["passthrough", "passthrough", "require-tls"], plans


def test_sigterm_drains_then_exits(lab: Lab, gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(gateway_config(drain=3))
    release = threading.Event()
    peer = Server(lab.peer, PEER_V4, greet_and_hold(release, then=b"250 finished in drain\r\n"))
    try:
        finishing = lab.mta.connect(PEER_V4, 25)
        stuck = lab.mta.connect(PEER_V4, 25)
        for c in (finishing, stuck):
            c.settimeout(10)
            assert c.recv(100) == b"220 peer\r\n"
        gw.signal(signal.SIGTERM)
        gw.wait_event("draining")
        # Listeners are closed: a new connection is not accepted any more.
        with pytest.raises(OSError):
            lab.mta.connect(PEER_V4, 25, timeout=1).recv(1)
        time.sleep(0.5)
        release.set()  # both sessions get their reply...
        assert finishing.recv(100) == b"250 finished in drain\r\n"
        finishing.close()  # ...one ends, the other holds on past the deadline
        assert stuck.recv(100) == b"250 finished in drain\r\n"
        t0 = time.monotonic()
        assert gw.wait_exit(timeout=10) == 0
        assert time.monotonic() - t0 < 4
        stopped = gw.wait_event("stopped")[0]
        assert stopped["aborted"] == 1
    finally:
        release.set()
        peer.close()
    outcomes = sorted(s["outcome"] for s in gw.sessions())
    assert outcomes == ["aborted", "relayed"], outcomes


def test_connection_carrying_the_gateway_mark_is_refused(
        lab: Lab, gateway: Callable[..., GatewayProcess]) -> None:
    """With net.ipv4.tcp_fwmark_accept=1 an accepted socket carries its SYN's mark: a
    connection marked as the gateway's own is refused even from an address the gateway
    does not know (another process using the mark by mistake, or a second instance)."""
    lab.gw.sysctl("net.ipv4.tcp_fwmark_accept", 1)
    gw = gateway()
    peer = Server(lab.peer, PEER_V4, lambda c: c.sendall(b"220 peer\r\n"))
    try:
        # A process of gw's own with some other mark is relayed; one with the gateway's
        # mark is refused.  (Only the test sockets' marks are redirected, not the gateway's.)
        for mark, expect in ((0x77, b"220 peer\r\n"), (0x2525, b"421 4.4.6 ")):
            lab.gw.iptables(["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "25",
                             "-m", "mark", "--mark", hex(mark),
                             "-j", "REDIRECT", "--to-ports", "10025"])
            s = lab.gw.socket(socket.AF_INET)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            s.settimeout(5)
            with s:
                s.connect((PEER_V4, 25))  # redirected to the gateway in its own namespace
                assert s.recv(100).startswith(expect)
        peer.join()
    finally:
        peer.close()
    outcomes = sorted(s["outcome"] for s in gw.wait_sessions(2))
    assert outcomes == ["refused_loop", "relayed"]


def test_client_reset_during_a_slow_connect_ends_the_session_at_once(
        lab: Lab, gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(gateway_config(connect=20))
    lab.peer.iptables(["-A", "INPUT", "-p", "tcp", "--dport", "25", "-j", "DROP"])
    time.sleep(0.3)
    fds = gw.open_fds()
    clients = [lab.mta.connect(PEER_V4, 25) for _ in range(5)]
    time.sleep(0.3)  # the gateway has accepted them and waits for the peer's SYN-ACK
    assert gw.metric("smtpgate_sessions_active", direction="outbound") == 5
    t0 = time.monotonic()
    for c in clients:
        reset_close(c)
    sessions = gw.wait_sessions(5, timeout=5)
    assert time.monotonic() - t0 < 5
    assert {s["outcome"] for s in sessions} == {"client_reset"}
    assert {s["destination"] for s in sessions} == {f"{PEER_V4}:25"}
    assert gw.metric("smtpgate_sessions_active", direction="outbound") == 0
    time.sleep(0.5)  # the discoveries' DNS queries (to no resolver) time out after 0.3 s
    assert gw.open_fds() <= fds


def test_sighup_opens_and_closes_listeners(lab: Lab, gateway: Callable[..., GatewayProcess]
                                           ) -> None:
    gw = gateway()
    base = gw.config_path.read_text()
    added = base.replace('  - {address: "::", port: 10025}',
                         '  - {address: "::", port: 10025}\n'
                         '  - {address: 0.0.0.0, port: 10030, name: extra}')
    gw.config_path.write_text(added)
    gw.signal(signal.SIGHUP)
    gw.wait_event("reloaded")
    # Listening: a direct connection is answered (as a loop: it was not redirected).
    with lab.mta.connect(netlab.GW_MTA_V4, 10030) as c:
        c.settimeout(5)
        assert c.recv(100).startswith(b"421 4.4.6 ")
    gw.config_path.write_text(base)
    gw.signal(signal.SIGHUP)
    gw.wait_event("reloaded", n=2)
    assert gw.wait_event("listener closed")[0]["listener"] == "extra"
    with pytest.raises(ConnectionRefusedError):
        lab.mta.connect(netlab.GW_MTA_V4, 10030)
    # A listener that cannot be opened rejects the whole reload; the old ones stay.
    gw.config_path.write_text(base.replace('  - {address: "::", port: 10025}',
                                           '  - {address: 192.0.2.99, port: 10031}'))
    gw.signal(signal.SIGHUP)
    [rej] = gw.wait_event("reload rejected")
    assert rej["error"] == (f"{gw.config_path}: listeners[1]: cannot listen on "
                            "192.0.2.99:10031: Cannot assign requested address")
    peer = Server(lab.peer, PEER_V6, lambda c: c.sendall(b"220 still v6\r\n"))
    try:
        with lab.mta.connect(PEER_V6, 25) as c:
            c.settimeout(5)
            assert c.recv(100) == b"220 still v6\r\n"
        peer.join()
    finally:
        peer.close()


def test_inbound_forwards_only_to_the_configured_mta(tmp_path: Path) -> None:
    """Inbound: connections from the internet side to any address on port 25 go to the
    configured MTA and nowhere else (A6), whatever destination the client asked for."""
    with Lab() as lab:
        lab.redirect_port25(10026, inbound=True)
        text = gateway_config(listeners=[
            f'{{address: {host}, port: 10026, direction: inbound, starttls: passthrough, '
            f'upstreams: ["{MTA_V4}:2525"]}}' for host in ("0.0.0.0", '"::"')])
        mta = Server(lab.mta, MTA_V4, lambda c: c.sendall(b"220 legacy mta\r\n"), port=2525)
        try:
            with GatewayProcess(lab.gw, tmp_path, text) as gw:
                # The MTA's own address, another address of that network, and v6: all end
                # at the configured MTA.
                for dst in (MTA_V4, "198.51.100.77", MTA_V6):
                    with lab.peer.connect(dst, 25) as c:
                        c.settimeout(5)
                        assert c.recv(100) == b"220 legacy mta\r\n"
                sessions = gw.wait_sessions(3)
            mta.join()
        finally:
            mta.close()
            assert not mta.accepting
    assert len(mta.clients) == 3
    assert [s["upstream"] for s in sessions] == [f"{MTA_V4}:2525"] * 3
    assert [s["destination"] for s in sessions] == [
        f"{MTA_V4}:25", "198.51.100.77:25", f"[{MTA_V6}]:25"]
    assert {s["direction"] for s in sessions} == {"inbound"}


def fake_starttls_peer(after_220: bytes, delay: float, seen: list[bytes]) -> Callable[
        [socket.socket], None]:
    """A peer that offers STARTTLS and, after its 220, injects ``after_220`` (at once or
    ``delay`` later): the classic STARTTLS command injection (CVE-2011-0411 family)."""
    def handle(conn: socket.socket) -> None:
        conn.settimeout(10)
        conn.sendall(b"220 fake ESMTP\r\n")
        reader = conn.makefile("rb")
        while line := reader.readline():
            seen.append(line)
            verb = line.split()[0].upper() if line.strip() else b""
            if verb == b"EHLO":
                conn.sendall(b"250-fake\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            elif verb == b"STARTTLS":
                conn.sendall(b"220 2.0.0 go ahead\r\n" + (b"" if delay else after_220))
                if delay:
                    time.sleep(delay)
                    conn.sendall(after_220)
            elif verb == b"QUIT":
                return
    return handle


@pytest.mark.parametrize("delay", [0.0, 0.2], ids=["same-segment", "later"])
def test_injection_after_starttls_reply_is_never_acted_on(
        lab: Lab, gateway: Callable[..., GatewayProcess], delay: float) -> None:
    gw = gateway(gateway_config(policy="encrypt"))
    seen: list[bytes] = []
    peer = Server(lab.peer, PEER_V4, fake_starttls_peer(b"250-INJECTED\r\n250 OK\r\n", delay, seen))
    try:
        with lab.mta.connect(PEER_V4, 25) as c:
            c.settimeout(10)
            f = c.makefile("rb")
            assert f.readline() == b"220 fake ESMTP\r\n"
            c.sendall(b"EHLO mta.a.test\r\n")
            assert f.readline() == b"250-fake\r\n"
            f.readline()
            f.readline()
            c.sendall(b"MAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n")
            reply = f.readline()
        peer.join()
    finally:
        peer.close()
    assert reply.startswith(b"421 4.7.0 smtpgate: ")
    # The held envelope never reached the peer, in plaintext or otherwise.
    assert not any(line.startswith((b"MAIL", b"RCPT", b"DATA")) for line in seen), seen
    [s] = gw.wait_sessions(1)
    assert (s["outcome"], s["tls"]) == ("deferred", "deferred")
    if not delay:
        assert s["tls_reason"] == "data injected after STARTTLS reply"


def test_workers_share_the_listeners_and_their_metrics_add_up(
        lab: Lab, gateway: Callable[..., GatewayProcess]) -> None:
    """workers: 2: the kernel spreads connections over two processes (SO_REUSEPORT); the
    supervisor's /metrics is their sum; SIGHUP reaches both; SIGTERM drains both."""
    started = time.monotonic()
    gw = gateway(gateway_config(workers=2))
    release = threading.Event()
    peer = Server(lab.peer, PEER_V4, greet_and_hold(release))
    pids = {e["pid"] for e in gw.events("worker started")}
    assert len(pids) == 2
    # "worker started" is the supervisor's word at spawn: wait until both listen, or the
    # kernel can only give every connection to the first.
    deadline = time.monotonic() + 15
    while True:
        ss = lab.gw.run(["ss", "-Hltnp", "(", "sport", "=", ":10025", ")"]).stdout
        if {int(m) for m in re.findall(r"pid=(\d+)", ss)} >= pids:
            break
        assert time.monotonic() < deadline, ss
        time.sleep(0.05)
    held = []
    try:
        for _ in range(40):
            c = lab.mta.connect(PEER_V4, 25)
            c.settimeout(5)
            assert c.recv(100) == b"220 peer\r\n"
            held.append(c)
        # While all 40 are open: which processes hold the gateway's accepted sockets.
        ss = lab.gw.run(["ss", "-Htnp", "state", "established", "(", "sport", "=", ":10025",
                         ")"]).stdout
        serving = {int(m) for m in re.findall(r"pid=(\d+)", ss)}
        assert serving == pids, ss  # the kernel spread the connections over both workers
    finally:
        release.set()
        for c in held:
            c.close()
        peer.join()
        peer.close()
    sessions = gw.wait_sessions(40)
    assert gw.metric("smtpgate_sessions_total", direction="outbound", outcome="relayed") == 40
    assert len(sessions) == 40
    assert {s["worker"] for s in sessions} == {0, 1}  # each line says who wrote it
    # A worker that dies takes nothing back: its counts stay in the supervisor's sum.  (Not
    # within its first seconds: then the supervisor takes it for one that cannot start.)
    time.sleep(max(0.0, START_GRACE + 0.5 - (time.monotonic() - started)))
    os.kill(sorted(pids)[0], signal.SIGKILL)
    gw.wait_event("worker started", n=3)
    for _ in range(20):
        assert gw.metric("smtpgate_sessions_total", direction="outbound",
                         outcome="relayed") == 40
        time.sleep(0.05)
    # One reload is one event: a bad file is refused once, by the supervisor, and the
    # workers keep their config; a good one reaches both.
    good = gw.config_path.read_text()
    gw.config_path.write_text(good + "extra: 1\n")
    gw.signal(signal.SIGHUP)
    [rejected] = gw.wait_event("reload rejected")
    assert "extra: unknown key" in rejected["error"]
    time.sleep(0.5)
    assert len(gw.events("reload rejected")) == 1
    assert gw.metric("smtpgate_config_reloads_total", result="rejected") == 1
    gw.config_path.write_text(good)
    gw.signal(signal.SIGHUP)
    assert len(gw.wait_event("reloaded", n=2)) == 2
    assert gw.metric("smtpgate_config_reloads_total", result="ok") == 1
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(timeout=15) == 0
    assert len(gw.events("stopped")) == 3  # two workers and the supervisor
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()

"""The byte pump on real loopback sockets: byte-exact both ways, half-close, timeouts,
backpressure.  Peers are plain blocking sockets in threads; the pump runs on uvloop."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from gatelab import certs
from gatelab.netlab import reset_close
from gateway.relay import End, Pump


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(coro)


class Rig:
    """client ⇄ [pump.client | pump.upstream] ⇄ server, all on 127.0.0.1."""

    def __init__(self, pump: Pump, client: socket.socket, server: socket.socket) -> None:
        self.pump, self.client, self.server = pump, client, server


async def rig(high_water: int = 64 * 1024, idle: float = 30.0, total: float = 120.0,
              early: bytes = b"") -> Rig:
    """``early`` is sent by the client before the upstream leg exists (as an MTA may)."""
    loop = asyncio.get_running_loop()
    pump = Pump(high_water, idle, total)
    gw_listen = socket.create_server(("127.0.0.1", 0))
    up_listen = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(gw_listen.getsockname())
    client.sendall(early)
    accepted, _ = gw_listen.accept()
    accepted.setblocking(False)
    await loop.connect_accepted_socket(lambda: pump.client, accepted)
    await loop.create_connection(lambda: pump.upstream, *up_listen.getsockname()[:2])
    server, _ = up_listen.accept()
    gw_listen.close()
    up_listen.close()
    pump.start()
    return Rig(pump, client, server)


def sender(sock: socket.socket, data: bytes, chunk: int, shut: bool = True) -> Callable[[], None]:
    def go() -> None:
        view = memoryview(data)
        for i in range(0, len(data), chunk):
            sock.sendall(view[i:i + chunk])
        if shut:
            sock.shutdown(socket.SHUT_WR)
    return go


def receiver(sock: socket.socket, read_size: int, out: list[bytes],
             delay: float = 0.0) -> Callable[[], None]:
    def go() -> None:
        h = hashlib.sha256()
        n = 0
        while chunk := sock.recv(read_size):
            h.update(chunk)
            n += len(chunk)
            if delay:
                time.sleep(delay)
        out.append(h.digest())
        out.append(n.to_bytes(8, "big"))
    return go


async def in_threads(*fns: Callable[[], None], limit: float = 120.0) -> None:
    """Runs blocking peers in threads while the loop runs; their failures fail the test."""
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def go() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
        return go

    threads = [threading.Thread(target=guarded(f), daemon=True) for f in fns]
    for t in threads:
        t.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while any(t.is_alive() for t in threads):
        assert loop.time() < deadline, "peers did not finish in time"
        await asyncio.sleep(0.01)
    if errors:
        raise errors[0]


@pytest.mark.parametrize(("size", "read_size", "write_chunk"), [
    (50 * 1024 * 1024, 65536, 1 << 20),
    (50 * 1024 * 1024, 4096, 65536),
    (1024 * 1024, 16, 1000),
    (64 * 1024, 1, 1),
])
def test_byte_exact_both_directions(size: int, read_size: int, write_chunk: int) -> None:
    up_data, down_data = os.urandom(size), os.urandom(size)

    async def main() -> None:
        r = await rig()
        got_up: list[bytes] = []
        got_down: list[bytes] = []
        await in_threads(
            sender(r.client, up_data, write_chunk), receiver(r.server, read_size, got_up),
            sender(r.server, down_data, write_chunk), receiver(r.client, read_size, got_down))
        assert got_up == [hashlib.sha256(up_data).digest(), size.to_bytes(8, "big")]
        assert got_down == [hashlib.sha256(down_data).digest(), size.to_bytes(8, "big")]
        assert await asyncio.wait_for(r.pump.done, 5) is End.DONE
        assert r.pump.client.bytes_in == size and r.pump.upstream.bytes_in == size
        r.client.close()
        r.server.close()

    run(main())


def test_bytes_sent_before_the_upstream_exists_are_relayed() -> None:
    """Start is called right after create_connection returns; uvloop makes the upstream
    transport one iteration later.  Nothing the client sent early may be lost."""
    early = os.urandom(200_000)

    async def main() -> None:
        r = await rig(early=early)
        loop = asyncio.get_running_loop()
        r.server.settimeout(5)
        got = b""
        while len(got) < len(early):
            got += await loop.run_in_executor(None, r.server.recv, 65536)
        assert got == early
        r.client.close()
        r.server.close()

    run(main())


def test_half_close_each_direction() -> None:
    """The client's EOF reaches the server as EOF while the server can still answer."""

    async def main() -> None:
        r = await rig()
        loop = asyncio.get_running_loop()

        def server() -> None:
            data = b""
            while chunk := r.server.recv(4096):  # reads to the client's EOF
                data += chunk
            assert data == b"QUIT\r\n"
            r.server.sendall(b"221 bye\r\n" * 1000)  # still allowed after the client's EOF
            r.server.shutdown(socket.SHUT_WR)

        def client() -> None:
            r.client.sendall(b"QUIT\r\n")
            r.client.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := r.client.recv(4096):
                data += chunk
            assert data == b"221 bye\r\n" * 1000

        await in_threads(server, client, limit=10)
        assert await asyncio.wait_for(r.pump.done, 5) is End.DONE
        # both legs closed by the gateway after both EOFs
        await asyncio.sleep(0.05)
        assert r.pump.client.lost and r.pump.upstream.lost
        assert await loop.run_in_executor(None, r.server.recv, 1) == b""
        r.client.close()
        r.server.close()

    run(main())


@pytest.mark.parametrize("tls13", [True, False])
def test_half_close_toward_a_tls_leg_is_close_notify_then_fin_and_reading_goes_on(
        tmp_path: Path, tls13: bool) -> None:
    """The client's FIN becomes close_notify + FIN on the TLS upstream; the server's
    replies written after it still reach the client (asyncio's SSL transport discards
    them), then its close_notify ends the session cleanly."""
    paths = certs.write_pki(tmp_path, certs.make_leaf(None, ["mx.b.test"]))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths["cert"], paths["key"])
    if not tls13:
        server_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE

    async def main() -> None:
        r = await rig()
        up = r.pump.upstream
        assert up.transport is not None
        up.transport.pause_reading()  # as at STARTTLS
        tls_server: list[ssl.SSLSocket] = []

        def handshake() -> None:
            tls_server.append(server_ctx.wrap_socket(r.server, server_side=True))

        waiter = up.start_tls(client_ctx, False, "mx.b.test")
        # The server's handshake ends with the client's Finished, which the gateway sends
        # with its first record (relay.Leg._flight): here the MTA's ".".
        handshaken = asyncio.get_running_loop().run_in_executor(None, handshake)
        await waiter
        up.release()

        def server() -> None:
            deadline = time.monotonic() + 5
            while not tls_server and time.monotonic() < deadline:
                time.sleep(0.01)
            srv = tls_server[0]
            data = b""
            while chunk := srv.recv(4096):  # b"" at the gateway's close_notify
                data += chunk
            assert data == b".\r\nQUIT\r\n"
            srv.sendall(b"250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n")
            srv.unwrap()  # our close_notify; the gateway's came first
            assert srv.recv(1) == b""  # then its FIN: the TCP half of the half-close

        def client() -> None:
            r.client.sendall(b".\r\nQUIT\r\n")
            r.client.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := r.client.recv(4096):
                data += chunk
            assert data == b"250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n"

        await in_threads(server, client, limit=10)
        await handshaken
        assert await asyncio.wait_for(r.pump.done, 5) is End.DONE
        r.client.close()
        tls_server[0].close()

    run(main())


@pytest.mark.parametrize("command", [b"EHLO gw.example\r\n", b""],
                         ids=["with-the-first-record", "alone-at-release"])
def test_the_clients_finished_goes_with_its_first_record(tmp_path: Path,
                                                          command: bytes) -> None:
    """TLS 1.3: after STARTTLS the client speaks first, so its Finished is held and goes
    out with the first record written while the outcome is acted on, one write: the
    segment that ends the server's handshake carries the command too (one wakeup and one
    read fewer on each side).  Nothing written by then: release() sends it alone."""
    paths = certs.write_pki(tmp_path, certs.make_leaf(None, ["mx.b.test"]))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths["cert"], paths["key"])
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
    read_at_once: list[bytes] = []

    async def main() -> None:
        r = await rig()
        up = r.pump.upstream
        assert up.transport is not None
        up.transport.pause_reading()  # as at STARTTLS
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = server_ctx.wrap_bio(incoming, outgoing, server_side=True)

        def server() -> None:
            r.server.settimeout(5)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        r.server.sendall(outgoing.read())
                incoming.write(r.server.recv(65536))
            try:  # nothing more read: only what came with the handshake's last segment
                read_at_once.append(tls.read(4096))
            except ssl.SSLWantReadError:
                read_at_once.append(b"")

        peer = threading.Thread(target=server, daemon=True)
        peer.start()
        await up.start_tls(client_ctx, False, "mx.b.test")
        assert up.tls is not None and up.tls.obj.version() == "TLSv1.3"
        await asyncio.sleep(0.2)  # were the Finished sent at once, it would be read by now
        # As the shell does: act on the outcome (the first command, if any), then release.
        up.write(command)
        up.release()
        await asyncio.get_running_loop().run_in_executor(None, peer.join, 5)
        r.pump.finish(End.ABORTED)
        r.client.close()
        r.server.close()

    run(main())
    assert read_at_once == [command]  # the server's handshake ended, with the command if any


def test_half_close_keeps_session_open_until_both_sides_end() -> None:
    async def main() -> None:
        r = await rig()
        r.server.shutdown(socket.SHUT_WR)  # server done sending; client not yet
        await asyncio.sleep(0.2)
        assert not r.pump.done.done()
        loop = asyncio.get_running_loop()
        r.client.settimeout(5)
        r.server.settimeout(5)
        # Blocking calls go to a thread: the pump runs on this loop.
        assert await loop.run_in_executor(None, r.client.recv, 10) == b""  # EOF passed on
        r.client.sendall(b"late data")
        assert await loop.run_in_executor(None, r.server.recv, 100) == b"late data"
        r.client.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(r.pump.done, 5) is End.DONE
        r.client.close()
        r.server.close()

    run(main())


def test_reset_is_mirrored() -> None:
    async def main() -> None:
        r = await rig()
        reset_close(r.server)
        assert await asyncio.wait_for(r.pump.done, 5) is End.UPSTREAM_RESET
        r.client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            r.client.recv(10)
        r.client.close()

    run(main())


def test_a_client_reset_after_its_quit_went_out_ends_like_a_close() -> None:
    """An MTA that closes without waiting for the 221 makes its kernel answer the reply
    with a reset: once its QUIT is out, the peer gets a FIN (not a mirrored reset, which it
    would count as a cut-off session) and the session ends clean when the peer closes."""

    async def main() -> None:
        r = await rig()
        r.pump.quit_sent = lambda: True  # as the envelope tracker says after QUIT
        loop = asyncio.get_running_loop()
        reset_close(r.client)
        r.server.settimeout(5)
        assert await loop.run_in_executor(None, r.server.recv, 10) == b""  # a FIN
        assert not r.pump.done.done()  # the peer still may say its last words
        r.server.sendall(b"221 2.0.0 Bye\r\n")
        r.server.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(r.pump.done, 5) is End.DONE
        r.server.close()

    run(main())


def test_a_reset_after_the_other_side_ended_is_no_cut() -> None:
    """End-to-end TLS hides QUIT: the peer says its last words and closes, the gateway
    passes the close on, then the MTA's kernel resets (the peer's close_notify was left
    unread).  The pump still reports the reset (mirrored as ever); the session counts it as
    the clean end it was.  A reset with nothing closed before it stays a reset."""

    async def main() -> None:
        r = await rig()
        loop = asyncio.get_running_loop()
        r.server.sendall(b"221 2.0.0 Bye\r\n")
        r.server.shutdown(socket.SHUT_WR)
        r.client.settimeout(5)
        got = b""
        while chunk := await loop.run_in_executor(None, r.client.recv, 100):
            got += chunk
        assert got == b"221 2.0.0 Bye\r\n"  # then the FIN, passed on
        reset_close(r.client)
        end = await asyncio.wait_for(r.pump.done, 5)
        assert end is End.CLIENT_RESET and r.pump.closed_before_reset(end)
        r.server.close()

        r = await rig()
        reset_close(r.client)
        end = await asyncio.wait_for(r.pump.done, 5)
        assert end is End.CLIENT_RESET and not r.pump.closed_before_reset(end)
        r.server.close()

    run(main())


def test_idle_timeout() -> None:
    async def main() -> None:
        r = await rig(idle=0.3)
        t0 = time.monotonic()
        r.client.sendall(b"EHLO x\r\n")
        assert await asyncio.wait_for(r.pump.done, 5) is End.IDLE
        elapsed = time.monotonic() - t0
        assert 0.25 <= elapsed < 1.5, elapsed
        r.client.close()
        r.server.close()

    run(main())


def test_activity_keeps_idle_timer_away_but_total_timeout_ends_it() -> None:
    async def main() -> None:
        r = await rig(idle=0.3, total=1.0)
        t0 = time.monotonic()
        while not r.pump.done.done():
            assert time.monotonic() - t0 < 5
            try:
                r.client.send(b".")
            except OSError:
                break
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(r.pump.done, 5) is End.TOTAL
        assert 0.9 <= time.monotonic() - t0 < 2.0
        r.client.close()
        r.server.close()

    run(main())


@pytest.mark.slow  # seconds: kept out of the quick tier
def test_slow_reader_bounds_the_buffer() -> None:
    """A reader that takes 4 KiB every 2 ms against a sender at full speed: the pump's
    user-space buffer never exceeds the high-water mark plus one socket read."""
    high = 64 * 1024
    size = 8 * 1024 * 1024
    data = os.urandom(size)

    async def main() -> None:
        r = await rig(high_water=high)
        for s in (r.client, r.server):  # small kernel buffers: the pump, not the kernel, is tested
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        got: list[bytes] = []
        peak = 0
        done = threading.Event()

        def slow() -> None:
            receiver(r.client, 4096, got, delay=0.002)()
            done.set()

        threads = [threading.Thread(target=sender(r.server, data, 1 << 20), daemon=True),
                   threading.Thread(target=slow, daemon=True)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        samples = 0
        while not done.is_set():
            assert time.monotonic() < deadline
            peak = max(peak, r.pump.buffered())
            samples += 1
            await asyncio.sleep(0.001)
        r.client.shutdown(socket.SHUT_WR)
        assert got == [hashlib.sha256(data).digest(), size.to_bytes(8, "big")]
        assert samples > 100
        # One read of uvloop is at most 256 KiB; asyncio calls pause_writing past `high`.
        assert 0 < peak <= high + 256 * 1024, peak
        assert await asyncio.wait_for(r.pump.done, 5) is End.DONE
        r.client.close()
        r.server.close()

    run(main())

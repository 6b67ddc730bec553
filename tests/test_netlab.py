"""The test harness itself: namespaces, routing, in-process sockets, REDIRECT, Postfix."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gatelab.netlab import (
    GW_MTA_V4,
    GW_MTA_V6,
    GW_PEER_V4,
    GW_PEER_V6,
    MTA_V4,
    MTA_V6,
    NETNS_RUN_DIR,
    PEER_V4,
    PEER_V4_ALT,
    PEER_V6,
    PEER_V6_ALT,
    Lab,
    netns_usable,
    original_dst,
    reap_stale_namespaces,
)
from gatelab.postfix_instance import (
    PostfixInstance,
    SmtpSink,
    null_client_settings,
    postfix_usable,
    receiver_settings,
    smtp_source,
)

pytestmark = pytest.mark.netns


def _existing(names: list[str]) -> list[str]:
    return [name for name in names if (NETNS_RUN_DIR / name).exists()]


@pytest.fixture(scope="module")
def netns_ok() -> None:
    reason = netns_usable()
    if reason:
        pytest.skip(reason)
    reap_stale_namespaces()


@pytest.fixture
def postfix_ok(netns_ok: None) -> None:
    reason = postfix_usable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def lab(netns_ok: None) -> Iterator[Lab]:
    with Lab() as lab:
        names = [ns.name for ns in lab.namespaces]
        yield lab
    assert _existing(names) == []


def test_namespaces_created_and_removed(netns_ok: None) -> None:
    with Lab() as lab:
        names = [ns.name for ns in (lab.mta, lab.gw, lab.peer)]
        assert all(name.startswith(f"sg{os.getpid()}-") for name in names)
        assert _existing(names) == names
        listed = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout
        assert all(name in listed for name in names)
        sleeper = lab.peer.popen(["sleep", "60"])
    assert sleeper.poll() is not None, "processes started in the lab are stopped with it"
    assert _existing(names) == []

    with pytest.raises(RuntimeError), Lab() as lab:
        names = [ns.name for ns in lab.namespaces]
        raise RuntimeError("test body failed")
    assert _existing(names) == []


@pytest.mark.parametrize("src", ["mta", "peer"])
def test_routing_v4_v6(lab: Lab, src: str) -> None:
    if src == "mta":
        ns, targets = (
            lab.mta,
            [
                GW_MTA_V4,
                GW_PEER_V4,
                PEER_V4,
                PEER_V4_ALT,
                GW_MTA_V6,
                GW_PEER_V6,
                PEER_V6,
                PEER_V6_ALT,
            ],
        )
        listener_ns, listen_addrs = lab.peer, [PEER_V4, PEER_V4_ALT, PEER_V6, PEER_V6_ALT]
    else:
        ns, targets = lab.peer, [GW_PEER_V4, GW_MTA_V4, MTA_V4, GW_PEER_V6, GW_MTA_V6, MTA_V6]
        listener_ns, listen_addrs = lab.mta, [MTA_V4, MTA_V6]
    for target in targets:
        ns.ping(target)
    for addr in listen_addrs:
        with listener_ns.listen(addr, 2525) as lsock, ns.connect(addr, 2525) as conn:
            peer_conn, peer_addr = lsock.accept()
            with peer_conn:
                peer_conn.sendall(b"220 hi\r\n")
                assert conn.recv(100) == b"220 hi\r\n"
                # No NAT on the path: the far side sees the real source address.
                assert peer_addr[0] == conn.getsockname()[0]


def test_inprocess_socket_lands_in_namespace(lab: Lab) -> None:
    # Bindable only where the address is configured: inside peer, not here, not in mta.
    with lab.peer.socket(socket.AF_INET) as s:
        s.bind((PEER_V4, 0))
    for sock in (socket.socket(socket.AF_INET), lab.mta.socket(socket.AF_INET)):
        with sock, pytest.raises(OSError) as exc_info:
            sock.bind((PEER_V4, 0))
        assert exc_info.value.errno == errno.EADDRNOTAVAIL
    with lab.peer.socket(socket.AF_INET6) as s6:
        s6.bind((PEER_V6_ALT, 0))

    # Sockets keep their namespace when used later from another thread's event loop.
    lsock = lab.peer.listen(PEER_V6, 0)
    port = lsock.getsockname()[1]
    csock = lab.mta.socket(socket.AF_INET6)
    for s in (lsock, csock):
        s.setblocking(False)

    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(csock, (PEER_V6, port))
        conn, _ = await loop.sock_accept(lsock)
        with conn:
            await loop.sock_sendall(conn, b"hello from peer\n")
        return await loop.sock_recv(csock, 100)

    result: list[bytes] = []

    def in_thread() -> None:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            result.append(runner.run(scenario()))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(10)
    lsock.close()
    csock.close()
    assert result == [b"hello from peer\n"]


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # the gateway's loop, when installed
    except ImportError:
        return None
    return uvloop.new_event_loop


def test_redirect_port25_to_gw_listener(lab: Lab) -> None:
    lab.redirect_port25(10025)
    for any_addr, dest in (("0.0.0.0", PEER_V4), ("::", PEER_V6_ALT)):
        with lab.gw.listen(any_addr, 10025) as lsock:
            lsock.settimeout(5)
            with lab.mta.connect(dest, 25) as conn:
                accepted, client = lsock.accept()
                with accepted:
                    assert client[0] == conn.getsockname()[0]  # MTA's own address
                    assert original_dst(accepted) == (dest, 25)
    # Other ports are routed, not redirected.
    with lab.peer.listen(PEER_V4, 587) as lsock, lab.mta.connect(PEER_V4, 587):
        lsock.settimeout(5)
        lsock.accept()[0].close()


@pytest.mark.parametrize("dest", [PEER_V4, PEER_V6])
def test_smtp_source_to_sink_across_router(
    lab: Lab, tmp_path: Path, postfix_ok: None, dest: str
) -> None:
    body = b"Subject: netlab\n\nline one\n.leading dot\n\nlast line\n"
    msg_file = tmp_path / "message.txt"
    msg_file.write_bytes(body)
    with SmtpSink(lab.peer, dest, 25, tmp_path) as sink:
        cp = smtp_source(
            lab.mta,
            dest,
            25,
            count=20,
            sessions=4,
            sender="a@example.com",
            rcpt="b@example.net",
            extra_args=["-F", str(msg_file)],
        )
        assert cp.returncode == 0, cp.stderr
        messages = sink.wait_count(20)
    assert len(messages) == 20
    # smtp-sink stores dot-unstuffed, LF-terminated content; smtp-source -F sends one
    # extra empty line before the final ".".
    assert {m.sha256 for m in messages} == {hashlib.sha256(body + b"\n").hexdigest()}
    assert {m.client_addr.removeprefix("ipv6:") for m in messages} == {
        MTA_V4 if "." in dest else MTA_V6
    }


def test_sink_counts_only_completed_transactions(
    lab: Lab, tmp_path: Path, postfix_ok: None
) -> None:
    def read_until(conn: socket.socket, code: bytes) -> None:
        data = b""
        while not data.startswith(code) and b"\r\n" + code not in data:
            chunk = conn.recv(4096)
            assert chunk, f"closed before {code!r}: {data!r}"
            data += chunk

    def transaction(final: bytes) -> socket.socket:
        conn = lab.mta.connect(PEER_V4, 25)
        conn.settimeout(5)
        # Pipelined up to DATA (RFC 2920: DATA ends a group), content after the 354.
        conn.sendall(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        read_until(conn, b"354 ")
        conn.sendall(b"Subject: t\r\n\r\n..dot\r\n" + final)
        return conn

    with SmtpSink(lab.peer, PEER_V4, 25, tmp_path) as sink:
        with transaction(b"unfinished\r\n") as open_tx:
            # The dump file exists from MAIL FROM on, but is still open.
            assert len(list(sink.dump_dir.iterdir())) == 1
            assert sink.count() == 0, "a transaction in progress is not a message"
            open_tx.sendall(b".\r\nQUIT\r\n")
            read_until(open_tx, b"221 ")
        (message,) = sink.wait_count(1)
        assert message.content == b"Subject: t\n\n.dot\nunfinished\n"
        assert message.rcpt_args == ["<b@example.net>"]
        with transaction(b"aborted\r\n"):
            pass
        # smtp-sink deletes the dump of an aborted transaction when it sees the close.
        deadline = time.monotonic() + 5
        while len(list(sink.dump_dir.iterdir())) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(list(sink.dump_dir.iterdir())) == sink.count() == 1


def test_postfix_uses_fallback_relay_when_relayhost_refuses(
    lab: Lab, tmp_path: Path, postfix_ok: None
) -> None:
    # Nothing listens on PEER_V4:25, so the relayhost answers SYN with RST.
    mta = PostfixInstance(
        lab.mta,
        tmp_path,
        null_client_settings(f"[{PEER_V4}]:25", fallback_relay=f"[{PEER_V4_ALT}]:25"),
    )
    with SmtpSink(lab.peer, PEER_V4_ALT, 25, tmp_path) as sink, mta:
        mta.sendmail("alice@example.com", "bob@example.net", b"Subject: fallback\r\n\r\nhello\r\n")
        sent = mta.wait_log(r"to=<bob@example\.net>, relay=(\S+), .*status=(\w+)")
        assert sent.groups() == (f"{PEER_V4_ALT}[{PEER_V4_ALT}]:25", "sent")
        assert f"connect to {PEER_V4}[{PEER_V4}]:25: Connection refused" in mta.log_text()
        (message,) = sink.wait_count(1)
        assert b"\nSubject: fallback\n" in message.content
        assert message.content.endswith(b"\n\nhello\n")
        mta.wait_queue_empty()


def test_two_postfix_instances_relay_over_ipv6(lab: Lab, tmp_path: Path, postfix_ok: None) -> None:
    sender = PostfixInstance(lab.mta, tmp_path, null_client_settings(f"[{PEER_V6}]:25"), name="mta")
    receiver = PostfixInstance(
        lab.peer, tmp_path, receiver_settings(f"{PEER_V4}, {PEER_V6}"), name="mx"
    )
    with receiver, sender:
        for i in range(3):
            sender.sendmail(
                "alice@example.com", f"user{i}@example.net", f"Subject: {i}\r\n\r\nhi\r\n".encode()
            )
        sender.wait_queue_empty()
        assert len(receiver.wait_maildir(3)) == 3
        assert receiver.log_text().count(f"client=unknown[{MTA_V6}]") == 3

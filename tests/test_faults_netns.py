"""No loss, no alteration: real Postfix on both ends, the gateway between them upgrading
the hop (STARTTLS, DANE-verified), and a fault at every point of a session.

    Postfix (mta) -> observer 127.0.0.1:2525 -> [REDIRECT] smtpgate (gw) -> peer tap
    203.0.113.2:25 -> Postfix (peer, 127.0.0.1:25, STARTTLS with the key in the TLSA)

The observer sees the MTA's plaintext dialogue and decides when a session has reached the
point under test; the fault is then one of

* ``gateway``: SIGKILL of the gateway process (restarted at once, as systemd would);
* ``peer``: both TCP connections of the peer tap reset (the receiving side vanishes).

Points: the greeting; after MAIL (its reply came back); mid-body; after the final dot,
before the reply reaches the gateway (the peer tap stops the gateway, then hands it the
reply, then kills it — or resets instead of passing the reply on); after the reply, before
it reaches the MTA.  Each point gets the first ``TRIALS`` sessions that reach it; Postfix
retries the deferred messages until the queue is empty.

Each message carries its body's SHA-256 in a header; at the receiving Maildir every
message is counted by Message-ID and its body hashed again.  Lost and altered must be 0;
duplicates are allowed only where the MTA cannot know whether the peer took the message
(after the dot) and are counted.

A fault-free run with a half-closing client (QUIT right behind the final dot, then the
observer shuts the sending side, as Exim does) must deliver each message exactly once:
there a duplicate is an error.

CI runs ``TRIALS`` = 2 per point and fault; ``SMTPGATE_FAULT_TRIALS=30`` (any number) for the
long run (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import functools
import hashlib
import os
import re
import secrets
import selectors
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from gatelab import certs, dnslab, netlab, postfix_instance
from gatelab.dnslab import DnsWorld
from gatelab.gatewayproc import OUTBOUND_LISTENERS, GatewayProcess, gateway_config
from gatelab.netlab import PEER_V4, Lab, Netns, reset_close
from gatelab.postfix_instance import PostfixInstance, null_client_settings, tls_receiver_settings

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

TRIALS = int(os.environ.get("SMTPGATE_FAULT_TRIALS", "2"))
POINTS = ("greeting", "after_mail", "mid_body", "after_dot", "after_reply")
# Where the MTA cannot know whether the peer took the message: a retry may duplicate it.
AFTER_DOT = ("after_dot", "after_reply")
OBSERVER_PORT = 2525
BODY_BYTES = 48_000
MID_BODY = 16_000  # the mid-body fault comes after this much content has passed


# -- the gateway, killable ----------------------------------------------------------------

class Gateway:
    def __init__(self, gp: GatewayProcess) -> None:
        self.gp = gp
        self.kills = 0
        self.lock = threading.Lock()

    def stop_now(self) -> None:
        """SIGSTOP: the process reads nothing more; what arrives waits in its sockets."""
        self.gp.signal(signal.SIGSTOP)

    def kill_and_restart(self) -> None:
        with self.lock:
            self.gp.signal(signal.SIGKILL)
            self.gp.wait_exit(10)
            self.kills += 1
            self.gp.start()  # returns once this start has logged its own "started"


# -- relaying threads -----------------------------------------------------------------------------

class Link:
    """One relayed connection: a thread that owns both sockets and alone closes them.

    (A socket closed from another thread while this one waits in recv() or select() stays
    open in the kernel until that call returns: the reset would not go out.)  Others ask
    for a reset with :meth:`request_reset`; it happens within one poll interval."""

    def __init__(self, down: socket.socket, up: socket.socket,
                 on_down: Callable[[Link, bytes], bytes | None],
                 on_up: Callable[[Link, bytes], bytes | None], name: str) -> None:
        self.down, self.up = down, up
        self.on_down, self.on_up = on_down, on_up
        self.reset_requested = threading.Event()
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def request_reset(self) -> None:
        self.reset_requested.set()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            reset_close(self.down)
            reset_close(self.up)
            self.finished.set()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        open_ = {self.down: self.up, self.up: self.down}
        for sock in open_:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        try:
            while open_:
                if self.reset_requested.is_set():
                    return
                for key, _ in sel.select(0.05):
                    src = cast(socket.socket, key.fileobj)
                    dst = open_[src]
                    try:
                        data = src.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        return  # reset: mirrored as a reset (finally)
                    if not data:
                        sel.unregister(src)
                        del open_[src]
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                        continue
                    out = (self.on_down if src is self.down else self.on_up)(self, data)
                    if out is None:
                        return  # the handler struck: reset both
                    if out:
                        try:
                            send_all(dst, out)
                        except OSError:
                            return
        finally:
            sel.close()


def send_all(sock: socket.socket, data: bytes) -> None:
    """sendall on a non-blocking socket (the peer reads promptly; bounded by 10 s)."""
    view = memoryview(data)
    deadline = time.monotonic() + 10
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError("peer does not read") from None
            selectors.DefaultSelector().select(0.01)


class Splice:
    """Accepts on ``listen`` in ``ns`` and joins each connection to a new one to ``upstream``
    by a :class:`Link` (made by :meth:`link`); a connection upstream that cannot be made
    resets the accepted one."""

    def __init__(self, ns: Netns, listen: tuple[str, int], upstream: tuple[str, int],
                 name: str, connect_timeout: float = 5.0) -> None:
        self.ns, self.upstream, self.connect_timeout = ns, upstream, connect_timeout
        self.listener = ns.listen(*listen)
        self.lock = threading.Lock()
        self.links: list[Link] = []
        self.closed = False
        threading.Thread(target=self._accept, name=f"{name} accept", daemon=True).start()

    def link(self, down: socket.socket, up: socket.socket) -> Link:
        raise NotImplementedError

    def _accept(self) -> None:
        while not self.closed:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = self.ns.connect(*self.upstream, timeout=self.connect_timeout)
            except OSError:
                reset_close(down)  # the gateway is restarting, say: the MTA defers
                continue
            with self.lock:
                self.links = [lk for lk in self.links if not lk.finished.is_set()]
                self.links.append(self.link(down, up))


# -- the peer tap: TCP between the gateway and the receiving Postfix -------------------------

class PeerTap(Splice):
    """Listens on 203.0.113.2:25 in peer and forwards to Postfix on 127.0.0.1:25, bytes
    unchanged (the hop is TLS: it sees nothing but records).  It can reset its connections
    now, or act on the next bytes the receiver sends (the reply to the final dot)."""

    def __init__(self, ns: Netns) -> None:
        # Called with (link, data) on the receiver's next bytes; returns the bytes to pass
        # on, or None to reset.
        self.on_next_reply: Callable[[Link, bytes], bytes | None] | None = None
        super().__init__(ns, (PEER_V4, 25), ("127.0.0.1", 25), "peer tap")

    def link(self, down: socket.socket, up: socket.socket) -> Link:
        return Link(down, up, lambda _lk, data: data, self._from_receiver, "peer tap")

    def _from_receiver(self, link: Link, data: bytes) -> bytes | None:
        with self.lock:
            act, self.on_next_reply = self.on_next_reply, None
        return data if act is None else act(link, data)

    def reset_all(self) -> None:
        with self.lock:
            links = list(self.links)
        for link in links:
            link.request_reset()
        for link in links:
            link.finished.wait(5)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.reset_all()


# -- the observer on the MTA's side ------------------------------------------------------------

@dataclass
class Fault:
    point: str
    target: str  # "gateway" or "peer"
    left: int
    done: int = 0  # sessions that reached the point (after the dot: the tap armed)
    struck: int = 0  # faults that really happened
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, point: str) -> bool:
        with self.lock:
            if point != self.point or self.left == 0:
                return False
            self.left -= 1
            self.done += 1
            return True


@dataclass
class Dialogue:
    """What the observer knows of one MTA session."""

    greeted: bool = False
    commands: bytes = b""
    mail_sent: bool = False
    mail_replied: bool = False
    in_data: bool = False
    body: int = 0
    tail: bytes = b"\r\n"
    dot_sent: bool = False
    dot_replied: bool = False
    faulted: bool = False
    half_closed: bool = False  # the observer sent QUIT behind the dot and shut its side


class Observer(Splice):
    """127.0.0.1:2525 in mta (Postfix's relayhost) → 203.0.113.2:25 through gw."""

    def __init__(self, ns: Netns, gateway: Gateway, tap: PeerTap) -> None:
        self.gateway, self.tap = gateway, tap
        self.fault: Fault | None = None
        self.half_close = False  # act as a client that half-closes after ".", QUIT
        self.quit_answered = 0  # the 221s that reached a half-closed session
        super().__init__(ns, ("127.0.0.1", OBSERVER_PORT), (PEER_V4, 25), "observer",
                         connect_timeout=10)

    def link(self, down: socket.socket, up: socket.socket) -> Link:
        d = Dialogue()
        return Link(down, up, functools.partial(self._from_mta, dialogue=d),
                    functools.partial(self._to_mta, dialogue=d), "observer")

    def _strike(self, point: str, d: Dialogue) -> bool:
        """True when the fault hit here (the link then resets both sides)."""
        fault = self.fault
        if d.faulted or fault is None or not fault.take(point):
            return False
        d.faulted = True
        if point == "after_dot":
            # The dot is on its way; the fault hits at the peer tap when the receiver's
            # reply comes back: it never reaches the gateway (or the gateway never reads it).
            if fault.target == "gateway":
                def kill(link: Link, data: bytes) -> bytes | None:
                    self.gateway.stop_now()
                    with contextlib.suppress(OSError):
                        send_all(link.down, data)  # waits unread in the stopped gateway
                    self.gateway.kill_and_restart()
                    fault.struck += 1
                    return None
                self.tap.on_next_reply = kill
            else:
                def drop(link: Link, data: bytes) -> bytes | None:
                    fault.struck += 1
                    return None  # reset instead of passing the reply on
                self.tap.on_next_reply = drop
            return False  # the observer itself goes on relaying
        fault.struck += 1
        if fault.target == "gateway":
            self.gateway.kill_and_restart()
        else:
            self.tap.reset_all()
        return True

    def _from_mta(self, link: Link, data: bytes, dialogue: Dialogue) -> bytes | None:
        d = dialogue
        if d.half_closed:
            return b""  # Postfix's own QUIT: the 221 to ours is already on its way
        if d.in_data:
            if d.body < MID_BODY <= d.body + len(data) and self.fault is not None \
                    and self.fault.point == "mid_body" and self.fault.left > 0:
                # Exactly MID_BODY bytes of content pass, then the fault.
                cut = MID_BODY - d.body
                send_all(link.up, data[:cut])
                if self._strike("mid_body", d):
                    return None
                data = data[cut:]
                d.body = MID_BODY
            d.body += len(data)
            joined = d.tail + data
            if b"\r\n.\r\n" in joined:
                d.in_data, d.dot_sent = False, True
                self._strike("after_dot", d)  # arms the peer tap before the dot leaves
                if self.half_close:
                    # Postfix pipelines QUIT behind the dot itself; a second one would be
                    # data the server never reads, and its close would become a reset.
                    quit_ = b"" if joined.endswith(b"\r\n.\r\nQUIT\r\n") else b"QUIT\r\n"
                    send_all(link.up, data + quit_)
                    link.up.shutdown(socket.SHUT_WR)
                    d.half_closed = True
                    return b""
            d.tail = joined[-4:]
            return data
        d.commands += data
        if re.search(rb"(?im)^MAIL FROM:", d.commands):
            d.mail_sent = True
        return data

    def _to_mta(self, link: Link, data: bytes, dialogue: Dialogue) -> bytes | None:
        d = dialogue
        point = None
        if not d.greeted:
            d.greeted, point = True, "greeting"
        elif d.mail_sent and not d.mail_replied:
            d.mail_replied, point = True, "after_mail"
        elif d.dot_sent and not d.dot_replied:
            d.dot_replied, point = True, "after_reply"
        if point is not None and self._strike(point, d):
            return None
        if d.half_closed and re.search(rb"(?:^|\r\n)221[ -]", data):
            self.quit_answered += 1  # Postfix takes it as the reply to its own QUIT
        if not d.in_data and not d.dot_sent and re.search(rb"(?:^|\r\n)354[ -]", data):
            d.in_data = True  # before the MTA can see the 354 and send content
        return data

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for link in list(self.links):
            link.request_reset()


# -- messages -----------------------------------------------------------------------------------

def message(ident: str) -> bytes:
    lines = [secrets.token_urlsafe(57) for _ in range(BODY_BYTES // 77)]
    body = ("\n".join(lines) + "\n").encode()
    digest = hashlib.sha256(body).hexdigest()
    return (f"From: a@a.test\nTo: u@b.test\nSubject: fault {ident}\n"
            f"Message-ID: <{ident}@faults.test>\nX-Body-SHA256: {digest}\n\n").encode() + body


def received(paths: list[Path]) -> tuple[Counter[str], list[str]]:
    """Copies per Message-ID, and the IDs whose body no longer has its hash."""
    copies: Counter[str] = Counter()
    altered = []
    for path in paths:
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
        ident = (msg["Message-ID"] or "").strip("<>").split("@")[0]
        raw = path.read_bytes()
        body = raw.split(b"\n\n", 1)[1].replace(b"\r\n", b"\n")
        copies[ident] += 1
        if hashlib.sha256(body).hexdigest() != (msg["X-Body-SHA256"] or "").strip():
            altered.append(ident)
    return copies, altered


# -- the lab --------------------------------------------------------------------------------------

@dataclass
class World:
    lab: Lab
    gateway: Gateway
    tap: PeerTap
    observer: Observer
    mta: PostfixInstance
    receiver: PostfixInstance


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("faults")
    leaf = certs.make_leaf(None, ["mx.b.test"])
    chain = certs.write_chain_file(work / "mx-chain.pem", leaf)
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab())
        lab.redirect_port25(10025)
        dns = stack.enter_context(DnsWorld.on_lab(lab, work / "dns"))
        dnslab.dane_destination(dns, leaf.der)
        dns.start()
        receiver = stack.enter_context(PostfixInstance(
            lab.peer, work, tls_receiver_settings("127.0.0.1", chain, domain="b.test",
                                                  myhostname="mx.b.test"), name="receiver"))
        gp = GatewayProcess(lab.gw, work / "gw", gateway_config(
            listeners=OUTBOUND_LISTENERS[:1], connect=5, drain=1, log_level="info",
            resolvers=["127.0.0.1:53"], dns_timeout=1, budget=3, policy="dane"))
        gp.start()
        stack.callback(gp.stop)
        gateway = Gateway(gp)
        tap = PeerTap(lab.peer)
        stack.callback(tap.close)
        observer = Observer(lab.mta, gateway, tap)
        stack.callback(observer.close)
        settings = null_client_settings(f"[127.0.0.1]:{OBSERVER_PORT}")
        settings.update({
            # One message per session, one session at a time: each fault hits one message
            # at one known point.
            "smtp_connection_cache_on_demand": "no",
            "smtp_destination_concurrency_limit": "1",
            # Faults are the test, not a reason to suspend the destination.
            "default_destination_concurrency_failed_cohort_limit": "1000",
            "smtp_destination_concurrency_failed_cohort_limit": "1000",
        })
        mta = stack.enter_context(PostfixInstance(lab.mta, work, settings, name="mta"))
        yield World(lab, gateway, tap, observer, mta, receiver)


def run_point(w: World, point: str, target: str, n: int) -> dict[str, int]:
    """n messages, the first n sessions reaching ``point`` get the fault; waits until
    every message has left the MTA's queue."""
    fault = Fault(point, target, n if point in POINTS else 0)
    w.observer.fault = fault
    idents = [f"{point.replace(' ', '_')}-{target}-{i}-{secrets.token_hex(4)}"
              for i in range(n)]
    for ident in idents:
        w.mta.sendmail("a@a.test", "u@b.test", message(ident))
    deadline = time.monotonic() + 60 + 15 * n
    flushed = 0.0
    while not (fault.left == 0 and w.mta.queue_empty()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{point}/{target}: {fault.done} of {n} faults, queue "
                               f"{w.mta.queue()}\n{w.mta.log_tail()}")
        if fault.left == 0 and time.monotonic() - flushed > 2:
            w.mta.flush()  # the faults are spent: retry the deferred now
            flushed = time.monotonic()
        time.sleep(0.1)
    w.observer.fault = None
    # An armed tap that never struck would hit a later session instead.
    assert w.tap.on_next_reply is None, f"{point}/{target}: the tap is still armed"
    # The receiver took the last message with its 250 and files it a moment later: a
    # slow machine counted a message still in its queue as lost.
    w.receiver.wait_queue_empty(timeout=30)
    copies, altered = received(w.receiver.maildir_messages())
    mine = {i: copies[i] for i in idents}
    return {"messages": n, "faults": fault.struck,
            "lost": sum(1 for c in mine.values() if c == 0),
            "altered": sum(1 for i in altered if i in mine),
            "duplicates": sum(c - 1 for c in mine.values() if c > 1)}


@pytest.mark.parametrize("target", ["gateway", "peer"])
def test_faults_at_every_point_lose_and_alter_nothing(world: World, target: str) -> None:
    kills = world.gateway.kills
    rows = {point: run_point(world, point, target, TRIALS) for point in POINTS}
    print(f"\nfaults ({target}): {TRIALS} per point; gateway kills so far "
          f"{world.gateway.kills}")
    for point, r in rows.items():
        print(f"  {point:12} {r}")
    summary = {p: (r["lost"], r["altered"], r["duplicates"]) for p, r in rows.items()}
    assert all(r["faults"] == TRIALS for r in rows.values()), rows
    # Every gateway fault was a real kill (and a peer fault never one).
    expected_kills = len(POINTS) * TRIALS if target == "gateway" else 0
    assert world.gateway.kills - kills == expected_kills, (world.gateway.kills, kills)
    assert all(r["lost"] == 0 and r["altered"] == 0 for r in rows.values()), summary
    # A duplicate is only possible when the dot may have been taken.
    assert all(r["duplicates"] == 0 for p, r in rows.items() if p not in AFTER_DOT), summary
    # The hop was the upgraded one: every session the gateway completed was DANE-verified.
    done = [x for x in world.gateway.gp.sessions() if x["outcome"] == "relayed"]
    assert done and {x.get("tls") for x in done} == {"dane"}, done[-3:]
    # And the gateway is serving after all this: a message without a fault goes through.
    clean = run_point(world, "no fault", target, 1)
    assert (clean["faults"], clean["lost"], clean["altered"], clean["duplicates"]) \
        == (0, 0, 0, 0), clean


def test_a_half_closing_client_gets_one_copy_of_each_message(world: World) -> None:
    """No fault, every session half-closed right after ".", QUIT: the 250 and the 221 must
    reach the client (else it retries a delivered message), so a duplicate is an error."""
    n = max(TRIALS, 3)
    start = world.mta.log_path.stat().st_size
    world.observer.half_close = True
    try:
        r = run_point(world, "half-close", "none", n)
    finally:
        world.observer.half_close = False
    assert (r["lost"], r["altered"], r["duplicates"]) == (0, 0, 0), r
    assert world.observer.quit_answered >= n
    log = world.mta.log_path.read_bytes()[start:].decode(errors="replace")
    assert log.count("status=sent") >= n and "status=deferred" not in log, log[-2000:]

"""Operations, issue #10 item 6: reloads under load, and SIGTERM with sessions in DATA,
against the real ``smtpgate run`` in a lab.

- ``test_reloads_under_load_fail_no_session``: DANE-upgraded sessions (real NSD + Unbound,
  an in-process TLS peer whose key the TLSA names, an in-process MTA client; some sessions
  wait in DATA for up to 0.3 s so that reloads land in every phase) run without pause while
  the gateway gets SIGHUP 1,000 times (500 by default), the config file alternating between
  two versions that differ in the listener's name, the buffer size and the DNS timeout (a
  new resolver at every reload) and that name the inbound key (read again every time).  Each SIGHUP
  waits for its ``reloaded`` line, then 10 ms.  Every message must be accepted by the peer
  over DANE-verified TLS and every session line must say ``relayed``.
- ``test_sigterm_with_sessions_in_data_loses_nothing``: real Postfix (mta) → gateway
  (passthrough, ``policy: none``) → real Postfix (peer) that answers the final dot only
  after 3 s (``smtpd_end_of_data_restrictions = sleep 3``).  Ten sessions wait for that
  answer when the gateway gets SIGTERM, and two more messages are submitted during the
  drain.  With a drain longer than the wait the sessions finish in it; with a shorter one
  they are cut off (a reset to Postfix, which keeps the message) and sent again after the
  gateway restarts.  Nothing is lost; duplicates are counted apart (see the test).

``SMTPGATE_TRIALS`` sets the number of reloads (default 500, about 25 s here; ``full``:
1,000, 35 to 50 s)::

    SMTPGATE_TRIALS=full .venv/bin/pytest -q -s -p no:cacheprovider \\
        tests/test_operations_netns.py
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from gatelab import certs, dnslab, netlab, postfix_instance
from gatelab.adversary import (
    HOST,
    AdversarialPeer,
    Channel,
    DnsMode,
    PeerAttack,
    Trial,
    mta_session,
    trials,
)
from gatelab.dnslab import DnsWorld
from gatelab.gatewayproc import (
    OUTBOUND_LISTENERS,
    GatewayProcess,
    LogFollower,
    gateway_config,
)
from gatelab.netlab import PEER_V4, Lab
from gatelab.postfix_instance import PostfixInstance, null_client_settings, receiver_settings

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

RELOADS = trials(500, 1000)
CONCURRENCY = 8


# -- reloads under load ----------------------------------------------------------------------

def reload_config(variant: int, key: Path, cert: Path) -> str:
    name, buffer, timeout = (("outbound-a", 262144, 1.0), ("outbound-b", 131072, 1.5))[variant]
    return gateway_config(listeners=[f"{{name: {name}, address: 0.0.0.0, port: 10025}}"],
                          max_sessions=200, buffer_bytes=buffer, connect=10, log_level="info",
                          resolvers=["127.0.0.1:53"], dns_timeout=timeout, budget=4,
                          tls=(key, cert), policy="dane")


def write_atomically(path: Path, text: str) -> None:
    """The gateway must never read a half-written file (that reload would be rejected)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@dataclass
class LoadResult:
    trials: list[Trial]
    spans: list[tuple[float, float]]  # (start, end) of each trial, monotonic


def load(peer: AdversarialPeer, listen: Any, stop: threading.Event, max_sessions: int,
         max_seconds: float) -> LoadResult:
    """Runs on a thread in the mta namespace: CONCURRENCY clients, one message per session,
    until ``stop`` (or the bounds)."""
    rng = random.Random(7)
    done: list[Trial] = []
    spans: list[tuple[float, float]] = []

    async def main() -> None:
        server = await asyncio.start_server(peer.serve, sock=listen,  # noqa: TID251
                                            limit=1 << 20)
        deadline = time.monotonic() + max_seconds
        counter = iter(range(max_sessions))

        async def client() -> None:
            while not stop.is_set() and time.monotonic() < deadline:
                sid = next(counter, None)
                if sid is None:
                    return
                pause = rng.choice((0.0, 0.0, 0.0, rng.uniform(0.0, 0.3)))
                trial = Trial(sid, DnsMode.HONEST, PeerAttack.HONEST, rng.random() < 0.5,
                              pause)
                started = time.monotonic()
                await mta_session(trial)
                spans.append((started, time.monotonic()))
                done.append(trial)

        try:
            await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        finally:
            server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    return LoadResult(done, spans)


@pytest.fixture
def dane_lab(tmp_path: Path) -> Iterator[tuple[Lab, AdversarialPeer, Any]]:
    leaf = certs.make_leaf(None, [HOST])
    other = certs.make_leaf(None, [HOST])
    peer = AdversarialPeer(certs.server_context(tmp_path / "good", leaf),
                           certs.server_context(tmp_path / "unused", other))
    with Lab() as lab, DnsWorld.on_lab(lab, tmp_path / "dns") as world:
        dnslab.dane_destination(world, leaf.der)
        world.start()
        lab.redirect_port25(10025)
        listen = lab.peer.listen(PEER_V4, 25, backlog=512)
        try:
            yield lab, peer, listen
        finally:
            listen.close()


@pytest.mark.timeout(300 + RELOADS // 5)
def test_reloads_under_load_fail_no_session(
        dane_lab: tuple[Lab, AdversarialPeer, Any], tmp_path: Path) -> None:
    lab, peer, listen = dane_lab
    site = certs.write_pki(tmp_path / "site", certs.make_leaf(None, ["mx.a.test"]))
    configs = [reload_config(v, site["key"], site["cert"]) for v in (0, 1)]
    stop = threading.Event()
    result: list[LoadResult] = []
    errors: list[BaseException] = []

    def run_load() -> None:
        try:
            result.append(lab.mta.call(lambda: load(peer, listen, stop, 200_000,
                                                    60 + RELOADS * 0.2)))
        except BaseException as exc:
            errors.append(exc)

    with GatewayProcess(lab.gw, tmp_path / "gw", configs[0]) as gw:
        follower = LogFollower(gw)
        follower.new()
        loader = threading.Thread(target=run_load, name="load", daemon=True)
        loader.start()
        try:
            time.sleep(1.0)  # the load is flowing (and DNS warm) before the first SIGHUP
            reload_times: list[float] = []
            outcomes: Counter[str] = Counter()
            started = time.monotonic()
            deadline = started + 30 + RELOADS * 0.2
            for i in range(RELOADS):
                write_atomically(gw.config_path, configs[(i + 1) % 2])
                sent = time.monotonic()
                gw.signal(signal.SIGHUP)
                while True:
                    events = [e["event"] for e in follower.new()]
                    answered = [e for e in events if e.startswith("reload")]
                    if answered:
                        outcomes.update(answered)
                        break
                    assert time.monotonic() < deadline, f"{i} reloads, then none: {outcomes}"
                    time.sleep(0.001)
                reload_times.append(sent)
                time.sleep(0.01)
            reload_seconds = time.monotonic() - started
            time.sleep(0.5)  # sessions started after the last reload too
        finally:
            stop.set()
            loader.join(120)
        assert not errors, errors
        [res] = result
        n = len(res.trials)
        lines = gw.wait_sessions(n, timeout=60)
        ok_metric = gw.metric("smtpgate_config_reloads_total", result="ok")
        rejected_metric = gw.metric("smtpgate_config_reloads_total", result="rejected")

    delivered = Counter(t.outcome for t in res.trials)
    gateway = Counter((s["outcome"], s.get("tls", "-")) for s in lines)
    listeners = Counter(s["listener"] for s in lines)
    across = _spanning(res.spans, reload_times)
    accepted = peer.record.counts["accepted", Channel.MATCHING]
    report = (
        f"reloads: {len(reload_times)} SIGHUPs in {reload_seconds:.1f} s "
        f"({len(reload_times) / reload_seconds:.0f}/s), answered {dict(outcomes)}, metric "
        f"ok={ok_metric:.0f} rejected={rejected_metric:.0f}\n"
        f"load: {n} DANE-upgraded sessions by {CONCURRENCY} clients, {across} of them "
        f"spanning at least one reload; MTA outcomes {dict(delivered)}; peer accepted "
        f"{accepted} over TLS with the TLSA's key, "
        f"{sum(peer.record.counts[k] for k in peer.record.counts if k[1] != Channel.MATCHING)}"
        f" events otherwise; gateway session lines {dict(gateway)}; by listener name "
        f"{dict(listeners)}")
    print("\n" + report)
    assert outcomes == Counter({"reloaded": RELOADS}), report
    assert ok_metric == RELOADS and rejected_metric == 0, report
    assert n >= 100 and delivered == Counter({"delivered": n}), report
    assert accepted == n and not peer.errors, report
    assert gateway == Counter({("relayed", "dane"): n}), report
    assert across > 0 and len(listeners) == 2, report


def _spanning(spans: list[tuple[float, float]], reloads: list[float]) -> int:
    """Sessions during which at least one SIGHUP was sent."""
    reloads = sorted(reloads)
    count = 0
    for start, end in spans:
        lo, hi = 0, len(reloads)
        while lo < hi:  # first reload after start
            mid = (lo + hi) // 2
            if reloads[mid] <= start:
                lo = mid + 1
            else:
                hi = mid
        count += lo < len(reloads) and reloads[lo] < end
    return count


# -- SIGTERM with sessions in DATA -----------------------------------------------------------

DOT_DELAY = 3  # the peer answers the final dot this many seconds after it arrives
MESSAGES = 10
LATE = 2  # submitted after the SIGTERM


@dataclass
class MailLab:
    lab: Lab
    mta: PostfixInstance
    peer: PostfixInstance
    workdir: Path


@pytest.fixture(scope="module")
def mail_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailLab]:
    work = tmp_path_factory.mktemp("sigterm")
    settings = null_client_settings(f"[{PEER_V4}]:25")
    settings.update({
        # Several sessions at once, and one message per session: a session reused for the
        # next message would still be running when a long drain ends.
        "initial_destination_concurrency": str(MESSAGES),
        "default_destination_concurrency_limit": str(MESSAGES),
        "smtp_connection_cache_on_demand": "no",
    })
    # The peer has the whole message, then takes DOT_DELAY seconds before it commits it and
    # answers the final dot (smtp-sink's -W cannot: a QUIT pipelined behind the dot, as
    # Postfix sends it, makes it skip the delayed answer).
    receiver = {**receiver_settings(PEER_V4),
                "smtpd_end_of_data_restrictions": f"sleep {DOT_DELAY}"}
    with Lab() as lab:
        lab.redirect_port25(10025)
        with PostfixInstance(lab.peer, work, receiver, name="peer") as peer, \
                PostfixInstance(lab.mta, work, settings, name="mta") as mta:
            yield MailLab(lab, mta, peer, work)


def sigterm_config(drain: float) -> str:
    """Passthrough (policy none): no lookups."""
    return gateway_config(listeners=OUTBOUND_LISTENERS[:1], max_sessions=100, connect=5,
                          drain=drain, log_level="info")


def body_hash(content: bytes) -> str:
    """SHA-256 of the body as the peer's Maildir holds it (LF line ends; the headers, which
    each MTA extends, left out)."""
    return hashlib.sha256(content.split(b"\n\n", 1)[-1]).hexdigest()


def message_id(content: bytes) -> str:
    m = re.search(rb"^Message-ID: *(<[^>]+>)", content, re.MULTILINE | re.IGNORECASE)
    return m[1].decode() if m else ""


@pytest.mark.parametrize("drain", [DOT_DELAY + 5, 1], ids=["drain-longer", "drain-shorter"])
def test_sigterm_with_sessions_in_data_loses_nothing(mail_lab: MailLab, drain: float) -> None:
    """Messages are counted at the receiver by Message-ID and body hash.  A duplicate can
    occur only where the peer had the whole message (the final dot) and the gateway cut the
    session before the peer's reply reached the MTA: the MTA cannot know that the peer has
    it, keeps it and sends it again (RFC 5321 6.1; invariant A1 prefers a duplicate to a
    loss).  That is the case of a drain shorter than the peer's answer: each session cut
    after its dot is one duplicate, and Postfix says so ("message may be sent more than
    once")."""
    m = mail_lab
    case = f"{drain}-{uuid.uuid4().hex[:8]}"
    work = m.workdir / f"gw-{case}"
    before = {p.name for p in m.peer.maildir_messages()}
    log_mark, peer_mark = m.mta.log_mark(), m.peer.log_mark()
    sent: dict[str, str] = {}  # Message-ID -> sha256 of the body

    def submit(i: int) -> None:
        mid = f"<{case}.{i}@mta.example.com>"
        body = f"message {i} of {case}\r\n{os.urandom(16).hex()}\r\n"
        m.mta.sendmail("alice@example.com", f"u{i}@example.net",
                       f"Message-ID: {mid}\r\nSubject: sigterm {i}\r\n\r\n{body}".encode())
        sent[mid] = hashlib.sha256(body.replace("\r\n", "\n").encode()).hexdigest()

    with GatewayProcess(m.lab.gw, work, sigterm_config(drain)) as gw:
        t0 = time.monotonic()
        for i in range(MESSAGES):
            submit(i)
        # Wait until several sessions have sent their message, dot included, and wait for
        # the answer: the peer logs "client=" at MAIL, the message follows within
        # milliseconds (PIPELINING), and the peer logs its message-id when it commits it,
        # 3 s after the dot.
        deadline = time.monotonic() + 20
        while _since(m.peer, peer_mark).count(" client=") < MESSAGES // 2:
            assert time.monotonic() < deadline, m.mta.log_tail()
            time.sleep(0.02)
        time.sleep(0.5)
        peer_log = _since(m.peer, peer_mark)
        in_data = peer_log.count(" client=") - peer_log.count(f"message-id=<{case}.")
        gw.signal(signal.SIGTERM)
        terminated = time.monotonic()
        gw.wait_event("draining")
        for i in range(MESSAGES, MESSAGES + LATE):
            submit(i)  # while the gateway drains: the listener is closed, the MTA keeps it
        rc = gw.wait_exit(timeout=drain + 15)
        exit_seconds = time.monotonic() - terminated
        stopped = gw.events("stopped")[0]
        draining = gw.events("draining")[0]
        first = gw.sessions()
    assert rc == 0
    # Restarted (its own log): what the MTA kept is sent again.
    with GatewayProcess(m.lab.gw, work / "restarted", sigterm_config(drain)) as gw2:
        m.mta.flush()
        m.mta.wait_queue_empty(timeout=60)
        total_seconds = time.monotonic() - t0
        second = gw2.wait_sessions(LATE)

    m.peer.wait_queue_empty(timeout=30)
    received = [p.read_bytes() for p in m.peer.maildir_messages() if p.name not in before]
    copies = Counter((message_id(msg), body_hash(msg)) for msg in received)
    ids = Counter(message_id(msg) for msg in received)
    lost = sorted(set(sent) - set(ids))
    duplicates = sum(n - 1 for n in ids.values())
    log = _since(m.mta, log_mark)
    # Messages whose session Postfix lost after sending the dot, knowing they might arrive
    # twice (its queue manager repeats the words for messages it then holds back without
    # trying: "delivery temporarily suspended: ..."; those are not counted).
    warned = len(set(re.findall(r"postfix/smtp\[\d+\]: ([0-9A-F]+): .*while sending end of "
                                r"data -- message may be sent more than once", log)))
    outcomes = Counter(s["outcome"] for s in first)
    report = (
        f"sigterm ({'drain longer than' if drain > DOT_DELAY else 'drain shorter than'} the "
        f"peer's {DOT_DELAY} s answer to the dot, drain {drain} s): {MESSAGES} messages, "
        f"{LATE} more submitted during the drain, "
        f"{draining['sessions']} sessions running at SIGTERM, {in_data} of them with their "
        f"dot at the peer; gateway exited in {exit_seconds:.1f} s, aborted "
        f"{stopped['aborted']}; first gateway's sessions {dict(outcomes)}; after the "
        f"restart {len(second)} more sessions; at the receiver {len(received)} copies of "
        f"{len(ids)} messages: lost {len(lost)}, duplicates {duplicates} (Postfix warned "
        f"'may be sent more than once' {warned} times); all delivered {total_seconds:.1f} s "
        f"after the first submission")
    print("\n" + report)
    assert not lost, (lost, report)
    assert set(ids) == set(sent), report
    for (mid, digest), _ in copies.items():
        assert sent[mid] == digest, (mid, report)  # every copy is the message, unchanged
    assert in_data >= 2 and draining["sessions"] >= in_data, report
    if drain > DOT_DELAY:
        assert stopped["aborted"] == 0 and duplicates == 0, report
        assert outcomes == Counter({"relayed": len(first)}), report
    else:
        assert stopped["aborted"] >= in_data, report
        # Every duplicate is a session cut after its dot, and Postfix knew it might be.
        assert duplicates <= stopped["aborted"] and duplicates <= warned, report


def _since(mta: PostfixInstance, mark: int) -> str:
    if not mta.log_path.exists():
        return ""
    with mta.log_path.open("rb") as f:
        f.seek(mark)
        return f.read().decode(errors="replace")

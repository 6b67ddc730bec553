"""The outbound upgrade end to end, in gatelab/upgradelab.py's lab: a legacy Postfix (no TLS
at all) sends through the gateway to real Postfix smtpd peers, with DNSSEC from NSD +
Unbound deciding the plan.

    mta: Postfix, smtp_tls_security_level=none; transport by recipient
    gw:  smtpgate (REDIRECT), Unbound on 127.0.0.1
    peer: Postfix smtpd with TLS on .2 (TLSA matches), .3 (no TLSA), .4 (TLSA wrong);
          Postfix smtpd without TLS on .5 (TLSA published: it asked for DANE), .7 and .8
          (policy none: a static passthrough)

A capture on gw's peer-side interface is the witness that no message crossed in clear.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from gatelab import dnslab, exim_client, netlab, postfix_instance
from gatelab.capture import Capture
from gatelab.postfix_instance import PostfixInstance
from gatelab.upgradelab import World, send, session_for, upgrade_lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with upgrade_lab(tmp_path_factory.mktemp("upgrade")) as w:
        yield w


def delivered(peer: PostfixInstance, marker: bytes, timeout: float = 20) -> bytes:
    return peer.wait_delivered(marker, timeout)


def test_dane_verified_delivery_never_in_clear(world: World) -> None:
    with Capture(world.lab.gw, netlab.GW_PEER_IF, world.workdir / "dane.pcap") as cap:
        marker = send(world, "dane")
        message = delivered(world.tls_peer, marker)
        s = session_for(world, "203.0.113.2:25")
    assert cap.packets() > 10 and not cap.contains(marker)
    assert (s["plan"], s["auth"], s["tls"], s["verify"]) == (
        "require-tls", "dane", "dane", "dane-ee match")
    assert s["tls_version"] in ("TLSv1.2", "TLSv1.3") and s["peer_name"] == "mx.b.test"
    assert s["outcome"] == "relayed"
    # The peer's own record: the hop arrived over TLS, from the gateway.
    assert b"(using TLSv1." in message
    assert world.gw.metric("smtpgate_upgrades_total", result="dane", reason="none") >= 1


def test_opportunistic_tls_without_tlsa(world: World) -> None:
    with Capture(world.lab.gw, netlab.GW_PEER_IF, world.workdir / "may.pcap") as cap:
        marker = send(world, "nodane")
        delivered(world.tls_peer, marker)
        s = session_for(world, "203.0.113.3:25")
    assert not cap.contains(marker)
    assert (s["plan"], s["auth"], s["tls"], s["verify"]) == (
        "try-tls", "none", "tls", "unauthenticated")


def deferred_with(w: World, user: str, pattern: str) -> None:
    w.mta.wait_log(rf"to=<{user}@example\.net>.*status=deferred \(host "
                   rf"203\.0\.113\.\d\[203\.0\.113\.\d\] said: {pattern}", timeout=20)


def test_wrong_key_defers_and_nothing_crosses(world: World) -> None:
    with Capture(world.lab.gw, netlab.GW_PEER_IF, world.workdir / "wrong.pcap") as cap:
        marker = send(world, "wrong")
        deferred_with(world, "wrong", r"421 4\.7\.5 smtpgate: TLS to peer failed: no matching "
                                      r"record")
    assert cap.packets() > 0 and not cap.contains(marker)
    assert any(e["recipients"][0]["address"] == "wrong@example.net" for e in world.mta.queue())
    s = session_for(world, "203.0.113.4:25")
    assert (s["outcome"], s["tls"], s["verify"]) == ("deferred", "deferred",
                                                     "no matching record")
    assert world.gw.metric("smtpgate_upgrades_total", result="deferred", reason="verify") >= 1


def test_peer_without_starttls_but_with_tlsa_defers(world: World) -> None:
    with Capture(world.lab.gw, netlab.GW_PEER_IF, world.workdir / "notls.pcap") as cap:
        marker = send(world, "notls")
        deferred_with(world, "notls", r"421 4\.7\.4 smtpgate: TLS required but peer does not "
                                      r"offer STARTTLS")
    assert not cap.contains(marker)
    assert not any(marker in p.read_bytes() for p in world.plain_peer.maildir_messages())
    s = session_for(world, "203.0.113.5:25")
    assert (s["outcome"], s["tls"]) == ("deferred", "deferred")
    assert world.gw.metric("smtpgate_upgrades_total", result="deferred",
                           reason="not_offered") >= 1


def test_helo_only_client_is_upgraded_too(world: World) -> None:
    """qmail's client, or Postfix with smtp_never_send_ehlo: the gateway learns the
    peer's capabilities itself and upgrades all the same."""
    before = len([s for s in world.gw.sessions() if s["destination"] == "203.0.113.2:25"
                  and s.get("tls")])
    with Capture(world.lab.gw, netlab.GW_PEER_IF, world.workdir / "helo.pcap") as cap:
        marker = send(world, "helo")
        message = delivered(world.tls_peer, marker)
        s = session_for(world, "203.0.113.2:25", before + 1)
    assert not cap.contains(marker)
    assert s["tls"] == "dane"
    assert s["verify"] in ("dane-ee match", "resumed verified session")
    received = message.split(b"\n\n", 1)[0].replace(b"\n\t", b" ").decode()
    assert "(using TLSv1." in received and "from mta.example.com" in received


def test_tls_session_is_resumed_while_the_tlsa_set_is_unchanged(world: World) -> None:
    """The peer gives session tickets; the second connection to the same peer under the
    same TLSA set resumes (no full handshake, no second verification)."""
    seen = len([s for s in world.gw.sessions() if s["destination"] == "203.0.113.2:25"
                and s.get("tls")])
    for i in range(2):
        delivered(world.tls_peer, send(world, "dane"))
        s = session_for(world, "203.0.113.2:25", seen + i + 1)
        assert s["tls"] == "dane"
    assert s["tls_resumed"] == "yes" and s["verify"] == "resumed verified session"


def test_opportunistic_handshake_failure_falls_back_to_plaintext(world: World) -> None:
    """As Postfix's `may` level does: a peer whose TLS cannot be negotiated still gets the
    mail, in plaintext, over a new connection (no TLSA: the peer asked for nothing)."""
    marker = send(world, "old")
    delivered(world.old_peer, marker)
    s = session_for(world, "203.0.113.6:25")
    assert (s["plan"], s["tls"], s["outcome"]) == ("try-tls", "plaintext", "relayed")
    assert str(s["tls_reason"]).startswith("TLS failed: handshake: ")
    assert world.gw.metric("smtpgate_upgrades_total", result="plaintext",
                           reason="handshake") >= 1


def test_recipient_bound_dane_defers_only_the_recipient_that_asks(world: World) -> None:
    """One message to two recipients over one unauthenticated TLS session to .3: the
    recipient whose domain's MX for .3 publishes a TLSA the peer's key does not match gets
    450 4.7.5 from the gateway and stays queued; the other is delivered."""
    marker = f"MARKER-{uuid.uuid4().hex}".encode()
    world.mta.sendmail("alice@example.com", ["u1@wrongmx.test", "u2@example.net"],
                       b"Subject: two\r\n\r\n" + marker + b"\r\n")
    message = delivered(world.tls_peer, marker)
    assert b"X-Original-To: u2@example.net" in message
    world.mta.wait_log(r"to=<u1@wrongmx\.test>.*status=deferred \(host 203\.0\.113\.3"
                       r"\[203\.0\.113\.3\] said: 450 4\.7\.5 smtpgate: peer key does not "
                       r"match the TLSA of mx\.wrongkey\.test", timeout=20)
    assert world.gw.metric("smtpgate_recipients_total", result="deferred",
                           reason="key_mismatch") >= 1
    deadline = time.monotonic() + 10
    while not (noted := [x for x in world.gw.sessions() if "wrongmx.test" in
                         str(x.get("deferred_recipients", ""))]):
        assert time.monotonic() < deadline, world.gw.log_text()[-2000:]
        time.sleep(0.1)
    s = noted[-1]
    assert s["destination"] == "203.0.113.3:25" and s["tls"] == "tls"
    assert "wrongmx.test: peer key does not match" in str(s["deferred_recipients"])


def test_recipient_that_asks_for_dane_is_never_sent_in_plaintext(world: World) -> None:
    with Capture(world.lab.gw, netlab.GW_PEER_IF, world.workdir / "needtls.pcap") as cap:
        marker = f"MARKER-{uuid.uuid4().hex}".encode()
        world.mta.sendmail("alice@example.com", "u3@needtls.test",
                           b"Subject: needtls\r\n\r\n" + marker + b"\r\n")
        world.mta.wait_log(r"to=<u3@needtls\.test>.*status=deferred .*450 4\.7\.5 smtpgate: "
                           r"mx\.old2\.test publishes TLSA; this hop is not encrypted",
                           timeout=30)
    assert cap.packets() > 0 and not cap.contains(marker)
    assert not any(marker in p.read_bytes() for p in world.old_peer.maildir_messages())


def test_recipient_dane_satisfied_by_the_verified_session(world: World) -> None:
    marker = f"MARKER-{uuid.uuid4().hex}".encode()
    world.mta.sendmail("alice@example.com", "u4@dane.test",
                       b"Subject: dane rcpt\r\n\r\n" + marker + b"\r\n")
    delivered(world.tls_peer, marker)
    world.mta.wait_log(r"to=<u4@dane\.test>.*status=sent", timeout=20)
    assert world.gw.metric("smtpgate_recipients_total", result="allowed", reason="dane") >= 1


def test_recipient_dane_behind_an_address_without_ptr_and_without_starttls(
        world: World) -> None:
    """The issue's case: nothing about the address says DANE (no PTR, no STARTTLS), but
    the recipient's domain does.  Its message is deferred (in Postfix's queue) and its
    content never crosses; another domain's message to the same address is delivered."""
    deferred, other = (f"MARKER-{uuid.uuid4().hex}".encode() for _ in range(2))
    with Capture(world.lab.gw, netlab.GW_PEER_IF, world.workdir / "needdane.pcap") as cap:
        world.mta.sendmail("alice@example.com", "u5@needdane.test",
                           b"Subject: needdane\r\n\r\n" + deferred + b"\r\n")
        world.mta.sendmail("alice@example.com", "u6@example.net",
                           b"Subject: other\r\n\r\n" + other + b"\r\n")
        delivered(world.plain_peer, other)
        world.mta.wait_log(r"to=<u5@needdane\.test>.*status=deferred .*450 4\.7\.5 "
                           r"smtpgate: mx\.needdane\.test publishes TLSA; this hop is not "
                           r"encrypted", timeout=30)
    assert cap.contains(other)  # the witness works: plaintext is seen when it is sent
    assert not cap.contains(deferred)
    queued = [e for e in world.mta.queue()
              if any(r["address"] == "u5@needdane.test" for r in e["recipients"])]
    assert queued and "450 4.7.5" in queued[0]["recipients"][0]["delay_reason"]


def test_a_deferral_closes_the_mtas_connection_at_once(world: World) -> None:
    """After its 421 the gateway closes the MTA's side right away (the TLS side may still be
    closing politely): an MTA must not sit waiting on a dead session."""
    c = world.lab.mta.connect("203.0.113.4", 25)  # mx.wrong.test: TLSA does not match
    c.settimeout(10)
    with c:
        f = c.makefile("rb")
        assert f.readline().startswith(b"220 ")
        c.sendall(b"EHLO mta.example.com\r\n")
        while (line := f.readline()).startswith(b"250-"):
            pass
        assert line.startswith(b"250 ")
        c.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<wrong@example.net>\r\nDATA\r\n")
        assert f.readline().startswith(b"421 4.7.5 smtpgate: TLS to peer failed")
        t0 = time.monotonic()
        assert f.read() == b""  # EOF
        assert time.monotonic() - t0 < 1.0


def delivered_once(receiver: PostfixInstance, marker: bytes) -> None:
    receiver.wait_delivered(marker)
    time.sleep(0.5)  # a second copy would be right behind the first
    copies = [p for p in receiver.maildir_messages() if marker in p.read_bytes()]
    assert len(copies) == 1


def session_since(w: World, destination: str, seen: int) -> dict[str, Any]:
    """The last session line to ``destination`` among those after the first ``seen``."""
    return w.gw.sessions_to(destination, after=seen, timeout=10)[-1]


def half_closing_client(w: World, host: str, marker: bytes) -> bytes:
    """Exim's habit: the final dot and QUIT in one segment, then shutdown(SHUT_WR), then
    read until the gateway closes.  Returns every reply after the 354."""
    with w.lab.mta.connect(host, 25) as c:
        c.settimeout(20)
        f = c.makefile("rb")
        assert f.readline().startswith(b"220 ")
        c.sendall(b"EHLO mta.example.com\r\n")
        while (line := f.readline()).startswith(b"250-"):
            pass
        assert line.startswith(b"250 "), line
        c.sendall(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<half@example.net>\r\n"
                  b"DATA\r\n")
        replies = [f.readline() for _ in range(3)]
        assert [r[:3] for r in replies] == [b"250", b"250", b"354"], replies
        c.sendall(b"Subject: half-close\r\n\r\n" + marker + b"\r\n.\r\nQUIT\r\n")
        c.shutdown(socket.SHUT_WR)
        return f.read()  # up to the gateway's FIN (the socket's timeout bounds it)


@pytest.mark.parametrize(("host", "peer", "tls"), [
    ("203.0.113.8", "plain", None),  # static passthrough: the bare pump
    ("203.0.113.7", "plain", "plaintext"),  # read by the machine and the envelope tracker
    ("203.0.113.3", "tls", "tls"),  # opportunistic TLS: the FIN becomes close_notify + FIN
    ("203.0.113.2", "tls", "dane"),  # DANE-verified TLS
])
def test_a_half_closing_client_gets_every_reply_and_one_copy(
        world: World, host: str, peer: str, tls: str | None) -> None:
    """Issue: a client's half-close lost the peer's 250 and 221, so the MTA retried a
    delivered message.  Here the client half-closes right after ``.`` and QUIT, through each
    kind of session."""
    receiver = world.tls_peer if peer == "tls" else world.plain_peer
    seen = len(world.gw.sessions())
    marker = f"MARKER-{uuid.uuid4().hex}".encode()
    try:
        after = half_closing_client(world, host, marker)
    except OSError as exc:
        time.sleep(1)  # the session line follows the reset
        raise AssertionError(world.gw.log_text()[-1500:] + world.tls_peer.log_tail()) from exc
    assert after.startswith(b"250 2.0.0 Ok: queued"), after
    assert after.endswith(b"221 2.0.0 Bye\r\n"), after
    delivered_once(receiver, marker)
    s = session_since(world, f"{host}:25", seen)
    assert (s["outcome"], s.get("tls")) == ("relayed", tls), s


@pytest.mark.parametrize(("host", "peer", "tls"), [
    ("203.0.113.2", "tls", "dane"),  # the case: upgraded and DANE-verified
    ("203.0.113.7", "plain", "plaintext"),  # read by the machine and the envelope tracker
    ("203.0.113.8", "plain", None),  # static passthrough
])
def test_exim_behind_the_gateway_delivers_once(world: World, host: str, peer: str,
                                               tls: str | None) -> None:
    """Issue: Exim (TLS avoided, so the gateway upgrades) pipelines the final dot and QUIT,
    half-closes, and lost the 250: every message arrived twice and stayed deferred.  Real
    Exim 4.96 here: one copy, nothing left in its queue."""
    if (why := exim_client.exim_usable()) is not None:
        pytest.skip(why)
    receiver = world.tls_peer if peer == "tls" else world.plain_peer
    seen = len(world.gw.sessions())
    marker = f"MARKER-{uuid.uuid4().hex}".encode()
    with exim_client.EximClient(world.lab.mta, host) as exim:
        exim.send("alice@example.com", "exim@example.net",
                  b"Subject: exim\n\n" + marker + b"\n")
        delivered_once(receiver, marker)
        log = exim.log()
        assert exim.queued() == "", log
        assert " Completed" in log and "==" not in log and "defer" not in log, log
    s = session_since(world, f"{host}:25", seen)
    assert (s["outcome"], s.get("tls")) == ("relayed", tls), s

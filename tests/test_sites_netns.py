"""The whole mission as a user would see it: four mail sites (gatelab/sitelab.py) with real
Postfix, real DNSSEC (NSD + Unbound), both gateways installed by ``smtpgate firewall``.

Each scenario is checked three ways: the receiving MTA's mailbox, an MTA's log, and a
capture on the internet link (tcpdump in the "inet" router) that the marker never crossed
in clear where it must not.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from gatelab import dnslab, netlab, postfix_instance
from gatelab.sitelab import (
    A_MTA,
    B_MTA,
    B_TTL,
    C_PUB,
    C_PUB6,
    D_PUB,
    EDGE_A_PUB,
    LINKS,
    WRONG_TLSA,
    SiteLab,
    demo,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable()
        or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

B_DEST = f"{B_MTA}:25"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteLab]:
    with SiteLab(tmp_path_factory.mktemp("sites"),
                 with_prometheus=shutil.which("prometheus") is not None) as lab:
        yield lab


def redelivered(lab: SiteLab, marker: bytes) -> None:
    """After a deferral: A's next retry delivers to B, exactly once (else: why not)."""
    try:
        lab.redelivered(lab.mta_b, marker)
        lab.mta_a.wait_queue_empty(timeout=20)
    except TimeoutError as exc:
        pids = ",".join(str(p) for p in lab.a.pids())
        ps = lab.a.run(["ps", "-o", "pid,stat,wchan:24,etime,args", "-p", pids],
                       check=False).stdout
        raise AssertionError(f"{exc}\n--- A processes ---\n{ps}\n--- A ---\n"
                             f"{lab.mta_a.log_tail(30)}\n--- queue ---\n"
                             f"{lab.mta_a.queue()}\n--- gateway A ---\n"
                             f"{lab.gw_a.log_text()[-6000:]}") from exc
    assert lab.copies(lab.mta_b, marker) == 1


def received_headers(message: bytes) -> str:
    return message.split(b"\n\n", 1)[0].replace(b"\n\t", b" ").replace(b"\n ", b" ").decode()


def test_a_to_b_both_gateways_dane_verified(lab: SiteLab) -> None:
    out_before, in_before = len(lab.gw_a.sessions()), len(lab.gw_b.sessions())
    mark = lab.mta_b.log_mark()
    with lab.capture("edge_a", "a-to-b") as cap:
        marker = lab.send(lab.mta_a, "alice@a.test", "bob@b.test")
        message = lab.delivered(lab.mta_b, marker)
        out = lab.session(lab.gw_a, B_DEST, after=out_before)
        inb = lab.session(lab.gw_b, after=in_before)
    # The wire: plenty of traffic, never the marker.
    assert cap.packets() > 10 and not cap.contains(marker)
    # Outbound gateway: DANE-verified against b.test's TLSA (the inbound gateway's key).
    assert (out["plan"], out["tls"], out["verify"], out["outcome"]) == (
        "require-tls", "dane", "dane-ee match", "relayed"), out
    assert out["peer_name"] == "mx.b.test" and out["tls_version"] in ("TLSv1.2", "TLSv1.3")
    # Inbound gateway: terminated that TLS, relayed to B's MTA only.
    assert (inb["direction"], inb["tls"], inb["outcome"]) == ("inbound", "tls", "relayed"), inb
    assert inb["upstream"] == B_DEST
    # B's MTA saw A's own MTA (edge A connected from its address: source_address client;
    # edge B passed it on by PROXY v2), neither edge's address.
    lab.mta_b.wait_log(rf"connect from \S+\[{re.escape(A_MTA)}\]", since=mark)
    assert "[198.51.100.17]" not in lab.mta_b.log_text()
    assert f"[{EDGE_A_PUB}]" not in lab.mta_b.log_text()
    assert f"[{A_MTA}]" in received_headers(message)
    assert lab.gw_a.metric("smtpgate_upgrades_total", result="dane", reason="none") >= 1


def test_a_to_d_plaintext_delivered_unchanged(lab: SiteLab) -> None:
    before = len(lab.gw_a.sessions())
    body = b"Subject: plain\r\n\r\nline one\r\n.dot line\r\n"
    with lab.capture("d", "a-to-d") as cap:
        marker = lab.send(lab.mta_a, "alice@a.test", "dave@d.test")
        lab.mta_a.sendmail("alice@a.test", "dave@d.test", body + marker + b"-2\r\n")
        lab.delivered(lab.mta_d, marker)
        message = lab.delivered(lab.mta_d, marker + b"-2")
        s = lab.session(lab.gw_a, f"{D_PUB}:25", after=before)
    # Nothing offered TLS and nothing asked for it: the bytes crossed as they were.
    assert cap.contains(marker)
    assert (s["plan"], s["tls"]) == ("try-tls", "plaintext"), s
    # Postfix may reuse the connection for both messages and reset it after QUIT, which
    # the gateway counts as client_reset (seen in about one run in five).
    assert s["outcome"] in ("relayed", "client_reset"), s
    assert s["tls_reason"] == "peer does not offer STARTTLS"
    assert message.endswith(b"\n\nline one\n.dot line\n" + marker + b"-2\n")
    assert "using TLS" not in received_headers(message)
    lab.mta_d.wait_log(rf"connect from \S+\[{re.escape(A_MTA)}\]")  # A's own MTA


def test_wrong_tlsa_defers_in_a_queue_then_delivers_exactly_once(lab: SiteLab) -> None:
    lab.set_b_tlsa(WRONG_TLSA)
    try:
        mark = lab.mta_a.log_mark()
        with lab.capture("edge_a", "wrong-tlsa") as cap:
            marker = lab.send(lab.mta_a, "alice@a.test", "wrong@b.test")
            lab.mta_a.wait_log(r"to=<wrong@b\.test>.*status=deferred .*421 4\.7\.5 smtpgate: "
                               r"TLS to peer failed: no matching record", timeout=20, since=mark)
            queued = [e for e in lab.mta_a.queue()
                      if any(r["address"] == "wrong@b.test" for r in e["recipients"])]
            assert queued, lab.mta_a.queue()
        assert cap.packets() > 0 and not cap.contains(marker)
        assert lab.copies(lab.mta_b, marker) == 0
    finally:
        lab.set_b_tlsa(lab.b_tlsa)
    # Fixed: the next retry (Postfix's own, 1-2 s in the lab) delivers it, once.
    redelivered(lab, marker)
    lab.mta_a.wait_log(r"to=<wrong@b\.test>.*status=sent", since=mark)
    assert lab.copies(lab.mta_b, marker) == 1
    assert lab.gw_a.metric("smtpgate_upgrades_total", result="deferred", reason="verify") >= 1


def test_a_to_c_outbound_gateway_to_a_dane_mta(lab: SiteLab) -> None:
    before = len(lab.gw_a.sessions())
    with lab.capture("c", "a-to-c") as cap:
        marker = lab.send(lab.mta_a, "alice@a.test", "carol@c.test")
        message = lab.delivered(lab.mta_c, marker)
        s = lab.session(lab.gw_a, f"{C_PUB}:25", after=before)
    assert cap.packets() > 10 and not cap.contains(marker)
    assert (s["tls"], s["verify"], s["peer_name"]) == ("dane", "dane-ee match", "mx.c.test"), s
    # C's smtpd records the hop: TLS, from A's own MTA (not its edge: source_address client).
    assert re.search(rf"from mta\.a\.test .*\[{re.escape(A_MTA)}\].*\(using TLSv1\.[23]",
                     received_headers(message)), received_headers(message)


def test_c_to_b_dane_client_verifies_the_inbound_gateway(lab: SiteLab) -> None:
    mark_c, mark_b = lab.mta_c.log_mark(), lab.mta_b.log_mark()
    with lab.capture("c", "c-to-b") as cap:
        marker = lab.send(lab.mta_c, "carol@c.test", "bob@b.test")
        lab.mta_c.wait_log(rf"Verified TLS connection established to mx\.b\.test"
                           rf"\[{re.escape(B_MTA)}\]:25: TLSv1\.[23]", timeout=30, since=mark_c)
        lab.delivered(lab.mta_b, marker)
    assert cap.packets() > 10 and not cap.contains(marker)
    lab.mta_c.wait_log(r"to=<bob@b\.test>.*status=sent", since=mark_c)
    lab.mta_b.wait_log(rf"connect from \S+\[{re.escape(C_PUB)}\]", since=mark_b)


def test_helo_only_client_is_still_upgraded_and_verified(lab: SiteLab) -> None:
    before = len(lab.gw_a.sessions())
    with lab.capture("c", "helo") as cap:
        marker = lab.send(lab.mta_a, "alice@a.test", "helo@c.test")
        message = lab.delivered(lab.mta_c, marker)
        s = lab.session(lab.gw_a, f"{C_PUB}:25", after=before)
    assert not cap.contains(marker)
    assert s["tls"] == "dane" and s["verify"] in ("dane-ee match", "resumed verified session")
    assert "(using TLSv1." in received_headers(message)


def test_ipv6_path_a_to_c(lab: SiteLab) -> None:
    before = len(lab.gw_a.sessions())
    with lab.capture("c", "v6") as cap:
        marker = lab.send(lab.mta_a, "alice@a.test", "v6@c.test")
        message = lab.delivered(lab.mta_c, marker)
        s = lab.session(lab.gw_a, f"[{C_PUB6}]:25", after=before)
    assert not cap.contains(marker)
    assert s["tls"] == "dane" and s["peer_name"] == "mx.c.test", s
    assert "(using TLSv1." in received_headers(message)
    # From A's own MTA (2001:db8:a::2), not its edge's public address.
    assert "[IPv6:2001:db8:a::2]" in received_headers(message)
    assert f"[IPv6:{LINKS['edge_a'].site_v6}]" not in received_headers(message)


def test_bogus_b_test_defers_never_in_clear(lab: SiteLab) -> None:
    lab.dns.make_bogus("b.test.")
    time.sleep(B_TTL + 0.2)  # the gateway's cache forgets the valid answers
    try:
        before = len(lab.gw_a.sessions())
        mark = lab.mta_a.log_mark()
        with lab.capture("edge_a", "bogus") as cap:
            # direct@b.test is routed to B's address without an MX lookup: what meets the
            # bogus zone is the gateway's discovery (PTR -> mx.b.test -> A/TLSA).
            marker = lab.send(lab.mta_a, "alice@a.test", "direct@b.test")
            lab.mta_a.wait_log(r"to=<direct@b\.test>.*status=deferred .*said: 4\d\d 4\.",
                               timeout=20, since=mark)
            s = lab.session(lab.gw_a, B_DEST, after=before)
        assert cap.packets() > 0 and not cap.contains(marker)
        assert lab.copies(lab.mta_b, marker) == 0
        assert (s["plan"], s["outcome"]) == ("defer", "deferred"), s
        assert "mx.b.test. is bogus" in s["tls_reason"], s
    finally:
        lab.dns.make_secure("b.test.")
    redelivered(lab, marker)


class StripTls:
    """A man in the middle in inet: A's port-25 connections to B are redirected to it; it
    relays to B, hiding STARTTLS in the replies (same length, as seen in the wild)."""

    PORT = 2525

    def __init__(self, lab: SiteLab) -> None:
        self.lab = lab
        self.rule = ["PREROUTING", "-i", "a0", "-p", "tcp", "-d", B_MTA, "--dport", "25",
                     "-j", "REDIRECT", "--to-ports", str(self.PORT)]
        self.sock = lab.inet.listen("0.0.0.0", self.PORT)
        self.stripped = 0
        threading.Thread(target=self._accept, daemon=True).start()
        lab.inet.iptables(["-t", "nat", "-A", *self.rule])

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = self.lab.inet.connect(B_MTA, 25)
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, strip: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if strip and b"STARTTLS" in data:
                    data = data.replace(b"STARTTLS", b"XXXXXXXA")
                    self.stripped += 1
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.lab.inet.iptables(["-t", "nat", "-D", *self.rule])
        self.sock.close()


def test_mitm_stripping_starttls_toward_b_defers(lab: SiteLab) -> None:
    before = len(lab.gw_a.sessions())
    mark = lab.mta_a.log_mark()
    mitm = StripTls(lab)
    try:
        with lab.capture("edge_a", "mitm") as cap:
            marker = lab.send(lab.mta_a, "alice@a.test", "mitm@b.test")
            lab.mta_a.wait_log(r"to=<mitm@b\.test>.*status=deferred .*421 4\.7\.4 smtpgate: "
                               r"TLS required but peer does not offer STARTTLS", timeout=20,
                               since=mark)
            s = lab.session(lab.gw_a, B_DEST, after=before)
        assert mitm.stripped >= 1
        assert cap.packets() > 0 and not cap.contains(marker)
        assert lab.copies(lab.mta_b, marker) == 0
        assert (s["plan"], s["outcome"]) == ("require-tls", "deferred"), s
    finally:
        mitm.close()
    redelivered(lab, marker)


PROMQL = {
    # What each scenario above leaves in the counters, as Prometheus (in inet) scraped them.
    "A->B, A->C, C->B: DANE-verified upgrades at A":
        'smtpgate_upgrades_total{site="a",result="dane",reason="none"} >= 2',
    "A->D: plaintext, peer offers no STARTTLS":
        'smtpgate_upgrades_total{site="a",result="plaintext",reason="not_offered"} >= 1',
    "wrong TLSA: deferred on verification":
        'smtpgate_upgrades_total{site="a",result="deferred",reason="verify"} >= 1',
    "MITM strips STARTTLS: deferred, not offered":
        'smtpgate_upgrades_total{site="a",result="deferred",reason="not_offered"} >= 1',
    "bogus b.test: deferred sessions":
        'smtpgate_sessions_total{site="a",direction="outbound",outcome="deferred"} >= 3',
    "A->B, C->B: inbound TLS at B":
        'smtpgate_upgrades_total{site="b",direction="inbound",result="tls"} >= 3',
    "both exporters scraped": 'count(up{job="smtpgate"} == 1) == 2',
}


def test_prometheus_answers_for_each_scenario(lab: SiteLab) -> None:
    if not lab.with_prometheus:
        pytest.skip("prometheus not installed (Debian package prometheus)")
    missing = []
    for what, expr in PROMQL.items():
        try:
            lab.wait_promql(expr, timeout=10)
        except TimeoutError:
            missing.append(f"{what}: {expr} -> {lab.promql(expr.split(' ')[0])}")
    assert not missing, "\n".join(missing)


def test_demo_report(lab: SiteLab) -> None:
    """scripts/demo's report, from a lab of its own that it removes."""
    buf = io.StringIO()
    assert demo(out=buf) == 0, buf.getvalue()
    text = buf.getvalue()
    assert text.count("[PASS]") == 3 and "FAIL" not in text, text
    assert "encrypted, TLSv1.3, DANE-verified (dane-ee match)" in text, text
    assert "B's MTA saw the client as 198.51.100.2 (A's own MTA" in text, text
    assert "421 4.7.5 smtpgate: TLS to peer failed: no matching record" in text, text
    assert "1 copy on A's next retry" in text and "lab removed;" in text, text


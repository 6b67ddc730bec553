"""A multi-site lab: four mail sites on one "internet", real Postfix, real DNSSEC, and
both halves of smtpgate installed by ``smtpgate firewall``.

Topology (documentation ranges only; every box is a network namespace)::

                 NSD 192.0.2.53 + Unbound 192.0.2.54 (lab root, signed zones)
                                  [inet]  router
           a0 .1  /           b0 .17 |            c0 .33 \\        d0 .49 \\
      203.0.113.2 [edge_a]   203.0.113.18 [edge_b]    203.0.113.34 [c]   203.0.113.50 [d]
      smtpgate OUTBOUND       smtpgate INBOUND         Postfix DANE       Postfix, no TLS
      198.51.100.1 |          198.51.100.17 |          + smtpd TLS
      198.51.100.2 [a]        198.51.100.18 [b]
      legacy Postfix          legacy Postfix (PROXY v2 from the gateway)

IPv6 mirrors it: link ``n`` is 2001:db8:n::/64 (inet ::1, the other end ::2); site A's
inside is 2001:db8:a::/64, site B's 2001:db8:b::/64. Every site resolves through the one
Unbound (``resolv.conf`` with ``options trust-ad``); the gateways name it in
``dns.resolvers`` and ``dns.trusted`` (it is not loopback for them).

Zones (all signed, securely delegated from the lab root): a.test, b.test, c.test, d.test
(MX, A, TLSA where a site has a key; AAAA for mx.c.test) and the reverse zones of
203.0.113.0/24, 198.51.100.0/24 and 2001:db8:3::/64. b.test carries a short TTL so that
replacing its TLSA is seen quickly (the gateways' DNS cache is capped to it too).

Optionally (``SiteLab(work, with_prometheus=True)``) a Prometheus in inet scrapes both
gateways' exporters, which listen on the edges' public addresses.

``smtpgate demo`` (``scripts/demo``) builds the lab, runs three scenarios and
prints how each message travelled.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from gatelab import certs
from gatelab.capture import Capture
from gatelab.dnslab import DnsWorld, ptr_name, reverse_zone
from gatelab.gatewayproc import GatewayProcess, cli, gateway_config
from gatelab.monitoring import Prometheus
from gatelab.netlab import Netns, _link_ready, delete_all
from gatelab.postfix_instance import (
    PostfixInstance,
    null_client_settings,
    receiver_settings,
    tls_receiver_settings,
)
from gateway.dane import tlsa_record

NSD_V4, NSD_V6 = "192.0.2.53", "2001:db8:53::53"
RESOLVER_V4 = "192.0.2.54"

# Internet side: inet's interface name, inet's address, the site's address (v4 /28s).
EDGE_A_PUB, EDGE_B_PUB, C_PUB, D_PUB = "203.0.113.2", "203.0.113.18", "203.0.113.34", \
    "203.0.113.50"
C_PUB6 = "2001:db8:3::2"
A_MTA, B_MTA = "198.51.100.2", "198.51.100.18"
A_NET, B_NET = "198.51.100.0/28", "198.51.100.16/28"
A_NET6, B_NET6 = "2001:db8:a::/64", "2001:db8:b::/64"
HOST_IF = "eth0"
INSIDE_IF = "in0"  # an edge's interface toward its site
OUT_PORT, IN_PORT, METRICS_PORT, PROMETHEUS_PORT = 10025, 10026, 9125, 9090
WRONG_TLSA = "3 1 1 " + "5a" * 32
B_TTL = 1


@dataclass
class Link:
    inet_if: str
    inet_v4: str
    site_v4: str
    inet_v6: str
    site_v6: str


LINKS = {
    "edge_a": Link("a0", "203.0.113.1", EDGE_A_PUB, "2001:db8:1::1", "2001:db8:1::2"),
    "edge_b": Link("b0", "203.0.113.17", EDGE_B_PUB, "2001:db8:2::1", "2001:db8:2::2"),
    "c": Link("c0", "203.0.113.33", C_PUB, "2001:db8:3::1", "2001:db8:3::2"),
    "d": Link("d0", "203.0.113.49", D_PUB, "2001:db8:4::1", "2001:db8:4::2"),
}


def write_key_pair(work: Path, name: str, host: str) -> tuple[Path, Path, Path, str]:
    """key.pem (0600), cert.pem, a Postfix chain file, and the TLSA 3 1 1 rdata."""
    leaf = certs.make_leaf(None, [host])
    pki = certs.write_pki(work / name, leaf)
    return pki["key"], pki["cert"], pki["chain"], str(tlsa_record(leaf.der))


def site_config(listeners: Sequence[str], metrics: str,
                tls: tuple[Path, Path] | None = None) -> str:
    resolver = f"{RESOLVER_V4}:53"
    return gateway_config(listeners=listeners, connect=5, drain=2,
                          metrics=f"{metrics}:{METRICS_PORT}", resolvers=[resolver],
                          trusted=[resolver], dns_timeout=1, budget=3,
                          cache=f"min_ttl: 0, max_ttl: {B_TTL}, failure_ttl: 0", policy="dane",
                          tls=tls)


@dataclass
class SiteLab:
    """Build with :meth:`start` (or ``with SiteLab(work) as lab``); :meth:`close` stops
    every daemon and removes every namespace it made (files stay in ``work``, the
    caller's directory, for a look after a failure)."""

    work: Path
    namespaces: list[Netns] = field(default_factory=list)
    postfixes: list[PostfixInstance] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    with_prometheus: bool = False

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self.prometheus: Prometheus | None = None

    # -- building ----------------------------------------------------------------------

    def _ns(self, role: str) -> Netns:
        ns = Netns(role)
        self.namespaces.append(ns)
        return ns

    def start(self, prometheus: bool = False) -> SiteLab:
        """Build everything; with ``prometheus``, also a Prometheus in inet scraping both
        gateways' exporters (on their public addresses) every second."""
        t0 = time.monotonic()
        try:
            self._network()
            self.timings["network"] = time.monotonic() - t0
            self._dns()
            self.timings["dns"] = time.monotonic() - t0
            self._gateways()
            self.timings["gateways"] = time.monotonic() - t0
            self._mtas()
            self.timings["mtas"] = time.monotonic() - t0
            if prometheus:
                self._prometheus()
                self.timings["prometheus"] = time.monotonic() - t0
        except BaseException:
            self.close()
            raise
        return self

    def _network(self) -> None:
        self.inet = self._ns("inet")
        self.edge_a, self.a = self._ns("edgea"), self._ns("a")
        self.edge_b, self.b = self._ns("edgeb"), self._ns("b")
        self.c, self.d = self._ns("c"), self._ns("d")
        inet = self.inet
        for ns in (inet, self.edge_a, self.edge_b):
            ns.sysctl("net.ipv4.ip_forward", 1)
            ns.sysctl("net.ipv6.conf.all.forwarding", 1)
        ready: list[tuple[Netns, str]] = []

        def up(ns: Netns, dev: str, *addrs: str) -> None:
            for addr in addrs:
                ns.ip("addr", "add", addr, "dev", dev, *(["nodad"] if ":" in addr else []))
            for proto in ("ipv4", "ipv6"):
                ns.sysctl(f"net.{proto}.neigh.{dev}.retrans_time_ms", 100)
            ns.ip("link", "set", dev, "up")
            ready.append((ns, dev))

        for role, link in LINKS.items():
            other: Netns = getattr(self, role)
            inet.ip("link", "add", link.inet_if, "type", "veth", "peer", "name", HOST_IF,
                    "netns", other.name)
            up(inet, link.inet_if, f"{link.inet_v4}/28", f"{link.inet_v6}/64")
            up(other, HOST_IF, f"{link.site_v4}/28", f"{link.site_v6}/64")
            other.ip("route", "add", "default", "via", link.inet_v4)
            other.ip("-6", "route", "add", "default", "via", link.inet_v6)
        for edge, site, net, net6, gw4, mta, pub in (
                (self.edge_a, self.a, A_NET, A_NET6, "198.51.100.1", A_MTA, LINKS["edge_a"]),
                (self.edge_b, self.b, B_NET, B_NET6, "198.51.100.17", B_MTA, LINKS["edge_b"])):
            edge.ip("link", "add", INSIDE_IF, "type", "veth", "peer", "name", HOST_IF,
                    "netns", site.name)
            prefix6 = net6.split("::/")[0]
            up(edge, INSIDE_IF, f"{gw4}/28", f"{prefix6}::1/64")
            up(site, HOST_IF, f"{mta}/28", f"{prefix6}::2/64")
            site.ip("route", "add", "default", "via", gw4)
            site.ip("-6", "route", "add", "default", "via", f"{prefix6}::1")
            inet.ip("route", "add", net, "via", pub.site_v4)
            inet.ip("-6", "route", "add", net6, "via", pub.site_v6)
        inet.ip("addr", "add", f"{RESOLVER_V4}/32", "dev", "lo")
        deadline = time.monotonic() + 5
        while ready := [(ns, dev) for ns, dev in ready if not _link_ready(ns, dev)]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"links not ready: {ready}")
            time.sleep(0.005)

    def _dns(self) -> None:
        work = self.work
        self.b_key, self.b_cert, _, self.b_tlsa = write_key_pair(work, "b", "mx.b.test")
        _, _, self.c_chain, self.c_tlsa = write_key_pair(work, "c", "mx.c.test")
        dns = DnsWorld(self.inet, NSD_V4, NSD_V6, self.inet, work / "dns", server_dev="lo",
                       resolver_listen=[RESOLVER_V4])
        self._stack.callback(dns.stop)
        self.dns = dns
        dns.zone("a.test.", ["@ MX 10 mx", f"mx A {EDGE_A_PUB}"])
        dns.zone("b.test.", self.b_records(self.b_tlsa), ttl=B_TTL)
        dns.zone("c.test.", ["@ MX 10 mx", f"mx A {C_PUB}", f"mx AAAA {C_PUB6}",
                             f"_25._tcp.mx TLSA {self.c_tlsa}"])
        dns.zone("d.test.", ["@ MX 10 mx", f"mx A {D_PUB}"])
        dns.zone("113.0.203.in-addr.arpa.", ["2 PTR mx.a.test.", "34 PTR mx.c.test.",
                                             "50 PTR mx.d.test."])
        dns.zone("100.51.198.in-addr.arpa.", ["18 PTR mx.b.test.", "2 PTR mta.a.test."])
        dns.zone(reverse_zone("2001:db8:3::/64"), [f"{ptr_name(C_PUB6)} PTR mx.c.test."])
        dns.start()
        resolv = f"nameserver {RESOLVER_V4}\noptions trust-ad\n"
        for ns in (self.a, self.b, self.c, self.d, self.edge_a, self.edge_b):
            ns.set_resolv_conf(resolv)

    @staticmethod
    def b_records(tlsa: str) -> list[str]:
        return ["@ MX 10 mx", f"mx A {B_MTA}", f"_25._tcp.mx TLSA {tlsa}"]

    def set_b_tlsa(self, tlsa: str) -> None:
        """Publish ``tlsa`` for mx.b.test; returns once every cache may have forgotten the
        old record (Unbound is flushed; the gateways cache for the TTL, B_TTL)."""
        self.dns.update("b.test.", self.b_records(tlsa))
        time.sleep(B_TTL + 0.2)

    def _firewall(self, ns: Netns, config: Path, *args: str) -> None:
        r = cli(ns, "firewall", "-c", str(config), "--apply", *args)
        if r.returncode != 0:
            raise RuntimeError(f"smtpgate firewall --apply failed: {r.stderr}")

    def _gateways(self) -> None:
        # Peers see A's MTA itself (edge A is its router: the replies pass it).
        out = site_config([f"{{address: 0.0.0.0, port: {OUT_PORT}, direction: outbound, "
                           "source_address: client}",
                           f'{{address: "::", port: {OUT_PORT}, direction: outbound, '
                           "source_address: client}"], EDGE_A_PUB)
        self.gw_a = GatewayProcess(self.edge_a, self.work / "gw-a", out, host=EDGE_A_PUB,
                                   metrics_port=METRICS_PORT)
        self._stack.enter_context(self.gw_a)
        self._firewall(self.edge_a, self.gw_a.config_path, "--mta-interface", INSIDE_IF)
        inbound = site_config([f"{{address: 0.0.0.0, port: {IN_PORT}, direction: inbound, "
                               f"starttls: offload, client_address: proxy-protocol, "
                               f'upstreams: ["{B_MTA}:25"]}}'], EDGE_B_PUB,
                              tls=(self.b_key, self.b_cert))
        self.gw_b = GatewayProcess(self.edge_b, self.work / "gw-b", inbound, host=EDGE_B_PUB,
                                   metrics_port=METRICS_PORT)
        self._stack.enter_context(self.gw_b)
        self._firewall(self.edge_b, self.gw_b.config_path, "--internet-interface", HOST_IF)

    def _postfix(self, ns: Netns, name: str, settings: dict[str, str],
                 master: tuple[str, ...] = ()) -> PostfixInstance:
        pf = PostfixInstance(ns, self.work, settings, name=name, master_cf_overrides=master)
        self._stack.enter_context(pf)
        self.postfixes.append(pf)
        return pf

    def _mtas(self) -> None:
        # A: legacy, no TLS at all, sends by MX; one route that skips DNS (direct@b.test)
        # so that the gateway, not Postfix's own MX lookup, meets a bogus b.test.
        a = null_client_settings("", myhostname="mta.a.test")
        # helo@c.test: as qmail's client does, HELO only; v6@c.test: over IPv6.
        routes = (f"direct@b.test=smtp:[{B_MTA}]:25, helo@c.test=heloonly:,"
                  f" v6@c.test=smtp:[{C_PUB6}]:25")
        a.update({"relayhost": "", "smtp_address_preference": "ipv4",
                  "transport_maps": f"inline:{{ {routes} }}"})
        self.mta_a = self._postfix(self.a, "mta-a", a, (
            "heloonly/unix = heloonly unix - - n - - smtp -o smtp_never_send_ehlo=yes",))
        b = receiver_settings(B_MTA, domain="b.test", myhostname="mx.b.test")
        b["smtpd_upstream_proxy_protocol"] = "haproxy"
        self.mta_b = self._postfix(self.b, "mta-b", b)
        c = tls_receiver_settings(f"{C_PUB}, [{C_PUB6}]", self.c_chain, domain="c.test",
                                  myhostname="mx.c.test")
        c.update({"smtp_tls_security_level": "dane", "smtp_dns_support_level": "dnssec",
                  "smtp_tls_loglevel": "1", "smtp_address_preference": "ipv4",
                  "mynetworks": "127.0.0.0/8"})
        self.mta_c = self._postfix(self.c, "mta-c", c)
        self.mta_d = self._postfix(self.d, "mta-d",
                                   receiver_settings(D_PUB, domain="d.test",
                                                     myhostname="mx.d.test"))

    def _prometheus(self) -> None:
        work = self.work / "prometheus"
        work.mkdir(exist_ok=True)
        config = work / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "smtpgate", "static_configs": [
                {"targets": [f"{EDGE_A_PUB}:{METRICS_PORT}"], "labels": {"site": "a"}},
                {"targets": [f"{EDGE_B_PUB}:{METRICS_PORT}"], "labels": {"site": "b"}}]}],
        }))
        self.prometheus = self._stack.enter_context(
            Prometheus(self.inet, work, config, PROMETHEUS_PORT))

    def promql(self, expr: str) -> list[dict[str, Any]]:
        """An instant query to the lab's Prometheus: the result vector."""
        assert self.prometheus is not None
        return self.prometheus.vector(expr)

    def wait_promql(self, expr: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Polls until ``expr`` has a result (a comparison that became true)."""
        assert self.prometheus is not None
        return self.prometheus.wait_for(expr, timeout)

    # -- using -------------------------------------------------------------------------

    @staticmethod
    def send(mta: PostfixInstance, sender: str, rcpt: str, subject: str = "lab") -> bytes:
        """Submit a message with a fresh marker through ``mta``'s sendmail; the marker."""
        marker = f"MARKER-{uuid.uuid4().hex}".encode()
        mta.sendmail(sender, rcpt, f"Subject: {subject}\r\n\r\n".encode() + marker + b"\r\n")
        return marker

    @staticmethod
    def delivered(mta: PostfixInstance, marker: bytes, timeout: float = 20) -> bytes:
        return mta.wait_delivered(marker, timeout)

    def redelivered(self, dst: PostfixInstance, marker: bytes, timeout: float = 45) -> bytes:
        """After a deferral at A: wait for A's retry to deliver ``marker`` to ``dst``.

        Postfix retries on its own within 1-2 s here, but now and then (about one run in
        five, under load) A's queue manager leaves the deferred message in "incoming" as
        "skipped, still being delivered" for longer than any test should wait; a flush
        (``postqueue -f``, what an operator would do) every 10 s gets it going again."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.delivered(dst, marker, timeout=min(10, deadline - time.monotonic()))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
                self.mta_a.flush()

    @staticmethod
    def copies(mta: PostfixInstance, marker: bytes) -> int:
        return sum(marker in p.read_bytes() for p in mta.maildir_messages())

    @staticmethod
    def session(gw: GatewayProcess, destination: str | None = None, *, after: int = 0,
                timeout: float = 20) -> dict[str, Any]:
        """The first session line (after the first ``after`` lines) to ``destination``."""
        return gw.sessions_to(destination, after=after, timeout=timeout)[0]

    @contextlib.contextmanager
    def capture(self, link: str, name: str) -> Iterator[Capture]:
        """tcpdump on inet's side of a site's internet link (``edge_a``, ``c``, ...)."""
        with Capture(self.inet, LINKS[link].inet_if, self.work / f"{name}.pcap") as cap:
            yield cap

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            delete_all(self.namespaces)

    def __enter__(self) -> SiteLab:
        return self.start(prometheus=self.with_prometheus)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# -- the demo (scripts/demo) -------------------------------------------------------------


@dataclass
class Outcome:
    scenario: str
    sent: str
    hops: list[str]
    arrived: str
    wire: str
    ok: bool


def _hop_out(s: dict[str, Any]) -> str:
    if s.get("tls") in ("dane", "tls"):
        verified = "DANE-verified" if s["tls"] == "dane" else "NOT verified"
        return (f"edge A gateway -> {s['destination']} ({s.get('peer_name')}): encrypted, "
                f"{s.get('tls_version')}, {verified} ({s.get('verify')})")
    return (f"edge A gateway -> {s['destination']}: {s.get('tls')} "
            f"({s.get('tls_reason')}), outcome {s.get('outcome')}")


def _scenarios(lab: SiteLab) -> list[Outcome]:
    out: list[Outcome] = []
    # 1. A -> B: both gateways.
    before_a, before_b = len(lab.gw_a.sessions()), len(lab.gw_b.sessions())
    with lab.capture("edge_a", "demo-a-to-b") as cap:
        marker = lab.send(lab.mta_a, "alice@a.test", "bob@b.test", "demo A to B")
        lab.delivered(lab.mta_b, marker)
        s_out = lab.session(lab.gw_a, f"{B_MTA}:25", after=before_a)
        s_in = lab.session(lab.gw_b, after=before_b)
    seen = lab.mta_b.wait_log(r"connect from \S+\[([0-9a-f.:]+)\]").group(1)
    out.append(Outcome(
        "A -> B (legacy MTA to legacy MTA, both behind smtpgate)",
        "alice@a.test -> bob@b.test (A's Postfix has no TLS at all)",
        [_hop_out(s_out),
         f"edge B gateway: STARTTLS offered with B's key (TLSA published), "
         f"{s_in.get('tls_version')}, relayed to {s_in.get('upstream')} with PROXY v2"],
        f"B's mailbox; B's MTA saw the client as {seen} "
        f"({'A' if seen == A_MTA else 'NOT A'}'s own MTA, through both gateways)",
        f"{cap.packets()} packets on A's internet link; marker in clear: "
        f"{'YES' if cap.contains(marker) else 'no'}",
        s_out.get("tls") == "dane" and not cap.contains(marker) and seen == A_MTA))
    # 2. A -> D: nobody offers TLS.
    before_a = len(lab.gw_a.sessions())
    with lab.capture("d", "demo-a-to-d") as cap:
        marker = lab.send(lab.mta_a, "alice@a.test", "dave@d.test", "demo A to D")
        lab.delivered(lab.mta_d, marker)
        s_out = lab.session(lab.gw_a, f"{D_PUB}:25", after=before_a)
    out.append(Outcome(
        "A -> D (D offers no TLS, publishes no TLSA)", "alice@a.test -> dave@d.test",
        [_hop_out(s_out)], "D's mailbox, unchanged (plaintext passthrough)",
        f"{cap.packets()} packets; marker in clear: {'yes' if cap.contains(marker) else 'NO'}"
        " (expected: nothing asked for encryption)",
        s_out.get("tls") == "plaintext" and cap.contains(marker)))
    # 3. B's TLSA replaced by a wrong one: deferred in A's queue, then fixed.
    lab.set_b_tlsa(WRONG_TLSA)
    before_a = len(lab.gw_a.sessions())
    mark = lab.mta_a.log_mark()
    try:
        with lab.capture("edge_a", "demo-wrong") as cap:
            marker = lab.send(lab.mta_a, "alice@a.test", "bob@b.test", "demo wrong TLSA")
            m = lab.mta_a.wait_log(r"to=<bob@b\.test>.*status=deferred \((.*)\)", timeout=20,
                                   since=mark)
            s_out = lab.session(lab.gw_a, f"{B_MTA}:25", after=before_a)
            queued = len(lab.mta_a.queue())
    finally:
        lab.set_b_tlsa(lab.b_tlsa)
    lab.redelivered(lab.mta_b, marker)
    lab.mta_a.wait_queue_empty(timeout=20)
    out.append(Outcome(
        "B's TLSA replaced by a wrong one, then fixed", "alice@a.test -> bob@b.test",
        [_hop_out(s_out), f"A's Postfix: deferred ({m.group(1)}), {queued} message(s) queued"],
        f"after the fix: B's mailbox, {lab.copies(lab.mta_b, marker)} copy on A's next retry",
        f"{cap.packets()} packets while wrong; marker in clear: "
        f"{'YES' if cap.contains(marker) else 'no'}",
        s_out.get("outcome") == "deferred" and not cap.contains(marker)
        and lab.copies(lab.mta_b, marker) == 1))
    return out


def _metrics(gw: GatewayProcess) -> list[str]:
    keep = ("smtpgate_sessions_total", "smtpgate_upgrades_total")
    return [line for line in gw.scrape().splitlines()
            if line.startswith(keep) and not line.endswith(" 0.0")]


def demo(keep: bool = False, out: Any = sys.stdout) -> int:
    """Build the lab, run three scenarios, print a report, remove the lab."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="smtpgate-demo-"))
    t0 = time.monotonic()
    print("building the lab: 7 network namespaces, NSD + Unbound (DNSSEC), 4 Postfix, "
          "2 gateways ...", file=out, flush=True)
    failed = 0
    with SiteLab(work) as lab:
        print(f"lab up in {time.monotonic() - t0:.1f} s; namespaces: "
              f"{', '.join(ns.name for ns in lab.namespaces)}\n", file=out, flush=True)
        try:
            outcomes = _scenarios(lab)
        except Exception:
            for pf in (lab.mta_a, lab.mta_b):
                print(f"--- {pf.name} log ---\n{pf.log_tail(60)}", file=out)
            print(f"--- gateway A log ---\n{lab.gw_a.log_text()[-4000:]}", file=out, flush=True)
            raise
        for i, o in enumerate(outcomes, 1):
            failed += not o.ok
            print(f"[{'PASS' if o.ok else 'FAIL'}] {i}. {o.scenario}", file=out)
            print(f"    sent:    {o.sent}", file=out)
            for hop in o.hops:
                print(f"    hop:     {hop}", file=out)
            print(f"    arrived: {o.arrived}", file=out)
            print(f"    wire:    {o.wire}\n", file=out, flush=True)
        for name, gw in (("edge A (outbound)", lab.gw_a), ("edge B (inbound)", lab.gw_b)):
            print(f"metrics of {name}:", file=out)
            for line in _metrics(gw):
                print(f"    {line}", file=out)
        print(file=out)
        if keep:
            print(f"--keep: the lab stays up (files in {work}); e.g.\n"
                  f"    ip netns exec {lab.a.name} sendmail -C {lab.mta_a.config_dir} "
                  f"bob@b.test\npress Enter to remove it", file=out, flush=True)
            with contextlib.suppress(EOFError, KeyboardInterrupt):
                input()
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"lab removed; {time.monotonic() - t0:.1f} s in all; "
          f"{'all scenarios passed' if not failed else f'{failed} scenario(s) FAILED'}",
          file=out)
    return 1 if failed else 0


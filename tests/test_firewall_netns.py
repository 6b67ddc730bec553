"""``smtpgate firewall`` against the real kernel, only inside namespaces this module creates:
every generated ruleset loads (``nft -c``, ``iptables-restore --test``), the printed script
runs, and in a lab (mta — gw — peer) ``--apply`` makes the gateway relay while ``--remove``
leaves nothing of smtpgate's behind."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gatelab import netlab
from gatelab.gatewayproc import GatewayProcess, cli, firewall_leftovers, gateway_config
from gatelab.netlab import (
    GW_MTA_IF,
    GW_PEER_IF,
    GW_PEER_V4,
    GW_PEER_V6,
    MTA_V4,
    MTA_V6,
    PEER_V4,
    PEER_V6,
    Lab,
    Netns,
    Server,
)
from gateway import firewall as fw
from gateway.config import parse

pytestmark = pytest.mark.netns

if (_why := netlab.netns_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)
_tools = ("nft", "iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save")
if (_missing := [t for t in _tools if shutil.which(t) is None]):
    pytest.skip(f"not installed: {', '.join(_missing)}", allow_module_level=True)


def config(*listeners: str) -> str:
    """No limits section; the rest as every lab has it (policy none: pure relays)."""
    return gateway_config(listeners=listeners, max_sessions=None)


def outbound_config(mode: str, port: int = 10025) -> str:
    return config(f"{{address: 0.0.0.0, port: {port}, mode: {mode}}}",
                  f'{{address: "::", port: {port}, mode: {mode}}}')


def inbound_config(client_address: str, mode: str = "redirect") -> str:
    return config(*(f"{{address: {host}, port: 10026, direction: inbound, starttls: passthrough, "
                    f"mode: {mode}, client_address: {client_address}, upstreams: [\"{mta}:25\"]}}"
                    for host, mta in (("0.0.0.0", MTA_V4), ('"::"', f"[{MTA_V6}]"))))


# (id, config, CLI options)
CASES: list[tuple[str, str, list[str]]] = [
    ("outbound-redirect", outbound_config("redirect"), ["--mta-interface", GW_MTA_IF]),
    ("outbound-redirect-networks-local", outbound_config("redirect"),
     ["--mta-interface", GW_MTA_IF, "--mta-interface", "mta1", "--mta-network",
      netlab.MTA_NET_V4, "--mta-network", netlab.MTA_NET_V6, "--mta-network", "192.0.2.0/24",
      "--local-mta"]),
    ("outbound-tproxy", outbound_config("tproxy", 10027), ["--mta-network", netlab.MTA_NET_V4,
                                                           "--mta-network",
                                                           netlab.MTA_NET_V6, "--table",
                                                           "4242"]),
    ("outbound-one-address", config(f"{{address: {netlab.GW_MTA_V4}, port: 10025}}",
                                    f'{{address: "{netlab.GW_MTA_V6}", port: 10027, '
                                    'mode: tproxy}'), ["--mta-interface", GW_MTA_IF]),
    ("inbound-transparent", inbound_config("transparent"), ["--internet-interface", GW_PEER_IF]),
    ("inbound-tproxy-transparent", inbound_config("transparent", "tproxy"),
     ["--internet-interface", GW_PEER_IF]),
    ("inbound-proxy-protocol", inbound_config("proxy-protocol"),
     ["--internet-interface", GW_PEER_IF]),
    ("both-roles-odd-mark", f"""
listeners:
  - {{address: 0.0.0.0, port: 10025, mode: tproxy}}
  - {{address: "::", port: 10025}}
  - {{address: 0.0.0.0, port: 10026, direction: inbound, starttls: passthrough,
      client_address: transparent, upstreams: ["{MTA_V4}:25", "{MTA_V4}:2525"]}}
upstream: {{mark: 0x40000}}
""", ["--mta-interface", GW_MTA_IF, "--internet-interface", GW_PEER_IF]),
]


def generate(config_text: str, args: list[str], fmt: str) -> fw.Ruleset:
    """The same ruleset the CLI makes, built in-process for the direct load checks."""
    values: dict[str, list[str]] = {}
    flags = set()
    it = iter(args)
    for a in it:
        if a == "--local-mta":
            flags.add(a)
        else:
            values.setdefault(a, []).append(next(it))
    config = parse(yaml.safe_load(config_text), "smtpgate.yaml")
    return fw.generate(config, fw.Options(
        format=fw.Format(fmt),
        mta_interfaces=tuple(values.get("--mta-interface", [])),
        mta_networks=fw.parse_networks(values.get("--mta-network", []), "smtpgate.yaml"),
        local_mta="--local-mta" in flags,
        internet_interfaces=tuple(values.get("--internet-interface", [])),
        table=int(values.get("--table", ["100"])[0])))


@contextlib.contextmanager
def namespace() -> Iterator[Netns]:
    ns = Netns("fw")
    try:
        yield ns
    finally:
        ns.delete()


# -- every ruleset loads ------------------------------------------------------------------

@pytest.mark.parametrize(("config_text", "args"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_every_ruleset_loads(config_text: str, args: list[str], tmp_path: Path) -> None:
    table = int(args[args.index("--table") + 1]) if "--table" in args else 100
    path = tmp_path / "smtpgate.yaml"
    path.write_text(config_text)
    with namespace() as ns:
        nft = generate(config_text, args, "nft")
        r = ns.run(["nft", "-c", "-f", "-"], input=nft.nft, check=False)
        assert r.returncode == 0, r.stderr
        ipt = generate(config_text, args, "iptables")
        for tool, body in (("iptables-restore", ipt.iptables),
                           ("ip6tables-restore", ipt.ip6tables)):
            if body:
                r = ns.run([tool, "--test"], input=body, check=False)
                assert r.returncode == 0, f"{tool}: {r.stderr}"
        assert ns.run(["nft", "list", "ruleset"]).stdout.strip() == ""  # -c loaded nothing
        # The printed script runs as it is, and --remove takes away what it loaded.
        for fmt in ("nft", "iptables"):
            out = cli(ns, "firewall", "-c", str(path), "--format", fmt, *args)
            assert out.returncode == 0, out.stderr
            r = ns.run(["sh", "-s"], input=out.stdout, check=False)
            assert r.returncode == 0, r.stderr
            assert firewall_leftovers(ns, table), "the script loaded nothing"
            r = cli(ns, "firewall", "--remove")
            assert r.returncode == 0 and r.stdout.startswith("removed: "), r.stderr
            assert firewall_leftovers(ns, table) == []


def test_remove_and_apply_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "smtpgate.yaml"
    path.write_text(inbound_config("transparent", "tproxy"))
    with namespace() as ns:
        r = cli(ns, "firewall", "--remove")
        assert (r.returncode, r.stdout) == (
            0, "nothing to remove: no smtpgate firewall rules are loaded\n")
        for fmt in ("iptables", "iptables", "nft", "nft"):
            r = cli(ns, "firewall", "-c", str(path), "--format", fmt, "--apply",
                         "--internet-interface", GW_PEER_IF)
            assert r.returncode == 0, r.stderr
        # Applied four times, switching format: one table, one rule and route per family.
        assert ns.run(["nft", "list", "tables"]).stdout.count("inet smtpgate") == 1
        assert all("SMTPGATE" not in ns.run([t]).stdout
                   for t in ("iptables-save", "ip6tables-save"))
        for fam in ("-4", "-6"):
            assert ns.run(["ip", fam, "rule"]).stdout.count("proto 25") == 1
            assert len(ns.run(["ip", fam, "route", "show", "table", "100"]).stdout
                       .splitlines()) == 1
        for _ in range(2):
            assert cli(ns, "firewall", "--remove").returncode == 0
        assert firewall_leftovers(ns) == []


def test_failed_apply_leaves_nothing(tmp_path: Path) -> None:
    """A route already in the table (an operator's own): apply fails and cleans up, and the
    operator's route stays."""
    path = tmp_path / "smtpgate.yaml"
    path.write_text(outbound_config("tproxy", 10027))
    with namespace() as ns:
        ns.ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        r = cli(ns, "firewall", "-c", str(path), "--apply", "--mta-interface", GW_MTA_IF)
        assert r.returncode == 1
        assert r.stderr.startswith("smtpgate: firewall: ip route add local 0.0.0.0/0 dev lo "
                                   "table 100 proto 25: ")
        assert "nothing of smtpgate's is left loaded" in r.stderr
        assert firewall_leftovers(ns) == ["table 100: local default dev lo scope host "]


# -- the lab: apply, relay, remove ------------------------------------------------------------

@contextlib.contextmanager
def servers(ns: Netns, hosts: list[str], banner: bytes) -> Iterator[list[Server]]:
    made = [Server(ns, h, lambda c: c.sendall(banner)) for h in hosts]
    try:
        yield made
    finally:
        for s in made:
            s.close()


def banner_from(ns: Netns, host: str) -> bytes:
    return connect(ns, host)[0]


def connect(ns: Netns, host: str) -> tuple[bytes, str]:
    """The banner read from ``host``:25, and the client's own address."""
    with ns.connect(host, 25) as c:
        c.settimeout(5)
        return c.recv(100), c.getsockname()[0]


def apply_twice(lab: Lab, path: Path, *args: str) -> None:
    for _ in range(2):  # the second replaces the first
        r = cli(lab.gw, "firewall", "-c", str(path), "--apply", *args)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("loaded: ")


def remove_and_check(lab: Lab) -> None:
    r = cli(lab.gw, "firewall", "--remove")
    assert r.returncode == 0, r.stderr
    assert firewall_leftovers(lab.gw) == []
    # Nothing left in the base chains iptables-nft created either.
    for tool in ("iptables-save", "ip6tables-save"):
        assert "-A " not in lab.gw.run([tool]).stdout


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
@pytest.mark.parametrize("fmt", ["nft", "iptables"])
def test_outbound_applied_rules_relay(fmt: str, mode: str, tmp_path: Path) -> None:
    port = 10025 if mode == "redirect" else 10027
    with Lab() as lab:
        gw = GatewayProcess(lab.gw, tmp_path, outbound_config(mode, port))
        apply_twice(lab, gw.config_path, "--format", fmt, "--mta-interface", GW_MTA_IF)
        with gw, servers(lab.peer, [PEER_V4, PEER_V6], b"220 peer\r\n") as (p4, p6):
            assert banner_from(lab.mta, PEER_V4) == b"220 peer\r\n"
            assert banner_from(lab.mta, PEER_V6) == b"220 peer\r\n"
            sessions = gw.wait_sessions(2)
            assert {(s["destination"], s["outcome"]) for s in sessions} == {
                (f"{PEER_V4}:25", "relayed"), (f"[{PEER_V6}]:25", "relayed")}
            assert {s["client"].rsplit(":", 1)[0] for s in sessions} == {MTA_V4, f"[{MTA_V6}]"}
            # The peer was reached by the gateway, not by the MTA.
            assert (p4.addresses, p6.addresses) == ([GW_PEER_V4], [GW_PEER_V6])
            gw.stop()
            remove_and_check(lab)
            # Removed means not intercepted: the MTA now reaches the peer itself.
            assert banner_from(lab.mta, PEER_V4) == b"220 peer\r\n"
            assert banner_from(lab.mta, PEER_V6) == b"220 peer\r\n"
            assert (p4.addresses[-1], p6.addresses[-1]) == (MTA_V4, MTA_V6)


@pytest.mark.parametrize("fmt", ["nft", "iptables"])
def test_inbound_transparent_mta_sees_the_client(fmt: str, tmp_path: Path) -> None:
    with Lab() as lab:
        gw = GatewayProcess(lab.gw, tmp_path, inbound_config("transparent"))
        apply_twice(lab, gw.config_path, "--format", fmt, "--internet-interface", GW_PEER_IF)
        with gw, servers(lab.mta, [MTA_V4, MTA_V6], b"220 legacy mta\r\n") as (m4, m6):
            # (The peer has two addresses per family: the kernel picks the source.)
            banner4, client4 = connect(lab.peer, MTA_V4)
            banner6, client6 = connect(lab.peer, MTA_V6)
            assert banner4 == banner6 == b"220 legacy mta\r\n"
            sessions = gw.wait_sessions(2)
            assert {(s["direction"], s["upstream"], s["outcome"]) for s in sessions} == {
                ("inbound", f"{MTA_V4}:25", "relayed"), ("inbound", f"[{MTA_V6}]:25", "relayed")}
            # The MTA saw the client's own address, not the gateway's.
            assert (m4.addresses, m6.addresses) == ([client4], [client6])
            assert {client4, client6} <= {PEER_V4, netlab.PEER_V4_ALT, PEER_V6,
                                          netlab.PEER_V6_ALT}
            assert {s["client"].rsplit(":", 1)[0] for s in sessions} == {client4,
                                                                         f"[{client6}]"}
            gw.stop()
            remove_and_check(lab)


@pytest.mark.parametrize("fmt", ["nft", "iptables"])
def test_local_mta_output_relays_and_exempts_the_gateway(fmt: str, tmp_path: Path) -> None:
    """The MTA on the gateway's own host (here: a client in gw itself): nat OUTPUT takes its
    connection, and the gateway's own upstream connection, marked, is not taken again (else
    the session would end as refused_loop)."""
    with Lab() as lab:
        gw = GatewayProcess(lab.gw, tmp_path, outbound_config("redirect"))
        apply_twice(lab, gw.config_path, "--format", fmt, "--local-mta")
        with gw, servers(lab.peer, [PEER_V4, PEER_V6], b"220 peer\r\n") as (p4, p6):
            assert banner_from(lab.gw, PEER_V4) == b"220 peer\r\n"
            assert banner_from(lab.gw, PEER_V6) == b"220 peer\r\n"
            sessions = gw.wait_sessions(2)
            assert {(s["destination"], s["outcome"]) for s in sessions} == {
                (f"{PEER_V4}:25", "relayed"), (f"[{PEER_V6}]:25", "relayed")}
            assert (len(p4.clients), len(p6.clients)) == (1, 1)
            gw.stop()
            remove_and_check(lab)

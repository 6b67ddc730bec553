"""``smtpgate firewall``: the generated rules as exact text, the mark bit, the errors, and
apply/remove driven through a fake runner (nothing here touches this host's firewall)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from gateway import firewall as fw
from gateway.cli import main
from gateway.config import Config, parse

MTA = fw.Options(mta_interfaces=("mta0",))


def cfg(text: str) -> Config:
    return parse(yaml.safe_load(text), "smtpgate.yaml")


REDIRECT = cfg("""
listeners:
  - {address: 0.0.0.0, port: 10025}
  - {address: "::", port: 10025}
""")

TPROXY = cfg("""
listeners:
  - {address: 0.0.0.0, port: 10027, mode: tproxy}
  - {address: "::", port: 10027, mode: tproxy}
""")


def inbound(client_address: str, mode: str = "redirect") -> Config:
    return cfg(f"""
listeners:
  - {{address: 0.0.0.0, port: 10026, direction: inbound, starttls: passthrough, mode: {mode},
      client_address: {client_address}, upstreams: ["198.51.100.2:25", "198.51.100.3:2525"]}}
  - {{address: "::", port: 10026, direction: inbound, starttls: passthrough, mode: {mode},
      client_address: {client_address}, upstreams: ["[2001:db8:1::2]:25"]}}
""")


# -- exact text -------------------------------------------------------------------------

def test_outbound_redirect_v4_v6_nft_script() -> None:
    assert fw.generate(REDIRECT, MTA).text() == """\
#!/bin/sh
# smtpgate firewall for smtpgate.yaml (format nft)
# Made by `smtpgate firewall`; `--apply` loads these rules (replacing earlier
# smtpgate rules), `--remove` removes them. This script assumes none are loaded.
#
# listeners[0] outbound 0.0.0.0:10025 (redirect): TCP port 25 from interface mta0
# listeners[1] outbound [::]:10025 (redirect): TCP port 25 from interface mta0
# upstream.mark 0x2525: the gateway's own connections are never intercepted
#
# sysctls that matter (not set by this command):
#   net.ipv4.ip_forward=1            when this host routes between the MTA and the internet
#   net.ipv6.conf.all.forwarding=1   the same for IPv6
#   net.ipv4.tcp_fwmark_accept=1     an accepted socket keeps its SYN's mark: a connection carrying
#                                    upstream.mark (0x2525) is refused as a loop (IPv4 and IPv6)

set -e
nft -f - <<'EOF'
table inet smtpgate
delete table inet smtpgate
table inet smtpgate {
\tchain nat_prerouting {
\t\ttype nat hook prerouting priority dstnat - 5; policy accept;
\t\tmeta mark 0x2525 return
\t\tiifname "mta0" meta nfproto ipv4 tcp dport 25 redirect to :10025
\t\tiifname "mta0" meta nfproto ipv6 tcp dport 25 redirect to :10025
\t}
}
EOF
"""


def test_outbound_redirect_iptables_script() -> None:
    rules = fw.generate(REDIRECT, fw.Options(format=fw.Format.IPTABLES,
                                             mta_interfaces=("mta0",)))
    body = """\
*nat
:SMTPGATE-PREROUTING - [0:0]
-I PREROUTING 1 -p tcp -j SMTPGATE-PREROUTING
-A SMTPGATE-PREROUTING -m mark --mark 0x2525 -j RETURN
-A SMTPGATE-PREROUTING -i mta0 -p tcp --dport 25 -j REDIRECT --to-ports 10025
COMMIT
"""
    assert rules.iptables == rules.ip6tables == body
    assert rules.routing == () and rules.bit is None
    text = rules.text()
    assert text.startswith("#!/bin/sh\n# smtpgate firewall for smtpgate.yaml (format iptables)\n")
    assert text.endswith("\nset -e\n"
                         f"iptables-restore --noflush <<'EOF'\n{body}EOF\n"
                         f"ip6tables-restore --noflush <<'EOF'\n{body}EOF\n")


def test_outbound_by_networks_and_interfaces() -> None:
    """Interfaces times networks; a family without a network of its own is not taken."""
    opts = fw.Options(format=fw.Format.IPTABLES, mta_interfaces=("mta0", "mta1"),
                      mta_networks=fw.parse_networks(["198.51.100.7/24", "192.0.2.0/24"], "x"))
    rules = fw.generate(REDIRECT, opts)
    assert rules.iptables.splitlines()[4:8] == [
        "-A SMTPGATE-PREROUTING -i mta0 -s 198.51.100.0/24 -p tcp --dport 25 -j REDIRECT "
        "--to-ports 10025",
        "-A SMTPGATE-PREROUTING -i mta0 -s 192.0.2.0/24 -p tcp --dport 25 -j REDIRECT "
        "--to-ports 10025",
        "-A SMTPGATE-PREROUTING -i mta1 -s 198.51.100.0/24 -p tcp --dport 25 -j REDIRECT "
        "--to-ports 10025",
        "-A SMTPGATE-PREROUTING -i mta1 -s 192.0.2.0/24 -p tcp --dport 25 -j REDIRECT "
        "--to-ports 10025",
    ]
    assert rules.ip6tables == ""
    assert ("listeners[1] outbound [::]:10025 (redirect): not intercepted (no IPv6 "
            "--mta-network)") in rules.notes
    assert ('\t\tiifname { "mta0", "mta1" } ip saddr { 198.51.100.0/24, 192.0.2.0/24 } '
            'tcp dport 25 redirect to :10025\n') in rules.nft
    assert "ipv6" not in rules.nft


def test_outbound_tproxy() -> None:
    rules = fw.generate(TPROXY, MTA)
    assert rules.nft == """\
table inet smtpgate
delete table inet smtpgate
table inet smtpgate {
\tchain mangle_prerouting {
\t\ttype filter hook prerouting priority mangle - 5; policy accept;
\t\tmeta mark 0x2525 return
\t\tiifname "mta0" meta nfproto ipv4 tcp dport 25 tproxy ip to :10027 meta mark set meta mark | 0x40000 accept
\t\tiifname "mta0" meta nfproto ipv6 tcp dport 25 tproxy ip6 to :10027 meta mark set meta mark | 0x40000 accept
\t}
}
"""  # noqa: E501
    assert rules.iptables == """\
*mangle
:SMTPGATE-PREROUTING - [0:0]
-I PREROUTING 1 -p tcp -j SMTPGATE-PREROUTING
-A SMTPGATE-PREROUTING -m mark --mark 0x2525 -j RETURN
-A SMTPGATE-PREROUTING -i mta0 -p tcp --dport 25 -j TPROXY --on-port 10027 --tproxy-mark 0x40000/0x40000
COMMIT
"""  # noqa: E501
    assert rules.ip6tables == rules.iptables
    assert [" ".join(a) for a in rules.routing] == [
        "ip rule add fwmark 0x40000/0x40000 lookup 100 protocol 25",
        "ip route add local 0.0.0.0/0 dev lo table 100 proto 25",
        "ip -6 rule add fwmark 0x40000/0x40000 lookup 100 protocol 25",
        "ip -6 route add local ::/0 dev lo table 100 proto 25",
    ]
    assert rules.text().endswith("EOF\n" + "".join(" ".join(a) + "\n" for a in rules.routing))
    assert "TPROXY/transparent mark bit 0x40000 (clear of upstream.mark), routing table 100" \
        in rules.notes


def test_listener_bound_to_one_address_gets_dnat_and_on_ip() -> None:
    c = cfg("""
listeners:
  - {address: 198.51.100.1, port: 10025}
  - {address: "2001:db8:1::1", port: 10027, mode: tproxy}
""")
    rules = fw.generate(c, fw.Options(mta_interfaces=("mta0",), table=200))
    assert 'iifname "mta0" meta nfproto ipv4 tcp dport 25 dnat ip to 198.51.100.1:10025' \
        in rules.nft
    assert ('iifname "mta0" meta nfproto ipv6 tcp dport 25 tproxy ip6 to [2001:db8:1::1]:10027 '
            "meta mark set meta mark | 0x40000 accept") in rules.nft
    assert "-j DNAT --to-destination 198.51.100.1:10025" in rules.iptables
    assert "-j TPROXY --on-port 10027 --on-ip 2001:db8:1::1 --tproxy-mark 0x40000/0x40000" \
        in rules.ip6tables
    assert rules.routing == (
        ("ip", "-6", "rule", "add", "fwmark", "0x40000/0x40000", "lookup", "200",
         "protocol", "25"),
        ("ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "200",
         "proto", "25"))


def test_local_mta_output() -> None:
    rules = fw.generate(REDIRECT, fw.Options(local_mta=True, format=fw.Format.IPTABLES))
    assert rules.iptables == """\
*nat
:SMTPGATE-OUTPUT - [0:0]
-I OUTPUT 1 -p tcp -j SMTPGATE-OUTPUT
-A SMTPGATE-OUTPUT -m mark --mark 0x2525 -j RETURN
-A SMTPGATE-OUTPUT -m addrtype --dst-type LOCAL -j RETURN
-A SMTPGATE-OUTPUT -p tcp --dport 25 -j REDIRECT --to-ports 10025
COMMIT
"""
    assert rules.nft.endswith("""\
\tchain nat_output {
\t\ttype nat hook output priority -105; policy accept;
\t\tmeta mark 0x2525 return
\t\tfib daddr type local return
\t\tmeta nfproto ipv4 tcp dport 25 redirect to :10025
\t\tmeta nfproto ipv6 tcp dport 25 redirect to :10025
\t}
}
""")
    # No forwarding on the MTA's own host; the loop check still matters.
    assert [s.split()[0] for s in rules.sysctls] == ["net.ipv4.tcp_fwmark_accept=1",
                                                      "upstream.mark"]


def test_inbound_transparent() -> None:
    rules = fw.generate(inbound("transparent"), fw.Options(internet_interfaces=("peer0",)))
    assert rules.nft == """\
table inet smtpgate
delete table inet smtpgate
table inet smtpgate {
\tchain mangle_prerouting {
\t\ttype filter hook prerouting priority mangle - 5; policy accept;
\t\tmeta mark 0x2525 return
\t\tip saddr 198.51.100.2 tcp sport 25 socket transparent 1 meta mark set meta mark | 0x40000
\t\tip saddr 198.51.100.3 tcp sport 2525 socket transparent 1 meta mark set meta mark | 0x40000
\t\tip6 saddr 2001:db8:1::2 tcp sport 25 socket transparent 1 meta mark set meta mark | 0x40000
\t}

\tchain nat_prerouting {
\t\ttype nat hook prerouting priority dstnat - 5; policy accept;
\t\tmeta mark 0x2525 return
\t\tiifname "peer0" meta nfproto ipv4 tcp dport 25 redirect to :10026
\t\tiifname "peer0" meta nfproto ipv6 tcp dport 25 redirect to :10026
\t}
}
"""
    assert rules.iptables == """\
*mangle
:SMTPGATE-PREROUTING - [0:0]
-I PREROUTING 1 -p tcp -j SMTPGATE-PREROUTING
-A SMTPGATE-PREROUTING -m mark --mark 0x2525 -j RETURN
-A SMTPGATE-PREROUTING -s 198.51.100.2/32 -p tcp --sport 25 -m socket --transparent -j MARK --set-mark 0x40000/0x40000
-A SMTPGATE-PREROUTING -s 198.51.100.3/32 -p tcp --sport 2525 -m socket --transparent -j MARK --set-mark 0x40000/0x40000
COMMIT
*nat
:SMTPGATE-PREROUTING - [0:0]
-I PREROUTING 1 -p tcp -j SMTPGATE-PREROUTING
-A SMTPGATE-PREROUTING -m mark --mark 0x2525 -j RETURN
-A SMTPGATE-PREROUTING -i peer0 -p tcp --dport 25 -j REDIRECT --to-ports 10026
COMMIT
"""  # noqa: E501
    assert "-s 2001:db8:1::2/128 -p tcp --sport 25 -m socket --transparent" in rules.ip6tables
    assert [" ".join(a) for a in rules.routing] == [
        "ip rule add fwmark 0x40000/0x40000 lookup 100 protocol 25",
        "ip route add local 0.0.0.0/0 dev lo table 100 proto 25",
        "ip -6 rule add fwmark 0x40000/0x40000 lookup 100 protocol 25",
        "ip -6 route add local ::/0 dev lo table 100 proto 25",
    ]


def test_inbound_tproxy_shares_bit_and_table() -> None:
    rules = fw.generate(inbound("transparent", "tproxy"),
                        fw.Options(internet_interfaces=("peer0",)))
    assert ('iifname "peer0" meta nfproto ipv4 tcp dport 25 tproxy ip to :10026 '
            "meta mark set meta mark | 0x40000 accept") in rules.nft
    assert "nat_prerouting" not in rules.nft
    assert len(rules.routing) == 4


@pytest.mark.parametrize("client_address", ["proxy-protocol", "none"])
def test_inbound_without_transparent_needs_no_routing(client_address: str) -> None:
    rules = fw.generate(inbound(client_address), fw.Options(internet_interfaces=("peer0",),
                                                            format=fw.Format.IPTABLES))
    assert rules.routing == () and rules.bit is None
    assert "socket" not in rules.nft and "mangle" not in rules.nft
    assert rules.iptables == """\
*nat
:SMTPGATE-PREROUTING - [0:0]
-I PREROUTING 1 -p tcp -j SMTPGATE-PREROUTING
-A SMTPGATE-PREROUTING -m mark --mark 0x2525 -j RETURN
-A SMTPGATE-PREROUTING -i peer0 -p tcp --dport 25 -j REDIRECT --to-ports 10026
COMMIT
"""
    assert "ip rule" not in rules.text()


def test_both_roles_on_one_host() -> None:
    c = cfg("""
listeners:
  - {address: 0.0.0.0, port: 10025}
  - {address: 0.0.0.0, port: 10026, direction: inbound, starttls: passthrough,
     upstreams: ["198.51.100.2:25"]}
""")
    rules = fw.generate(c, fw.Options(mta_interfaces=("eth1",), internet_interfaces=("eth0",)))
    assert rules.nft.splitlines()[6:8] == [
        '\t\tiifname "eth1" meta nfproto ipv4 tcp dport 25 redirect to :10025',
        '\t\tiifname "eth0" meta nfproto ipv4 tcp dport 25 redirect to :10026']


def test_upstream_mark_zero_has_no_exemption_rule() -> None:
    c = cfg("listeners: [{address: 0.0.0.0, port: 10025}]\nupstream: {mark: 0}\n")
    rules = fw.generate(c, MTA)
    assert "meta mark" not in rules.nft and "--mark" not in rules.iptables
    assert "upstream.mark 0: the gateway's connections carry no mark to exempt" in rules.notes
    assert not any("tcp_fwmark_accept" in s for s in rules.sysctls)


# -- the mark bit -----------------------------------------------------------------------

def test_mark_bit_prefers_0x40000() -> None:
    assert fw.mark_bit(0x2525) == 0x40000
    assert fw.mark_bit(0) == 0x40000
    assert fw.mark_bit(0x40000) == 0x80000
    assert fw.mark_bit(0xFFFC0000) == 0x20000  # bits 18-31 taken: the nearest below
    assert fw.mark_bit(0xFFFFFFFE) == 1


def test_mark_bit_never_overlaps_upstream_mark() -> None:
    rng = random.Random(25)
    marks = [0, 0x2525, 0xFFFFFFFE, 0x7FFFFFFF, *(1 << n for n in range(32)),
             *((1 << 32) - 1 - (1 << n) for n in range(32)),
             *(rng.getrandbits(32) for _ in range(5000))]
    for mark in marks:
        if mark == 0xFFFFFFFF:
            continue
        bit = fw.mark_bit(mark)
        assert bit & mark == 0 and bit & (bit - 1) == 0 and 0 < bit < 2**32, hex(mark)


@pytest.mark.parametrize("mark", [0x40000, 0x4C0000, 0xFFFBFFFF, 0x7FFFFFFF])
def test_generated_rules_use_a_bit_clear_of_upstream_mark(mark: int) -> None:
    c = cfg(f"""
listeners:
  - {{address: 0.0.0.0, port: 10027, mode: tproxy}}
upstream: {{mark: {mark}}}
""")
    rules = fw.generate(c, MTA)
    assert rules.bit is not None and rules.bit & mark == 0
    assert f"--tproxy-mark {rules.bit:#x}/{rules.bit:#x}" in rules.iptables
    assert f"meta mark set meta mark | {rules.bit:#x} accept" in rules.nft
    assert rules.routing[0][3:5] == ("fwmark", f"{rules.bit:#x}/{rules.bit:#x}")
    assert f"-m mark --mark {mark:#x} -j RETURN" in rules.iptables


def test_mark_with_every_bit_is_an_error_only_when_a_bit_is_needed() -> None:
    c = cfg("listeners: [{address: 0.0.0.0, port: 10027, mode: tproxy}]\n"
            "upstream: {mark: 0xffffffff}\n")
    with pytest.raises(fw.FirewallError) as err:
        fw.generate(c, MTA)
    assert str(err.value) == ("smtpgate.yaml: upstream.mark: 0xffffffff uses every mark bit: "
                              "none is left for TPROXY / transparent routing")
    c = cfg("listeners: [{address: 0.0.0.0, port: 10025}]\nupstream: {mark: 0xffffffff}\n")
    assert fw.generate(c, MTA).bit is None


# -- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "options", "message"), [
    ("listeners: [{address: 0.0.0.0, port: 10025}, {address: 0.0.0.0, port: 10028}]", MTA,
     "listeners[1]: a second outbound IPv4 listener: the firewall sends every intercepted "
     "IPv4 connection to listeners[0]"),
    ("listeners: [{address: 0.0.0.0, port: 10025}]", fw.Options(),
     "listeners[0]: outbound: say where the MTA's connections come from: --mta-interface, "
     "--mta-network or --local-mta"),
    ("listeners: [{address: 0.0.0.0, port: 10027, mode: tproxy}]", fw.Options(local_mta=True),
     "listeners[0].mode: tproxy cannot take this host's own connections (--local-mta): use "
     "mode redirect"),
    ("listeners: [{address: 127.0.0.1, port: 10025}]", MTA,
     'listeners[0].address: a loopback address cannot receive connections redirected from '
     'another interface: bind 0.0.0.0 or "::"'),
    ("listeners: [{address: 0.0.0.0, port: 10025}]\nupstream: {mark: 0}",
     fw.Options(local_mta=True),
     "upstream.mark: 0 leaves the gateway's own connections unmarked: --local-mta needs a "
     "mark to exempt them from interception"),
    ("listeners: [{address: 0.0.0.0, port: 10026, direction: inbound, starttls: passthrough, "
     "upstreams: ['198.51.100.2:25']}]", MTA,
     "listeners[0]: inbound: say where the internet's connections arrive: "
     "--internet-interface"),
    ("listeners: [{address: 0.0.0.0, port: 10025}]",
     fw.Options(mta_interfaces=("mta0",), internet_interfaces=("eth0",)),
     "--internet-interface: no inbound listener in the config"),
    ("listeners: [{address: 0.0.0.0, port: 10025}]",
     fw.Options(mta_interfaces=('eth0"; drop',)),
     "--mta-interface: not an interface name: 'eth0\"; drop'"),
    ("listeners: [{address: 0.0.0.0, port: 10025}]",
     fw.Options(mta_interfaces=("a-very-long-interface",)),
     "--mta-interface: not an interface name: 'a-very-long-interface'"),
    ("listeners: [{address: 0.0.0.0, port: 10025}]",
     fw.Options(mta_interfaces=("eth0",), internet_interfaces=("eth0",)),
     "--internet-interface: eth0 is also an --mta-interface"),
    ("listeners: [{address: 0.0.0.0, port: 10025}]", fw.Options(mta_interfaces=("e",),
                                                                table=254),
     "--table: 254 is not usable (main): use 1-252 or 256-4294967295"),
    ("listeners: [{address: 0.0.0.0, port: 10025}]", fw.Options(mta_interfaces=("e",),
                                                                table=0),
     "--table: 0 is not usable (unspec): use 1-252 or 256-4294967295"),
])
def test_errors_name_the_key_path(text: str, options: fw.Options, message: str) -> None:
    with pytest.raises(fw.FirewallError) as err:
        fw.generate(cfg(text), options)
    assert str(err.value) == f"smtpgate.yaml: {message}"


def test_transparent_upstream_of_the_other_family() -> None:
    """The config refuses this too; the generator does not rely on it (a Config built in
    code)."""
    good = inbound("transparent")
    mixed = dataclasses.replace(good.listeners[0], upstreams=(
        good.listeners[0].upstreams[0], good.listeners[1].upstreams[0]))
    c = dataclasses.replace(good, listeners=(mixed,))
    with pytest.raises(fw.FirewallError) as err:
        fw.generate(c, fw.Options(internet_interfaces=("eth0",)))
    assert str(err.value) == ("smtpgate.yaml: listeners[0].upstreams[1]: client_address "
                              "transparent needs upstreams of the listener's address family "
                              "(IPv4)")


def test_bad_network_names_the_option() -> None:
    with pytest.raises(fw.FirewallError) as err:
        fw.parse_networks(["198.51.100.0/24", "mta-net"], "smtpgate.yaml")
    assert str(err.value) == "smtpgate.yaml: --mta-network: not an IP network: 'mta-net'"


# -- removal parsing ---------------------------------------------------------------------

SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Sat Nov 28 20:52:02 2026
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:SMTPGATE-PREROUTING - [0:0]
:DIVERT - [0:0]
-A PREROUTING -p tcp -m socket -j DIVERT
-A PREROUTING -p tcp -j SMTPGATE-PREROUTING
-A SMTPGATE-PREROUTING -m mark --mark 0x2525 -j RETURN
-A DIVERT -j ACCEPT
COMMIT
# Completed on Sat Nov 28 20:52:02 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 10025 -m comment --comment "to SMTPGATE-X, not a jump" -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:SMTPGATE-OUTPUT - [0:0]
:SMTPGATE-PREROUTING - [0:0]
-A PREROUTING -i eth0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.0.2:80
-A PREROUTING -p tcp -j SMTPGATE-PREROUTING
-A OUTPUT -p tcp -j SMTPGATE-OUTPUT
-A SMTPGATE-OUTPUT -m mark --mark 0x2525 -j RETURN
-A SMTPGATE-PREROUTING -i mta0 -p tcp -m tcp --dport 25 -j REDIRECT --to-ports 10025
COMMIT
"""


def test_iptables_removal_deletes_jumps_then_chains_and_nothing_else() -> None:
    assert fw.iptables_removal(SAVE) == """\
*mangle
-D PREROUTING -p tcp -j SMTPGATE-PREROUTING
-F SMTPGATE-PREROUTING
-X SMTPGATE-PREROUTING
COMMIT
*nat
-D PREROUTING -p tcp -j SMTPGATE-PREROUTING
-D OUTPUT -p tcp -j SMTPGATE-OUTPUT
-F SMTPGATE-OUTPUT
-F SMTPGATE-PREROUTING
-X SMTPGATE-OUTPUT
-X SMTPGATE-PREROUTING
COMMIT
"""
    assert fw.iptables_removal("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") == ""
    assert fw.iptables_removal("") == ""


def test_routing_removal_only_takes_our_protocol() -> None:
    rules = ("0:\tfrom all lookup local\n"
             "32764:\tfrom all fwmark 0x40000/0x40000 lookup 100\n"
             "32765:\tfrom all fwmark 0x80000/0x80000 lookup 200 proto 25\n"
             "32766:\tfrom all lookup main\n")
    routes = "local default dev lo table 200 scope host \n"
    assert fw.routing_removal(rules, routes, 4) == [
        ("ip", "-4", "rule", "del", "priority", "32765", "fwmark", "0x80000/0x80000",
         "lookup", "200", "protocol", "25"),
        ("ip", "-4", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", "200",
         "proto", "25"),
    ]
    assert fw.routing_removal("", "local default dev lo table 100 metric 1024 pref medium\n",
                              6) == [("ip", "-6", "route", "del", "local", "::/0", "dev", "lo",
                                      "table", "100", "proto", "25")]


# -- apply / remove through a fake runner -------------------------------------------------

class FakeHost:
    """Answers the listing commands; records the rest."""

    def __init__(self, *, missing: Sequence[str] = (), fail: str = "",
                 nft_table: bool = False, save: str = "", rules: str = "",
                 routes: str = "") -> None:
        self.missing, self.fail = set(missing), fail
        self.nft_table, self.save, self.rules, self.routes = nft_table, save, rules, routes
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, argv: Sequence[str], stdin: str | None) -> fw.Result:
        line = " ".join(argv)
        self.calls.append((line, stdin))
        if argv[0] in self.missing:
            return fw.Result(fw.MISSING, "", "not installed")
        if self.fail and line.startswith(self.fail):
            return fw.Result(1, "", "Error: something broke")
        if line == "nft list table inet smtpgate":
            return fw.Result(0 if self.nft_table else 1)
        if line in ("iptables-save", "ip6tables-save"):
            return fw.Result(0, self.save if line == "iptables-save" else "")
        if line.endswith("rule show"):
            return fw.Result(0, self.rules if "-4" in argv else "")
        if "route show" in line:
            return fw.Result(0, self.routes if "-4" in argv else "")
        return fw.Result(0)

    def changes(self) -> list[str]:
        return [c for c, _ in self.calls if not any(
            k in c for k in ("list table", "-save", "rule show", "route show"))]


def test_remove_with_nothing_there_is_quiet() -> None:
    host = FakeHost(missing=["iptables-save", "ip6tables-save"])
    assert fw.remove(host) == []
    assert host.changes() == []


def test_remove_takes_everything_tagged() -> None:
    host = FakeHost(nft_table=True, save=SAVE,
                    rules="32765:\tfrom all fwmark 0x40000/0x40000 lookup 100 proto 25\n",
                    routes="local default dev lo table 100 scope host\n")
    removed = fw.remove(host)
    assert removed == [
        "nft table inet smtpgate",
        "iptables chains mangle/SMTPGATE-PREROUTING, nat/SMTPGATE-OUTPUT, "
        "nat/SMTPGATE-PREROUTING",
        "ip -4 rule del priority 32765 fwmark 0x40000/0x40000 lookup 100 protocol 25",
        "ip -4 route del local 0.0.0.0/0 dev lo table 100 proto 25",
    ]
    assert ("nft -f -", fw.nft_removal()) in host.calls
    assert ("iptables-restore --noflush", fw.iptables_removal(SAVE)) in host.calls


def test_apply_replaces_then_loads_in_the_chosen_format() -> None:
    rules = fw.generate(TPROXY, fw.Options(format=fw.Format.IPTABLES, mta_interfaces=("m",)))
    host = FakeHost(nft_table=True)
    loaded = fw.apply(rules, host)
    assert host.changes() == [
        "nft -f -",  # the old nft table goes first
        "iptables-restore --noflush", "ip6tables-restore --noflush",
        *(" ".join(a) for a in rules.routing)]
    assert loaded[:2] == ["iptables chains mangle/SMTPGATE-PREROUTING",
                          "ip6tables chains mangle/SMTPGATE-PREROUTING"]
    assert ("iptables-restore --noflush", rules.iptables) in host.calls


def test_apply_failure_removes_what_it_loaded() -> None:
    rules = fw.generate(TPROXY, MTA)
    host = FakeHost(fail="ip -6 route add")
    with pytest.raises(fw.ApplyError) as err:
        fw.apply(rules, host)
    assert str(err.value) == ("ip -6 route add local ::/0 dev lo table 100 proto 25: "
                              "Error: something broke")
    # After the failure, a second removal pass ran (listing everything again).
    listings = [c for c, _ in host.calls if c == "nft list table inet smtpgate"]
    assert len(listings) == 2


# -- the command line (printing only: nothing is applied here) -----------------------------

def test_cli_prints_the_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "smtpgate.yaml"
    path.write_text("listeners: [{address: 0.0.0.0, port: 10025}, "
                    "{address: '::', port: 10025}]\n")
    assert main(["firewall", "-c", str(path), "--mta-interface", "mta0"]) == 0
    out = capsys.readouterr().out
    config = parse(yaml.safe_load(path.read_text()), str(path))
    assert out == fw.generate(config, MTA).text()
    assert out.splitlines()[1] == f"# smtpgate firewall for {path} (format nft)"
    assert main(["firewall", "-c", str(path), "--format", "iptables", "--mta-network",
                 "198.51.100.0/24"]) == 0
    assert "-A SMTPGATE-PREROUTING -s 198.51.100.0/24 -p tcp --dport 25" \
        in capsys.readouterr().out


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "smtpgate.yaml"
    path.write_text("listeners: [{address: 0.0.0.0, port: 10025}]\n")
    assert main(["firewall", "-c", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"smtpgate: {path}: listeners[0]: outbound: say where the MTA's connections come "
        "from: --mta-interface, --mta-network or --local-mta\n")
    assert main(["firewall", "-c", str(path), "--mta-network", "nope"]) == 2
    assert capsys.readouterr().err == f"smtpgate: {path}: --mta-network: not an IP network: " \
                                      "'nope'\n"
    assert main(["firewall", "-c", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(SystemExit) as exit_:
        main(["firewall", "-c", str(path), "--apply", "--remove"])
    assert exit_.value.code == 2


CLIENT_SOURCE = cfg("""
listeners:
  - {address: 0.0.0.0, port: 10025, source_address: client}
  - {address: "::", port: 10025, mode: tproxy, source_address: client}
""")


def test_outbound_client_source_takes_the_peers_replies_to_the_mta() -> None:
    """Replies from any peer's port 25 to a transparent socket (bound to the MTA's address)
    are marked and routed locally, per family; the interception itself is unchanged."""
    rules = fw.generate(CLIENT_SOURCE, MTA)
    assert ("meta nfproto ipv4 tcp sport 25 socket transparent 1 "
            "meta mark set meta mark | 0x40000") in rules.nft
    assert ("meta nfproto ipv6 tcp sport 25 socket transparent 1 "
            "meta mark set meta mark | 0x40000") in rules.nft
    assert 'iifname "mta0" meta nfproto ipv4 tcp dport 25 redirect to :10025' in rules.nft
    assert ("-A SMTPGATE-PREROUTING -p tcp --sport 25 -m socket --transparent "
            "-j MARK --set-mark 0x40000/0x40000") in rules.iptables
    assert "--sport 25 -m socket --transparent" in rules.ip6tables
    assert [" ".join(a) for a in rules.routing] == [
        "ip rule add fwmark 0x40000/0x40000 lookup 100 protocol 25",
        "ip route add local 0.0.0.0/0 dev lo table 100 proto 25",
        "ip -6 rule add fwmark 0x40000/0x40000 lookup 100 protocol 25",
        "ip -6 route add local ::/0 dev lo table 100 proto 25",
    ]
    assert any("listeners[0].source_address client: replies from port 25" in n
               for n in rules.notes)
    gateway_source = fw.generate(REDIRECT, MTA)
    assert "socket transparent" not in gateway_source.nft and gateway_source.routing == ()


def test_client_source_for_a_local_mta_needs_no_return_path() -> None:
    local = cfg("listeners: [{address: 0.0.0.0, port: 10025, source_address: client}]\n")
    rules = fw.generate(local, fw.Options(local_mta=True))
    assert rules.transparent == () and rules.routing == ()


def test_a_host_that_does_not_forward_is_not_on_the_return_path() -> None:
    rules = fw.generate(CLIENT_SOURCE, MTA)
    forwarding = {"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "1"}
    [problem] = fw.return_path_problems(rules, forwarding.get)
    assert problem.startswith("listeners[0].source_address: this host does not forward IPv4 "
                              "(net.ipv4.ip_forward = 0)"), problem
    assert fw.return_path_problems(rules, {"net/ipv4/ip_forward": "1",
                                           "net/ipv6/conf/all/forwarding": "1"}.get) == []
    assert fw.return_path_problems(fw.generate(inbound("transparent"),
                                               fw.Options(internet_interfaces=("peer0",))),
                                   forwarding.get) == []  # inbound: the MTA's replies differ

"""The DNS lab itself: NSD with signed lab zones, Unbound validating, seen from gw.

Every assertion is on what a validating resolver answers on 127.0.0.1 in the resolver
namespace (rcode, AD bit, data): the statuses gateway/dns.py will derive.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import dns.rdatatype
import pytest

from gatelab.dnslab import (
    DNS_V4,
    DNS_V6,
    DnsWorld,
    dnslab_usable,
    ptr_name,
    reverse_zone,
)
from gatelab.netlab import NETNS_RUN_DIR, PEER_V4, PEER_V6, Lab, netns_usable

pytestmark = pytest.mark.netns

TLSA = "3 1 1 " + "0123456789abcdef" * 4
TEST_RECORDS = [
    "mx.b A 203.0.113.2",
    "     AAAA 2001:db8:2::2",
    "b MX 10 mx.b",
    f"_25._tcp.mx.b TLSA {TLSA}",
    "alias CNAME mx.b",
]


@pytest.fixture(scope="module")
def dns_ok() -> None:
    reason = netns_usable() or dnslab_usable()
    if reason:
        pytest.skip(reason)


def _declare(world: DnsWorld) -> None:
    world.zone("test.", TEST_RECORDS)
    world.zone(reverse_zone("203.0.113.0/24"), ["2 PTR mx.b.test."])
    world.zone(reverse_zone("2001:db8:2::/64"), [f"{ptr_name(PEER_V6)} PTR mx.b.test."])
    world.zone("insec.test.", ["www A 203.0.113.3"], delegate_secure=False)
    world.zone("plain.test.", ["www A 203.0.113.4"], signed=False)
    world.zone("bogus.test.", ["www A 203.0.113.5"])
    world.zone("gone.test.", ["www A 203.0.113.6"])
    world.zone("upd.test.", ["www A 203.0.113.7"])


@pytest.fixture(scope="module")
def world(dns_ok: None) -> Iterator[DnsWorld]:
    with Lab() as lab, DnsWorld.on_lab(lab) as world:
        _declare(world)
        world.start()
        yield world


def test_signed_answers_are_authenticated(world: DnsWorld) -> None:
    assert world.query("mx.b.test.", "A") == ("NOERROR", True, ["203.0.113.2"])
    assert world.query("mx.b.test", "AAAA") == ("NOERROR", True, ["2001:db8:2::2"])
    assert world.query("b.test.", "MX") == ("NOERROR", True, ["10 mx.b.test."])
    assert world.query("_25._tcp.mx.b.test.", "TLSA") == ("NOERROR", True, [TLSA])
    assert world.query("alias.test.", "A") == ("NOERROR", True, ["203.0.113.2"])


def test_authoritative_server_serves_signatures(world: DnsWorld) -> None:
    msg = world.query_message("_25._tcp.mx.b.test.", "TLSA", server=DNS_V4)
    assert {rrset.rdtype for rrset in msg.answer} == {
        dns.rdatatype.TLSA,
        dns.rdatatype.RRSIG,
    }
    msg6 = world.query_message(".", "DNSKEY", server=DNS_V6)
    assert any(rrset.rdtype == dns.rdatatype.DNSKEY for rrset in msg6.answer)


def test_reverse_zones_are_secure(world: DnsWorld) -> None:
    assert ptr_name(PEER_V4) == "2.113.0.203.in-addr.arpa."
    assert world.query(ptr_name(PEER_V4), "PTR") == ("NOERROR", True, ["mx.b.test."])
    assert world.query(ptr_name(PEER_V6), "PTR") == ("NOERROR", True, ["mx.b.test."])
    # No PTR for .3: a proven denial, not a failure.
    assert world.query(ptr_name("203.0.113.3"), "PTR") == ("NXDOMAIN", True, [])


def test_denials_in_signed_zone_are_authenticated(world: DnsWorld) -> None:
    assert world.query("nope.test.", "A") == ("NXDOMAIN", True, [])
    # NODATA: the name exists, no TLSA there.
    assert world.query("mx.b.test.", "TLSA") == ("NOERROR", True, [])
    # A documentation-range name outside every declared zone: secure NXDOMAIN from
    # the lab root, not Unbound's built-in local answer.
    assert world.query(ptr_name("192.0.2.1"), "PTR") == ("NXDOMAIN", True, [])


def test_delegation_without_ds_is_insecure(world: DnsWorld) -> None:
    # Signed child, no DS in the parent; unsigned child: data without AD.
    assert world.query("www.insec.test.", "A") == ("NOERROR", False, ["203.0.113.3"])
    assert world.query("www.plain.test.", "A") == ("NOERROR", False, ["203.0.113.4"])


def test_expired_signatures_are_bogus(world: DnsWorld) -> None:
    assert world.query("www.bogus.test.", "A") == ("NOERROR", True, ["203.0.113.5"])
    world.make_bogus("bogus.test.")
    try:
        assert world.query("www.bogus.test.", "A") == ("SERVFAIL", False, [])
        # Checking Disabled: the (unvalidated) data comes back, never with AD.
        assert world.query("www.bogus.test.", "A", cd=True) == ("NOERROR", False, ["203.0.113.5"])
        # The parent is untouched.
        assert world.query("mx.b.test.", "A").ad
    finally:
        world.make_secure("bogus.test.")
    assert world.query("www.bogus.test.", "A") == ("NOERROR", True, ["203.0.113.5"])


def test_make_insecure_removes_the_ds(world: DnsWorld) -> None:
    assert world.query("www.gone.test.", "A") == ("NOERROR", True, ["203.0.113.6"])
    assert world.query("gone.test.", "DS").ad
    world.make_insecure("gone.test.")
    assert world.query("gone.test.", "DS") == ("NOERROR", True, [])  # proven absent
    assert world.query("www.gone.test.", "A") == ("NOERROR", False, ["203.0.113.6"])


def test_update_changes_the_answer(world: DnsWorld) -> None:
    assert world.query("www.upd.test.", "A") == ("NOERROR", True, ["203.0.113.7"])
    assert world.query("new.upd.test.", "A") == ("NXDOMAIN", True, [])  # now cached
    world.update("upd.test.", ["www A 203.0.113.8", "new A 203.0.113.9"])
    assert world.query("www.upd.test.", "A") == ("NOERROR", True, ["203.0.113.8"])
    assert world.query("new.upd.test.", "A") == ("NOERROR", True, ["203.0.113.9"])


def test_dig_sees_the_same(world: DnsWorld) -> None:
    if shutil.which("dig") is None:
        pytest.skip("dig not installed (apt-get install bind9-dnsutils)")
    out = world.dig("+dnssec", "_25._tcp.mx.b.test.", "TLSA")
    assert "status: NOERROR" in out
    flags = out.split("flags:", 1)[1].split(";", 1)[0].split()
    assert "ad" in flags
    # dig prints the hex upper-case and in groups.
    assert TLSA.rsplit(maxsplit=1)[-1].upper() in "".join(out.split()).upper()
    assert "RRSIG\tTLSA" in out
    bogus_free = world.dig("+cd", "www.bogus.test.", "A")
    assert "status: NOERROR" in bogus_free


def test_bad_records_fail_at_declaration(world: DnsWorld) -> None:
    # A world that is never started: only declarations (and key generation).
    with DnsWorld(world.server_ns, DNS_V4, DNS_V6, world.resolver_ns) as other:
        with pytest.raises(ValueError, match=r"zone bad\.test\."):
            other.zone("bad.test.", ["www A not-an-address"])
        with pytest.raises(ValueError, match="SOA"):
            other.zone("soa.test.", ["@ SOA a. b. 1 2 3 4 5"])
        with pytest.raises(KeyError):
            other.make_bogus("undeclared.test.")
    with pytest.raises(RuntimeError, match="before start"):
        world.zone("late.test.", [])


def test_world_is_removed_afterwards(dns_ok: None) -> None:
    with Lab() as lab:
        names = [ns.name for ns in lab.namespaces]
        with DnsWorld.on_lab(lab) as world:
            world.zone("test.", ["www A 203.0.113.2"])
            world.start()
            assert world.query("www.test.", "A").ad
            pids = world.pids
            assert len(pids) >= 2  # nsd (and its children), unbound
            dirs = [world.workdir, world._sockdir]
            assert all(d.exists() for d in dirs)
        assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
        assert [d for d in dirs if d.exists()] == []
        assert DNS_V4 not in lab.peer.ip("-o", "addr", "show", "dev", "eth0").stdout
    assert [n for n in names if (NETNS_RUN_DIR / n).exists()] == []

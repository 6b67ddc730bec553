"""The decision table: DNS answers (with their DNSSEC status) x policy level → plan.

Each row describes what DNS says about destination 203.0.113.2; ``discover`` runs on those
answers (served from the table, not the network) and ``plan`` decides.  Read it against
RFC 7672 2.2 and the module docstring of gateway/policy.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from gateway.answers import Answer, Status, failed
from gateway.config import DnsConfig, Level, PolicyConfig, PolicyEntry
from gateway.dane import TLSARecord
from gateway.discovery import discover
from gateway.dns import Resolver
from gateway.policy import Action, Auth, Plan, plan
from gateway.walks import Discovery

D = ipaddress.ip_address("203.0.113.2")
PTR = "2.113.0.203.in-addr.arpa."
H = "mx.b.test."
TLSA_H = "_25._tcp.mx.b.test."
USABLE = "3 1 1 " + "ab" * 32
UNUSABLE = "1 1 1 " + "ab" * 32  # PKIX-EE: not for SMTP (RFC 7672 3.1)
S, N, B, F = Status.SECURE, Status.INSECURE, Status.BOGUS, Status.FAILED  # N: not secure


def rd(rdtype: str, text: str) -> Any:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text)


def ans(name: str, rdtype: str, status: Status, *data: str, rcode: str = "NOERROR",
        canonical: str = "", cnames: tuple[str, ...] = ()) -> Answer:
    if status in (F, B):  # what a validating resolver says: SERVFAIL, no data
        rcode, data = "SERVFAIL", ()
    return Answer(name, rdtype, status, rcode, tuple(rd(rdtype, d) for d in data),
                  canonical or name, cnames, 60)


class TableResolver(Resolver):
    """Answers from a dict; names not in it are a secure NXDOMAIN."""

    def __init__(self, table: dict[tuple[str, str], Answer]) -> None:
        super().__init__(DnsConfig())
        self.table = table
        self.asked: list[tuple[str, str]] = []

    async def lookup(self, name: str, rdtype: str) -> Answer:
        self.asked.append((name, rdtype))
        return self.table.get((name, rdtype), ans(name, rdtype, S, rcode="NXDOMAIN"))


def world(ptr: Answer | None, fwd: Answer | None = None, *tlsa: Answer) -> Discovery:
    table = {(a.name, a.rdtype): a for a in (ptr, fwd, *tlsa) if a is not None}

    async def go() -> Discovery:
        return await discover(TableResolver(table), D, budget=5)

    return asyncio.run(go())


def ptr(status: Status, target: str = H) -> Answer:
    return ans(PTR, "PTR", status, target)


def fwd(status: Status, address: str = "203.0.113.2") -> Answer:
    return ans(H, "A", status, address)


def tlsa(status: Status, *records: str, name: str = TLSA_H) -> Answer:
    return ans(name, "TLSA", status, *records, rcode="NOERROR" if records else "NXDOMAIN")


REQ_DANE = (Action.REQUIRE_TLS, Auth.DANE)
REQ = (Action.REQUIRE_TLS, Auth.NONE)
TRY = (Action.TRY_TLS, Auth.NONE)
DEFER = (Action.DEFER, Auth.NONE)
PASS = (Action.PASSTHROUGH, Auth.NONE)

# (what DNS says, then the plan for levels: dane, dane-only, may, encrypt, none)
TABLE: list[tuple[str, Discovery, tuple[Any, ...]]] = [
    ("secure chain, secure usable TLSA",
     world(ptr(S), fwd(S), tlsa(S, USABLE)), (REQ_DANE, REQ_DANE, TRY, REQ, PASS)),
    ("secure chain, secure TLSA with only unusable records (RFC 7672 2.2: encrypt)",
     world(ptr(S), fwd(S), tlsa(S, UNUSABLE)), (REQ, DEFER, TRY, REQ, PASS)),
    ("secure chain, secure absence of TLSA",
     world(ptr(S), fwd(S), tlsa(S)), (TRY, DEFER, TRY, REQ, PASS)),
    ("secure chain, TLSA in an unsigned zone",
     world(ptr(S), fwd(S), tlsa(N, USABLE)), (TRY, DEFER, TRY, REQ, PASS)),
    ("secure chain, bogus TLSA (A3: doubt defers)",
     world(ptr(S), fwd(S), tlsa(B)), (DEFER, DEFER, TRY, REQ, PASS)),
    ("secure chain, TLSA lookup failed (SERVFAIL/timeout)",
     world(ptr(S), fwd(S), tlsa(F)), (DEFER, DEFER, TRY, REQ, PASS)),
    ("secure PTR, insecure forward: no DANE",
     world(ptr(S), fwd(N), tlsa(S, USABLE)), (TRY, DEFER, TRY, REQ, PASS)),
    ("insecure PTR, secure forward: no DANE",
     world(ptr(N), fwd(S), tlsa(S, USABLE)), (TRY, DEFER, TRY, REQ, PASS)),
    ("PTR not confirmed by the forward lookup",
     world(ptr(S), fwd(S, "203.0.113.99"), tlsa(S, USABLE)), (TRY, DEFER, TRY, REQ, PASS)),
    ("secure PTR, bogus forward lookup (doubt)",
     world(ptr(S), fwd(B)), (DEFER, DEFER, TRY, REQ, PASS)),
    ("bogus PTR: no evidence the peer asked for DANE",
     world(ptr(B)), (TRY, DEFER, TRY, REQ, PASS)),
    ("PTR lookup failed",
     world(ptr(F)), (TRY, DEFER, TRY, REQ, PASS)),
    ("no PTR (secure NXDOMAIN)",
     world(None), (TRY, DEFER, TRY, REQ, PASS)),
]
LEVELS = (Level.DANE, Level.DANE_ONLY, Level.MAY, Level.ENCRYPT, Level.NONE)


@pytest.mark.parametrize(("row", "found", "expected"), TABLE, ids=[r[0] for r in TABLE])
def test_decision_table(row: str, found: Discovery, expected: tuple[Any, ...]) -> None:
    for level, (action, auth) in zip(LEVELS, expected, strict=True):
        p = plan(D, found, PolicyConfig(default=level))
        assert (p.action, p.auth) == (action, auth), f"{row} / {level}: {p.describe()}"
        assert p.fails_closed == (action in (Action.REQUIRE_TLS, Action.DEFER))
        if auth is Auth.DANE:
            assert p.tlsa == (TLSARecord(3, 1, 1, bytes.fromhex("ab" * 32)),)
            assert p.sni == "mx.b.test"


def test_tlsa_at_the_cname_target_first_then_at_the_original_name() -> None:
    via = ans(H, "A", S, "203.0.113.2", canonical="real.c.test.", cnames=(H,))
    at_target = world(ptr(S), via, tlsa(S, USABLE, name="_25._tcp.real.c.test."))
    assert at_target.tlsa_base == "real.c.test"
    assert plan(D, at_target, PolicyConfig()).sni == "real.c.test"
    at_original = world(ptr(S), via, tlsa(S, name="_25._tcp.real.c.test."), tlsa(S, USABLE))
    assert at_original.tlsa_base == "mx.b.test"
    assert [s.name for s in at_original.steps][-2:] == ["_25._tcp.real.c.test.", TLSA_H]
    assert plan(D, at_original, PolicyConfig()).auth is Auth.DANE


def test_forward_confirmation_tries_each_ptr_name() -> None:
    table = {
        (PTR, "PTR"): ans(PTR, "PTR", S, "a.b.test.", "mx.b.test."),
        ("a.b.test.", "A"): ans("a.b.test.", "A", S, "203.0.113.77"),
        (H, "A"): fwd(S),
        (TLSA_H, "TLSA"): tlsa(S, USABLE),
    }
    found = asyncio.run(discover(TableResolver(table), D, budget=5))
    assert found.host == H and found.host_secure and len(found.usable) == 1


def entry(match: str, level: Level, **kw: Any) -> PolicyEntry:
    from gateway.config import _hostname

    net = None
    host = None
    try:
        net = ipaddress.ip_network(match)
    except ValueError:
        host = _hostname(match)
    return PolicyEntry(match, level, net, host, **kw)


def test_entries_by_network_and_name() -> None:
    secure = world(ptr(S), fwd(S), tlsa(S))
    insecure_name = world(ptr(N), fwd(N))
    pin = bytes(32)
    cfg = PolicyConfig(entries=(
        entry("198.51.100.0/24", Level.NONE),
        entry(".b.test", Level.NONE),
        entry("203.0.113.0/24", Level.FINGERPRINT, fingerprints=(pin,)),
    ))
    # The name entry (none) applies to a securely named host ...
    p = plan(D, secure, cfg)
    assert (p.action, p.entry and p.entry.match) == (Action.PASSTHROUGH, ".b.test")
    # ... but a weakening entry is not matched through a forgeable name: the next entry wins.
    p = plan(D, insecure_name, cfg)
    assert (p.action, p.auth, p.fingerprints) == (Action.REQUIRE_TLS, Auth.FINGERPRINT, (pin,))
    # CIDR entries match the address, whatever DNS says.
    other = ipaddress.ip_address("198.51.100.7")
    assert plan(other, world(None), cfg).action is Action.PASSTHROUGH


def test_strengthening_entry_matches_an_insecure_name() -> None:
    cfg = PolicyConfig(entries=(entry("mx.b.test", Level.ENCRYPT),))
    p = plan(D, world(ptr(N), fwd(N)), cfg)
    assert (p.action, p.level) == (Action.REQUIRE_TLS, Level.ENCRYPT)


class StallingResolver(TableResolver):
    def __init__(self, table: dict[tuple[str, str], Answer], stall: tuple[str, str]) -> None:
        super().__init__(table)
        self.stall = stall

    async def lookup(self, name: str, rdtype: str) -> Answer:
        if (name, rdtype) == self.stall:
            await asyncio.sleep(30)
        return await super().lookup(name, rdtype)


@pytest.mark.parametrize(("stall", "action", "doubt"), [
    ((PTR, "PTR"), Action.TRY_TLS, None),
    ((H, "A"), Action.DEFER, "A lookup of mx.b.test. did not finish within the budget"),
    ((TLSA_H, "TLSA"), Action.DEFER,
     "TLSA lookup of _25._tcp.mx.b.test. did not finish within the budget"),
])
def test_budget_spent_defers_only_after_a_secure_step(
        stall: tuple[str, str], action: Action, doubt: str | None) -> None:
    table = {(PTR, "PTR"): ptr(S), (H, "A"): fwd(S), (TLSA_H, "TLSA"): tlsa(S, USABLE)}

    async def go() -> Discovery:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        found = await discover(StallingResolver(table, stall), D, budget=0.2)
        assert loop.time() - t0 < 1
        return found

    found = asyncio.run(go())
    assert found.doubt == doubt
    assert found.steps[-1].rcode == "TIMEOUT" and found.steps[-1].name == stall[0]
    assert plan(D, found, PolicyConfig()).action is action


@pytest.mark.parametrize(("default", "name_level", "applies"), [
    (Level.DANE, Level.MAY, True),  # no stricter than dane for an insecure name
    (Level.DANE, Level.NONE, False),
    (Level.DANE_ONLY, Level.ENCRYPT, False),  # would turn defer into unauthenticated TLS
    (Level.ENCRYPT, Level.DANE, False),  # would turn required TLS into opportunistic
    (Level.MAY, Level.DANE_ONLY, True),
])
def test_an_insecure_name_cannot_weaken_the_default(default: Level, name_level: Level,
                                                    applies: bool) -> None:
    cfg = PolicyConfig(default=default, entries=(entry("mx.b.test", name_level),))
    p = plan(D, world(ptr(N), fwd(N)), cfg)
    assert (p.entry is not None) is applies
    assert p.level is (name_level if applies else default)


# -- the recipient dimension (RFC 7672, bound to the recipient domain's MX) -----------------

def _chain_and_records() -> tuple[list[bytes], TLSARecord, TLSARecord]:
    from gatelab import certs
    from gateway.dane import tlsa_record

    leaf = certs.make_leaf(None, ["mx.b.test"])
    return [leaf.der], tlsa_record(leaf.der), TLSARecord(3, 1, 1, b"\x5a" * 32)


@pytest.mark.parametrize(("level", "required", "checked"), [
    (Level.DANE, None, True), (Level.DANE_ONLY, None, True), (None, None, False),
    (Level.MAY, None, False), (Level.NONE, None, False), (Level.ENCRYPT, None, False),
    (Level.FINGERPRINT, None, False), (Level.MAY, Level.ENCRYPT, True),
    (Level.NONE, Level.DANE_ONLY, True)])
def test_recipients_are_looked_up_only_where_dane_is_enforced(
        level: Level | None, required: Level | None, checked: bool) -> None:
    """Under none/may/encrypt/fingerprint the operator chose no DANE for the destination:
    no MX lookup, so a resolver failure cannot defer a recipient there; a policy.recipients
    entry is always checked."""
    from gateway.policy import recipient_checked

    assert recipient_checked(level, required) is checked


def test_a_recipient_in_doubt_is_told_why_in_plain_words() -> None:
    from gateway.policy import recipient_decision
    from gateway.walks import RecipientRule, recipient_walk

    walk = recipient_walk("peer.test", ipaddress.ip_address("192.0.2.1"))
    next(walk)
    with pytest.raises(StopIteration) as done:
        walk.send(failed("peer.test.", "MX", "TIMEOUT", "no answer"))
    rule = done.value.value
    assert isinstance(rule, RecipientRule)
    allow, reason, label = recipient_decision(rule, True, [])
    assert (allow, label) == (False, "dns")
    assert reason == "cannot check DANE for peer.test: its MX lookup got no answer from the " \
                     "resolver", reason


def test_recipient_decision_table() -> None:
    from gateway.policy import recipient_decision
    from gateway.walks import RecipientRule

    chain, good, wrong = _chain_and_records()
    rules = {
        "asks nothing": RecipientRule("ok.test"),
        "DANE, key matches": RecipientRule("d.test", "mx.b.test", (good,)),
        "DANE, other key": RecipientRule("d.test", "mx.b.test", (wrong,)),
        "TLSA, none usable": RecipientRule("d.test", "mx.b.test", ()),
        "lookup in doubt": RecipientRule("d.test", doubt="MX lookup of d.test is bogus"),
    }
    # session: gateway TLS with the peer's chain / plaintext
    table = {
        ("asks nothing", "tls"): (True, "none"),
        ("asks nothing", "plaintext"): (True, "none"),
        ("DANE, key matches", "tls"): (True, "dane"),
        ("DANE, key matches", "plaintext"): (False, "not_encrypted"),
        ("DANE, other key", "tls"): (False, "key_mismatch"),
        ("DANE, other key", "plaintext"): (False, "not_encrypted"),
        ("TLSA, none usable", "tls"): (True, "tls"),
        ("TLSA, none usable", "plaintext"): (False, "not_encrypted"),
        ("lookup in doubt", "tls"): (False, "dns"),
        ("lookup in doubt", "plaintext"): (False, "dns"),
    }
    for (rule, session), (allow, label) in table.items():
        encrypted = session == "tls"
        got = recipient_decision(rules[rule], encrypted, chain if encrypted else [])
        assert (got[0], got[2]) == (allow, label), (rule, session, got)



def test_recipient_policy_from_the_config() -> None:
    from gateway.policy import recipient_decision
    from gateway.walks import RecipientRule

    chain, good, _ = _chain_and_records()
    nothing = RecipientRule("bank.example")
    dane_rule = RecipientRule("bank.example", "mx.b.test", (good,))
    # encrypt: any TLS by the gateway will do; plaintext is deferred
    assert recipient_decision(nothing, True, chain, Level.ENCRYPT)[::2] == (True, "tls")
    assert recipient_decision(nothing, False, [], Level.ENCRYPT)[::2] == (False, "policy")
    # dane-only: the domain's DNS must publish a usable TLSA for this address, and match
    assert recipient_decision(nothing, True, chain, Level.DANE_ONLY)[::2] == (False, "policy")
    assert recipient_decision(dane_rule, True, chain, Level.DANE_ONLY)[::2] == (True, "dane")


def test_recipient_policy_matching() -> None:
    from gateway.config import PolicyConfig, RecipientPolicy

    cfg = PolicyConfig(recipients=(RecipientPolicy(".bank.example.", Level.DANE_ONLY),
                                   RecipientPolicy("partner.example.", Level.ENCRYPT)))
    assert cfg.for_recipient("mail.bank.example") is Level.DANE_ONLY
    assert cfg.for_recipient("PARTNER.example.") is Level.ENCRYPT
    assert cfg.for_recipient("sub.partner.example") is None


def test_check_and_session_verify_a_dane_ta_peer_behind_a_cname_alike() -> None:
    """One verification (policy.verify_peer) for the session and `smtpgate check`: a DANE-TA
    peer reached through a CNAME whose certificate names the MX host, not the TLSA base
    domain, passes both (RFC 7672 3.2.3: both are reference identifiers).  `check` once
    checked the SNI name alone and reported a mismatch the session accepted."""
    from gatelab import certs
    from gateway import check, dane
    from gateway.commands import Result
    from gateway.outbound import OutboundUpgrade

    root = certs.make_root()
    leaf = certs.make_leaf(root, ["mx.b.test"])
    chain = [leaf.der, root.der]
    ta = dane.tlsa_record(root.der, usage=2, selector=1, mtype=1)
    p = Plan(Action.REQUIRE_TLS, Auth.DANE, Level.DANE, "dane", sni="mx.cdn.test",
             tlsa=(ta,), names=("mx.cdn.test", "mx.b.test"))
    assert not dane.verify(chain, p.tlsa, ["mx.cdn.test"]).ok  # the SNI name alone: a mismatch
    ok, result, reason, detail = check.verify(p, chain)
    assert (ok, result, reason) == (True, Result.DANE, "dane-ta match"), detail
    assert OutboundUpgrade._verify(p, chain) == (True, Result.DANE, "dane-ta match")
    other = certs.make_leaf(root, ["elsewhere.test"])  # a name neither accepts
    assert check.verify(p, [other.der, root.der])[:3] == (False, Result.DEFERRED,
                                                           "name mismatch")
    assert OutboundUpgrade._verify(p, [other.der, root.der])[:2] == (False, Result.DEFERRED)

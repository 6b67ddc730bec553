"""MTA-STS, the pure half (gateway.sts): the TXT record and the policy file as RFC 8461
writes them, MX patterns, the walk that ties a destination to a policy, the Web PKI check
of a presented chain, and the verdict per recipient."""

from __future__ import annotations

import ipaddress
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization

from gatelab import certs
from gateway.answers import Answer, Status
from gateway.sts import (
    DNS,
    EXPIRED,
    HOST_MISMATCH,
    NOT_TRUSTED,
    STARTTLS_NOT_SUPPORTED,
    SUCCESS,
    VALIDATION_FAILURE,
    Candidates,
    Mode,
    Policy,
    StsError,
    Verdict,
    decide,
    load_store,
    mx_matches,
    parse_policy,
    parse_txt,
    sts_walk,
    webpki_check,
)

DEST = ipaddress.ip_address("203.0.113.2")


# -- the TXT record ------------------------------------------------------------------------

@pytest.mark.parametrize(("texts", "policy_id"), [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1; id=abc; ext=1"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=x1;"], "x1"),  # other records are discarded
    ([], None),
    (["v=spf1 -all"], None),
    (["v=STSv10; id=x"], None),  # not "v=STSv1;"
])
def test_txt(texts: list[str], policy_id: str | None) -> None:
    assert parse_txt(texts) == policy_id


@pytest.mark.parametrize(("texts", "message"), [
    (["v=STSv1; id=a;", "v=STSv1; id=b;"], "2 TXT records start with v=STSv1"),
    (["v=STSv1;"], "the TXT record has no id"),
    (["v=STSv1; id=" + "a" * 33], "is not 1-32 letters and digits"),
    (["v=STSv1; id=a-b"], "is not 1-32 letters and digits"),
    (["v=STSv1; id a"], "malformed field"),
])
def test_bad_txt(texts: list[str], message: str) -> None:
    with pytest.raises(StsError, match=message):
        parse_txt(texts)


# -- the policy file -----------------------------------------------------------------------

def test_policy_as_rfc_8461_writes_it() -> None:
    body = (b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
            b"mx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n")
    p = parse_policy(body)
    assert p == Policy(Mode.ENFORCE, ("mail.example.com", "*.example.net",
                                      "backupmx.example.com"), 604800)
    assert parse_policy(p.text().encode()) == p


def test_policy_leniencies() -> None:
    # LF line ends, spaces, an unknown key, upper-case and dotted mx, a repeated key.
    p = parse_policy(b"version: STSv1\nmode:testing\n  mx:  MX1.Example.COM.  \n"
                     b"future: 1\nmax_age: 9999999999\nmode: enforce\n")
    assert p == Policy(Mode.TESTING, ("mx1.example.com",), 31557600)
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 86400\n").mx == ()


@pytest.mark.parametrize(("body", "message"), [
    (b"mode: enforce\nmx: a.example\nmax_age: 1\n", "no version"),
    (b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version is not STSv1"),
    (b"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "mode must be"),
    (b"version: STSv1\nmode: enforce\nmx: a.example\n", "max_age must be"),
    (b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "max_age must be"),
    (b"version: STSv1\nmode: enforce\nmax_age: 1\n", "needs at least one mx"),
    (b"version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n", "is not a host name"),
    (b"version: STSv1\nmode: enforce\nmx: *example.com\nmax_age: 1\n", "is not a host name"),
    (b"version: STSv1\nnot a field\n", "line 2 is not 'key: value'"),
    (b"version: STSv1\n\xff\n", "not UTF-8"),
    (b"x" * (64 * 1024 + 1), "larger than"),
])
def test_bad_policy(body: bytes, message: str) -> None:
    with pytest.raises(StsError, match=message):
        parse_policy(body)


@pytest.mark.parametrize(("pattern", "host", "ok"), [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.example.com.", True),
    ("mail.example.com", "mx.example.com", False),
    ("*.example.net", "mx1.example.net", True),
    ("*.example.net", "example.net", False),  # * is exactly one label
    ("*.example.net", "a.b.example.net", False),
    ("*.example.net", "mx1.example.net.evil", False),
])
def test_mx_patterns(pattern: str, host: str, ok: bool) -> None:
    assert mx_matches(pattern, host) is ok


# -- the walk ------------------------------------------------------------------------------

def rdata(rdtype: str, text: str) -> Any:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text)


def ans(name: str, rdtype: str, *records: str, status: Status = Status.INSECURE,
        rcode: str = "NOERROR") -> Answer:
    return Answer(name, rdtype, status, rcode, tuple(rdata(rdtype, r) for r in records), name)


def walk(policy: Policy, replies: dict[tuple[str, str], Answer]) -> tuple[Candidates,
                                                                        list[tuple[str, str]]]:
    asked: list[tuple[str, str]] = []
    gen = sts_walk("example.com", DEST, policy)
    try:
        q = next(gen)
        while True:
            asked.append(q)
            q = gen.send(replies[q])
    except StopIteration as done:
        return done.value, asked


POLICY = Policy(Mode.ENFORCE, ("mx1.example.com", "*.backup.example"), 86400)


def test_walk_finds_the_listed_mx_that_is_this_destination() -> None:
    found, asked = walk(POLICY, {
        ("example.com", "MX"): ans("example.com.", "MX", "10 mx1.example.com.",
                                   "20 mx9.example.com.", "30 b.backup.example."),
        ("mx1.example.com.", "A"): ans("mx1.example.com.", "A", "203.0.113.2"),
        ("b.backup.example.", "A"): ans("b.backup.example.", "A", "198.51.100.7"),
    })
    assert found == Candidates(("mx1.example.com",), ("b.backup.example", "mx1.example.com"))
    assert ("mx9.example.com.", "A") not in asked  # not in the policy: never asked


def test_walk_an_mx_not_in_the_policy() -> None:
    found, _ = walk(POLICY, {("example.com", "MX"): ans("example.com.", "MX",
                                                         "10 mx.elsewhere.example.")})
    assert found == Candidates((), ())


def test_walk_no_mx_is_the_domain_itself() -> None:
    policy = Policy(Mode.ENFORCE, ("example.com",), 1)
    found, _ = walk(policy, {
        ("example.com", "MX"): ans("example.com.", "MX", rcode="NXDOMAIN"),
        ("example.com.", "A"): ans("example.com.", "A", "203.0.113.2")})
    assert found.hosts == ("example.com",)


def test_walk_dns_trouble_is_doubt() -> None:
    found, _ = walk(POLICY, {("example.com", "MX"): ans("example.com.", "MX",
                                                         status=Status.FAILED,
                                                         rcode="TIMEOUT")})
    assert found.doubt == "its MX lookup got no answer from the resolver"


# -- the Web PKI check and the verdict ---------------------------------------------------------

@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    root = certs.make_root()
    inter = certs.make_intermediate(root)
    other_root = certs.make_root("another root")
    return {
        "store": load_store(root.cert.public_bytes(serialization.Encoding.PEM)),
        "good": [certs.make_leaf(inter, ["mx1.example.com"]).der, inter.der],
        "wildcard": [certs.make_leaf(inter, ["*.example.com"]).der, inter.der],
        "other_name": [certs.make_leaf(inter, ["mx.other.example"]).der, inter.der],
        "untrusted": [certs.make_leaf(certs.make_intermediate(other_root),
                                      ["mx1.example.com"]).der],
        "expired": [certs.make_leaf(inter, ["mx1.example.com"], **certs.expired()).der,
                    inter.der],
    }


@pytest.mark.parametrize(("chain", "result"), [
    ("good", SUCCESS), ("wildcard", SUCCESS), ("other_name", HOST_MISMATCH),
    ("untrusted", NOT_TRUSTED), ("expired", EXPIRED),
])
def test_webpki(pki: dict[str, Any], chain: str, result: str) -> None:
    got, detail = webpki_check(pki[chain], ["mx1.example.com"], pki["store"])
    assert got == result, detail


def test_webpki_without_the_intermediate_is_not_trusted(pki: dict[str, Any]) -> None:
    assert webpki_check(pki["good"][:1], ["mx1.example.com"], pki["store"])[0] == NOT_TRUSTED


@pytest.mark.parametrize(("mode", "allowed_on_failure"), [(Mode.ENFORCE, False),
                                                          (Mode.TESTING, True)])
def test_decide(pki: dict[str, Any], mode: Mode, allowed_on_failure: bool) -> None:
    policy = Policy(mode, ("mx1.example.com",), 86400)
    here = Candidates(("mx1.example.com",), ("mx1.example.com",))
    store = pki["store"]
    assert decide("example.com", policy, here, True, pki["good"], store=store).allow
    cases = [
        (here, False, pki["good"], STARTTLS_NOT_SUPPORTED, "this hop is not encrypted"),
        (here, True, pki["other_name"], HOST_MISMATCH, "the certificate does not name"),
        (here, True, pki["untrusted"], NOT_TRUSTED, "is not trusted"),
        (Candidates((), ("mx1.example.com",)), True, pki["good"], VALIDATION_FAILURE,
         "not an MX it lists (listed: mx1.example.com)"),
        (Candidates(doubt="its MX lookup got no answer from the resolver"), True,
         pki["good"], DNS, "cannot check: its MX lookup"),
    ]
    for candidates, encrypted, chain, result, words in cases:
        v = decide("example.com", policy, candidates, encrypted, chain, store=store)
        assert (v.allow, v.result) == (allowed_on_failure, result), v
        assert v.reason.startswith("MTA-STS policy of example.com: ") and words in v.reason


def test_applied_under_on_and_require() -> None:
    from gateway.sts import NO_POLICY, applied

    testing = Policy(Mode.TESTING, ("mx1.example.com",), 60)
    assert applied("example.com", testing, None, False) is testing
    assert applied("example.com", testing, None, True) == Policy(
        Mode.ENFORCE, ("mx1.example.com",), 60)
    assert applied("example.com", None, None, False) is None
    assert applied("example.com", Policy(Mode.NONE, (), 60), None, False) is None
    refused = applied("example.com", None, "the policy fetch timed out", True)
    assert refused == Verdict(False, NO_POLICY, "policy requires MTA-STS for example.com: "
                                                "the policy fetch timed out")

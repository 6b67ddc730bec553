"""DANE matching (gateway/dane.py): record generation, EE/TA semantics, fingerprints,
and - in a lab - a real Postfix receiver offering STARTTLS with a gatelab.certs chain,
checked by OpenSSL's own DANE implementation against our generated records."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gatelab.certs import (
    Issued,
    KeyType,
    expired,
    make_intermediate,
    make_key,
    make_leaf,
    make_root,
    not_yet_valid,
    utcnow,
    write_chain_file,
    write_pki,
)
from gateway.dane import (
    Reason,
    TLSARecord,
    Verdict,
    fingerprint_matches,
    tlsa_data,
    tlsa_owner,
    tlsa_record,
    verify,
)

MX = "mx.example.net"


@dataclasses.dataclass(frozen=True)
class PKI:
    root: Issued
    inter: Issued
    leaf: Issued
    other_root: Issued
    other_leaf: Issued

    @property
    def chain(self) -> list[bytes]:
        """What a well-configured server presents: leaf and intermediate, no root."""
        return [self.leaf.der, self.inter.der]


@pytest.fixture(scope="module")
def pki() -> PKI:
    root = make_root()
    inter = make_intermediate(root)
    other_root = make_root("another root")
    return PKI(
        root=root,
        inter=inter,
        leaf=make_leaf(inter, [MX, "mail.example.net"]),
        other_root=other_root,
        other_leaf=make_leaf(make_intermediate(other_root), [MX]),
    )


def rec(cert: Issued, usage: int, selector: int = 1, mtype: int = 1) -> TLSARecord:
    return tlsa_record(cert.der, usage, selector, mtype)


def assert_ok(verdict: Verdict, reason: str, usage: int, depth: int) -> None:
    assert (verdict.ok, verdict.reason, verdict.usage, verdict.depth) == (
        True, reason, usage, depth,
    ), verdict


def assert_fails(verdict: Verdict, reason: str) -> None:
    assert (verdict.ok, verdict.reason) == (False, reason), verdict


# -- record generation --------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_tlsa_data_selectors_and_matching_types(key_type: KeyType) -> None:
    cert = make_leaf(None, [MX], key_type=key_type)
    # The SPKI is cut out of the DER; compare with cryptography's own re-encoding.
    spki = cert.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert tlsa_data(cert.der, 0, 0) == cert.der
    assert tlsa_data(cert.der, 0, 1) == hashlib.sha256(cert.der).digest()
    assert tlsa_data(cert.der, 0, 2) == hashlib.sha512(cert.der).digest()
    assert tlsa_data(cert.der, 1, 0) == spki
    assert tlsa_data(cert.der, 1, 1) == hashlib.sha256(spki).digest()
    assert tlsa_data(cert.der, 1, 2) == hashlib.sha512(spki).digest()
    assert cert.cert.fingerprint(hashes.SHA256()) == tlsa_data(cert.der, 0, 1)


# An X.509 v1 certificate (no [0] version field, no extensions) made by
# `openssl x509 -req -signkey`; its SPKI digest from
# `openssl x509 -pubkey | openssl pkey -pubin -outform DER | sha256sum`.
V1_CERT_PEM = b"""-----BEGIN CERTIFICATE-----
MIIBIzCBywIUKlPQIrykURxqFWvkPpHtE8oDDikwCgYIKoZIzj0EAwIwFTETMBEG
A1UEAwwKdjEuZXhhbXBsZTAeFw0yNjExMjgyMDMyMTdaFw0yNjEyMDEyMDMyMTda
MBUxEzARBgNVBAMMCnYxLmV4YW1wbGUwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AAR4Ho5y3sYd8BQ2D4OuVzq8ogC3B20h6vMvzQ4e+bF3+N1ttdzqfbRuSLRpmNIJ
JAMombbfAMCdIjw3opUWp/hkMAoGCCqGSM49BAMCA0cAMEQCIDBWYW+3DcppAk5G
8L8aA/Tu4X43jnW3fQak0bds+Kb2AiAIEf3jr5kaQUe71d2LcHkLpvFMDqz0y+Zv
CR63XxZ86g==
-----END CERTIFICATE-----
"""
V1_SPKI_SHA256 = "2375070609b4e0415cda4babfe369a89ab60c2ca6ab4d36eebf77f4d9eb0095d"


def test_tlsa_data_of_v1_certificate() -> None:
    der = x509.load_pem_x509_certificate(V1_CERT_PEM).public_bytes(serialization.Encoding.DER)
    assert tlsa_data(der, 1, 1).hex() == V1_SPKI_SHA256
    assert verify([der], [tlsa_record(der)], []).ok


def test_tlsa_data_rejects_bad_input(pki: PKI) -> None:
    for selector, mtype in ((2, 1), (0, 3), (1, 255)):
        with pytest.raises(ValueError):
            tlsa_data(pki.leaf.der, selector, mtype)
    for garbage in (b"", b"\x30", pki.leaf.der[:-1], pki.leaf.der + b"\x00", b"\x04\x00"):
        with pytest.raises(ValueError):
            tlsa_data(garbage, 1, 1)


def test_tlsa_record_and_zone_line(pki: PKI) -> None:
    record = tlsa_record(pki.leaf.der)
    assert (record.usage, record.selector, record.mtype) == (3, 1, 1)
    assert record.usable and len(record.data) == 32
    line = record.to_zone(tlsa_owner(MX))
    assert line == f"_25._tcp.mx.example.net. IN TLSA 3 1 1 {record.data.hex()}"
    assert record.to_zone("_25._tcp.mx.example.net") == line  # made absolute
    assert tlsa_owner("mx.example.net.", 465) == "_465._tcp.mx.example.net."
    assert str(tlsa_record(pki.inter.der, 2, 0, 2)).startswith("2 0 2 ")


# -- the matching table: usage x selector x matching type, right and wrong ----------------


@pytest.mark.parametrize("mtype", [0, 1, 2])
@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("usage", [2, 3])
def test_matching_table(pki: PKI, usage: int, selector: int, mtype: int) -> None:
    # EE: the leaf's association; TA: the presented intermediate's.
    right = pki.leaf if usage == 3 else pki.inter
    wrong = pki.other_leaf if usage == 3 else pki.other_root
    good = rec(right, usage, selector, mtype)
    assert_ok(verify(pki.chain, [good], [MX]), "dane-ee match" if usage == 3 else
              "dane-ta match", usage, 0 if usage == 3 else 1)
    assert verify(pki.chain, [good], [MX]).record == good
    bad = rec(wrong, usage, selector, mtype)
    assert_fails(verify(pki.chain, [bad], [MX]), Reason.NO_MATCH)
    # One flipped bit in the association data is as good as a different certificate.
    flipped = dataclasses.replace(good, data=good.data[:-1] + bytes([good.data[-1] ^ 1]))
    assert_fails(verify(pki.chain, [flipped], [MX]), Reason.NO_MATCH)
    # Any usable record of the set may match.
    assert verify(pki.chain, [bad, flipped, good], [MX]).ok


@pytest.mark.parametrize("usage", [0, 1])
def test_pkix_usages_never_match(pki: PKI, usage: int) -> None:
    records = [rec(c, usage, s, m) for c in (pki.leaf, pki.inter) for s in (0, 1) for m in (0, 1)]
    assert not any(r.usable for r in records)
    assert_fails(verify(pki.chain, records, [MX]), Reason.NO_USABLE_RECORD)
    # Next to a usable but wrong record, they still do not count.
    assert_fails(verify(pki.chain, [*records, rec(pki.other_leaf, 3)], [MX]), Reason.NO_MATCH)


def test_malformed_records_are_ignored(pki: PKI) -> None:
    good = rec(pki.leaf, 3)
    short = TLSARecord(3, 1, 1, good.data[:-1])  # wrong digest length: unusable
    odd = [TLSARecord(3, 2, 1, good.data), TLSARecord(3, 1, 3, good.data), TLSARecord(4, 1, 1,
           good.data), TLSARecord(2, 1, 0, b""), TLSARecord(2, 1, 0, b"not a key")]
    assert_fails(verify(pki.chain, [short, *odd[:4]], [MX]), Reason.NO_USABLE_RECORD)
    assert_fails(verify(pki.chain, odd, [MX]), Reason.NO_MATCH)
    assert verify(pki.chain, [*odd, short, good], [MX]).ok


# -- DANE-EE ------------------------------------------------------------------------------


def test_ee_ignores_names_and_dates(pki: PKI) -> None:
    for leaf in (
        make_leaf(pki.inter, ["elsewhere.example"], **expired()),
        make_leaf(pki.inter, ["elsewhere.example"], **not_yet_valid()),
        make_leaf(None, []),  # self-signed, no SAN at all
    ):
        for selector in (0, 1):
            record = rec(leaf, 3, selector, 1)
            assert_ok(verify([leaf.der], [record], [MX]), Reason.EE_MATCH, 3, 0)
            assert_ok(verify([leaf.der], [record], []), Reason.EE_MATCH, 3, 0)


def test_ee_matches_only_the_leaf(pki: PKI) -> None:
    # A usage-3 record for the intermediate authenticates nothing.
    assert_fails(verify(pki.chain, [rec(pki.inter, 3)], [MX]), Reason.NO_MATCH)
    # Nor does the leaf's record when the leaf is not first.
    assert_fails(verify([pki.inter.der, pki.leaf.der], [rec(pki.leaf, 3)], [MX]), Reason.NO_MATCH)


def test_ee_tried_before_ta(pki: PKI) -> None:
    old = make_leaf(pki.inter, [MX], **expired())
    records = [rec(pki.inter, 2), rec(old, 3)]
    # TA alone fails on the expired leaf; the EE record for the same leaf wins.
    assert_fails(verify([old.der, pki.inter.der], records[:1], [MX]), Reason.EXPIRED)
    assert_ok(verify([old.der, pki.inter.der], records, [MX]), Reason.EE_MATCH, 3, 0)


# -- DANE-TA ------------------------------------------------------------------------------


def test_ta_root_or_intermediate_presented(pki: PKI) -> None:
    full = [*pki.chain, pki.root.der]
    assert_ok(verify(full, [rec(pki.root, 2)], [MX]), Reason.TA_MATCH, 2, 2)
    assert_ok(verify(full, [rec(pki.inter, 2, 0, 1)], [MX]), Reason.TA_MATCH, 2, 1)
    # Order as the server sent it does not matter to path building.
    assert_ok(verify([pki.leaf.der, pki.root.der, pki.inter.der], [rec(pki.root, 2, 0, 2)],
                     [MX]), Reason.TA_MATCH, 2, 1)
    # Unrelated extra certificates and garbage in the chain are ignored.
    noisy = [pki.leaf.der, pki.other_root.der, b"\x30\x03\x02\x01\x00", pki.inter.der]
    assert_ok(verify(noisy, [rec(pki.inter, 2)], [MX]), Reason.TA_MATCH, 2, 3)


def test_ta_must_be_presented_unless_full_key(pki: PKI) -> None:
    # The root is not sent: its digest cannot be matched ...
    for selector, mtype in ((0, 0), (0, 1), (1, 1), (1, 2)):
        assert_fails(verify(pki.chain, [rec(pki.root, 2, selector, mtype)], [MX]), Reason.NO_MATCH)
    # ... but its full public key ("2 1 0") can be checked against the signature.
    assert_ok(verify(pki.chain, [rec(pki.root, 2, 1, 0)], [MX]), Reason.TA_MATCH, 2, 2)
    # The key of the leaf's direct issuer, with only the leaf presented.
    assert_ok(verify([pki.leaf.der], [rec(pki.inter, 2, 1, 0)], [MX]), Reason.TA_MATCH, 2, 1)


def test_ta_bare_key_still_needs_a_valid_path(pki: PKI) -> None:
    # Root key published, intermediate missing from the chain: nothing it signed is here.
    assert_fails(verify([pki.leaf.der], [rec(pki.root, 2, 1, 0)], [MX]), Reason.NO_MATCH)
    # A key that signed nothing presented.
    assert_fails(verify(pki.chain, [rec(pki.other_root, 2, 1, 0)], [MX]), Reason.NO_MATCH)
    # Names and dates are checked as for a presented TA.
    assert_fails(verify(pki.chain, [rec(pki.root, 2, 1, 0)], ["other.example"]),
                 Reason.NAME_MISMATCH)
    old = make_leaf(pki.inter, [MX], **expired())
    assert_fails(verify([old.der, pki.inter.der], [rec(pki.root, 2, 1, 0)], [MX]),
                 Reason.EXPIRED)


def test_ta_reference_identifiers(pki: PKI) -> None:
    ta = [rec(pki.inter, 2)]
    assert verify(pki.chain, ta, [MX]).ok
    assert verify(pki.chain, ta, ["MAIL.Example.NET."]).ok  # case and root dot ignored
    assert verify(pki.chain, ta, ["example.net", "mail.example.net"]).ok  # any one suffices
    for names in ([], ["example.net"], ["mx.example.net.evil"], ["x.mx.example.net"]):
        assert_fails(verify(pki.chain, ta, names), Reason.NAME_MISMATCH)


def test_ta_wildcard_is_one_leftmost_label(pki: PKI) -> None:
    leaf = make_leaf(pki.inter, ["*.example.net"])
    chain, ta = [leaf.der, pki.inter.der], [rec(pki.inter, 2)]
    assert_ok(verify(chain, ta, [MX]), Reason.TA_MATCH, 2, 1)
    for name in ("example.net", "a.mx.example.net", "mx.example.org", "*.example.net"):
        assert_fails(verify(chain, ta, [name]), Reason.NAME_MISMATCH)
    partial = make_leaf(pki.inter, ["m*.example.net", "mx.*.net"])
    assert_fails(verify([partial.der, pki.inter.der], ta, [MX]), Reason.NAME_MISMATCH)


def test_ta_uses_san_not_cn(pki: PKI) -> None:
    leaf = make_leaf(pki.inter, [], cn=MX)
    assert_fails(verify([leaf.der, pki.inter.der], [rec(pki.inter, 2)], [MX]),
                 Reason.NAME_MISMATCH)


def test_ta_checks_dates(pki: PKI) -> None:
    ta = [rec(pki.inter, 2)]
    old = make_leaf(pki.inter, [MX], **expired())
    assert_fails(verify([old.der, pki.inter.der], ta, [MX]), Reason.EXPIRED)
    future = make_leaf(pki.inter, [MX], **not_yet_valid())
    assert_fails(verify([future.der, pki.inter.der], ta, [MX]), Reason.NOT_YET_VALID)
    # `now` is the verification time.
    later = utcnow() + dt.timedelta(days=5)
    assert verify([future.der, pki.inter.der], ta, [MX], now=later).ok
    assert_fails(verify(pki.chain, ta, [MX], now=utcnow() + dt.timedelta(days=400)),
                 Reason.EXPIRED)
    # An expired intermediate under a root TA.
    old_inter = make_intermediate(pki.root, **expired())
    leaf = make_leaf(old_inter, [MX])
    assert_fails(verify([leaf.der, old_inter.der], [rec(pki.root, 2, 1, 0)], [MX]),
                 Reason.EXPIRED)


def test_ta_checks_signatures_and_ca_flag(pki: PKI) -> None:
    # A leaf claiming the intermediate as issuer, signed by another key.
    forged = make_leaf(pki.other_root, [MX])
    forged_cert = x509.CertificateBuilder(
        issuer_name=pki.inter.cert.subject,
        subject_name=forged.cert.subject,
        public_key=forged.key.public_key(),
        serial_number=forged.cert.serial_number,
        not_valid_before=forged.cert.not_valid_before_utc,
        not_valid_after=forged.cert.not_valid_after_utc,
        extensions=list(forged.cert.extensions),
    ).sign(make_key(), hashes.SHA256())
    forged_der = forged_cert.public_bytes(serialization.Encoding.DER)
    assert_fails(verify([forged_der, pki.inter.der], [rec(pki.inter, 2)], [MX]),
                 Reason.CHAIN_INVALID)
    # A non-CA certificate that signed the leaf cannot be a trust anchor.
    not_ca = make_leaf(pki.inter, ["ca.example.net"])
    leaf = make_leaf(not_ca, [MX])
    assert_fails(verify([leaf.der, not_ca.der], [rec(not_ca, 2)], [MX]), Reason.CHAIN_INVALID)
    assert_fails(verify([leaf.der, not_ca.der], [rec(not_ca, 2, 1, 0)], [MX]),
                 Reason.CHAIN_INVALID)


def test_ta_matching_the_leaf_itself() -> None:
    # A self-signed server certificate published as a TA: its own anchor, but unlike
    # DANE-EE its name and dates are checked.
    leaf = make_leaf(None, [MX])
    for selector, mtype in ((0, 1), (1, 1), (1, 0)):
        assert_ok(verify([leaf.der], [rec(leaf, 2, selector, mtype)], [MX]), Reason.TA_MATCH, 2, 0)
    assert_fails(verify([leaf.der], [rec(leaf, 2)], ["other.example"]), Reason.NAME_MISMATCH)
    old = make_leaf(None, [MX], **expired())
    assert_fails(verify([old.der], [rec(old, 2)], [MX]), Reason.EXPIRED)


def test_ta_private_ca_profile() -> None:
    # OpenSSL's default CA profile: no keyUsage on the CA.
    root = make_root(key_usage=False)
    leaf = make_leaf(root, [MX])
    assert_ok(verify([leaf.der, root.der], [rec(root, 2)], [MX]), Reason.TA_MATCH, 2, 1)


def test_ta_rsa_chain() -> None:
    root = make_root(key_type="rsa")
    leaf = make_leaf(root, [MX], key_type="rsa")
    assert_ok(verify([leaf.der], [rec(root, 2, 1, 0)], [MX]), Reason.TA_MATCH, 2, 1)
    assert_ok(verify([leaf.der], [rec(leaf, 3, 0, 2)], [MX]), Reason.EE_MATCH, 3, 0)


def test_first_ta_failure_is_reported(pki: PKI) -> None:
    records = [rec(pki.other_root, 2), rec(pki.inter, 2)]
    verdict = verify(pki.chain, records, ["other.example"])
    assert_fails(verdict, Reason.NAME_MISMATCH)
    assert (verdict.record, verdict.usage, verdict.depth) == (records[1], 2, 1)
    assert "other.example" in verdict.detail


# -- garbage ------------------------------------------------------------------------------


def _corrupt_inside(der: bytes) -> bytes:
    # Same DER outline (the SPKI can still be cut out), but the validity's UTCTime
    # is no longer a time: cryptography refuses to parse the certificate.
    pos = der.find(b"\x17\x0d")
    assert pos > 0
    return der[: pos + 2] + b"XX" + der[pos + 4 :]


def test_garbage_der_never_raises(pki: PKI) -> None:
    records = [rec(pki.leaf, 3, 0, 1), rec(pki.inter, 2), rec(pki.root, 2, 1, 0)]
    garbage = [
        b"", b"\x00", b"\x30", b"\x30\x80\x00\x00", b"\x30\x84\xff\xff\xff\xff",
        b"\x30\x03\x02\x01\x00", b"\x1f\xff\xff", pki.leaf.der[:-1], pki.leaf.der + b"\x00",
        pki.leaf.der[:40], bytes(range(256)) * 4,
    ]
    for bad in garbage:
        for chain in ([bad], [bad, pki.inter.der], [bad, bad]):
            assert_fails(verify(chain, records, [MX]), Reason.BAD_CERTIFICATE)
        assert_fails(fingerprint_matches([bad], [b"\x00" * 32]), Reason.BAD_CERTIFICATE)
    assert_fails(verify([], records, [MX]), Reason.NO_CERTIFICATE)
    assert_fails(fingerprint_matches([], [b"\x00" * 32]), Reason.NO_CERTIFICATE)


def test_unparsable_but_well_framed_leaf(pki: PKI) -> None:
    broken = _corrupt_inside(pki.leaf.der)
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(broken)
    chain = [broken, pki.inter.der]
    # DANE-EE compares bytes only (RFC 6698): the record for these bytes matches.
    assert verify(chain, [tlsa_record(broken, 3, 0, 1)], [MX]).ok
    assert verify(chain, [tlsa_record(broken, 3, 1, 1)], [MX]).ok
    # DANE-TA needs a certificate to validate.
    assert_fails(verify(chain, [rec(pki.inter, 2)], [MX]), Reason.BAD_CERTIFICATE)


# -- fingerprints -------------------------------------------------------------------------


def test_fingerprint_pins(pki: PKI) -> None:
    cert_pin = hashlib.sha256(pki.leaf.der).digest()
    key_pin = hashlib.sha256(pki.leaf.spki_der).digest()
    other = hashlib.sha256(pki.other_leaf.der).digest()
    v = fingerprint_matches(pki.chain, [other, cert_pin])
    assert (v.ok, v.reason, v.depth, v.usage, v.record) == (True, "fingerprint match", 0,
                                                            None, None)
    assert fingerprint_matches(pki.chain, [key_pin]).ok
    # Renewed certificate, same key: the key pin still holds, the certificate pin not.
    renewed_cert = x509.CertificateBuilder(
        issuer_name=pki.inter.cert.subject,
        subject_name=pki.leaf.cert.subject,
        public_key=pki.leaf.key.public_key(),
        serial_number=x509.random_serial_number(),
        not_valid_before=utcnow(),
        not_valid_after=utcnow() + dt.timedelta(days=90),
    ).sign(pki.inter.key, hashes.SHA256())
    renewed = [renewed_cert.public_bytes(serialization.Encoding.DER), pki.inter.der]
    assert fingerprint_matches(renewed, [key_pin]).ok
    assert_fails(fingerprint_matches(renewed, [cert_pin]), Reason.FINGERPRINT_MISMATCH)
    # Only the leaf counts; pins of another length or an empty set never match.
    assert_fails(fingerprint_matches(pki.chain, [hashlib.sha256(pki.inter.der).digest()]),
                 Reason.FINGERPRINT_MISMATCH)
    assert_fails(fingerprint_matches(pki.chain, [hashlib.sha512(pki.leaf.der).digest(),
                                                 cert_pin[:20]]), Reason.FINGERPRINT_MISMATCH)
    assert_fails(fingerprint_matches(pki.chain, []), Reason.FINGERPRINT_MISMATCH)


def test_write_chain_file(tmp_path: Path, pki: PKI) -> None:
    path = write_chain_file(tmp_path / "sub" / "chain.pem", pki.leaf, pki.inter)
    assert path.stat().st_mode & 0o777 == 0o600
    blocks = re.findall(rb"-----BEGIN ([A-Z ]+)-----", path.read_bytes())
    assert blocks == [b"PRIVATE KEY", b"CERTIFICATE", b"CERTIFICATE"]
    certs = x509.load_pem_x509_certificates(path.read_bytes())
    assert [c.public_bytes(serialization.Encoding.DER) for c in certs] == pki.chain
    paths = write_pki(tmp_path / "pki", pki.leaf, pki.inter, pki.root)
    assert paths["key"].stat().st_mode & 0o777 == 0o600
    assert x509.load_pem_x509_certificate(paths["ca"].read_bytes()) == pki.root.cert


# -- a real Postfix receiver with STARTTLS, checked by OpenSSL's DANE ---------------------


@pytest.fixture
def lab() -> Iterator[object]:
    from gatelab.netlab import Lab, netns_usable, reap_stale_namespaces
    from gatelab.postfix_instance import postfix_usable

    reason = netns_usable() or postfix_usable()
    if reason:
        pytest.skip(reason)
    reap_stale_namespaces()
    with Lab() as lab:
        yield lab


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_postfix_receiver_starttls_verified_by_openssl_dane(
    lab: object, tmp_path: Path, pki: PKI
) -> None:
    from gatelab.netlab import PEER_V4, Lab
    from gatelab.postfix_instance import PostfixInstance, tls_receiver_settings

    assert isinstance(lab, Lab)
    chain_file = write_chain_file(tmp_path / "mx-chain.pem", pki.leaf, pki.inter)
    receiver = PostfixInstance(
        lab.peer, tmp_path, tls_receiver_settings(PEER_V4, chain_file), name="mx"
    )

    def s_client(record: TLSARecord, smtp: str = "QUIT\n") -> str:
        # OpenSSL's own DANE code checks our generated record against what Postfix sends.
        # -ign_eof: lines like "RCPT" are SMTP here, not s_client's R(enegotiate) command.
        # fmt: off
        cp = lab.mta.run(
            ["openssl", "s_client", "-connect", f"{PEER_V4}:25", "-starttls", "smtp",
             "-name", "client.example.com", "-servername", MX, "-showcerts", "-crlf",
             "-ign_eof", "-dane_tlsa_domain", MX, "-dane_tlsa_rrdata", str(record),
             "-verify_return_error"],
            input=smtp, check=False, timeout=20,
        )
        # fmt: on
        return str(cp.stdout) + str(cp.stderr)

    transaction = (
        "EHLO client.example.com\nMAIL FROM:<alice@example.com>\n"
        "RCPT TO:<bob@example.net>\nDATA\nSubject: over TLS\n\nhello\n.\nQUIT\n"
    )
    with receiver:
        ee_out = s_client(tlsa_record(pki.leaf.der), transaction)
        assert "Verification: OK" in ee_out, ee_out
        assert re.search(r"DANE TLSA 3 1 1 .*matched EE certificate", ee_out), ee_out
        assert "250 2.0.0 Ok: queued" in ee_out, ee_out
        ta_out = s_client(tlsa_record(pki.root.der, 2, 1, 0))
        assert "Verification: OK" in ta_out, ta_out
        assert f"Verified peername: {MX}" in ta_out, ta_out
        wrong_out = s_client(tlsa_record(pki.other_leaf.der))
        assert "Verification: OK" not in wrong_out, wrong_out
        # The chain Postfix presented, as s_client printed it, verifies with our code too.
        presented = [
            x509.load_pem_x509_certificate(m.encode()).public_bytes(serialization.Encoding.DER)
            for m in re.findall(
                r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", ee_out, re.S
            )
        ]
        assert presented == pki.chain
        assert verify(presented, [tlsa_record(pki.root.der, 2, 1, 0)], [MX]).ok
        receiver.wait_log(r"postfix/smtpd\[\d+\]: Anonymous TLS connection established from")
        # smtpd_tls_received_header: the delivered message says how it came in.
        (message,) = receiver.wait_maildir(1)
        received = message.read_text()
        assert re.search(r"\(using TLSv1\.[23] with cipher \S+", received), received

#!/usr/bin/env python3
"""Fuzz gateway.dane: TLSA association data (tlsa_data, and the DER walk _spki_der/_tlv that
cuts the SubjectPublicKeyInfo out of a certificate), TLSA records as DNS hands them over
(wire and presentation form, through dnspython as gateway/discovery.py does), and verify()
on arbitrary chains.  Input: chunks of kind (1 byte), length (2 bytes), payload: "C" a
certificate (DER), "R" a record (usage, selector, matching type, data), "D" a record derived
from a certificate already given (usage, selector, matching type, index), "W" TLSA rdata in
wire form, "T" in presentation form.

Invariants: only the documented errors are raised (ValueError for bytes that are not a DER
certificate or unknown parameters; dnspython's DNSException for rdata it refuses); the SPKI
is one whole DER element inside the certificate; association data has the length its
matching type says; a record prints and reads back the same; verify() always returns a
Verdict, and a passing one is honest (DANE-EE: the record is the leaf's own data; DANE-TA:
the leaf is a certificate); a pin of the leaf's SHA-256 matches exactly when the leaf is
shaped like a certificate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib

import common
import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import dane
from gateway.dane import Reason, TLSARecord

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)  # inside the seeds' validity: deterministic
NAMES = ["mx.b.test"]
DIGEST_LEN = {1: 32, 2: 64}


def chunks(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos + 3 <= len(data):
        size = int.from_bytes(data[pos + 1:pos + 3], "big")
        out.append((data[pos], data[pos + 3:pos + 3 + size]))
        pos += 3 + size
    return out


def from_dns(kind: int, payload: bytes) -> TLSARecord | None:
    try:
        if kind == ord("W"):
            rdata = dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.TLSA, payload, 0,
                                        len(payload))
        else:
            rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TLSA,
                                        payload.decode("ascii", "replace"))
    except (dns.exception.DNSException, ValueError):
        return None
    # As gateway/discovery.py builds its records from an answer.
    return TLSARecord(rdata.usage, rdata.selector, rdata.mtype,  # type: ignore[attr-defined]
                      bytes(rdata.cert))  # type: ignore[attr-defined]


def check_cert(cert: bytes) -> bytes | None:
    """The SPKI of ``cert``, checked; None when it is not shaped like a certificate."""
    try:
        spki = dane._spki_der(cert)
    except ValueError:
        spki = None
    if spki is not None:
        assert spki in cert and spki[0] == 0x30, "SPKI is not a SEQUENCE of the certificate"
        _, _, end = dane._tlv(spki, 0)
        assert end == len(spki), "SPKI is not one whole DER element"
    for selector in (0, 1, 2):
        for mtype in (0, 1, 2, 3):
            try:
                got = dane.tlsa_data(cert, selector, mtype)
            except ValueError:
                assert spki is None or selector == 2 or mtype == 3, (selector, mtype)
                continue
            assert spki is not None, "data for bytes that are not a certificate"
            selected = cert if selector == 0 else spki
            assert len(got) == DIGEST_LEN.get(mtype, len(selected)), (selector, mtype)
    return spki


def check_record(record: TLSARecord) -> None:
    usage, selector, mtype, hexdata = str(record).split(" ")
    assert (int(usage), int(selector), int(mtype), bytes.fromhex(hexdata)) == (
        record.usage, record.selector, record.mtype, record.data), "record does not print back"
    assert record.to_zone("mx.b.test").startswith("mx.b.test. IN TLSA ")
    assert isinstance(record.usable, bool)


def test_one_input(data: bytes) -> None:
    chain: list[bytes] = []
    records: list[TLSARecord] = []
    for kind, payload in chunks(data)[:8]:
        if kind == ord("C"):
            chain.append(payload)
            check_cert(payload)
        elif kind == ord("R") and len(payload) >= 3:
            records.append(TLSARecord(payload[0], payload[1], payload[2], payload[3:]))
        elif kind == ord("D") and len(payload) >= 4 and chain:
            usage, selector, mtype, index = payload[:4]
            with contextlib.suppress(ValueError):  # not a certificate: nothing to derive
                records.append(dane.tlsa_record(chain[index % len(chain)], usage, selector,
                                                mtype))
        elif kind in (ord("W"), ord("T")) and (record := from_dns(kind, payload)):
            records.append(record)
    for record in records:
        check_record(record)
    verdict = dane.verify(chain, records, NAMES, now=NOW)
    assert isinstance(verdict, dane.Verdict)
    if verdict.ok:
        r = verdict.record
        assert r is not None and r.usable and r in records
        if verdict.reason == Reason.EE_MATCH:
            assert r.usage == 3 and dane.tlsa_data(chain[0], r.selector, r.mtype) == r.data
        else:
            assert verdict.reason == Reason.TA_MATCH and r.usage == 2
            x509.load_der_x509_certificate(chain[0])  # the leaf is a certificate
    else:
        assert verdict.reason in set(Reason), verdict.reason
    if chain:
        pinned = dane.fingerprint_matches(chain, [hashlib.sha256(chain[0]).digest()])
        assert pinned.ok == (check_cert(chain[0]) is not None), "pin verdict is not honest"


# -- seeds: a real chain and the records that authenticate it --------------------------------

def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
          signer: ec.EllipticCurvePrivateKey, ca: bool) -> bytes:
    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
               .public_key(key.public_key()).serial_number(7)
               .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
               .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in NAMES]), critical=False)
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def chunk(kind: str, payload: bytes) -> bytes:
    return kind.encode() + len(payload).to_bytes(2, "big") + payload


def seeds() -> list[bytes]:
    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    root = _cert("root", root_key, "root", root_key, True)
    leaf = _cert("mx.b.test", leaf_key, "root", root_key, False)
    spki = root_key.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    ee = dane.tlsa_data(leaf, 1, 1)
    chain = chunk("C", leaf) + chunk("C", root)
    return [
        chain + chunk("D", bytes([3, 1, 1, 0])),  # DANE-EE
        chain + chunk("D", bytes([2, 0, 1, 1])),  # DANE-TA, the TA presented
        chunk("C", leaf) + chunk("R", bytes([2, 1, 0]) + spki),  # DANE-TA key not presented
        chunk("C", leaf) + chunk("W", bytes([3, 1, 1]) + ee),
        chunk("C", leaf) + chunk("T", b"3 1 1 " + ee.hex().encode()),
        chunk("C", b"\x30\x03\x30\x01\x00") + chunk("R", bytes([3, 0, 0]) + b"\x30"),
    ]


if __name__ == "__main__":
    common.main(test_one_input, seeds)

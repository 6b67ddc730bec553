"""DANE TLSA records (RFC 6698, RFC 7671, RFC 7672): record model, generation, matching.

Pure: no I/O.  :func:`verify` decides whether a peer's presented certificate chain is
authenticated by a TLSA RRset; :func:`fingerprint_matches` does the same for pinned
SHA-256 fingerprints; :func:`tlsa_record` makes the records an operator publishes.

DANE-EE(3) matches the leaf only, and nothing else about the leaf is checked (no name,
no validity dates: RFC 7672 3.1.1).  DANE-TA(2) supports three forms:

* the TA certificate is presented in the chain (root or intermediate, any selector and
  matching type): it becomes the only trust anchor of a ``cryptography`` path
  validation, which checks signatures, validity dates of every certificate (the TA's
  own included), basic constraints and path length; the TA must be a CA certificate
  (basicConstraints cA, critical) - a non-CA TA other than the leaf fails;
* the TA record matches the leaf itself: the leaf is its own anchor (e.g. a
  self-signed certificate published as ``2 0 1``); its name and dates are still checked;
* ``2 1 0`` with the TA certificate not presented: the published public key must have
  signed a presented certificate; it is wrapped in a synthetic CA certificate with no
  dates of its own (the verifier never checks an anchor's own signature, so only the
  key counts).  ``2 x 1``/``2 x 2``/``2 0 0`` need the TA in the presented chain.

With DANE-TA the leaf must also carry one of the reference identifiers as a SAN dNSName
(RFC 7672 3.2.3; a wildcard only as the whole left-most label; no CN fallback).
Relative to cryptography's Web PKI profile two requirements are relaxed, both common in
private CAs that DANE-TA is made for: a CA need not have keyUsage (if present it must
allow keyCertSign), and a leaf need not have authorityKeyIdentifier.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)


class Usage(IntEnum):
    PKIX_TA = 0
    PKIX_EE = 1
    DANE_TA = 2
    DANE_EE = 3


class Selector(IntEnum):
    CERT = 0
    SPKI = 1


class Matching(IntEnum):
    FULL = 0
    SHA256 = 1
    SHA512 = 2


_DIGEST_LEN = {Matching.SHA256: 32, Matching.SHA512: 64}


@dataclass(frozen=True, slots=True)
class TLSARecord:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 3.1: SMTP uses DANE-TA(2) and DANE-EE(3) only; PKIX usages 0/1 and any
        unknown parameter make a record unusable (never an error)."""
        if self.usage not in (Usage.DANE_TA, Usage.DANE_EE):
            return False
        if self.selector not in (Selector.CERT, Selector.SPKI):
            return False
        if self.mtype == Matching.FULL:
            return len(self.data) > 0
        expected = _DIGEST_LEN.get(Matching(self.mtype)) if self.mtype in (1, 2) else None
        # A digest of the wrong length can never match: unusable, like RFC 7671 5.2 says
        # for malformed records.
        return expected is not None and len(self.data) == expected

    def to_zone(self, owner: str) -> str:
        """Zone-file line, e.g. ``_25._tcp.mx.example.com. IN TLSA 3 1 1 <hex>``; the
        owner is made absolute so that pasting it into any zone means the same name."""
        if not owner.endswith("."):
            owner += "."
        return f"{owner} IN TLSA {self}"

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


def tlsa_owner(host: str, port: int = 25) -> str:
    """``_25._tcp.<host>.``: where the TLSA RRset for a server lives (RFC 6698 3)."""
    return f"_{port}._tcp.{host.rstrip('.')}."


# -- DER ----------------------------------------------------------------------------------
# The selector-1 data is the SubjectPublicKeyInfo exactly as encoded in the certificate.
# Re-encoding the parsed key could differ (or fail for key types cryptography lacks),
# so the bytes are cut out of the certificate with a minimal DER walker.

_SEQUENCE = 0x30
_INTEGER = 0x02
_VERSION_TAG = 0xA0  # [0] EXPLICIT Version


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("high tag numbers do not occur in a certificate's outline")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")  # 0: indefinite length, not DER
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _spki_der(cert_der: bytes) -> bytes:
    """The SubjectPublicKeyInfo DER of a certificate; ValueError when the bytes are not
    shaped like one (Certificate SEQUENCE holding a TBSCertificate SEQUENCE)."""
    tag, start, end = _tlv(cert_der, 0)
    if tag != _SEQUENCE or end != len(cert_der):
        raise ValueError("not a DER certificate")
    tag, pos, tbs_end = _tlv(cert_der, start)
    if tag != _SEQUENCE:
        raise ValueError("not a DER certificate")
    tag, _, next_pos = _tlv(cert_der, pos)
    if tag == _VERSION_TAG:
        pos = next_pos
        tag, _, next_pos = _tlv(cert_der, pos)
    if tag != _INTEGER:
        raise ValueError("not a DER certificate")
    pos = next_pos
    # signature AlgorithmIdentifier, issuer, validity, subject: four SEQUENCEs, then SPKI.
    for _ in range(5):
        tag, _, next_pos = _tlv(cert_der, pos)
        if tag != _SEQUENCE or next_pos > tbs_end:
            raise ValueError("not a DER certificate")
        spki_start, pos = pos, next_pos
    return cert_der[spki_start:pos]


def _match_data(selected: bytes, mtype: int) -> bytes:
    if mtype == Matching.FULL:
        return selected
    if mtype == Matching.SHA256:
        return hashlib.sha256(selected).digest()
    if mtype == Matching.SHA512:
        return hashlib.sha512(selected).digest()
    raise ValueError(f"unknown TLSA matching type {mtype}")


def tlsa_data(cert_der: bytes, selector: int, mtype: int) -> bytes:
    """Association data of a certificate: selector 0 = the whole DER certificate,
    1 = its DER SubjectPublicKeyInfo; matching 0 = as is, 1 = SHA-256, 2 = SHA-512.
    ValueError for unknown parameters or bytes that are not a DER certificate."""
    spki = _spki_der(cert_der)
    if selector == Selector.CERT:
        selected = cert_der
    elif selector == Selector.SPKI:
        selected = spki
    else:
        raise ValueError(f"unknown TLSA selector {selector}")
    return _match_data(selected, mtype)


def tlsa_record(cert_der: bytes, usage: int = 3, selector: int = 1, mtype: int = 1) -> TLSARecord:
    """The record that authenticates ``cert_der``; the default ``3 1 1`` (the key's
    SHA-256) survives certificate renewals with the same key."""
    return TLSARecord(usage, selector, mtype, tlsa_data(cert_der, selector, mtype))


# -- verdicts -------------------------------------------------------------------------------


class Reason(StrEnum):
    """Closed vocabulary for Verdict.reason: fit for a metric label."""

    EE_MATCH = "dane-ee match"
    TA_MATCH = "dane-ta match"
    FINGERPRINT_MATCH = "fingerprint match"
    NO_CERTIFICATE = "no certificate"
    BAD_CERTIFICATE = "bad certificate"
    NO_USABLE_RECORD = "no usable record"
    NO_MATCH = "no matching record"
    NAME_MISMATCH = "name mismatch"
    CHAIN_INVALID = "chain invalid"
    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"
    FINGERPRINT_MISMATCH = "fingerprint mismatch"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Outcome of matching a presented chain.  ``depth`` is the position in the presented
    chain of what matched (0 = leaf); for a DANE-TA key that was not presented, one above
    the certificate it signed.  ``detail`` is free text for logs, never for labels."""

    ok: bool
    usage: int | None
    record: TLSARecord | None
    depth: int | None
    reason: str
    detail: str = ""


def _fail(reason: Reason, detail: str = "", record: TLSARecord | None = None,
          depth: int | None = None) -> Verdict:
    usage = record.usage if record is not None else None
    return Verdict(False, usage, record, depth, reason, detail)


# -- DANE-TA path validation ------------------------------------------------------------------


def _ca_key_usage(policy: Policy, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.key_cert_sign:
        raise ValueError("CA keyUsage without keyCertSign")


@functools.cache
def _ta_builder() -> PolicyBuilder:
    # Web PKI defaults, minus two rules that private CAs (DANE-TA's main use) often
    # break: OpenSSL's default CA profile has no keyUsage, and older or self-signed
    # leaves lack authorityKeyIdentifier.  Signatures, dates, cA and path length are
    # checked as before.
    ca_policy = ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage
    )
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None
    )
    return PolicyBuilder().extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)


@functools.cache
def _synthetic_signer() -> ec.EllipticCurvePrivateKey:
    # Signs synthetic trust anchors.  The verifier never checks an anchor's own
    # signature, so any key will do; one per process saves the key generation.
    return ec.generate_private_key(ec.SECP256R1())


# No DSA: deprecated (cryptography warns on the mere attribute access), and no CA signs
# with it any more; a "2 1 0" DSA key simply matches nothing.
_ISSUER_KEY_TYPES = (
    rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)
_SYNTHETIC_ISSUER = x509.Name(
    [x509.NameAttribute(x509.NameOID.COMMON_NAME, "smtpgate DANE-TA key")]
)


def _synthetic_anchor(subject: x509.Name, key: CertificateIssuerPublicKeyTypes) -> x509.Certificate:
    """A CA certificate carrying a bare TA public key under the name the presented chain
    expects (the issuer of the certificate the key signed); valid for all time, since a
    bare key has no dates and DNS (its TTL) bounds its life."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(_SYNTHETIC_ISSUER)  # not self-issued: nothing to self-verify
        .public_key(key)
        .serial_number(1)
        .not_valid_before(dt.datetime(1970, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(_synthetic_signer(), hashes.SHA256())
    )


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _san_matches(pattern: str, name: str) -> bool:
    """RFC 6125 6.4 as RFC 7672 3.2.3 narrows it: exact (case-insensitive) or ``*`` as
    the entire left-most label standing for exactly one label."""
    pattern = _normalize(pattern)
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    label, _, rest = name.partition(".")
    return bool(label) and "." in rest and rest == pattern[2:]


def matching_names(leaf: x509.Certificate, names: Sequence[str]) -> list[str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    dns_names = san.get_values_for_type(x509.DNSName)
    wanted = [_normalize(n) for n in names]
    # A reference identifier is a host name, never a pattern.
    return [
        n for n in dict.fromkeys(wanted)
        if n and "*" not in n and any(_san_matches(p, n) for p in dns_names)
    ]


def path_error(exc: Exception) -> Reason:
    # The verifier reports a certificate outside its validity period (leaf, intermediate
    # or TA) only in its message.
    return Reason.EXPIRED if "not valid at validation time" in str(exc) else Reason.CHAIN_INVALID


def _validate_path(leaf: x509.Certificate, intermediates: list[x509.Certificate],
                   anchor: x509.Certificate, names: list[str],
                   now: dt.datetime) -> tuple[Reason | None, str]:
    """(None, "") when leaf chains to ``anchor`` and carries one of ``names``."""
    builder = _ta_builder().store(Store([anchor])).time(now)
    last: tuple[Reason, str] = (Reason.NAME_MISMATCH, "no usable reference identifier")
    for name in names:
        try:
            verifier = builder.build_server_verifier(x509.DNSName(name))
        except ValueError as exc:  # a name the verifier cannot represent (e.g. "a_b.example")
            last = (Reason.NAME_MISMATCH, f"{name}: {exc}")
            continue
        try:
            verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            last = (path_error(exc), str(exc))
            continue
        except ValueError as exc:  # a field parsed only now (a name, say) does not parse
            last = (Reason.BAD_CERTIFICATE, str(exc))
            continue
        return None, ""
    return last


# -- matching ---------------------------------------------------------------------------------


class _Chain:
    """The presented chain with lazily computed association data per position."""

    def __init__(self, chain_der: Sequence[bytes]) -> None:
        self.der = [bytes(c) for c in chain_der]
        self._spki: dict[int, bytes | None] = {}
        self._parsed: dict[int, x509.Certificate | None] = {}
        self._data: dict[tuple[int, int, int], bytes | None] = {}

    def spki(self, i: int) -> bytes | None:
        if i not in self._spki:
            try:
                self._spki[i] = _spki_der(self.der[i])
            except ValueError:
                self._spki[i] = None
        return self._spki[i]

    def cert(self, i: int) -> x509.Certificate | None:
        if i not in self._parsed:
            try:
                self._parsed[i] = x509.load_der_x509_certificate(self.der[i])
            except (ValueError, x509.InvalidVersion):  # the latter is no ValueError
                self._parsed[i] = None
        return self._parsed[i]

    def data(self, i: int, selector: int, mtype: int) -> bytes | None:
        key = (i, selector, mtype)
        if key not in self._data:
            selected = self.der[i] if selector == Selector.CERT else self.spki(i)
            if self.spki(i) is None or selected is None:
                self._data[key] = None
            else:
                self._data[key] = _match_data(selected, mtype)
        return self._data[key]

    def matches(self, i: int, record: TLSARecord) -> bool:
        return self.data(i, record.selector, record.mtype) == record.data

    def parsed_intermediates(self) -> list[x509.Certificate]:
        # Garbage among the extra certificates is ignored: a path that needs it fails.
        return [c for i in range(1, len(self.der)) if (c := self.cert(i)) is not None]


def _ta_anchors(chain: _Chain, record: TLSARecord) -> Iterator[tuple[int, x509.Certificate]]:
    """(depth, anchor) candidates for one DANE-TA record."""
    presented = False
    for i in range(len(chain.der)):
        if chain.matches(i, record) and (cert := chain.cert(i)) is not None:
            presented = True
            yield i, cert
    if presented or record.selector != Selector.SPKI or record.mtype != Matching.FULL:
        return
    # "2 1 0" not presented: the key must have signed one of the presented certificates.
    try:
        key = serialization.load_der_public_key(record.data)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # a key (type, curve) we lack
        return
    if not isinstance(key, _ISSUER_KEY_TYPES):
        return
    for i in range(len(chain.der)):
        cert = chain.cert(i)
        if cert is None:
            continue
        try:
            anchor = _synthetic_anchor(cert.issuer, key)  # the issuer is parsed only here
            cert.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue  # not signed by this key (or not a certificate that could tell)
        yield i + 1, anchor


def verify(chain_der: Sequence[bytes], records: Sequence[TLSARecord], names: Sequence[str],
           now: dt.datetime | None = None) -> Verdict:
    """Authenticate a presented chain (``chain_der[0]`` the leaf, the rest as the server
    sent them) against a TLSA RRset; ``names`` are the reference identifiers for
    DANE-TA (RFC 7672 3.2.3: the TLSA base domain, usually also the next-hop name).

    Only usable records count; DANE-EE records are tried first, any match wins.  ``now``
    (default: the current time; naive means UTC) is when DANE-TA dates are checked.
    Never raises on malformed certificates: that is a failing verdict."""
    usable = [r for r in records if r.usable]
    if not chain_der:
        return _fail(Reason.NO_CERTIFICATE)
    chain = _Chain(chain_der)
    if chain.spki(0) is None:
        return _fail(Reason.BAD_CERTIFICATE, "leaf is not a DER certificate")
    if not usable:
        return _fail(Reason.NO_USABLE_RECORD)

    for record in usable:
        if record.usage == Usage.DANE_EE and chain.matches(0, record):
            return Verdict(True, record.usage, record, 0, Reason.EE_MATCH)

    ta_records = [r for r in usable if r.usage == Usage.DANE_TA]
    if not ta_records:
        return _fail(Reason.NO_MATCH)
    when = now if now is not None else dt.datetime.now(dt.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    first_failure: Verdict | None = None
    for record in ta_records:
        for depth, anchor in _ta_anchors(chain, record):
            failure = _check_ta(chain, anchor, names, when)
            if failure is None:
                return Verdict(True, record.usage, record, depth, Reason.TA_MATCH)
            if first_failure is None:
                first_failure = _fail(failure[0], failure[1], record, depth)
    return first_failure if first_failure is not None else _fail(Reason.NO_MATCH)


def _check_ta(chain: _Chain, anchor: x509.Certificate, names: Sequence[str],
              now: dt.datetime) -> tuple[Reason, str] | None:
    leaf = chain.cert(0)
    if leaf is None:
        return Reason.BAD_CERTIFICATE, "leaf does not parse"
    # Dates and names first: they give the operator-meaningful reason.
    if now < leaf.not_valid_before_utc:
        return Reason.NOT_YET_VALID, f"leaf valid from {leaf.not_valid_before_utc:%Y-%m-%d}"
    if now > leaf.not_valid_after_utc:
        return Reason.EXPIRED, f"leaf expired {leaf.not_valid_after_utc:%Y-%m-%d}"
    try:
        matched = matching_names(leaf, names)
    # A malformed extension surfaces on first access, not always as a ValueError.
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        return Reason.BAD_CERTIFICATE, str(exc)
    if not matched:
        return Reason.NAME_MISMATCH, f"none of {list(names)} in the leaf's SAN dNSNames"
    reason, detail = _validate_path(leaf, chain.parsed_intermediates(), anchor, matched, now)
    return None if reason is None else (reason, detail)


def fingerprint_matches(chain_der: Sequence[bytes], fingerprints: Sequence[bytes]) -> Verdict:
    """The ``fingerprint`` policy level: the SHA-256 of the leaf certificate's DER or of
    its SubjectPublicKeyInfo DER equals one of the pinned values (like Postfix's
    smtp_tls_fingerprint_digest = sha256, which pins either)."""
    if not chain_der:
        return _fail(Reason.NO_CERTIFICATE)
    leaf = bytes(chain_der[0])
    try:
        spki = _spki_der(leaf)
    except ValueError:
        return _fail(Reason.BAD_CERTIFICATE, "leaf is not a DER certificate")
    pins = {bytes(f) for f in fingerprints}
    if hashlib.sha256(leaf).digest() in pins:
        return Verdict(True, None, None, 0, Reason.FINGERPRINT_MATCH, "certificate")
    if hashlib.sha256(spki).digest() in pins:
        return Verdict(True, None, None, 0, Reason.FINGERPRINT_MATCH, "public key")
    return _fail(Reason.FINGERPRINT_MISMATCH)

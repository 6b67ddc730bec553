"""Throwaway test PKI made with ``cryptography``: roots, intermediates, leaves.

ECDSA P-256 by default (key generation is ~0.1 ms; RSA 2048 is ~50 ms, so ask for it
only where the key type matters).  Every certificate is available as an object, DER
and PEM; :func:`write_chain_file` writes what Postfix's ``smtpd_tls_chain_files`` wants.

    root = make_root()
    inter = make_intermediate(root)
    leaf = make_leaf(inter, ["mx.example.net"])
    chain_der = [leaf.der, inter.der]          # as a server would present it

The certificates follow the CA/B Forum's profile where a WebPKI verifier looks (SAN
dNSNames, serverAuth, keyUsage, basicConstraints, key identifiers), so they validate as
WebPKI ones against their root (:class:`WebPki`, :func:`write_ca_bundle`); AIA and
certificate policies, which no offline verifier needs, are left out.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DAY = dt.timedelta(days=1)


class Validity(TypedDict):
    """Keyword arguments for a validity window: ``make_leaf(ca, names, **expired())``."""

    not_before: dt.datetime
    not_after: dt.datetime


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def make_key(key_type: KeyType = "ec", rsa_bits: int = 2048) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key."""

    key: PrivateKey
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def spki_der(self) -> bytes:
        return self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _window(
    not_before: dt.datetime | None, not_after: dt.datetime | None, days: int
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before if not_before is not None else utcnow() - DAY
    end = not_after if not_after is not None else start + days * DAY
    return start, end


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _ca_builder(
    subject: str, key: PrivateKey, issuer: Issued | None, *, path_length: int | None,
    not_before: dt.datetime | None, not_after: dt.datetime | None, key_usage: bool = True,
) -> x509.CertificateBuilder:
    start, end = _window(not_before, not_after, 3650)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.cert.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ski(key), critical=False)
    )
    if key_usage:  # OpenSSL's default CA profile (v3_ca) has none: key_usage=False
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    if issuer is not None:
        builder = builder.add_extension(_aki(issuer), critical=False)
    return builder


def _aki(issuer: Issued) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())


def make_root(
    cn: str = "smtpgate test root",
    key_type: KeyType = "ec",
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_usage: bool = True,
) -> Issued:
    key = make_key(key_type)
    builder = _ca_builder(
        cn, key, None, path_length=None, not_before=not_before, not_after=not_after,
        key_usage=key_usage,
    )
    return Issued(key, builder.sign(key, hashes.SHA256()))


def make_intermediate(
    issuer: Issued,
    cn: str = "smtpgate test intermediate",
    key_type: KeyType = "ec",
    *,
    path_length: int | None = 0,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_usage: bool = True,
) -> Issued:
    key = make_key(key_type)
    builder = _ca_builder(
        cn, key, issuer, path_length=path_length, not_before=not_before, not_after=not_after,
        key_usage=key_usage,
    )
    return Issued(key, builder.sign(issuer.key, hashes.SHA256()))


def make_leaf(
    issuer: Issued | None,
    names: Sequence[str],
    cn: str | None = None,
    key_type: KeyType = "ec",
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    days: int = 90,
    server_auth: bool = True,
) -> Issued:
    """A server certificate with ``names`` as SAN dNSNames, issued by ``issuer``, or
    self-signed when ``issuer`` is None.  ``not_before``/``not_after`` make expired
    or not-yet-valid certificates (see :func:`expired` / :func:`not_yet_valid`)."""
    key = make_key(key_type)
    start, end = _window(not_before, not_after, days)
    subject = _name(cn or (names[0] if names else "smtpgate test leaf"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_ski(key), critical=False)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    if server_auth:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    # The CA/B Forum's subscriber profile: digitalSignature, plus keyEncipherment for an
    # RSA key (TLS 1.2 RSA key transport).  WebPKI verifiers accept it absent too.
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=key_type == "rsa", data_encipherment=False, key_agreement=False,
            key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
        ),
        critical=True,
    )
    if issuer is not None:
        builder = builder.add_extension(_aki(issuer), critical=False)
    return Issued(key, builder.sign(issuer.key if issuer else key, hashes.SHA256()))


def expired(days_ago: int = 1) -> Validity:
    """Keyword arguments for a certificate that expired ``days_ago`` days ago."""
    end = utcnow() - days_ago * DAY
    return {"not_before": end - 30 * DAY, "not_after": end}


def not_yet_valid(days_ahead: int = 1) -> Validity:
    """Keyword arguments for a certificate valid only from ``days_ahead`` days on."""
    start = utcnow() + days_ahead * DAY
    return {"not_before": start, "not_after": start + 30 * DAY}


def chain_pem(leaf: Issued, *issuers: Issued) -> bytes:
    """Key first, then the leaf, then its issuers: one PEM blob (Postfix's order)."""
    return leaf.key_pem + leaf.pem + b"".join(i.pem for i in issuers)


def write_chain_file(path: Path, leaf: Issued, *issuers: Issued) -> Path:
    """Write a ``smtpd_tls_chain_files`` file: private key, then the leaf certificate,
    then the issuer certificates, all in one PEM file, mode 0600 (it holds a key;
    Postfix reads it as root before dropping privileges)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(chain_pem(leaf, *issuers))
    path.chmod(0o600)  # O_CREAT's mode does not apply to an existing file
    return path


def write_pki(directory: Path, leaf: Issued, *issuers: Issued) -> dict[str, Path]:
    """Write ``chain.pem`` (key + chain, 0600), ``cert.pem``, ``key.pem`` (0600) and,
    when there are issuers, ``ca.pem`` (the last issuer: a client's trust anchor)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"chain": write_chain_file(directory / "chain.pem", leaf, *issuers)}
    paths["cert"] = directory / "cert.pem"
    paths["cert"].write_bytes(leaf.pem + b"".join(i.pem for i in issuers))
    paths["key"] = directory / "key.pem"
    fd = os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(leaf.key_pem)
    if issuers:
        paths["ca"] = directory / "ca.pem"
        paths["ca"].write_bytes(issuers[-1].pem)
    return paths


def write_ca_bundle(path: Path, *cas: Issued) -> Path:
    """Write ``cas`` as one PEM file: a client's trust anchors (e.g. the gateway's CA file
    for WebPKI validation), mode 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(ca.pem for ca in cas))
    path.chmod(0o644)
    return path


@dataclass(frozen=True)
class WebPki:
    """A test CA shaped like a public one: a root (the trust anchor clients are given) and,
    by default, an intermediate that issues the leaves and that servers send after them.
    Its leaves pass ``cryptography.x509.verification``'s WebPKI server verifier.

        pki = WebPki.make()
        leaf = pki.leaf(["mta-sts.b.test"])
        chain = [leaf, *pki.chain]             # what a server presents
        pki.write_bundle(tmp_path / "ca.pem")  # what a client trusts
    """

    root: Issued
    intermediate: Issued | None = None

    @classmethod
    def make(cls, cn: str = "smtpgate test WebPKI root", *, intermediate: bool = True,
             key_type: KeyType = "ec") -> WebPki:
        root = make_root(cn, key_type)
        inter = make_intermediate(root, f"{cn} - issuing CA", key_type) if intermediate else None
        return cls(root, inter)

    @property
    def issuer(self) -> Issued:
        """What signs the leaves: the intermediate, else the root."""
        return self.intermediate or self.root

    @property
    def chain(self) -> tuple[Issued, ...]:
        """The certificates a server sends after its leaf (never the root)."""
        return (self.intermediate,) if self.intermediate is not None else ()

    def leaf(self, names: Sequence[str], key_type: KeyType = "ec", *,
             not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
             server_auth: bool = True) -> Issued:
        """A server certificate for ``names`` (see :func:`make_leaf`)."""
        return make_leaf(self.issuer, names, key_type=key_type, not_before=not_before,
                         not_after=not_after, server_auth=server_auth)

    def write_bundle(self, path: Path) -> Path:
        """The root as a PEM CA file (see :func:`write_ca_bundle`)."""
        return write_ca_bundle(path, self.root)


def server_context(directory: Path, leaf: Issued, *issuers: Issued) -> ssl.SSLContext:
    """A TLS server context that presents ``leaf`` (and ``issuers``), its files written to
    ``directory`` by :func:`write_pki`."""
    paths = write_pki(directory, leaf, *issuers)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(paths["cert"], paths["key"])
    return ctx

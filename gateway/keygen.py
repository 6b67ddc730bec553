"""Making the site's key and publishing it: a new key with a self-signed certificate, the
TLSA records for it, and whether DNS publishes the next key yet (the rollover's check).

The inbound side terminates STARTTLS with one key, published by the operator as
``_25._tcp.<mx-host>. IN TLSA 3 1 1 <SHA-256 of the public key>`` (DANE-EE: only the key
counts, the certificate's names and dates do not; RFC 7672 3.1.1).  A rollover publishes
the next key's record next to the current one first, waits for the TTL, and only then
serves the next key (RFC 7671 8.1, "current + next")::

    smtpgate keygen --key next.key --cert next.pem --host mx.example.com
    smtpgate tlsa --cert cur.pem --next-cert next.pem --host mx.example.com  # publish both
    smtpgate rollover --key cur.key --cert cur.pem --next-key next.key \\
        --next-cert next.pem --host mx.example.com                           # checks DNS
    kill -HUP <gateway>
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .answers import Answer, Status
from .config import DnsConfig, Endpoint
from .dane import TLSARecord, tlsa_owner, tlsa_record
from .dns import Resolver

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

RSA_DEFAULT_BITS = 3072
DEFAULT_DAYS = 3650
_KEY_USAGE_EC = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False)
_KEY_USAGE_RSA = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=True,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False)


_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def host_name(text: str) -> str:
    """An MX host name as given to ``--host``: ASCII letters, digits and hyphens (IDNs as
    A-labels), lower-cased, without the trailing dot."""
    name = text.strip().rstrip(".").lower()
    if not name.isascii():
        raise argparse.ArgumentTypeError(
            f"not an ASCII host name: {text!r} (write an IDN as its A-label, xn--...)")
    if (not name or len(name) > 253 or not all(_LABEL.fullmatch(lb) for lb in name.split("."))
            or _is_ip(name)):
        raise argparse.ArgumentTypeError(f"not a host name: {text!r}")
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def generate_key(key_type: str = "ec", bits: int = RSA_DEFAULT_BITS) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key type {key_type!r}")


def self_signed(key: PrivateKey, hosts: Sequence[str], days: int = DEFAULT_DAYS,
                now: dt.datetime | None = None) -> x509.Certificate:
    """A self-signed server certificate: CN = the first host, SAN dNSNames = all hosts,
    not a CA, serverAuth.  DANE-EE 3 1 1 looks at the key only; the rest keeps TLS
    clients and tools (Postfix, openssl s_client) from tripping over it."""
    if not hosts:
        raise ValueError("at least one host name")
    start = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    # A CN holds at most 64 characters (RFC 5280 ub-common-name); a longer name lives in
    # the SAN only, under an empty subject, which makes the SAN critical (RFC 5280 4.2.1.6).
    short = len(hosts[0]) <= 64
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])] if short else [])
    public = key.public_key()
    usage = _KEY_USAGE_RSA if isinstance(key, rsa.RSAPrivateKey) else _KEY_USAGE_EC
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(hours=1))  # clock skew of the clients
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
                       critical=not short)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def tlsa_lines(cert_der: bytes, hosts: Sequence[str]) -> list[str]:
    """``_25._tcp.<host>. IN TLSA 3 1 1 <hex>`` for each host."""
    record = tlsa_record(cert_der)
    return [record.to_zone(tlsa_owner(h)) for h in hosts]


NO_RECORD = "no record for the next key"


def tlsa_problem(answer: Answer, want: TLSARecord) -> str | None:
    """None when ``answer`` is a secure TLSA RRset holding ``want``; else what is wrong."""

    if answer.status is not Status.SECURE:
        return f"not secure ({answer.status})"
    for r in answer.records:
        got = (getattr(r, "usage", None), getattr(r, "selector", None),
               getattr(r, "mtype", None), bytes(getattr(r, "cert", b"")))
        if got == (want.usage, want.selector, want.mtype, want.data):
            return None
    return NO_RECORD


async def check_published(hosts: Sequence[str], want: TLSARecord, resolver: Endpoint,
                          query_timeout: float = 2.0) -> list[tuple[str, Answer, str | None]]:
    """(host, answer, problem) per host: problem is None when ``_25._tcp.<host>`` TLSA is
    a secure RRset containing ``want``.  Asked of ``resolver``, whose AD bit is believed
    (the operator named it)."""

    dns = Resolver(DnsConfig(resolvers=(resolver,), trusted=(resolver,),
                                   timeout=query_timeout))
    try:
        answers = await asyncio.gather(*(dns.lookup(tlsa_owner(h), "TLSA") for h in hosts))
    finally:
        await dns.close()
    return [(h, a, tlsa_problem(a, want)) for h, a in zip(hosts, answers, strict=True)]

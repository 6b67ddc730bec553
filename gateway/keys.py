"""The site's inbound key: generation, TLSA records, rollover, loading, the TLS server context.

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

Exit codes of the commands: 0 done; 1 refused (a file exists, DNS does not publish the
next key yet); 2 unusable input (unreadable or garbled files, bad arguments).

Files: a private key is created 0600 from its first byte (``O_CREAT|O_EXCL`` with mode
0600 in the target directory, then renamed or linked into place), so it is never readable
by others, not even briefly; every file is replaced by a rename, so a reader sees the old
or the new file, never a partial one.

Session tickets and their keys (what OpenSSL actually does; checked in OpenSSL 3.0's
``SSL_CTX_new`` and by the tests): OpenSSL draws the ticket encryption and HMAC keys from
``RAND_priv_bytes`` once, when the ``SSL_CTX`` is created, and uses them for the life of
that context.  It never rotates them by itself; rotation needs either
``SSL_CTX_set_tlsext_ticket_keys`` or a ticket key callback, and Python's ``ssl`` module
exposes neither.  The only way to rotate from Python is a new ``SSLContext``: see
:class:`RotatingContext` and :data:`TICKET_ROTATE_AFTER`.  Tickets are issued with the
context's session timeout as lifetime hint, 7200 s (OpenSSL's default; Python cannot change
it).  Why it matters: a TLS 1.2 ticket carries the session's master secret under the ticket
key, so whoever obtains a ticket key can decrypt every recorded TLS 1.2 session that got a
ticket under it - forward secrecy lasts only as long as the ticket key.  (TLS 1.3 tickets
carry a resumption secret only, and OpenSSL resumes with ``psk_dhe_ke``: a fresh ECDHE
even on resumption.)  Each worker process has its own contexts and so its own ticket
keys: a ticket resumes only at the worker that issued it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import errno
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import ssl
import stat
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import ConfigError, Endpoint, parse_endpoint
from .dane import TLSARecord, tlsa_owner, tlsa_record
from .logs import event, log

if TYPE_CHECKING:
    from .answers import Answer

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

KEY_MODE = 0o600
CERT_MODE = 0o644
RSA_MIN_BITS = 2048  # OpenSSL's default security level 2 refuses less
RSA_DEFAULT_BITS = 3072
DEFAULT_DAYS = 3650
MAX_FILE = 1 << 20  # a key or certificate file is a few KiB; more is not one

# TLS 1.2: ECDHE (forward secret) with an AEAD only.  TLS 1.3 suites are all AEAD and
# always (EC)DHE in OpenSSL's default psk_dhe_ke mode; set_ciphers does not touch them.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS:!PSK:!SRP"
NUM_TICKETS = 2  # TLS 1.3 tickets per full handshake (OpenSSL's default)
TICKET_LIFETIME = 7200  # seconds: OpenSSL's default session timeout, the ticket lifetime hint
# How long one context (one set of ticket keys) serves new sessions.  A leaked ticket key
# exposes the TLS 1.2 sessions ticketed under it (module docstring): an hour of one worker's
# sessions, not the process's lifetime.  The cost is a full handshake for a client whose
# ticket predates the rotation (it would resume for up to the 2-hour hint otherwise):
# nothing for SMTP, whose clients reconnect per queue run.  RFC 9325 3.4 asks for "e.g.
# once every week" at least.
TICKET_ROTATE_AFTER = 3600.0

_KEY_USAGE_EC = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False)
_KEY_USAGE_RSA = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=True,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False)
_EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class KeyFileError(Exception):
    """A key or certificate file that cannot be used; ``str()`` is the operator's line."""


# -- the loaded pair -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A private key and its certificate, validated together.

    ``tlsa`` is the ``3 1 1`` record that authenticates the key; ``fingerprint`` is the
    SHA-256 of the certificate DER (hex), for logs.  ``warnings`` are problems that do not
    stop DANE-EE (an expired certificate).  ``key_pem`` is the key as validated,
    re-serialized unencrypted PKCS#8: contexts are built from it, never from a second
    read of the file (kept out of ``repr``)."""

    key_path: str
    cert_path: str
    cert_der: bytes = field(repr=False)
    tlsa: TLSARecord
    fingerprint: str
    key_type: str  # "ECDSA P-256", "RSA 3072"
    not_after: dt.datetime
    # further certificates of the cert file, in order
    chain_der: tuple[bytes, ...] = field(default=(), repr=False)
    warnings: tuple[str, ...] = ()
    key_pem: bytes = field(default=b"", repr=False, compare=False)


def _describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"ECDSA {_EC_CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    return type(key).__name__.removeprefix("_").removesuffix("PrivateKey")


def _read_file(path: str, what: str) -> tuple[bytes, os.stat_result]:
    """Bytes and fstat of a regular file (O_NONBLOCK: a FIFO must not hang a reload)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{what} {path}: not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE:
            chunk = os.read(fd, MAX_FILE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_FILE:
        raise KeyFileError(f"{what} {path}: larger than {MAX_FILE} bytes")
    return data, st


_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_OTHER = 0x02, 0x04, 0x08, 0x20


def _acl_private(path: str) -> bool:
    """True when a POSIX ACL is what puts group bits in the mode, and it grants nothing to
    anyone but this process's own user.  Newer systemd hands LoadCredential= files out this
    way (root-owned 0400 plus an ACL entry for the service's user): the mode then shows the
    ACL mask as 0440, though only we can read the key."""
    try:
        raw = os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return False
    if len(raw) < 4 or (len(raw) - 4) % 8:
        return False
    me = os.geteuid()
    for i in range(4, len(raw), 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, i)
        if tag in (_ACL_GROUP_OBJ, _ACL_GROUP, _ACL_OTHER) and perm:
            return False
        if tag == _ACL_USER and perm and ident != me:
            return False
    return True


def _check_key_mode(path: str, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 and not (mode & 0o007 == 0 and _acl_private(path)):
        how = ("readable" if mode & 0o044 else "writable" if mode & 0o022 else "executable")
        raise KeyFileError(f"key file {path} is {how} by group or others "
                           f"(mode {mode:04o}): chmod 600")


def read_private_key(path: str) -> PrivateKey:
    """The key of a PEM file that only its owner can access; KeyFileError otherwise."""
    data, st = _read_file(path, "key file")
    _check_key_mode(path, st)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"key file {path}: encrypted with a passphrase, which the gateway "
                           "cannot ask for: store it unencrypted, mode 0600") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"key file {path}: not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise KeyFileError(f"key file {path}: RSA key of {key.key_size} bits is too "
                               f"small: at least {RSA_MIN_BITS}")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_CURVES:
        return key
    raise KeyFileError(f"key file {path}: {_describe_key(key)} keys are not supported: "
                       "use ECDSA P-256 (smtpgate keygen) or RSA")


def read_certificates(path: str) -> list[x509.Certificate]:
    """The PEM certificates of a file, leaf first; KeyFileError when there is none."""
    data, _ = _read_file(path, "certificate file")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise KeyFileError(f"certificate file {path}: no PEM certificate")
    return certs


def _spki(key: Any) -> bytes:
    spki: bytes = key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return spki


def _read_pair(key_path: str, cert_path: str) -> KeyPair:
    key = read_private_key(key_path)
    certs = read_certificates(cert_path)
    leaf = certs[0]
    try:
        cert_key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"certificate file {cert_path}: unsupported public key") from None
    if _spki(cert_key) != _spki(key.public_key()):
        raise KeyFileError(f"key file {key_path} does not match certificate {cert_path}")
    der = leaf.public_bytes(serialization.Encoding.DER)
    try:
        record = tlsa_record(der)
    except ValueError as exc:
        raise KeyFileError(f"certificate file {cert_path}: {exc}") from None
    now = dt.datetime.now(dt.UTC)
    warnings = []
    if leaf.not_valid_after_utc < now:
        warnings.append(f"certificate {cert_path} expired {leaf.not_valid_after_utc:%Y-%m-%d}: "
                        "DANE-EE (3 1 1) ignores dates, clients that check them will not")
    elif leaf.not_valid_before_utc > now:
        warnings.append(f"certificate {cert_path} is valid only from "
                        f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: DANE-EE (3 1 1) "
                        "ignores dates, clients that check them will not")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return KeyPair(
        key_path=str(key_path), cert_path=str(cert_path), cert_der=der, tlsa=record,
        fingerprint=hashlib.sha256(der).hexdigest(), key_type=_describe_key(key),
        not_after=leaf.not_valid_after_utc,
        chain_der=tuple(c.public_bytes(serialization.Encoding.DER) for c in certs[1:]),
        warnings=tuple(warnings), key_pem=pem)


def load_keypair(key_path: str | os.PathLike[str], cert_path: str | os.PathLike[str],
                 source: str, key_path_name: str, *,
                 cert_path_name: str | None = None) -> KeyPair:
    """Read and validate a key and its certificate, at start and on every SIGHUP.

    Refuses, with ``ConfigError(source, key_path_name, message)``: a key file with any
    group/other permission bit, a missing, unreadable or garbled file, an encrypted key,
    an RSA key under 2048 bits or another key type, a key that does not match its
    certificate, a pair OpenSSL will not load.  Certificate-file problems name
    ``cert_path_name`` when given.  An expired certificate is only a warning
    (``KeyPair.warnings``): DANE-EE ignores expiry.

    A rollover replaces the key and the certificate with two renames; a reload between
    them would see the new key with the old certificate.  Such a mismatch is read once
    more before it is refused."""
    key_s, cert_s = os.fspath(key_path), os.fspath(cert_path)
    for attempt in (1, 2):
        try:
            pair = _read_pair(key_s, cert_s)
            _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pair)  # OpenSSL agrees?
            return pair
        except KeyFileError as exc:
            message = str(exc)
            if attempt == 1 and " does not match certificate " in message:
                continue
            name = (cert_path_name if cert_path_name and message.startswith("certificate")
                    else key_path_name)
            raise ConfigError(source, name, message) from None
        except ssl.SSLError as exc:
            raise ConfigError(source, key_path_name,
                              f"key file {key_s} with certificate {cert_s}: refused by "
                              f"OpenSSL: {exc.reason or exc}") from None
    raise AssertionError("unreachable")


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _load_chain(ctx: ssl.SSLContext, pair: KeyPair) -> None:
    """``ctx.load_cert_chain`` with exactly the validated bytes: they go through an
    anonymous memory file (memfd, never on disk), so no second read of the key file can
    see a different key, and a rebuild works after the files changed or were removed."""
    pem = b"".join([_pem(pair.cert_der), *(_pem(c) for c in pair.chain_der), pair.key_pem])
    if not _load_pem(ctx, pem):  # not Linux
        ctx.load_cert_chain(pair.cert_path, pair.key_path)


def _load_pem(ctx: ssl.SSLContext, pem: bytes) -> bool:
    """``ctx.load_cert_chain`` from bytes; False where there is no memfd (not Linux)."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None or not Path("/proc/self/fd").is_dir():
        return False
    fd = memfd_create("smtpgate-keypair", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view):]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return True


# -- the server context --------------------------------------------------------------------


def _check_ciphers(ctx: ssl.SSLContext) -> None:
    for c in ctx.get_ciphers():
        ok = bool(c.get("aead"))
        if c.get("protocol") == "TLSv1.2":
            ok = ok and c.get("kea") == "kx-ecdhe" and c.get("auth") in ("auth-rsa",
                                                                          "auth-ecdsa")
        elif c.get("protocol") != "TLSv1.3":
            ok = False
        if not ok:
            raise RuntimeError(f"OpenSSL offers {c.get('name')} ({c.get('protocol')}, "
                               f"{c.get('kea')}, {c.get('auth')}) for {TLS12_CIPHERS!r}")


def _server_policy() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
                    | ssl.OP_CIPHER_SERVER_PREFERENCE)
    ctx.verify_mode = ssl.CERT_NONE  # a client certificate would prove nothing here
    ctx.set_ciphers(TLS12_CIPHERS)
    _check_ciphers(ctx)
    return ctx


def local_context() -> ssl.SSLContext:
    """The outbound take-over's server context: the gateway answers an MTA's own STARTTLS
    toward a peer it authenticates itself (``mta_starttls: terminate``).  An ephemeral
    ECDSA key with a self-signed certificate, new at every start: the MTAs that get it
    verify nothing (those that do are configured to step aside), so there is nothing to
    publish, keep or roll over.  No session tickets: one handshake per local session."""
    key = generate_key("ec")
    cert = self_signed(key, ["smtpgate.invalid"], days=DEFAULT_DAYS)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    ctx = _server_policy()
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    if not _load_pem(ctx, cert.public_bytes(serialization.Encoding.PEM) + key_pem):
        raise RuntimeError("the local TLS key needs memfd_create (Linux)")
    return ctx


def server_context(pair: KeyPair, next_pair: KeyPair | None = None) -> ssl.SSLContext:
    """The inbound STARTTLS server context, serving ``pair``.

    TLS 1.2 and 1.3 only; TLS 1.2 suites ECDHE with AES-GCM or ChaCha20-Poly1305 only
    (checked in ``get_ciphers()``; no anonymous, static-RSA, CBC or SHA-1 suites); no
    compression; no renegotiation; no client certificates asked; session tickets on
    (``num_tickets`` for TLS 1.3).  The ticket keys live as long as this context: rebuild
    it every :data:`TICKET_ROTATE_AFTER` seconds (:class:`RotatingContext`).

    ``next_pair`` is only loaded into a throwaway context, so a pair OpenSSL refuses fails
    now rather than at the rollover; the context still serves ``pair`` alone."""
    ctx = _server_policy()
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.num_tickets = NUM_TICKETS
    _load_chain(ctx, pair)
    if next_pair is not None:
        _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), next_pair)
    return ctx


class RotatingContext:
    """A server context that is replaced by a fresh one (fresh ticket keys) once it is
    ``rotate_after`` seconds old.  Take the context from :meth:`get` for every new
    session; sessions running keep theirs.  Tickets of the previous context stop resuming
    (that is the point): such a client does a full handshake.

    Rebuilding uses the pairs' validated bytes, not the files, so it cannot fail because
    a rollover moved the files; if it fails anyway (no memory, no file descriptor), the
    old context serves on and the rebuild is retried a minute later."""

    RETRY_AFTER = 60.0

    def __init__(self, pair: KeyPair, next_pair: KeyPair | None = None, *,
                 rotate_after: float = TICKET_ROTATE_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rotate_after <= 0:
            raise ValueError("rotate_after must be positive")
        self.pair = pair
        self.next_pair = next_pair
        self.rotate_after = rotate_after
        self.clock = clock
        self.rotations = 0
        self._context = server_context(pair, next_pair)
        self._due = clock() + rotate_after

    def get(self) -> ssl.SSLContext:
        if self.clock() >= self._due:
            self.rebuild()
        return self._context

    def rebuild(self) -> ssl.SSLContext:
        """A new context (new ticket keys) now, whatever its age."""
        try:
            context = server_context(self.pair, None)
        except (OSError, ssl.SSLError) as exc:
            event(log, "ticket key rotation failed", logging.WARNING, error=str(exc))
            self._due = self.clock() + self.RETRY_AFTER
            return self._context
        self._context = context
        self._due = self.clock() + self.rotate_after
        self.rotations += 1
        return context


# -- generation ---------------------------------------------------------------------------

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


# -- files ---------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_name(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}.{secrets.token_hex(6)}")


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int,
                 overwrite: bool = False) -> None:
    """Write a file that appears complete or not at all, with ``mode`` from its first
    byte (created 0600-or-narrower by O_EXCL in the same directory, then fchmod).
    Without ``overwrite``, an existing file is left alone: FileExistsError."""
    target = Path(path)
    tmp = _temp_name(target, "new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode & 0o600)  # never more than the owner can read while being written
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, target)
        else:
            _link_no_clobber(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(target.parent)


def _link_no_clobber(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # atomic, and fails if dst exists
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        if dst.exists() or dst.is_symlink():  # no hard links here: check, then rename
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)


# -- commands ------------------------------------------------------------------------------


def _err(message: str) -> None:
    print(f"smtpgate: {message}", file=sys.stderr, flush=True)


def _hosts(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _cmd_keygen(args: argparse.Namespace) -> int:
    hosts = _hosts(args.host)
    key_path, cert_path = Path(args.key), Path(args.cert)
    if key_path.resolve() == cert_path.resolve():
        _err("--key and --cert must be different files")
        return EXIT_USAGE
    if args.type == "ec" and args.bits is not None:
        _err("--bits is for RSA keys (--type rsa); the EC key is P-256")
        return EXIT_USAGE
    bits = args.bits if args.bits is not None else RSA_DEFAULT_BITS
    if not args.force:
        for p in (key_path, cert_path):
            if p.exists() or p.is_symlink():
                _err(f"{p} exists: not overwritten (--force replaces it)")
                return EXIT_REFUSED
    key = generate_key(args.type, bits)
    cert = self_signed(key, hosts, args.days)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    try:
        write_atomic(key_path, key_pem, KEY_MODE, overwrite=args.force)
    except FileExistsError:
        _err(f"{key_path} exists: not overwritten (--force replaces it)")
        return EXIT_REFUSED
    except OSError as exc:
        _err(f"cannot write {key_path}: {exc.strerror}")
        return EXIT_USAGE
    try:
        write_atomic(cert_path, cert_pem, CERT_MODE, overwrite=args.force)
    except OSError as exc:
        if not args.force:  # the key just made is useless without its certificate
            with contextlib.suppress(OSError):
                key_path.unlink()
        if isinstance(exc, FileExistsError):
            _err(f"{cert_path} exists: not overwritten (--force replaces it)")
            return EXIT_REFUSED
        _err(f"cannot write {cert_path}: {exc.strerror}")
        return EXIT_USAGE
    print(f"wrote {key_path} ({_describe_key(key)}, mode 0600) and {cert_path} "
          f"(self-signed, {', '.join(hosts)}, until {cert.not_valid_after_utc:%Y-%m-%d}); "
          "publish:", file=sys.stderr, flush=True)
    for line in tlsa_lines(cert.public_bytes(serialization.Encoding.DER), hosts):
        print(line)
    return EXIT_OK


def _leaf_der(path: str) -> bytes:
    return read_certificates(path)[0].public_bytes(serialization.Encoding.DER)


def _cmd_tlsa(args: argparse.Namespace) -> int:
    hosts = _hosts(args.host)
    try:
        ders = [_leaf_der(args.cert)]
        if args.next_cert:
            ders.append(_leaf_der(args.next_cert))
        records = [tlsa_record(d) for d in ders]
    except (KeyFileError, ValueError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    if len(records) == 2 and records[0] == records[1]:
        print("smtpgate: note: the next certificate has the current key: one record each",
              file=sys.stderr, flush=True)
        records = records[:1]
    for host in hosts:
        for record in records:
            print(record.to_zone(tlsa_owner(host)))
    return EXIT_OK


NO_RECORD = "no record for the next key"


def tlsa_problem(answer: Answer, want: TLSARecord) -> str | None:
    """None when ``answer`` is a secure TLSA RRset holding ``want``; else what is wrong."""
    from .answers import Status

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
    from .config import DnsConfig
    from .dns import Resolver

    dns = Resolver(DnsConfig(resolvers=(resolver,), trusted=(resolver,),
                                   timeout=query_timeout))
    try:
        answers = await asyncio.gather(*(dns.lookup(tlsa_owner(h), "TLSA") for h in hosts))
    finally:
        await dns.close()
    return [(h, a, tlsa_problem(a, want)) for h, a in zip(hosts, answers, strict=True)]


def _keep_old(path: Path, mode: int | None) -> Path:
    """``path`` stays, and ``path.old`` becomes the same file (hard link, else a copy)."""
    old = path.with_name(path.name + ".old")
    tmp = _temp_name(old, "tmp")
    try:
        try:
            os.link(path, tmp)
        except OSError:
            data, st = _read_file(str(path), "file")
            write_atomic(tmp, data, mode if mode is not None else stat.S_IMODE(st.st_mode))
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, old)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return old


def _move(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst``; across file systems: atomic copy, then remove src."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        data, st = _read_file(str(src), "file")
        write_atomic(dst, data, stat.S_IMODE(st.st_mode), overwrite=True)
        with contextlib.suppress(OSError):
            os.chown(dst, st.st_uid, st.st_gid)
        os.unlink(src)


def promote(key: Path, cert: Path, next_key: Path, next_cert: Path) -> tuple[Path, Path]:
    """next → current: the current pair is kept as ``.old`` (links made before anything
    moves), then the next key and certificate are renamed over the current ones.  Every
    path always holds a complete file; between the two renames the key is new and the
    certificate old, which load_keypair reads twice before refusing."""
    old_key = _keep_old(key, KEY_MODE)
    old_cert = _keep_old(cert, None)
    _move(next_key, key)
    try:
        _move(next_cert, cert)
    except OSError:
        # Undo, best effort: the next key back in its place, the current key in its own.
        with contextlib.suppress(OSError):
            os.link(key, next_key)
        with contextlib.suppress(OSError):
            tmp = _temp_name(key, "undo")
            os.link(old_key, tmp)
            os.replace(tmp, key)
        raise
    for d in {key.parent, cert.parent, next_key.parent, next_cert.parent}:
        _fsync_dir(d)
    return old_key, old_cert


def _cmd_rollover(args: argparse.Namespace) -> int:
    hosts = _hosts(args.host)
    paths = [Path(p) for p in (args.key, args.cert, args.next_key, args.next_cert)]
    key, cert, next_key, next_cert = paths
    resolved = [p.resolve() for p in paths]
    olds = [r.with_name(r.name + ".old") for r in resolved[:2]]
    if len(set(resolved)) != 4 or set(olds) & set(resolved):
        _err("--key, --cert, --next-key, --next-cert (and the .old files) must be four "
             "different files")
        return EXIT_USAGE
    for p, opt in ((key, "--key"), (cert, "--cert")):
        if not p.exists():
            _err(f"{opt} {p} does not exist: nothing to roll over (configure the next "
                 "files as tls.key and tls.cert instead)")
            return EXIT_USAGE
    try:
        nxt = load_keypair(next_key, next_cert, "rollover", "--next-key",
                           cert_path_name="--next-cert")
    except ConfigError as exc:
        _err(f"rollover refused: {exc.message}")
        return EXIT_USAGE
    for w in nxt.warnings:
        print(f"smtpgate: warning: {w}", file=sys.stderr, flush=True)
    ttl = None
    if args.force:
        print(f"smtpgate: warning: --force: DNS not checked; DANE clients will refuse the "
              f"new key until every host publishes it: "
              f"{nxt.tlsa.to_zone(tlsa_owner(hosts[0]))}", file=sys.stderr, flush=True)
    else:
        results = asyncio.run(check_published(hosts, nxt.tlsa, args.resolver))
        problems = [(h, a, p) for h, a, p in results if p is not None]
        for host, answer, problem in problems:
            _err(f"rollover refused: {host}: {problem}: DNS ({args.resolver}) returned "
                 f"{answer.describe()}")
        if any(p == NO_RECORD for _, _, p in problems):
            _err(f"publish {nxt.tlsa} at _25._tcp.<host> next to the current record "
                 "(smtpgate tlsa --next-cert), wait for its TTL, then run rollover again")
        if any(p != NO_RECORD for _, _, p in problems):
            _err("the TLSA records must validate (DNSSEC-signed zone, DS in the parent, a "
                 "validating resolver): DANE clients ignore or refuse anything else")
        if problems:
            return EXIT_REFUSED
        ttl = max(a.ttl for _, a, _ in results)
    try:
        old_key, old_cert = promote(key, cert, next_key, next_cert)
    except (OSError, KeyFileError) as exc:
        _err(f"rollover failed while moving files: {exc}")
        return EXIT_REFUSED
    try:
        now = load_keypair(key, cert, "rollover", "--key", cert_path_name="--cert")
    except ConfigError as exc:
        _err(f"after the rollover: {exc.message}")
        return EXIT_REFUSED
    if now.tlsa != nxt.tlsa:
        _err(f"after the rollover {key} is not the key that was checked: its record is "
             f"{now.tlsa}, expected {nxt.tlsa}")
        return EXIT_REFUSED
    print(f"rolled over: {key} and {cert} now hold the next key ({nxt.tlsa}); the "
          f"previous pair is {old_key} and {old_cert}")
    if ttl is not None:
        print(f"the TLSA TTL is {ttl} s: resolvers may hold an RRset without the next key "
              "for that long after it was published; reload the gateway (SIGHUP) only once "
              "that has passed since you published it")
    else:
        print("reload the gateway (SIGHUP) to serve the new key")
    print("keep the old key's TLSA record for at least its TTL after the reload, then "
          "remove it")
    return EXIT_OK


def _resolver_arg(text: str) -> Endpoint:
    try:
        return parse_endpoint(text, "--resolver", "")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.message}") from None


def _days(text: str) -> int:
    if text.isdigit() and 1 <= int(text) <= 36500:
        return int(text)
    raise argparse.ArgumentTypeError(f"not a number of days in 1..36500: {text!r}")


def _rsa_bits(text: str) -> int:
    if text.isdigit() and RSA_MIN_BITS <= int(text) <= 16384 and int(text) % 8 == 0:
        return int(text)
    raise argparse.ArgumentTypeError(
        f"not an RSA size in bits ({RSA_MIN_BITS}..16384, a multiple of 8): {text!r}")


_EXITS = "Exit 0 when done, 1 when refused, 2 for unusable input."


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keygen``, ``tlsa`` and ``rollover`` to the CLI's subparsers."""
    kg = sub.add_parser(
        "keygen", help="make the site's key and a self-signed certificate",
        description="Write a new private key (PEM, mode 0600 from the start) and a "
                    "self-signed certificate for the hosts (CN = the first, every host a "
                    "SAN dNSName), then print the TLSA 3 1 1 record to publish for each host. "
                    "DANE-EE checks only the key; the certificate keeps TLS clients happy. "
                    "Existing files are not overwritten without --force. " + _EXITS)
    kg.add_argument("--key", required=True, metavar="PATH", help="private key file to write")
    kg.add_argument("--cert", required=True, metavar="PATH", help="certificate file to write")
    kg.add_argument("--type", choices=("ec", "rsa"), default="ec",
                    help="ec: ECDSA P-256 (default); rsa: for peers without ECDSA")
    kg.add_argument("--bits", type=_rsa_bits, metavar="N",
                    help=f"RSA key size (default {RSA_DEFAULT_BITS})")
    kg.add_argument("--host", required=True, action="append", type=host_name, metavar="NAME",
                    help="MX host name this key serves (repeat for several)")
    kg.add_argument("--days", type=_days, default=DEFAULT_DAYS,
                    help=f"certificate validity (default {DEFAULT_DAYS})")
    kg.add_argument("--force", action="store_true", help="replace existing files")
    kg.set_defaults(func=_cmd_keygen)

    tl = sub.add_parser(
        "tlsa", help="print the TLSA records to publish",
        description="Print '_25._tcp.<host>. IN TLSA 3 1 1 <hex>' for the key of the "
                    "certificate and, with --next-cert, for the next key too: one line per "
                    "host per key. Before a rollover both must be published, for at least "
                    "the record's TTL. " + _EXITS)
    tl.add_argument("--cert", required=True, metavar="PATH", help="current certificate")
    tl.add_argument("--next-cert", metavar="PATH", help="next certificate (rollover)")
    tl.add_argument("--host", required=True, action="append", type=host_name, metavar="NAME",
                    help="MX host name (repeat for several)")
    tl.set_defaults(func=_cmd_tlsa)

    ro = sub.add_parser(
        "rollover", help="make the next key the current one, once DNS publishes it",
        description="Check that _25._tcp.<host> TLSA is DNSSEC-secure and contains the "
                    "next key's 3 1 1 record for every --host, then move the next key and "
                    "certificate over the current ones (renames: every file is always "
                    "complete) and keep the previous pair as PATH.old. Reload the gateway "
                    "(SIGHUP) afterwards. Refused, naming the host and what DNS returned, "
                    "when DNS is not ready. " + _EXITS)
    ro.add_argument("--key", required=True, metavar="PATH", help="current key file")
    ro.add_argument("--cert", required=True, metavar="PATH", help="current certificate file")
    ro.add_argument("--next-key", required=True, metavar="PATH", help="next key file")
    ro.add_argument("--next-cert", required=True, metavar="PATH",
                    help="next certificate file")
    ro.add_argument("--host", required=True, action="append", type=host_name, metavar="NAME",
                    help="MX host name whose TLSA must hold the next key (repeat for several)")
    ro.add_argument("--resolver", type=_resolver_arg, metavar="IP:PORT",
                    default=Endpoint(ipaddress.ip_address("127.0.0.1"), 53),
                    help="validating resolver to ask; its AD bit is believed "
                         "(default 127.0.0.1:53)")
    ro.add_argument("--force", action="store_true",
                    help="skip the DNS check (DANE clients refuse mail until DNS catches up)")
    ro.set_defaults(func=_cmd_rollover)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.keys COMMAND ...``: the key commands on their own."""
    p = argparse.ArgumentParser(prog="smtpgate", description="Inbound key management.")
    add_commands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = p.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

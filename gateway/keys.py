"""The site's inbound key, loaded and served: ``load_keypair`` (validation, refusals),
the inbound TLS server context and its ticket keys, and the local key for the outbound take-over.
Making, publishing and rolling over keys: ``gateway.keygen`` and ``gateway.keyfiles``.

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

import datetime as dt
import hashlib
import logging
import os
import ssl
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.verification import Store

from .config import Config, ConfigError
from .dane import TLSARecord, tlsa_record
from .keyfiles import KeyFileError, read_file
from .keygen import DEFAULT_DAYS, PrivateKey, generate_key, self_signed
from .logs import event, log
from .sts import load_store

if TYPE_CHECKING:
    pass


RSA_MIN_BITS = 2048  # OpenSSL's default security level 2 refuses less

# TLS 1.2: ECDHE (forward secret) with an AEAD only.  TLS 1.3 suites are all AEAD and
# always (EC)DHE in OpenSSL's default psk_dhe_ke mode; set_ciphers does not touch them.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS:!PSK:!SRP"
NUM_TICKETS = 2  # TLS 1.3 tickets per full handshake (OpenSSL's default)
# Key exchange groups (TLS 1.3, and the curves of TLS 1.2 ECDHE): Mozilla's "intermediate"
# set.  OpenSSL's default adds X448, P-521 and FFDHE, which scanners flag and no sender needs.
TLS_GROUPS = "X25519:P-256:P-384"
_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list() is this SSL_CTX_ctrl() (ssl.h)
TICKET_LIFETIME = 7200  # seconds: OpenSSL's default session timeout, the ticket lifetime hint
# How long one context (one set of ticket keys) serves new sessions.  A leaked ticket key
# exposes the TLS 1.2 sessions ticketed under it (module docstring): an hour of one worker's
# sessions, not the process's lifetime.  The cost is a full handshake for a client whose
# ticket predates the rotation (it would resume for up to the 2-hour hint otherwise):
# nothing for SMTP, whose clients reconnect per queue run.  RFC 9325 3.4 asks for "e.g.
# once every week" at least.
TICKET_ROTATE_AFTER = 3600.0

_EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}



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


def describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"ECDSA {_EC_CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    return type(key).__name__.removeprefix("_").removesuffix("PrivateKey")


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
    data, st = read_file(path, "key file")
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
    raise KeyFileError(f"key file {path}: {describe_key(key)} keys are not supported: "
                       "use ECDSA P-256 (smtpgate keygen) or RSA")


def read_certificates(path: str) -> list[x509.Certificate]:
    """The PEM certificates of a file, leaf first; KeyFileError when there is none."""
    data, _ = read_file(path, "certificate file")
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
        fingerprint=hashlib.sha256(der).hexdigest(), key_type=describe_key(key),
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
    limit_groups(ctx)
    return ctx


def limit_groups(ctx: ssl.SSLContext, groups: str = TLS_GROUPS) -> bool:
    """Offer only ``groups`` for the key exchange; False (logged once) where it cannot be done.

    Python's ssl has no call for it (3.11 to 3.13), so this is OpenSSL's own,
    SSL_CTX_set1_groups_list(), through ctypes on the context's SSL_CTX: the pointer is the
    first field after the object header of CPython's ``PySSLContext``.  It is trusted only
    when SSL_CTX_get_options() through it reads the options Python reports."""
    import _ssl
    import ctypes

    try:
        lib = ctypes.CDLL(_ssl.__file__)
        get_options, ctrl = lib.SSL_CTX_get_options, lib.SSL_CTX_ctrl
    except (OSError, AttributeError) as exc:
        _groups_unchanged(f"OpenSSL not reachable: {exc}")
        return False
    get_options.restype, get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
    ctrl.restype = ctypes.c_long
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ssl_ctx or get_options(ssl_ctx) != ctx.options:
        _groups_unchanged("this Python's SSLContext layout is not the one expected")
        return False
    if ctrl(ssl_ctx, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii")) != 1:
        _groups_unchanged(f"OpenSSL refused the group list {groups}")
        return False
    return True


_groups_warned = False


def _groups_unchanged(why: str) -> None:
    global _groups_warned
    if not _groups_warned:
        _groups_warned = True
        log.warning("TLS key exchange groups left at OpenSSL's defaults: %s", why)


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


def site_pairs(config: Config) -> tuple[KeyPair, KeyPair | None] | None:
    """``tls.key``/``tls.cert`` and the next pair, read and validated as at start and on
    SIGHUP (ConfigError naming the key); None when no key is configured.  ``run --check``
    calls it too, so a check passes only what the gateway will take."""
    t = config.tls
    if not (t.key and t.cert):
        return None
    pair = load_keypair(t.key, t.cert, config.source, "tls.key", cert_path_name="tls.cert")
    following = (load_keypair(t.next_key, t.next_cert, config.source, "tls.next_key",
                              cert_path_name="tls.next_cert")
                 if t.next_key and t.next_cert else None)
    return pair, following  # load_keypair has had OpenSSL load each pair already


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


def webpki_store(config: Config) -> Store | None:
    """The roots MX certificates must chain to under MTA-STS: ``mta_sts.ca_file``, else
    OpenSSL's default bundle on this host; None when no recipient can get MTA-STS."""
    sts = config.mta_sts
    if not config.sts_wanted:
        return None
    paths = ssl.get_default_verify_paths()
    path = sts.ca_file or paths.cafile or paths.openssl_cafile
    try:
        return load_store(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(config.source, "mta_sts.ca_file",
                          f"cannot read trust anchors from {path}: {why}"
                          + ("" if sts.ca_file else " (install ca-certificates, set "
                             "mta_sts.ca_file, or mta_sts.enabled: false)")) from None

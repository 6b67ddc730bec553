"""Inbound keys: keygen, tlsa, rollover (without DNS), load_keypair, the server context.

The TLS tests are real handshakes on loopback between Python's ssl (OpenSSL) client and
the server context; every refusal is paired with a control handshake that the same client
completes against a permissive server, so a refusal proves the server's policy, not a
client that could not have connected anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gatelab.certs import expired, make_intermediate, make_leaf, make_root, write_pki
from gateway import cli, dane, keyfiles, keys
from gateway import keygen as generation
from gateway.answers import Answer, Status
from gateway.config import ConfigError, Endpoint
from gateway.keys import KeyPair, load_keypair, server_context
from gateway.outbound import presented_chain

HOST = "mx.example.com"


def run(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """A command as ``smtpgate`` runs it: the CLI's own parser."""
    parser = cli.parser()
    args = parser.parse_args(list(argv))
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def keygen(tmp: Path, name: str, *extra: str, capsys: pytest.CaptureFixture[str],
           hosts: tuple[str, ...] = (HOST,)) -> tuple[Path, Path, str]:
    key, cert = tmp / f"{name}.key", tmp / f"{name}.pem"
    args = [a for h in hosts for a in ("--host", h)]
    code, out, err = run("keygen", "--key", str(key), "--cert", str(cert), *args, *extra,
                         capsys=capsys)
    assert code == 0, err
    return key, cert, out


def cert_der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
        serialization.Encoding.DER)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


# -- keygen -----------------------------------------------------------------------------


def test_keygen_writes_a_0600_ec_key_and_prints_tlsa(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    with umask(0):  # the mode must not depend on the caller's umask
        key, cert, out = keygen(tmp_path, "site", capsys=capsys,
                                hosts=("MX.Example.com.", "mx2.example.com"))
    assert mode(key) == 0o600
    assert mode(cert) == 0o644
    k = serialization.load_pem_private_key(key.read_bytes(), None)
    assert isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp256r1"
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    public = c.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == k.public_key().public_numbers()
    assert c.subject.rfc4514_string() == "CN=mx.example.com"
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.example.com", "mx2.example.com"]
    assert c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert (c.not_valid_after_utc - c.not_valid_before_utc).days == 3650
    hexdata = dane.tlsa_record(cert_der(cert)).data.hex()
    assert out == (f"_25._tcp.mx.example.com. IN TLSA 3 1 1 {hexdata}\n"
                   f"_25._tcp.mx2.example.com. IN TLSA 3 1 1 {hexdata}\n")
    # What keygen wrote is what the gateway loads.
    pair = load_keypair(key, cert, "c.yaml", "tls.key")
    assert pair.tlsa.data.hex() == hexdata and pair.key_type == "ECDSA P-256"
    assert pair.warnings == ()


def test_a_host_name_too_long_for_a_cn_goes_in_the_san_only() -> None:
    long_host = ".".join(["a" * 40, "b" * 40, "example.com"])
    cert = generation.self_signed(generation.generate_key(), [long_host, HOST])
    assert len(cert.subject) == 0
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [long_host, HOST]


def test_keygen_never_creates_a_file_open_to_others(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file keygen creates is created (O_CREAT) with no group/other bits, whatever
    the umask: there is no moment when the key could be read by others."""
    created: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        if flags & os.O_CREAT:
            created.append((os.fspath(path), mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    with umask(0):
        key, _, _ = keygen(tmp_path, "site", capsys=capsys)
    assert created and all(m & 0o077 == 0 for _, m in created), created
    # Created beside the target and linked into place: the same inode, nothing left over.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.key", "site.pem"]
    assert mode(key) == 0o600


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    key, cert, _ = keygen(tmp_path, "site", capsys=capsys)
    before = key.read_bytes(), cert.read_bytes()
    code, out, err = run("keygen", "--key", str(key), "--cert", str(cert), "--host", HOST,
                         capsys=capsys)
    assert (code, out) == (1, "")
    assert err == f"smtpgate: {key} exists: not overwritten (--force replaces it)\n"
    assert (key.read_bytes(), cert.read_bytes()) == before
    # Only the certificate exists: still refused, and no key is left behind.
    other = tmp_path / "other.key"
    code, _, err = run("keygen", "--key", str(other), "--cert", str(cert), "--host", HOST,
                       capsys=capsys)
    assert code == 1 and f"{cert} exists" in err and not other.exists()
    key2, cert2, _ = keygen(tmp_path, "site", "--force", capsys=capsys)
    assert (key2.read_bytes(), cert2.read_bytes()) != before
    assert mode(key2) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.key", "site.pem"]


def test_keygen_rsa(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert, out = keygen(tmp_path, "rsa", "--type", "rsa", "--bits", "2048",
                            capsys=capsys)
    k = serialization.load_pem_private_key(key.read_bytes(), None)
    assert isinstance(k, rsa.RSAPrivateKey) and k.key_size == 2048
    assert mode(key) == 0o600
    ku = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment
    assert out == f"_25._tcp.{HOST}. IN TLSA 3 1 1 {dane.tlsa_record(cert_der(cert)).data.hex()}\n"
    # Without --bits: 3072 (the generation itself is faked: slow and not what is tested).
    sizes: list[int] = []
    small = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def fake(public_exponent: int, key_size: int) -> rsa.RSAPrivateKey:
        sizes.append(key_size)
        return small

    monkeypatch.setattr(rsa, "generate_private_key", fake)
    keygen(tmp_path, "rsa3072", "--type", "rsa", capsys=capsys)
    assert sizes == [3072]


@pytest.mark.parametrize(("argv", "message"), [
    (["--host", "mx..example.com"], "not a host name: 'mx..example.com'"),
    (["--host", "*.example.com"], "not a host name: '*.example.com'"),
    (["--host", "192.0.2.1"], "not a host name: '192.0.2.1'"),
    (["--host", "mx.exämple.com"], "not an ASCII host name"),
    (["--host", HOST, "--bits", "1024", "--type", "rsa"], "not an RSA size in bits"),
    (["--host", HOST, "--days", "0"], "not a number of days"),
])
def test_keygen_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        run("keygen", "--key", str(tmp_path / "k"), "--cert", str(tmp_path / "c"), *argv,
            capsys=capsys)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_keygen_bits_are_for_rsa_only(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run("keygen", "--key", str(tmp_path / "k"), "--cert", str(tmp_path / "c"),
                       "--host", HOST, "--bits", "4096", capsys=capsys)
    assert code == 2 and "--bits is for RSA keys" in err
    assert list(tmp_path.iterdir()) == []


# -- tlsa ---------------------------------------------------------------------------------


def test_tlsa_prints_one_line_per_host_per_key(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = make_root()
    leaf = make_leaf(make_intermediate(root), [HOST])
    current = write_pki(tmp_path / "cur", leaf, root)["cert"]  # a chain file: leaf first
    _, nxt, _ = keygen(tmp_path, "next", capsys=capsys)
    code, out, err = run("tlsa", "--cert", str(current), "--next-cert", str(nxt),
                         "--host", HOST, "--host", "mx2.example.com.", capsys=capsys)
    assert (code, err) == (0, "")
    cur_rec, next_rec = dane.tlsa_record(leaf.der), dane.tlsa_record(cert_der(nxt))
    expected = [rec.to_zone(dane.tlsa_owner(h))
                for h in (HOST, "mx2.example.com") for rec in (cur_rec, next_rec)]
    assert out == "".join(f"{line}\n" for line in expected)
    # Byte-exact format, independently of to_zone.
    assert out.splitlines()[0] == f"_25._tcp.mx.example.com. IN TLSA 3 1 1 {cur_rec.data.hex()}"
    assert cur_rec.data.hex() == hashlib.sha256(leaf.spki_der).hexdigest()

    code, out, _ = run("tlsa", "--cert", str(current), "--host", HOST, capsys=capsys)
    assert (code, out) == (0, f"{expected[0]}\n")
    # A renewed certificate with the same key: one record, and a note why.
    code, out, err = run("tlsa", "--cert", str(current), "--next-cert", str(current),
                         "--host", HOST, capsys=capsys)
    assert (code, out) == (0, f"{expected[0]}\n")
    assert err == "smtpgate: note: the next certificate has the current key: one record each\n"


def test_tlsa_with_a_bad_certificate_names_it(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run("tlsa", "--cert", str(tmp_path / "none.pem"), "--host", HOST,
                         capsys=capsys)
    assert (code, out) == (2, "")
    assert err == (f"smtpgate: certificate file {tmp_path}/none.pem: cannot read: "
                   "No such file or directory\n")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    code, _, err = run("tlsa", "--cert", str(garbage), "--host", HOST, capsys=capsys)
    assert code == 2 and err == f"smtpgate: certificate file {garbage}: no PEM certificate\n"


# -- load_keypair -------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    key, cert, _ = keygen(tmp_path, "site", capsys=capsys)
    return key, cert


def refused(key: Path, cert: Path, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        load_keypair(key, cert, "/etc/smtpgate/smtpgate.yaml", "tls.key", **kw)
    return exc.value


def test_load_keypair(site: tuple[Path, Path]) -> None:
    key, cert = site
    pair = load_keypair(str(key), str(cert), "c.yaml", "tls.key")
    assert (pair.key_path, pair.cert_path) == (str(key), str(cert))
    assert pair.cert_der == cert_der(cert)
    assert pair.tlsa == dane.tlsa_record(pair.cert_der)
    assert pair.fingerprint == hashlib.sha256(pair.cert_der).hexdigest()
    assert b"PRIVATE KEY" not in repr(pair).encode()


@pytest.mark.parametrize(("bits", "how"), [(0o644, "readable"), (0o640, "readable"),
                                           (0o604, "readable"), (0o620, "writable"),
                                           (0o610, "executable")])
def test_load_keypair_refuses_a_key_open_to_others(site: tuple[Path, Path], bits: int,
                                                   how: str) -> None:
    key, cert = site
    key.chmod(bits)
    err = refused(key, cert)
    assert (err.source, err.path) == ("/etc/smtpgate/smtpgate.yaml", "tls.key")
    assert err.message == (f"key file {key} is {how} by group or others (mode {bits:04o}): "
                           "chmod 600")
    assert str(err) == f"/etc/smtpgate/smtpgate.yaml: tls.key: {err.message}"
    key.chmod(0o400)  # narrower than 0600 is fine
    load_keypair(key, cert, "c.yaml", "tls.key")


def test_load_keypair_refuses_a_key_that_is_not_the_certificates(
        tmp_path: Path, site: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    key, _ = site
    _, other_cert, _ = keygen(tmp_path, "other", capsys=capsys)
    assert refused(key, other_cert).message == (
        f"key file {key} does not match certificate {other_cert}")


def test_load_keypair_refuses_missing_and_garbled_files(tmp_path: Path,
                                                        site: tuple[Path, Path]) -> None:
    key, cert = site
    missing = tmp_path / "missing.pem"
    assert refused(missing, cert).message == (
        f"key file {missing}: cannot read: No such file or directory")
    err = refused(key, missing, cert_path_name="tls.cert")
    assert (err.path, err.message) == (
        "tls.cert", f"certificate file {missing}: cannot read: No such file or directory")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    assert refused(garbage, cert).message == f"key file {garbage}: not a PEM private key"
    assert refused(key, garbage).message == f"certificate file {garbage}: no PEM certificate"
    assert refused(key, tmp_path).message == f"certificate file {tmp_path}: not a regular file"
    # The certificate in place of the key (a classic mix-up) is not a key either.
    cert.chmod(0o600)
    assert refused(cert, cert).message == f"key file {cert}: not a PEM private key"


def test_load_keypair_refuses_encrypted_small_and_odd_keys(tmp_path: Path,
                                                           site: tuple[Path, Path]) -> None:
    key, cert = site
    k = serialization.load_pem_private_key(key.read_bytes(), None)
    enc = tmp_path / "enc.key"
    keyfiles.write_atomic(enc, k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")), 0o600)
    assert refused(enc, cert).message == (
        f"key file {enc}: encrypted with a passphrase, which the gateway cannot ask for: "
        "store it unencrypted, mode 0600")
    small = tmp_path / "small.key"
    keyfiles.write_atomic(small, rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)
    assert refused(small, cert).message == (
        f"key file {small}: RSA key of 1024 bits is too small: at least 2048")
    p192 = tmp_path / "p192.key"
    keyfiles.write_atomic(p192, ec.generate_private_key(ec.SECP192R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)
    assert "keys are not supported" in refused(p192, cert).message


def test_an_expired_certificate_is_only_a_warning(tmp_path: Path) -> None:
    leaf = make_leaf(None, [HOST], **expired(days_ago=3))
    paths = write_pki(tmp_path, leaf)
    pair = load_keypair(paths["key"], paths["cert"], "c.yaml", "tls.key")
    end = leaf.cert.not_valid_after_utc
    assert pair.warnings == (
        f"certificate {paths['cert']} expired {end:%Y-%m-%d}: DANE-EE (3 1 1) ignores "
        "dates, clients that check them will not",)
    assert pair.tlsa == dane.tlsa_record(leaf.der)
    server_context(pair)  # and it serves


def test_load_keypair_keeps_the_chain(tmp_path: Path) -> None:
    root = make_root()
    inter = make_intermediate(root)
    leaf = make_leaf(inter, [HOST])
    paths = write_pki(tmp_path, leaf, inter, root)
    pair = load_keypair(paths["key"], paths["cert"], "c.yaml", "tls.key")
    assert pair.cert_der == leaf.der
    assert pair.chain_der == (inter.der, root.der)
    with serve(server_context(pair)) as srv:
        r = srv.connect(client())
    assert r.ok and r.chain == [leaf.der, inter.der, root.der]
    assert dane.verify(r.chain, [dane.tlsa_record(root.der, 2, 1, 1)], [HOST]).ok


def test_a_mismatch_during_a_rollover_is_read_again(site: tuple[Path, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload between the two renames of a rollover sees the new key with the old
    certificate; the second read sees the finished pair."""
    key, cert = site
    reads: list[str] = []
    real = keys._read_pair

    def flaky(key_path: str, cert_path: str) -> KeyPair:
        reads.append(key_path)
        if len(reads) == 1:
            raise keyfiles.KeyFileError(f"key file {key_path} does not match certificate "
                                    f"{cert_path}")
        return real(key_path, cert_path)

    monkeypatch.setattr(keys, "_read_pair", flaky)
    load_keypair(key, cert, "c.yaml", "tls.key")
    assert len(reads) == 2


# -- the server context: configuration ------------------------------------------------------


@pytest.fixture(scope="module")
def ec_pair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    d = tmp_path_factory.mktemp("ec")
    paths = write_pki(d, make_leaf(None, [HOST]))
    return load_keypair(paths["key"], paths["cert"], "c.yaml", "tls.key")


@pytest.fixture(scope="module")
def rsa_pair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    d = tmp_path_factory.mktemp("rsa")
    paths = write_pki(d, make_leaf(None, [HOST], key_type="rsa"))
    return load_keypair(paths["key"], paths["cert"], "c.yaml", "tls.key")


def test_server_context_settings(ec_pair: KeyPair) -> None:
    ctx = server_context(ec_pair)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert not ctx.options & ssl.OP_NO_TICKET
    assert ctx.num_tickets == keys.NUM_TICKETS > 0
    assert ctx.verify_mode == ssl.CERT_NONE
    ciphers = ctx.get_ciphers()
    tls12 = [c for c in ciphers if c["protocol"] == "TLSv1.2"]
    assert tls12, ciphers
    for c in tls12:
        assert c["kea"] == "kx-ecdhe", c  # forward secret
        assert c["aead"], c
        assert c["auth"] in ("auth-rsa", "auth-ecdsa"), c  # not anonymous, not PSK
        assert "CBC" not in c["description"] and "SHA1" not in c["description"], c
    assert {c["protocol"] for c in ciphers} == {"TLSv1.2", "TLSv1.3"}
    assert all(c["aead"] for c in ciphers)


def test_check_ciphers_catches_a_non_aead_suite() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("ECDHE+AES128:!aNULL")
    with pytest.raises(RuntimeError, match="OpenSSL offers ECDHE-"):
        keys._check_ciphers(ctx)


# -- the server context: real handshakes on loopback -----------------------------------------


@dataclass
class Result:
    ok: bool
    version: str | None = None
    cipher: str | None = None
    reused: bool = False
    session: ssl.SSLSession | None = None
    chain: list[bytes] | None = None
    client_error: str = ""
    server_error: str = ""


class Server:
    """Accepts TLS connections on 127.0.0.1 with ``ctx``, one thread per connection."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.port = self.sock.getsockname()[1]

    def connect(self, cctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> Result:
        errors: list[str] = []

        def serve_one() -> None:
            conn, _ = self.sock.accept()
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"220 ok\r\n")
                    tls.recv(16)
            except (OSError, ssl.SSLError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                conn.close()

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            with cctx.wrap_socket(raw, session=session) as tls:
                tls.recv(16)  # TLS 1.3 tickets arrive before the first application data
                result = Result(True, tls.version(), (tls.cipher() or ("",))[0],
                                bool(tls.session_reused), tls.session,
                                presented_chain(tls))  # type: ignore[arg-type]
                tls.sendall(b"QUIT\r\n")
        except (OSError, ssl.SSLError) as exc:
            result = Result(False, client_error=f"{type(exc).__name__}: {exc}")
        thread.join(5)
        result.server_error = " ".join(errors)
        return result

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def serve(ctx: ssl.SSLContext) -> Iterator[Server]:
    srv = Server(ctx)
    try:
        yield srv
    finally:
        srv.close()


def client(max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
           min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
           ciphers: str | None = None) -> ssl.SSLContext:
    """A client that does not authenticate (DANE is checked elsewhere) and, when asked,
    speaks old protocols and weak suites (security level 0)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if ciphers is not None or min_version < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers(ciphers or "ALL:@SECLEVEL=0")
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = min_version
        ctx.maximum_version = max_version
    return ctx


def permissive(pair: KeyPair) -> ssl.SSLContext:
    """The control server: anything OpenSSL can still speak."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    keys._load_chain(ctx, pair)
    return ctx


def test_tls13_handshake_serves_the_pair(ec_pair: KeyPair) -> None:
    with serve(server_context(ec_pair)) as srv:
        r = srv.connect(client())
    assert r.ok and r.version == "TLSv1.3", r
    assert r.chain and r.chain[0] == ec_pair.cert_der
    assert dane.verify(r.chain, [ec_pair.tlsa], [HOST]).ok


@pytest.mark.parametrize("which", ["ec", "rsa"])
def test_tls12_handshake_is_ecdhe_aead(which: str, ec_pair: KeyPair,
                                       rsa_pair: KeyPair) -> None:
    pair = ec_pair if which == "ec" else rsa_pair
    with serve(server_context(pair)) as srv:
        r = srv.connect(client(max_version=ssl.TLSVersion.TLSv1_2))
    assert r.ok and r.version == "TLSv1.2", r
    assert r.cipher is not None and r.cipher.startswith("ECDHE-")
    assert "GCM" in r.cipher or "CHACHA20" in r.cipher


def test_tls11_client_is_refused(ec_pair: KeyPair) -> None:
    old = client(max_version=ssl.TLSVersion.TLSv1_1, min_version=ssl.TLSVersion.TLSv1)
    with serve(permissive(ec_pair)) as srv:
        control = srv.connect(old)
    assert control.ok and control.version == "TLSv1.1", control
    with serve(server_context(ec_pair)) as srv:
        r = srv.connect(old)
    assert not r.ok
    assert "UNSUPPORTED_PROTOCOL" in r.server_error, r


@pytest.mark.parametrize(("which", "ciphers"), [
    ("ec", "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA"),
    ("rsa", "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA:AES128-SHA256"),  # CBC
    ("rsa", "AES128-GCM-SHA256:AES256-GCM-SHA384"),  # AEAD, but static RSA: not FS
])
def test_tls12_client_without_ecdhe_aead_is_refused(which: str, ciphers: str,
                                                   ec_pair: KeyPair,
                                                   rsa_pair: KeyPair) -> None:
    pair = ec_pair if which == "ec" else rsa_pair
    weak = client(max_version=ssl.TLSVersion.TLSv1_2, ciphers=f"{ciphers}:@SECLEVEL=0")
    with serve(permissive(pair)) as srv:
        control = srv.connect(weak)
    assert control.ok and control.cipher in ciphers.split(":"), control
    with serve(server_context(pair)) as srv:
        r = srv.connect(weak)
    assert not r.ok
    assert "NO_SHARED_CIPHER" in r.server_error, r


def test_next_pair_is_validated_but_not_served(ec_pair: KeyPair, rsa_pair: KeyPair) -> None:
    with serve(server_context(ec_pair, rsa_pair)) as srv:
        r = srv.connect(client())
    assert r.ok and r.chain and r.chain[0] == ec_pair.cert_der


def test_context_does_not_read_the_files_again(tmp_path: Path) -> None:
    """Built from the validated bytes: a key file replaced after load_keypair (a rollover
    without a reload) does not change what a context serves."""
    paths = write_pki(tmp_path, make_leaf(None, [HOST]))
    pair = load_keypair(paths["key"], paths["cert"], "c.yaml", "tls.key")
    other = make_leaf(None, [HOST])
    write_pki(tmp_path, other)  # overwrite both files
    with serve(server_context(pair)) as srv:
        r = srv.connect(client())
    assert r.ok and r.chain and r.chain[0] == pair.cert_der != other.der
    for p in paths.values():
        p.unlink()
    server_context(pair)


# -- session tickets and their rotation -----------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_tickets_resume_until_the_context_is_rotated(version: ssl.TLSVersion,
                                                     ec_pair: KeyPair) -> None:
    now = [0.0]
    holder = keys.RotatingContext(ec_pair, rotate_after=100.0, clock=lambda: now[0])
    cctx = client(max_version=version)  # a session resumes only with its client context
    first_ctx = holder.get()
    with serve(first_ctx) as srv:
        first = srv.connect(cctx)
        assert first.ok and not first.reused and first.session is not None
        assert first.session.has_ticket
        assert first.session.ticket_lifetime_hint == keys.TICKET_LIFETIME
        again = srv.connect(cctx, first.session)
        assert again.ok and again.reused, again
    now[0] = 99.0
    assert holder.get() is first_ctx
    now[0] = 100.0
    rotated = holder.get()
    assert rotated is not first_ctx and holder.rotations == 1
    with serve(rotated) as srv:
        after = srv.connect(cctx, first.session)
    assert after.ok and not after.reused, after  # new ticket keys: a full handshake
    assert after.chain and after.chain[0] == ec_pair.cert_der


def test_rotation_failure_keeps_the_old_context(ec_pair: KeyPair,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    holder = keys.RotatingContext(ec_pair, rotate_after=10.0, clock=lambda: now[0])
    ctx = holder.get()

    def broken(pair: KeyPair, next_pair: KeyPair | None = None) -> ssl.SSLContext:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(keys, "server_context", broken)
    now[0] = 10.0
    assert holder.get() is ctx and holder.rotations == 0
    monkeypatch.undo()
    now[0] = 10.0 + keys.RotatingContext.RETRY_AFTER - 1
    assert holder.get() is ctx
    now[0] = 10.0 + keys.RotatingContext.RETRY_AFTER
    assert holder.get() is not ctx and holder.rotations == 1


# -- rollover without DNS --------------------------------------------------------------------


def _pairs(tmp: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    key, cert, _ = keygen(tmp, "site", capsys=capsys)
    nkey, ncert, _ = keygen(tmp, "next", capsys=capsys)
    return {"key": key, "cert": cert, "next_key": nkey, "next_cert": ncert}


def _rollover_args(p: dict[str, Path], *extra: str) -> list[str]:
    return ["rollover", "--key", str(p["key"]), "--cert", str(p["cert"]),
            "--next-key", str(p["next_key"]), "--next-cert", str(p["next_cert"]),
            "--host", HOST, *extra]


def test_rollover_force_promotes_next_and_keeps_old(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    p = _pairs(tmp_path, capsys)
    before = {k: v.read_bytes() for k, v in p.items()}
    code, out, err = run(*_rollover_args(p, "--force"), capsys=capsys)
    assert code == 0, err
    assert "warning: --force: DNS not checked" in err
    assert p["key"].read_bytes() == before["next_key"]
    assert p["cert"].read_bytes() == before["next_cert"]
    old_key, old_cert = tmp_path / "site.key.old", tmp_path / "site.pem.old"
    assert old_key.read_bytes() == before["key"] and old_cert.read_bytes() == before["cert"]
    assert not p["next_key"].exists() and not p["next_cert"].exists()
    assert mode(p["key"]) == mode(old_key) == 0o600
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "site.key", "site.key.old", "site.pem", "site.pem.old"]
    assert out.startswith(f"rolled over: {p['key']} and {p['cert']} now hold the next key")
    load_keypair(p["key"], p["cert"], "c.yaml", "tls.key")


@pytest.mark.slow  # seconds: kept out of the quick tier
def test_rollover_refuses_when_dns_cannot_confirm(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """No resolver listens on 127.0.0.1:9 (the discard port): the lookup fails, the
    rollover is refused, nothing moves."""
    p = _pairs(tmp_path, capsys)
    before = {k: v.read_bytes() for k, v in p.items()}
    code, out, err = run(*_rollover_args(p, "--resolver", "127.0.0.1:9"), capsys=capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"smtpgate: rollover refused: {HOST}: not secure (failed): DNS "
                          f"(127.0.0.1:9) returned _25._tcp.{HOST}. TLSA: ")
    assert {k: v.read_bytes() for k, v in p.items()} == before
    assert not (tmp_path / "site.key.old").exists()


def test_rollover_refuses_an_unusable_next_pair(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    p = _pairs(tmp_path, capsys)
    p["next_key"].chmod(0o644)
    code, _, err = run(*_rollover_args(p, "--force"), capsys=capsys)
    assert code == 2
    assert err == (f"smtpgate: rollover refused: key file {p['next_key']} is readable by "
                   "group or others (mode 0644): chmod 600\n")
    assert not (tmp_path / "site.key.old").exists()
    code, _, err = run(*_rollover_args({**p, "next_cert": p["cert"]}, "--force"),
                       capsys=capsys)
    assert code == 2 and "must be four different files" in err


def test_promote_across_file_systems(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """EXDEV from rename: the next file is copied (mode kept) and then removed."""
    p = _pairs(tmp_path, capsys)
    nkey = p["next_key"].read_bytes()
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(src) in (p["next_key"], p["next_cert"]):
            raise OSError(18, "Invalid cross-device link")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    keyfiles.promote(p["key"], p["cert"], p["next_key"], p["next_cert"])
    assert p["key"].read_bytes() == nkey and mode(p["key"]) == 0o600
    assert not p["next_key"].exists()


def test_promote_undoes_the_key_when_the_certificate_cannot_move(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    p = _pairs(tmp_path, capsys)
    before = {k: v.read_bytes() for k, v in p.items()}
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(src) == p["next_cert"]:
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        keyfiles.promote(p["key"], p["cert"], p["next_key"], p["next_cert"])
    assert {k: v.read_bytes() for k, v in p.items()} == before
    load_keypair(p["key"], p["cert"], "c.yaml", "tls.key")


# -- pure pieces -------------------------------------------------------------------------------


def _answer(status: Status, *records: str) -> Answer:
    rdata = tuple(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TLSA, r)
                  for r in records)
    return Answer("_25._tcp.mx.example.com.", "TLSA", status, "NOERROR", rdata,
                  "_25._tcp.mx.example.com.", (), 60)


def test_tlsa_problem() -> None:
    want = dane.TLSARecord(3, 1, 1, bytes(range(32)))
    other = "3 1 1 " + "ff" * 32
    assert generation.tlsa_problem(_answer(Status.SECURE, other, str(want)), want) is None
    missing = "no record for the next key"
    assert generation.tlsa_problem(_answer(Status.SECURE, other), want) == missing
    assert generation.tlsa_problem(_answer(Status.SECURE), want) == missing
    # The same digest under another usage/selector is not the record asked for.
    assert generation.tlsa_problem(_answer(Status.SECURE, "2 1 1 " + want.data.hex()), want)
    assert generation.tlsa_problem(_answer(Status.INSECURE, str(want)), want) == (
        "not secure (insecure)")
    assert generation.tlsa_problem(_answer(Status.BOGUS), want) == "not secure (bogus)"


def test_resolver_argument(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.parser()
    base = ["rollover", "--key", "k", "--cert", "c", "--next-key", "nk", "--next-cert", "nc",
            "--host", HOST]
    assert parser.parse_args(base).resolver == Endpoint(
        ipaddress.ip_address("127.0.0.1"), 53)
    assert str(parser.parse_args([*base, "--resolver", "[::1]:5353"]).resolver) == "[::1]:5353"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--resolver", "resolver.example:53"])
    assert "must be IP:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["keygen", "tlsa", "rollover"])
def test_help(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: smtpgate {cmd}") and "Exit 0" in out


def s_client(ctx: ssl.SSLContext, group: str, version: str) -> tuple[bool, str]:
    """``openssl s_client`` offering only ``group`` for the key exchange, against ``ctx`` on
    127.0.0.1: whether the handshake completed, and what s_client said."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve_one() -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            conn, _ = server.accept()
            with conn, ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"220 ok\r\n")
                tls.settimeout(5)
                tls.recv(16)

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        r = subprocess.run(["openssl", "s_client", "-brief", f"-{version}", "-groups", group,
                            "-connect", f"127.0.0.1:{server.getsockname()[1]}"],
                           input=b"", capture_output=True, timeout=20, check=False)
    finally:
        thread.join(10)
        server.close()
    said = (r.stdout + r.stderr).decode(errors="replace")
    return "CONNECTION ESTABLISHED" in said, said


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize("version", ["tls1_3", "tls1_2"])
def test_the_key_exchange_groups_are_mozillas_intermediate(version: str, ec_pair: KeyPair,
                                                           rsa_pair: KeyPair) -> None:
    """X25519, P-256 and P-384 only: X448 and P-521 (OpenSSL offers both by default, and the
    permissive control server accepts them) are refused.  TLS 1.2 with the RSA key: there a
    client's groups also bound an ECDSA certificate's curve."""
    pair = ec_pair if version == "tls1_3" else rsa_pair
    ctx = server_context(pair)
    for group in ("X25519", "P-256", "P-384"):
        ok, said = s_client(ctx, group, version)
        assert ok, (group, said)
    for group in ("X448", "P-521"):
        assert s_client(permissive(pair), group, version)[0], group  # the control
        ok, said = s_client(ctx, group, version)
        assert not ok, (group, said)
    assert keys.limit_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))

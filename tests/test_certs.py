"""The lab's test PKI passes as WebPKI: what the MTA-STS tests rely on (issue 17).

Two independent verifiers: cryptography's WebPKI server verifier (the CA/B profile:
SAN, serverAuth, key identifiers, basicConstraints, keyUsage) and OpenSSL through
Python's ssl in strict mode, a real handshake on memory BIOs against the CA bundle file.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from gatelab.certs import (
    Issued,
    KeyType,
    WebPki,
    expired,
    make_leaf,
    not_yet_valid,
    server_context,
    utcnow,
    write_ca_bundle,
)

NAME = "mta-sts.b.test"


def verify(root: Issued, leaf: Issued, *chain: Issued, name: str = NAME) -> None:
    verifier = (
        PolicyBuilder().store(Store([root.cert])).time(utcnow())
        .build_server_verifier(x509.DNSName(name))
    )
    verifier.verify(leaf.cert, [c.cert for c in chain])


@pytest.mark.parametrize("intermediate", [True, False])
@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_leaves_pass_the_webpki_verifier(intermediate: bool, key_type: KeyType) -> None:
    pki = WebPki.make(intermediate=intermediate, key_type=key_type)
    leaf = pki.leaf([NAME, "mx.b.test"], key_type)
    verify(pki.root, leaf, *pki.chain)
    verify(pki.root, leaf, *pki.chain, name="mx.b.test")
    ext = leaf.cert.extensions
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert ku.value.key_encipherment is (key_type == "rsa")
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = pki.issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_what_the_verifier_refuses() -> None:
    pki = WebPki.make()
    stranger = WebPki.make("another root")
    cases = {
        "wrong name": (pki.leaf(["www.b.test"]), pki.chain),
        "untrusted root": (stranger.leaf([NAME]), stranger.chain),
        "expired": (pki.leaf([NAME], **expired()), pki.chain),
        "not yet valid": (pki.leaf([NAME], **not_yet_valid()), pki.chain),
        "self-signed": (make_leaf(None, [NAME]), ()),
        "intermediate not sent": (pki.leaf([NAME]), ()),
    }
    # (server_auth=False is no case: an absent EKU means any use, to this verifier too.)
    for why, (leaf, chain) in cases.items():
        with pytest.raises(VerificationError):
            verify(pki.root, leaf, *chain)
            pytest.fail(why)


def _handshake(cafile: Path, server: ssl.SSLContext, name: str) -> None:
    client = ssl.create_default_context(cafile=str(cafile))
    client.verify_flags |= ssl.VERIFY_X509_STRICT  # RFC 5280 conformance, as Python 3.13
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = True
        for conn, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            try:
                conn.do_handshake()
            except ssl.SSLWantReadError:
                done = False
            peer_in.write(out.read())
        if done:
            return
    raise AssertionError("handshake did not finish")


def test_openssl_accepts_the_chain_against_the_bundle(tmp_path: Path) -> None:
    pki = WebPki.make()
    bundle = pki.write_bundle(tmp_path / "ca.pem")
    assert x509.load_pem_x509_certificates(bundle.read_bytes()) == [pki.root.cert]
    server = server_context(tmp_path / "srv", pki.leaf([NAME]), *pki.chain)
    _handshake(bundle, server, NAME)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(bundle, server, "mta-sts.c.test")
    other = write_ca_bundle(tmp_path / "other.pem", WebPki.make("another root").root)
    with pytest.raises(ssl.SSLCertVerificationError, match="local issuer"):
        _handshake(other, server, NAME)
    # Several anchors in one bundle: either root's leaves pass.
    both = write_ca_bundle(tmp_path / "both.pem", WebPki.make("another root").root, pki.root)
    assert len(x509.load_pem_x509_certificates(both.read_bytes())) == 2
    _handshake(both, server, NAME)

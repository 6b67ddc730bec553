"""The lab's MTA-STS policy host (issue 17): a real nginx in the peer namespace under a test
WebPKI, fetched from gw the way the gateway will (DNS from the lab's validating resolver,
HTTPS verified against the CA bundle), with every fault the MTA-STS tests ask of it.
"""

from __future__ import annotations

import shutil
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatelab.certs import WebPki
from gatelab.dnslab import DnsWorld, dnslab_usable
from gatelab.httpslab import (
    POLICY_V4,
    POLICY_V6,
    WELL_KNOWN,
    CertKind,
    PolicyHost,
    Response,
    https_get,
    httpslab_usable,
    policy,
    set_sts_id,
    sts_records,
    sts_txt,
)
from gatelab.netlab import GW_PEER_V4, GW_PEER_V6, HOST_IF, Lab, netns_usable

pytestmark = pytest.mark.netns

B_POLICY = policy("enforce", ["mx.b.test", "*.b.test"], 604800)
C_POLICY = policy("testing", ["mx.c.test"])


@dataclass
class Site:
    lab: Lab
    world: DnsWorld
    host: PolicyHost
    ca: Path

    def get(self, domain: str = "b.test", address: str = POLICY_V4, *,
            timeout: float = 5.0) -> Response:
        return https_get(self.lab.gw, address, f"mta-sts.{domain}", cafile=self.ca,
                         timeout=timeout)


@pytest.fixture(scope="module")
def site_ready(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    reason = netns_usable() or dnslab_usable() or httpslab_usable()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("httpslab")
    pki = WebPki.make()
    with Lab() as lab, DnsWorld.on_lab(lab, work / "dns") as world, \
            PolicyHost.on_lab(lab, pki, work) as host:
        world.zone("test.", [*sts_records("b.test", [POLICY_V4, POLICY_V6], "0"),
                             *sts_records("c.test", POLICY_V4, "1")])
        set_sts_id(world, "test.", "b.test", "20260101")  # before start: the declaration
        world.start()
        host.add_domain("b.test", B_POLICY)
        host.add_domain("c.test.", C_POLICY)
        host.start()
        yield Site(lab, world, host, pki.write_bundle(work / "ca.pem"))


@pytest.fixture
def site(site_ready: Site) -> Iterator[Site]:
    yield site_ready
    # Back to normal for the next test (a test that fails half-way included).
    host = site_ready.host
    if not host.running:
        host.start()
    host.reset("b.test", B_POLICY)


def test_policy_found_through_dns_and_fetched(site: Site) -> None:
    w = site.world
    assert w.query("_mta-sts.b.test", "TXT") == ("NOERROR", True, [sts_txt("20260101")])
    rcode, ad, (address,) = w.query("mta-sts.b.test", "A")
    assert (rcode, ad, address) == ("NOERROR", True, POLICY_V4)
    assert w.query("mta-sts.b.test", "AAAA") == ("NOERROR", True, [POLICY_V6])
    since = time.time() - 0.01
    for addr in (address, POLICY_V6):
        r = site.get(address=addr)
        assert (r.status, r.headers["content-type"], r.body) == (200, "text/plain",
                                                                 B_POLICY.encode())
    # Each virtual host serves its own policy.
    assert site.get("c.test").body == C_POLICY.encode()
    logged = site.host.fetches("b.test", at_least=2)[-2:]
    assert [(f.path, f.status, f.sni, f.client) for f in logged] == [
        (WELL_KNOWN, 200, "mta-sts.b.test", GW_PEER_V4),
        (WELL_KNOWN, 200, "mta-sts.b.test", GW_PEER_V6),
    ]
    assert all(f.time >= since and f.bytes == len(B_POLICY) for f in logged)


def test_curl_agrees(site: Site) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    # fmt: off
    out = site.lab.gw.run(
        ["curl", "-sS", "--max-time", "5", "--cacert", str(site.ca),
         "--resolve", f"mta-sts.b.test:443:{POLICY_V4}", "-D", "-",
         f"https://mta-sts.b.test{WELL_KNOWN}"],
        text=False,
    ).stdout
    # fmt: on
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"\r\ncontent-type: text/plain\r\n" in head.lower() + b"\r\n"
    assert body == B_POLICY.encode()


def test_content_type_redirect_and_errors(site: Site) -> None:
    host = site.host
    host.set_content_type("b.test", "text/html")
    r = site.get()
    assert (r.status, r.headers["content-type"], r.body) == (200, "text/html",
                                                             B_POLICY.encode())
    host.redirect("b.test", "https://mta-sts.c.test/.well-known/mta-sts.txt")
    r = site.get()
    assert (r.status, r.headers["location"]) == (301, f"https://mta-sts.c.test{WELL_KNOWN}")
    for status in (404, 500):
        host.fail("b.test", status)
        assert site.get().status == status
    host.oversize("b.test")
    r = site.get()
    assert r.status == 200 and len(r.body) == 100 * 1024
    assert r.body.startswith(B_POLICY.encode())
    host.set_policy("b.test", C_POLICY)
    assert site.get().body == C_POLICY.encode()
    assert site.get("c.test").status == 200  # the other host never changed
    # Anything but the policy URL is not there.
    r = https_get(site.lab.gw, POLICY_V4, "mta-sts.b.test", "/", cafile=site.ca)
    assert r.status == 404


def test_stall(site: Site) -> None:
    site.host.stall("b.test", 1.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        site.get(timeout=0.3)
    # A client that waits long enough gets the policy after the stall.
    r = site.get(timeout=5)
    assert r.body == B_POLICY.encode()
    assert time.monotonic() - start >= 1.0


def test_certificates(site: Site) -> None:
    host = site.host
    kinds: list[tuple[CertKind, str]] = [
        ("wrong-name", "Hostname mismatch"), ("untrusted", "local issuer"), ("expired", "expired")
    ]
    for kind, why in kinds:
        host.present("b.test", kind)
        with pytest.raises(ssl.SSLCertVerificationError, match=why):
            site.get()
    # The server sends the same certificate to a client that does not check: it is the
    # certificate that fails, not the connection.
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    assert https_get(site.lab.gw, POLICY_V4, "mta-sts.b.test", context=insecure).status == 200
    host.present("b.test", "valid")
    assert site.get().status == 200
    # A name with no virtual host: refused in the handshake.
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        site.get("d.test")


def test_stop_start_and_the_access_log(site: Site) -> None:
    host = site.host
    before = len(host.fetches("b.test"))
    host.stop()
    assert not host.running
    with pytest.raises(ConnectionRefusedError):
        site.get()
    assert len(host.fetches("b.test")) == before  # not fetched
    host.start()
    assert site.get().status == 200
    assert len(host.fetches("b.test", at_least=before + 1)) == before + 1  # fetched again


def test_policy_id_changes_in_dns(site: Site) -> None:
    w = site.world
    set_sts_id(w, "test.", "b.test", "20260202")
    assert w.query("_mta-sts.b.test", "TXT") == ("NOERROR", True, [sts_txt("20260202")])
    # The rest of the zone is untouched.
    assert w.query("_mta-sts.c.test", "TXT") == ("NOERROR", True, [sts_txt("1")])
    assert w.query("mta-sts.b.test", "AAAA") == ("NOERROR", True, [POLICY_V6])
    if shutil.which("dig") is not None:
        out = w.dig("+dnssec", "_mta-sts.b.test.", "TXT")
        flags = out.split("flags:", 1)[1].split(";", 1)[0].split()
        assert "ad" in flags and "v=STSv1; id=20260202;" in out


def test_close_leaves_nothing(site: Site, tmp_path: Path) -> None:
    lab, address = site.lab, "203.0.113.44"
    with PolicyHost(lab.peer, [address], site.host.pki, tmp_path, dev=HOST_IF) as other:
        other.add_domain("e.test", C_POLICY)
        other.start()
        assert https_get(lab.gw, address, "mta-sts.e.test", cafile=site.ca).status == 200
        pids, workdir = other.pids, other.workdir
        assert len(pids) == 2  # master and worker
    assert not workdir.exists()
    assert address not in lab.peer.ip("-o", "addr", "show", "dev", HOST_IF).stdout
    assert not set(pids) & set(lab.peer.pids())
    assert site.get().status == 200  # the module's host, another nginx, still serves

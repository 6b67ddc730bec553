"""MTA-STS end to end with real parts: a legacy Postfix (no TLS) sends through the gateway
to real Postfix peers; the recipient domains publish MTA-STS policies on a real nginx
(gatelab.httpslab) under a test Web PKI; NSD + Unbound give DNSSEC where a domain has DANE.

    mta:  Postfix, smtp_tls_security_level=none; transport by recipient
    gw:   smtpgate (REDIRECT), Unbound on 127.0.0.1, mta_sts.ca_file = the test root
    peer: .2 Postfix, STARTTLS, certificate for mx.sts.test (valid in the test Web PKI)
          .3 Postfix, STARTTLS, a valid certificate for another name (www.elsewhere.test)
          .4 Postfix without STARTTLS (what a STARTTLS-stripping attacker leaves)
          .43 nginx: https://mta-sts.DOMAIN/.well-known/mta-sts.txt

    domain          policy                          MX (address)
    sts.test        enforce, mx.sts.test            mx.sts.test (.2)
    wrongname.test  enforce, mx.wrongname.test      mx.wrongname.test (.3)
    notlisted.test  enforce, mx.elsewhere.test      mx.notlisted.test (.2)
    testing.test    testing, mx.testing.test        mx.testing.test (.3)
    strip.test      enforce, mx.strip.test          mx.strip.test (.4)
    dane.test       enforce, nothere.dane.test      mx.dane.test (.2) with a matching TLSA
    nopolicy.test   none published                  mx.nopolicy.test (.3, .4)

Captures on the gateway's peer-side interface are the witness that a message an enforce
policy protects never crosses in clear.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from gatelab import dnslab, httpslab, netlab, postfix_instance
from gatelab.capture import Capture
from gatelab.certs import WebPki, write_chain_file
from gatelab.dnslab import DnsWorld
from gatelab.gatewayproc import GatewayProcess, cli, gateway_config
from gatelab.httpslab import POLICY_V4, PolicyHost, policy, set_sts_id, sts_records
from gatelab.netlab import Lab
from gatelab.postfix_instance import (
    PostfixInstance,
    null_client_settings,
    receiver_settings,
    tls_receiver_settings,
)
from gateway.dane import tlsa_record
from gateway.tlsrptstore import FLUSH_EVERY

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or dnslab.dnslab_usable() or postfix_instance.postfix_usable()
        or httpslab.httpslab_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

POLICIES = {
    "sts.test": policy("enforce", ["mx.sts.test"]),
    "wrongname.test": policy("enforce", ["mx.wrongname.test"]),
    "notlisted.test": policy("enforce", ["mx.elsewhere.test"]),
    "testing.test": policy("testing", ["mx.testing.test"]),
    "strip.test": policy("enforce", ["mx.strip.test"]),
    "dane.test": policy("enforce", ["nothere.dane.test"]),
    "fresh.test": policy("enforce", ["mx.sts.test"]),  # only smtpgate check asks for it
}
SCHEMA = json.loads((Path(__file__).parent / "data" / "tlsrpt-schema.json").read_text())
REPORTS = "reports.test"  # where the gateway's TLS reports go (a Postfix in gw)
REPORTED = ("sts.test", "wrongname.test", "strip.test", "dane.test", "wrongtlsa.test",
            "nopolicy.test")
ROUTES = {"sts.test": ".2", "notlisted.test": ".2", "dane.test": ".2",
          "wrongtlsa.test": ".2", "bogus.test": ".2",
          "wrongname.test": ".3", "testing.test": ".3", "nopolicy.test": ".3",
          "strip.test": ".4", "plain.nopolicy.test": ".4"}


@dataclass
class World:
    lab: Lab
    dns: DnsWorld
    host: PolicyHost
    gw: GatewayProcess
    mta: PostfixInstance
    good: PostfixInstance  # .2
    other: PostfixInstance  # .3
    plain: PostfixInstance  # .4
    work: Path


def gateway_text(work: Path, ca: Path) -> str:
    return gateway_config(policy="dane", resolvers=["127.0.0.1:53"], dns_timeout=1, budget=4,
                          cache="min_ttl: 0, max_ttl: 2") + (
        f"mta_sts: {{ca_file: '{ca}', cache: '{work / 'mta-sts.sqlite3'}', "
        "fetch_timeout: 5}\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("sts")
    pki = WebPki.make()
    good_leaf = pki.leaf(["mx.sts.test"])
    good = write_chain_file(work / "good.pem", good_leaf, *pki.chain)
    other = write_chain_file(work / "other.pem", pki.leaf(["www.elsewhere.test"]), *pki.chain)
    ca = pki.write_bundle(work / "ca.pem")
    records = [
        "sts MX 10 mx.sts", "mx.sts A 203.0.113.2",
        "wrongname MX 10 mx.wrongname", "mx.wrongname A 203.0.113.3",
        "notlisted MX 10 mx.notlisted", "mx.notlisted A 203.0.113.2",
        "testing MX 10 mx.testing", "mx.testing A 203.0.113.3",
        "strip MX 10 mx.strip", "mx.strip A 203.0.113.4",
        "dane MX 10 mx.dane", "mx.dane A 203.0.113.2",
        f"_25._tcp.mx.dane TLSA {tlsa_record(good_leaf.der)}",
        "nopolicy MX 10 mx.nopolicy", "mx.nopolicy A 203.0.113.3",
        "fresh MX 10 mx.sts",
        # DANE failures for the TLS reports: a TLSA that matches nothing; a bogus zone.
        "wrongtlsa MX 10 mx.wrongtlsa", "mx.wrongtlsa A 203.0.113.2",
        f"_25._tcp.mx.wrongtlsa TLSA 3 1 1 {'5a' * 32}",
        *(f'_smtp._tls.{d}. TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{REPORTS}"'
          for d in REPORTED),
    ]
    for domain in POLICIES:
        records += sts_records(domain, POLICY_V4, "1")
    transport = ", ".join(f"{d}=smtp:[203.0.113{a}]:25" for d, a in ROUTES.items())
    sender = null_client_settings("[203.0.113.99]:25")
    sender["transport_maps"] = f"inline:{{ {transport} }}"
    domains = ", ".join(ROUTES)
    with Lab() as lab, DnsWorld.on_lab(lab, work / "dns") as dns, \
            PolicyHost.on_lab(lab, pki, work / "https") as host:
        for address in ("203.0.113.4/24",):  # .2 and .3 are the lab's own
            lab.peer.ip("addr", "add", address, "dev", netlab.HOST_IF)
        dns.zone("test.", records)
        dns.zone("bogus.test.", ["@ MX 10 mx.sts.test."])
        dns.start()
        dns.make_bogus("bogus.test.")
        for domain, text in POLICIES.items():
            host.add_domain(domain, text)
        host.start()
        lab.redirect_port25(10025)
        with PostfixInstance(lab.peer, work, tls_receiver_settings(
                    "203.0.113.2", good, domain=domains), name="good") as good_peer, \
                PostfixInstance(lab.peer, work, tls_receiver_settings(
                    "203.0.113.3", other, domain=domains), name="other") as other_peer, \
                PostfixInstance(lab.peer, work, receiver_settings(
                    "203.0.113.4", domain=domains), name="plain") as plain_peer, \
                GatewayProcess(lab.gw, work / "gw", gateway_text(work, ca)) as gw, \
                PostfixInstance(lab.mta, work, sender, name="mta") as mta:
            yield World(lab, dns, host, gw, mta, good_peer, other_peer, plain_peer, work)


def send(w: World, *rcpts: str) -> bytes:
    marker = f"MARKER-{uuid.uuid4().hex}".encode()
    w.mta.sendmail("alice@example.com", list(rcpts),
                   b"Subject: mta-sts\r\n\r\n" + marker + b"\r\n")
    return marker


def deferred(w: World, rcpt: str, words: str, timeout: float = 30) -> str:
    """The MTA's log line deferring ``rcpt`` with the gateway's MTA-STS 450 (other
    deferrals on the way, e.g. while the gateway restarts, are passed over)."""
    m = w.mta.wait_log(rf"to=<{re.escape(rcpt)}>.*status=deferred \((.*450 4\.7\.5 smtpgate: "
                       rf"MTA-STS policy of .*{re.escape(words)}.*)\)", timeout=timeout)
    return m.group(1)


def session_with(w: World, domain: str, after: int = 0) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        found = [s for s in w.gw.sessions()[after:] if domain in str(s.get("mta_sts", ""))
                 or domain in str(s.get("deferred_recipients", ""))]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, w.gw.log_text()[-3000:]
        time.sleep(0.1)


def sts_count(w: World, mode: str, result: str) -> float:
    return w.gw.metric("smtpgate_mta_sts_recipients_total", mode=mode, result=result)


def test_enforce_with_a_valid_certificate_is_delivered_over_tls(world: World) -> None:
    with Capture(world.lab.gw, netlab.GW_PEER_IF, world.work / "good.pcap") as cap:
        marker = send(world, "u@sts.test")
        message = world.good.wait_delivered(marker, 30)
    assert not cap.contains(marker)
    assert b"(using TLSv1." in message
    s = session_with(world, "sts.test")
    assert s["tls"] == "tls" and "sts.test=enforce:success" in s["mta_sts"]
    assert sts_count(world, "enforce", "success") >= 1
    assert world.gw.metric("smtpgate_recipients_total", result="allowed",
                           reason="mta_sts") >= 1
    [fetch] = world.host.fetches("sts.test", at_least=1)
    assert fetch.status == 200


def test_a_certificate_for_another_name_defers_only_that_recipient(world: World) -> None:
    """One session, two recipients: the one whose domain enforces MTA-STS is refused (the
    peer's certificate names another host), the other (no policy) is delivered."""
    with Capture(world.lab.gw, netlab.GW_PEER_IF, world.work / "name.pcap") as cap:
        marker = send(world, "u@wrongname.test", "v@nopolicy.test")
        world.other.wait_delivered(marker, 30)
        deferred(world, "u@wrongname.test", "the certificate does not name its MX")
    assert cap.packets() > 0 and not cap.contains(b"u@wrongname.test")
    s = session_with(world, "wrongname.test")
    assert "wrongname.test: MTA-STS policy of wrongname.test" in s["deferred_recipients"]
    assert sts_count(world, "enforce", "certificate_host_mismatch") >= 1


def test_an_mx_the_policy_does_not_list_is_deferred(world: World) -> None:
    marker = send(world, "u@notlisted.test")
    deferred(world, "u@notlisted.test", "this server is not an MX it lists")
    assert not any(marker in p.read_bytes() for p in world.good.maildir_messages())
    assert sts_count(world, "enforce", "validation_failure") >= 1


def test_testing_delivers_and_counts(world: World) -> None:
    before = sts_count(world, "testing", "certificate_host_mismatch")
    marker = send(world, "u@testing.test")
    world.other.wait_delivered(marker, 30)
    s = session_with(world, "testing.test")
    assert "testing.test=testing:certificate_host_mismatch" in s["mta_sts"]
    assert sts_count(world, "testing", "certificate_host_mismatch") == before + 1


def test_stripped_starttls_toward_an_enforce_domain_is_deferred(world: World) -> None:
    """The peer offers no STARTTLS (what an attacker who strips it leaves): the session
    goes on in plaintext as may allows, but the enforce recipient never crosses."""
    with Capture(world.lab.gw, netlab.GW_PEER_IF, world.work / "strip.pcap") as cap:
        marker = send(world, "u@strip.test")
        deferred(world, "u@strip.test", "this hop is not encrypted")
    assert not cap.contains(marker) and not cap.contains(b"u@strip.test")
    assert sts_count(world, "enforce", "starttls_not_supported") >= 1


def test_no_policy_is_opportunistic_as_before(world: World) -> None:
    marker = send(world, "u@plain.nopolicy.test")
    world.plain.wait_delivered(marker, 30)


def test_dane_decides_where_the_mx_has_tlsa(world: World) -> None:
    """dane.test's policy lists a host that is not its MX: MTA-STS alone would defer; the
    MX has a matching TLSA, so DANE decides (RFC 8461 2) and the mail goes."""
    marker = send(world, "u@dane.test")
    world.good.wait_delivered(marker, 30)
    assert world.gw.metric("smtpgate_recipients_total", result="allowed", reason="dane") >= 1
    assert world.host.fetches("dane.test") == []  # never even looked up


def test_a_new_policy_id_is_fetched_again(world: World) -> None:
    fetched = len(world.host.fetches("testing.test"))
    assert fetched >= 1
    # testing -> enforce under a new id: the certificate at .3 names another host.
    world.host.set_policy("testing.test", policy("enforce", ["mx.testing.test"]))
    set_sts_id(world.dns, "test.", "testing.test", "2")
    time.sleep(2.5)  # the gateway's cache of the TXT answer (max_ttl 2) runs out
    send(world, "w@testing.test")
    deferred(world, "w@testing.test", "the certificate does not name its MX")
    assert len(world.host.fetches("testing.test", at_least=fetched + 1)) == fetched + 1


def test_https_down_keeps_the_cached_policy_in_force_across_a_restart(world: World) -> None:
    world.host.stop()
    try:
        send(world, "x@wrongname.test")
        deferred(world, "x@wrongname.test", "the certificate does not name its MX")
        # A restarted gateway has the policy from its cache file: the first message after
        # the restart is protected although the policy host is down.
        world.gw.stop()
        world.gw.start()
        send(world, "y@wrongname.test")
        deferred(world, "y@wrongname.test", "the certificate does not name its MX")
    finally:
        world.host.start()


def test_check_shows_the_policy_its_source_and_the_recipients_fate(world: World) -> None:
    cfg = str(world.gw.config_path)
    # A domain no session has asked for: fetched now (and not written to the gateway's
    # cache: check only reads it).
    r = cli(world.lab.gw, "check", "-c", cfg, "--rcpt", "u@fresh.test", "203.0.113.2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MTA-STS: policy id 1, mode enforce, max_age 86400, mx mx.sts.test; source fetch" \
        in r.stdout, r.stdout
    assert "MTA-STS: MX hosts it lists that are this destination: mx.sts.test" in r.stdout
    assert "MTA-STS: enforce: success" in r.stdout
    assert "result: forwarded (mta_sts)" in r.stdout
    # One the gateway has: from its cache file; the certificate at .3 names another host.
    send(world, "z@wrongname.test")
    deferred(world, "z@wrongname.test", "the certificate does not name its MX")
    r = cli(world.lab.gw, "check", "-c", cfg, "--rcpt", "u@wrongname.test", "203.0.113.3")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "mode enforce, max_age 86400, mx mx.wrongname.test; source cache" in r.stdout
    assert ("result: would defer: 450 4.7.5 smtpgate: MTA-STS policy of wrongname.test: "
            "the certificate does not name its MX") in r.stdout, r.stdout
    # Without a connection: the policy and the MX, the certificate unchecked.
    r = cli(world.lab.gw, "check", "-c", cfg, "--no-connect", "--rcpt", "u@notlisted.test",
            "203.0.113.2")
    assert r.returncode == 1 and "this server is not an MX it lists" in r.stdout, r.stdout


def test_require_and_off_per_recipient_domain(world: World) -> None:
    """policy.recipients: `require` defers a domain without a policy; `off` lets a domain
    whose enforce policy this hop fails through (the operator's choice)."""
    original = world.gw.config_path.read_text()
    world.gw.config_path.write_text(original.replace("policy: {default: dane}", (
        "policy: {default: dane, recipients: [{domain: plain.nopolicy.test, mta_sts: "
        "require}, {domain: wrongname.test, mta_sts: off}]}")))
    assert "mta_sts: require" in world.gw.config_path.read_text()
    try:
        r = cli(world.lab.gw, "reload", "-c", str(world.gw.config_path))
        assert r.returncode == 0, r.stdout + r.stderr
        send(world, "r@plain.nopolicy.test")
        world.mta.wait_log(r"to=<r@plain\.nopolicy\.test>.*status=deferred \(.*450 4\.7\.5 "
                           r"smtpgate: policy requires MTA-STS for plain\.nopolicy\.test: "
                           r"it publishes no policy", timeout=30)
        marker = send(world, "o@wrongname.test")
        world.other.wait_delivered(marker, 30)
        assert sts_count(world, "enforce", "no_policy") >= 1
    finally:
        world.gw.config_path.write_text(original)
        assert cli(world.lab.gw, "reload", "-c", str(world.gw.config_path)).returncode == 0


def purge(mta: PostfixInstance) -> None:
    """Drop the MTA's queue: a deferred message retried every second would add sessions the
    test did not send."""
    mta.ns.run(["postsuper", "-c", str(mta.config_dir), "-d", "ALL"], check=False)


def test_tls_reports_count_the_sessions_and_arrive_by_mail(world: World) -> None:
    """Every session the test sends is in the day's reports, one policy and result each,
    across a restart of the gateway; `tlsrpt send --now` hands them to the relay, which
    delivers them to a mailbox, where they are parsed back."""
    work = world.work
    store = work / "tlsrpt.sqlite3"
    original = world.gw.config_path.read_text()
    with PostfixInstance(world.lab.gw, work, receiver_settings(
            "127.0.0.1", domain=REPORTS, myhostname="relay.gw.test"), name="relay") as relay:
        world.gw.config_path.write_text(original + (
            f"tlsrpt: {{enabled: true, organization: Lab Gateway, contact: "
            f"'mailto:postmaster@a.test', sender: tlsrpt@a.test, relay: '127.0.0.1:25', "
            f"store: '{store}'}}\n"))
        # No retry of a deferred message during the count: each message is one session.
        world.mta.set_main_cf({"minimal_backoff_time": "600s", "maximal_backoff_time": "600s",
                               "queue_run_delay": "600s"})
        try:
            purge(world.mta)
            r = cli(world.lab.gw, "reload", "-c", str(world.gw.config_path))
            assert r.returncode == 0, r.stdout + r.stderr
            expected = {  # domain -> (policy type, result, sessions)
                "sts.test": ("sts", "success", 2), "dane.test": ("tlsa", "success", 1),
                "wrongname.test": ("sts", "certificate-host-mismatch", 1),
                "strip.test": ("sts", "starttls-not-supported", 1),
                "wrongtlsa.test": ("tlsa", "validation-failure", 1),
                "bogus.test": ("tlsa", "dnssec-invalid", 1),
                "nopolicy.test": ("no-policy-found", "success", 1),
            }
            sent = 0
            for domain, (_, _result, n) in expected.items():
                for _ in range(n):
                    rcpt = f"r{sent}@{domain}"
                    mark = world.mta.log_mark()
                    send(world, rcpt)
                    world.mta.wait_log(rf"to=<{re.escape(rcpt)}>.*status=(sent|deferred)",
                                       timeout=30, since=mark)
                    purge(world.mta)
                    sent += 1
                if domain == "strip.test":  # halfway: what was counted survives a restart
                    world.gw.stop()
                    world.gw.start()
            # A report's own delivery (MAIL FROM tlsrpt.sender) is not counted (RFC 8460
            # 5.3): sts.test stays at the 2 sessions above.
            marker = f"MARKER-{uuid.uuid4().hex}".encode()
            world.mta.sendmail("tlsrpt@a.test", "report@sts.test",
                               b"Subject: a report\r\n\r\n" + marker + b"\r\n")
            world.good.wait_delivered(marker, 30)
            day = time.strftime("%Y-%m-%d", time.gmtime())
            time.sleep(FLUSH_EVERY + 1)  # the running gateway writes its counts this often
            r = cli(world.lab.gw, "tlsrpt", "show", "-c", str(world.gw.config_path),
                    "--day", day)
            assert r.returncode == 0, r.stdout + r.stderr
            shown = {rep["policies"][0]["policy"]["policy-domain"]: rep
                     for rep in json_stream(r.stdout)}
            assert sorted(shown) == sorted(expected), r.stdout
            for domain, (ptype, result, n) in expected.items():
                [p] = shown[domain]["policies"]
                assert p["policy"]["policy-type"] == ptype, (domain, p)
                good = n if result == "success" else 0
                assert p["summary"] == {"total-successful-session-count": good,
                                        "total-failure-session-count": n - good}, (domain, p)
                if result != "success":
                    [detail] = p["failure-details"]
                    assert (detail["result-type"], detail["failed-session-count"]) == (
                        result, n), (domain, detail)
                    assert detail["receiving-ip"].startswith("203.0.113.")
            r = cli(world.lab.gw, "tlsrpt", "send", "-c", str(world.gw.config_path),
                    "--day", day, "--now")
            # bogus.test's own TXT record cannot be trusted: its report is not sent (exit 1,
            # retried later); every other domain's is.
            assert r.returncode == 1, r.stdout + r.stderr
            assert "bogus.test: lookup-failed: the TXT lookup of _smtp._tls.bogus.test. " \
                   "failed DNSSEC validation" in r.stdout, r.stdout
            mails = relay.wait_maildir(len(REPORTED), timeout=30)
            received = {}
            for path in mails:
                msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                assert msg.get_content_type() == "multipart/report"
                assert msg.get_param("report-type") == "tlsrpt"
                [part] = [p for p in msg.iter_attachments()
                          if p.get_content_type() == "application/tlsrpt+gzip"]
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                report = json.loads(gzip.decompress(payload))
                domain = str(msg["TLS-Report-Domain"])
                assert report["policies"][0]["policy"]["policy-domain"] == domain
                jsonschema.validate(report, SCHEMA)  # RFC 8460's format
                received[domain] = report
            # What arrived is what show printed (bogus.test's own TXT record cannot be
            # trusted: its report is not sent).
            assert received == {d: shown[d] for d in REPORTED}
            assert world.gw.metric("smtpgate_tlsrpt_reports_total", method="mailto",
                                   result="sent") == 0  # sent by the CLI, not the gateway
        finally:
            world.gw.config_path.write_text(original)
            cli(world.lab.gw, "reload", "-c", str(world.gw.config_path))
            purge(world.mta)
            world.mta.set_main_cf({"minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
                                   "queue_run_delay": "1s"})


def json_stream(text: str) -> list[dict[str, Any]]:
    """The JSON documents `tlsrpt show` prints one after the other."""
    decoder, out, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        doc, end = decoder.raw_decode(text, i)
        out.append(doc)
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return out

"""No resolver answers the gateway (nothing on 127.0.0.1:53): what each level owes the mail.

    mta:  Postfix, sends to bob@peer.test via [203.0.113.2]
    gw:   smtpgate outbound, no DNS at all
    peer: Postfix, no TLS

The self-test says so at start (gauge, /healthz, ``smtpgate status``).

Under ``may`` (and none, encrypt, fingerprint) the operator chose no DANE for the destination:
the recipient is not looked up, the message is delivered.  Under ``dane`` (the default) a
recipient domain whose MX cannot be looked up might publish TLSA: it is deferred with a reply
that says so in plain words, and the MTA keeps the message.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from gatelab import netlab, postfix_instance
from gatelab.gatewayproc import GatewayProcess, cli, gateway_config
from gatelab.netlab import PEER_V4, Lab
from gatelab.postfix_instance import PostfixInstance, null_client_settings, receiver_settings

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)


@pytest.mark.parametrize("level", ["may", "dane"])
def test_without_a_resolver(tmp_path: Path, level: str) -> None:
    with Lab() as lab:
        lab.redirect_port25(10025)
        with GatewayProcess(lab.gw, tmp_path / "gw", gateway_config(policy=level)) as gw, \
                PostfixInstance(lab.peer, tmp_path, receiver_settings(PEER_V4, "peer.test"),
                                name="peer") as peer, \
                PostfixInstance(lab.mta, tmp_path, null_client_settings(f"[{PEER_V4}]:25"),
                                name="mta") as mta:
            marker = uuid.uuid4().hex.encode()
            mta.sendmail("alice@mta.example.com", "bob@peer.test",
                         b"Subject: dns down\r\n\r\n" + marker + b"\r\n")
            if level == "may":
                [message] = peer.wait_maildir(1, timeout=20)
                assert marker in message.read_bytes()
                [s] = gw.wait_sessions(1)
                assert "deferred_recipients" not in s, s
                assert gw.metric("smtpgate_recipients_total", result="allowed",
                                 reason="none") == 1
            else:
                m = mta.wait_log(r"to=<bob@peer\.test>.*status=deferred \((.*)\)", timeout=30)
                assert ("450 4.7.5 smtpgate: cannot check DANE for peer.test: its MX lookup "
                        "got no answer from the resolver") in m.group(1), m.group(1)
                assert peer.maildir_messages() == [] and len(mta.queue()) == 1
            # And the gateway says so before any mail is affected: the self-test at start
            # found no resolver, /healthz (still 200: it serves) and status name it.
            assert gw.metric("smtpgate_dns_selftest", resolver="127.0.0.1:53",
                             check="answers") == 0
            head, body = netlab.http_get(lab.gw, "127.0.0.1", gw.metrics_port, "/healthz")
            assert head.startswith(b"HTTP/1.1 200")
            assert body.startswith(b"degraded\ndns 127.0.0.1:53 answers: FAILED: . DNSKEY: ")
            r = cli(lab.gw, "status", "-c", str(gw.config_path))
            assert r.returncode == 1 and "127.0.0.1:53: answers FAILED" in r.stdout, r.stdout

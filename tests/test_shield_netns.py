"""The inbound gateway in front of a default Debian Postfix (3.7, no smtpd_forbid_bare_newline,
no TLS of its own): SMTP smuggling does not get through, an honest message arrives as sent,
and a real client that says NOOP before STARTTLS still gets the gateway's TLS.

    peer (internet): the sending client (Python, in the peer namespace)
    gw:   smtpgate inbound, four listeners behind REDIRECT by destination port:
            25 -> offload, smuggling: normalize (the defaults)
            26 -> passthrough, smuggling: normalize
            27 -> offload, smuggling: reject
            28 -> offload, smuggling: off (the control: what the MTA does alone)
    mta:  Postfix on 198.51.100.2:25, every recipient at b.test into one Maildir

A smuggled message is one the MTA delivered with the smuggler's envelope sender
(``x@tripwire.example``): counted from the Maildir, whatever the gateway's log says.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gatelab import certs, netlab, postfix_instance
from gatelab.gatewayproc import GatewayProcess, gateway_config
from gatelab.netlab import GW_PEER_IF, MTA_V4, Lab
from gatelab.postfix_instance import PostfixInstance, receiver_settings
from gatelab.smuggling import END, VARIANTS, smuggling
from gateway.smtp import RemoteProtocolError, Reply, ReplyReader

pytestmark = [pytest.mark.netns, pytest.mark.slow]

if (_why := netlab.netns_usable() or postfix_instance.postfix_usable()) is not None:
    pytest.skip(_why, allow_module_level=True)

PORTS = {"normalize": 25, "passthrough": 26, "reject": 27, "off": 28}


@dataclass
class Site:
    lab: Lab
    mta: PostfixInstance
    gw: GatewayProcess


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("shield")
    leaf = certs.make_leaf(None, ["mx.b.test"])
    key, cert = work / "key.pem", work / "cert.pem"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(leaf.key_pem)
    cert.write_bytes(leaf.pem)
    listeners = [
        f'{{name: "{name}", address: 0.0.0.0, port: {10000 + port}, direction: inbound, '
        f'starttls: {"passthrough" if name == "passthrough" else "offload"}, '
        f'smuggling: {"normalize" if name == "passthrough" else name}, '
        f'upstreams: ["{MTA_V4}:25"]}}' for name, port in PORTS.items()]
    settings = receiver_settings(MTA_V4, domain="b.test", myhostname="legacy.b.test")
    with Lab() as lab:
        for port in PORTS.values():
            lab.gw.iptables(["-t", "nat", "-A", "PREROUTING", "-i", GW_PEER_IF, "-p", "tcp",
                             "--dport", str(port), "-j", "REDIRECT", "--to-ports",
                             str(10000 + port)])
        with PostfixInstance(lab.mta, work, settings, name="legacy") as mta, \
                GatewayProcess(lab.gw, work / "gw", gateway_config(listeners=listeners,
                                                                   tls=(key, cert))) as gw:
            assert "smtpd_forbid_bare_newline" not in mta.postconf("-n")  # a default MTA
            yield Site(lab, mta, gw)


class Client:
    """A plain SMTP client over a socket in the peer namespace, TLS when asked."""

    def __init__(self, site: Site, port: int) -> None:
        self.sock: socket.socket = site.lab.peer.connect(MTA_V4, port,
                                                                        timeout=10)
        self.reader = ReplyReader()

    def reply(self) -> Reply | None:
        while (r := self.reader.next()) is None:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.reader.feed(data)
        return r

    def say(self, line: bytes) -> Reply | None:
        self.sock.sendall(line)
        return self.reply()

    def starttls(self) -> None:
        r = self.say(b"STARTTLS\r\n")
        assert r is not None and r.code == 220, r
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock)
        self.reader = ReplyReader()

    def rest(self) -> list[int]:
        """Codes of every reply until the connection closes."""
        codes: list[int] = []
        try:
            while (r := self.reply()) is not None:
                codes.append(r.code)
        except (OSError, RemoteProtocolError):
            pass
        return codes


def send(site: Site, port: int, content: bytes, tls: bool = False) -> tuple[int, list[int]]:
    """One message, an honest client's way (it waits for each reply): the code of the reply
    to the content, and of every reply after it until the connection closed."""
    c = Client(site, port)
    try:
        assert (r := c.reply()) is not None and r.code == 220, r
        assert (r := c.say(b"EHLO client.example\r\n")) is not None and r.code == 250, r
        if tls:
            c.starttls()
            assert (r := c.say(b"EHLO client.example\r\n")) is not None and r.code == 250, r
        assert (r := c.say(b"MAIL FROM:<a@client.example>\r\n")) is not None and r.code == 250
        assert (r := c.say(b"RCPT TO:<bob@b.test>\r\n")) is not None and r.code == 250, r
        assert (r := c.say(b"DATA\r\n")) is not None and r.code == 354, r
        end = c.say(content)
        code = end.code if end is not None else 0
        with contextlib.suppress(OSError):
            c.sock.sendall(b"QUIT\r\n")
        return code, c.rest()
    finally:
        c.sock.close()


def delivered(site: Site, mark: int) -> list[bytes]:
    """Messages delivered since the Maildir held ``mark`` of them, once the queue is empty."""
    site.mta.wait_queue_empty(timeout=30)
    return [p.read_bytes() for p in sorted(site.mta.maildir_messages(),
                                           key=lambda p: p.stat().st_mtime_ns)][mark:]


def smuggled(messages: list[bytes]) -> list[bytes]:
    return [m for m in messages if m.startswith(b"Return-Path: <x@tripwire.example>")]


@pytest.mark.parametrize(("listener", "tls"), [("normalize", False), ("normalize", True),
                                               ("passthrough", False)])
def test_no_variant_smuggles_a_message_into_the_default_postfix(site: Site, listener: str,
                                                                tls: bool) -> None:
    mark = len(site.mta.maildir_messages())
    for variant in VARIANTS:
        code, _ = send(site, PORTS[listener], smuggling(variant, f"{listener}-{variant}"), tls)
        assert code == 250, (variant, code)
    got = delivered(site, mark)
    assert smuggled(got) == [], [m[:200] for m in smuggled(got)]
    # One message per session, the carrier, holding the would-be second one as content.
    assert len(got) == len(VARIANTS), [m[:300] for m in got]
    for variant in VARIANTS:
        [m] = [m for m in got if f"Subject: carrier {listener}-{variant}\n".encode() in m]
        assert b"Subject: smuggled " + f"{listener}-{variant}\n".encode() in m
        assert m.rstrip().endswith(b"after"), (variant, m[-200:])
    lines = [s for s in site.gw.sessions() if s.get("listener") == listener
             and s.get("smuggling")]
    assert lines and all(s["smuggling"].startswith("normalized ") for s in lines), lines


def send_bdat(site: Site, port: int, chunks: list[bytes]) -> list[int]:
    """One message in BDAT chunks (the last with LAST), pipelined behind MAIL and RCPT as
    RFC 3030 allows: the codes of every reply until the connection closes."""
    c = Client(site, port)
    try:
        assert (r := c.reply()) is not None and r.code == 220, r
        assert (r := c.say(b"EHLO client.example\r\n")) is not None and b"CHUNKING" in r.raw
        out = b"MAIL FROM:<a@client.example>\r\nRCPT TO:<bob@b.test>\r\n"
        for i, chunk in enumerate(chunks):
            last = b" LAST" if i == len(chunks) - 1 else b""
            out += b"BDAT %d%s\r\n" % (len(chunk), last) + chunk
        c.sock.sendall(out + b"QUIT\r\n")
        return c.rest()
    finally:
        c.sock.close()


@pytest.mark.parametrize("listener", ["normalize", "reject", "passthrough"])
def test_bdat_chunks_smuggle_nothing_and_arrive_as_sent(site: Site, listener: str) -> None:
    """Chunks framed by count: an end of data and commands inside a chunk, in every line end,
    are content for the MTA as for the gateway, in every mode."""
    inside = b"".join(VARIANTS.values())
    chunks = [b"From: a@client.example\r\nSubject: bdat " + listener.encode() + b"\r\n\r\n",
              b"x" + inside + smuggling("LF.LF", f"bdat-{listener}") + b"\r\n.\r\nQUIT\r\n",
              b"tail\r\n"]
    mark = len(site.mta.maildir_messages())
    codes = send_bdat(site, PORTS[listener], chunks)
    assert codes == [250, 250, 250, 250, 250, 221], codes
    got = delivered(site, mark)
    assert len(got) == 1 and smuggled(got) == [], got
    assert f"Subject: smuggled bdat-{listener}".encode() in got[0]


def test_reject_delivers_nothing_and_the_client_hears_why(site: Site) -> None:
    mark = len(site.mta.maildir_messages())
    before = len(site.gw.sessions())
    for variant in VARIANTS:
        code, _ = send(site, PORTS["reject"], smuggling(variant, f"reject-{variant}"))
        assert code == 550, (variant, code)
    assert delivered(site, mark) == []
    site.gw.wait_sessions(before + len(VARIANTS))
    refused = [s for s in site.gw.sessions()[before:] if s.get("listener") == "reject"]
    assert len(refused) == len(VARIANTS)
    assert all(s["outcome"] == "refused_smuggling" and s["smuggling"].startswith("refused ")
               for s in refused), refused
    assert site.gw.metric("smtpgate_smuggling_total", action="refused", kind="bare_lf") >= 1


def test_the_control_without_the_shield_is_smuggled_into(site: Site) -> None:
    """Without the shield (smuggling: off) the same default Postfix takes some variants for
    two messages: what the other tests show the shield prevents is real here."""
    mark = len(site.mta.maildir_messages())
    for variant in VARIANTS:
        send(site, PORTS["off"], smuggling(variant, f"off-{variant}"))
    through = smuggled(delivered(site, mark))
    names = sorted(re.search(rb"Subject: smuggled off-(\S+)", m).group(1).decode()  # type: ignore[union-attr]
                   for m in through)
    print(f"\nwithout the shield, smuggled into Postfix 3.7: {names}")
    assert "LF.LF" in names and "LF.CRLF" in names, names


@pytest.mark.parametrize("listener", ["normalize", "reject", "passthrough"])
def test_an_honest_message_arrives_as_sent(site: Site, listener: str) -> None:
    body = (b"From: a@client.example\r\nSubject: honest " + listener.encode() + b"\r\n\r\n"
            b"..a stuffed dot\r\n .\r\n" + b"x" * 900 + b"\r\nlast" + END)
    mark = len(site.mta.maildir_messages())
    code, _ = send(site, PORTS[listener], body)
    assert code == 250
    [m] = delivered(site, mark)
    # Maildir keeps LF line ends; the dot the client stuffed is gone, as SMTP wants.
    sent = body[:-len(END)].replace(b"\r\n..a", b"\r\n.a").replace(b"\r\n", b"\n")
    assert m.endswith(sent + b"\n"), m[-300:]


def test_a_real_client_says_noop_then_starttls(site: Site) -> None:
    """Python's smtplib: EHLO, NOOP, STARTTLS (the gateway's), EHLO, a message; the MTA never
    sees STARTTLS (its own session summary), the gateway's line says tls."""
    script = (
        "import smtplib, ssl\n"
        "ctx = ssl.create_default_context(); ctx.check_hostname = False\n"
        "ctx.verify_mode = ssl.CERT_NONE\n"
        f"s = smtplib.SMTP('{MTA_V4}', 25, local_hostname='client.example', timeout=10)\n"
        "s.ehlo(); assert s.noop()[0] == 250\n"
        "assert s.has_extn('starttls'); s.starttls(context=ctx); s.ehlo()\n"
        "s.sendmail('a@client.example', ['bob@b.test'],\n"
        "           'Subject: noop first\\r\\n\\r\\nhi\\r\\n')\n"
        "s.quit()\n")
    mark = len(site.mta.maildir_messages())
    log_mark = site.mta.log_mark()
    before = len(site.gw.sessions())
    site.lab.peer.run([sys.executable, "-c", script], timeout=30)
    [m] = delivered(site, mark)
    assert b"Subject: noop first" in m
    summary = site.mta.wait_log(r"disconnect from \S+ (ehlo=\S+ .*commands=\S+)",
                                since=log_mark).group(1)
    assert "noop=1" in summary and "starttls" not in summary, summary
    [line] = site.gw.wait_sessions(before + 1)[before:]
    assert line["listener"] == "normalize" and line["tls"] == "tls", line
    assert line["outcome"] == "relayed", line  # its close after QUIT's 221 ends nothing

"""An SMTP peer that attacks the outbound upgrade on demand, and the plain MTA that sends
to it (asyncio, in-process), for the no-downgrade campaign and the reloads under load.

The peer is the witness: :class:`PeerRecord` keeps every MAIL, RCPT and message content it
receives, per session (the MTA's EHLO name says ``s<N>.``) and over what :class:`Channel`:
plaintext, TLS with the key of the TLSA, or TLS with another key.  What it does to a session
is the session's :class:`PeerAttack`; :class:`DnsMode` names what the DNS does meanwhile
(tests/test_downgrade_netns.py plays it).  :func:`mta_session` sends one :class:`Trial`'s
message the way an MTA without TLS of its own does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gatelab.dnslab import DANE_HOST
from gatelab.netlab import PEER_V4, reset_close


def trials(default: int, full: int) -> int:
    """``SMTPGATE_TRIALS``: unset → ``default`` (CI), ``full`` → ``full``, N → N."""
    value = os.environ.get("SMTPGATE_TRIALS", "").strip().lower()
    if not value:
        return default
    if value == "full":
        return full
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"SMTPGATE_TRIALS={value!r}: 'full' or a positive number")


HOST = DANE_HOST
RCPT = "bob@b.test"
INJECTED = b"250-injected.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"



class DnsMode(StrEnum):
    HONEST = "honest"
    TLSA_FORGED = "tlsa-forged"  # the attacker's own key in the TLSA answer (old RRSIG kept)
    TLSA_NXDOMAIN = "tlsa-nxdomain"  # "no such name", without a denial of existence
    TLSA_SERVFAIL = "tlsa-servfail"  # the authority fails the TLSA query
    TLSA_DROP = "tlsa-drop"  # TLSA queries never answered
    A_FORGED = "a-forged"  # another address for the host
    PTR_FORGED = "ptr-forged"  # another name for the address (no DANE at the plan level)
    STRIP_RRSIG = "strip-rrsig"  # every signature removed from every answer


class PeerAttack(StrEnum):
    HONEST = "honest"
    STRIP = "starttls-stripped"
    REFUSE_454 = "starttls-454"
    REFUSE_502 = "starttls-502"
    WRONG_KEY = "wrong-key"
    INJECT = "inject-after-220"  # plaintext lines in the 220's own segment
    INJECT_LATER = "inject-later"  # ... or 20 ms after it, before the handshake
    RESET_HANDSHAKE = "reset-in-handshake"  # RST after the ClientHello's first bytes
    RESET_AFTER_TLS = "reset-after-handshake"  # RST right after the handshake


class Channel(StrEnum):
    PLAINTEXT = "plaintext"
    MATCHING = "tls-matching-key"
    WRONG = "tls-wrong-key"


@dataclass
class PeerRecord:
    """What reached the peer, per session id (from the EHLO name) and channel."""

    events: dict[int, list[tuple[str, Channel]]] = field(
        default_factory=lambda: defaultdict(list))
    counts: Counter[tuple[str, Channel]] = field(default_factory=Counter)
    handshakes: Counter[str] = field(default_factory=Counter)
    # Sessions whose TLS handshake began (the ClientHello arrived): a wrong-key or reset
    # trial that never got there would pass whatever the gateway does.
    reached_tls: set[int] = field(default_factory=set)

    def note(self, sid: int, what: str, channel: Channel) -> None:
        self.events[sid].append((what, channel))
        self.counts[what, channel] += 1


class AdversarialPeer:
    """An SMTP server that behaves like a real one (replies, 554 to a DATA without
    recipients, state reset after TLS) except where the session's attack says otherwise."""

    def __init__(self, good: ssl.SSLContext, wrong: ssl.SSLContext) -> None:
        self.good, self.wrong = good, wrong
        self.attacks: dict[int, PeerAttack] = {}
        self.record = PeerRecord()
        self.errors: list[BaseException] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._dialog(reader, writer)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError,
                TimeoutError, ValueError):
            pass  # the gateway gave up on us, or we reset it
        except Exception as exc:
            self.errors.append(exc)
        finally:
            writer.transport.abort()

    async def _dialog(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rec = self.record
        channel, sid, attack = Channel.PLAINTEXT, -1, PeerAttack.HONEST
        mail, rcpts = False, 0
        writer.write(b"220 mx.b.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line.split(None, 1)[0].upper() if line.strip() else b""
            if verb in (b"EHLO", b"HELO"):
                if (m := re.search(rb"\bs(\d+)\.", line)) is not None:
                    sid = int(m[1])
                    attack = self.attacks.get(sid, PeerAttack.HONEST)
                caps = [b"mx.b.test", b"PIPELINING", b"SIZE 10240000", b"8BITMIME",
                        b"ENHANCEDSTATUSCODES"]
                if channel is Channel.PLAINTEXT and attack is not PeerAttack.STRIP:
                    caps.append(b"STARTTLS")
                writer.write(b"".join(b"250" + (b" " if i == len(caps) - 1 else b"-") + c
                                      + b"\r\n" for i, c in enumerate(caps)))
                mail, rcpts = False, 0
            elif verb == b"STARTTLS" and channel is Channel.PLAINTEXT:
                if attack is PeerAttack.REFUSE_454:
                    writer.write(b"454 4.7.0 TLS not available due to temporary reason\r\n")
                elif attack in (PeerAttack.REFUSE_502, PeerAttack.STRIP):
                    writer.write(b"502 5.5.1 command not implemented\r\n")
                elif attack is PeerAttack.INJECT:
                    writer.write(b"220 2.0.0 Ready to start TLS\r\n" + INJECTED)
                elif attack is PeerAttack.INJECT_LATER:
                    writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.02)
                    writer.write(INJECTED)
                else:
                    writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                    await writer.drain()
                    if attack is PeerAttack.RESET_HANDSHAKE:
                        await reader.readexactly(5)  # a TLS record header: the ClientHello
                        rec.handshakes["reset in handshake"] += 1
                        rec.reached_tls.add(sid)
                        reset_close(writer)
                        return
                    wrong = attack is PeerAttack.WRONG_KEY
                    try:
                        await writer.start_tls(self.wrong if wrong else self.good,
                                               ssl_handshake_timeout=15)
                    except (ssl.SSLError, OSError, ConnectionError, TimeoutError):
                        rec.handshakes[f"{attack} failed"] += 1
                        if attack is PeerAttack.WRONG_KEY:
                            rec.reached_tls.add(sid)  # the key was shown, then refused
                        return
                    rec.reached_tls.add(sid)
                    channel = Channel.WRONG if wrong else Channel.MATCHING
                    rec.handshakes[str(channel)] += 1
                    if attack is PeerAttack.RESET_AFTER_TLS:
                        reset_close(writer)
                        return
                    mail, rcpts = False, 0
                    continue  # nothing to say: the client speaks first after TLS
            elif verb == b"MAIL":
                rec.note(sid, "MAIL", channel)
                mail = True
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                if not mail:
                    writer.write(b"503 5.5.1 need MAIL first\r\n")
                else:
                    rec.note(sid, "RCPT", channel)
                    rcpts += 1
                    writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                if not rcpts:
                    writer.write(b"554 5.5.1 no valid recipients\r\n")
                    continue
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                await writer.drain()
                content = bytearray()
                while (part := await reader.readline()) not in (b".\r\n", b""):
                    content += part
                if not part:
                    rec.note(sid, "partial content", channel)
                    return
                rec.note(sid, "content" if f"MARKER-{sid}-".encode() in content
                         else "foreign content", channel)
                writer.write(b"250 2.0.0 Ok: queued\r\n")
                rec.note(sid, "accepted", channel)
                mail, rcpts = False, 0
            elif verb in (b"RSET", b"NOOP"):
                mail, rcpts = (False, 0) if verb == b"RSET" else (mail, rcpts)
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"502 5.5.2 Error: command not recognized\r\n")
            await writer.drain()


# -- the MTA ---------------------------------------------------------------------------------

@dataclass
class Trial:
    sid: int
    dns: DnsMode
    attack: PeerAttack
    pipelined: bool
    pause: float = 0.0  # seconds in DATA, between the 354 and the content
    port: int = 0
    outcome: str = ""  # "delivered", a reply ("421 4.7.4"), "closed" or "timeout"
    detail: str = ""
    codes: list[str] = field(default_factory=list)
    gateway: dict[str, Any] = field(default_factory=dict)  # its session line

    @property
    def honest(self) -> bool:
        return self.dns is DnsMode.HONEST and self.attack is PeerAttack.HONEST


class Refused(Exception):
    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


async def read_reply(reader: asyncio.StreamReader) -> tuple[str, list[bytes]]:
    lines = []
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("closed")
        lines.append(line)
        if line[3:4] != b"-":
            return line[:3].decode("ascii", "replace"), lines


async def expect(reader: asyncio.StreamReader, trial: Trial, *ok: str) -> list[bytes]:
    code, lines = await read_reply(reader)
    trial.codes.append(code)
    if code not in ok:
        raise Refused(code, b"".join(lines).decode("ascii", "replace").strip())
    return lines


async def mta_session(trial: Trial) -> None:
    """One message, the way a plain MTA (no TLS of its own) sends it."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(30):
            reader, writer = await asyncio.open_connection(  # noqa: TID251 (test client)
                PEER_V4, 25, limit=1 << 20)
            trial.port = writer.get_extra_info("sockname")[1]
            await expect(reader, trial, "220")
            writer.write(f"EHLO s{trial.sid}.mta.a.test\r\n".encode())
            caps = await expect(reader, trial, "250")
            nonce = os.urandom(6).hex()
            commands = [b"MAIL FROM:<alice@a.test>\r\n", f"RCPT TO:<{RCPT}>\r\n".encode(),
                        b"DATA\r\n"]
            expected = [("250",), ("250", "251"), ("354",)]
            if trial.pipelined and any(b"PIPELINING" in c.upper() for c in caps):
                writer.write(b"".join(commands))
                for ok in expected:
                    await expect(reader, trial, *ok)
            else:
                for command, ok in zip(commands, expected, strict=True):
                    writer.write(command)
                    await expect(reader, trial, *ok)
            if trial.pause:
                await asyncio.sleep(trial.pause)
            writer.write(f"Message-ID: <{trial.sid}.{nonce}@a.test>\r\nSubject: trial "
                         f"{trial.sid}\r\n\r\nMARKER-{trial.sid}-{nonce}\r\n.\r\n".encode())
            await expect(reader, trial, "250")
            trial.outcome = "delivered"
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(ConnectionError, OSError):
                await read_reply(reader)
    except Refused as exc:
        # The reply code with its enhanced status code: "421 4.7.4".
        enhanced = re.match(r"\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})", str(exc))
        trial.outcome = f"{exc.code} {enhanced[1]}" if enhanced else exc.code
        trial.detail = str(exc)
    except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
        trial.outcome, trial.detail = "closed", type(exc).__name__
    except TimeoutError:
        trial.outcome = "timeout"
    finally:
        if writer is not None:
            writer.transport.abort()

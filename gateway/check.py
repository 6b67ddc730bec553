"""``smtpgate check IP|HOST``: the discovery chain, the matching policy and the plan, as the
gateway would decide them now; then, unless ``--no-connect``, a dry run of the session's
upgrade against each address on port 25, step by step as ``posttls-finger`` prints it.

The dry run is the gateway's own upgrade machine (:class:`gateway.upgrade.Upgrade`) driven by a
scripted MTA that says EHLO and then goes on without TLS: every decision (STARTTLS or not,
defer or fall back to plaintext, a fresh plaintext connection after a failed handshake) is
the one a real session would make.  Nothing of a mail is sent: where the gateway would
release the MTA's held commands, the check says QUIT.  Blocking sockets in a worker thread;
connecting, each reply and the handshake each get at most ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import Store

from . import dane
from .answers import Answer, Status
from .commands import ENCRYPTED, Relay, Result, SendClient, SendPeer, authenticated
from .config import Config, Direction, Endpoint, IPAddress, Listener, MtaStartTls, StsUse
from .context import client_context
from .discovery import discover, recipient_rule, sts_candidates
from .dns import Resolver
from .envelope import defer_recipient
from .netfilter import upstream_socket
from .outbound import presented_chain
from .policy import (
    Action,
    Auth,
    Plan,
    plan,
    recipient_checked,
    recipient_decision,
    sts_use,
    verify_peer,
)
from .smtp import RemoteProtocolError, Reply, ReplyReader, capabilities
from .sts import Policy as StsPolicy
from .sts import Verdict, applied, decide
from .upgrade import Command, Defer, NeedPlan, Reconnect, StartTls, Upgrade, UpgradeState
from .walks import RecipientRule

if TYPE_CHECKING:
    from .stsfetch import Policies

SMTP_PORT = 25
UNTESTED = 3  # exit status: the check could not be made (DNS or the peer failed)
DEFAULT_TIMEOUT = 10.0
# The MTA's command after its EHLO, held by the machine and never sent (QUIT goes instead):
# any command but STARTTLS and QUIT makes the gateway decide about TLS.
_GO_ON = b"NOOP\r\n"
_SAN_SHOWN = 4


def _line(answer: Answer, note: str = "") -> str:
    return f"  {answer.rdtype:<5} {answer.describe()}{'  ' + note if note else ''}"


def mta_starttls_line(config: Config, p: Plan, mta: IPAddress | None) -> str:
    """What a session from ``mta`` (any MTA when None) gets when it does STARTTLS itself,
    under the first outbound listener's ``mta_starttls`` (the default without one)."""
    outbound = [lst for lst in config.listeners if lst.direction is Direction.OUTBOUND]
    listener = outbound[0] if outbound else Listener(ipaddress.ip_address("0.0.0.0"), 25)
    mode = listener.mta_starttls_for(mta) if mta is not None else listener.mta_starttls
    who = f"an MTA at {mta}" if mta is not None else "an MTA"
    if mode is MtaStartTls.STEP_ASIDE:
        return f"  {who} doing STARTTLS itself: left alone (step-aside: it verifies on its own)"
    if not p.fails_closed:
        return (f"  {who} doing STARTTLS itself: left alone (the plan authenticates nothing: "
                f"its TLS is as good as the gateway's)")
    if mode is MtaStartTls.TERMINATE:
        return (f"  {who} doing STARTTLS itself: taken over (terminate): the gateway verifies "
                f"the peer, then answers the MTA's STARTTLS with its local key")
    return (f"  {who} offered STARTTLS: withdrawn from the EHLO reply it sees (hide); the "
            f"gateway upgrades its plaintext session")


async def check(config: Config, target: str, out: Callable[[str], None], *,
                connect: bool = True, helo: str | None = None,
                step_timeout: float = DEFAULT_TIMEOUT, mta: IPAddress | None = None,
                rcpt: str | None = None) -> int:
    """Prints the report; returns (the worst of its addresses) 1 when the gateway would defer
    a session (without ``connect``: when the plan alone defers) or the name has no address,
    3 when the check could not be made (DNS gave no answer for the name; the peer refused,
    was unreachable or silent: the MTA meets that with or without the gateway, but nothing
    was shown to work), else 0.  ``step_timeout`` bounds the connect, each reply and the
    TLS handshake of the dry run.  With ``rcpt``, also what that recipient gets on the
    session: its domain's DANE MX and MTA-STS policy, and the 250 or 450 the MTA would
    see; a 450 counts as deferred."""
    resolver = Resolver(config.dns)
    deferred = untested = False
    recipients = Recipients(config, resolver, out) if rcpt is not None else None
    try:
        addresses: list[IPAddress] = []
        try:
            addresses.append(ipaddress.ip_address(target))
        except ValueError:
            failed = []
            for rdtype in ("A", "AAAA"):
                answer = await resolver.lookup(target, rdtype)
                out(_line(answer))
                addresses += [ipaddress.ip_address(r.address) for r in answer.records]
                if answer.status is Status.FAILED:
                    failed.append(f"{rdtype}: {answer.rcode}")
            if not addresses and failed:
                out(f"{target}: its addresses are unknown: DNS gave no answer "
                    f"({', '.join(failed)})")
                return UNTESTED
            if not addresses:
                out(f"{target}: no addresses")
                return 1
        for address in addresses:
            found = await discover(resolver, address, config.dns.budget)
            out(f"destination {address}")
            for step in found.steps:
                note = ""
                if step.rdtype in ("A", "AAAA") and found.host == step.name:
                    note = "forward-confirmed"
                if step is found.tlsa:
                    note = f"{len(found.usable)} of {len(found.records)} usable"
                out(_line(step, note))
            if found.doubt:
                out(f"  doubt: {found.doubt}")
            p = plan(address, found, config.policy)
            out(f"  plan: {p.describe()}")
            out(mta_starttls_line(config, p, mta))
            if not connect:
                if p.action is Action.DEFER:
                    deferred = True  # decided without the peer: no session can go through
                if recipients is not None and rcpt is not None:
                    deferred |= not await recipients.report(rcpt, address, p, None)
                continue
            probe = Probe(config, address, p, helo=helo or socket.gethostname(),
                          timeout=step_timeout, out=out)
            outcome = await asyncio.to_thread(probe.run)
            out(f"  result: {outcome.describe()}")
            deferred |= outcome.deferred
            untested |= outcome.result is None
            if recipients is not None and rcpt is not None and not outcome.deferred \
                    and outcome.result is not None:
                encrypted = outcome.result in ENCRYPTED
                deferred |= not await recipients.report(rcpt, address, p,
                                                        (encrypted, probe.chain))
        return 1 if deferred else UNTESTED if untested else 0
    finally:
        if recipients is not None:
            await recipients.close()
        await resolver.close()


class Recipients:
    """``--rcpt``: what a recipient gets on a session, decided as the session decides it
    (gateway.outbound): its domain's DANE MX for the destination, then MTA-STS."""

    def __init__(self, config: Config, resolver: Resolver, out: Callable[[str], None]) -> None:
        self.config, self.resolver, self.out = config, resolver, out
        self.policies: Policies | None = None
        self.store: Store | None = None

    async def _sts(self) -> tuple[Policies, Store]:
        if self.policies is None or self.store is None:
            from .keys import webpki_store
            from .stsfetch import Policies

            store = webpki_store(dataclasses.replace(
                self.config, mta_sts=dataclasses.replace(self.config.mta_sts, enabled=True)))
            assert store is not None
            # The running gateway's cache is read, never written: check is not the gateway.
            self.policies = Policies(
                dataclasses.replace(self.config.mta_sts, enabled=True), lambda: self.resolver,
                None, read_only=True)
            await self.policies.open()
            self.store = store
        return self.policies, self.store

    async def close(self) -> None:
        if self.policies is not None:
            await self.policies.close()

    async def report(self, rcpt: str, address: IPAddress, p: Plan,
                     hop: tuple[bool, list[bytes]] | None) -> bool:
        """Prints what ``rcpt`` gets on a session to ``address`` (``hop``: encrypted by the
        gateway, the presented chain; None without a connection); True when forwarded."""
        out, policy = self.out, self.config.policy
        domain = rcpt.rsplit("@", 1)[-1].rstrip(".").lower()
        out(f"  recipient {rcpt}")
        required = policy.for_recipient(domain)
        if recipient_checked(p.level, required):
            rule = await recipient_rule(self.resolver, domain, address, self.config.dns.budget)
        else:
            rule = RecipientRule(domain)
            out(f"    DANE: not looked up (level {p.level}, no policy.recipients entry)")
        if rule.doubt:
            out(f"    DANE: {rule.doubt}")
        elif rule.host:
            out(f"    DANE: its MX {rule.host} is this destination, "
                f"{len(rule.records)} usable TLSA")
        elif recipient_checked(p.level, required):
            out("    DANE: no MX of the domain with secure TLSA is this destination")
        encrypted, chain = hop if hop is not None else (p.action is not Action.PASSTHROUGH, [])
        allow, reason, label = recipient_decision(rule, encrypted, chain, required)
        use = sts_use(self.config.mta_sts.enabled, p.entry, policy.recipient_entry(domain))
        if use is StsUse.OFF:
            out("    MTA-STS: off for this recipient")
        elif rule.host and rule.records:
            out("    MTA-STS: not applied: DANE decides (RFC 8461 2)")
        else:
            policies, store = await self._sts()
            found = await policies.policy(domain)
            if found.policy is None:
                out(f"    MTA-STS: no policy ({found.error or 'none published'}; "
                    f"source {found.source})")
            else:
                fp = found.policy
                out(f"    MTA-STS: policy id {found.policy_id}, mode {fp.mode}, max_age "
                    f"{fp.max_age}, mx {', '.join(fp.mx) or '(none)'}; source {found.source}"
                    + (f", fetched {_stamp(found.fetched)}" if found.fetched else "")
                    + (f" (last refresh failed: {found.error})" if found.error else ""))
            applies = applied(domain, found.policy, found.error, use is StsUse.REQUIRE)
            verdict: Verdict | None = applies if isinstance(applies, Verdict) else None
            if isinstance(applies, StsPolicy):
                candidates = await sts_candidates(self.resolver, domain, address, applies,
                                                  self.config.dns.budget)
                if candidates.doubt:
                    out(f"    MTA-STS: {candidates.doubt}")
                else:
                    out(f"    MTA-STS: MX hosts it lists that are this destination: "
                        f"{', '.join(candidates.hosts) or 'none'}")
                if hop is None:
                    out("    MTA-STS: not connected: the certificate is not checked")
                    verdict = decide(domain, applies, candidates, True, [], store=store) \
                        if not candidates.hosts or candidates.doubt else None
                else:
                    verdict = decide(domain, applies, candidates, encrypted, chain,
                                     store=store)
                if verdict is not None:
                    out(f"    MTA-STS: {applies.mode}: {verdict.result}"
                        + (f" ({verdict.reason})" if verdict.reason else ""))
            if verdict is not None and allow and not verdict.allow:
                allow, reason, label = False, verdict.reason, "mta_sts"
            elif verdict is not None and allow and verdict.result == "success":
                label = "mta_sts"
        if allow:
            out(f"    result: forwarded ({label})")
        else:
            out(f"    result: would defer: {defer_recipient(reason).decode().strip()}")
        return allow


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the dry-run session ended.  ``result`` is the machine's; None when the peer
    failed before the gateway had anything to decide (the MTA would see that failure with
    or without the gateway)."""

    result: Result | None
    reason: str

    @property
    def deferred(self) -> bool:
        return self.result is Result.DEFERRED

    def describe(self) -> str:
        if self.result is None:
            return self.reason
        if self.result is Result.DEFERRED:
            return f"would defer: {self.reason}"
        if self.result in (Result.DANE, Result.FINGERPRINT):
            return f"{self.result.value} (verified: {self.reason})"
        return f"{self.result.value} ({self.reason})"


class _PeerFailed(Exception):
    """No reply, a closed connection: the session ends without a decision of ours."""


def _printable(text: str | bytes, limit: int = 200) -> str:
    """Peer-supplied text made safe for a terminal (no escape sequences), and bounded."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[:limit] + "..."


def describe_certificate(der: bytes) -> str:
    """``CN=…, SAN a, b, issuer CN=…, SPKI SHA-256 <hex>``: what an operator compares with
    a TLSA ``3 1 1`` record and the host name."""
    try:
        spki = dane.tlsa_data(der, dane.Selector.SPKI, dane.Matching.SHA256).hex()
    except ValueError:
        return "not a DER certificate"
    parts: list[str] = []
    try:
        cert = x509.load_der_x509_certificate(der)
        parts.append(_cn("CN=", cert.subject))
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = san.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        shown = ", ".join(_printable(n, 80) for n in names[:_SAN_SHOWN])
        more = f" (+{len(names) - _SAN_SHOWN} more)" if len(names) > _SAN_SHOWN else ""
        parts.append(f"SAN {shown}{more}" if names else "no SAN dNSName")
        parts.append(_cn("issuer CN=", cert.issuer))
    except ValueError as exc:  # unparsable extensions surface on access
        parts.append(f"unparsable: {_printable(str(exc), 80)}")
    parts.append(f"SPKI SHA-256 {spki}")
    return ", ".join(p for p in parts if p)


def _cn(prefix: str, name: x509.Name) -> str:
    values = [a.value for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not values:
        return f"{prefix}(none)"
    value = values[0]
    return prefix + _printable(value if isinstance(value, str) else value.decode("latin-1"), 80)


def verify(p: Plan, chain: list[bytes]) -> tuple[bool, Result, str, str]:
    """(ok, result, reason, detail): the session's own verification (``verify_peer``) of
    a presented chain, with what to print of it."""
    v = verify_peer(p, chain)
    if v is None:
        return True, Result.TLS, "unauthenticated", "the plan asks for no authentication"
    if v.ok:
        detail = (f"TLSA {v.record} at depth {v.depth}" if p.auth is Auth.DANE
                  else f"pinned {v.detail}")
        return True, authenticated(p.auth), v.reason, detail
    against = (f"{len(p.tlsa)} usable TLSA" if p.auth is Auth.DANE
               else f"{len(p.fingerprints)} pinned")
    return False, Result.DEFERRED, v.reason, _verdict_detail(v, against)


def _verdict_detail(v: dane.Verdict, against: str) -> str:
    return f"against {against}" + (f": {_printable(v.detail)}" if v.detail else "")


class Probe:
    """One dry-run session to ``address``:25, printed step by step through ``out``."""

    def __init__(self, config: Config, address: IPAddress, p: Plan, *, helo: str,
                 timeout: float, out: Callable[[str], None]) -> None:
        self.config = config
        self.endpoint = Endpoint(address, SMTP_PORT)
        self.plan = p
        self.timeout = timeout
        self.out = out
        self.machine = Upgrade()
        self.context = client_context()
        self.sock: socket.socket | None = None  # plaintext, or the TLS socket after STARTTLS
        self.encrypted = False
        self.chain: list[bytes] = []  # what the peer presented (for --rcpt)
        self.reader = ReplyReader()  # our own view of the replies, for printing
        self.asked: deque[str] = deque()  # what each awaited reply answers, in order
        self.deadline = 0.0
        self.script = deque([f"EHLO {helo}\r\n".encode("ascii", "replace"), _GO_ON])
        self._reader_broken = False

    def run(self) -> Outcome:
        try:
            self._connect("banner")
        except OSError as exc:
            return Outcome(None, f"unreachable: connect to {self.endpoint}: {_error(exc)}")
        try:
            return self._session()
        except _PeerFailed as exc:
            return Outcome(None, f"peer failed: {exc}")
        finally:
            self._close()

    # -- the session ----------------------------------------------------------------------
    def _session(self) -> Outcome:
        queue: deque[Command] = deque()
        while True:
            while queue:
                cmd = queue.popleft()
                if isinstance(cmd, SendPeer):
                    self._send(cmd.data)
                elif isinstance(cmd, SendClient):
                    pass  # the peer's replies are printed as they are read
                elif isinstance(cmd, NeedPlan):
                    queue.extend(self.machine.plan_ready(self.plan))
                elif isinstance(cmd, StartTls):
                    queue.extend(self._starttls())
                elif isinstance(cmd, Reconnect):
                    self.out(f"  fallback: {_printable(cmd.reason)}; a new plaintext "
                             "connection, as the gateway would open")
                    self._close()
                    try:
                        self._connect("banner (fallback connection)")
                    except OSError as exc:
                        self.out(f"  fallback connection failed: {_error(exc)}")
                        self.out("  the MTA would get: 421 4.4.1 smtpgate: fallback "
                                 "connection failed")
                        return Outcome(Result.DEFERRED, "fallback connection failed")
                    queue.extend(self.machine.reconnected())
                elif isinstance(cmd, Relay):
                    self._quit()
                    return Outcome(self.machine.result, self.machine.reason)
                elif isinstance(cmd, Defer):
                    self.out(f"  the MTA would get: {_printable(cmd.reply.strip())}")
                    self._quit()
                    return Outcome(Result.DEFERRED, cmd.reason)
            if self.machine.state is UpgradeState.GREETING and self.script:
                queue.extend(self.machine.client_data(self.script.popleft()))
            else:
                queue.extend(self.machine.peer_data(self._recv()))

    def _starttls(self) -> list[Command]:
        assert self.sock is not None
        sni = self.plan.sni
        sock, self.sock = self.sock, None
        sock.settimeout(self.timeout)  # the whole handshake: CPython keeps one deadline
        try:
            tls = self.context.wrap_socket(sock, server_hostname=sni)
        except (OSError, ValueError) as exc:
            sock.close()
            why = f"handshake: {type(exc).__name__}: {exc}"[:200]
            self.out(f"  TLS handshake failed: {_printable(why)}")
            return self.machine.tls_done(False, Result.DEFERRED, why, "4.7.0")
        self.sock, self.encrypted = tls, True
        cipher = (tls.cipher() or ("-",))[0]
        self.out(f"  TLS: {tls.version()}, {cipher}, SNI {sni or '(none)'}")
        # presented_chain() asks for getpeercert() and, on 3.11/3.12, the C object's
        # get_unverified_chain() behind ``_sslobj``: an SSLSocket has both, as an SSLObject.
        chain = self.chain = presented_chain(cast(ssl.SSLObject, tls))
        if not chain:
            self.out("  no certificate presented")
        for depth, der in enumerate(chain):
            self.out(f"  certificate {depth}: {describe_certificate(der)}")
        ok, result, reason, detail = verify(self.plan, chain)
        self.out(f"  verify: {reason} ({detail})" if ok
                 else f"  verify: FAILED: {reason} ({detail})")
        return self.machine.tls_done(ok, result, reason)

    # -- I/O --------------------------------------------------------------------------------
    def _connect(self, first: str) -> None:
        cfg = self.config.upstream
        source = cfg.source_ipv6 if self.endpoint.host.version == 6 else cfg.source_ipv4
        mark = cfg.mark
        try:
            sock = upstream_socket(self.endpoint, mark, source)
        except PermissionError:  # SO_MARK needs CAP_NET_ADMIN
            sock, mark = upstream_socket(self.endpoint, 0, source), 0
        try:
            sock.settimeout(self.timeout)
            sock.connect((str(self.endpoint.host), self.endpoint.port))
        except BaseException:
            sock.close()
            raise
        self.sock, self.encrypted = sock, False
        self.deadline = time.monotonic() + self.timeout
        self.reader, self.asked, self._reader_broken = ReplyReader(), deque([first]), False
        local = sock.getsockname()[0]
        if mark:
            how = f"mark {mark:#x}"
        elif cfg.mark:
            how = f"without the gateway's mark {cfg.mark:#x}: setting it needs CAP_NET_ADMIN"
        else:
            how = "unmarked"
        self.out(f"  connect {self.endpoint}: connected from {local} ({how})")

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        label = _printable(data.strip())
        self.asked.append(label + (" (over TLS)" if self.encrypted else ""))
        self.sock.settimeout(self.timeout)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _PeerFailed(f"sending {label}: {_error(exc)}") from None
        self.deadline = time.monotonic() + self.timeout

    def _recv(self) -> bytes:
        assert self.sock is not None
        waiting = self.asked[0] if self.asked else "more"
        waiting = f"the {waiting}" if waiting.startswith("banner") else f"the reply to {waiting}"
        late = f"no complete {waiting.removeprefix('the ')} within {self.timeout:g}s"
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _PeerFailed(late)
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            raise _PeerFailed(late) from None
        except OSError as exc:
            raise _PeerFailed(f"waiting for {waiting}: {_error(exc)}") from None
        if not data:
            raise _PeerFailed(f"connection closed while waiting for {waiting}")
        self._show(data)
        return data

    def _show(self, data: bytes) -> None:
        if self._reader_broken:
            return
        self.reader.feed(data)
        try:
            while (reply := self.reader.next()) is not None:
                self._print_reply(self.asked.popleft() if self.asked else "unsolicited",
                                  reply)
        except RemoteProtocolError as exc:
            self._reader_broken = True
            self.out(f"  malformed reply: {exc}")

    def _print_reply(self, label: str, r: Reply) -> None:
        first = f"{r.code} {_printable(r.lines[0] if r.lines else b'')}".rstrip()
        if label.startswith("banner"):
            self.out(f"  {label}: {first}")
            return
        if label.startswith(("EHLO", "HELO")) and r.code == 250 and len(r.lines) > 1:
            caps = capabilities(r)
            if not self.encrypted:
                first += "; STARTTLS " + ("offered" if "STARTTLS" in caps else "NOT offered")
            self.out(f"  {label}: {first}")
            self.out("    extensions: " + _printable(", ".join(
                f"{k} {v}".strip() for k, v in caps.items()), 400))
            return
        if len(r.lines) > 1:
            first += f" (+{len(r.lines) - 1} lines)"
        self.out(f"  {label}: {first}")

    def _quit(self) -> None:
        """QUIT, and its reply when it comes in time; nothing here changes the outcome."""
        if self.sock is None:
            return
        try:
            self._send(b"QUIT\r\n")
            # After a malformed reply no reply can be told apart: say QUIT and go.
            while not self._reader_broken and any(a.startswith("QUIT") for a in self.asked):
                self._recv()
        except _PeerFailed as exc:
            self.out(f"  QUIT: {exc}")

    def _close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


def _error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return _printable(text)

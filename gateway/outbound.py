"""The outbound upgrade, carried out: drives ``gateway.upgrade.Upgrade`` with the session's two
legs, performs the TLS handshake and verification it asks for, and hands over to the byte
pump.  Every decision is the machine's; this module only does I/O.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .commands import ENCRYPTED, Relay, Result, ShutdownClient, ShutdownPeer, authenticated
from .config import Config, Endpoint, Level, MtaStartTls, StsUse
from .context import Context, SessionCache
from .discovery import (
    recipient_rule,
    recipient_rule_cached,
    sts_candidates,
    sts_candidates_cached,
)
from .envelope import CheckRecipient, Envelope, EnvelopeCommand
from .logs import log
from .phase import HANDSHAKE_ERRORS, TlsPhase
from .policy import (
    Action,
    Auth,
    Plan,
    recipient_checked,
    recipient_decision,
    sts_use,
    verify_peer,
)
from .relay import End, Leg, Pump
from .smtp import RemoteProtocolError
from .sts import NO_POLICY, Candidates, Verdict, applied, decide
from .sts import Policy as StsPolicy
from .tlsrpt import NO_POLICY as NO_POLICY_FOUND
from .tlsrpt import STS, STS_RESULTS, SUCCESS, TLSA, Outcome
from .upgrade import Command, Defer, NeedPlan, Reconnect, StartTls, StartTlsMta, Upgrade
from .walks import RecipientRule

if TYPE_CHECKING:
    from .stsfetch import Found

# What the upgrade asks of its session: the plan once known (None if discovery broke), and
# a new connection to the same upstream ("" when made, else why not).
WhenPlanned = Callable[[Callable[[Plan | None], None]], None]
ConnectLeg = Callable[[Leg], Coroutine[Any, Any, str]]

# When discovery itself broke (a bug, not DNS trouble): no evidence either way, and A3 says
# doubt is a 4xx, never plaintext.
BROKEN_DISCOVERY = Plan(Action.DEFER, Auth.NONE, Level.DANE, "internal error in discovery")


def presented_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The peer's certificates as sent, leaf first.

    DANE-EE needs only the leaf, which every Python gives.  DANE-TA needs the rest of the
    chain: public in Python 3.13 (``get_unverified_chain``); on 3.11 and 3.12 the same
    OpenSSL call exists only on the C-level object.  Without it, DANE-TA cannot match
    anything above the leaf (verification fails closed).
    """
    leaf = ssl_object.getpeercert(binary_form=True)
    if not leaf:
        return []
    get_chain = getattr(ssl_object, "get_unverified_chain", None)
    if get_chain is None:
        get_chain = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if get_chain is None:
        return [leaf]
    try:
        chain = [c if isinstance(c, bytes) else c.public_bytes(_DER)
                 for c in get_chain() or []]
    except (ssl.SSLError, ValueError, AttributeError):
        return [leaf]
    return chain if chain and chain[0] == leaf else [leaf, *chain]


_DER = getattr(ssl, "ENCODING_DER", 2)  # _ssl.ENCODING_DER; public in 3.13 only


class OutboundUpgrade(TlsPhase):
    def __init__(self, ctx: Context, config: Config, pump: Pump, *, mta_starttls: MtaStartTls,
                 destination: Endpoint, upstream: Endpoint, when_planned: WhenPlanned,
                 connect_leg: ConnectLeg) -> None:
        super().__init__(ctx, config, pump)
        self.machine = Upgrade(mta_starttls)
        self.destination = destination
        self.upstream = upstream
        self._when_planned = when_planned
        self._connect_leg = connect_leg
        self._ssl_object: ssl.SSLObject | None = None
        self._chain: list[bytes] = []  # the peer's chain (a resumed session's: its first)
        self._cache_key: tuple[object, ...] = ()
        self.envelope: Envelope | None = None
        self._reported: set[str] = set()  # policy domains counted for TLS reports

    def from_client(self, data: bytes) -> None:
        self._apply(self.machine.client_data(data))

    def from_upstream(self, data: bytes) -> None:
        self._apply(self.machine.peer_data(data))

    def client_closed(self) -> None:
        self._apply(self.machine.client_closed())

    def upstream_closed(self) -> None:
        self._apply(self.machine.peer_closed())

    def _apply(self, commands: list[Command]) -> None:
        for cmd in commands:
            if self.pump.done.done():
                return
            if self.envelope is not None and isinstance(cmd, ShutdownPeer | ShutdownClient):
                # After the handoff the envelope tracker owns the streams: the EOF follows
                # what it still holds.
                self._env_apply(self.envelope.client_closed() if isinstance(cmd, ShutdownPeer)
                                else self.envelope.peer_closed())
                continue
            if self.forward(cmd):
                continue
            if isinstance(cmd, NeedPlan):
                self._when_planned(self._planned)
            elif isinstance(cmd, StartTls):
                self.pause(self.pump.upstream)
                self.ctx.tasks.spawn(self._handshake(), name="starttls")
            elif isinstance(cmd, StartTlsMta):
                # In the callback that queued the 220: the MTA's next bytes are TLS (A4).
                self.pause(self.pump.client)
                self.ctx.tasks.spawn(self._mta_handshake(), name="mta starttls")
            elif isinstance(cmd, Reconnect):
                self.ctx.tasks.spawn(self._reconnect(), name="tls fallback")
            elif isinstance(cmd, Relay):
                self._remember()
                if self.machine.result is Result.END_TO_END:
                    self.hand_over(cmd.to_peer, cmd.to_client)  # encrypted: nothing to read
                else:
                    self._track_envelope(cmd.to_peer, cmd.to_client)
            elif isinstance(cmd, Defer):
                self.write(self.pump.client, cmd.reply)
                self.write(self.pump.upstream, b"QUIT\r\n")
                self.pump.finish(End.DEFERRED)

    def _planned(self, plan: Plan | None) -> None:
        if self.pump.done.done():
            return
        self._apply(self.machine.plan_ready(plan or BROKEN_DISCOVERY))

    async def _handshake(self) -> None:
        plan = self.machine.plan
        assert plan is not None
        ctx = self.ctx
        self._cache_key = SessionCache.key(str(self.upstream), plan)
        self.tls["peer_name"] = plan.sni or "-"
        leg = self.pump.upstream
        offered = ctx.tls_sessions.get(self._cache_key)
        try:
            ssl_object = await self.handshake(leg, ctx.tls_client, False, plan.sni, offered)
        except HANDSHAKE_ERRORS as exc:
            why = f"handshake: {type(exc).__name__}: {exc}"[:200]
            self.tls["verify"] = "handshake failed"
            if not self.pump.done.done():
                self._apply(self.machine.tls_done(False, Result.DEFERRED, why, "4.7.0"))
            return
        if ssl_object is None:
            return
        self.tls.update(self.facts(ssl_object))
        self._ssl_object = ssl_object
        self._chain = ctx.tls_sessions.chain(self._cache_key, offered) \
            if ssl_object.session_reused else presented_chain(ssl_object)
        if ssl_object.session_reused:
            # Only sessions verified against this very TLSA set (or pins) are offered.
            ok, result = True, authenticated(plan.auth)
            reason = "resumed" if plan.auth is Auth.NONE else "resumed verified session"
        else:
            try:
                ok, result, reason = self._verify(plan, self._chain)
            except Exception as exc:  # a bug in verification is a failed verification
                ok, result = False, Result.DEFERRED
                reason = f"verification error: {type(exc).__name__}"
                log.error("verification raised", exc_info=exc)
        self.tls["verify"] = reason
        self._apply(self.machine.tls_done(ok, result, reason))
        leg.release()

    async def _mta_handshake(self) -> None:
        """Take-over: the MTA's TLS, terminated with the gateway's local key."""
        leg = self.pump.client
        try:
            ssl_object = await self.handshake(leg, self.ctx.tls_local, True, None)
        except HANDSHAKE_ERRORS as exc:
            if not self.pump.done.done():
                self._apply(self.machine.mta_tls_done(False, type(exc).__name__))
            return
        if ssl_object is None:
            return
        self.tls.update(self.facts(ssl_object, "mta_"))
        self._apply(self.machine.mta_tls_done(True, ""))
        leg.release()

    # -- recipient-bound enforcement (after the TLS phase) -------------------------------
    def _track_envelope(self, to_peer: bytes, to_client: bytes) -> None:
        """From here every command passes the envelope tracker: a recipient whose domain's
        MX for this destination publishes TLSA is forwarded only if this session satisfies
        it (RFC 7672, bound to the recipient rather than to a PTR name)."""
        envelope = self.envelope = Envelope()
        self.pump.tap = self._envelope_tap
        self.pump.quit_sent = lambda: envelope.quit_sent
        self._env_apply(self.envelope.peer_data(to_client))
        self._env_apply(self.envelope.client_data(to_peer))

    def _envelope_tap(self, leg: Leg, data: bytes) -> None:
        """The pump's bytes after the handoff; b"" is that leg's EOF."""
        assert self.envelope is not None
        envelope = self.envelope
        try:
            if leg is self.pump.client:
                commands = envelope.client_data(data) if data else envelope.client_closed()
            else:
                commands = envelope.peer_data(data) if data else envelope.peer_closed()
        except RemoteProtocolError as exc:
            # After the handoff the gateway has no reply of its own to give: an abnormal
            # end is a reset both ways (A1), and the reason goes to the log.
            side = "MTA" if leg is self.pump.client else "peer"
            self.reason = f"{side} protocol error: {exc}"
            self.pump.finish(End.ABORTED)
            return
        self._env_apply(commands)

    def _env_apply(self, commands: list[EnvelopeCommand]) -> None:
        for cmd in commands:
            if self.pump.done.done():
                return
            if isinstance(cmd, CheckRecipient):
                check = self._recipient_check(cmd.domain)
                decided = self._recipient_now(cmd, check)
                if decided:
                    continue  # answered now, in order
                self.ctx.tasks.spawn(self._check_recipient(cmd, check),
                                     name=f"recipient {cmd.domain}")
            else:
                self.forward(cmd)

    def _recipient_check(self, domain: str) -> tuple[bool, StsUse]:
        """(look up the domain's DANE MX, what MTA-STS it gets) on this session."""
        plan = self.machine.plan
        policy = self.config.policy
        dane_checked = recipient_checked(plan.level if plan is not None else policy.default,
                                         policy.for_recipient(domain))
        use = sts_use(self.config.mta_sts.enabled, plan.entry if plan is not None else None,
                      policy.recipient_entry(domain))
        if self.ctx.sts is None:  # a reload turned it on; this process has not started it
            use = StsUse.OFF
        return dane_checked, use

    def _recipient_now(self, cmd: CheckRecipient, check: tuple[bool, StsUse]) -> bool:
        """Decides from what is cached (DNS answers, the policy); False when something must
        be looked up first."""
        dane_checked, use = check
        resolver = self.ctx.resolver
        if dane_checked:
            rule = recipient_rule_cached(resolver, cmd.domain, self.destination.host)
            if rule is None:
                return False
        else:
            # No DANE at this level: nothing to ask DNS (a resolver failure must not defer a
            # path the operator made opportunistic).
            rule = RecipientRule(cmd.domain)
        if use is StsUse.OFF or (rule.host and rule.records):  # DANE first (RFC 8461 2)
            self._decide_recipient(cmd, rule, None)
            return True
        assert self.ctx.sts is not None
        found = self.ctx.sts.cached(cmd.domain)
        if found is None:
            return False
        policy = self._sts_policy(found, use)
        if policy is None or isinstance(policy, Verdict):
            self._decide_recipient(cmd, rule, (found, policy))
            return True
        candidates = sts_candidates_cached(resolver, cmd.domain, self.destination.host, policy)
        if candidates is None:
            return False
        self._decide_recipient(cmd, rule, (found, self._sts_verdict(cmd.domain, policy,
                                                                    candidates)))
        return True

    async def _check_recipient(self, cmd: CheckRecipient, check: tuple[bool, StsUse]) -> None:
        dane_checked, use = check
        budget = self.config.dns.budget
        resolver = self.ctx.resolver
        address = self.destination.host
        rule = await recipient_rule(resolver, cmd.domain, address, budget) if dane_checked \
            else RecipientRule(cmd.domain)
        sts: tuple[Found, Verdict | None] | None = None
        if use is not StsUse.OFF and not (rule.host and rule.records):
            assert self.ctx.sts is not None
            found = self.ctx.sts.cached(cmd.domain) or await self.ctx.sts.policy(cmd.domain)
            policy = self._sts_policy(found, use)
            if policy is None or isinstance(policy, Verdict):
                sts = (found, policy)
            else:
                candidates = await sts_candidates(resolver, cmd.domain, address, policy,
                                                  budget)
                sts = (found, self._sts_verdict(cmd.domain, policy, candidates))
        self._decide_recipient(cmd, rule, sts)

    @staticmethod
    def _sts_policy(found: Found, use: StsUse) -> StsPolicy | Verdict | None:
        return applied(found.domain, found.policy, found.error, use is StsUse.REQUIRE)

    def _sts_verdict(self, domain: str, policy: StsPolicy, candidates: Candidates) -> Verdict:
        encrypted = self.machine.result in ENCRYPTED
        chain = self._chain
        assert self.ctx.webpki is not None  # built with ctx.sts
        verdict = decide(domain, policy, candidates, encrypted, chain, store=self.ctx.webpki)
        m = self.ctx.metrics
        m.child(m.sts_recipients, policy.mode.value, verdict.result).inc()
        self.tls.setdefault("mta_sts", "")
        self.tls["mta_sts"] += f"{domain}={policy.mode}:{verdict.result}; "
        if verdict.result != "success" and verdict.allow:
            self.tls["mta_sts"] = self.tls["mta_sts"][:-2] + f" ({verdict.reason}); "
        return verdict

    def _decide_recipient(self, cmd: CheckRecipient, rule: RecipientRule,
                          sts: tuple[Found, Verdict | None] | None) -> None:
        assert self.envelope is not None
        allow, reason, label = self._satisfies(rule)
        if sts is not None and sts[1] is not None:
            verdict = sts[1]
            if verdict.result == NO_POLICY:
                m = self.ctx.metrics
                m.child(m.sts_recipients, "enforce", NO_POLICY).inc()
            if allow and not verdict.allow:
                allow, reason, label = False, verdict.reason, "mta_sts"
            elif allow and verdict.result == "success":
                label = "mta_sts"
        m = self.ctx.metrics
        m.child(m.recipients, "allowed" if allow else "deferred", label).inc()
        if (self.ctx.tlsrpt is not None and self.config.tlsrpt.enabled
                and cmd.domain not in self._reported
                # RFC 8460 5.3: the delivery of a report is not reported on.
                and self.envelope.sender != self.config.tlsrpt.sender.lower()):
            # RFC 8460 counts sessions per policy domain: the first recipient of a domain
            # says what this session was for it.
            self._reported.add(cmd.domain)
            self.ctx.tlsrpt.record(self._outcome(rule, sts, allow, label))
        if not allow:
            self.tls.setdefault("deferred_recipients", "")
            self.tls["deferred_recipients"] += f"{cmd.domain}: {reason}; "
        if not self.pump.done.done():
            self._env_apply(self.envelope.recipient(cmd.ident, allow, cmd.domain, reason))

    def _outcome(self, rule: RecipientRule, sts: tuple[Found, Verdict | None] | None,
                 allow: bool, label: str) -> Outcome:
        """This session's TLS for the recipient's domain, as a TLS report counts it."""
        encrypted = self.machine.result in ENCRYPTED
        sock = self.pump.upstream.transport.get_extra_info("sockname") \
            if self.pump.upstream.transport is not None else None
        where = {"sending_ip": str(sock[0]) if sock else "",
                 "receiving_ip": str(self.destination.host)}
        plan = self.machine.plan
        host = plan.sni if plan is not None and plan.sni else ""
        if rule.doubt is not None:  # the domain's DNSSEC could not be trusted
            return Outcome(rule.domain, TLSA, (), (rule.host,) if rule.host else (),
                           "dnssec-invalid", receiving_mx=rule.host or host,
                           detail=rule.doubt, **where)
        if rule.host and rule.records:  # DANE decided (RFC 8461 2)
            result = SUCCESS if label == "dane" or (allow and encrypted) else (
                "dnssec-invalid" if rule.doubt else "starttls-not-supported"
                if not encrypted else "validation-failure")
            return Outcome(rule.domain, TLSA, tuple(sorted(str(r) for r in rule.records)),
                           (rule.host,), result, receiving_mx=rule.host,
                           detail="" if result == SUCCESS else label, **where)
        if sts is not None:
            found, verdict = sts
            policy = found.policy
            if policy is not None and verdict is not None and verdict.result in STS_RESULTS:
                return Outcome(rule.domain, STS, tuple(policy.text().splitlines()), policy.mx,
                               STS_RESULTS[verdict.result], receiving_mx=host,
                               detail=verdict.reason, **where)
            if policy is None and found.failure is not None:
                return Outcome(rule.domain, STS, (), (), found.failure, receiving_mx=host,
                               detail=found.error or "", **where)
        result = SUCCESS if encrypted else "starttls-not-supported"
        return Outcome(rule.domain, NO_POLICY_FOUND, (), (), result, receiving_mx=host,
                       **where)

    def _satisfies(self, rule: RecipientRule) -> tuple[bool, str, str]:
        encrypted = self.machine.result in ENCRYPTED
        chain = self._chain
        required = self.config.policy.for_recipient(rule.domain)
        return recipient_decision(rule, encrypted, chain, required)

    def _remember(self) -> None:
        """At the handoff of an upgraded session: keep its TLS session for the next one.
        Not at the handshake: TLS 1.3 tickets come after it, and by the handoff the peer's
        reply to EHLO over TLS (read after any ticket) has been read."""
        ssl_object = self._ssl_object
        if ssl_object is None or self.machine.result not in ENCRYPTED:
            return
        if ssl_object.session_reused:
            return  # the stored session is still the one to offer; reading it again costs
        session = ssl_object.session
        if session is not None and (session.has_ticket or session.id):
            self.ctx.tls_sessions.put(self._cache_key, session, tuple(self._chain))

    @staticmethod
    def _verify(plan: Plan, chain: list[bytes]) -> tuple[bool, Result, str]:
        v = verify_peer(plan, chain)
        if v is None:
            return True, Result.TLS, "unauthenticated"
        return v.ok, authenticated(plan.auth) if v.ok else Result.DEFERRED, v.reason

    async def _reconnect(self) -> None:
        # The machine may have ended meanwhile (the MTA sent too much while it waited): then
        # its events are not for it (they would be a LocalProtocolError).
        if self.pump.done.done():
            return
        new = self.pump.replace_upstream()
        # Before any byte of the new connection can arrive: its banner is the next reply.
        self._apply(self.machine.reconnected())
        failure = await self._connect_leg(new)
        if failure and not self.pump.done.done():
            self._apply(self.machine.reconnect_failed(failure))

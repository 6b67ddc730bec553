"""What to do with one destination: a pure function of (destination, discovery, config).

The levels are Postfix's smtp_tls_security_level, applied per destination:

=============  ==========================================================================
none           pass the bytes through, never TLS
may            TLS when the peer offers it, unauthenticated; plaintext when it does not
encrypt        TLS required, unauthenticated; defer (4xx) when it cannot be had
dane           (default) DANE when a secure usable TLSA exists, else as ``may``;
               a secure TLSA RRset with no usable record: TLS required, unauthenticated
               (RFC 7672 2.2); doubt in a lookup DANE depends on: defer (A3)
dane-only      DANE required: without a secure usable TLSA, defer
fingerprint    TLS required, the peer's certificate or key must match a pinned SHA-256
=============  ==========================================================================

Config entries match by CIDR on the destination address, or by host name / ``.suffix`` on
the forward-confirmed name from discovery.  A name is only as trustworthy as its DNS: an
entry that is *weaker than the default* matches a name only when the PTR and forward lookups
were both secure, so a forged reverse zone cannot lower protection.  First match wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from . import dane
from .config import IPAddress, Level, PolicyConfig, PolicyEntry, RecipientPolicy, StsUse
from .dane import TLSARecord
from .walks import Discovery, RecipientRule


class Action(StrEnum):
    PASSTHROUGH = "passthrough"  # no TLS by the gateway; bytes unchanged
    TRY_TLS = "try-tls"  # STARTTLS when offered; plaintext otherwise
    REQUIRE_TLS = "require-tls"  # TLS or a 4xx to the MTA
    DEFER = "defer"  # 4xx to the MTA; the peer gets no mail (it may see banner and EHLO)


class Auth(StrEnum):
    NONE = "none"
    DANE = "dane"
    FINGERPRINT = "fingerprint"


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    auth: Auth
    level: Level
    reason: str
    entry: PolicyEntry | None = None
    sni: str | None = None
    tlsa: tuple[TLSARecord, ...] = ()
    fingerprints: tuple[bytes, ...] = ()
    # DANE-TA reference identifiers (RFC 7672 3.2.3): the TLSA base domain, and the host
    # name it was reached from when that went through a CNAME.
    names: tuple[str, ...] = ()

    @property
    def fails_closed(self) -> bool:
        """A failed upgrade is a 4xx for the MTA, never plaintext."""
        return self.action in (Action.REQUIRE_TLS, Action.DEFER)

    def describe(self) -> str:
        what = {
            Action.PASSTHROUGH: "pass through without TLS",
            Action.TRY_TLS: "TLS if offered, else plaintext",
            Action.REQUIRE_TLS: "TLS required",
            Action.DEFER: "defer with 4xx, no mail sent to the peer",
        }[self.action]
        parts = [what]
        if self.auth is Auth.DANE:
            parts.append(f"authenticate by DANE ({len(self.tlsa)} usable TLSA)")
        elif self.auth is Auth.FINGERPRINT:
            parts.append(f"authenticate by fingerprint ({len(self.fingerprints)} pinned)")
        elif self.action is not Action.PASSTHROUGH and self.action is not Action.DEFER:
            parts.append("unauthenticated")
        if self.sni:
            parts.append(f"SNI {self.sni}")
        if self.action is Action.REQUIRE_TLS:
            parts.append("on failure: defer (4xx)")
        elif self.action is Action.TRY_TLS:
            parts.append("on failure: plaintext")
        return ", ".join(parts) + f" — {self.reason}"


def _name_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("."):
        return host.endswith(pattern)
    return host == pattern


def match_entry(address: IPAddress, discovery: Discovery, entries: tuple[PolicyEntry, ...],
                default: Level = Level.DANE) -> PolicyEntry | None:
    for entry in entries:
        if entry.network is not None:
            if address.version == entry.network.version and address in entry.network:
                return entry
            continue
        host = discovery.host
        if entry.host is None or host is None or not _name_matches(entry.host, host):
            continue
        if not discovery.host_secure and _RANK[entry.level] < _RANK[default]:
            continue  # a forgeable name may not weaken what the default would do
        return entry
    return None


# How strict a level is *for a host whose name is not DNSSEC-secure*: there DANE finds no
# TLSA, so dane is no stricter than may.
_RANK = {Level.NONE: 0, Level.MAY: 1, Level.DANE: 1, Level.ENCRYPT: 2, Level.DANE_ONLY: 3,
         Level.FINGERPRINT: 3}


def plan(address: IPAddress, discovery: Discovery, config: PolicyConfig) -> Plan:
    entry = match_entry(address, discovery, config.entries, config.default)
    level = entry.level if entry is not None else config.default
    sni = discovery.tlsa_base or (discovery.host.rstrip(".") if discovery.host else None)
    source = f"policy entry {entry.match}" if entry is not None else "default policy"
    usable = discovery.usable

    names = tuple(dict.fromkeys(n for n in (sni, discovery.host and discovery.host.rstrip("."))
                                if n))

    def make(action: Action, auth: Auth, why: str, tlsa: tuple[TLSARecord, ...] = (),
             fingerprints: tuple[bytes, ...] = ()) -> Plan:
        return Plan(action, auth, level, f"{source} {level}: {why}", entry, sni, tlsa,
                    fingerprints, names)

    if level is Level.NONE:
        return make(Action.PASSTHROUGH, Auth.NONE, "TLS off")
    if level is Level.MAY:
        return make(Action.TRY_TLS, Auth.NONE, "opportunistic")
    if level is Level.ENCRYPT:
        return make(Action.REQUIRE_TLS, Auth.NONE, "encryption required")
    if level is Level.FINGERPRINT:
        assert entry is not None  # only an entry can carry fingerprints
        return make(Action.REQUIRE_TLS, Auth.FINGERPRINT, "pinned key",
                    fingerprints=entry.fingerprints)
    if discovery.doubt is not None:
        return make(Action.DEFER, Auth.NONE, f"cannot trust DNS: {discovery.doubt}")
    if usable:
        return make(Action.REQUIRE_TLS, Auth.DANE, "secure usable TLSA", tlsa=usable)
    if level is Level.DANE_ONLY:
        return make(Action.DEFER, Auth.NONE, "no secure usable TLSA")
    if discovery.records:
        return make(Action.REQUIRE_TLS, Auth.NONE,
                    "secure TLSA without a usable record (RFC 7672 2.2): encrypt only")
    return make(Action.TRY_TLS, Auth.NONE, "no secure TLSA: opportunistic")


NEEDS_DNS = (Level.DANE, Level.DANE_ONLY)


def static_plan(address: IPAddress, config: PolicyConfig) -> Plan | None:
    """The plan when no DNS answer can change it, else None (discovery needed).

    A network entry reached before any name entry, or the default when there are no name
    entries, decides alone unless its level is dane/dane-only.  Saves every lookup for
    destinations the operator has already decided about.
    """
    for entry in config.entries:
        if entry.network is None:
            return None  # a name entry could match first: only discovery can tell
        if address.version == entry.network.version and address in entry.network:
            break
    else:
        entry = None
    level = entry.level if entry is not None else config.default
    if level in NEEDS_DNS:
        return None
    return plan(address, Discovery(address, ()), config)


# The destination levels under which a recipient domain's own DANE is enforced.
RECIPIENT_DANE = frozenset({Level.DANE, Level.DANE_ONLY})


def recipient_checked(level: Level | None, required: Level | None) -> bool:
    """Whether a recipient is looked up in DNS at all: where the destination's level
    enforces DANE (``level``, the plan's; None before a plan: the default applies), or a
    ``policy.recipients`` entry requires something of its domain.  Under ``none``, ``may``,
    ``encrypt`` and ``fingerprint`` the operator chose no DANE for this destination: asking
    DNS could only turn a working path into a deferral when the resolver fails."""
    return required is not None or level in RECIPIENT_DANE


def sts_use(enabled: bool, entry: PolicyEntry | None,
            recipient: RecipientPolicy | None) -> StsUse:
    """What MTA-STS a recipient gets on a session: its ``policy.recipients`` entry decides,
    then the destination's ``policy.entries`` entry, then ``mta_sts.enabled``."""
    for said in (recipient, entry):
        if said is not None and said.mta_sts is not None:
            return said.mta_sts
    return StsUse.ON if enabled else StsUse.OFF


def recipient_decision(rule: RecipientRule, encrypted: bool, chain: list[bytes],
                       required: Level | None = None) -> tuple[bool, str, str]:
    """Whether a recipient may be forwarded on this session: (allow, reason, metric label).

    ``encrypted``: the gateway made this hop TLS; ``chain``: the peer's certificates as
    presented in that handshake; ``required``: a ``policy.recipients`` level for the
    domain.  The rule comes from the recipient domain's own DNSSEC
    (gateway.discovery.recipient_rule), so a forged or unsigned reverse zone cannot lift it.
    """
    if rule.doubt is not None:
        return False, f"cannot check DANE for {rule.domain}: {rule.doubt}", "dns"
    if required is not None and not encrypted:
        return False, f"policy requires TLS for {rule.domain}", "policy"
    if required is Level.DANE_ONLY and not (rule.host and rule.records):
        return False, f"policy requires DANE for {rule.domain}; its MX for this address " \
                      "publishes no usable TLSA", "policy"
    if rule.host is None:
        return True, "", "tls" if required is not None else "none"
    if not encrypted or not chain:
        return False, f"{rule.host} publishes TLSA; this hop is not encrypted", "not_encrypted"
    if not rule.records:
        return True, "", "tls"  # a secure TLSA RRset with no usable record: TLS suffices
    v = dane.verify(chain, rule.records, [rule.host])
    if v.ok:
        return True, "", "dane"
    return False, f"peer key does not match the TLSA of {rule.host} ({v.reason})", \
        "key_mismatch"


def verify_peer(plan: Plan, chain: list[bytes]) -> dane.Verdict | None:
    """What a presented chain proves against the plan: DANE against its TLSA records with
    every reference identifier it accepts (``plan.names``: the TLSA base domain and the MX
    host it was reached from), or its pins; None when the plan asks for no authentication.
    The one verification: the session and ``smtpgate check`` both call it."""
    if plan.auth is Auth.DANE:
        return dane.verify(chain, plan.tlsa, plan.names)
    if plan.auth is Auth.FINGERPRINT:
        return dane.fingerprint_matches(chain, plan.fingerprints)
    return None

"""MTA-STS (RFC 8461), the pure half: the TXT record, the policy file, MX patterns, the Web
PKI check of a presented chain, and what a recipient domain's policy asks of one session.

No I/O: ``gateway.stsfetch`` finds and caches policies (DNS, HTTPS, a file); the outbound
shell asks :func:`sts_walk` its DNS questions and :func:`decide` the verdict per recipient.

A policy binds a *recipient domain* to the MX host names it lists (``mx:`` patterns).  The
gateway does not know which MX the MTA picked, only the address it connected to, so a hop
satisfies an ``enforce`` policy when it is TLS made by the gateway and the peer presented a
chain that is valid in the Web PKI for an MX host of the domain that matches a pattern and
whose A/AAAA contains this destination (RFC 8461 4.1, 4.2).  DNSSEC is not required: the
certificate is the proof.  Where the MX has a secure usable TLSA, DANE decides instead
(RFC 8461 2): the caller checks that first.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from .answers import Answer, Status
from .config import IPAddress
from .dane import matching_names, path_error

MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2: about a year
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3: "SHOULD NOT" be larger
MAX_MX_PATTERNS = 100  # a policy with more is not a mail setup, it is an attack on us
MAX_MX_HOSTS = 10  # MX hosts of a domain looked up for one recipient (as walks does)


class StsError(ValueError):
    """A TXT record or policy file that is not valid; the message says what."""


class Mode(StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_FIELD = re.compile(r"([A-Za-z0-9_.-]+)=([\x21-\x3a\x3c\x3e-\x7e]*)")  # RFC 8461 3.1


def parse_txt(texts: Sequence[str]) -> str | None:
    """The policy id from the TXT RRset at ``_mta-sts.DOMAIN`` (each record's strings
    joined): None when no record starts with ``v=STSv1;`` (the domain has no policy);
    StsError when more than one does, or the one that does is malformed (RFC 8461 3.1)."""
    ours = [t for t in texts if t.startswith("v=STSv1;") or t == "v=STSv1"]
    if not ours:
        return None
    if len(ours) > 1:
        raise StsError(f"{len(ours)} TXT records start with v=STSv1 (one is allowed)")
    fields: dict[str, str] = {}
    for raw in ours[0].split(";"):
        part = raw.strip(" \t")
        if not part:
            continue
        m = _FIELD.fullmatch(part)
        if m is None:
            raise StsError(f"malformed field {part[:40]!r} in the TXT record")
        fields.setdefault(m[1], m[2])
    policy_id = fields.get("id")
    if policy_id is None:
        raise StsError("the TXT record has no id")
    if not _ID.fullmatch(policy_id):
        raise StsError(f"the TXT record's id {policy_id[:40]!r} is not 1-32 letters and digits")
    return policy_id


@dataclass(frozen=True, slots=True)
class Policy:
    mode: Mode
    mx: tuple[str, ...]  # patterns as published, lower case, no trailing dot
    max_age: int  # seconds

    def text(self) -> str:
        """The policy as a policy file (for the cache and ``smtpgate check``)."""
        return "".join(["version: STSv1\n", f"mode: {self.mode}\n",
                        *(f"mx: {p}\n" for p in self.mx), f"max_age: {self.max_age}\n"])


_PATTERN = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{1,63}")


def parse_policy(body: bytes) -> Policy:
    """The policy file (RFC 8461 3.2): ``key: value`` lines (LF or CRLF); version STSv1,
    mode, max_age and (unless mode none) at least one mx are required; unknown keys are
    ignored; of a repeated key other than mx the first counts."""
    if len(body) > MAX_POLICY_BYTES:
        raise StsError(f"the policy is larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise StsError("the policy is not UTF-8 text") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for n, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r").strip(" \t")
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise StsError(f"line {n} is not 'key: value'")
        key, value = key.strip(" \t"), value.strip(" \t")
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise StsError("version is not STSv1" if "version" in fields else "no version")
    try:
        mode = Mode(fields.get("mode", ""))
    except ValueError:
        raise StsError(f"mode must be enforce, testing or none, not {fields.get('mode')!r}"
                       ) from None
    age = fields.get("max_age", "")
    if not age.isascii() or not age.isdigit() or len(age) > 10:
        raise StsError(f"max_age must be a number of seconds, not {age[:20]!r}")
    max_age = min(int(age), MAX_AGE_LIMIT)
    if mode is not Mode.NONE and not mx:
        raise StsError(f"mode {mode} needs at least one mx")
    if len(mx) > MAX_MX_PATTERNS:
        raise StsError(f"more than {MAX_MX_PATTERNS} mx patterns")
    for pattern in mx:
        if not _PATTERN.fullmatch(pattern) or len(pattern) > 253:
            raise StsError(f"mx {pattern[:60]!r} is not a host name or *.domain pattern")
    return Policy(mode, tuple(dict.fromkeys(mx)), max_age)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: a pattern is a host name, or ``*.`` and a domain, where ``*`` stands
    for exactly one left-most label."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return host == pattern


# -- which MX hosts of the domain this destination is ------------------------------------

Question = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Candidates:
    """MX hosts of the recipient domain that the policy lists and that resolve to this
    destination (``hosts``), or why that could not be told (``doubt``)."""

    hosts: tuple[str, ...] = ()
    listed: tuple[str, ...] = ()  # every MX host the policy lists (for the reason)
    doubt: str | None = None


def _unusable(answer: Answer) -> bool:
    return answer.status in (Status.BOGUS, Status.FAILED)


def sts_walk(domain: str, address: IPAddress,
             policy: Policy) -> Generator[Question, Answer, Candidates]:
    """The DNS questions that bind this destination to the policy: the domain's MX (no MX:
    the domain itself, RFC 5321 5.1), then A or AAAA of each MX host the policy lists."""
    mx = yield (domain, "MX")
    if _unusable(mx):
        return Candidates(doubt=f"its MX lookup {_went(mx)}")
    if mx.exists:
        hosts = sorted({r.exchange.to_text().lower().rstrip(".") for r in mx.records})
    else:
        hosts = [domain.lower().rstrip(".")]
    listed = tuple(h for h in hosts if any(mx_matches(p, h) for p in policy.mx))
    found: list[str] = []
    rdtype = "AAAA" if address.version == 6 else "A"
    for host in listed[:MAX_MX_HOSTS]:
        addresses = yield (host + ".", rdtype)
        if _unusable(addresses):
            return Candidates(listed=listed, doubt=f"the {rdtype} lookup of its MX {host} "
                                                   f"{_went(addresses)}")
        if any(ipaddress.ip_address(r.address) == address for r in addresses.records):
            found.append(host)
    return Candidates(tuple(found), listed)


def _went(answer: Answer) -> str:
    return ("failed DNSSEC validation" if answer.status is Status.BOGUS
            else "got no answer from the resolver")


# -- the Web PKI check ---------------------------------------------------------------------

# RFC 8460 result types (their spelling with underscores): the metric labels and, later,
# what a TLS report says.
SUCCESS = "success"
STARTTLS_NOT_SUPPORTED = "starttls_not_supported"
HOST_MISMATCH = "certificate_host_mismatch"
NOT_TRUSTED = "certificate_not_trusted"
EXPIRED = "certificate_expired"
VALIDATION_FAILURE = "validation_failure"  # this destination is no MX the policy lists
DNS = "dns"  # what ties the destination to the policy could not be looked up
NO_POLICY = "no_policy"  # mta_sts: require, and the domain has no valid policy
RESULTS = (SUCCESS, STARTTLS_NOT_SUPPORTED, HOST_MISMATCH, NOT_TRUSTED, EXPIRED,
           VALIDATION_FAILURE, DNS, NO_POLICY)


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_store(pem: bytes) -> Store:
    """A trust store from PEM certificates (a CA bundle file).  A root that cryptography
    only warns about today (a negative serial number in an old root) and will refuse
    tomorrow is left out, quietly: no Web PKI chain may lead to it anyway."""
    certs = []
    for block in _PEM_CERT.findall(pem):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                certs.append(x509.load_pem_x509_certificate(block))
            except (ValueError, Warning):
                continue
    if not certs:
        raise ValueError("no usable certificate in the CA bundle")
    return Store(certs)


def webpki_check(chain_der: Sequence[bytes], names: Sequence[str], store: Store,
                 now: dt.datetime | None = None) -> tuple[str, str]:
    """(result, detail): whether the presented chain is valid in the Web PKI for one of
    ``names`` (RFC 6125 via cryptography's verifier: signatures up to a root of ``store``,
    dates, constraints, a SAN dNSName; no CN fallback).  ``result`` is :data:`SUCCESS` or
    the RFC 8460 failure type; ``detail`` is free text for the log."""
    if not chain_der:
        return NOT_TRUSTED, "no certificate presented"
    try:
        leaf = x509.load_der_x509_certificate(chain_der[0])
        intermediates = [x509.load_der_x509_certificate(c) for c in chain_der[1:]]
    except ValueError as exc:
        return NOT_TRUSTED, f"unparsable certificate: {exc}"
    matching = matching_names(leaf, names)
    if not matching:
        return HOST_MISMATCH, f"the certificate names none of {', '.join(names) or '(none)'}"
    when = now or dt.datetime.now(dt.UTC)
    last = ""
    for name in matching:
        verifier = PolicyBuilder().store(store).time(when).build_server_verifier(
            x509.DNSName(name))
        try:
            verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            last = str(exc)
            continue
        return SUCCESS, name
    reason = path_error(VerificationError(last))
    return (EXPIRED if reason == "expired" else NOT_TRUSTED), last


# -- the verdict for one recipient ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Verdict:
    allow: bool
    result: str  # one of RESULTS
    reason: str  # for the 450 and the log ("" when allowed without remark)


def decide(domain: str, policy: Policy, candidates: Candidates, encrypted: bool,
           chain: Sequence[bytes], *, store: Store, now: dt.datetime | None = None) -> Verdict:
    """What ``policy`` (enforce or testing) makes of this recipient on this session:
    ``encrypted`` is TLS made by the gateway, ``chain`` the peer's presented certificates.
    Under testing every failure is allowed (and counted); under enforce it is a 450."""
    enforce = policy.mode is Mode.ENFORCE

    def fail(result: str, why: str) -> Verdict:
        return Verdict(not enforce, result, f"MTA-STS policy of {domain}: {why}")

    if candidates.doubt is not None:
        return fail(DNS, f"cannot check: {candidates.doubt}")
    if not candidates.hosts:
        listed = ", ".join(candidates.listed) or "none of its MX hosts"
        return fail(VALIDATION_FAILURE, f"this server is not an MX it lists (listed: {listed})")
    if not encrypted or not chain:
        return fail(STARTTLS_NOT_SUPPORTED, "this hop is not encrypted")
    result, detail = webpki_check(chain, candidates.hosts, store, now)
    if result == SUCCESS:
        return Verdict(True, SUCCESS, "")
    what = {HOST_MISMATCH: "the certificate does not name its MX",
            EXPIRED: "the certificate has expired",
            NOT_TRUSTED: "the certificate is not trusted"}[result]
    return fail(result, f"{what} ({detail})")


def applied(domain: str, policy: Policy | None, error: str | None,
            require: bool) -> Policy | Verdict | None:
    """The policy a recipient gets from what discovery found: None when there is nothing to
    apply (no policy, or mode none); under ``mta_sts: require`` a testing policy as
    enforce, and a refusal when there is no valid policy (``error``: why)."""
    if policy is None or policy.mode is Mode.NONE:
        if require:
            why = error or ("its policy is mode none" if policy is not None
                            else "it publishes no policy")
            return Verdict(False, NO_POLICY, f"policy requires MTA-STS for {domain}: {why}")
        return None
    if require and policy.mode is not Mode.ENFORCE:
        return Policy(Mode.ENFORCE, policy.mx, policy.max_age)
    return policy

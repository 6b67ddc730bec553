"""Who is behind a destination address, and has it published a key?

PTR(D) → H, kept only when A/AAAA(H) contains D (a PTR alone is a claim by whoever runs the
reverse zone); then TLSA at ``_25._tcp.H`` (RFC 7672 2.2), at the CNAME-expanded name first
when H's addresses came through a secure CNAME, then at H.  Every answer is kept, with its
status, for the log and for ``smtpgate check``.

``doubt`` is set when an answer that DANE depends on could not be trusted *after* the chain
was secure up to it (bogus, SERVFAIL, timeout, budget spent): the policy defers there rather
than fall back to plaintext (A3).  Trouble before anything secure was seen (the PTR lookup
itself) is no evidence that the peer asked for DANE, so it is not doubt.

This module is the pure half: both walks are generators that yield each question
``(name, rdtype)`` and receive its ``Answer``; ``gateway.discovery`` drives them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TypeVar

from .answers import Answer, Status
from .config import IPAddress
from .dane import TLSARecord

MAX_PTR_NAMES = 3  # a PTR RRset with dozens of names is not worth a query each

T = TypeVar("T")
Question = tuple[str, str]
Walk = Generator[Question, Answer, T]


@dataclass(frozen=True, slots=True)
class Discovery:
    address: IPAddress
    steps: tuple[Answer, ...]
    host: str | None = None  # forward-confirmed name of the address
    host_secure: bool = False  # PTR and forward lookups both secure
    tlsa: Answer | None = None  # the TLSA answer DANE would use
    tlsa_base: str | None = None  # the name the TLSA was found at (the SNI name)
    records: tuple[TLSARecord, ...] = ()  # from a secure, non-empty TLSA RRset
    doubt: str | None = None

    @property
    def usable(self) -> tuple[TLSARecord, ...]:
        return tuple(r for r in self.records if r.usable)


@dataclass
class Progress:
    address: IPAddress
    steps: list[Answer] = field(default_factory=list)
    host: str | None = None
    host_secure: bool = False
    secure_so_far: bool = False
    tlsa: Answer | None = None
    tlsa_base: str | None = None
    records: tuple[TLSARecord, ...] = ()
    doubt: str | None = None
    asking: tuple[str, str] | None = None  # the lookup in progress (for a budget timeout)

    def result(self) -> Discovery:
        return Discovery(self.address, tuple(self.steps), self.host, self.host_secure,
                         self.tlsa, self.tlsa_base, self.records, self.doubt)


def reverse_name(address: IPAddress) -> str:
    return address.reverse_pointer + "."


def distrust(answer: Answer) -> bool:
    return answer.status in (Status.BOGUS, Status.FAILED)


def discovery_walk(p: Progress) -> Walk[Discovery]:
    yield from discover_walk(p)
    return p.result()


def ask(p: Progress, name: str, rdtype: str) -> Walk[Answer]:
    p.asking = (name, rdtype)
    answer = yield p.asking
    p.steps.append(answer)
    return answer


def discover_walk(p: Progress) -> Walk[None]:
    ptr = yield from ask(p, reverse_name(p.address), "PTR")
    if not ptr.exists:
        return
    p.secure_so_far = ptr.status is Status.SECURE
    rdtype = "AAAA" if p.address.version == 6 else "A"
    names = sorted({r.target.to_text().lower() for r in ptr.records})[:MAX_PTR_NAMES]
    forward: Answer | None = None
    trouble: Answer | None = None
    for name in names:
        answer = yield from ask(p, name, rdtype)
        if distrust(answer):
            trouble = answer
            continue
        if answer.exists and any(ipaddress.ip_address(r.address) == p.address
                                 for r in answer.records):
            forward = answer
            p.host = name
            break
    if forward is None:
        if trouble is not None and p.secure_so_far:
            p.doubt = f"{trouble.rdtype} lookup of {trouble.name} is {trouble.status}"
        return
    p.host_secure = p.secure_so_far = ptr.status is Status.SECURE \
        and forward.status is Status.SECURE
    if not p.host_secure:
        return  # DANE needs a secure path to the host name (RFC 7672 2.2.2)
    assert p.host is not None
    bases = [forward.canonical, p.host] if forward.cnames else [p.host]
    for base in bases:
        tlsa = yield from ask(p, f"_25._tcp.{base}", "TLSA")
        if distrust(tlsa):
            p.doubt = f"TLSA lookup of {tlsa.name} is {tlsa.status}"
            return
        if tlsa.status is not Status.SECURE:
            return  # an unsigned TLSA zone publishes nothing DANE can use
        if tlsa.exists:
            p.tlsa, p.tlsa_base = tlsa, base.rstrip(".")
            p.records = tuple(TLSARecord(r.usage, r.selector, r.mtype, bytes(r.cert))
                              for r in tlsa.records)
            return
        # secure absence at the expanded name: try the original name (RFC 7672 2.2.2)


@dataclass(frozen=True, slots=True)
class RecipientRule:
    """What a recipient domain asks of a session to this destination (RFC 7672 2.2, bound
    to the recipient: the domain's DNSSEC-validated MX host that *is* this destination).

    ``host`` is None when the domain asks nothing of it; ``records`` are the usable TLSA of
    that MX host; ``doubt`` says why a lookup that mattered could not be trusted."""

    domain: str
    host: str | None = None
    records: tuple[TLSARecord, ...] = ()
    doubt: str | None = None


def _went(answer: Answer) -> str:
    """A distrusted answer in plain words, for the MTA's log."""
    return ("failed DNSSEC validation" if answer.status is Status.BOGUS
            else "got no answer from the resolver")


def recipient_walk(domain: str, address: IPAddress) -> Walk[RecipientRule]:
    mx = yield (domain, "MX")
    if distrust(mx):
        return RecipientRule(domain, doubt=f"its MX lookup {_went(mx)}")
    if mx.status is not Status.SECURE or not mx.exists:
        # Unsigned, or no MX (implicit MX is the domain itself): the domain asks nothing
        # that DNSSEC could vouch for at this level; the PTR-based plan still applies.
        hosts = [domain.rstrip(".") + "."] if mx.status is Status.SECURE and mx.absent else []
    else:
        hosts = sorted({r.exchange.to_text().lower() for r in mx.records})
    rdtype = "AAAA" if address.version == 6 else "A"
    for host in hosts[:10]:
        addresses = yield (host, rdtype)
        if distrust(addresses):
            return RecipientRule(domain, doubt=f"the {rdtype} lookup of its MX {host.rstrip('.')}"
                                               f" {_went(addresses)}")
        if addresses.status is not Status.SECURE or not any(
                ipaddress.ip_address(r.address) == address for r in addresses.records):
            continue
        tlsa = yield (f"_25._tcp.{host}", "TLSA")
        if distrust(tlsa):
            return RecipientRule(domain, host, doubt=f"the TLSA lookup of its MX "
                                                     f"{host.rstrip('.')} {_went(tlsa)}")
        if tlsa.status is Status.SECURE and tlsa.exists:
            records = tuple(TLSARecord(r.usage, r.selector, r.mtype, bytes(r.cert))
                            for r in tlsa.records)
            return RecipientRule(domain, host.rstrip("."), tuple(r for r in records if r.usable))
    return RecipientRule(domain)

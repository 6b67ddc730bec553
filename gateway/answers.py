"""DNS answers and how far each can be trusted: ``Answer`` with its ``Status``, and
``classify``, which turns one response into an Answer (pure, tested on crafted messages).

Status comes from the AD bit of a *trusted* resolver (loopback by default: the path to it
cannot be tampered with).  An AD bit from any other resolver is never believed.  A lookup
never raises for DNS trouble: it returns an Answer whose status says what happened
(``failed`` for timeouts, SERVFAIL and garbage; ``bogus`` when validation failed).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.ttl


class Status(StrEnum):
    SECURE = "secure"
    INSECURE = "insecure"
    BOGUS = "bogus"
    FAILED = "failed"


# RFC 8914 extended errors that mean "DNSSEC validation failed" rather than "no answer".
EDE_DNSSEC = {1, 2, 5, 6, 7, 8, 9, 10, 11, 12}


@dataclass(frozen=True, slots=True)
class Answer:
    name: str  # as asked, absolute, lower case
    rdtype: str
    status: Status
    rcode: str  # NOERROR, NXDOMAIN, SERVFAIL, ..., or TIMEOUT / ERROR for transport trouble
    records: tuple[Any, ...] = ()  # dnspython rdata of the final name's RRset
    canonical: str = ""  # after CNAMEs; == name when there were none
    cnames: tuple[str, ...] = ()
    ttl: int = 0  # positive: RRset TTL (min along the chain); negative: RFC 2308
    detail: str = ""

    @property
    def exists(self) -> bool:
        """True when the name has data of this type (not NXDOMAIN/NODATA, not a failure)."""
        return self.rcode == "NOERROR" and bool(self.records)

    @property
    def absent(self) -> bool:
        """NXDOMAIN or NODATA: a definite no (trust it as far as ``status`` says)."""
        return self.rcode == "NXDOMAIN" or (self.rcode == "NOERROR" and not self.records)

    def texts(self) -> list[str]:
        return [r.to_text() for r in self.records]

    def describe(self) -> str:
        what = ("; ".join(self.texts()) if self.records
                else "NXDOMAIN" if self.rcode == "NXDOMAIN"
                else "NODATA" if self.rcode == "NOERROR" else self.rcode)
        via = f" via {' -> '.join(self.cnames)} -> {self.canonical}" if self.cnames else ""
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.name} {self.rdtype}{via}: {what} [{self.status}, ttl {self.ttl}]{extra}"


def failed(name: str, rdtype: str, rcode: str, detail: str) -> Answer:
    return Answer(name, rdtype, Status.FAILED, rcode, canonical=name, detail=detail)


def classify(response: dns.message.QueryMessage, name: str, rdtype: str, trusted: bool,
             cd_response: dns.message.QueryMessage | None = None) -> Answer:
    """One response → an Answer.  ``cd_response`` is the same query with CD set, asked
    only after a SERVFAIL without an extended error, to tell bogus from unreachable."""
    rcode = dns.rcode.to_text(response.rcode())
    if rcode == "SERVFAIL":
        codes = {e.code for e in response.extended_errors()}
        if codes & EDE_DNSSEC:
            return Answer(name, rdtype, Status.BOGUS, rcode, canonical=name,
                          detail=f"extended error {min(codes & EDE_DNSSEC)}")
        if cd_response is not None and cd_response.rcode() in (dns.rcode.NOERROR,
                                                                dns.rcode.NXDOMAIN):
            return Answer(name, rdtype, Status.BOGUS, rcode, canonical=name,
                          detail="data only with checking disabled")
        return failed(name, rdtype, rcode, "server failure")
    if rcode not in ("NOERROR", "NXDOMAIN"):
        return failed(name, rdtype, rcode, "refused or malformed")
    ad = bool(response.flags & dns.flags.AD)
    status = Status.SECURE if ad and trusted else Status.INSECURE
    detail = "AD from an untrusted resolver ignored" if ad and not trusted else ""
    try:
        chain = response.resolve_chaining()
    except dns.exception.DNSException as exc:  # CNAME loop, wrong question, ...
        return failed(name, rdtype, "ERROR", f"unusable answer: {exc}")
    canonical = chain.canonical_name.to_text().lower()
    cnames = tuple(c.name.to_text().lower() for c in chain.cnames)
    records: tuple[Any, ...] = ()
    if chain.answer is not None:
        records = tuple(sorted(chain.answer, key=lambda r: r.to_text()))
    # A negative answer without an SOA leaves the "no minimum" sentinel: cache it briefly.
    ttl = chain.minimum_ttl if chain.minimum_ttl < dns.ttl.MAX_TTL else 0
    return Answer(name, rdtype, status, rcode, records, canonical, cnames, int(ttl), detail)

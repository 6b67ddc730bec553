"""TLS-RPT (RFC 8460), the pure half: what one outbound session's TLS came to for one
policy domain (:class:`Outcome`), and the names RFC 8460 gives to policies and failures.

The gateway sees every outbound session's TLS outcome, so an MTA that cannot be changed
gets TLS reporting for free.  A session records one Outcome per recipient domain on the hop
(the policy domain, RFC 8460 3): the policy that applied (DANE ``tlsa`` for the domain's MX,
MTA-STS ``sts``, or ``no-policy-found``), and ``success`` or the failure type.
``gateway.tlsrptstore`` counts them per UTC day, ``gateway.tlsrptsend`` reports them.

The report itself is built here too, from counted outcomes and nothing else: :func:`report`
(the JSON document of RFC 8460 4.4 for one policy domain and one UTC day), :func:`report_id`,
:func:`gzipped` (5.2) and :func:`filename` (5.1).  tests/data/tlsrpt-schema.json is the
schema the tests hold the documents to.
"""

from __future__ import annotations

import calendar
import gzip
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TLSA, STS, NO_POLICY = "tlsa", "sts", "no-policy-found"
POLICY_TYPES = (TLSA, STS, NO_POLICY)
SUCCESS = "success"
# RFC 8460 4.3: result types (negotiation, policy).
RESULT_TYPES = (
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure",
    "tlsa-invalid", "dnssec-invalid", "dane-required",
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)
MAX_DETAIL = 300  # additional-information is free text from peers: bounded


@dataclass(frozen=True, slots=True)
class Outcome:
    """One session's TLS outcome for one policy domain.  Sessions with equal fields are
    counted together; for ``success`` only the policy fields matter (RFC 8460 4.4)."""

    policy_domain: str  # the recipient domain, lower case, no trailing dot
    policy_type: str  # one of POLICY_TYPES
    policy_strings: tuple[str, ...] = ()  # tlsa: the TLSA records; sts: the policy's lines
    mx_host: tuple[str, ...] = ()  # sts: the policy's mx patterns; tlsa: the MX host
    result: str = SUCCESS  # SUCCESS or one of RESULT_TYPES
    sending_ip: str = ""  # the address the gateway's connection came from
    receiving_mx: str = ""  # the MX host name the session reached, "" unknown
    receiving_ip: str = ""  # the destination address
    detail: str = ""  # the error as text (failure-reason-code), bounded

    def __post_init__(self) -> None:
        if self.policy_type not in POLICY_TYPES:
            raise ValueError(f"policy type {self.policy_type!r}")
        if self.result != SUCCESS and self.result not in RESULT_TYPES:
            raise ValueError(f"result type {self.result!r}")
        if len(self.detail) > MAX_DETAIL:
            object.__setattr__(self, "detail", self.detail[:MAX_DETAIL])


# What gateway.sts names a verdict (RFC 8460's names with underscores, as metric labels)
# in RFC 8460's spelling; sts.DNS (the MX could not be looked up) is a validation failure.
STS_RESULTS = {
    "success": SUCCESS,
    "starttls_not_supported": "starttls-not-supported",
    "certificate_host_mismatch": "certificate-host-mismatch",
    "certificate_not_trusted": "certificate-not-trusted",
    "certificate_expired": "certificate-expired",
    "validation_failure": "validation-failure",
    "dns": "validation-failure",
}


# -- days ------------------------------------------------------------------------------------
# A report covers one whole UTC day (RFC 8460 4.1); days are named YYYY-MM-DD.
DAY = 86400


def utc_day(when: float) -> str:
    """The UTC day of an epoch time."""
    return time.strftime("%Y-%m-%d", time.gmtime(when))


def day_start(day: str) -> int:
    """00:00:00 UTC of ``day`` in epoch seconds; ValueError when it is no YYYY-MM-DD date."""
    if len(day) != 10:  # strptime takes "2026-1-5" too: one spelling per day
        raise ValueError(f"{day!r} is not a day YYYY-MM-DD")
    try:
        return calendar.timegm(time.strptime(day, "%Y-%m-%d"))
    except ValueError:
        raise ValueError(f"{day!r} is not a day YYYY-MM-DD") from None


def parse_day(text: str) -> str | None:
    """``text`` as a day YYYY-MM-DD, or None."""
    try:
        day_start(text)
    except ValueError:
        return None
    return text


def shift_day(day: str, days: int) -> str:
    """The day ``days`` after ``day`` (before, when negative)."""
    return utc_day(day_start(day) + days * DAY)


def _stamp(when: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


# -- the report ------------------------------------------------------------------------------
# The failure-reason-code of the row that takes a domain's failures past the store's bound
# (gateway.tlsrptstore): what the report says instead of itemizing them.
OVERFLOW_DETAIL = "more failures of this type not itemized"


def submitter(contact: str, sender: str) -> str:
    """The domain that submits the reports (RFC 8460 5.1: the domain of the contact-info
    address): from ``contact`` (an address, ``mailto:`` or another URI), else from the
    ``sender`` address; "" when neither names one."""
    for given in (contact, sender):
        text = given.strip()
        if text.lower().startswith("mailto:"):
            text = text[7:].split("?")[0]
        if "@" in text:
            return text.rsplit("@", 1)[1].strip("<> ").rstrip(".").lower()
        if "://" in text:
            host = text.split("://", 1)[1].split("/")[0].rsplit("@", 1)[-1]
            return host.split(":")[0].rstrip(".").lower()
    return ""


# Any fixed value: the ids are names in this space (uuid5), the same inputs give the same id.
_ID_SPACE = uuid.UUID("6f1d1b0c-9a53-4b47-8f1e-3d8a5b3c2e71")


def report_id(day: str, domain: str, submitter: str, instance: str = "") -> str:
    """The report's id: the same for the same day, domain and submitter (a retried delivery
    carries the id of the first try, so a receiver can drop the copy), different otherwise.
    ``instance`` (the host name) keeps apart the reports of two gateways that share a
    submitter: each counts its own sessions, and each report must keep its own id."""
    return str(uuid.uuid5(_ID_SPACE, f"{submitter}!{domain}!{day}!{instance}"))


def report(day: str, domain: str, rows: Sequence[tuple[Outcome, int]], *, organization: str,
           contact: str, report_id: str) -> dict[str, Any]:
    """The RFC 8460 4.4 report on ``domain`` for the UTC ``day`` from the counted outcomes:
    one ``policies`` entry per distinct policy (type, strings, MX patterns), its successful
    and failed sessions, and one failure-details entry per distinct failure.  Free text goes
    to failure-reason-code ("a text field to include a TLS-related error code or error
    message"): additional-information is a URI (4.4), which the gateway has none of."""
    start = day_start(day)
    # policy -> [successes, failures, {failure -> count}]; dicts keep the first-seen order,
    # the sort below makes the document independent of it.
    found: dict[tuple[str, tuple[str, ...], tuple[str, ...]],
                tuple[list[int], dict[tuple[str, str, str, str, str], int]]] = {}
    for outcome, count in rows:
        if outcome.policy_domain != domain:
            raise ValueError(f"an outcome of {outcome.policy_domain} in the report on {domain}")
        if count <= 0:
            continue
        policy = (outcome.policy_type, outcome.policy_strings, outcome.mx_host)
        totals, failures = found.setdefault(policy, ([0, 0], {}))
        if outcome.result == SUCCESS:
            totals[0] += count
            continue
        totals[1] += count
        failure = (outcome.result, outcome.sending_ip, outcome.receiving_mx,
                   outcome.receiving_ip, outcome.detail)
        failures[failure] = failures.get(failure, 0) + count
    policies = []
    for policy in sorted(found):
        (ok, failed), failures = found[policy]
        kind, strings, mx = policy
        described: dict[str, Any] = {"policy-type": kind}
        if strings:
            described["policy-string"] = list(strings)
        described["policy-domain"] = domain
        if mx:
            described["mx-host"] = list(mx)
        entry: dict[str, Any] = {
            "policy": described,
            "summary": {"total-successful-session-count": ok,
                        "total-failure-session-count": failed},
        }
        if failures:
            # The largest first: what a reader looks for; then by the fields, for one order.
            entry["failure-details"] = [
                _failure(f, n) for f, n in sorted(failures.items(), key=lambda i: (-i[1], i[0]))]
        policies.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _stamp(start), "end-datetime": _stamp(start + DAY - 1)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


def _failure(failure: tuple[str, str, str, str, str], count: int) -> dict[str, Any]:
    result, sending_ip, mx, receiving_ip, detail = failure
    # 4.4's order; what is unknown is left out (no session, no MX: a policy fetch failed),
    # receiving-mx-helo always (the gateway keeps no peer's greeting).
    entry: dict[str, Any] = {"result-type": result}
    if sending_ip:
        entry["sending-mta-ip"] = sending_ip
    if mx:
        entry["receiving-mx-hostname"] = mx
    if receiving_ip:
        entry["receiving-ip"] = receiving_ip
    entry["failed-session-count"] = count
    if detail:
        entry["failure-reason-code"] = detail
    return entry


def encoded(report: dict[str, Any]) -> bytes:
    """The report as sent: compact UTF-8 JSON."""
    return json.dumps(report, ensure_ascii=False, separators=(",", ":")).encode()


def gzipped(report: dict[str, Any]) -> bytes:
    """The report gzip-compressed (RFC 8460 5.2), the same bytes for the same report: no
    time stamp and no file name in the gzip header."""
    return gzip.compress(encoded(report), compresslevel=9, mtime=0)


def filename(submitter: str, domain: str, day: str, report_id: str) -> str:
    """The report's file name (RFC 8460 5.1):
    ``submitter!policy-domain!begin-timestamp!end-timestamp!unique-id.json.gz``, the
    timestamps the report's date-range in UNIX seconds, the unique id the report id's
    letters and digits (the ABNF allows nothing else there)."""
    start = day_start(day)
    unique = "".join(c for c in report_id if c.isascii() and c.isalnum())
    return f"{submitter}!{domain}!{start}!{start + DAY - 1}!{unique}.json.gz"

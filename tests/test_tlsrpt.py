"""TLS-RPT (RFC 8460): the report document (gateway/tlsrpt.py) held to a JSON Schema written
from the RFC (tests/data/tlsrpt-schema.json, which the RFC's own example report passes too),
the store of outcomes (gateway/tlsrptstore.py) in memory and in SQLite files shared by
several Store objects as by workers, and ``smtpgate tlsrpt show`` (gateway/tlsrptcli.py).
No root, no network: the quick tier."""

from __future__ import annotations

import asyncio
import calendar
import copy
import gzip
import io
import json
import logging
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import uvloop

from gateway.config import TlsRpt
from gateway.tlsrpt import (
    NO_POLICY,
    OVERFLOW_DETAIL,
    RESULT_TYPES,
    STS,
    TLSA,
    Outcome,
    day_start,
    filename,
    gzipped,
    parse_day,
    report,
    report_id,
    shift_day,
    submitter,
    utc_day,
)
from gateway.tlsrptcli import show
from gateway.tlsrptstore import (
    KEEP_DAYS,
    MAX_FAILURES,
    MAX_POLICIES,
    Delivery,
    Store,
    prepare,
    store_path,
)

DATA = Path(__file__).resolve().parent / "data"
SCHEMA = json.loads((DATA / "tlsrpt-schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)

DAY = "2026-12-06"
NOON = calendar.timegm((2026, 12, 6, 12, 0, 0))
STS_LINES = ("version: STSv1", "mode: enforce", "mx: mx1.y.test", "mx: *.mx.y.test",
             "max_age: 604800")
TLSA_RR = ("3 1 1 1f850a337e6db9c609c522d136a475638cc43e1ed424f8eec8513d747d1d085d",)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(asyncio.wait_for(coro, 30))


def errors(document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in VALIDATOR.iter_errors(document)]


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sts_ok(domain: str = "y.test", **kw: str) -> Outcome:
    return Outcome(domain, STS, STS_LINES, ("mx1.y.test", "*.mx.y.test"), **kw)


def sts_fail(result: str, mx: str = "mx1.y.test", ip: str = "192.0.2.25",
             detail: str = "", domain: str = "y.test") -> Outcome:
    return Outcome(domain, STS, STS_LINES, ("mx1.y.test", "*.mx.y.test"), result,
                   "198.51.100.7", mx, ip, detail)


def config(path: Path | str | None, **kw: Any) -> TlsRpt:
    return TlsRpt(enabled=True, organization="Example Org", contact="tlsrpt@example.net",
                  sender="tlsrpt@example.net", store=None if path is None else str(path), **kw)


# -- the report document ---------------------------------------------------------------------

def sample_rows() -> list[tuple[Outcome, int]]:
    return [
        (sts_ok(), 40),
        (sts_ok(), 2),  # the same outcome twice: added
        (sts_fail("certificate-expired", detail="certificate expired 2026-12-01"), 3),
        (sts_fail("starttls-not-supported", "mx2.mx.y.test", "192.0.2.26"), 7),
        (sts_fail("certificate-expired", detail="certificate expired 2026-12-01"), 1),
        (Outcome("y.test", STS, (), (), "sts-policy-fetch-error",
                 detail="https://mta-sts.y.test/.well-known/mta-sts.txt: HTTP 404"), 5),
        (Outcome("y.test", TLSA, TLSA_RR, ("mx.y.test",)), 9),
        (Outcome("y.test", TLSA, TLSA_RR, ("mx.y.test",), "tlsa-invalid", "2001:db8::7",
                 "mx.y.test", "2001:db8::25", "no TLSA record matched"), 1),
        (Outcome("y.test", NO_POLICY), 0),  # nothing counted: no entry
    ]


def test_the_report_has_rfc_8460s_fields_and_passes_the_schema() -> None:
    doc = report(DAY, "y.test", sample_rows(), organization="Example Org",
                 contact="tlsrpt@example.net", report_id="r1")
    assert errors(doc) == []
    assert list(doc) == ["organization-name", "date-range", "contact-info", "report-id",
                         "policies"]
    assert doc["organization-name"] == "Example Org"
    assert doc["contact-info"] == "tlsrpt@example.net"
    assert doc["report-id"] == "r1"
    # The whole UTC day (RFC 8460 4.1), RFC 3339.
    assert doc["date-range"] == {"start-datetime": "2026-12-06T00:00:00Z",
                                 "end-datetime": "2026-12-06T23:59:59Z"}


def test_the_report_groups_by_policy_and_by_failure() -> None:
    doc = report(DAY, "y.test", sample_rows(), organization="O", contact="c@x.test",
                 report_id="r1")
    by = {(p["policy"]["policy-type"], len(p["policy"].get("policy-string", []))): p
          for p in doc["policies"]}
    assert len(doc["policies"]) == 3 == len(by)  # sts, sts without a policy, tlsa
    sts = by[(STS, len(STS_LINES))]
    assert sts["policy"] == {"policy-type": "sts", "policy-string": list(STS_LINES),
                             "policy-domain": "y.test",
                             "mx-host": ["mx1.y.test", "*.mx.y.test"]}
    assert sts["summary"] == {"total-successful-session-count": 42,
                              "total-failure-session-count": 11}
    assert sts["failure-details"] == [
        {"result-type": "starttls-not-supported", "sending-mta-ip": "198.51.100.7",
         "receiving-mx-hostname": "mx2.mx.y.test", "receiving-ip": "192.0.2.26",
         "failed-session-count": 7},
        {"result-type": "certificate-expired", "sending-mta-ip": "198.51.100.7",
         "receiving-mx-hostname": "mx1.y.test", "receiving-ip": "192.0.2.25",
         "failed-session-count": 4,
         "failure-reason-code": "certificate expired 2026-12-01"},
    ]
    # A policy that could not be fetched: no strings, no MX, no session to name.
    fetch = by[(STS, 0)]
    assert fetch["policy"] == {"policy-type": "sts", "policy-domain": "y.test"}
    assert fetch["summary"] == {"total-successful-session-count": 0,
                                "total-failure-session-count": 5}
    assert fetch["failure-details"] == [
        {"result-type": "sts-policy-fetch-error", "failed-session-count": 5,
         "failure-reason-code": "https://mta-sts.y.test/.well-known/mta-sts.txt: HTTP 404"}]
    tlsa = by[(TLSA, 1)]
    assert tlsa["summary"] == {"total-successful-session-count": 9,
                               "total-failure-session-count": 1}
    assert tlsa["failure-details"][0]["sending-mta-ip"] == "2001:db8::7"
    # Nothing unknown is made up: no greeting kept, so no receiving-mx-helo.
    assert not any("receiving-mx-helo" in f for p in doc["policies"]
                   for f in p.get("failure-details", []))
    # The sums agree.
    for p in doc["policies"]:
        failed = sum(f["failed-session-count"] for f in p.get("failure-details", []))
        assert failed == p["summary"]["total-failure-session-count"]


def test_the_report_does_not_depend_on_the_rows_order() -> None:
    rows = sample_rows()
    one = report(DAY, "y.test", rows, organization="O", contact="c@x.test", report_id="r")
    two = report(DAY, "y.test", rows[::-1], organization="O", contact="c@x.test",
                 report_id="r")
    assert json.dumps(one) == json.dumps(two)


def test_a_report_of_successes_only_lists_no_failures_and_passes() -> None:
    doc = report(DAY, "z.test", [(Outcome("z.test", NO_POLICY), 3)], organization="O",
                 contact="mailto:c@x.test", report_id="r")
    assert doc["policies"] == [{
        "policy": {"policy-type": "no-policy-found", "policy-domain": "z.test"},
        "summary": {"total-successful-session-count": 3, "total-failure-session-count": 0}}]
    assert errors(doc) == []


def test_every_result_type_passes_and_an_outcome_of_another_domain_is_refused() -> None:
    rows = [(sts_fail(r), 1) for r in RESULT_TYPES]
    assert errors(report(DAY, "y.test", rows, organization="O", contact="c", report_id="r")) \
        == []
    with pytest.raises(ValueError, match=r"z\.test"):
        report(DAY, "y.test", [(sts_ok("z.test"), 1)], organization="O", contact="c",
               report_id="r")
    with pytest.raises(ValueError):
        report("2026-13-01", "y.test", [], organization="O", contact="c", report_id="r")


def test_the_rfcs_example_report_passes_the_schema() -> None:
    """RFC 8460 Appendix B, with errata ID 6241 (mx-host an array, as 4.4 says): the schema
    is the RFC's, not one fitted to what the gateway writes."""
    example = json.loads((DATA / "rfc8460-example.json").read_text())
    assert errors(example) == []


@pytest.mark.parametrize(("where", "change"), [
    ((), lambda d: d.pop("report-id")),
    ((), lambda d: d.update({"policy": {}})),  # misspelled member
    (("date-range",), lambda d: d.update({"end-datetime": "2016-04-01 23:59:59"})),
    (("date-range",), lambda d: d.update({"start-datetime": "2016-04-01T00:00:00"})),
    (("policies", 0, "policy"), lambda d: d.update({"policy-type": "dane"})),
    (("policies", 0, "policy"), lambda d: d.update({"policy-domain": "bücher.example"})),
    (("policies", 0, "policy"), lambda d: d.update({"mx-host": "*.mail.company-y.example"})),
    (("policies", 0), lambda d: d.pop("summary")),
    (("policies", 0, "summary"), lambda d: d.update({"total-failure-session-count": "303"})),
    (("policies", 0, "failure-details", 0), lambda d: d.update({"result-type": "expired"})),
    (("policies", 0, "failure-details", 0), lambda d: d.pop("failed-session-count")),
    (("policies", 0, "failure-details", 0), lambda d: d.update({"sending-mta-ip": "mx1"})),
    (("policies", 0, "failure-details", 0),
     lambda d: d.update({"sending-mta-ip": "203.0.113.300"})),
])
def test_the_schema_refuses_what_the_rfc_does_not_allow(where: tuple[Any, ...],
                                                        change: Any) -> None:
    doc = copy.deepcopy(json.loads((DATA / "rfc8460-example.json").read_text()))
    part = doc
    for step in where:
        part = part[step]
    change(part)
    assert errors(doc) != []


def test_gzipped_is_deterministic_and_gunzips_to_the_report() -> None:
    doc = report(DAY, "y.test", sample_rows(), organization="Ünïcode Org",
                 contact="c@x.test", report_id="r")
    packed = gzipped(doc)
    assert packed == gzipped(copy.deepcopy(doc))
    assert packed[:2] == b"\x1f\x8b" and packed[4:8] == b"\0\0\0\0"  # no time stamp
    assert packed[3] & 0x08 == 0  # no file name
    assert json.loads(gzip.decompress(packed)) == doc


def test_the_file_name_follows_rfc_8460_5_1() -> None:
    rid = report_id(DAY, "y.test", "example.net")
    name = filename("example.net", "y.test", DAY, rid)
    start = calendar.timegm((2026, 12, 6, 0, 0, 0))
    assert name == f"example.net!y.test!{start}!{start + 86399}!{rid.replace('-', '')}.json.gz"
    assert re.fullmatch(r"[a-z0-9.-]+![a-z0-9.-]+!\d+!\d+![A-Za-z0-9]+\.json\.gz", name)


def test_the_report_id_is_stable_and_unique() -> None:
    rid = report_id(DAY, "y.test", "example.net")
    assert uuid.UUID(rid).version == 5
    assert rid == report_id(DAY, "y.test", "example.net")  # a retry: the same id
    others = {report_id(shift_day(DAY, 1), "y.test", "example.net"),
              report_id(DAY, "z.test", "example.net"),
              report_id(DAY, "y.test", "example.org"),
              report_id(DAY, "y.test", "example.net", "gw2")}
    assert len(others) == 4 and rid not in others


def test_the_submitter_is_the_contacts_domain() -> None:
    assert submitter("tlsrpt@Example.NET", "x@y.test") == "example.net"
    assert submitter("mailto:tlsrpt@example.net?subject=x", "") == "example.net"
    assert submitter("https://reports.example.net/tls", "x@y.test") == "reports.example.net"
    assert submitter("the postmaster", "x@y.test") == "y.test"
    assert submitter("", "") == ""


def test_days_are_utc_and_checked() -> None:
    assert utc_day(NOON) == DAY
    assert utc_day(day_start(DAY) - 1) == "2026-12-05"
    assert shift_day("2026-12-31", 1) == "2027-01-01"
    assert shift_day("2026-03-01", -1) == "2026-02-28"
    assert parse_day(DAY) == DAY
    for bad in ("2026-1-5", "2026-02-30", "06.12.2026", "", "2026-12-06T00:00"):
        assert parse_day(bad) is None


# -- the store -------------------------------------------------------------------------------

def test_recorded_outcomes_are_counted_per_day_and_domain(tmp_path: Path) -> None:
    clock = Clock()

    async def main() -> None:
        store = Store(config(tmp_path / "t.sqlite3"), clock)
        await store.open()
        assert store.path == str(tmp_path / "t.sqlite3")
        for i in range(5):  # successes are counted per policy, whatever the session
            store.record(sts_ok(sending_ip=f"198.51.100.{i}", receiving_ip="192.0.2.25"))
        store.record(sts_fail("certificate-expired"), 3)
        store.record(Outcome("z.test", NO_POLICY))
        clock.now += 86400  # tomorrow
        store.record(Outcome("z.test", NO_POLICY), 2)
        await store.flush()
        assert await store.days() == [DAY, "2026-12-07"]
        assert await store.domains(DAY) == ["y.test", "z.test"]
        assert dict(await store.counts(DAY, "y.test")) == {
            sts_ok(): 5, sts_fail("certificate-expired"): 3}
        assert await store.counts("2026-12-07", "z.test") == [(Outcome("z.test", NO_POLICY), 2)]
        assert await store.counts(DAY, "nowhere.test") == []
        assert await store.dropped(DAY) == 0
        await store.close()

    run(main())


def test_the_day_is_the_utc_day_of_recording() -> None:
    clock = Clock(calendar.timegm((2026, 12, 6, 23, 59, 59)))

    async def main() -> None:
        store = Store(config(None), clock)
        await store.open()
        store.record(sts_ok())
        clock.now += 1
        store.record(sts_ok())
        clock.now -= 2  # a clock stepped back: back on the day before
        store.record(sts_ok())
        assert await store.counts(DAY, "y.test") == [(sts_ok(), 2)]
        assert await store.counts("2026-12-07", "y.test") == [(sts_ok(), 1)]
        await store.close()

    run(main())


def test_two_workers_on_one_file_add_up(tmp_path: Path) -> None:
    """Two Store objects on one file, as two workers: each its own connection and thread,
    writing at once; no count is lost or overwritten."""
    path = tmp_path / "t.sqlite3"

    async def worker(store: Store, me: int) -> None:
        for i in range(1000):
            store.record(sts_ok())
            if i % 7 == 0:
                store.record(sts_fail("certificate-not-trusted", ip=f"192.0.2.{me}"))
            if i % 10 == 9:
                await store.flush()  # a write per ten sessions: many interleaved writes

    async def main() -> None:
        stores = [Store(config(path), Clock()) for _ in range(2)]
        for store in stores:
            await store.open()
        await asyncio.gather(*(worker(s, n) for n, s in enumerate(stores)))
        for store in stores:
            await store.close()
        reader = Store(config(path), Clock(), read_only=True)
        await reader.open()
        counts = dict(await reader.counts(DAY, "y.test"))
        assert counts[sts_ok()] == 2000
        assert counts[sts_fail("certificate-not-trusted", ip="192.0.2.0")] == 143
        assert counts[sts_fail("certificate-not-trusted", ip="192.0.2.1")] == 143
        prepared = await prepare(reader, config(path), DAY, "y.test")
        assert prepared is not None
        assert prepared.report["policies"][0]["summary"] == {"total-successful-session-count": 2000,
                                                 "total-failure-session-count": 286}
        await reader.close()

    run(main())


WORKER = """
import asyncio, sys
from gateway.config import TlsRpt
from gateway.tlsrpt import STS, Outcome
from gateway.tlsrptstore import Store

async def main() -> None:
    store = Store(TlsRpt(enabled=True, store=sys.argv[1]), lambda: float(sys.argv[2]))
    await store.open()
    print("ready", flush=True)
    sys.stdin.readline()  # all start together
    for i in range(1000):
        store.record(Outcome("y.test", STS, ("version: STSv1",), ("mx.y.test",)))
        if i % 10 == 9:
            await store.flush()
    await store.close()

asyncio.run(main())
"""


def test_two_worker_processes_on_one_file_add_up(tmp_path: Path) -> None:
    """The same with processes, as the workers are: SQLite's locks between processes."""
    path = tmp_path / "t.sqlite3"
    root = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(NOON)], cwd=root,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
    for proc in procs:
        assert proc.wait(timeout=20) == 0

    async def main() -> None:
        reader = Store(config(path), Clock(), read_only=True)
        await reader.open()
        assert await reader.counts(DAY, "y.test") == [
            (Outcome("y.test", STS, ("version: STSv1",), ("mx.y.test",)), 2000)]
        await reader.close()

    run(main())


def test_a_restart_keeps_the_counts_and_close_writes_what_is_pending(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"

    async def main() -> None:
        store = Store(config(path), Clock())
        await store.open()
        store.record(sts_ok(), 4)
        await store.flush()
        store.record(sts_ok(), 3)  # not flushed: close writes it
        await store.close()
        again = Store(config(path), Clock())
        await again.open()
        assert await again.counts(DAY, "y.test") == [(sts_ok(), 7)]
        again.record(sts_ok())
        assert await again.counts(DAY, "y.test") == [(sts_ok(), 8)]
        await again.close()

    run(main())


def test_the_counts_are_written_every_few_seconds_without_asking(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.tlsrptstore.FLUSH_EVERY", 0.02)
    path = tmp_path / "t.sqlite3"

    async def main() -> None:
        writer = Store(config(path), Clock())
        await writer.open()
        writer.record(sts_ok(), 6)
        reader = Store(config(path), Clock(), read_only=True)
        await reader.open()
        for _ in range(100):  # no flush asked for: the writer's own
            if await reader.counts(DAY, "y.test"):
                break
            await asyncio.sleep(0.01)
        assert await reader.counts(DAY, "y.test") == [(sts_ok(), 6)]
        await reader.close()
        await writer.close()

    run(main())


@pytest.mark.parametrize("in_file", [True, False])
def test_domains_past_max_domains_are_dropped_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, in_file: bool) -> None:
    caplog.set_level(logging.INFO, "smtpgate")

    async def main() -> None:
        store = Store(config(tmp_path / "t.sqlite3" if in_file else None, max_domains=3),
                      Clock())
        await store.open()
        for n in range(5):
            store.record(sts_ok(f"d{n}.test"), 2)
            await store.flush()
        store.record(sts_ok("d0.test"))  # a domain already counted still counts
        store.record(sts_ok("d9.test"))
        assert await store.domains(DAY) == ["d0.test", "d1.test", "d2.test"]
        assert await store.counts(DAY, "d0.test") == [(sts_ok("d0.test"), 3)]
        assert await store.dropped(DAY) == 5
        await store.close()

    run(main())
    warned = [r for r in caplog.records if r.getMessage() == "tlsrpt domains past the limit"]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


def test_the_domain_bound_holds_across_workers(tmp_path: Path) -> None:
    """Each worker holds fewer than max_domains, the file gets no more than that."""
    path = tmp_path / "t.sqlite3"

    async def main() -> None:
        one, two = (Store(config(path, max_domains=2), Clock()) for _ in range(2))
        await one.open()
        await two.open()
        one.record(sts_ok("a.test"))
        two.record(sts_ok("b.test"))
        two.record(sts_ok("c.test"), 4)
        await one.flush()
        await two.flush()
        assert await one.domains(DAY) == ["a.test", "b.test"]
        assert await one.dropped(DAY) == 4
        await one.close()
        await two.close()

    run(main())


@pytest.mark.parametrize("in_file", [True, False])
def test_distinct_failures_past_the_bound_are_counted_not_itemized(tmp_path: Path,
                                                                  in_file: bool) -> None:
    async def main() -> None:
        store = Store(config(tmp_path / "t.sqlite3" if in_file else None), Clock())
        await store.open()
        for n in range(MAX_FAILURES + 50):
            store.record(sts_fail("certificate-expired", ip=f"2001:db8::{n:x}"))
            if n % 40 == 0:
                await store.flush()  # spread over writes: the bound is the file's
        store.record(sts_fail("certificate-expired", ip="2001:db8::1"))  # itemized: counts
        store.record(sts_fail("validation-failure", ip="2001:db8::ffff"), 2)
        rows = dict(await store.counts(DAY, "y.test"))
        assert rows[sts_fail("certificate-expired", ip="2001:db8::1")] == 2
        overflow = sorted((o.result, n) for o, n in rows.items() if o.detail == OVERFLOW_DETAIL)
        assert overflow == [("certificate-expired", 50), ("validation-failure", 2)]
        assert len(rows) == MAX_FAILURES + 2
        prepared = await prepare(store, config(None), DAY, "y.test")
        assert prepared is not None
        doc = prepared.report
        assert errors(doc) == []
        (policy,) = doc["policies"]
        assert policy["summary"]["total-failure-session-count"] == MAX_FAILURES + 53
        assert {"result-type": "certificate-expired", "failed-session-count": 50,
                "failure-reason-code": OVERFLOW_DETAIL} in policy["failure-details"]
        await store.close()

    run(main())


def test_distinct_policies_past_the_bound_are_counted_without_their_strings(
        tmp_path: Path) -> None:
    """A domain that changes its TLSA records all day gets MAX_POLICIES entries and one for
    the rest, not one per change."""
    async def main() -> None:
        store = Store(config(tmp_path / "t.sqlite3"), Clock())
        await store.open()
        for n in range(MAX_POLICIES + 5):
            store.record(Outcome("y.test", TLSA, (f"3 1 1 {n:064x}",), ("mx.y.test",)), 2)
            await store.flush()
        rows = await store.counts(DAY, "y.test")
        assert len(rows) == MAX_POLICIES + 1
        assert (Outcome("y.test", TLSA), 10) in rows
        await store.close()

    run(main())


def test_a_corrupt_file_is_replaced_by_memory_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "t.sqlite3"
    path.write_bytes(b"this is not a database, " * 100)

    async def main() -> None:
        store = Store(config(path), Clock())
        await store.open()
        assert store.path is None and str(path) in store.problem
        store.record(sts_ok())
        assert await store.counts(DAY, "y.test") == [(sts_ok(), 1)]
        await store.close()

    run(main())
    assert path.read_bytes() == b"this is not a database, " * 100  # left as it was
    assert any(r.levelno == logging.WARNING and r.getMessage() == "tlsrpt store unusable"
               for r in caplog.records)


def test_reading_only_never_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"

    async def missing() -> None:
        reader = Store(config(path), Clock(), read_only=True)
        await reader.open()
        assert reader.path is None and "no " in reader.problem
        reader.record(sts_ok())  # a reader counts nothing
        assert await reader.days() == []
        await reader.close()

    async def write() -> None:
        writer = Store(config(path), Clock())
        await writer.open()
        writer.record(sts_ok())
        await writer.close()

    async def read() -> None:
        reader = Store(config(path), Clock(), read_only=True)
        await reader.open()
        assert await reader.counts(DAY, "y.test") == [(sts_ok(), 1)]
        await reader.close()

    run(missing())
    assert list(tmp_path.iterdir()) == []
    # Written and closed by the gateway: a reader creates no WAL files beside it.
    run(write())
    assert [p.name for p in tmp_path.iterdir()] == ["t.sqlite3"]
    run(read())
    assert [p.name for p in tmp_path.iterdir()] == ["t.sqlite3"]


def test_a_reader_beside_a_running_writer_sees_what_was_flushed(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"

    async def main() -> None:
        writer = Store(config(path), Clock())
        await writer.open()
        writer.record(sts_ok(), 2)
        await writer.flush()
        writer.record(sts_ok(), 5)  # not flushed yet: not seen
        reader = Store(config(path), Clock(), read_only=True)
        await reader.open()
        assert await reader.counts(DAY, "y.test") == [(sts_ok(), 2)]
        await reader.close()
        await writer.close()

    run(main())


@pytest.mark.parametrize("in_file", [True, False])
def test_deliveries_are_noted_and_read_back(tmp_path: Path, in_file: bool) -> None:
    path = tmp_path / "t.sqlite3" if in_file else None
    rua = "mailto:tlsrpt@y.test"

    async def main() -> None:
        clock = Clock()
        store = Store(config(path), clock)
        await store.open()
        assert await store.delivery(DAY, "y.test", rua) is None
        await store.note_delivery(DAY, "y.test", rua, ok=False, error="451 try later",
                                  attempts=1, next_try=NOON + 600)
        assert await store.delivery(DAY, "y.test", rua) == Delivery(
            DAY, "y.test", rua, 1, "451 try later", False, NOON + 600, NOON)
        await store.note_delivery(DAY, "y.test", rua, ok=True, error="", attempts=2,
                                  next_try=0)
        await store.note_delivery(DAY, "y.test", "https://r.y.test/", ok=False, error="x",
                                  attempts=1, next_try=1)
        # A late failure note (another sender's) does not undo the delivery.
        await store.note_delivery(DAY, "y.test", rua, ok=False, error="timeout",
                                  attempts=1, next_try=5)
        done = await store.delivery(DAY, "y.test", rua)
        assert done is not None and done.done and done.attempts == 2
        assert [d.rua for d in await store.deliveries(DAY)] == ["https://r.y.test/", rua]
        await store.close()
        if path is not None:
            again = Store(config(path), clock)
            await again.open()
            kept = await again.delivery(DAY, "y.test", rua)
            assert kept is not None and kept.done
            await again.close()

    run(main())


@pytest.mark.parametrize("in_file", [True, False])
def test_old_days_are_forgotten(tmp_path: Path, in_file: bool) -> None:
    path = tmp_path / "t.sqlite3" if in_file else None

    async def main() -> None:
        clock = Clock()
        store = Store(config(path, max_domains=1), clock)
        await store.open()
        store.record(sts_ok())
        store.record(sts_ok("z.test"))  # dropped: forgotten with its day too
        await store.note_delivery(DAY, "y.test", "mailto:a@y.test", ok=True, error="",
                                  attempts=1, next_try=0)
        clock.now += 86400
        store.record(sts_ok())
        await store.forget_before(shift_day(DAY, 1))
        assert await store.days() == ["2026-12-07"]
        assert await store.dropped(DAY) == 0
        assert await store.deliveries(DAY) == []
        # On its own: days older than KEEP_DAYS go at the first write of a day.
        clock.now += (KEEP_DAYS + 1) * 86400
        store.record(sts_ok())
        await store.flush()
        assert await store.days() == [shift_day(DAY, KEEP_DAYS + 2)]
        await store.close()

    run(main())


def test_the_store_file_setting() -> None:
    assert store_path(None) == (None, "tlsrpt.store is null")
    assert store_path("/x/t.db") == ("/x/t.db", "")


# -- smtpgate tlsrpt show --------------------------------------------------------------------

def fill(path: Path) -> None:
    async def main() -> None:
        store = Store(config(path), Clock())
        await store.open()
        store.record(sts_ok(), 3)
        store.record(sts_fail("certificate-expired"))
        store.record(Outcome("z.test", NO_POLICY), 2)
        await store.close()

    run(main())


def documents(text: str) -> list[Any]:
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(text):
        doc, at = decoder.raw_decode(text, at)
        found.append(doc)
        while at < len(text) and text[at].isspace():
            at += 1
    return found


def test_show_prints_each_domains_report_as_sent(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    fill(path)
    out, err = io.StringIO(), io.StringIO()
    assert show(config(path), out, day=DAY, err=err) == 0, err.getvalue()
    docs = documents(out.getvalue())
    assert [d["policies"][0]["policy"]["policy-domain"] for d in docs] == ["y.test", "z.test"]
    for doc in docs:
        assert errors(doc) == []
        assert doc["report-id"] == report_id(
            DAY, doc["policies"][0]["policy"]["policy-domain"], "example.net",
            socket.gethostname())
    assert docs[0]["policies"][0]["summary"] == {"total-successful-session-count": 3,
                                                 "total-failure-session-count": 1}
    out = io.StringIO()
    assert show(config(path), out, domain="Z.TEST.", day=DAY, err=err) == 0
    assert [d["policies"][0]["policy"]["policy-domain"] for d in documents(out.getvalue())] \
        == ["z.test"]


def test_show_says_when_there_is_nothing_or_the_input_is_bad(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.sqlite3"
    out, err = io.StringIO(), io.StringIO()
    assert show(config(path), out, day=DAY, err=err) == 1  # no file yet
    assert not path.exists()
    fill(path)
    assert show(config(path), out, day="2026-12-05", err=err) == 1
    assert show(config(path), out, day=DAY, domain="other.test", err=err) == 1
    assert "no TLS outcomes recorded for other.test on 2026-12-06" in err.getvalue()
    assert show(config(path), out, day="2026-12-32", err=err) == 2
    assert show(config(path), out, day=DAY, domain="bad domain", err=err) == 2
    # Without --day: today's counts so far (UTC).
    assert show(config(path), out, err=err, clock=Clock()) == 0
    assert show(config(path), out, err=err, clock=Clock(NOON + 86400)) == 1
    # store: auto wants the service's STATE_DIRECTORY, or a path given.
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    auto = TlsRpt(enabled=True, store="auto")
    err = io.StringIO()
    assert show(auto, out, day=DAY, err=err) == 2
    assert "STATE_DIRECTORY" in err.getvalue()
    assert show(auto, out, day=DAY, err=err, store=str(path)) == 0
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    (tmp_path / "tlsrpt.sqlite3").symlink_to(path)
    assert show(auto, out, day=DAY, err=err) == 0

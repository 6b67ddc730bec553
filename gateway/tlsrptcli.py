"""``smtpgate tlsrpt show``: the TLS reports the gateway's counts make, printed.

Reads the store file beside a running gateway, read-only (never creates or writes it), and
prints per policy domain the RFC 8460 JSON report exactly as ``smtpgate tlsrpt send`` would
send it (gateway.tlsrptstore.prepare builds both), pretty-printed, one document after the
other (``jq`` reads such a stream).  Without ``--day`` it shows today (UTC): the counts so
far, which a report covers only once the day is over; ``--day`` yesterday's is what the next
daily send reports.  What a worker counted in its last few seconds (FLUSH_EVERY) is not in
the file yet.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from .tlsrpt import parse_day, utc_day
from .tlsrptstore import Store, command_store, prepare

if TYPE_CHECKING:
    from .config import TlsRpt

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


def show(config: TlsRpt, out: TextIO, *, domain: str | None = None, day: str | None = None,
         err: TextIO | None = None, store: str | None = None,
         clock: Callable[[], float] = time.time) -> int:
    """Prints the reports of ``day`` (YYYY-MM-DD, default today UTC) for every domain, or for
    ``domain`` only, from the file of ``tlsrpt.store`` (``store``: another path).  0: printed;
    1: nothing recorded for that day or domain (or no file yet); 2: bad input."""
    err = sys.stderr if err is None else err
    if day is None:
        day = utc_day(clock())
    elif parse_day(day) is None:
        print(f"smtpgate tlsrpt show: --day {day!r} is not a date YYYY-MM-DD", file=err)
        return 2
    name = None
    if domain is not None:
        name = domain.strip().rstrip(".").lower()
        if not name or not set(name) <= _NAME_CHARS or ".." in name:
            print(f"smtpgate tlsrpt show: --domain {domain!r} is not a domain name (write an "
                  f"internationalized one in A-labels, xn--...)", file=err)
            return 2
    path, why = command_store(config.store, store)
    if path is None:
        print(f"smtpgate tlsrpt show: no store file to read: {why}", file=err)
        return 1 if config.store is None else 2
    return asyncio.run(_show(config, out, err, path, day=day, domain=name))


async def _show(config: TlsRpt, out: TextIO, err: TextIO, path: str, *, day: str,
                domain: str | None) -> int:
    store = Store(config, read_only=True, path=path)
    await store.open()
    try:
        if store.path is None:
            print(f"smtpgate tlsrpt show: nothing to read: {store.problem}", file=err)
            return 1
        domains = await store.domains(day)
        if domain is not None:
            domains = [d for d in domains if d == domain]
        shown = 0
        for name in domains:
            prepared = await prepare(store, config, day, name)
            if prepared is not None:
                out.write(json.dumps(prepared.report, indent=2, ensure_ascii=False) + "\n")
                shown += 1
        dropped = await store.dropped(day)
        if dropped:
            print(f"smtpgate tlsrpt show: {dropped} sessions of {day} not itemized: their "
                  f"domains came past tlsrpt.max_domains ({config.max_domains})", file=err)
        if not shown:
            what = f"for {domain} " if domain is not None else ""
            print(f"smtpgate tlsrpt show: no TLS outcomes recorded {what}on {day} (UTC) in "
                  f"{path}", file=err)
            return 1
        return 0
    finally:
        await store.close()

"""``smtpgate status`` and ``smtpgate reload``: asking the running gateway, over its metrics
endpoint's ``/status`` (gateway.health), what it runs and what it decided.

A SIGHUP alone says nothing back: the old ``ExecReload`` (check the file, then ``kill -HUP``)
succeeded for a reload the gateway then rejected (a port already taken, a worker that could
not bind).  ``reload`` sends the signal and waits for the gateway's own verdict.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from .config import Config, Endpoint

OK, REFUSED, UNUSABLE, UNKNOWN = 0, 1, 2, 3  # exit codes, as `smtpgate check`'s


class NoAnswer(Exception):
    """The endpoint did not answer (the gateway is not running there, or is stuck)."""


def fetch(endpoint: Endpoint, path: str = "/status", timeout: float = 5.0) -> dict[str, Any]:
    conn = http.client.HTTPConnection(str(endpoint.host), endpoint.port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read(1 << 20)
    except (OSError, http.client.HTTPException) as exc:
        raise NoAnswer(f"no answer from http://{endpoint}{path}: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise NoAnswer(f"http://{endpoint}{path}: HTTP {response.status}")
    try:
        found = json.loads(body)
    except ValueError:
        raise NoAnswer(f"http://{endpoint}{path}: not JSON (another program on that port?)"
                       ) from None
    if not isinstance(found, dict) or "pid" not in found:
        raise NoAnswer(f"http://{endpoint}{path}: not smtpgate's status")
    return found


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} days"


def render(st: dict[str, Any]) -> list[str]:
    """The status as lines for a person (``--json`` prints it as it came)."""
    cfg = st["config"]
    lines = [f"smtpgate {st['version']}, pid {st['pid']}: {st['state']} since {st['started']}"
             f" ({_ago(st['uptime_seconds'])})",
             f"config:      {cfg['source']}, loaded {cfg['loaded']} "
             f"({_ago(cfg['age_seconds'])} ago)"]
    last = st.get("last_reload")
    if last is None:
        lines.append("last reload: none since the start")
    else:
        extra = f": {last['error']}" if last.get("error") else ""
        lines.append(f"last reload: {last['result']} at {last['at']}{extra}")
    sessions = ", ".join(f"{d} {n}" for d, n in st.get("sessions", {}).items())
    lines.append(f"sessions:    {sessions}")
    lines.append(f"listeners:   {', '.join(st.get('listeners', [])) or 'none'}")
    dns = st.get("dns")
    if dns is None:
        lines.append("dns:         self-test off (dns.selftest.secure: null) or not run yet")
    else:
        by: dict[str, list[str]] = {}
        for c in dns:
            by.setdefault(c["resolver"], []).append(
                f"{c['check']} {'ok' if c['ok'] else 'FAILED'}")
        for i, (resolver, checks) in enumerate(by.items()):
            lines.append(f"{'dns:' if i == 0 else '':<13}{resolver}: {', '.join(checks)}")
    for w in st.get("workers", []):
        lines.append(f"worker {w['index']}:    pid {w['pid']}, "
                     f"{'up' if w['alive'] else 'DOWN'}")
    problems = st.get("problems", [])
    lines.append("problems:    none" if not problems else "problems:")
    lines += [f"  - {p}" for p in problems]
    return lines


def status(config: Config, show: Callable[[str], None], as_json: bool = False) -> int:
    """Exit 0 when serving without problems, 1 when degraded or draining, 3 when the
    gateway did not answer."""
    if config.metrics.listen is None:
        show(f"smtpgate: {config.source}: metrics.listen is null: status asks the gateway "
             "over that endpoint")
        return UNUSABLE
    try:
        st = fetch(config.metrics.listen)
    except NoAnswer as exc:
        show(f"smtpgate: {exc}")
        return UNKNOWN
    if as_json:
        show(json.dumps(st, indent=1))
    else:
        for line in render(st):
            show(line)
    return OK if st.get("state") == "serving" and not st.get("problems") else REFUSED


def _reloads(st: dict[str, Any]) -> dict[int, int]:
    return {w["index"]: w["reloads"] for w in st.get("workers", [])
            if w["alive"] and w["reloads"] is not None}


def reload(config: Config, show: Callable[[str], None], *, pid: int | None = None,
           timeout: float = 30.0, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> int:
    """SIGHUP to the gateway answering on metrics.listen, then its verdict: exit 0 when it
    reloaded (every worker too), 1 when it rejected the file, 3 when it could not be asked
    or said nothing in time.  The caller has already checked the file."""
    if config.metrics.listen is None:
        if pid is None:
            show(f"smtpgate: {config.source}: metrics.listen is null: give --pid (the "
                 "gateway's verdict cannot be asked; see its log)")
            return UNUSABLE
        os.kill(pid, signal.SIGHUP)
        show(f"SIGHUP sent to {pid}; metrics.listen is null, so no verdict: see the log")
        return OK
    endpoint = config.metrics.listen
    try:
        before = fetch(endpoint)
    except NoAnswer as exc:
        show(f"smtpgate: {exc}")
        return UNKNOWN
    if pid is not None and pid != before["pid"]:
        show(f"smtpgate: the gateway answering on {endpoint} is pid {before['pid']}, "
             f"not {pid}")
        return UNKNOWN
    if before.get("state") == "draining":
        show("smtpgate: the gateway is draining: a reload would be ignored")
        return REFUSED
    workers_before = _reloads(before)
    os.kill(before["pid"], signal.SIGHUP)
    deadline = clock() + timeout
    st = before
    while True:
        try:
            st = fetch(endpoint)
        except NoAnswer:
            pass  # a busy moment: ask again until the deadline
        else:
            decided = st["reloads"] > before["reloads"]
            # Workers read the file once the supervisor passed it on: wait for each.
            now = _reloads(st)
            workers_done = all(now.get(i, n) > n for i, n in workers_before.items())
            if decided and (st["last_reload"]["result"] != "ok" or workers_done):
                break
        if clock() > deadline:
            show(f"smtpgate: no verdict from pid {before['pid']} within {timeout:g} s "
                 "(see its log)")
            return UNKNOWN
        sleep(0.05)
    last = st["last_reload"]
    if last["result"] != "ok":
        show(f"smtpgate: reload rejected: {last['error']}")
        show(f"still running {st['config']['source']} as loaded at {st['config']['loaded']}")
        return REFUSED
    failed = [w for w in st.get("workers", []) if w["alive"] and w["last_reload"]
              and w["last_reload"]["result"] != "ok"]
    for w in failed:
        show(f"smtpgate: worker {w['index']} rejected the reload: "
             f"{w['last_reload'].get('error', '')}")
    if failed:
        return REFUSED
    show(f"reloaded: {st['config']['source']} at {last['at']}")
    return OK

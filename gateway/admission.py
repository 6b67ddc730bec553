"""Pure decisions at accept time: refuse or admit, and what the MTA is told.

No I/O here: the shell gathers the facts (counts, marks, addresses) and carries out the
verdict, so every rule is testable as a plain function call.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Collection
from enum import Enum

from .config import Direction, Endpoint


class Refusal(Enum):
    """Why a connection is refused at accept, with the SMTP greeting the MTA gets.

    A 421 greeting is something every MTA handles: it keeps the mail (4xx) and, for a
    greeting, moves on to the next MX host.
    """

    LIMIT = ("refused_limit", "421 4.3.2 smtpgate: too many sessions, try again later")
    LOOP = ("refused_loop", "421 4.4.6 smtpgate: routing loop: connection to the gateway itself")
    NO_DESTINATION = ("refused_intercept",
                      "421 4.3.0 smtpgate: original destination unknown, not intercepted")

    def __init__(self, outcome: str, text: str) -> None:
        self.outcome = outcome
        self.text = text
        self.reply = text.encode("ascii") + b"\r\n"


def admit(*, active: int, max_sessions: int, direction: Direction, client: Endpoint,
          destination: Endpoint, own_mark: int, client_mark: int,
          own_upstreams: Collection[tuple[str, int]],
          is_gateway: Callable[[Endpoint], bool]) -> Refusal | None:
    """None to admit; otherwise the reason to refuse (A5, A6)."""
    # Our own upstream connection, intercepted again (a missing firewall exemption): it
    # carries our mark, or comes from one of our own upstream sockets.
    if own_mark and client_mark == own_mark:
        return Refusal.LOOP
    if (client.host_text, client.port) in own_upstreams:
        return Refusal.LOOP
    # Not redirected at all, or redirected to ourselves: forwarding would connect to us.
    if direction is Direction.OUTBOUND and is_gateway(destination):
        return Refusal.LOOP
    if active >= max_sessions:
        return Refusal.LIMIT
    return None


_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN,
                errno.EADDRNOTAVAIL}
# This host ran out (open files, socket buffers): not the upstream's fault.
_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def classify_connect_error(exc: BaseException) -> str:
    """Metric label for a failed upstream connect (low cardinality)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return "unreachable"
    if isinstance(exc, OSError) and exc.errno in _RESOURCES:
        return "resources"
    return "error"


def unreachable_reply(reason: str, failure: str = "") -> bytes:
    """The 421 greeting for an upstream that could not be reached.

    RFC 3463 4.4.1 "no answer from host" for every connect failure, except when this host
    ran out of resources (4.3.2 "system not accepting network messages", as for the session
    limit): the peer is not to blame.  The reason goes into the MTA's log and queue, so the
    operator sees why without reading ours.
    """
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in reason)[:400]
    if failure == "resources":
        return f"421 4.3.2 smtpgate: out of local resources: {text}\r\n".encode("ascii")
    return f"421 4.4.1 smtpgate: upstream {text}\r\n".encode("ascii")

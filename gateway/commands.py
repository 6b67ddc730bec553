"""What the SMTP machines ask the shell to do, and how a phase ended.

The outbound ``Upgrade`` (``gateway.upgrade``), the inbound ``Offload`` (``gateway.offload``)
and the envelope tracker (``gateway.envelope``) return lists of these; the shell carries them
out in order.  The commands only one machine gives live with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .policy import Auth


@dataclass(frozen=True, slots=True)
class SendPeer:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class ShutdownPeer:
    """The MTA (or client) closed its sending side and everything it sent before is out:
    half-close toward the peer (FIN; close_notify first on TLS) and keep relaying its replies.

    ``after_quit``: QUIT went out before it.  Then only the FIN goes: a server stops
    reading after QUIT, and a close_notify it never reads turns its close into a reset that
    discards its unsent 221 (and a pipelined 250 with it: a duplicate).  Seen with Postfix."""

    after_quit: bool = False


@dataclass(frozen=True, slots=True)
class ShutdownClient:
    """The peer closed its sending side, its replies are out: half-close toward the MTA."""


@dataclass(frozen=True, slots=True)
class Relay:
    """Handoff: write ``to_peer`` and ``to_client``, then copy bytes both ways."""

    to_peer: bytes
    to_client: bytes


class Result(Enum):
    """How the upgrade (or offload) phase ended (a metric label)."""

    PENDING = "pending"
    DANE = "dane"  # TLS, peer authenticated by DANE
    FINGERPRINT = "fingerprint"  # TLS, peer authenticated by a pinned key
    TLS = "tls"  # TLS, unauthenticated
    END_TO_END = "end_to_end"  # the MTA did STARTTLS itself
    PLAINTEXT = "plaintext"  # opportunistic plan, no TLS to be had
    PASSTHROUGH = "passthrough"  # plan none, or nothing to protect
    DEFERRED = "deferred"  # 4xx to the MTA


def authenticated(auth: Auth) -> Result:
    """The result of a session whose peer proved what ``auth`` asked for."""
    return {Auth.DANE: Result.DANE, Auth.FINGERPRINT: Result.FINGERPRINT}.get(auth, Result.TLS)


# The results where the gateway made the hop TLS itself (END_TO_END is the MTA's own).
ENCRYPTED = frozenset({Result.DANE, Result.FINGERPRINT, Result.TLS})

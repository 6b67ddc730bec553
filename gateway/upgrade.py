"""The outbound upgrade machine, sans I/O: it decides, from bytes alone, when the gateway
performs STARTTLS for the MTA.

Theory of operation.  The MTA's session runs as usual: the peer's banner and the MTA's
EHLO/HELO and its reply pass through unchanged.  The first other command the MTA sends is
the decision point:

* STARTTLS: the MTA encrypts itself.  Its TLS is as good as the gateway's only where the
  plan neither authenticates the peer nor requires TLS: there the gateway steps aside
  (end-to-end TLS).  Where the plan fails closed (DANE, a pin, ``encrypt``, or a doubt to
  defer on) an MTA's unverified opportunistic TLS would bypass the protection, so the
  gateway takes it over (``mta_starttls: terminate``): it does the verified upgrade with
  the peer first, then answers the MTA's STARTTLS itself and terminates its TLS with a local
  key; the MTA greets again over TLS, the peer sees that greeting over the verified TLS.
  With ``mta_starttls: hide`` the EHLO reply the MTA sees has no STARTTLS where the plan
  fails closed (the reply waits for the plan), so the MTA goes on in plaintext on the local
  hop and is upgraded as below.  ``step-aside`` (an MTA that verifies on its own) always
  leaves its STARTTLS alone.
* QUIT: nothing to protect; relay.
* anything else: the MTA goes on without TLS.  The gateway *holds* everything the MTA sends
  from here (pipelined commands included), asks for the plan, and -- when the plan wants TLS --
  speaks to the peer itself: EHLO (only when the MTA said HELO, to learn the capabilities),
  STARTTLS, the handshake (done by the shell), verification (by the shell), the MTA's own
  greeting again over TLS, and only then releases the held bytes.  The peer's replies to the
  gateway's own commands never reach the MTA: it sees exactly the replies it would have seen.

Failures: a plan that requires TLS ends in a 421 to the MTA (it keeps the mail) and nothing
held is ever sent in plaintext.  An opportunistic plan continues in plaintext: on the same
connection when the peer refuses STARTTLS, on a new connection when the handshake fails
(as Postfix's ``may`` level does).

Half-close: either side's EOF is an event (``client_closed``, ``peer_closed``) and is passed
on (ShutdownPeer, ShutdownClient) only after everything that side sent before it: an MTA that
pipelines its last commands and half-closes still gets every reply.  The MTA's EOF while its
commands are held lets the upgrade finish first; the peer's EOF while the gateway speaks to it
ends the upgrade with a 421 (the MTA's held commands would never be answered).

Events in: ``client_data``, ``peer_data``, ``client_closed``, ``peer_closed`` (any state),
and the shell's own: ``plan_ready``, ``tls_done``, ``mta_tls_done``, ``reconnected``,
``reconnect_failed`` (only in the states ``ACCEPTS`` names: anything else is a
``LocalProtocolError``).  Commands out (the shell carries them out, in order): SendPeer,
SendClient, NeedPlan, StartTls, StartTlsMta, Reconnect, Relay, Defer, ShutdownPeer,
ShutdownClient.  Where each state may go: ``TRANSITIONS``, checked on every move; which
method reads a peer reply in each state: ``Upgrade.ON_REPLY``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from .commands import (
    ENCRYPTED,
    Relay,
    Result,
    SendClient,
    SendPeer,
    ShutdownClient,
    ShutdownPeer,
)
from .config import MtaStartTls
from .policy import Action, Plan
from .smtp import (
    LIMITS,
    STARTTLS_READY,
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    ReplyReader,
    capabilities,
    edit_ehlo,
    lost_capabilities,
    verb,
)

# -- the commands only this machine gives (the shared ones: gateway.commands) ---------------


@dataclass(frozen=True, slots=True)
class NeedPlan:
    """Feed ``plan_ready`` when discovery is done (the MTA waits meanwhile)."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """Pause reading the peer, handshake, verify against the plan, then feed ``tls_done``."""


@dataclass(frozen=True, slots=True)
class StartTlsMta:
    """Reply already queued (220): pause reading the MTA, terminate its TLS with the local
    key (server side), then feed ``mta_tls_done``."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Opportunistic fallback: drop this peer connection, open a new plaintext one, feed
    ``reconnected``, then its bytes as ``peer_data``."""

    reason: str


@dataclass(frozen=True, slots=True)
class Defer:
    """Tell the MTA ``reply`` (a 4xx: it keeps the mail), QUIT the peer, close both."""

    reply: bytes
    reason: str


Command = (SendPeer | SendClient | NeedPlan | StartTls | StartTlsMta | Reconnect | Relay
           | Defer | ShutdownPeer | ShutdownClient)


def defer_reply(code: str, text: str) -> bytes:
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:400]
    return f"421 {code} smtpgate: {clean}\r\n".encode("ascii")


class UpgradeState(Enum):
    BANNER = "banner"  # waiting for the peer's greeting
    GREETING = "greeting"  # waiting for the MTA's next command
    GREET_REPLY = "greet_reply"  # the MTA's EHLO/HELO went to the peer
    GREET_PLAN = "greet_plan"  # hide: the EHLO reply waits for the plan
    PLAN = "plan"  # holding; discovery still running
    TAKEOVER_PLAN = "takeover_plan"  # the MTA's STARTTLS waits for the plan
    PROBE = "probe"  # our own EHLO (the MTA said HELO) to learn capabilities
    STARTTLS = "starttls"  # our STARTTLS sent
    HANDSHAKE = "handshake"  # the shell does TLS
    REGREET = "regreet"  # the MTA's greeting again, over TLS (or after our probe)
    MTA_HANDSHAKE = "mta_handshake"  # take-over: the shell terminates the MTA's TLS
    FB_BANNER = "fb_banner"  # fallback connection: its banner
    FB_GREET = "fb_greet"  # fallback connection: the MTA's greeting replayed
    DONE = "done"  # relayed or deferred: bytes are the shell's business


U = UpgradeState

# Where each state may go (DONE, by a relay or a defer, from every state but DONE itself).
# Checked on every move: a move that is not here is a LocalProtocolError.
TRANSITIONS: dict[UpgradeState, frozenset[UpgradeState]] = {
    U.BANNER: frozenset({U.GREETING, U.DONE}),
    U.GREETING: frozenset({U.GREET_REPLY, U.PLAN, U.TAKEOVER_PLAN, U.DONE}),
    U.GREET_REPLY: frozenset({U.GREETING, U.GREET_PLAN, U.DONE}),
    U.GREET_PLAN: frozenset({U.GREETING, U.DONE}),
    U.PLAN: frozenset({U.PROBE, U.STARTTLS, U.DONE}),
    U.TAKEOVER_PLAN: frozenset({U.STARTTLS, U.DONE}),
    U.PROBE: frozenset({U.STARTTLS, U.REGREET, U.DONE}),
    U.STARTTLS: frozenset({U.HANDSHAKE, U.REGREET, U.DONE}),
    U.HANDSHAKE: frozenset({U.REGREET, U.MTA_HANDSHAKE, U.FB_BANNER, U.DONE}),
    U.REGREET: frozenset({U.FB_BANNER, U.DONE}),
    U.MTA_HANDSHAKE: frozenset({U.DONE}),
    U.FB_BANNER: frozenset({U.FB_GREET, U.DONE}),
    U.FB_GREET: frozenset({U.DONE}),
    U.DONE: frozenset(),
}

# The shell's events and the states that accept them.
ACCEPTS: dict[str, frozenset[UpgradeState]] = {
    "plan_ready": frozenset({U.GREET_PLAN, U.PLAN, U.TAKEOVER_PLAN}),
    "tls_done": frozenset({U.HANDSHAKE}),
    "mta_tls_done": frozenset({U.MTA_HANDSHAKE}),
    "reconnected": frozenset({U.FB_BANNER}),
    "reconnect_failed": frozenset({U.FB_BANNER}),
}

# States in which the peer's replies wait (the machine waits for the shell).
_WAITING = (U.PLAN, U.GREET_PLAN, U.TAKEOVER_PLAN, U.MTA_HANDSHAKE)


@dataclass
class Upgrade:
    """The outbound upgrade machine for one session."""

    mta_starttls: MtaStartTls = MtaStartTls.TERMINATE
    limits: Limits = LIMITS
    state: UpgradeState = U.BANNER
    plan: Plan | None = None
    result: Result = Result.PENDING
    reason: str = ""
    greeting: bytes | None = None  # the MTA's EHLO/HELO line that the peer accepted
    greet_verb: str = ""
    shown: dict[str, str] = field(default_factory=dict)  # capabilities the MTA saw
    peer_caps: dict[str, str] = field(default_factory=dict)
    held: bytearray = field(default_factory=bytearray)
    client_eof: bool = False  # the MTA closed its sending side
    takeover: bool = False  # the MTA's STARTTLS is answered by the gateway
    hidden: bool = False  # STARTTLS was withdrawn from the EHLO reply the MTA saw
    _client: bytearray = field(default_factory=bytearray)
    _peer: ReplyReader = field(init=False)
    _pending_greeting: bytes | None = None
    _fallback: bool = False
    _held_reply: Reply | None = None  # hide: the EHLO reply waiting for the plan

    def __post_init__(self) -> None:
        self._peer = ReplyReader(self.limits)

    # -- moves --------------------------------------------------------------------------
    def _go(self, state: UpgradeState) -> None:
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise LocalProtocolError(f"no move from {self.state.value} to {state.value}")
        self.state = state

    def _expect(self, event: str) -> None:
        if self.state not in ACCEPTS[event]:
            raise LocalProtocolError(f"{event} in state {self.state.value}")

    def _at(self, *states: UpgradeState) -> bool:
        # A method, not an inline test: the handlers change self.state behind mypy's back.
        return self.state in states

    # -- events -------------------------------------------------------------------------
    def client_data(self, data: bytes) -> list[Command]:
        if self.takeover and self.state is not U.DONE:
            # Nothing may follow the MTA's STARTTLS before its handshake (A4): it would be
            # read as plaintext, or as the start of its TLS.
            return self._defer("4.7.0", "data pipelined after STARTTLS")
        if self.state in (U.BANNER, U.GREETING, U.GREET_REPLY, U.GREET_PLAN):
            # Commands are read one at a time, after the reply they follow (a client that
            # speaks early is answered in order, as a server would).
            self._client += data
            out = self._client_commands() if self.state is U.GREETING else []
        else:
            # Anything else the MTA sends before the handoff waits (bounded).
            self.held += data
            out = []
        # Checked on what is left once the commands were read: the same outcome however the
        # bytes were cut into reads.
        if self.state is not U.DONE and len(self.held) + len(self._client) > self.limits.held:
            return out + self._defer("4.3.0", "too much held before the TLS upgrade")
        return out

    def peer_data(self, data: bytes) -> list[Command]:
        if self.state is U.HANDSHAKE:
            # The shell stops reading at StartTls: anything still delivered to us came with
            # or right after the 220, in plaintext (A4).
            return self._defer("4.7.0", "data injected after STARTTLS reply")
        self._peer.feed(data)
        if self.state in (U.DONE, *_WAITING):
            if len(self._peer.buffer) > self.limits.held:  # a peer talking while we wait (A5)
                return self._defer("4.3.0", "peer sent too much unasked")
            return []  # unsolicited: kept in order for the next reply or the handoff
        out: list[Command] = []
        try:
            # In PLAN the peer's replies wait, as they do when they arrive there.
            while not self._at(U.DONE, U.HANDSHAKE, *_WAITING) and (r := self._peer.next()):
                out += self.ON_REPLY[self.state](self, r)
                if self._at(U.HANDSHAKE) and self._peer.buffer:
                    # A4: bytes after the 220 to STARTTLS, before the handshake: injected.
                    return [*out[:-1], *self._defer("4.7.0", "data injected after STARTTLS "
                                                    "reply")]
        except RemoteProtocolError as exc:
            return out + self._defer("4.4.2" if self.state is U.BANNER else "4.7.0",
                                     f"peer protocol error: {exc}")
        if self._at(*_WAITING) and len(self._peer.buffer) > self.limits.held:
            return out + self._defer("4.3.0", "peer sent too much unasked")
        return out

    def client_closed(self) -> list[Command]:
        """The MTA's EOF: no command comes after what it sent.  Held commands are still
        carried through the upgrade; the EOF follows them (``Relay`` then ShutdownPeer)."""
        if self.client_eof or self.state is U.DONE:
            return []
        self.client_eof = True
        return self._client_commands() if self.state is U.GREETING else []

    def peer_closed(self) -> list[Command]:
        """The peer's EOF: it says nothing more on this connection."""
        if self.state is U.DONE:
            return []
        if self.state in (U.BANNER, U.GREETING, U.GREET_REPLY):
            # Its replies so far went to the MTA as they came: the MTA sees the EOF next.
            return [*self._relay(Result.PASSTHROUGH, "peer closed"), ShutdownClient()]
        return self._defer("4.4.2", "peer closed the connection during the TLS upgrade")

    def plan_ready(self, plan: Plan) -> list[Command]:
        self._expect("plan_ready")
        if self.state is U.GREET_PLAN:
            return self._greet_planned(plan)
        if self.state is U.TAKEOVER_PLAN:
            return self._takeover_planned(plan)
        self.plan = plan
        if plan.action is Action.PASSTHROUGH:
            return self._relay(Result.PASSTHROUGH, "policy: no TLS")
        if plan.action is Action.DEFER:
            return self._defer("4.7.5", plan.reason)
        if self.greet_verb != "EHLO":
            # The MTA said HELO (or nothing): learn the capabilities ourselves.
            self._go(U.PROBE)
            name = self._greet_name() or "localhost"
            return [SendPeer(f"EHLO {name}\r\n".encode())]
        return self._try_starttls()

    def tls_done(self, ok: bool, result: Result, reason: str,
                 code: str = "4.7.5") -> list[Command]:
        """The shell's handshake and verification outcome (``code``: RFC 3463 status for a
        failure, 4.7.5 "cryptographic failure" by default)."""
        self._expect("tls_done")
        assert self.plan is not None
        if not ok:
            if self.plan.action is Action.TRY_TLS:
                return self._reconnect(f"TLS failed: {reason}")
            return self._defer(code, f"TLS to peer failed: {reason}")
        self.result, self.reason = result, reason
        if self.takeover:
            # The peer is verified: now the MTA's STARTTLS gets its 220, and the MTA greets
            # again over TLS, which the peer (over its TLS) expects anyway.
            self._go(U.MTA_HANDSHAKE)
            return [SendClient(STARTTLS_READY), StartTlsMta()]
        if self.greeting is None:
            return self._relay(result, reason)
        self._go(U.REGREET)
        return [SendPeer(self.greeting)]

    def mta_tls_done(self, ok: bool, reason: str) -> list[Command]:
        """The shell's outcome of terminating the MTA's TLS (take-over)."""
        self._expect("mta_tls_done")
        if not ok:
            # Nothing can be said on a broken TLS layer: a close, and the MTA retries.
            self._go(U.DONE)
            self.result = Result.DEFERRED
            self.reason = f"the MTA's TLS with the gateway failed: {reason}"
            return [Defer(b"", self.reason)]
        return self._relay(self.result, self.reason)

    def reconnect_failed(self, why: str) -> list[Command]:
        """The fallback connection could not be made."""
        self._expect("reconnect_failed")
        return self._defer("4.4.1", f"fallback connection failed: {why}")

    def reconnected(self) -> list[Command]:
        self._expect("reconnected")
        self._peer = ReplyReader(self.limits)
        self._fallback = True
        return []

    # -- client side --------------------------------------------------------------------
    def _client_commands(self) -> list[Command]:
        out: list[Command] = []
        while self.state is U.GREETING:
            end = self._client.find(b"\n")
            if (end if end >= 0 else len(self._client)) > self.limits.line:
                return out + self._defer("4.3.0", "command line too long")
            if end < 0:
                break
            line = bytes(self._client[:end + 1])
            word = verb(line)
            if word in (b"EHLO", b"HELO"):
                del self._client[:end + 1]
                self._pending_greeting = line
                self._go(U.GREET_REPLY)
                out.append(SendPeer(line))
                continue
            # The decision point: this line and everything after it.
            rest = bytes(self._client)
            self._client.clear()
            self.held += rest
            if word == b"STARTTLS" and self.mta_starttls is not MtaStartTls.STEP_ASIDE:
                # Whether its own TLS is good enough depends on the plan.
                self._go(U.TAKEOVER_PLAN)
                return [*out, NeedPlan()]
            if word == b"STARTTLS":
                return out + self._relay(Result.END_TO_END, "the MTA does TLS itself")
            if word == b"QUIT":
                return out + self._relay(Result.PASSTHROUGH, "QUIT")
            self._go(U.PLAN)
            return [*out, NeedPlan()]
        if self.state is U.GREETING and self.client_eof:
            # Nothing more will come: an unterminated line at the end is no command (a
            # server drops it too), so there is nothing to protect.
            self._client.clear()
            return out + self._relay(Result.PASSTHROUGH, "the MTA closed")
        return out

    def _greet_name(self) -> str:
        if self.greeting is None:
            return ""
        parts = self.greeting.split(None, 1)
        return parts[1].strip().decode("ascii", "replace") if len(parts) > 1 else ""

    # -- peer replies, one method per state (ON_REPLY) -----------------------------------
    def _idle_reply(self, r: Reply) -> list[Command]:
        """GREETING: the MTA has not said its next command, so nothing was asked."""
        if r.code != 421:
            # Only a 421 comes unasked (RFC 5321 3.8).  Anything else the MTA would take
            # as the reply to its next command, which we may send over TLS: a plaintext
            # response that crosses STARTTLS in the MTA's own buffer (A4).
            raise RemoteProtocolError(f"unsolicited reply {r.code}")
        return [SendClient(r.raw)]  # an idle 421: the MTA must see it

    def _banner_reply(self, r: Reply) -> list[Command]:
        if r.code != 220:
            # The peer refuses us (554/421): let the MTA see it; nothing to upgrade.
            return [SendClient(r.raw), *self._relay(Result.PASSTHROUGH,
                                                    f"peer greeting {r.code}")]
        self._go(U.GREETING)
        return [SendClient(r.raw), *self._client_commands()]

    def _greet_reply(self, r: Reply) -> list[Command]:
        line = self._pending_greeting or b""
        word = verb(line).decode()
        if r.code == 250:
            self.greeting, self.greet_verb = line, word
            if word == "EHLO":
                self.shown = self.peer_caps = capabilities(r)
                if self.mta_starttls is MtaStartTls.HIDE and "STARTTLS" in self.shown:
                    # Whether the MTA may see STARTTLS depends on the plan.
                    self._held_reply = r
                    self._go(U.GREET_PLAN)
                    return [NeedPlan()]
            else:
                self.shown = {}
        self._go(U.GREETING)
        return [SendClient(r.raw), *self._client_commands()]

    def _probe_reply(self, r: Reply) -> list[Command]:
        if r.code != 250:
            return self._no_tls(f"peer refused EHLO ({r.code})")
        self.peer_caps = capabilities(r)
        return self._try_starttls()

    def _starttls_reply(self, r: Reply) -> list[Command]:
        if r.code != 220:
            return self._no_tls(f"peer answered STARTTLS with {r.code}")
        self._go(U.HANDSHAKE)
        return [StartTls()]

    def _regreet_reply(self, r: Reply) -> list[Command]:
        if r.code != 250:
            return self._after_tls_failure(f"peer refused {self.greet_verb} after TLS "
                                           f"({r.code})")
        if self.greet_verb == "EHLO":
            lost = lost_capabilities(self.shown, capabilities(r))
            if lost:
                return self._after_tls_failure(f"peer dropped {', '.join(lost)} after TLS")
        return self._relay(self.result, self.reason)

    def _fallback_banner_reply(self, r: Reply) -> list[Command]:
        if r.code != 220:
            return self._defer("4.4.2", f"fallback connection greeted {r.code}")
        if self.greeting is None:
            return self._relay(Result.PLAINTEXT, self.reason)
        self._go(U.FB_GREET)
        return [SendPeer(self.greeting)]

    def _fallback_greet_reply(self, r: Reply) -> list[Command]:
        if r.code != 250:
            return self._defer("4.4.2", f"fallback connection refused the greeting "
                                        f"({r.code})")
        if self.greet_verb == "EHLO" and lost_capabilities(self.shown, capabilities(r)):
            return self._defer("4.4.2", "fallback connection offers less than shown")
        return self._relay(Result.PLAINTEXT, self.reason)

    # Which method reads a peer reply in each state; the states not named here never read
    # one (the shell's turn, or DONE), so peer_data leaves the replies in the buffer there.
    ON_REPLY: ClassVar[dict[UpgradeState, Callable[[Upgrade, Reply], list[Command]]]] = {
        U.GREETING: _idle_reply,
        U.BANNER: _banner_reply,
        U.GREET_REPLY: _greet_reply,
        U.PROBE: _probe_reply,
        U.STARTTLS: _starttls_reply,
        U.REGREET: _regreet_reply,
        U.FB_BANNER: _fallback_banner_reply,
        U.FB_GREET: _fallback_greet_reply,
    }

    # -- decisions ----------------------------------------------------------------------
    def _greet_planned(self, plan: Plan) -> list[Command]:
        """hide: the EHLO reply, without STARTTLS where the plan fails closed."""
        reply, self._held_reply = self._held_reply, None
        assert reply is not None
        self._go(U.GREETING)
        if plan.fails_closed:
            self.hidden = True
            self.shown = {k: v for k, v in self.shown.items() if k != "STARTTLS"}
            return [SendClient(edit_ehlo(reply, starttls=False)), *self._client_commands()]
        return [SendClient(reply.raw), *self._client_commands()]

    def _takeover_planned(self, plan: Plan) -> list[Command]:
        """The MTA said STARTTLS: step aside, or take it over where the plan fails closed."""
        self.plan = plan
        if not plan.fails_closed:
            return self._relay(Result.END_TO_END, "the MTA does TLS itself")
        if plan.action is Action.DEFER:
            return self._defer("4.7.5", plan.reason)
        if bytes(self.held).count(b"\n") != 1 or not self.held.endswith(b"\n"):
            return self._defer("4.7.0", "data pipelined after STARTTLS")  # A4
        self.held.clear()
        self.takeover = True
        return self._try_starttls()

    def _try_starttls(self) -> list[Command]:
        if "STARTTLS" not in self.peer_caps:
            return self._no_tls("peer does not offer STARTTLS")
        self._go(U.STARTTLS)
        return [SendPeer(b"STARTTLS\r\n")]

    def _no_tls(self, why: str) -> list[Command]:
        """STARTTLS not to be had on this connection, which is still clean plaintext."""
        assert self.plan is not None
        if self.plan.action is Action.TRY_TLS:
            if self.greet_verb != "EHLO" and self.greeting is not None:
                # Our probing EHLO replaced the MTA's HELO state at the peer (whether
                # STARTTLS was then missing or refused): say the MTA's HELO again.
                self._go(U.REGREET)
                self.result, self.reason = Result.PLAINTEXT, why
                return [SendPeer(self.greeting)]
            return self._relay(Result.PLAINTEXT, why)
        return self._defer("4.7.4" if "STARTTLS" in why else "4.7.0",
                           f"TLS required but {why}")

    def _after_tls_failure(self, why: str) -> list[Command]:
        assert self.plan is not None
        if self.plan.action is Action.TRY_TLS:
            return self._reconnect(why)
        return self._defer("4.7.0", why)

    def _reconnect(self, why: str) -> list[Command]:
        if self._fallback:
            return self._defer("4.4.2", why)
        # What the old connection still said is not the new one's banner.
        self._peer.buffer.clear()
        self.reason = why
        self._go(U.FB_BANNER)
        return [Reconnect(why)]

    def _relay(self, result: Result, why: str) -> list[Command]:
        self._go(U.DONE)
        self.result, self.reason = result, why
        to_peer = bytes(self.held) + bytes(self._client)
        self.held.clear()
        self._client.clear()
        leftover = bytes(self._peer.buffer)
        self._peer.buffer.clear()
        return [Relay(to_peer, leftover), *([ShutdownPeer()] if self.client_eof else [])]

    def _defer(self, code: str, why: str) -> list[Command]:
        self._go(U.DONE)
        self.result, self.reason = Result.DEFERRED, why
        self.held.clear()  # never sent: nothing of the mail crosses (A3)
        return [Defer(defer_reply(code, why), why)]


def mta_starttls(machine: Upgrade) -> str:
    """What became of the MTA's own STARTTLS, for the session line and the metric ("" when
    the MTA never used or saw one)."""
    if machine.takeover and machine.result in ENCRYPTED and machine.state is U.DONE:
        return "terminated"
    if machine.hidden:
        return "hidden"
    if machine.result is Result.END_TO_END:
        return "stepped_aside"
    return ""


def reason_label(result: Result, reason: str) -> str:
    """A closed vocabulary for metrics from the free-text reason (logs keep the text)."""
    if result in ENCRYPTED or result is Result.END_TO_END:
        return "none"
    text = reason.lower()
    for needle, label in (("injected", "injection"), ("pipelined after starttls", "injection"),
                          ("does not offer", "not_offered"),
                          ("answered starttls", "starttls_refused"), ("dropped", "capabilities"),
                          ("fallback", "fallback"), ("handshake", "handshake"),
                          ("tls to peer failed", "verify"), ("dns", "dns"),
                          ("policy", "policy"), ("protocol", "protocol")):
        if needle in text:
            return label
    return "other"

"""Sans-I/O SMTP for the outbound upgrade: reply framing, EHLO capabilities, and the machine
that decides, from bytes alone, when the gateway performs STARTTLS for the MTA.

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

Events in: ``client_data``, ``peer_data``, ``plan_ready``, ``tls_done``, ``reconnected``,
``client_closed``, ``peer_closed``.
Commands out (the shell carries them out, in order): SendPeer, SendClient, NeedPlan,
StartTls, Reconnect, Relay, Defer, ShutdownPeer, ShutdownClient.  Which input each state
accepts: ``_STATES`` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .config import MtaStartTls
from .policy import Action, Auth, Plan

MAX_LINE = 4096  # RFC 5321 says 512 for replies and commands; be lenient, but bounded
MAX_REPLY_LINES = 200
MAX_HELD = 64 * 1024  # commands held during the upgrade (no message content can be held)
STARTTLS_READY = b"220 2.0.0 Ready to start TLS\r\n"  # the gateway's own, to a STARTTLS

# Extensions whose absence after TLS would make the MTA's commands fail (5xx: a bounce):
# the MTA decided on them from the capabilities it was shown before TLS.
MATTERS = ("PIPELINING", "CHUNKING", "BINARYMIME", "8BITMIME", "SMTPUTF8", "DSN", "SIZE",
           "REQUIRETLS")


class ProtocolError(Exception):
    """The *peer* (or the MTA) broke SMTP framing: their fault, not ours."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[bytes, ...]  # text after "ddd-" / "ddd "
    raw: bytes

    @property
    def text(self) -> str:
        return " / ".join(line.decode("ascii", "replace") for line in self.lines)


class ReplyReader:
    """Frames multi-line replies (RFC 5321 4.2.1) from a byte stream."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._lines: list[bytes] = []
        self._raw = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next(self) -> Reply | None:
        while True:
            end = self.buffer.find(b"\n")
            # The bound holds however the line was cut into reads (with its end or not).
            if (end if end >= 0 else len(self.buffer)) > MAX_LINE:
                raise ProtocolError("reply line too long")
            if end < 0:
                return None
            line = bytes(self.buffer[:end + 1])
            del self.buffer[:end + 1]
            body = line.rstrip(b"\r\n")
            if len(body) < 3 or not body[:3].isdigit() or body[3:4] not in (b"", b" ", b"-"):
                raise ProtocolError(f"malformed reply line {body[:40]!r}")
            if self._lines and int(body[:3]) != int(self._raw[:3]):
                raise ProtocolError("reply code changed inside a multi-line reply")
            self._raw += line
            self._lines.append(body[4:])
            if len(self._lines) > MAX_REPLY_LINES:
                raise ProtocolError("reply has too many lines")
            if body[3:4] != b"-":
                reply = Reply(int(body[:3]), tuple(self._lines), bytes(self._raw))
                self._lines, self._raw = [], bytearray()
                return reply


def capabilities(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) → their parameters; the first line is the greeting."""
    caps: dict[str, str] = {}
    for line in reply.lines[1:]:
        word, _, params = line.decode("ascii", "replace").strip().partition(" ")
        if word:
            caps[word.upper()] = params.strip()
    return caps


def lost_capabilities(shown: dict[str, str], now: dict[str, str]) -> list[str]:
    """What the MTA was promised before TLS that the peer no longer offers after it."""
    lost = [k for k in MATTERS if k in shown and k not in now]
    if "SIZE" in shown and "SIZE" in now:
        before, after = _size(shown["SIZE"]), _size(now["SIZE"])
        if after and (before == 0 or after < before):
            lost.append("SIZE")  # a message the MTA may send would now be refused
    return lost


def _size(value: str) -> int:
    """SIZE parameter; 0 when no limit is stated (RFC 1870)."""
    return int(value) if value.isdigit() else 0


# -- commands to the shell ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SendPeer:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class ShutdownPeer:
    """The MTA closed its sending side and everything it sent before is out: half-close
    toward the peer (FIN; close_notify first on TLS) and keep relaying its replies.

    ``after_quit``: QUIT went out before it.  Then only the FIN goes: a server stops
    reading after QUIT, and a close_notify it never reads turns its close into a reset that
    discards its unsent 221 (and a pipelined 250 with it: a duplicate).  Seen with Postfix."""

    after_quit: bool = False


@dataclass(frozen=True, slots=True)
class ShutdownClient:
    """The peer closed its sending side, its replies are out: half-close toward the MTA."""


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
class Relay:
    """Handoff: write ``to_peer`` and ``to_client``, then copy bytes both ways."""

    to_peer: bytes
    to_client: bytes


@dataclass(frozen=True, slots=True)
class Defer:
    """Tell the MTA ``reply`` (a 4xx: it keeps the mail), QUIT the peer, close both."""

    reply: bytes
    reason: str


Command = (SendPeer | SendClient | NeedPlan | StartTls | StartTlsMta | Reconnect | Relay
           | Defer | ShutdownPeer | ShutdownClient)


class Result(Enum):
    """How the upgrade phase ended (a metric label)."""

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


def defer_reply(code: str, text: str) -> bytes:
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:400]
    return f"421 {code} smtpgate: {clean}\r\n".encode("ascii")


class S(Enum):
    BANNER = "banner"  # waiting for the peer's greeting
    GREETING = "greeting"  # waiting for the MTA's next command
    GREET_REPLY = "greet_reply"  # the MTA's EHLO/HELO went to the peer
    GREET_PLAN = "greet_plan"  # hide: the EHLO reply waits for the plan
    PLAN = "plan"  # holding; discovery still running
    TAKEOVER_PLAN = "takeover_plan"  # the MTA's STARTTLS waits for the plan
    PROBE = "probe"  # our own EHLO (the MTA said HELO) to learn capabilities
    STARTTLS = "starttls"  # our STARTTLS sent
    HANDSHAKE = "handshake"  # the shell does TLS
    REGREET = "regreet"  # the MTA's greeting again, over TLS
    MTA_HANDSHAKE = "mta_handshake"  # take-over: the shell terminates the MTA's TLS
    FB_BANNER = "fb_banner"  # fallback connection: its banner
    FB_GREET = "fb_greet"  # fallback connection: the MTA's greeting replayed
    DONE = "done"


# Which input each state accepts (the rest is a protocol error or a shell bug).
_STATES: dict[S, str] = {
    S.BANNER: "peer reply",
    S.GREETING: "client command",
    S.GREET_REPLY: "peer reply",
    S.GREET_PLAN: "plan_ready",
    S.PLAN: "plan_ready",
    S.TAKEOVER_PLAN: "plan_ready",
    S.PROBE: "peer reply",
    S.STARTTLS: "peer reply",
    S.HANDSHAKE: "tls_done",
    S.REGREET: "peer reply",
    S.MTA_HANDSHAKE: "mta_tls_done",
    S.FB_BANNER: "peer reply (after reconnected)",
    S.FB_GREET: "peer reply",
    S.DONE: "nothing: bytes are relayed by the shell",
}


@dataclass
class Upgrade:
    """The outbound upgrade machine for one session."""

    mta_starttls: MtaStartTls = MtaStartTls.TERMINATE
    state: S = S.BANNER
    plan: Plan | None = None
    result: Result = Result.PENDING
    reason: str = ""
    greeting: bytes | None = None  # the MTA's EHLO/HELO line that the peer accepted
    greet_verb: str = ""
    shown: dict[str, str] = field(default_factory=dict)  # capabilities the MTA saw
    peer_caps: dict[str, str] = field(default_factory=dict)
    held: bytearray = field(default_factory=bytearray)
    _client: bytearray = field(default_factory=bytearray)
    _peer: ReplyReader = field(default_factory=ReplyReader)
    _pending_greeting: bytes | None = None
    _fallback: bool = False
    client_eof: bool = False  # the MTA closed its sending side
    takeover: bool = False  # the MTA's STARTTLS is answered by the gateway
    hidden: bool = False  # STARTTLS was withdrawn from the EHLO reply the MTA saw
    _held_reply: Reply | None = None  # hide: the EHLO reply waiting for the plan

    # -- events -------------------------------------------------------------------------
    def client_data(self, data: bytes) -> list[Command]:
        if self.takeover and self.state is not S.DONE:
            # Nothing may follow the MTA's STARTTLS before its handshake (A4): it would be
            # read as plaintext, or as the start of its TLS.
            return self._defer("4.7.0", "data pipelined after STARTTLS")
        if self.state in (S.BANNER, S.GREETING, S.GREET_REPLY, S.GREET_PLAN):
            # Commands are read one at a time, after the reply they follow (a client that
            # speaks early is answered in order, as a server would).
            self._client += data
            out = self._client_commands() if self.state is S.GREETING else []
        else:
            # Anything else the MTA sends before the handoff waits (bounded).
            self.held += data
            out = []
        # Checked on what is left once the commands were read: the same outcome however the
        # bytes were cut into reads.
        if self.state is not S.DONE and len(self.held) + len(self._client) > MAX_HELD:
            return out + self._defer("4.3.0", "too much held before the TLS upgrade")
        return out

    def peer_data(self, data: bytes) -> list[Command]:
        if self.state is S.HANDSHAKE:
            # The shell stops reading at StartTls: anything still delivered to us came with
            # or right after the 220, in plaintext (A4).
            return self._defer("4.7.0", "data injected after STARTTLS reply")
        self._peer.feed(data)
        if self.state in (S.DONE, *_WAITING):
            if len(self._peer.buffer) > MAX_HELD:  # a peer talking while we wait (A5)
                return self._defer("4.3.0", "peer sent too much unasked")
            return []  # unsolicited: kept in order for the next reply or the handoff
        out: list[Command] = []
        try:
            # In PLAN the peer's replies wait, as they do when they arrive there.
            while not self._at(S.DONE, S.HANDSHAKE, *_WAITING) and (r := self._peer.next()):
                out += self._on_reply(r)
                if self._at(S.HANDSHAKE) and self._peer.buffer:
                    # A4: bytes after the 220 to STARTTLS, before the handshake: injected.
                    return [*out[:-1], *self._defer("4.7.0", "data injected after STARTTLS "
                                                    "reply")]
        except ProtocolError as exc:
            return out + self._defer("4.4.2" if self.state is S.BANNER else "4.7.0",
                                     f"peer protocol error: {exc}")
        if self._at(*_WAITING) and len(self._peer.buffer) > MAX_HELD:
            return out + self._defer("4.3.0", "peer sent too much unasked")
        return out

    def client_closed(self) -> list[Command]:
        """The MTA's EOF: no command comes after what it sent.  Held commands are still
        carried through the upgrade; the EOF follows them (``Relay`` then ShutdownPeer)."""
        if self.client_eof or self.state is S.DONE:
            return []
        self.client_eof = True
        return self._client_commands() if self.state is S.GREETING else []

    def peer_closed(self) -> list[Command]:
        """The peer's EOF: it says nothing more on this connection."""
        if self.state is S.DONE:
            return []
        if self.state in (S.BANNER, S.GREETING, S.GREET_REPLY):
            # Its replies so far went to the MTA as they came: the MTA sees the EOF next.
            return [*self._relay(Result.PASSTHROUGH, "peer closed"), ShutdownClient()]
        return self._defer("4.4.2", "peer closed the connection during the TLS upgrade")

    def _at(self, *states: S) -> bool:
        # A method, not an inline test: the handlers change self.state behind mypy's back.
        return self.state in states

    def plan_ready(self, plan: Plan) -> list[Command]:
        if self.state is S.GREET_PLAN:
            return self._greet_planned(plan)
        if self.state is S.TAKEOVER_PLAN:
            return self._takeover_planned(plan)
        assert self.state is S.PLAN, self.state
        self.plan = plan
        if plan.action is Action.PASSTHROUGH:
            return self._relay(Result.PASSTHROUGH, "policy: no TLS")
        if plan.action is Action.DEFER:
            return self._defer("4.7.5", plan.reason)
        if self.greet_verb != "EHLO":
            # The MTA said HELO (or nothing): learn the capabilities ourselves.
            self.state = S.PROBE
            name = self._greet_name() or "localhost"
            return [SendPeer(f"EHLO {name}\r\n".encode())]
        return self._try_starttls()

    def tls_done(self, ok: bool, result: Result, reason: str,
                 code: str = "4.7.5") -> list[Command]:
        """The shell's handshake and verification outcome (``code``: RFC 3463 status for a
        failure, 4.7.5 "cryptographic failure" by default)."""
        assert self.state is S.HANDSHAKE, self.state
        assert self.plan is not None
        if not ok:
            if self.plan.action is Action.TRY_TLS:
                return self._reconnect(f"TLS failed: {reason}")
            return self._defer(code, f"TLS to peer failed: {reason}")
        self.result, self.reason = result, reason
        if self.takeover:
            # The peer is verified: now the MTA's STARTTLS gets its 220, and the MTA greets
            # again over TLS, which the peer (over its TLS) expects anyway.
            self.state = S.MTA_HANDSHAKE
            return [SendClient(STARTTLS_READY), StartTlsMta()]
        if self.greeting is None:
            return self._relay(result, reason)
        self.state = S.REGREET
        return [SendPeer(self.greeting)]

    def mta_tls_done(self, ok: bool, reason: str) -> list[Command]:
        """The shell's outcome of terminating the MTA's TLS (take-over)."""
        assert self.state is S.MTA_HANDSHAKE, self.state
        if not ok:
            # Nothing can be said on a broken TLS layer: a close, and the MTA retries.
            self.state, self.result = S.DONE, Result.DEFERRED
            self.reason = f"the MTA's TLS with the gateway failed: {reason}"
            return [Defer(b"", self.reason)]
        return self._relay(self.result, self.reason)

    def reconnect_failed(self, why: str) -> list[Command]:
        """The fallback connection could not be made."""
        return self._defer("4.4.1", f"fallback connection failed: {why}")

    def reconnected(self) -> list[Command]:
        self._peer = ReplyReader()
        self._fallback = True
        self.state = S.FB_BANNER
        return []

    # -- client side --------------------------------------------------------------------
    def _client_commands(self) -> list[Command]:
        out: list[Command] = []
        while self.state is S.GREETING:
            end = self._client.find(b"\n")
            if (end if end >= 0 else len(self._client)) > MAX_LINE:
                return out + self._defer("4.3.0", "command line too long")
            if end < 0:
                break
            line = bytes(self._client[:end + 1])
            verb = line.split(None, 1)[0].upper() if line.strip() else b""
            if verb in (b"EHLO", b"HELO"):
                del self._client[:end + 1]
                self._pending_greeting = line
                self.state = S.GREET_REPLY
                out.append(SendPeer(line))
                continue
            # The decision point: this line and everything after it.
            rest = bytes(self._client)
            self._client.clear()
            if verb == b"STARTTLS" and self.mta_starttls is not MtaStartTls.STEP_ASIDE:
                # Whether its own TLS is good enough depends on the plan.
                self.held += rest
                self.state = S.TAKEOVER_PLAN
                return [*out, NeedPlan()]
            if verb in (b"STARTTLS", b"QUIT"):
                why = "the MTA does TLS itself" if verb == b"STARTTLS" else "QUIT"
                result = Result.END_TO_END if verb == b"STARTTLS" else Result.PASSTHROUGH
                self.held += rest
                return out + self._relay(result, why)
            self.held += rest
            self.state = S.PLAN
            return [*out, NeedPlan()]
        if self.state is S.GREETING and self.client_eof:
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

    # -- peer replies -------------------------------------------------------------------
    def _on_reply(self, r: Reply) -> list[Command]:
        st = self.state
        if st is S.GREETING:
            if r.code != 421:
                # Only a 421 comes unasked (RFC 5321 3.8).  Anything else the MTA would take
                # as the reply to its next command, which we may send over TLS: a plaintext
                # response that crosses STARTTLS in the MTA's own buffer (A4).
                raise ProtocolError(f"unsolicited reply {r.code}")
            return [SendClient(r.raw)]  # an idle 421: the MTA must see it
        if st is S.BANNER:
            if r.code != 220:
                # The peer refuses us (554/421): let the MTA see it; nothing to upgrade.
                return [SendClient(r.raw), *self._relay(Result.PASSTHROUGH,
                                                        f"peer greeting {r.code}")]
            self.state = S.GREETING
            return [SendClient(r.raw), *self._client_commands()]
        if st is S.GREET_REPLY:
            line = self._pending_greeting or b""
            verb = line.split(None, 1)[0].upper().decode() if line.strip() else ""
            if r.code == 250:
                self.greeting, self.greet_verb = line, verb
                if verb == "EHLO":
                    self.shown = self.peer_caps = capabilities(r)
                    if self.mta_starttls is MtaStartTls.HIDE and "STARTTLS" in self.shown:
                        # Whether the MTA may see STARTTLS depends on the plan.
                        self._held_reply = r
                        self.state = S.GREET_PLAN
                        return [NeedPlan()]
                else:
                    self.shown = {}
            self.state = S.GREETING
            return [SendClient(r.raw), *self._client_commands()]
        if st is S.PROBE:
            if r.code != 250:
                return self._no_tls(f"peer refused EHLO ({r.code})")
            self.peer_caps = capabilities(r)
            return self._try_starttls()
        if st is S.STARTTLS:
            if r.code != 220:
                return self._no_tls(f"peer answered STARTTLS with {r.code}")
            self.state = S.HANDSHAKE
            return [StartTls()]
        if st is S.REGREET:
            if r.code != 250:
                return self._after_tls_failure(f"peer refused {self.greet_verb} after TLS "
                                               f"({r.code})")
            if self.greet_verb == "EHLO":
                lost = lost_capabilities(self.shown, capabilities(r))
                if lost:
                    return self._after_tls_failure(
                        f"peer dropped {', '.join(lost)} after TLS")
            return self._relay(self.result, self.reason)
        if st is S.FB_BANNER:
            if r.code != 220:
                return self._defer("4.4.2", f"fallback connection greeted {r.code}")
            if self.greeting is None:
                return self._relay(Result.PLAINTEXT, self.reason)
            self.state = S.FB_GREET
            return [SendPeer(self.greeting)]
        if st is S.FB_GREET:
            if r.code != 250:
                return self._defer("4.4.2", f"fallback connection refused the greeting "
                                            f"({r.code})")
            if self.greet_verb == "EHLO" and lost_capabilities(self.shown, capabilities(r)):
                return self._defer("4.4.2", "fallback connection offers less than shown")
            return self._relay(Result.PLAINTEXT, self.reason)
        raise ProtocolError(f"unexpected reply {r.code} in state {st.value}")

    # -- decisions ----------------------------------------------------------------------
    def _greet_planned(self, plan: Plan) -> list[Command]:
        """hide: the EHLO reply, without STARTTLS where the plan fails closed."""
        reply, self._held_reply = self._held_reply, None
        assert reply is not None
        self.state = S.GREETING
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
        self.state = S.STARTTLS
        return [SendPeer(b"STARTTLS\r\n")]

    def _no_tls(self, why: str) -> list[Command]:
        """STARTTLS not to be had on this connection, which is still clean plaintext."""
        assert self.plan is not None
        if self.plan.action is Action.TRY_TLS:
            if self.greet_verb != "EHLO" and self.greeting is not None:
                # Our probing EHLO replaced the MTA's HELO state at the peer (whether
                # STARTTLS was then missing or refused): say the MTA's HELO again.
                self.state = S.REGREET
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
        self.state = S.FB_BANNER
        return [Reconnect(why)]

    def _relay(self, result: Result, why: str) -> list[Command]:
        self.state = S.DONE
        self.result, self.reason = result, why
        to_peer = bytes(self.held) + bytes(self._client)
        self.held.clear()
        self._client.clear()
        leftover = bytes(self._peer.buffer)
        self._peer.buffer.clear()
        return [Relay(to_peer, leftover), *([ShutdownPeer()] if self.client_eof else [])]

    def _defer(self, code: str, why: str) -> list[Command]:
        self.state = S.DONE
        self.result, self.reason = Result.DEFERRED, why
        self.held.clear()  # never sent: nothing of the mail crosses (A3)
        return [Defer(defer_reply(code, why), why)]


def mta_starttls(machine: Upgrade) -> str:
    """What became of the MTA's own STARTTLS, for the session line and the metric ("" when
    the MTA never used or saw one)."""
    if machine.takeover and machine.result in ENCRYPTED and machine.state is S.DONE:
        return "terminated"
    if machine.hidden:
        return "hidden"
    if machine.result is Result.END_TO_END:
        return "stepped_aside"
    return ""


# States in which the peer's replies wait (the machine waits for the shell).
_WAITING = (S.PLAN, S.GREET_PLAN, S.TAKEOVER_PLAN, S.MTA_HANDSHAKE)


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


# -- inbound: STARTTLS offload for a legacy receiving MTA -------------------------------------

MTA_UNASKED = "MTA sent a reply nobody asked for"


def take_line(buffer: bytearray) -> bytes | None:
    """The next complete line (with its ending) from ``buffer``, or None; bounded."""
    end = buffer.find(b"\n")
    if (end if end >= 0 else len(buffer)) > MAX_LINE:
        raise ProtocolError("command line too long")
    if end < 0:
        return None
    line = bytes(buffer[:end + 1])
    del buffer[:end + 1]
    return line


def verb(line: bytes) -> bytes:
    return line.split(None, 1)[0].upper() if line.strip() else b""


def edit_ehlo(reply: Reply, starttls: bool) -> bytes:
    """The MTA's EHLO reply with STARTTLS offered (before TLS) or withdrawn (after it)."""
    # The first line is the greeting, never a keyword (a host may be called "starttls").
    lines = [reply.lines[0], *(line for line in reply.lines[1:]
                               if line.strip().upper() != b"STARTTLS")]
    if starttls:
        lines.append(b"STARTTLS")
    code = str(reply.code).encode()
    return b"".join(code + (b" " if i == len(lines) - 1 else b"-") + line + b"\r\n"
                    for i, line in enumerate(lines))


@dataclass(frozen=True, slots=True)
class StartTlsServer:
    """Reply already queued (220); handshake as the server with the site's key, then feed
    ``tls_done``."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Tell the client ``reply``, close both; nothing more reaches the MTA."""

    reply: bytes
    reason: str


InboundCommand = (SendPeer | SendClient | StartTlsServer | Relay | Reject | ShutdownPeer
                  | ShutdownClient)


class IS(Enum):
    BANNER = "banner"
    COMMAND = "command"  # waiting for the client's next command
    EHLO_REPLY = "ehlo_reply"
    HANDSHAKE = "handshake"
    DONE = "done"


@dataclass
class Offload:
    """Inbound machine: relays banner and EHLO, offers STARTTLS, answers it itself, and hands
    over to the pump after the client's EHLO over TLS (or as soon as it goes on without TLS).

    A4: bytes the client pipelines after its STARTTLS line, before the handshake, are an
    injection attempt (CVE-2011-0411): the session is rejected, they never reach the MTA.

    Half-close: the client's EOF (``client_closed``) reaches the MTA after the commands it
    sent before it; the MTA's (``mta_closed``) reaches the client after the MTA's replies.
    """

    state: IS = IS.BANNER
    tls: bool = False
    result: Result = Result.PENDING
    reason: str = ""
    _client: bytearray = field(default_factory=bytearray)
    _mta: ReplyReader = field(default_factory=ReplyReader)
    _greet: bytes = b""
    _client_eof: bool = False
    _mta_eof: bool = False

    def client_closed(self) -> list[InboundCommand]:
        if self._client_eof or self.state is IS.DONE:
            return []
        self._client_eof = True
        return self._commands() if self.state is IS.COMMAND else []

    def mta_closed(self) -> list[InboundCommand]:
        if self._mta_eof or self.state is IS.DONE:
            return []
        self._mta_eof = True
        if self.state is IS.HANDSHAKE:
            return []  # tls_done hands over, and the client hears of it then
        if self.result is Result.PENDING:
            self.result, self.reason = Result.PLAINTEXT, "MTA closed"
        return self._relay()

    def mta_data(self, data: bytes) -> list[InboundCommand]:
        self._mta.feed(data)
        out: list[InboundCommand] = []
        try:
            while self._at(IS.BANNER, IS.EHLO_REPLY) and (r := self._mta.next()):
                out += self._on_reply(r)
        except ProtocolError as exc:
            return [*out, *self._reject(f"MTA protocol error: {exc}", b"421 4.3.0")]
        # What is left unread after the replies: the same however the bytes were cut.
        if not self._at(IS.DONE) and len(self._mta.buffer) > MAX_HELD:
            return [*out, *self._reject("MTA sent too much unasked", b"421 4.3.0")]  # A5
        return out

    def client_data(self, data: bytes) -> list[InboundCommand]:
        if self.state is IS.HANDSHAKE:
            return self._reject("data injected after STARTTLS", b"421 4.7.0")
        self._client += data
        out = self._commands() if self.state is IS.COMMAND else []
        if not self._at(IS.DONE) and len(self._client) > MAX_HELD:
            return [*out, *self._reject("too much before the MTA answered", b"421 4.3.0")]
        return out

    def tls_done(self, ok: bool, reason: str) -> list[InboundCommand]:
        assert self.state is IS.HANDSHAKE, self.state
        if not ok:
            self.state, self.result, self.reason = IS.DONE, Result.DEFERRED, reason
            return [Reject(b"", reason)]  # nothing can be said: the TLS layer is broken
        if self._mta.buffer:
            # The MTA spoke unasked before or during the handshake: read after it, that would
            # be the reply to the client's first command over TLS (A4, the reply direction).
            return self._reject(MTA_UNASKED, b"421 4.3.0")
        self.tls, self.result, self.reason = True, Result.TLS, reason
        self.state = IS.COMMAND
        return self._relay() if self._mta_eof else self._commands()

    def _at(self, *states: IS) -> bool:
        return self.state in states

    def _commands(self) -> list[InboundCommand]:
        out: list[InboundCommand] = []
        try:
            while self.state is IS.COMMAND and (line := take_line(self._client)) is not None:
                v = verb(line)
                if v in (b"EHLO", b"HELO"):
                    if self._mta.buffer:  # see tls_done: it would be read as this reply
                        return out + self._reject(MTA_UNASKED, b"421 4.3.0")
                    self.state, self._greet = IS.EHLO_REPLY, v
                    out.append(SendPeer(line))
                    continue
                if v == b"STARTTLS" and not self.tls:
                    if self._client:
                        return out + self._reject("data pipelined after STARTTLS",
                                                  b"421 4.7.0")
                    if self._mta.buffer:  # see tls_done
                        return out + self._reject(MTA_UNASKED, b"421 4.3.0")
                    self.state = IS.HANDSHAKE
                    return [*out, SendClient(STARTTLS_READY), StartTlsServer()]
                # Anything else: the client goes on (in plaintext, or over TLS without a new
                # EHLO): from here the bytes are the MTA's business.
                self._client[:0] = line
                if not self.tls:
                    self.result, self.reason = Result.PLAINTEXT, "client did not use STARTTLS"
                return out + self._relay()
        except ProtocolError as exc:
            return out + self._reject(str(exc), b"500 5.5.2")
        if self.state is IS.COMMAND and self._client_eof:
            # Nothing more will come (an unterminated line at the end is no command).
            self._client.clear()
            return out + self._relay()
        return out

    def _on_reply(self, r: Reply) -> list[InboundCommand]:
        if self.state is IS.BANNER:
            self.state = IS.COMMAND
            if r.code != 220:
                return [SendClient(r.raw), *self._relay()]
            return [SendClient(r.raw), *self._commands()]
        # the reply to EHLO or HELO
        if r.code != 250 or self._greet == b"HELO":
            # Refused, or HELO (no extensions to offer STARTTLS in): passed on as it is.
            if r.code == 250 and self.tls:
                return [SendClient(r.raw), *self._relay()]
            self.state = IS.COMMAND
            return [SendClient(r.raw), *self._commands()]
        edited = edit_ehlo(r, starttls=not self.tls)
        if self.tls:
            return [SendClient(edited), *self._relay()]
        self.state = IS.COMMAND
        return [SendClient(edited), *self._commands()]

    def _relay(self) -> list[InboundCommand]:
        self.state = IS.DONE
        if self.result is Result.PENDING:
            self.result, self.reason = Result.PLAINTEXT, "client did not use STARTTLS"
        rest = bytes(self._client)
        self._client.clear()
        leftover = bytes(self._mta.buffer)
        self._mta.buffer.clear()
        return [Relay(rest, leftover), *([ShutdownPeer()] if self._client_eof else []),
                *([ShutdownClient()] if self._mta_eof else [])]

    def _reject(self, why: str, code: bytes) -> list[InboundCommand]:
        self.state, self.result, self.reason = IS.DONE, Result.DEFERRED, why
        self._client.clear()  # never reaches the MTA (A4)
        return [Reject(code + b" smtpgate: " + why.encode() + b"\r\n", why)]

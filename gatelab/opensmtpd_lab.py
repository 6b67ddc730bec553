"""OpenSMTPD 6.8 (Debian's binary, unpacked by scripts/bootstrap-debian; never the host's MTA)
in lab namespaces, each instance with a private config, queue, control socket and log:

- :class:`OpenSmtpdClient`, the sending MTA: ``smtpd -d`` with one ``relay host`` action;
  a message submitted through its own ``sendmail`` (smtpctl's enqueuer, over the control
  socket), its queue read with ``smtpctl show queue`` and retried with ``smtpctl schedule
  all``.
- :class:`OpenSmtpdServer`, the receiving MTA: ``smtpd -d`` listening in a namespace
  (``proxy-v2`` on demand), taking mail for one domain into one Maildir.

OpenSMTPD compiles its paths in: the queue (``/var/spool/smtpd``), the control socket
(``/var/run/smtpd.sock``), the privilege-separation chroot (``/var/lib/opensmtpd/empty``)
and its delivery agents (``/usr/libexec/opensmtpd``).  There is no option to move them, so
each instance runs in a mount namespace of its own (``unshare --mount`` inside the lab's
network namespace, private propagation: nothing reaches the host's mounts) in which a
private tree is bound over ``/var`` (the private root bound back at its own path, for the
daemon's re-exec of itself), the private root's ``usr/libexec`` over ``/usr/libexec``, and
a resolv.conf of its own over ``/etc/resolv.conf`` (lookups fail at once, not after timeouts).
``smtpctl`` joins that mount namespace (``nsenter --mount``) to reach the control socket.
With ``-d`` the daemon logs to stderr, which goes to ``log/smtpd.log`` in the private tree.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gatelab.interop import MTA_ROOTS, LabMta, LogFile, Maildir, PrivateDir, root_usable
from gatelab.netlab import Netns, wait_port

OPENSMTPD_ROOT = MTA_ROOTS / "opensmtpd"
SMTPD = OPENSMTPD_ROOT / "usr/sbin/smtpd"
SMTPCTL = OPENSMTPD_ROOT / "usr/sbin/smtpctl"
SENDMAIL = OPENSMTPD_ROOT / "usr/sbin/sendmail"  # -> smtpctl, which enqueues by that name
SMTPD_USER, QUEUE_USER = "opensmtpd", "opensmtpq"  # compiled into Debian's binary
MAIL_USER = "nobody"  # the Maildir's owner: OpenSMTPD delivers as that user
# In the instance's mount namespace: the private root reachable at its own path again,
# the private /var over the host's, the delivery agents where the binary looks, a
# resolv.conf of its own.
_MOUNTS = ('mount --bind "$1" "$2" && mount --rbind "$3" /var && '
           'mount --bind "$4" /usr/libexec && mount --bind "$5" /etc/resolv.conf && '
           'shift 5 && exec "$@"')
_EVPID = re.compile(r"^([0-9a-f]{16})\|", re.MULTILINE)


def opensmtpd_usable() -> str | None:
    """None when OpenSMTPD can run here, else why not (for skip())."""
    return root_usable("opensmtpd", "usr/sbin/smtpd", SMTPD_USER, QUEUE_USER, MAIL_USER)


class _OpenSmtpd(LabMta):
    """What both roles share: the private tree (its /var, its Maildir, its log), the daemon
    in the foreground as our child, smtpctl against its control socket."""

    def __init__(self, ns: Netns, conf: Sequence[str], subdirs: Sequence[str] = ()) -> None:
        self.ns = ns
        self.tree = PrivateDir("sg-opensmtpd-", MAIL_USER, subdirs)
        self.dir = self.tree.path
        self.var = self.dir / "var"
        for sub in ("spool", "run", "lib/opensmtpd/empty",
                    str(OPENSMTPD_ROOT.relative_to("/var"))):
            (self.var / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "log").mkdir()
        self.conf = self.dir / "smtpd.conf"
        self.conf.write_text("\n".join([*conf, ""]))
        self.conf.chmod(0o644)
        # OpenSMTPD asks DNS for every peer's and client's name (logging only): the lab has
        # no resolver for the MTA, and the host's would not answer from in here.  Nothing
        # listens at this address, so each lookup fails at once instead of timing out.
        self.resolv = self.dir / "resolv.conf"
        self.resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        self.name = "OpenSMTPD"
        self.mta_log = LogFile(self.dir / "log" / "smtpd.log", "OpenSMTPD")
        self.proc: subprocess.Popen[Any] | None = None

    def _in_private_mounts(self, *argv: str) -> list[str]:
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _MOUNTS, "sh",
                str(OPENSMTPD_ROOT), str(self.var / OPENSMTPD_ROOT.relative_to("/var")),
                str(self.var), str(OPENSMTPD_ROOT / "usr/libexec"), str(self.resolv), *argv]

    def check_config(self) -> str:
        """``smtpd -n``: what OpenSMTPD says of the config (``configuration OK``)."""
        cp = self.ns.run(self._in_private_mounts(str(SMTPD), "-n", "-f", str(self.conf)),
                         check=False, timeout=30)
        return f"{cp.stdout}{cp.stderr}".strip()

    def _start(self) -> None:
        with (self.dir / "log" / "smtpd.log").open("wb") as log:
            self.proc = self.ns.popen(
                self._in_private_mounts(str(SMTPD), "-d", "-f", str(self.conf)),
                stdout=log, stderr=subprocess.STDOUT)
        # The control socket is the last thing the parent sets up.
        deadline = time.monotonic() + 15
        while not (self.var / "run" / "smtpd.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smtpd not up: exit {self.proc.poll()}:\n{self.log()}")
            time.sleep(0.05)

    def _enter(self) -> list[str]:
        """The argv prefix that runs smtpctl in the daemon's mount namespace."""
        assert self.proc is not None, "not started"
        # smtpctl insists on running setgid to the queue's group (as Debian installs it; the
        # unpacked copy is not): the same effect for this one call.
        # --root: the daemon's root, not the mount namespace's (they differ in a chroot,
        # as scripts/fresh-check runs the suite: setns() alone would leave us at the
        # host's /, where the instance's /var is not).
        return ["nsenter", f"--target={self.proc.pid}", "--mount", "--root", "--", "setpriv",
                f"--regid={QUEUE_USER}", "--keep-groups", "--"]

    def smtpctl(self, *args: str, argv0: Path = SMTPCTL, data: bytes | None = None) -> str:
        cp = self.ns.run([*self._enter(), str(argv0), *args], input=data, text=False,
                         check=False, timeout=60)
        if cp.returncode != 0:
            raise RuntimeError(f"{argv0.name} {' '.join(args)}: exit {cp.returncode}: "
                               f"{(cp.stdout + cp.stderr).decode(errors='replace')[-1000:]}")
        out: bytes = cp.stdout
        return out.decode(errors="replace")

    def queued(self) -> str:
        """``smtpctl show queue``: one line per envelope still held (empty: none)."""
        return self.smtpctl("show", "queue").strip()

    def envelope_ids(self) -> list[str]:
        return _EVPID.findall(self.queued())

    def stop(self) -> None:
        if self.proc is not None:
            self.ns.stop(self.proc)
            self.proc = None

    def close(self) -> None:
        self.stop()
        self.tree.remove()


class OpenSmtpdClient(_OpenSmtpd):
    """Everything submitted goes to ``relay``, a relay URL: ``smtp+notls://ADDRESS:25`` is
    the legacy MTA (no TLS of its own, the gateway upgrades), ``smtp://ADDRESS:25``
    OpenSMTPD's default, opportunistic STARTTLS verifying nothing."""

    def __init__(self, ns: Netns, relay: str, *, helo: str = "mta.example.com") -> None:
        super().__init__(ns, [
            # No listener but the control socket (where its sendmail submits).
            f'action "relay" relay host "{relay}" helo {helo}',
            'match from local for any action "relay"',
        ])

    def send(self, sender: str, rcpt: str | Sequence[str], message: bytes) -> None:
        """Submits ``message`` with OpenSMTPD's own sendmail; the daemon delivers it at
        once, and keeps what the peer defers (see queued())."""
        rcpts = [rcpt] if isinstance(rcpt, str) else list(rcpt)
        self.smtpctl("-f", sender, "--", *rcpts, argv0=SENDMAIL, data=message)

    def schedule_all(self) -> None:
        """``smtpctl schedule all``: every held envelope is tried again now, as an
        operator's retry would."""
        self.smtpctl("schedule", "all")

    def __enter__(self) -> OpenSmtpdClient:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenSmtpdServer(_OpenSmtpd):
    """Listening on ``address:port`` in ``ns`` (``proxy_v2``: the listener expects a PROXY
    v2 header): mail for any user at ``domain`` into one Maildir, delivered as
    ``MAIL_USER``; anything else refused (OpenSMTPD's default: no rule, no relaying)."""

    def __init__(self, ns: Netns, address: str, *, port: int = 25, domain: str = "b.test",
                 hostname: str = "legacy.b.test", proxy_v2: bool = False) -> None:
        self.address, self.port = address, port
        super().__init__(ns, [
            f"listen on {address} port {port} hostname {hostname}"
            + (" proxy-v2" if proxy_v2 else ""),
            # Every user at the domain is the one system user the Maildir belongs to.
            f'table users {{ "@{domain}" = "{MAIL_USER}" }}',
            'action "inbox" maildir "{DIR}/mail/inbox" virtual <users>',
            f'match from any for domain "{domain}" action "inbox"',
        ], ("mail",))
        self.conf.write_text(self.conf.read_text().replace("{DIR}", str(self.dir)))
        self.inbox = Maildir(self.dir / "mail" / "inbox", "OpenSMTPD")

    def start(self, timeout: float = 15.0) -> OpenSmtpdServer:
        self._start()
        try:
            wait_port(self.ns, self.address, self.port, timeout)
        except TimeoutError as exc:
            raise RuntimeError(f"smtpd not listening: {self.log()[-2000:]}") from exc
        return self

    def __enter__(self) -> OpenSmtpdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

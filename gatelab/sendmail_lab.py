"""Sendmail 8.17 (Debian's ``sendmail-bin``, unpacked by scripts/bootstrap-debian into
/var/lib/smtpgate-tests/sendmail; never the host's MTA) in lab namespaces, each instance
with a private ``sendmail.cf`` (built by m4 from a small ``.mc`` and the private root's cf
macros), queue, status file, pid file, aliases, log and Maildir:

- :class:`SendmailClient`, the sending MTA: a smart host (``SMART_HOST esmtp:[address]``)
  delivered to in the foreground (``-odi``); ``tls=False``: ``ClientPortOptions
  Modifiers=S`` (Sendmail's documented "do not use STARTTLS as a client"), so the gateway
  upgrades; ``tls=True``: its default, STARTTLS whenever the peer offers it, no certificate
  of its own, verifying nothing.  Its queue read (``-bp``) and re-run (``-qf``).
- :class:`SendmailServer`, the receiving MTA: ``sendmail -bD`` (the daemon in the
  foreground, our child) on one address, b.test's users into one Maildir through a small
  delivery program (Sendmail has no Maildir of its own), relaying refused.  Sendmail has no
  PROXY protocol: behind the inbound gateway it sees the client's address only with
  ``client_address: transparent``.

What the Debian binary takes from the host before (or beside) its ``-C`` config, and how
each stays private.  It logs only to syslog (``/dev/log``, absent here).  It qualifies the
host's unqualified name through the host's resolver before it reads the config ("My
unqualified host name (vm) unknown; sleeping for retry": 60 s).  It asks libc (the host's
nsswitch.conf and resolv.conf) for the client's PTR, and a resolver that does not answer
turns a refused relay into a 450.  So every run of the binary is wrapped in a mount and UTS
namespace of its own (``unshare -m -u``): ``hostname`` is the instance's FQDN; ``/dev`` is
an overlay whose ``log`` is a symlink to this instance's syslog socket (a catcher thread
writes what arrives to ``maillog``); ``/etc/resolv.conf`` and ``/etc/nsswitch.conf`` are
private files bound over the host's (``hosts: files``, ``nameserver 127.0.0.1``: a name
not in a file is "not found" at once).  Everything the cf names (queue, status file, pid
file, aliases, hosts file, service switch) is in the private tree.  Nothing is written to
the host's /etc, /dev, /var or /run.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gatelab.interop import MTA_ROOTS, LabMta, LogFile, Maildir, PrivateDir, root_usable
from gatelab.netlab import Netns, wait_port

SENDMAIL_ROOT = MTA_ROOTS / "sendmail"
SENDMAIL = SENDMAIL_ROOT / "usr/libexec/sendmail/sendmail"
CF_DIR = SENDMAIL_ROOT / "usr/share/sendmail/cf"
MAIL_USER = "smmta"  # the delivery program's user (the Maildir's owner)
# A queue listing's ids (8.17: 14 characters or more), then the flag of one in progress.
_QUEUE_ID = re.compile(r"^([0-9A-Za-z]{14,})[*X-]?\s+\d+\s", re.MULTILINE)

# Run inside the namespace: $1 the host name, $2 the instance's tree, then the argv.
_PRIVATE = (
    'h=$1 d=$2; shift 2; hostname "$h" && '
    'mount -t overlay overlay -o "lowerdir=/dev,upperdir=$d/dev,workdir=$d/dev.work" /dev && '
    'mount --bind "$d/resolv.conf" /etc/resolv.conf && '
    'mount --bind "$d/nsswitch.conf" /etc/nsswitch.conf && exec "$@"'
)

# The delivery program in place of a local mailer: the message (Sendmail wrote its
# Return-Path header, F=P) into the Maildir given as $1, through tmp/ as Maildir wants.
# Its argv names the user ($u) even though it delivers every user alike: a mailer whose
# A= has no $u is taken to speak SMTP on its stdin.
_DELIVER = """#!/bin/sh
set -e
name=$(date +%s).$$_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \\n').sendmail
cat > "$1/tmp/$name"
mv "$1/tmp/$name" "$1/new/$name"
"""


def sendmail_usable() -> str | None:
    """None when Sendmail can run here, else why not (for skip())."""
    why = root_usable("sendmail", "usr/libexec/sendmail/sendmail", MAIL_USER)
    if why is None and not (CF_DIR / "m4" / "cf.m4").exists():
        why = f"{CF_DIR}/m4/cf.m4 missing (sendmail-cf; scripts/bootstrap-debian unpacks it)"
    for tool in ("m4", "unshare", "mount", "hostname"):
        if why is None and shutil.which(tool) is None:
            why = f"{tool} not installed"
    return why


class SyslogCatcher:
    """A syslog socket (datagrams, as glibc's syslog() sends) at ``path``; each message
    is appended to ``log`` as one line, without its ``<priority>``."""

    def __init__(self, path: Path, log: Path) -> None:
        self.log = log
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o666)  # the delivery program runs as the mail user
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"syslog-{path}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.log.open("ab") as out:
            while not self._stop.is_set():
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                out.write(re.sub(rb"^<\d+>", b"", data).rstrip(b"\n") + b"\n")
                out.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class _Sendmail(LabMta):
    """What both roles share: the private tree, the cf built from ``mc``, the wrapper every
    run of the binary goes through, the syslog catcher and its log, the queue."""

    def __init__(self, ns: Netns, hostname: str, owned: Sequence[str] = ()) -> None:
        self.ns, self.hostname = ns, hostname
        self.tree = PrivateDir("sg-sendmail-", MAIL_USER, owned)
        self.dir = self.tree.path
        for sub in ("queue", "dev", "dev.work"):
            (self.dir / sub).mkdir(mode=0o700)
        (self.dir / "dev" / "log").symlink_to(self.dir / "log.sock")
        (self.dir / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        # Names and addresses from files only: a client without a PTR is "not found",
        # not "try again" (which turns a refused relay into a 450).
        (self.dir / "nsswitch.conf").write_text("passwd: files\ngroup: files\n"
                                                "hosts: files\n")
        (self.dir / "statistics").touch()
        (self.dir / "service.switch").write_text("hosts files\naliases files\n")
        (self.dir / "hosts").write_text(f"127.0.0.1 localhost\n127.0.0.1 {hostname}\n")
        (self.dir / "aliases").write_text("postmaster: root\n")
        self.cf = self.dir / "sendmail.cf"
        self.name = "Sendmail"
        self.mta_log = LogFile(self.dir / "maillog", "Sendmail")
        self.syslog = SyslogCatcher(self.dir / "log.sock", self.dir / "maillog")

    def common_mc(self) -> list[str]:
        """Every path the cf names, in the private tree (the binary's own defaults are
        /etc/mail/..., /var/spool/mqueue, /run/sendmail/...)."""
        d = self.dir
        return [
            "divert(-1)", "divert(0)dnl",
            "OSTYPE(`linux')dnl",
            f"define(`MAIL_SETTINGS_DIR', `{d}/')dnl",
            f"define(`confDOMAIN_NAME', `{self.hostname}')dnl",
            f"define(`QUEUE_DIR', `{d}/queue')dnl",
            f"define(`STATUS_FILE', `{d}/statistics')dnl",
            f"define(`confPID_FILE', `{d}/sendmail.pid')dnl",
            f"define(`ALIAS_FILE', `{d}/aliases')dnl",
            f"define(`HELP_FILE', `{SENDMAIL_ROOT}/etc/mail/helpfile')dnl",
            f"define(`confHOSTS_FILE', `{d}/hosts')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{d}/service.switch')dnl",
            "define(`confDONT_PROBE_INTERFACES', `true')dnl",
            "define(`confTO_IDENT', `0')dnl",  # no ident callbacks: nothing answers
            # A busy test machine is no reason to queue instead of delivering.
            "define(`confQUEUE_LA', `999')dnl",
            "define(`confREFUSE_LA', `999')dnl",
            "define(`confLOG_LEVEL', `14')dnl",
            # The tree is under /tmp (world-writable, sticky): the delivery program's
            # path would otherwise be "unsafe: World writable directory".
            "define(`confDONT_BLAME_SENDMAIL', `RunProgramInUnsafeDirPath')dnl",
            "FEATURE(`no_default_msa')dnl",  # no port 587
            "FEATURE(`nocanonify')dnl",
        ]

    def build_cf(self, mc: Sequence[str]) -> None:
        (self.dir / "sendmail.mc").write_text("\n".join(mc) + "\n")
        cp = subprocess.run(["m4", f"-D_CF_DIR_={CF_DIR}/", str(CF_DIR / "m4" / "cf.m4"),
                             str(self.dir / "sendmail.mc")], capture_output=True, check=False,
                            timeout=30)
        if cp.returncode != 0 or cp.stderr:
            raise RuntimeError(f"m4: {cp.stderr.decode(errors='replace')}")
        self.cf.write_bytes(cp.stdout)

    def argv(self, *args: str) -> list[str]:
        """The command that runs the binary with this instance's cf, privately (above)."""
        return ["unshare", "-m", "-u", "--propagation", "private", "sh", "-c", _PRIVATE,
                "sendmail", self.hostname, str(self.dir), str(SENDMAIL), "-C", str(self.cf),
                *args]

    def sendmail(self, *args: str, data: bytes | None = None,
                 ok: Sequence[int] = (0,)) -> str:
        """Runs the binary (its stdout and stderr); an exit status not in ``ok`` raises
        with what it said, rather than showing up later as mail that never came."""
        cp = self.ns.run(self.argv(*args), input=data or b"", text=False, check=False,
                         timeout=90, stderr=subprocess.STDOUT, stdout=subprocess.PIPE)
        out: str = cp.stdout.decode(errors="replace")
        if cp.returncode not in ok:
            raise RuntimeError(f"sendmail {' '.join(args)}: exit {cp.returncode}: {out[-2000:]}"
                               f"\n{self.log()[-2000:]}")
        return out

    def queued(self) -> str:
        """``sendmail -bp``: empty when the queue is; else each message with the
        recipients not yet delivered and why."""
        out = self.sendmail("-bp")
        return "" if re.search(r" is empty\s*$", out, re.MULTILINE) else out.strip()

    def queue_ids(self) -> list[str]:
        return _QUEUE_ID.findall(self.queued())

    def close(self) -> None:
        self.syslog.close()
        self.tree.remove()


class SendmailClient(_Sendmail):
    """``send()`` delivers one message to the smart host ``[host]`` at once; ``queued()``
    lists what Sendmail still holds, ``run_queue()`` tries it again."""

    def __init__(self, ns: Netns, host: str, *, tls: bool = False,
                 hostname: str = "mta.example.com") -> None:
        super().__init__(ns, hostname)
        self.build_cf([
            *self.common_mc(),
            f"define(`SMART_HOST', `esmtp:[{host}]')dnl",
            # Family=inet: the lab's routes are v4 here; S: no STARTTLS as a client.
            "CLIENT_OPTIONS(`Family=inet" + ("')dnl" if tls else ", Modifiers=S')dnl"),
            "MAILER(`local')dnl",
            "MAILER(`smtp')dnl",
        ])

    def send(self, sender: str, rcpt: str | Sequence[str], message: bytes) -> str:
        """Submits ``message`` (``-i``: a lone dot is content) and delivers it at once
        (``-odi``, ``-v``: the SMTP dialogue it prints is returned); a deferral leaves
        it in the queue (see queued())."""
        rcpts = [rcpt] if isinstance(rcpt, str) else list(rcpt)
        return self.sendmail("-odi", "-v", "-i", "-f", sender, "--", *rcpts, data=message)

    def run_queue(self) -> str:
        """One queue run in the foreground (``-qf``), as an operator's retry would."""
        return self.sendmail("-qf", "-v")

    def __enter__(self) -> SendmailClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SendmailServer(_Sendmail):
    """Sendmail's daemon in the foreground (``-bD``, our child, stopped by PID) on
    ``address:port`` in ``ns``: mail for any user at ``domain`` into one Maildir (with
    the Return-Path Sendmail writes, F=P), relaying refused."""

    def __init__(self, ns: Netns, address: str, *, port: int = 25, domain: str = "b.test",
                 hostname: str = "legacy.b.test") -> None:
        super().__init__(ns, hostname, ("mail/inbox/tmp", "mail/inbox/new", "mail/inbox/cur"))
        self.address, self.port = address, port
        self.maildir = self.dir / "mail" / "inbox"
        self.inbox = Maildir(self.maildir, "Sendmail")
        deliver = self.dir / "deliver"
        deliver.write_text(_DELIVER)
        deliver.chmod(0o755)
        dom = re.escape(domain).replace("\\", "")
        self.build_cf([
            *self.common_mc(),
            # M=A: no AUTH (libsasl2 would offer its mechanisms); no certificates: no STARTTLS.
            f"DAEMON_OPTIONS(`Port={port}, Addr={address}, Name=MTA, M=A')dnl",
            # The lab's senders' domains resolve nowhere the MTA can ask.
            "FEATURE(`accept_unresolvable_domains')dnl",
            f"RELAY_DOMAIN(`{domain}')dnl",
            "MAILER(`local')dnl",
            "MAILER(`smtp')dnl",
            "LOCAL_RULE_0",
            f"R$+ < @ {dom} $* >\t$#maildir $@ {dom} $: $1",
            "MAILER_DEFINITIONS",
            f"Mmaildir, P={deliver}, F=lsDFMPhnu, S=EnvFromL/HdrFromL, R=EnvToL/HdrToL, "
            f"U={MAIL_USER}:{MAIL_USER}, T=DNS/RFC822/X-Unix, A=deliver {self.maildir} $u",
        ])
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 20.0) -> SendmailServer:
        mark = self.log_mark()
        out = (self.dir / "daemon.out").open("wb")
        with out:
            self.proc = self.ns.popen(self.argv("-bD"), stdout=out, stderr=out)
        try:
            self.wait_log(r"starting daemon \(8\.17[^)]*\): SMTP", timeout, since=mark)
            wait_port(self.ns, self.address, self.port, timeout)
        except TimeoutError as exc:
            raise RuntimeError(f"sendmail daemon not listening: exit {self.proc.poll()}: "
                               f"{(self.dir / 'daemon.out').read_text()}"
                               f"{self.log()[-2000:]}") from exc
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.ns.stop(self.proc)
            self.proc = None

    def close(self) -> None:
        self.stop()
        super().close()

    def __enter__(self) -> SendmailServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

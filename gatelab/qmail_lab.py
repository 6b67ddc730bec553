"""qmail (notqmail 1.09, built from ../shared/third-party/) in lab namespaces: issue 19's
qmail row (tests/test_interop_qmail_netns.py, docs/interop.md).

- :class:`QmailBuild`: ``make setup check`` once per test session into a temporary prefix
  (``conf-qmail``), removed afterwards.  Everything qmail owns lives under that prefix:
  ``control/``, ``queue/``, ``users/``, ``alias/``; nothing is written to the host's /etc,
  /var or /run.
- :class:`QmailInstance`: a private copy of the installed tree (``cp -a``: the queue's
  modes, owners and FIFOs, qmail-queue's setuid bit).  The prefix is compiled in (every
  program ``chdir``s to it), so each program of an instance runs in a mount namespace of
  its own (``unshare -m`` inside the lab's network namespace) where the instance's copy is
  bind-mounted over the prefix: several instances (sender and receiver, parallel sessions)
  never share a queue.
- :class:`QmailSender`: ``qmail-remote`` run directly (``qmail-remote HOST SENDER RCPT...``
  with the message on stdin, as ``qmail-rspawn`` runs it; its output, one ``r``/``h``/``s``
  record per recipient then ``K``/``Z``/``D`` for the message, is the delivery result), and
  the whole queue: ``qmail-inject``, ``qmail-send`` with ``qmail-lspawn``, ``qmail-rspawn``,
  ``qmail-clean`` (started by ``qmail-start``), routes from ``control/smtproutes``, its log,
  ``qmail-qread``, a retry on SIGALRM.
- :class:`QmailReceiver`: ``qmail-smtpd`` under ``tcpserver`` (ucspi-tcp, which sets
  ``TCPREMOTEIP`` from the socket) with the queue behind it delivering any user at the
  receiving domain into one Maildir (``users/assign``: ``+`` to the alias user's
  ``.qmail-default``).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatelab.interop import LabMta, LogFile, Maildir, PrivateDir
from gatelab.netlab import Netns, wait_port

REPO = Path(__file__).resolve().parents[1]
TARBALL = Path(os.environ.get("SMTPGATE_NOTQMAIL",
                              REPO.parent / "shared" / "third-party" / "notqmail-1.09.tar.gz"))
# The skip when the source is absent: no registry carries it and no install step can
# fetch it, so a full run (tests/conftest.py) takes this skip as a fact of the checkout.
NO_SOURCE = "no notqmail source beside this checkout"
USERS = ("alias", "qmaild", "qmaill", "qmailp", "qmailq", "qmailr", "qmails")
GROUPS = ("qmail", "nofiles")
TOOLS = {"gcc": "gcc", "make": "make", "nroff": "groff-base", "tcpserver": "ucspi-tcp",
         "unshare": "util-linux", "mount": "mount"}
# Runs "$@" with the instance ($0) bind-mounted over the compiled-in prefix ($1).
_BIND = 'mount --bind "$0" "$1" && shift && exec "$@"'


def _extract(tar: tarfile.TarFile, where: Path) -> None:
    """The archive's files under ``where`` and nowhere else.  Python's "data" filter where
    it has one (3.11.4 on); Debian 12's 3.11.2 has none: the same refusals by hand."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(where, filter="data")
        return
    def inside(name: str) -> bool:
        return not name.startswith("/") and ".." not in Path(name).parts

    for m in tar.getmembers():
        if not inside(m.name) or not (m.isfile() or m.isdir()
                                      or (m.issym() and inside(m.linkname))):
            raise RuntimeError(f"{tar.name!r}: refusing the member {m.name!r}")
    tar.extractall(where)  # every member checked above


def qmail_usable() -> str | None:
    """None when notqmail can be built and run here, else why not (for skip())."""
    if not TARBALL.is_file():
        return (f"{NO_SOURCE}: {TARBALL} missing (../shared/third-party/ beside the "
                f"repository, or SMTPGATE_NOTQMAIL)")
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            return f"{tool} missing (Debian package {package}; scripts/bootstrap-debian)"
    try:
        for user in USERS:
            pwd.getpwnam(user)
        for group in GROUPS:
            grp.getgrnam(group)
    except KeyError as exc:
        return f"qmail's user or group {exc} missing (scripts/bootstrap-debian creates it)"
    return None


class QmailBuild:
    """notqmail built and installed (``make setup check``) under ``prefix``, a temporary
    directory; :meth:`remove` takes it all away."""

    def __init__(self, tarball: Path = TARBALL) -> None:
        self.top = Path(tempfile.mkdtemp(prefix="sg-qmail-build-"))
        self.top.chmod(0o755)  # qmail's users reach into the prefix
        self.prefix = self.top / "qmail"
        try:
            with tarfile.open(tarball) as tar:
                [src] = {m.name.split("/", 1)[0] for m in tar.getmembers()}
                _extract(tar, self.top)
            self.src = self.top / src
            (self.src / "conf-qmail").write_text(f"{self.prefix}\n")
            log = self.top / "build.log"
            with log.open("wb") as out:
                cp = subprocess.run(["make", "setup", "check"], cwd=self.src, stdout=out,
                                    stderr=subprocess.STDOUT, check=False, timeout=300)
            if cp.returncode != 0:
                raise RuntimeError(f"notqmail's make setup check: exit {cp.returncode}:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            self.version = src  # notqmail-1.09
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        shutil.rmtree(self.top, ignore_errors=True)


@contextlib.contextmanager
def built() -> Iterator[QmailBuild]:
    build = QmailBuild()
    try:
        yield build
    finally:
        build.remove()


@dataclass(frozen=True)
class Record:
    """One of qmail-remote's reports: ``kind`` r (recipient accepted), h (recipient
    refused for good), s (recipient refused for now); then K (message delivered), Z
    (deferred: try again later), D (failed for good); ``text`` what it says."""

    kind: str
    text: str

    def __str__(self) -> str:
        return f"{self.kind}{self.text}".replace("\n", "\\n")


def parse_records(out: bytes) -> list[Record]:
    """qmail-remote's output: NUL-terminated records (qmail-remote(8))."""
    parts = out.decode(errors="replace").split("\0")
    assert parts[-1] == "", f"qmail-remote's output does not end in NUL: {out!r}"
    return [Record(p[:1], p[1:]) for p in parts[:-1]]


class QmailInstance(LabMta):
    """A private copy of the installed tree and the programs run against it in ``ns``."""

    def __init__(self, build: QmailBuild, ns: Netns, me: str) -> None:
        self.build, self.ns = build, ns
        self.tree = PrivateDir("sg-qmail-")
        self.dir = self.tree.path
        subprocess.run(["cp", "-a", f"{build.prefix}/.", f"{self.dir}/"], check=True,
                       timeout=60)
        self.control("me", me)
        self.name = "qmail"
        self.send_log = self.mta_log = LogFile(self.dir / "qmail-send.log", "qmail-send")
        self.send: subprocess.Popen[Any] | None = None

    @property
    def prefix(self) -> Path:
        """Where the programs see the tree (the compiled-in prefix)."""
        return self.build.prefix

    def control(self, name: str, *lines: str) -> None:
        (self.dir / "control" / name).write_text("".join(f"{x}\n" for x in lines))

    def bin(self, program: str) -> str:
        """A qmail program's path, as the instance's processes see it."""
        return str(self.prefix / "bin" / program)

    def cmd(self, args: Sequence[str]) -> list[str]:
        """``args`` with this instance mounted over the prefix, in a mount namespace of
        its own."""
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _BIND,
                str(self.dir), str(self.prefix), *args]

    def run(self, args: Sequence[str], data: bytes = b"", check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[Any]:
        cp = self.ns.run(self.cmd(args), input=data, check=False, timeout=timeout)
        if check and cp.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {cp.returncode}: "
                               f"{cp.stderr.decode(errors='replace')[-1000:]}")
        return cp

    # -- the queue ------------------------------------------------------------------

    def start_queue(self, default_delivery: str = "./Maildir/", timeout: float = 10) -> None:
        """qmail-start (then qmail-send, our child's PID) with qmail-lspawn, qmail-rspawn
        and qmail-clean; qmail-send's log (no logger: qmail-start's stdout) to a file."""
        env = {**os.environ, "PATH": f"{self.prefix / 'bin'}:{os.environ.get('PATH', '')}"}
        with self.send_log.path.open("ab") as log:
            self.send = self.ns.popen(self.cmd([self.bin("qmail-start"), default_delivery]),
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      env=env)
        try:
            self.send_log.wait(r"^status: local 0/\d+ remote 0/\d+$", timeout)
        except TimeoutError as exc:
            raise RuntimeError(f"qmail-send did not start: exit {self.send.poll()}") from exc

    def queued(self) -> str:
        """qmail-qread: each message with the recipients not yet delivered ("" if none)."""
        out: bytes = self.run([self.bin("qmail-qread")]).stdout
        return out.decode(errors="replace").strip()

    def run_queue(self) -> None:
        """SIGALRM to qmail-send: every message in the queue is tried again now (what
        ``svc -a`` does to a supervised qmail-send)."""
        assert self.send is not None and self.send.poll() is None, "qmail-send not running"
        self.send.send_signal(signal.SIGALRM)

    def close(self) -> None:
        if self.send is not None:
            self.ns.stop(self.send)
            self.send = None
        self.tree.remove()


class QmailSender(QmailInstance):
    """qmail as the sending MTA in ``ns``: ``remote()`` runs qmail-remote once; the queue
    (:meth:`start_queue`, :meth:`inject`) routes by ``control/smtproutes``."""

    def __init__(self, build: QmailBuild, ns: Netns, me: str = "mta.example.com",
                 routes: Sequence[str] = ()) -> None:
        super().__init__(build, ns, me)
        self.control("locals", "localhost")
        self.control("timeoutconnect", "10")
        self.control("timeoutremote", "30")
        if routes:
            self.control("smtproutes", *routes)

    def remote(self, host: str, sender: str, rcpts: Sequence[str],
               message: bytes) -> list[Record]:
        """``qmail-remote host sender rcpt...`` with ``message`` (LF line ends, as qmail
        keeps it in its queue) on stdin: its reports."""
        cp = self.run([self.bin("qmail-remote"), host, sender, *rcpts], data=message)
        return parse_records(cp.stdout)

    def inject(self, sender: str, rcpts: Sequence[str], message: bytes) -> None:
        """qmail-inject: into the queue (qmail-send picks it up at once)."""
        self.run([self.bin("qmail-inject"), "-f", sender, *rcpts], data=message)

    def __enter__(self) -> QmailSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QmailReceiver(QmailInstance):
    """qmail-smtpd under ``tcpserver -v`` on ``address:port`` in ``ns`` (our child, its log
    the "MTA's log" for the client's address) for ``domain``, relaying refused
    (``control/rcpthosts``); the queue delivers every user at ``domain`` into one Maildir.
    Implements gatelab.interop.Receiver."""

    def __init__(self, build: QmailBuild, ns: Netns, address: str, *, port: int = 25,
                 domain: str = "b.test", hostname: str = "legacy.b.test") -> None:
        super().__init__(build, ns, hostname)
        self.address, self.port, self.hostname = address, port, hostname
        self.control("rcpthosts", domain)
        self.control("locals", domain)
        alias = pwd.getpwnam("alias")
        home = self.dir / "alias"
        (home / ".qmail-default").write_text("./Maildir/\n")
        (home / ".qmail-default").chmod(0o644)
        for sub in ("", "tmp", "new", "cur"):
            (home / "Maildir" / sub).mkdir(mode=0o700, exist_ok=True)
            os.chown(home / "Maildir" / sub, alias.pw_uid, alias.pw_gid)
        # Every local part to the alias user, its home the instance's alias/ as qmail sees
        # it (under the prefix), .qmail-default there (qmail-users(5)).
        (self.dir / "users" / "assign").write_text(
            f"+:alias:{alias.pw_uid}:{alias.pw_gid}:{self.prefix / 'alias'}:-::\n.\n")
        self.run([self.bin("qmail-newu")])
        self.inbox = Maildir(home / "Maildir", "qmail")
        self.tcpserver_log = LogFile(self.dir / "tcpserver.log", "tcpserver")
        self.smtpd: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 15.0) -> QmailReceiver:
        self.start_queue()
        uid, gid = pwd.getpwnam("qmaild").pw_uid, grp.getgrnam("nofiles").gr_gid
        with self.tcpserver_log.path.open("ab") as log:
            # -R: no ident callback, -H: no DNS for the client, -l: the local name given.
            self.smtpd = self.ns.popen(self.cmd([
                "tcpserver", "-v", "-R", "-H", "-l", self.hostname, "-u", str(uid),
                "-g", str(gid), self.address, str(self.port),
                self.bin("qmail-smtpd")]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            wait_port(self.ns, self.address, self.port, timeout)
        except TimeoutError as exc:
            raise RuntimeError(f"tcpserver not listening: exit {self.smtpd.poll()}: "
                               f"{self.tcpserver_log.text()}") from exc
        return self

    def close(self) -> None:
        if self.smtpd is not None:
            self.ns.stop(self.smtpd)
            self.smtpd = None
        super().close()

    def __enter__(self) -> QmailReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

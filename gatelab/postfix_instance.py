"""Throwaway real Postfix instances (and smtp-sink/smtp-source) inside lab namespaces.

Each :class:`PostfixInstance` has its own config, queue and data directories and log
file under a work directory, and its master process is our child (killed by PID), so
several instances run side by side and the host's /etc/postfix instance is never
started, stopped or modified (only read: master.cf.dist, postfix-files, dynamicmaps.cf).
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from gatelab.netlab import Netns, stop_process, wait_port

POSTFIX_ETC = Path("/etc/postfix")
POSTFIX_SHARE = Path("/usr/share/postfix")
DAEMON_DIR = Path("/usr/lib/postfix/sbin")
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"

_private_dirs: list[Path] = []


@atexit.register
def _remove_private_dirs() -> None:
    for path in _private_dirs:
        shutil.rmtree(path, ignore_errors=True)


def postfix_usable() -> str | None:
    """None when Postfix instances can run here, else why not (for skip())."""
    for tool in ("postconf", "postfix", "sendmail", "postqueue", "smtp-sink", "smtp-source"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin") is None:
            return f"{tool} not installed (apt-get install postfix)"
    if not (DAEMON_DIR / "master").exists():
        return f"{DAEMON_DIR}/master missing"
    try:
        pwd.getpwnam(MAIL_OWNER)
        grp.getgrnam(SETGID_GROUP)
    except KeyError as exc:
        return f"postfix user/group missing: {exc}"
    return None


def _traversable_by(path: Path, uid: int, gid: int) -> bool:
    # Postfix daemons run as `postfix` and chdir into the queue: every ancestor needs x.
    for part in [path, *path.parents]:
        st = part.stat()
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True


def service_dir(workdir: Path, name: str, user: str = MAIL_OWNER) -> Path:
    """``workdir/name``, or - when ``user`` cannot reach into workdir (pytest's tmp_path
    is below a 0700 directory) - a private dir under /tmp with ``workdir/name`` as a
    symlink to it, removed when the test process exits."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pw = pwd.getpwnam(user)
    if _traversable_by(workdir, pw.pw_uid, pw.pw_gid):
        path = workdir / name
        path.mkdir(mode=0o755, exist_ok=True)
        return path
    path = Path(tempfile.mkdtemp(prefix=f"sg{os.getpid()}-{name}-"))
    path.chmod(0o755)
    _private_dirs.append(path)
    link = workdir / name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(path)
    return path


def null_client_settings(
    relayhost: str, fallback_relay: str | None = None, myhostname: str = "mta.example.com"
) -> dict[str, str]:
    """main.cf for a pure relay client: accepts only local submissions, sends everything
    to ``relayhost`` (e.g. ``"[203.0.113.2]:25"``), no TLS, no local delivery."""
    settings = {
        "myhostname": myhostname,
        "myorigin": "$myhostname",
        "relayhost": relayhost,
        "mydestination": "",
        "local_transport": "error:local delivery is disabled",
        "inet_interfaces": "loopback-only",
        "smtp_tls_security_level": "none",
    }
    if fallback_relay:
        settings["smtp_fallback_relay"] = fallback_relay
    return settings


def receiver_settings(
    listen: str, domain: str = "example.net", myhostname: str = "mx.example.net"
) -> dict[str, str]:
    """main.cf for a receiving MTA: listens on ``listen`` (an address in the namespace),
    takes mail for any user at ``domain`` into one Maildir (see maildir_messages())."""
    pw = pwd.getpwnam(MAIL_OWNER)
    return {
        "myhostname": myhostname,
        "inet_interfaces": listen,
        "mydestination": "",
        "virtual_mailbox_domains": domain,
        # One Maildir for every recipient: tests count and hash what arrived.
        "virtual_mailbox_maps": "static:inbox/",
        "virtual_uid_maps": f"static:{pw.pw_uid}",
        "virtual_gid_maps": f"static:{pw.pw_gid}",
        "smtpd_tls_security_level": "none",
    }


class PostfixInstance:
    """One Postfix (Debian's binaries) with private config/queue/data dirs in ``ns``.

    ``main_cf_overrides`` is applied on top of fast test defaults (1 s retry timers, no
    DNS for peer names, no chroot); see null_client_settings()/receiver_settings().
    """

    def __init__(
        self,
        ns: Netns,
        workdir: Path,
        main_cf_overrides: Mapping[str, str] | None = None,
        *,
        name: str = "postfix",
        master_cf_overrides: Sequence[str] = (),
    ) -> None:
        self.ns = ns
        self.name = name
        self.root = service_dir(Path(workdir), name)
        self.config_dir = self.root / "conf"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.mail_dir = self.root / "mail"
        self.log_path = self.root / "maillog"
        self.master_log_path = self.root / "master.out"
        self.overrides = dict(main_cf_overrides or {})
        self.master_cf_overrides = list(master_cf_overrides)
        self.proc: subprocess.Popen[Any] | None = None

    # -- setup ------------------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            # Our own copies of postfix-files/dynamicmaps.cf, so that no Postfix tool
            # (e.g. `postfix -c ... set-permissions`) ever writes below /etc/postfix.
            "meta_directory": str(self.config_dir),
            "mail_owner": MAIL_OWNER,
            "setgid_group": SETGID_GROUP,
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.root),
            "myhostname": f"{self.ns.role}.example.com",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_protocols": "all",
            "inet_interfaces": "loopback-only",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            "biff": "no",
            # Fast retries: a deferred message is retried within about a second.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            # The lab has no DNS; don't wait on reverse lookups of client addresses.
            "smtpd_peername_lookup": "no",
            "virtual_mailbox_base": str(self.mail_dir),
            "smtputf8_enable": "no",
        }
        settings.update(self.overrides)
        return settings

    def configure(self) -> None:
        # Root-owned like /etc/postfix and /var/spool/postfix (Postfix refuses otherwise);
        # create_dirs() makes the postfix-owned queue subdirectories.
        for path in (self.config_dir, self.queue_dir):
            path.mkdir(mode=0o755, exist_ok=True)
        # virtual(8) delivers as the postfix user (receiver_settings()).
        self.mail_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.mail_dir, pwd.getpwnam(MAIL_OWNER).pw_uid, grp.getgrnam(MAIL_OWNER).gr_gid)
        # Nothing of the host's configuration: the package's pristine master.cf (a local
        # admin's may name content filters or services that do not exist here), and
        # main.cf written below.  What is read from /etc/postfix is not configuration but
        # the package's own inventory, which dpkg installs and nobody edits: the list of
        # Postfix's files (postfix-files, for set-permissions) and the map types the
        # installed map packages register (dynamicmaps.cf and the .d directories).
        shutil.copy(POSTFIX_SHARE / "master.cf.dist", self.config_dir / "master.cf")
        shutil.copy(POSTFIX_ETC / "postfix-files", self.config_dir / "postfix-files")
        dynamicmaps = POSTFIX_SHARE / "dynamicmaps.cf"
        shutil.copy(dynamicmaps if dynamicmaps.exists() else POSTFIX_ETC / "dynamicmaps.cf",
                    self.config_dir / "dynamicmaps.cf")
        for meta_d in ("postfix-files.d", "dynamicmaps.cf.d"):
            target = self.config_dir / meta_d
            if (POSTFIX_ETC / meta_d).is_dir() and not target.exists():
                shutil.copytree(POSTFIX_ETC / meta_d, target)
        lines = [f"{key} = {value}" for key, value in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        # Debian chroots most services into the queue dir, which would need copies of
        # /etc files there; a test instance gains nothing from it.
        self.postconf("-F", "*/*/chroot = n")
        for edit in self.master_cf_overrides:
            self.postconf("-M", edit)
        self._backdate_config()

    def _backdate_config(self) -> None:
        # Postfix re-reads a config file until its mtime is over a second old (300 ms
        # naps: "file is being modified"); backdating saves ~1.5 s per command.
        past = time.time() - 10
        for path in self.config_dir.iterdir():
            if path.is_file():
                os.utime(path, (past, past))

    def create_dirs(self) -> None:
        """What `postfix check` (post-install create-missing) does, minus ~40 execs:
        the queue and data directories with owners and modes from postfix-files."""
        values = {
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": MAIL_OWNER,
            "setgid_group": SETGID_GROUP,
        }
        for line in (self.config_dir / "postfix-files").read_text().splitlines():
            fields = line.split(":")
            if line.startswith("#") or len(fields) < 6 or fields[1] != "d" or "c" not in fields[5]:
                continue
            path_s, _, owner, group, mode = (
                re.sub(r"\$(\w+)", lambda m: values.get(m[1], m[0]), f) for f in fields[:5]
            )
            if "$" in path_s:
                continue  # a directory we don't relocate (config/daemon dirs)
            path = Path(path_s)
            path.mkdir(exist_ok=True)
            uid = pwd.getpwnam(owner).pw_uid
            gid = grp.getgrnam(group).gr_gid if group != "-" else 0
            os.chown(path, uid, gid)
            path.chmod(int(mode, 8))

    def set_main_cf(self, settings: Mapping[str, str], reload: bool = True) -> None:
        """Change main.cf of a configured instance; SIGHUP the master unless reload=False."""
        self.overrides.update(settings)
        self.postconf("-e", *(f"{key}={value}" for key, value in settings.items()))
        self._backdate_config()
        if reload and self.proc is not None and self.proc.poll() is None:
            mark = self.log_mark()
            self.proc.send_signal(signal.SIGHUP)
            self.wait_log(r"postfix/master\[\d+\]: reload", since=mark)

    def postconf(self, *args: str) -> str:
        out: str = self.ns.run(["postconf", "-c", str(self.config_dir), *args]).stdout
        return out

    def start(self, timeout: float = 15.0) -> None:
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already started")
        self.configure()
        self.create_dirs()
        mark = self.log_mark()
        out = self.master_log_path.open("ab")
        try:
            # master without -w stays in the foreground: it is our child, stoppable by
            # PID, and it runs in its own session so SIGTERM reaches its daemons.
            self.proc = self.ns.popen(
                [str(DAEMON_DIR / "master"), "-c", str(self.config_dir), "-s"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            out.close()
        try:
            self.wait_log(r"postfix/master\[\d+\]: daemon started", timeout, since=mark)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # master relays SIGTERM to every daemon it started
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # master is a session/process-group leader (setsid): its group is ours.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                stop_process(proc, timeout)
        self.ns.stop(proc)

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- mail -------------------------------------------------------------------------

    def sendmail(self, sender: str, rcpt: str | Sequence[str], message: bytes) -> None:
        """Submit through Postfix's sendmail/postdrop (root may name an alternate config)."""
        rcpts = [rcpt] if isinstance(rcpt, str) else list(rcpt)
        # -i: a lone "." line is data, not end of input - the message goes in unchanged.
        self.ns.run(
            ["sendmail", "-C", str(self.config_dir), "-i", "-f", sender, "--", *rcpts],
            input=message,
        )

    def postqueue(self, *args: str) -> subprocess.CompletedProcess[Any]:
        return self.ns.run(["postqueue", "-c", str(self.config_dir), *args])

    def queue(self) -> list[dict[str, Any]]:
        """Messages in the queue (postqueue -j records: queue_id, queue_name, recipients)."""
        out = self.postqueue("-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_ids(self) -> list[str]:
        return [str(entry["queue_id"]) for entry in self.queue()]

    def queue_empty(self) -> bool:
        return not self.queue()

    def wait_queue_empty(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.queue_empty():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: queue not empty: {self.queue()}\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def flush(self) -> None:
        self.postqueue("-f")

    def maildir_messages(self, mailbox: str = "inbox") -> list[Path]:
        """Delivered messages of a receiver_settings() instance, oldest first."""
        new = self.mail_dir / mailbox / "new"
        cur = self.mail_dir / mailbox / "cur"
        files = [p for d in (new, cur) if d.is_dir() for p in d.iterdir()]
        return sorted(files, key=lambda p: p.stat().st_mtime_ns)

    def wait_maildir(self, n: int, timeout: float = 15.0, mailbox: str = "inbox") -> list[Path]:
        deadline = time.monotonic() + timeout
        while len(files := self.maildir_messages(mailbox)) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {len(files)} of {n} delivered\n{self.log_tail()}")
            time.sleep(0.05)
        return files

    # -- log --------------------------------------------------------------------------

    def wait_delivered(self, marker: bytes, timeout: float = 20.0) -> bytes:
        """The delivered message (in this instance's Maildir) that carries ``marker``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in self.maildir_messages():
                data = path.read_bytes()
                if marker in data:
                    return data
            time.sleep(0.05)
        raise TimeoutError(f"{marker!r} not delivered to {self.name}:\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """Current end of the log, for wait_log(since=...) to ignore older lines."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, regex: str, timeout: float = 15.0, *, since: int = 0) -> re.Match[str]:
        """First match of ``regex`` (multiline) in the log after byte offset ``since``."""
        pattern = re.compile(regex, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.log_path.open("rb") as fh:
                    fh.seek(since)
                    text = fh.read().decode(errors="replace")
            except FileNotFoundError:
                text = ""
            if m := pattern.search(text):
                return m
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: master exited ({self.proc.returncode}):"
                    f" {self._master_out()}\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: no /{regex}/ in log after {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _master_out(self) -> str:
        try:
            return self.master_log_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return ""


@dataclass
class SinkMessage:
    """One transaction captured by smtp-sink -d."""

    path: Path
    client_addr: str
    helo: str | None
    mail_args: str
    rcpt_args: list[str] = field(default_factory=list)
    # Header+body as smtp-sink stored it: every CR dropped, dot-unstuffed, and the
    # "\n" that smtp-sink keeps from the final ".\r\n" removed.
    content: bytes = b""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


def parse_sink_dump(path: Path) -> SinkMessage:
    data = path.read_bytes()
    lines = data.split(b"\n")
    meta: dict[str, list[str]] = {}
    i = 0
    while i < len(lines) and not lines[i].startswith(b"Received: "):
        key, _, value = lines[i].decode(errors="replace").partition(": ")
        meta.setdefault(key, []).append(value)
        i += 1
    # smtp-sink's own Received: header is exactly three lines (see smtp-sink(1)).
    body = b"\n".join(lines[i + 3 :])
    if body.endswith(b"\n"):
        body = body[:-1]
    return SinkMessage(
        path=path,
        client_addr=meta.get("X-Client-Addr", [""])[0],
        helo=meta.get("X-Helo-Args", [None])[0],
        mail_args=meta.get("X-Mail-Args", [""])[0],
        rcpt_args=meta.get("X-Rcpt-Args", []),
        content=body,
    )


class SmtpSink:
    """Postfix's smtp-sink on ``host:port`` in ``ns``, one dump file per transaction.

    Not byte-exact: the dump drops every CR and the dot of dot-stuffed lines. For
    byte-for-byte checks (A2) compare hashes on the wire or use a Python sink.
    """

    def __init__(
        self,
        ns: Netns,
        host: str,
        port: int,
        workdir: Path,
        *,
        name: str | None = None,
        extra_args: Sequence[str] = (),
        backlog: int = 128,
    ) -> None:
        self.ns = ns
        self.host = host
        self.port = port
        self.name = name or f"sink-{host.replace(':', '_')}-{port}"
        self.dump_dir = service_dir(Path(workdir), self.name, user="nobody")
        self.stderr_path = Path(workdir) / f"{self.name}.err"
        self.extra_args = list(extra_args)
        self.backlog = backlog
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 10.0, wait: bool = True) -> SmtpSink:
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        os.chown(self.dump_dir, pwd.getpwnam("nobody").pw_uid, -1)
        with self.stderr_path.open("ab") as err:
            self.proc = self.ns.popen(
                # -u: smtp-sink refuses to keep root after binding.
                [
                    "smtp-sink",
                    "-u",
                    "nobody",
                    "-d",
                    f"{self.dump_dir}/%Y%m%d%H%M%S.",
                    *self.extra_args,
                    listen,
                    str(self.backlog),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        if wait:  # our probe is one (empty) session: pass wait=False with -n/-q CONNECT
            wait_port(self.ns, self.host, self.port, timeout)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.ns.stop(self.proc)
            self.proc = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def files(self) -> list[Path]:
        """Dumps of completed transactions. smtp-sink creates the file at MAIL FROM,
        closes it when "." arrives (before replying) and deletes it if the transaction
        is aborted, so the files it still holds open are transactions in progress."""
        # By inode, not by the link's text: the text is the path as seen from smtp-sink's
        # root, which differs from ours under a chroot (scripts/fresh-check).
        in_progress: set[tuple[int, int]] = set()
        if self.proc is not None and self.proc.poll() is None:
            fd_dir = Path(f"/proc/{self.proc.pid}/fd")
            with contextlib.suppress(FileNotFoundError):
                for fd in fd_dir.iterdir():
                    with contextlib.suppress(FileNotFoundError):
                        st = fd.stat()
                        in_progress.add((st.st_dev, st.st_ino))
        return sorted(
            p for p in self.dump_dir.iterdir()
            if p.is_file() and (p.stat().st_dev, p.stat().st_ino) not in in_progress
        )

    def count(self) -> int:
        return len(self.files())

    def messages(self) -> list[SinkMessage]:
        return [parse_sink_dump(p) for p in self.files()]

    def wait_count(self, n: int, timeout: float = 15.0) -> list[SinkMessage]:
        """Wait for at least ``n`` complete dumps (written when "." is received)."""
        deadline = time.monotonic() + timeout
        while (have := self.count()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {have} of {n} messages after {timeout}s")
            time.sleep(0.05)
        return self.messages()


def smtp_source(
    ns: Netns,
    host: str,
    port: int = 25,
    *,
    count: int = 1,
    sessions: int = 1,
    size: int | None = None,
    sender: str | None = None,
    rcpt: str | None = None,
    helo: str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
    check: bool = True,
) -> subprocess.CompletedProcess[Any]:
    """Run Postfix's smtp-source from ``ns`` to completion (-m count -s sessions -l size)."""
    args = ["smtp-source", "-m", str(count), "-s", str(sessions)]
    if size is not None:
        args += ["-l", str(size)]
    if sender is not None:
        args += ["-f", sender]
    if rcpt is not None:
        args += ["-t", rcpt]
    if helo is not None:
        args += ["-M", helo]
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ns.run([*args, *extra_args, target], check=check, timeout=timeout)


def tls_receiver_settings(
    listen: str,
    chain_file: str | Path,
    domain: str = "example.net",
    myhostname: str = "mx.example.net",
) -> dict[str, str]:
    """receiver_settings() plus opportunistic STARTTLS with the key and chain in
    ``chain_file`` (key first, then leaf and issuers: gatelab.certs.write_chain_file()).
    TLS connections are logged (loglevel 1) and noted in the Received: header, so a
    delivered message shows whether and how it came in over TLS."""
    settings = receiver_settings(listen, domain=domain, myhostname=myhostname)
    settings.update(
        {
            "smtpd_tls_security_level": "may",
            "smtpd_tls_chain_files": str(chain_file),
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
        }
    )
    return settings

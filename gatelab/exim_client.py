"""Exim 4.96 (Debian's binary, unpacked by scripts/bootstrap-debian; never the host's MTA) in
lab namespaces, each instance with a private config, spool and log:

- :class:`EximClient`, the sending MTA: a message delivered in the foreground (``-odi``) to
  a fixed host, with Exim's own habits on the wire (PIPELINING, CHUNKING, the final chunk
  and QUIT in one segment, then a half-close); its queue read and re-run.
- :class:`EximServer`, the receiving MTA: ``exim -bdf`` listening in a namespace, taking
  mail for one domain into one Maildir.  Debian's ``exim4-daemon-light`` is built without
  SUPPORT_PROXY (``hosts_proxy`` is an unknown option): behind the inbound gateway it keeps
  the client's address only with ``client_address: transparent``.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gatelab.interop import MTA_ROOTS, LabMta, LogFile, Maildir, PrivateDir, root_usable
from gatelab.netlab import Netns, wait_port

EXIM_ROOT = MTA_ROOTS / "exim4"
EXIM = EXIM_ROOT / "usr/sbin/exim4"
EXIM_USER = "Debian-exim"  # compiled into Debian's binary
# A queue listing's message ids (4.96's 6-6-2 base-62 form).
_MESSAGE_ID = re.compile(r"\b[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}\b")


def exim_usable() -> str | None:
    """None when an Exim client can run here, else why not (for skip())."""
    return root_usable("exim4", "usr/sbin/exim4", EXIM_USER)


def main_option_error(option: str) -> str:
    """What Exim says of a main ``option`` set in a config (``""``: it is known): whether
    the binary was built with the feature behind it (``hosts_proxy``: SUPPORT_PROXY)."""
    with tempfile.TemporaryDirectory(prefix="sg-exim-") as tmp:
        conf = Path(tmp) / "probe.conf"
        # Its complaint goes to a panic log: here, not the host's /var/log/exim4.
        conf.write_text(f"log_file_path = {tmp}/%slog\nkeep_environment =\n"
                        f"{option} = 192.0.2.1\n")
        cp = subprocess.run([str(EXIM), "-C", str(conf), "-bP", option], capture_output=True,
                            text=True, check=False, timeout=30)
    if cp.returncode == 0:
        return ""
    said = " ".join(cp.stderr.split())
    m = re.search(r"Exim configuration error in line \d+ of \S+: (.+?)(?= \d{4}-|$)", said)
    return m.group(1) if m else said


class _Exim(LabMta):
    """What both roles share: the private tree (owned by the Exim user, who receives and
    delivers), running the binary against its config, the main log."""

    def __init__(self, ns: Netns, subdirs: Sequence[str]) -> None:
        self.ns = ns
        self.tree = PrivateDir("sg-exim-", EXIM_USER, ("spool", "log", *subdirs))
        self.dir = self.tree.path
        self.conf = self.dir / "exim.conf"
        self.name = "Exim"
        self.mta_log = LogFile(self.dir / "log" / "mainlog", "Exim")

    def common(self, hostname: str) -> list[str]:
        return [
            f"exim_path = {EXIM}",  # it re-execs itself for a delivery
            "keep_environment =",
            f"primary_hostname = {hostname}",
            f"spool_directory = {self.dir / 'spool'}",
            f"log_file_path = {self.dir / 'log'}/%slog",
            "never_users =",
            "trusted_users = root",
            # No DNS for clients' names, no ident callbacks: nothing in the lab answers.
            "host_lookup =",
            "rfc1413_hosts =",
            "rfc1413_query_timeout = 0s",
        ]

    def exim(self, *args: str, data: bytes | None = None, check: bool = True) -> str:
        """Runs Exim; a failure to run at all (a missing library, a config error) raises
        with what Exim said, rather than showing up later as mail that never came."""
        cp = self.ns.run([str(EXIM), "-C", str(self.conf), *args], input=data, text=False,
                         check=False, timeout=60)
        if check and cp.returncode != 0:
            raise RuntimeError(f"exim {' '.join(args)}: exit {cp.returncode}: "
                               f"{cp.stderr.decode(errors='replace')[-1000:]}")
        out: bytes = cp.stdout
        return out.decode(errors="replace")

    def queued(self) -> str:
        """``exim -bp``: empty when nothing is left in the queue; else each message with
        the recipients not yet delivered."""
        return self.exim("-bp").strip()

    def message_ids(self) -> list[str]:
        return _MESSAGE_ID.findall(self.queued())

    def close(self) -> None:
        self.tree.remove()


class EximClient(_Exim):
    """``send()`` delivers one message to ``host:port`` at once; ``queued()`` lists what
    Exim still holds, ``run_queue()`` tries it again.  ``tls=False``: hosts_avoid_tls, so
    the gateway does the upgrade; ``tls=True``: Exim's default, opportunistic STARTTLS."""

    def __init__(self, ns: Netns, host: str, port: int = 25, *, tls: bool = False) -> None:
        super().__init__(ns, ())
        self.conf.write_text("\n".join([
            *self.common("mta.example.com"),
            "begin routers",
            "to_peer:",
            "  driver = manualroute",
            "  domains = *",
            "  transport = remote",
            f"  route_list = * {host} byname",
            "  self = send",
            "begin transports",
            "remote:",
            "  driver = smtp",
            f"  port = {port}",
            *([] if tls else ["  hosts_avoid_tls = *"]),
            "begin retry",
            "* * F,1h,1m",
            "",
        ]))

    def send(self, sender: str, rcpt: str | Sequence[str], message: bytes) -> None:
        """Submits ``message`` (``-i``: a lone dot is content) and delivers it at once;
        a deferral leaves it in the queue (see queued())."""
        rcpts = [rcpt] if isinstance(rcpt, str) else list(rcpt)
        self.exim("-odi", "-i", "-f", sender, "--", *rcpts, data=message)

    def run_queue(self) -> None:
        """One forced queue run in the foreground (``-qff``: retry times and frozen state
        ignored), as an operator's retry would."""
        self.exim("-qff")

    def __enter__(self) -> EximClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EximServer(_Exim):
    """Exim's daemon in the foreground (``-bdf``, our child, stopped by PID) on
    ``address:port`` in ``ns``: mail for any user at ``domain`` into one Maildir (with
    Return-Path and Envelope-to, so a test can tell whose envelope a message came in),
    relaying refused.  ``extra`` lines go into the main section."""

    def __init__(self, ns: Netns, address: str, *, port: int = 25, domain: str = "b.test",
                 hostname: str = "legacy.b.test", extra: Sequence[str] = ()) -> None:
        super().__init__(ns, ("mail",))
        self.address, self.port = address, port
        self.maildir = self.dir / "mail" / "inbox"
        self.inbox = Maildir(self.maildir, "Exim")
        listen = f"<; {address}.{port}"  # "<;": a list separator an IPv6 address cannot hold
        self.conf.write_text("\n".join([
            *self.common(hostname),
            f"local_interfaces = {listen}",
            f"daemon_smtp_ports = {port}",
            f"pid_file_path = {self.dir / 'exim.pid'}",  # not the host's /run/exim4
            "acl_smtp_rcpt = rcpt",
            # Deliveries run as the Exim user from the start: the receiving process re-execs
            # Exim with -C, which a non-root caller does not regain root with.
            "deliver_drop_privilege = true",
            "log_selector = +smtp_connection +received_recipients +smtp_protocol_error "
            "+smtp_syntax_error",
            *extra,
            "begin acl",
            "rcpt:",
            f"  accept domains = {domain}",
            "  deny message = relay not permitted",
            "begin routers",
            "inbox:",
            "  driver = accept",
            f"  domains = {domain}",
            "  transport = maildir",
            "begin transports",
            "maildir:",
            "  driver = appendfile",
            f"  directory = {self.maildir}",
            "  maildir_format",
            "  create_directory",
            "  delivery_date_add",
            "  envelope_to_add",
            "  return_path_add",
            f"  user = {EXIM_USER}",
            "begin retry",
            "* * F,1h,1m",
            "",
        ]))
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 15.0) -> EximServer:
        err = (self.dir / "log" / "daemon.out").open("wb")
        with err:
            self.proc = self.ns.popen([str(EXIM), "-C", str(self.conf), "-bdf"],
                                      stdout=err, stderr=err)
        try:
            wait_port(self.ns, self.address, self.port, timeout)
        except TimeoutError as exc:
            raise RuntimeError(f"exim daemon not listening: exit {self.proc.poll()}: "
                               f"{(self.dir / 'log' / 'daemon.out').read_text()}"
                               f"{self.log()[-2000:]}") from exc
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.ns.stop(self.proc)
            self.proc = None

    def close(self) -> None:
        self.stop()
        super().close()

    def __enter__(self) -> EximServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Exim 4.96 (Debian's binary, unpacked by scripts/bootstrap-debian) as a sending MTA in a
lab namespace: a private config, spool and log; one message delivered in the foreground
(``-odi``) to a fixed host, with Exim's own habits on the wire (PIPELINING, CHUNKING, the
final dot and QUIT in one segment, then a half-close).
"""

from __future__ import annotations

import pwd
import shutil
import tempfile
from pathlib import Path

from gatelab.netlab import Netns

EXIM_ROOT = Path("/var/lib/smtpgate-tests/exim4")
EXIM = EXIM_ROOT / "usr/sbin/exim4"
EXIM_USER = "Debian-exim"  # compiled into Debian's binary


def exim_usable() -> str | None:
    """None when an Exim client can run here, else why not (for skip())."""
    if not EXIM.exists():
        return f"{EXIM} missing (scripts/bootstrap-debian unpacks it)"
    try:
        pwd.getpwnam(EXIM_USER)
    except KeyError:
        return f"user {EXIM_USER} missing (scripts/bootstrap-debian creates it)"
    return None


class EximClient:
    """``send()`` delivers one message to ``host:port`` at once; ``queued()`` lists what
    Exim still holds.  ``tls=False``: hosts_avoid_tls, so the gateway does the upgrade."""

    def __init__(self, ns: Netns, host: str, port: int = 25, *, tls: bool = False) -> None:
        self.ns = ns
        self.dir = Path(tempfile.mkdtemp(prefix="sg-exim-"))
        self.dir.chmod(0o755)
        ids = pwd.getpwnam(EXIM_USER)
        for sub in ("spool", "log"):
            (self.dir / sub).mkdir()
            shutil.chown(self.dir / sub, ids.pw_uid, ids.pw_gid)
        self.conf = self.dir / "exim.conf"
        self.conf.write_text("\n".join([
            f"exim_path = {EXIM}",  # it re-execs itself for the delivery
            "keep_environment =",
            "primary_hostname = mta.example.com",
            f"spool_directory = {self.dir / 'spool'}",
            f"log_file_path = {self.dir / 'log'}/%slog",
            "never_users =",
            "trusted_users = root",
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

    def exim(self, *args: str, data: bytes | None = None) -> str:
        """Runs Exim; a failure to run at all (a missing library, a config error) raises
        with what Exim said, rather than showing up later as mail that never came."""
        cp = self.ns.run([str(EXIM), "-C", str(self.conf), *args], input=data, text=False,
                         check=False, timeout=60)
        if cp.returncode != 0:
            raise RuntimeError(f"exim {' '.join(args)}: exit {cp.returncode}: "
                               f"{cp.stderr.decode(errors='replace')[-1000:]}")
        out: bytes = cp.stdout
        return out.decode(errors="replace")

    def send(self, sender: str, rcpt: str, message: bytes) -> None:
        self.exim("-odi", "-f", sender, rcpt, data=message)

    def queued(self) -> str:
        """``exim -bp``: empty when nothing is left in the queue."""
        return self.exim("-bp").strip()

    def log(self) -> str:
        path = self.dir / "log" / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EximClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

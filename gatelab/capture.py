"""tcpdump in a lab namespace: what crossed the wire, as the tests' witness."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from gatelab.netlab import Netns


class Capture:
    """Full packets on ``interface`` in ``ns`` while the context is open."""

    def __init__(self, ns: Netns, interface: str, path: Path, bpf: str = "tcp") -> None:
        self.ns, self.interface, self.path, self.bpf = ns, interface, path, bpf
        self.err = path.with_suffix(".err")
        self.proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> Capture:
        with self.err.open("wb") as err:
            # --immediate-mode: hand packets over at once, not when a ring block fills (a
            # short test would otherwise end with them unread); -U: write each at once.
            self.proc = self.ns.popen(["tcpdump", "-i", self.interface, "-n", "-U", "-Z", "root",
                                       "--immediate-mode",
                                       "-s", "0", "-w", str(self.path), self.bpf],
                                      stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 10
        while b"listening on" not in self.err.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tcpdump did not start: {self.err.read_text()}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # flushes and prints its counters
            try:
                self.proc.wait(10)
            finally:
                self.ns.stop(self.proc)
            self.proc = None

    def data(self) -> bytes:
        return self.path.read_bytes()

    def packets(self) -> int:
        """Packets captured, from tcpdump's own count."""
        for line in self.err.read_text().splitlines():
            if line.endswith("packets captured"):
                return int(line.split()[0])
        return 0

    def contains(self, marker: bytes) -> bool:
        """True when ``marker`` crossed in the clear (inside one packet's payload)."""
        return marker in self.data()

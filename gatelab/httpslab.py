"""MTA-STS policy hosts for the lab: a real nginx serving ``https://mta-sts.<domain>/
.well-known/mta-sts.txt`` under a test WebPKI, faults on demand, and the DNS it needs.

    pki = WebPki.make()
    with Lab() as lab, DnsWorld.on_lab(lab) as world, \\
            PolicyHost.on_lab(lab, pki) as host:
        world.zone("test.", sts_records("b.test", POLICY_V4, "1"))
        world.start()
        host.add_domain("b.test", policy("enforce", ["mx.b.test"]))
        host.start()
        ...  # the gateway in gw fetches it, trusting pki.write_bundle(path)

One nginx (Debian's, ``daemon off``, master and one worker, run as root so that it can
read a pytest ``tmp_path``) per :class:`PolicyHost`, our child in the given namespace,
with its config, certificates, documents, logs and temp dirs in its own work directory.
Every domain is a virtual host chosen by SNI, with its own certificate; a name nobody
declared is refused in the handshake. A change rewrites the config, checks it
(``nginx -t``), signals the master (HUP) and returns once no worker of the old config
is left (nginx cuts requests still running after ``worker_shutdown_timeout``, 1 s).
The stall fault is nginx's too (``echo_sleep`` from libnginx-mod-http-echo, which
Debian 12's nginx-light pulls in).

Report sinks (:meth:`PolicyHost.add_report_sink`): a virtual host that takes POSTs at a path
and keeps each body in a file of its own (``client_body_in_file_only``, the body read by
``echo_read_request_body``), named in the access log; :meth:`PolicyHost.posts` reads them
back (TLS-RPT's ``https:`` reports, RFC 8460 5.4).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import http.client
import http.server
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

from gatelab.certs import Issued, WebPki, expired
from gatelab.dnslab import DnsWorld
from gatelab.netlab import HOST_IF, Lab, Netns, alive, descendants, wait_port

NGINX = "/usr/sbin/nginx"
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
WELL_KNOWN = "/.well-known/mta-sts.txt"

# Where PolicyHost.on_lab() listens (added to the peer's eth0, removed on close).
POLICY_V4 = "203.0.113.43"
POLICY_V6 = "2001:db8:2::443"

CertKind = Literal["valid", "wrong-name", "untrusted", "expired"]

_live: list[PolicyHost] = []
_live_lock = threading.Lock()


class HttpsLabError(RuntimeError):
    """nginx failed; the message carries its error log's tail."""


def httpslab_usable() -> str | None:
    """None when a PolicyHost can run here, else why not (for skip())."""
    if os.geteuid() != 0:
        return "the HTTPS lab needs root (network namespaces, port 443)"
    if not Path(NGINX).exists() or not ECHO_MODULE.exists():
        return "nginx or its echo module missing (apt-get install nginx-light)"
    return None


# -- DNS ----------------------------------------------------------------------------------


def sts_txt(policy_id: str) -> str:
    """The ``_mta-sts`` TXT rdata announcing policy ``policy_id``."""
    return f'"v=STSv1; id={policy_id};"'


def sts_records(domain: str, addresses: str | Sequence[str], policy_id: str) -> list[str]:
    """Zone lines (absolute owners, for the zone holding ``domain``) that announce an
    MTA-STS policy: ``_mta-sts.<domain>`` TXT and ``mta-sts.<domain>`` A/AAAA."""
    domain = _domain(domain)
    addrs = [addresses] if isinstance(addresses, str) else list(addresses)
    lines = [f"_mta-sts.{domain}. TXT {sts_txt(policy_id)}"]
    for a in addrs:
        rdtype = "AAAA" if ipaddress.ip_address(a).version == 6 else "A"
        lines.append(f"mta-sts.{domain}. {rdtype} {a}")
    return lines


def set_sts_id(world: DnsWorld, zone: str, domain: str, policy_id: str) -> None:
    """Announce a new policy id: replace the TXT record (re-signed, Unbound flushed)."""
    world.set_records(zone, f"_mta-sts.{_domain(domain)}.", "TXT", [sts_txt(policy_id)])


def policy(mode: str, mx: Sequence[str], max_age: int = 86400) -> str:
    """An RFC 8461 policy body (CRLF line ends, as the RFC writes them)."""
    lines = ["version: STSv1", f"mode: {mode}", *[f"mx: {m}" for m in mx], f"max_age: {max_age}"]
    return "".join(f"{line}\r\n" for line in lines)


def _domain(domain: str) -> str:
    return domain.rstrip(".").lower()


# -- the server ---------------------------------------------------------------------------


class Post(NamedTuple):
    """One request to a report sink, as nginx logged it, with the body it kept."""

    time: float  # when it arrived (epoch seconds, ms resolution)
    host: str  # the Host header
    sni: str
    method: str
    path: str
    status: int
    content_type: str  # the request's Content-Type
    body: bytes  # as received (b"" when the sink answered without keeping it)


class Fetch(NamedTuple):
    """One request as nginx logged it."""

    time: float  # when it arrived (epoch seconds, ms resolution)
    duration: float  # seconds until nginx was done with it
    host: str  # the Host header (or the vhost's name)
    sni: str  # the TLS server name the client sent
    path: str  # the request URI
    status: int  # 499: the client gave up first
    bytes: int  # body bytes sent
    client: str  # the client's address
    user_agent: str


@dataclass
class _Site:
    domain: str
    policy: str
    chain: tuple[Issued, ...]  # leaf first
    content_type: str = "text/plain"
    answer: list[str] = field(default_factory=list)  # nginx directives replacing the file
    size: int | None = None  # pad the served body to this many bytes

    @property
    def host(self) -> str:
        return f"mta-sts.{self.domain}"


@dataclass
class _Sink:
    host: str
    path: str
    chain: tuple[Issued, ...]
    status: int = 200  # 2xx: the body is read and kept; else the answer, body discarded


class PolicyHost:
    """A real nginx serving MTA-STS policies, one SNI virtual host per domain.

    Faults of the policy URL, one at a time (each replaces the last; :meth:`set_policy`
    ends it): :meth:`redirect`, :meth:`fail`, :meth:`oversize`, :meth:`stall`; besides,
    :meth:`set_content_type`, the certificate (:meth:`present`, :meth:`use_certificate`),
    :meth:`remove_domain`, and :meth:`stop` / :meth:`start` for the whole server. Every
    change is live when the call returns.
    """

    def __init__(
        self,
        ns: Netns,
        addresses: Sequence[str],
        pki: WebPki,
        workdir: Path | str | None = None,
        *,
        dev: str | None = None,
        port: int = 443,
    ) -> None:
        """
        addresses: where nginx listens in ``ns``; added there as /32 or /128 to ``dev``
            when given (and removed on close), else they must exist already.
        pki: issues each domain's certificate (clients trust ``pki.root``).
        workdir: a fresh subdirectory is made there (default: a temporary directory);
            removed by close().
        """
        self.ns = ns
        self.addresses = list(addresses)
        self.pki = pki
        self.dev = dev
        self.port = port
        base = Path(workdir) if workdir is not None else None
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="httpslab-", dir=base))
        self.conf = self.workdir / "nginx.conf"
        self.error_log = self.workdir / "error.log"
        self.access_log = self.workdir / "access.log"
        self._sites: dict[str, _Site] = {}
        self._sinks: dict[str, _Sink] = {}
        self._proc: subprocess.Popen[Any] | None = None
        self._added: list[str] = []
        self._closed = False
        with _live_lock:
            _live.append(self)

    @classmethod
    def on_lab(cls, lab: Lab, pki: WebPki, workdir: Path | str | None = None) -> PolicyHost:
        """In the peer namespace on POLICY_V4 and POLICY_V6 (added to its eth0)."""
        return cls(lab.peer, [POLICY_V4, POLICY_V6], pki, workdir, dev=HOST_IF)

    # -- declaring and changing --------------------------------------------------------

    def add_domain(self, domain: str, text: str) -> None:
        """Serve ``text`` as ``domain``'s policy, with a valid certificate from the PKI."""
        domain = _domain(domain)
        leaf = self.pki.leaf([f"mta-sts.{domain}"])
        self._sites[domain] = _Site(domain, text, (leaf, *self.pki.chain))
        self._apply()

    def remove_domain(self, domain: str) -> None:
        """No virtual host for ``domain`` any more: its name is refused in the handshake."""
        del self._sites[_domain(domain)]
        self._apply()

    def set_policy(self, domain: str, text: str) -> None:
        """Serve ``text`` (200, the current Content-Type); ends redirect/fail/oversize/stall."""
        site = self._site(domain)
        site.policy, site.answer, site.size = text, [], None
        self._apply()

    def reset(self, domain: str, text: str | None = None) -> None:
        """Back to normal in one reload: no fault, ``text/plain``, a valid certificate;
        ``text`` as the policy when given."""
        site = self._site(domain)
        site.answer, site.size, site.content_type = [], None, "text/plain"
        site.chain = (self.pki.leaf([site.host]), *self.pki.chain)
        if text is not None:
            site.policy = text
        self._apply()

    def set_content_type(self, domain: str, content_type: str) -> None:
        """The Content-Type the policy is served with (default ``text/plain``)."""
        self._site(domain).content_type = content_type
        self._apply()

    def redirect(self, domain: str, location: str, status: int = 301) -> None:
        """Answer the policy URL with a redirect to ``location``."""
        self._fault(domain, [f"return {status} {_quote(location)};"])

    def fail(self, domain: str, status: int = 404) -> None:
        """Answer the policy URL with ``status`` (404, 500, ...) and nginx's error page."""
        self._fault(domain, [f"return {status};"])

    def oversize(self, domain: str, size: int = 100 * 1024) -> None:
        """Serve the policy padded with ``x-filler`` lines to ``size`` bytes (200)."""
        self._fault(domain, [], size)

    def stall(self, domain: str, seconds: float) -> None:
        """Send nothing for ``seconds`` (not even the status line), then the policy."""
        # echo_sleep holds the request in the worker without blocking it; the file is
        # sent afterwards by an internal redirect to a location no client can name.
        self._fault(domain, [f"echo_sleep {seconds:.3f};", "echo_exec @policy;"])

    def present(self, domain: str, kind: CertKind) -> None:
        """Present a certificate of ``kind`` for ``domain``: ``valid`` (back to normal),
        ``wrong-name`` (the PKI's, for www.<domain>), ``untrusted`` (right name, from a
        root clients do not trust) or ``expired`` (the PKI's, right name)."""
        domain = _domain(domain)
        host = f"mta-sts.{domain}"
        if kind == "valid":
            chain = (self.pki.leaf([host]), *self.pki.chain)
        elif kind == "wrong-name":
            chain = (self.pki.leaf([f"www.{domain}"]), *self.pki.chain)
        elif kind == "untrusted":
            stranger = WebPki.make("smtpgate untrusted root")
            chain = (stranger.leaf([host]), *stranger.chain)
        else:
            chain = (self.pki.leaf([host], **expired()), *self.pki.chain)
        self.use_certificate(domain, *chain)

    def use_certificate(self, domain: str, leaf: Issued, *chain: Issued) -> None:
        """Present ``leaf`` (then ``chain``) for ``domain``: any certificate a test made."""
        self._site(domain).chain = (leaf, *chain)
        self._apply()

    def add_report_sink(self, host: str, path: str = "/tlsrpt") -> str:
        """Take POSTs at ``https://host/path`` (a certificate for ``host`` from the PKI),
        keeping each body (see :meth:`posts`); returns that URL (no port: 443)."""
        host = _domain(host)
        if not path.startswith("/") or any(c in path for c in ' ;{}"\\'):
            raise ValueError(f"path {path!r}")
        self._sinks[host] = _Sink(host, path, (self.pki.leaf([host]), *self.pki.chain))
        self._apply()
        return f"https://{host}{'' if self.port == 443 else f':{self.port}'}{path}"

    def sink_status(self, host: str, status: int) -> None:
        """Answer the sink's POSTs with ``status`` (a 2xx keeps the body, anything else is
        answered without reading it: a receiver that is down or refuses)."""
        sink = self._sinks.get(_domain(host))
        if sink is None:
            raise KeyError(f"no report sink {host!r} (sinks: {sorted(self._sinks)})")
        sink.status = status
        self._apply()

    def posts(self, host: str | None = None, *, at_least: int = 0,
              timeout: float = 5.0) -> list[Post]:
        """The requests to the sinks (``host``'s, else all), oldest first, with their kept
        bodies; waits up to ``timeout`` for ``at_least`` of them."""
        name = _domain(host) if host is not None else None
        found: list[Post] = []

        def enough() -> bool:
            nonlocal found
            found = [p for p in self._read_posts() if name is None or p.host == name]
            return len(found) >= at_least

        _wait(enough, timeout if at_least else 0.0)
        return found

    def _read_posts(self) -> list[Post]:
        sinks = set(self._sinks)
        out = []
        for e in self._log_entries():
            if e["host"] not in sinks:
                continue
            kept = e.get("body", "")
            body = Path(kept).read_bytes() if kept and Path(kept).is_file() else b""
            msec, rt = float(e["msec"]), float(e["rt"])
            out.append(Post(msec - rt, e["host"], e["sni"], e.get("method", ""), e["uri"],
                            int(e["status"]), e.get("ctype", ""), body))
        return out

    def _fault(self, domain: str, answer: list[str], size: int | None = None) -> None:
        site = self._site(domain)
        site.answer, site.size = answer, size  # one fault at a time: it replaces the last
        self._apply()

    def _site(self, domain: str) -> _Site:
        site = self._sites.get(_domain(domain))
        if site is None:
            raise KeyError(f"no domain {domain!r} (domains: {sorted(self._sites)})")
        return site

    # -- configuration -----------------------------------------------------------------

    def _write(self) -> None:
        certs, docs, tmp = (self.workdir / d for d in ("certs", "docs", "tmp"))
        for d in (certs, docs, tmp):
            d.mkdir(exist_ok=True)
        listen = [f"[{a}]" if ":" in a else a for a in self.addresses]
        lines = [
            "daemon off;",  # our child, stopped by PID
            "master_process on;",  # reloads by HUP, without a gap in listening
            "worker_processes 1;",
            "worker_shutdown_timeout 1s;",  # a reload waits at most this for old requests
            "user root root;",  # workers read the work dir, maybe below a 0700 tmp_path
            f"pid {self.workdir / 'nginx.pid'};",
            f"error_log {self.error_log} info;",
            f"load_module {ECHO_MODULE};",
            "events { worker_connections 256; }",
            "http {",
            "    log_format lab escape=json '{\"msec\":\"$msec\",\"rt\":\"$request_time\","
            "\"host\":\"$host\",\"sni\":\"$ssl_server_name\",\"uri\":\"$request_uri\","
            "\"status\":\"$status\",\"bytes\":\"$body_bytes_sent\","
            "\"client\":\"$remote_addr\",\"ua\":\"$http_user_agent\","
            "\"method\":\"$request_method\",\"ctype\":\"$content_type\","
            "\"body\":\"$request_body_file\"}';",
            f"    access_log {self.access_log} lab;",
            *[f"    {what}_temp_path {tmp / what};"
              for what in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")],
            "    keepalive_timeout 0;",  # one request per connection: old workers exit at once
            "    server_tokens off;",
            "    ssl_protocols TLSv1.2 TLSv1.3;",
            "    server {",  # any name not declared: no certificate, handshake refused
            *[f"        listen {a}:{self.port} ssl default_server;" for a in listen],
            "        ssl_reject_handshake on;",
            "    }",
        ]
        for site in self._sites.values():
            cert = certs / f"{site.domain}.pem"
            key = certs / f"{site.domain}.key"
            cert.write_bytes(b"".join(c.pem for c in site.chain))
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(site.chain[0].key_pem)
            root = docs / site.domain
            (root / ".well-known").mkdir(parents=True, exist_ok=True)
            (root / WELL_KNOWN.lstrip("/")).write_bytes(_body(site.policy, site.size))
            types = f"types {{ }} default_type {_quote(site.content_type)};"
            lines += [
                "    server {",
                *[f"        listen {a}:{self.port} ssl;" for a in listen],
                f"        server_name {site.host};",
                f"        ssl_certificate {cert};",
                f"        ssl_certificate_key {key};",
                f"        root {root};",
                f"        location = {WELL_KNOWN} {{ {types} {' '.join(site.answer)} }}",
                f"        location @policy {{ {types} try_files {WELL_KNOWN} =404; }}",
                "        location / { return 404; }",
                "    }",
            ]
        for sink in self._sinks.values():
            cert = certs / f"sink-{sink.host}.pem"
            key = certs / f"sink-{sink.host}.key"
            cert.write_bytes(b"".join(c.pem for c in sink.chain))
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(sink.chain[0].key_pem)
            # The body read (echo_read_request_body) into a file that outlives the request
            # (client_body_in_file_only), named by $request_body_file in the access log.
            take = ["client_body_in_file_only on;", "client_max_body_size 1m;",
                    "echo_read_request_body;", f"echo_status {sink.status};", "echo ok;"] \
                if 200 <= sink.status < 300 else [f"return {sink.status};"]
            lines += [
                "    server {",
                *[f"        listen {a}:{self.port} ssl;" for a in listen],
                f"        server_name {sink.host};",
                f"        ssl_certificate {cert};",
                f"        ssl_certificate_key {key};",
                f"        location = {sink.path} {{ {' '.join(take)} }}",
                "        location / { return 404; }",
                "    }",
            ]
        lines.append("}")
        self.conf.write_text("\n".join(lines) + "\n")

    def _nginx(self, *args: str) -> None:
        cp = self.ns.run(self._argv(*args), check=False)
        if cp.returncode != 0:
            raise HttpsLabError(f"nginx {' '.join(args)}: {cp.stderr.strip()}")

    def _argv(self, *args: str) -> list[str]:
        # -e: the log for what happens before the config is read (else /var/log/nginx).
        # fmt: off
        return [NGINX, "-p", f"{self.workdir}/", "-e", str(self.error_log),
                "-c", str(self.conf), *args]
        # fmt: on

    def _apply(self) -> None:
        if self._closed:
            raise RuntimeError("closed")
        self._write()
        if self._proc is not None:
            # A config nginx rejects on HUP would leave the old one serving: check first
            # (-t binds the listen addresses, so only once they exist; EADDRINUSE is fine).
            self._nginx("-t")
            self._reload()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start nginx (again, after :meth:`stop`); returns once it accepts connections."""
        if self._closed:
            raise RuntimeError("closed")
        if self._proc is not None:
            raise RuntimeError("already running")
        self._write()
        if self.dev is not None and not self._added:
            for a in self.addresses:
                cidr = f"{a}/128" if ":" in a else f"{a}/32"
                self.ns.ip("addr", "add", cidr, "dev", self.dev, *(["nodad"] if ":" in a else []))
                self._added.append(cidr)
        with (self.workdir / "nginx.out").open("ab") as out:
            self._proc = self.ns.popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            for a in self.addresses:
                if not _wait(functools.partial(self._listening, a), timeout):
                    raise HttpsLabError(
                        f"nginx not listening on {a}:{self.port} after {timeout}s:\n"
                        f"{self.log_tail()}"
                    )
        except BaseException:
            self.stop()
            raise

    def _listening(self, address: str) -> bool:
        self._check_alive()
        try:
            wait_port(self.ns, address, self.port, timeout=0.1)
        except TimeoutError:
            return False
        return True

    def stop(self) -> None:
        """Stop nginx (by PID; its worker too): connections are refused until start()."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        workers = descendants(proc.pid)
        self.ns.stop(proc, timeout=5)  # SIGTERM: fast shutdown, the master ends its workers
        for pid in workers:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not alive(pid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                _wait(functools.partial(_gone, pid), 2.0)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pids(self) -> list[int]:
        """The running nginx's master and workers."""
        proc = self._proc
        return [proc.pid, *descendants(proc.pid)] if proc is not None and self.running else []

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise HttpsLabError(f"nginx exited with {self._proc.returncode}:\n{self.log_tail()}")

    def _reload(self, timeout: float = 10.0) -> None:
        proc = self._proc
        assert proc is not None
        old = set(descendants(proc.pid))
        proc.send_signal(signal.SIGHUP)
        # Live once every worker is one the master started after the HUP: the old ones
        # stop accepting when told to quit, but until they exit one may still answer.
        def live() -> bool:
            self._check_alive()
            now = set(descendants(proc.pid))
            return bool(now) and not now & old

        if not _wait(live, timeout):
            raise HttpsLabError(f"nginx reload not done after {timeout}s:\n{self.log_tail()}")

    def close(self) -> None:
        """Stop nginx, remove the addresses added and the work directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            for cidr in self._added:
                if self.ns.path.exists() and self.dev is not None:
                    subprocess.run(["ip", "-n", self.ns.name, "addr", "del", cidr, "dev", self.dev],
                                   capture_output=True, check=False)
            self._added.clear()
            shutil.rmtree(self.workdir, ignore_errors=True)
            with _live_lock, contextlib.suppress(ValueError):
                _live.remove(self)

    def __enter__(self) -> PolicyHost:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- looking -------------------------------------------------------------------------

    def url(self, domain: str) -> str:
        return f"https://mta-sts.{_domain(domain)}{WELL_KNOWN}"

    def fetches(self, domain: str | None = None, *, at_least: int = 0,
                timeout: float = 5.0) -> list[Fetch]:
        """The requests logged (for ``domain``'s host, else all), oldest first; waits up
        to ``timeout`` for ``at_least`` of them (nginx logs a request after answering it)."""
        host = f"mta-sts.{_domain(domain)}" if domain is not None else None
        found: list[Fetch] = []

        def enough() -> bool:
            nonlocal found
            found = [f for f in self._read_log() if host is None or f.host == host]
            return len(found) >= at_least

        _wait(enough, timeout if at_least else 0.0)
        return found

    def _log_entries(self) -> list[dict[str, str]]:
        try:
            text = self.access_log.read_text()
        except FileNotFoundError:
            return []
        # A line still being written has no closing brace yet.
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def _read_log(self) -> list[Fetch]:
        out = []
        for e in self._log_entries():
            msec, rt = float(e["msec"]), float(e["rt"])
            # fmt: off
            out.append(Fetch(msec - rt, rt, e["host"], e["sni"], e["uri"], int(e["status"]),
                             int(e["bytes"]), e["client"], e["ua"]))
            # fmt: on
        return out

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.error_log.read_text(errors="replace")
        except OSError:
            return "(no error log)"
        return "\n".join(text.splitlines()[-lines:])


def _body(text: str, size: int | None) -> bytes:
    body = text.encode()
    if size is None or len(body) >= size:
        return body
    pad = bytearray(body)
    while len(pad) < size:
        line = b"x-filler: " + b"x" * 68 + b"\r\n"
        pad += line[: size - len(pad)]
    return bytes(pad)


def _quote(value: str) -> str:
    """An nginx config string: double quotes, with backslash and quote escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _gone(pid: int) -> bool:
    return not alive(pid)


def _wait(cond: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


# -- a client -----------------------------------------------------------------------------


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # names lowercased
    body: bytes


def https_get(ns: Netns, address: str, url_host: str, path: str = WELL_KNOWN, *,
              cafile: Path | None = None, context: ssl.SSLContext | None = None,
              port: int = 443, timeout: float = 10.0) -> Response:
    """``GET https://url_host/path`` from inside ``ns``, connecting to ``address`` (no DNS),
    SNI and certificate check for ``url_host`` against ``cafile`` (or ``context``).
    Redirects are not followed. Raises ssl.SSLError (e.g. SSLCertVerificationError) or
    OSError (refused, timeout)."""
    ctx = context or ssl.create_default_context(cafile=str(cafile) if cafile else None)
    sock = ns.connect(address, port, timeout=timeout)
    try:
        sock.settimeout(timeout)
        tls = ctx.wrap_socket(sock, server_hostname=url_host)
    except BaseException:
        sock.close()
        raise
    conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
    conn.sock = tls  # already connected: HTTPConnection uses it as it is
    try:
        conn.request("GET", path, headers={"User-Agent": "gatelab-httpslab"})
        resp = conn.getresponse()
        body = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


@atexit.register
def _close_leftovers() -> None:
    # Safety net for hosts not closed by their owner (interrupted run); registered after
    # gatelab.netlab's handler, so it runs before the namespaces are deleted.
    with _live_lock:
        leftovers = list(_live)
    for host in leftovers:
        with contextlib.suppress(Exception):
            host.close()


__all__ = [
    "POLICY_V4",
    "POLICY_V6",
    "WELL_KNOWN",
    "CertKind",
    "Fetch",
    "HttpsLabError",
    "PolicyHost",
    "Post",
    "Response",
    "https_get",
    "httpslab_usable",
    "policy",
    "set_sts_id",
    "sts_records",
    "sts_txt",
]


# -- an in-process HTTPS server (unit tests: no namespace, no nginx) ---------------------

class TlsRequestHandler(http.server.BaseHTTPRequestHandler):
    """A request handler whose connection is TLS under the server's context (subclass it
    with do_GET/do_POST); quiet: the tests read what was asked, not a log."""

    server: InProcessHttps

    def setup(self) -> None:
        self.request = self.server.context.wrap_socket(self.request, server_side=True)
        self.request.settimeout(10)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.request.close()  # the TLS socket took over the descriptor

    def log_message(self, format: str, *args: Any) -> None:
        pass


class InProcessHttps(http.server.ThreadingHTTPServer):
    """``handler`` on 127.0.0.1 (a free port: ``port``) under ``context``, served by a
    daemon thread named ``name`` until shutdown()."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext, handler: type[TlsRequestHandler],
                 name: str) -> None:
        self.context = context
        super().__init__(("127.0.0.1", 0), handler)
        self.port: int = self.server_address[1]
        threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True,
                         name=name).start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up on the certificate: expected in these tests

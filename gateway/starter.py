"""``smtpgate init``: a commented starter config for one role and, for the inbound role, the
site's key and a self-signed certificate (as ``smtpgate keygen`` makes them).

One source of truth for the annotated configs: the templates in ``gateway/examples/``. They
travel with the package, because an installed gateway has no ``deploy/`` directory (the
container copies only ``gateway/``); ``deploy/outbound.yaml`` and ``deploy/inbound.yaml`` are
these templates rendered for the repository's own paths, and tests/test_init.py fails when
they differ (``python -m tests.test_init`` rewrites them).  A template is
``string.Template`` text whose placeholders stand only where init writes the operator's own
values: the config's path in the comments and, inbound, the key, the certificate and the
host names.  Every written value is quoted for where it goes (YAML or a shell command in a
comment), and the rendered text is parsed by the config loader before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

import yaml
from cryptography.hazmat.primitives import serialization

from .config import Config, ConfigError, parse
from .keyfiles import CERT_MODE, KEY_MODE, write_atomic
from .keygen import generate_key, host_name, self_signed, tlsa_lines
from .keys import describe_key

ROLES = ("outbound", "inbound")
CONFIG_MODE = 0o644  # no secret in it, and the gateway's own user must read it
DIR_MODE = 0o755  # as install -d: the gateway's own user reads the config; the key is 0600
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2  # as keygen, tlsa and rollover


def template(role: str) -> str:
    """The packaged template of ``role`` (``outbound`` or ``inbound``)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return (resources.files("gateway") / "examples" / f"{role}.yaml").read_text(
        encoding="utf-8")


_PLAIN = re.compile(r"[A-Za-z0-9_./+-]+")


def yaml_scalar(text: str) -> str:
    """``text`` as a YAML value: plain where YAML reads it back unchanged, else a JSON
    string (a JSON string is a YAML double-quoted scalar).  Callers refuse non-printable
    text first: a line separator would fold inside the quotes."""
    if _PLAIN.fullmatch(text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text, ensure_ascii=False)


def render(role: str, config: str, key: str = "", cert: str = "",
           hosts: Sequence[str] = ()) -> str:
    """The starter config of ``role``: ``config`` is the path it is written to (named in its
    comments), ``key``, ``cert`` and ``hosts`` fill in the inbound site key."""
    values = {"config": shlex.quote(config)}
    if role == "inbound":
        values |= {"key": yaml_scalar(key), "cert": yaml_scalar(cert),
                   "cert_arg": shlex.quote(cert),
                   "host_args": " ".join(f"--host {h}" for h in hosts)}
    # substitute, not safe_substitute: a placeholder left unfilled is a bug, not a file
    return Template(template(role)).substitute(values)


def check_text(text: str, source: str) -> Config:
    """The rendered text as the gateway would read it (key files aside); ConfigError."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"starter config is not YAML: {exc}") from None
    return parse(data, source)


@dataclass(frozen=True)
class _File:
    path: Path
    data: bytes
    mode: int
    what: str  # for the "wrote" line


def _err(message: str) -> None:
    print(f"smtpgate: {message}", file=sys.stderr, flush=True)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link is still something there


def _make_dirs(paths: Sequence[Path]) -> list[Path]:
    """Creates the missing parents of ``paths``, outermost first; returns those made."""
    made: list[Path] = []
    for parent in dict.fromkeys(p.parent for p in paths):
        for d in reversed([parent, *parent.parents]):
            if d.exists():
                continue
            try:
                d.mkdir(mode=DIR_MODE)
            except FileExistsError:
                continue  # made meanwhile: fine, it is there
            d.chmod(DIR_MODE)  # whatever the umask (root's is 077 on hardened hosts)
            made.append(d)
    return made


def init(role: str, config: str, *, hosts: Sequence[str] = (), key: str | None = None,
         cert: str | None = None, force: bool = False) -> int:
    """``smtpgate init``: exit 0 when written, 1 when a file exists (nothing written),
    2 for unusable input or a file that cannot be written."""
    if role not in ROLES:
        _err(f"--role must be one of: {', '.join(ROLES)}")
        return EXIT_USAGE
    inbound = role == "inbound"
    if not inbound and (hosts or key or cert):
        _err("--host, --key and --cert are for --role inbound (the outbound role has no key)")
        return EXIT_USAGE
    if inbound and not hosts:
        _err("--role inbound needs --host NAME: the MX host names the key serves (repeat "
             "for several)")
        return EXIT_USAGE
    try:  # as --host checks them; init may be called with names no parser has seen
        hosts = list(dict.fromkeys(host_name(h) for h in hosts))
    except argparse.ArgumentTypeError as exc:
        _err(str(exc))
        return EXIT_USAGE
    for given in (config, key, cert):
        if given is not None and (not given or not given.isprintable()):
            _err(f"not a usable path: {given!r}")
            return EXIT_USAGE
    # Absolute paths in the config: the gateway resolves a relative one against its own
    # working directory (/ under systemd), not against the directory init ran in.
    config_path = Path(config).absolute()
    key_path = Path(key).absolute() if key else config_path.with_name("key.pem")
    cert_path = Path(cert).absolute() if cert else config_path.with_name("cert.pem")
    targets = [key_path, cert_path, config_path] if inbound else [config_path]
    for p in targets:
        if p.is_dir():
            _err(f"{p} is a directory: name the file (e.g. {p / 'smtpgate.yaml'})")
            return EXIT_USAGE
    if len({p.resolve() for p in targets}) != len(targets):
        _err("--config, --key and --cert must be three different files")
        return EXIT_USAGE

    text = render(role, str(config_path), str(key_path), str(cert_path), hosts)
    try:
        loaded = check_text(text, str(config_path))
    except ConfigError as exc:  # only an odd path can get here: the templates are tested
        _err(f"the starter config would not load: {exc}")
        return EXIT_USAGE

    if not force:
        present = [p for p in targets if _exists(p)]
        for p in present:
            _err(f"{p} exists: not overwritten (--force replaces it)")
        if present:
            return EXIT_REFUSED

    files: list[_File] = []
    records: list[str] = []
    if inbound:
        site_key = generate_key()
        site_cert = self_signed(site_key, hosts)
        files += [
            _File(key_path, site_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), KEY_MODE, describe_key(site_key)),
            _File(cert_path, site_cert.public_bytes(serialization.Encoding.PEM), CERT_MODE,
                  f"self-signed, {', '.join(hosts)}, until "
                  f"{site_cert.not_valid_after_utc:%Y-%m-%d}")]
        records = tlsa_lines(site_cert.public_bytes(serialization.Encoding.DER), hosts)
    # The config last: it names the key files, which are complete by the time it appears.
    files.append(_File(config_path, text.encode(), CONFIG_MODE, f"{role} starter config"))

    try:
        made = _make_dirs(targets)
    except OSError as exc:
        _err(f"cannot create {exc.filename}: {exc.strerror}")
        return EXIT_USAGE
    replaced_key = inbound and _exists(key_path)
    written: list[tuple[Path, bool]] = []  # (path, existed before)
    for f in files:
        existed = _exists(f.path)
        try:
            write_atomic(f.path, f.data, f.mode, overwrite=force)
        except OSError as exc:
            # Files this run created go again: a key without its config (or a certificate
            # without its key) would only be in the way of the next try.  Files --force
            # replaced stay replaced; each is complete.
            for path, before in written:
                if not before:
                    with contextlib.suppress(OSError):
                        path.unlink()
            if isinstance(exc, FileExistsError):  # appeared since the check above
                _err(f"{f.path} exists: not overwritten (--force replaces it)")
                return EXIT_REFUSED
            _err(f"cannot write {f.path}: {exc.strerror}")
            return EXIT_USAGE
        written.append((f.path, existed))

    for d in made:
        print(f"created {d}/ (mode {DIR_MODE:04o})")
    for f in files:
        print(f"wrote {f.path} ({f.what}, mode {f.mode:04o})")
    if replaced_key:
        _err(f"warning: {key_path} was replaced: the TLSA records published for the old key "
             "do not match the new one; publish the new records and wait for their TTL "
             "before the gateway loads it (a reload or restart)")
    print()
    print("next steps:")
    steps = _next_steps_inbound(loaded, str(config_path), key_path, records) if inbound \
        else _next_steps_outbound(loaded, str(config_path))
    for n, step in enumerate(steps, 1):
        print(f"{n}. {step}")
    return EXIT_OK


def _next_steps_outbound(config: Config, path: str) -> list[str]:
    c = shlex.quote(path)
    resolvers = ", ".join(str(r) for r in config.dns.resolvers)
    return [
        f"Read {c}: every setting is explained there.\n"
        f"   DANE needs a validating resolver at {resolvers} (dns.resolvers):\n"
        "   Unbound, Knot Resolver or BIND, with DNSSEC validation on.",
        f"Check the file:  smtpgate run --check -c {c}",
        f"What it would do for a destination:  smtpgate check -c {c} example.org",
        "Intercept the MTAs' port 25 (prints the rules; --apply loads them):\n"
        f"   smtpgate firewall -c {c} --mta-interface IF\n"
        "   (or --mta-network CIDR, or --local-mta for an MTA on this host)",
        f"Start it:  smtpgate run -c {c}  (or the systemd unit)",
    ]


def _next_steps_inbound(config: Config, path: str, key: Path, records: Sequence[str]) -> list[str]:
    """The inbound role's.  A continuation line starts with three blanks, except the TLSA
    records: in a zone file a line that starts with blanks belongs to the owner of the line
    before, so a pasted record must start with its own owner name."""
    c = shlex.quote(path)
    upstreams = ", ".join(dict.fromkeys(
        str(u) for lst in config.listeners for u in lst.upstreams))
    return [
        f"Read {c} and set in it:\n"
        f"   upstreams: your MTAs' addresses (the starter's {upstreams}\n"
        "   are documentation addresses);\n"
        "   client_address: what the MTAs expect (proxy-protocol: Postfix\n"
        "   smtpd_upstream_proxy_protocol = haproxy; none: they see the gateway's address).",
        "If the gateway runs as its own user, give it the key (the mode stays 0600):\n"
        f"   chown smtpgate: {shlex.quote(str(key))}",
        "Publish in the DNSSEC-signed zone:\n" + "\n".join(records),
        f"Check the file and the key:  smtpgate run --check -c {c}",
        "Intercept port 25 from the internet (prints the rules; --apply loads them):\n"
        f"   smtpgate firewall -c {c} --internet-interface IF",
        f"Start it:  smtpgate run -c {c}  (or the systemd unit)",
    ]

"""``smtpgate``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from . import __version__
from .config import Config, ConfigError, Endpoint, IPAddress, load, parse_endpoint
from .dane import tlsa_owner, tlsa_record
from .keyfiles import CERT_MODE, KEY_MODE, KeyFileError, promote, write_atomic
from .keygen import (
    DEFAULT_DAYS,
    NO_RECORD,
    RSA_DEFAULT_BITS,
    check_published,
    generate_key,
    host_name,
    self_signed,
    tlsa_lines,
)
from .keys import RSA_MIN_BITS, describe_key, load_keypair, read_certificates

DEFAULT_CONFIG = "/etc/smtpgate/smtpgate.yaml"


def _config(path: str | None, *, keys: bool = False) -> Config | None:
    """The config at ``path`` (none: no file, no listeners); with ``keys``, its key files
    and MTA-STS trust anchors read as start and reload read them.  None once the error
    (naming the key and the file) is printed: the command exits 2."""
    from .keys import site_pairs, webpki_store

    try:
        config = load(path) if path else Config(listeners=())
        if keys:
            site_pairs(config)
            webpki_store(config)
    except ConfigError as exc:
        print(f"smtpgate: {exc}", file=sys.stderr)
        return None
    return config


def _cmd_run(args: argparse.Namespace) -> int:
    if (config := _config(args.config, keys=args.check)) is None:
        return 2
    if args.check:
        from .keys import site_pairs

        pairs = site_pairs(config)  # read above: now for their warnings
        for pair in pairs or ():
            for warning in pair.warnings if pair is not None else ():
                print(f"smtpgate: {config.source}: warning: {warning}", file=sys.stderr)
        roles = ", ".join(f"{lst.label} ({lst.mode})" for lst in config.listeners)
        print(f"{config.source}: OK: {len(config.listeners)} listener(s): {roles}")
        return 0
    from .server import run  # uvloop and the server only when we really run

    return run(args.config, config, args.worker_metrics, args.worker_index)


def _cmd_check(args: argparse.Namespace) -> int:
    from .check import check

    if (config := _config(args.config)) is None:
        return 2
    return asyncio.run(check(config, args.target, _print_now, connect=args.connect,
                             helo=args.helo, step_timeout=args.timeout, mta=args.mta,
                             rcpt=args.rcpt))


def _cmd_status(args: argparse.Namespace) -> int:
    from . import control

    if (config := _config(args.config)) is None:
        return 2
    return control.status(config, _print_now, as_json=args.json)


def _cmd_reload(args: argparse.Namespace) -> int:
    from . import control

    # A bad file (or key file) never reaches the gateway.
    if (config := _config(args.config, keys=True)) is None:
        return 2
    return control.reload(config, _print_now, pid=args.pid, timeout=args.timeout)


def _cmd_tlsrpt(args: argparse.Namespace) -> int:
    if (config := _config(args.config)) is None:
        return 2
    if args.action == "show":
        from .tlsrptcli import show

        return show(config.tlsrpt, sys.stdout, domain=args.domain, day=args.day,
                    store=args.store)
    from .tlsrptsend import send

    return send(config, _print_now, day=args.day, domain=args.domain, now=args.now,
                store=args.store)


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _target(text: str) -> str:
    """An IP address or a host name (letters, digits, hyphens, dots): nothing else is sent
    to DNS."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    name = text.rstrip(".")
    if 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split(".")):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither an IP address nor a host name")


def _recipient(text: str) -> str:
    local, at, domain = text.rpartition("@")
    if at and local and _target(domain) and not any(c in text for c in "<> \t\r\n"):
        return text
    raise argparse.ArgumentTypeError(f"not an address user@domain: {text!r}")


def _address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _cmd_firewall(args: argparse.Namespace) -> int:
    import subprocess

    from . import firewall

    def run(argv: Sequence[str], stdin: str | None) -> firewall.Result:
        try:
            cp = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                                timeout=60, check=False)
        except FileNotFoundError:
            return firewall.Result(firewall.MISSING, "", f"{argv[0]}: not installed")
        except subprocess.TimeoutExpired:
            return firewall.Result(124, "", "timed out after 60 s")
        return firewall.Result(cp.returncode, cp.stdout, cp.stderr)

    if args.remove:  # needs no config: finds smtpgate's own tables, chains, rules, routes
        try:
            removed = firewall.remove(run)
        except firewall.ApplyError as exc:
            print(f"smtpgate: firewall: {exc}", file=sys.stderr)
            return 1
        for what in removed:
            print(f"removed: {what}")
        if not removed:
            print("nothing to remove: no smtpgate firewall rules are loaded")
        return 0
    try:
        config = load(args.config)
        options = firewall.Options(
            format=firewall.Format(args.format),
            mta_interfaces=tuple(args.mta_interface),
            mta_networks=firewall.parse_networks(args.mta_network, config.source),
            local_mta=args.local_mta,
            internet_interfaces=tuple(args.internet_interface),
            table=args.table)
        ruleset = firewall.generate(config, options)
    except ConfigError as exc:
        print(f"smtpgate: {exc}", file=sys.stderr)
        return 2
    for problem in firewall.return_path_problems(ruleset, _sysctl):
        print(f"smtpgate: firewall: warning: {problem}", file=sys.stderr)
    if not args.apply:
        print(ruleset.text(), end="")
        return 0
    try:
        loaded = firewall.apply(ruleset, run)
    except firewall.ApplyError as exc:
        print(f"smtpgate: firewall: {exc} (nothing of smtpgate's is left loaded)",
              file=sys.stderr)
        return 1
    for what in loaded:
        print(f"loaded: {what}")
    return 0


def _sysctl(path: str) -> str | None:
    try:
        return (Path("/proc/sys") / path).read_text().strip()
    except OSError:
        return None


def _print_now(line: str) -> None:
    print(line, flush=True)  # each step as it happens: a slow peer shows where it stalls


def _helo_name(text: str) -> str:
    if (not text or len(text) > 255 or not text.isascii()
            or any(not c.isprintable() or c.isspace() for c in text)):
        raise argparse.ArgumentTypeError(f"not a host name or address literal: {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"not a number of seconds in (0, 3600]: {text!r}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    """The lab ships with a source checkout, not with the gateway: imported only here."""
    try:
        from gatelab.sitelab import demo
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("gatelab"):
            raise
        _err("smtpgate demo: the lab (gatelab) is not installed here; it comes with a source "
             "checkout: sudo scripts/demo")
        return 2
    if os.geteuid() != 0:
        _err("smtpgate demo: needs root (network namespaces, port 25/53)")
        return 2
    return demo(args.keep)


def _cmd_version(args: argparse.Namespace) -> int:
    from importlib.metadata import version


    print(f"smtpgate {__version__}")
    if args.verbose:
        deps = ("uvloop", "cryptography", "dnspython", "prometheus-client", "pyyaml")
        print(f"python {platform.python_version()}, "
              + ", ".join(f"{d} {version(d)}" for d in deps))
    return 0


# -- the site's key: keygen, tlsa, rollover ------------------------------------------------

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2  # the key commands' exit codes



def _err(message: str) -> None:
    print(f"smtpgate: {message}", file=sys.stderr, flush=True)


def _hosts(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _cmd_init(args: argparse.Namespace) -> int:
    from .starter import init

    return init(args.role, args.config, hosts=args.host, key=args.key, cert=args.cert,
                force=args.force)


def _init_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``init``: a starter config and, inbound, the site's key (gateway.starter)."""
    ini = sub.add_parser(
        "init", help="write a commented starter config (inbound: and the site's key)",
        description="Write a commented starter config for the role, ready for "
                    "`smtpgate run --check`; for the inbound role also the site's key and a "
                    "self-signed certificate, as keygen makes them, and print their TLSA "
                    "records to publish. Then print the next steps. Creates the directory; "
                    "existing files are not overwritten without --force. " + _EXITS)
    ini.add_argument("--role", required=True, choices=("outbound", "inbound"),
                     help="outbound: the MTA sends through the gateway; inbound: the "
                          "gateway offers STARTTLS in front of the MTA")
    ini.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="PATH",
                     help=f"config file to write (default: {DEFAULT_CONFIG})")
    ini.add_argument("--host", action="append", default=[], type=host_name, metavar="NAME",
                     help="inbound, required: MX host name the key serves (repeat for several)")
    ini.add_argument("--key", metavar="PATH",
                     help="inbound: private key file to write (default: key.pem next to the "
                          "config)")
    ini.add_argument("--cert", metavar="PATH",
                     help="inbound: certificate file to write (default: cert.pem next to the "
                          "config)")
    ini.add_argument("--force", action="store_true", help="replace existing files")
    ini.set_defaults(func=_cmd_init)


def _cmd_keygen(args: argparse.Namespace) -> int:
    hosts = _hosts(args.host)
    key_path, cert_path = Path(args.key), Path(args.cert)
    if key_path.resolve() == cert_path.resolve():
        _err("--key and --cert must be different files")
        return EXIT_USAGE
    if args.type == "ec" and args.bits is not None:
        _err("--bits is for RSA keys (--type rsa); the EC key is P-256")
        return EXIT_USAGE
    bits = args.bits if args.bits is not None else RSA_DEFAULT_BITS
    if not args.force:
        for p in (key_path, cert_path):
            if p.exists() or p.is_symlink():
                _err(f"{p} exists: not overwritten (--force replaces it)")
                return EXIT_REFUSED
    key = generate_key(args.type, bits)
    cert = self_signed(key, hosts, args.days)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    try:
        write_atomic(key_path, key_pem, KEY_MODE, overwrite=args.force)
    except FileExistsError:
        _err(f"{key_path} exists: not overwritten (--force replaces it)")
        return EXIT_REFUSED
    except OSError as exc:
        _err(f"cannot write {key_path}: {exc.strerror}")
        return EXIT_USAGE
    try:
        write_atomic(cert_path, cert_pem, CERT_MODE, overwrite=args.force)
    except OSError as exc:
        if not args.force:  # the key just made is useless without its certificate
            with contextlib.suppress(OSError):
                key_path.unlink()
        if isinstance(exc, FileExistsError):
            _err(f"{cert_path} exists: not overwritten (--force replaces it)")
            return EXIT_REFUSED
        _err(f"cannot write {cert_path}: {exc.strerror}")
        return EXIT_USAGE
    print(f"wrote {key_path} ({describe_key(key)}, mode 0600) and {cert_path} "
          f"(self-signed, {', '.join(hosts)}, until {cert.not_valid_after_utc:%Y-%m-%d}); "
          "publish:", file=sys.stderr, flush=True)
    for line in tlsa_lines(cert.public_bytes(serialization.Encoding.DER), hosts):
        print(line)
    return EXIT_OK


def _leaf_der(path: str) -> bytes:
    return read_certificates(path)[0].public_bytes(serialization.Encoding.DER)


def _cmd_tlsa(args: argparse.Namespace) -> int:
    hosts = _hosts(args.host)
    try:
        ders = [_leaf_der(args.cert)]
        if args.next_cert:
            ders.append(_leaf_der(args.next_cert))
        records = [tlsa_record(d) for d in ders]
    except (KeyFileError, ValueError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    if len(records) == 2 and records[0] == records[1]:
        print("smtpgate: note: the next certificate has the current key: one record each",
              file=sys.stderr, flush=True)
        records = records[:1]
    for host in hosts:
        for record in records:
            print(record.to_zone(tlsa_owner(host)))
    return EXIT_OK


def _cmd_rollover(args: argparse.Namespace) -> int:
    hosts = _hosts(args.host)
    paths = [Path(p) for p in (args.key, args.cert, args.next_key, args.next_cert)]
    key, cert, next_key, next_cert = paths
    resolved = [p.resolve() for p in paths]
    olds = [r.with_name(r.name + ".old") for r in resolved[:2]]
    if len(set(resolved)) != 4 or set(olds) & set(resolved):
        _err("--key, --cert, --next-key, --next-cert (and the .old files) must be four "
             "different files")
        return EXIT_USAGE
    for p, opt in ((key, "--key"), (cert, "--cert")):
        if not p.exists():
            _err(f"{opt} {p} does not exist: nothing to roll over (configure the next "
                 "files as tls.key and tls.cert instead)")
            return EXIT_USAGE
    try:
        nxt = load_keypair(next_key, next_cert, "rollover", "--next-key",
                           cert_path_name="--next-cert")
    except ConfigError as exc:
        _err(f"rollover refused: {exc.message}")
        return EXIT_USAGE
    for w in nxt.warnings:
        print(f"smtpgate: warning: {w}", file=sys.stderr, flush=True)
    ttl = None
    if args.force:
        print(f"smtpgate: warning: --force: DNS not checked; DANE clients will refuse the "
              f"new key until every host publishes it: "
              f"{nxt.tlsa.to_zone(tlsa_owner(hosts[0]))}", file=sys.stderr, flush=True)
    else:
        results = asyncio.run(check_published(hosts, nxt.tlsa, args.resolver))
        problems = [(h, a, p) for h, a, p in results if p is not None]
        for host, answer, problem in problems:
            _err(f"rollover refused: {host}: {problem}: DNS ({args.resolver}) returned "
                 f"{answer.describe()}")
        if any(p == NO_RECORD for _, _, p in problems):
            _err(f"publish {nxt.tlsa} at _25._tcp.<host> next to the current record "
                 "(smtpgate tlsa --next-cert), wait for its TTL, then run rollover again")
        if any(p != NO_RECORD for _, _, p in problems):
            _err("the TLSA records must validate (DNSSEC-signed zone, DS in the parent, a "
                 "validating resolver): DANE clients ignore or refuse anything else")
        if problems:
            return EXIT_REFUSED
        ttl = max(a.ttl for _, a, _ in results)
    try:
        old_key, old_cert = promote(key, cert, next_key, next_cert)
    except (OSError, KeyFileError) as exc:
        _err(f"rollover failed while moving files: {exc}")
        return EXIT_REFUSED
    try:
        now = load_keypair(key, cert, "rollover", "--key", cert_path_name="--cert")
    except ConfigError as exc:
        _err(f"after the rollover: {exc.message}")
        return EXIT_REFUSED
    if now.tlsa != nxt.tlsa:
        _err(f"after the rollover {key} is not the key that was checked: its record is "
             f"{now.tlsa}, expected {nxt.tlsa}")
        return EXIT_REFUSED
    print(f"rolled over: {key} and {cert} now hold the next key ({nxt.tlsa}); the "
          f"previous pair is {old_key} and {old_cert}")
    if ttl is not None:
        print(f"the TLSA TTL is {ttl} s: resolvers may hold an RRset without the next key "
              "for that long after it was published; reload the gateway (SIGHUP) only once "
              "that has passed since you published it")
    else:
        print("reload the gateway (SIGHUP) to serve the new key")
    print("keep the old key's TLSA record for at least its TTL after the reload, then "
          "remove it")
    return EXIT_OK


def _resolver_arg(text: str) -> Endpoint:
    try:
        return parse_endpoint(text, "--resolver", "")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.message}") from None


def _days(text: str) -> int:
    if text.isdigit() and 1 <= int(text) <= 36500:
        return int(text)
    raise argparse.ArgumentTypeError(f"not a number of days in 1..36500: {text!r}")


def _rsa_bits(text: str) -> int:
    if text.isdigit() and RSA_MIN_BITS <= int(text) <= 16384 and int(text) % 8 == 0:
        return int(text)
    raise argparse.ArgumentTypeError(
        f"not an RSA size in bits ({RSA_MIN_BITS}..16384, a multiple of 8): {text!r}")


_EXITS = "Exit 0 when done, 1 when refused, 2 for unusable input."


def _hosts_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--host", required=True, action="append", type=host_name, metavar="NAME",
                   help=help)


def _key_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``keygen``, ``tlsa`` and ``rollover``: the site's key (gateway.keygen, gateway.keyfiles)."""
    kg = sub.add_parser(
        "keygen", help="make the site's key and a self-signed certificate",
        description="Write a new private key (PEM, mode 0600 from the start) and a "
                    "self-signed certificate for the hosts (CN = the first, every host a "
                    "SAN dNSName), then print the TLSA 3 1 1 record to publish for each host. "
                    "DANE-EE checks only the key; the certificate keeps TLS clients happy. "
                    "Existing files are not overwritten without --force. " + _EXITS)
    kg.add_argument("--key", required=True, metavar="PATH", help="private key file to write")
    kg.add_argument("--cert", required=True, metavar="PATH", help="certificate file to write")
    kg.add_argument("--type", choices=("ec", "rsa"), default="ec",
                    help="ec: ECDSA P-256 (default); rsa: for peers without ECDSA")
    kg.add_argument("--bits", type=_rsa_bits, metavar="N",
                    help=f"RSA key size (default {RSA_DEFAULT_BITS})")
    _hosts_option(kg, "MX host name this key serves (repeat for several)")
    kg.add_argument("--days", type=_days, default=DEFAULT_DAYS,
                    help=f"certificate validity (default {DEFAULT_DAYS})")
    kg.add_argument("--force", action="store_true", help="replace existing files")
    kg.set_defaults(func=_cmd_keygen)

    tl = sub.add_parser(
        "tlsa", help="print the TLSA records to publish",
        description="Print '_25._tcp.<host>. IN TLSA 3 1 1 <hex>' for the key of the "
                    "certificate and, with --next-cert, for the next key too: one line per "
                    "host per key. Before a rollover both must be published, for at least "
                    "the record's TTL. " + _EXITS)
    tl.add_argument("--cert", required=True, metavar="PATH", help="current certificate")
    tl.add_argument("--next-cert", metavar="PATH", help="next certificate (rollover)")
    _hosts_option(tl, "MX host name (repeat for several)")
    tl.set_defaults(func=_cmd_tlsa)

    ro = sub.add_parser(
        "rollover", help="make the next key the current one, once DNS publishes it",
        description="Check that _25._tcp.<host> TLSA is DNSSEC-secure and contains the "
                    "next key's 3 1 1 record for every --host, then move the next key and "
                    "certificate over the current ones (renames: every file is always "
                    "complete) and keep the previous pair as PATH.old. Reload the gateway "
                    "(SIGHUP) afterwards. Refused, naming the host and what DNS returned, "
                    "when DNS is not ready. " + _EXITS)
    ro.add_argument("--key", required=True, metavar="PATH", help="current key file")
    ro.add_argument("--cert", required=True, metavar="PATH", help="current certificate file")
    ro.add_argument("--next-key", required=True, metavar="PATH", help="next key file")
    ro.add_argument("--next-cert", required=True, metavar="PATH",
                    help="next certificate file")
    _hosts_option(ro, "MX host name whose TLSA must hold the next key (repeat for several)")
    ro.add_argument("--resolver", type=_resolver_arg, metavar="IP:PORT",
                    default=Endpoint(ipaddress.ip_address("127.0.0.1"), 53),
                    help="validating resolver to ask; its AD bit is believed "
                         "(default 127.0.0.1:53)")
    ro.add_argument("--force", action="store_true",
                    help="skip the DNS check (DANE clients refuse mail until DNS catches up)")
    ro.set_defaults(func=_cmd_rollover)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smtpgate",
        description="Transparent encryption gateway for port-25 SMTP.")
    p.add_argument("--version", action="version", version=f"smtpgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway",
                         description="Run the gateway in the foreground. SIGHUP reloads the "
                                     "config; SIGTERM drains sessions and stops.")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                     help=f"config file (default: {DEFAULT_CONFIG})")
    # Set by the worker supervisor (config `workers` > 1): serve metrics here, not on
    # metrics.listen, and run as one worker.
    run.add_argument("--worker-metrics", help=argparse.SUPPRESS)
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    run.add_argument("--check", action="store_true",
                     help="validate the config and exit: 0 when valid, 2 with the error")
    run.set_defaults(func=_cmd_run)

    chk = sub.add_parser("check", help="show discovery, the plan and a dry-run session",
                         description="Look up a destination as the gateway would (PTR, "
                                     "forward confirmation, TLSA, each with its DNSSEC status "
                                     "and TTL), match the policy and print the plan. Then, "
                                     "unless --no-connect, connect to each address on port 25 "
                                     "and do what a session would: banner, EHLO, STARTTLS, "
                                     "the handshake, the presented chain and its verification "
                                     "against the plan, then QUIT (no mail is sent). Exit 0 "
                                     "when the plan allows the result, 1 when the gateway "
                                     "would defer (or a name has no addresses), 2 for a bad "
                                     "config or target, 3 when the check could not be made "
                                     "(DNS gave no answer for the name; the peer refused, "
                                     "was unreachable or silent).")
    chk.add_argument("target", type=_target, help="destination IP address or host name")
    chk.add_argument("-c", "--config",
                     help="config file for dns, policy and upstream (default: built-in "
                          "defaults: resolver 127.0.0.1:53, policy dane)")
    chk.add_argument("--no-connect", dest="connect", action="store_false",
                     help="only discovery and the plan: nothing is sent to the destination")
    chk.add_argument("--helo", type=_helo_name, metavar="NAME",
                     help="the name to say EHLO with (default: this host's name)")
    chk.add_argument("--mta", type=_address, metavar="ADDRESS",
                     help="say what a session from the MTA at this address gets when it "
                          "does STARTTLS itself (listeners[].verifying_mtas)")
    chk.add_argument("--rcpt", type=_recipient, metavar="USER@DOMAIN",
                     help="also say what this recipient gets on the session: its domain's "
                          "DANE MX for the destination and its MTA-STS policy (where it "
                          "came from: the gateway's cache or a fetch now), then 250 or "
                          "450 (exit 1)")
    chk.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                     help="limit for the connect, each reply and the TLS handshake "
                          "(default: 10)")
    chk.set_defaults(func=_cmd_check)

    st = sub.add_parser("status", help="what the running gateway runs and what is wrong",
                        description="Ask the running gateway (over metrics.listen, /status): "
                                    "version and pid, the config it runs, where it came from "
                                    "and since when, the last reload's result, sessions now, "
                                    "listeners, the DNS self-test per resolver, workers, and "
                                    "every problem. Exit 0 when it serves without problems, 1 "
                                    "when degraded or draining, 2 for a bad config, 3 when it "
                                    "did not answer.")
    st.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                    help=f"config file, for metrics.listen (default: {DEFAULT_CONFIG})")
    st.add_argument("--json", action="store_true", help="print /status as it came")
    st.set_defaults(func=_cmd_status)

    rl = sub.add_parser("reload", help="reload the running gateway and report its verdict",
                        description="Check the config file as `run --check` does, send "
                                    "SIGHUP to the gateway answering on metrics.listen and "
                                    "wait for its verdict (with workers: every worker's). "
                                    "Exit 0 when it reloaded, 1 when it rejected the file "
                                    "(it keeps the config it runs), 2 for a bad file (no "
                                    "signal sent), 3 when it could not be asked or said "
                                    "nothing in time.")
    rl.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                    help=f"config file (default: {DEFAULT_CONFIG})")
    rl.add_argument("--pid", type=int, metavar="PID",
                    help="the gateway's pid (systemd: $MAINPID); refused when another "
                         "process answers on metrics.listen")
    rl.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                    help="how long to wait for the verdict (default: 30)")
    rl.set_defaults(func=_cmd_reload)

    _key_commands(sub)
    _init_command(sub)

    fw = sub.add_parser("firewall", help="print, apply or remove the interception rules",
                        description="Print the nftables or iptables rules (and the ip rule / "
                                    "ip route lines for TPROXY and transparent upstreams) that "
                                    "hand port-25 connections to the config's listeners, as a "
                                    "shell script; or load them (--apply, replacing earlier "
                                    "smtpgate rules) or remove them (--remove, whatever format "
                                    "they were loaded in; no error when none are loaded). "
                                    "Exit 0 when done, 1 when a command failed, 2 for a bad "
                                    "config or option.")
    fw.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                    help=f"config file (default: {DEFAULT_CONFIG}; not read by --remove)")
    fw.add_argument("--format", choices=("nft", "iptables"), default="nft",
                    help="nft: table inet smtpgate; iptables: SMTPGATE-* chains for "
                         "iptables-restore and ip6tables-restore (default: nft)")
    act = fw.add_mutually_exclusive_group()
    act.add_argument("--apply", action="store_true", help="load the rules in this host's "
                                                          "network namespace")
    act.add_argument("--remove", action="store_true", help="remove every smtpgate rule, "
                                                           "chain, table, ip rule and route")
    fw.add_argument("--mta-interface", action="append", default=[], metavar="IF",
                    help="outbound: the MTAs' connections arrive on IF (repeatable)")
    fw.add_argument("--mta-network", action="append", default=[], metavar="CIDR",
                    help="outbound: only from these source networks (repeatable; a family "
                         "without one is not intercepted from the MTA side)")
    fw.add_argument("--local-mta", action="store_true",
                    help="outbound: the MTA runs on this host: take its connections in nat "
                         "OUTPUT (redirect listeners)")
    fw.add_argument("--internet-interface", action="append", default=[], metavar="IF",
                    help="inbound: connections from the internet arrive on IF (repeatable)")
    fw.add_argument("--table", type=int, default=100, metavar="N",
                    help="routing table for TPROXY and transparent upstreams (default: 100)")
    fw.set_defaults(func=_cmd_firewall)

    rpt = sub.add_parser("tlsrpt", help="TLS reports (RFC 8460): show or send them",
                         description="The daily TLS reports the gateway sends to the recipient "
                                     "domains that ask for them (tlsrpt in the config; "
                                     "docs/operations.md, TLS reports).")
    rsub = rpt.add_subparsers(dest="action", required=True, metavar="ACTION")
    rshow = rsub.add_parser(
        "show", help="print the reports the counts make",
        description="Print, per policy domain, the RFC 8460 JSON report exactly as `tlsrpt "
                    "send` would send it, from the store file (read only). Without --day: "
                    "today's running counts (UTC); yesterday's is what the next send "
                    "reports. What a worker counted in its last few seconds is not in the file "
                    "yet. Exit 0 when printed, 1 when nothing was recorded for that day or "
                    "domain, 2 for bad input.")
    rsend = rsub.add_parser(
        "send", help="send the reports now",
        description="Look up each domain's _smtp._tls TXT record and, with --now, deliver "
                    "its report to every rua (mailto: through tlsrpt.relay, https: by POST), "
                    "noting each delivery in the store; without --now only say what the "
                    "daily schedule would send. Exit 0 when every report was delivered (or "
                    "there was nothing to send), 1 when some delivery failed (the running "
                    "gateway retries it), 2 for bad input or a config without "
                    "tlsrpt.enabled.")
    for p_ in (rshow, rsend):
        p_.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                        help=f"config file (default: {DEFAULT_CONFIG})")
        p_.add_argument("--domain", metavar="DOMAIN", help="only this policy domain")
        p_.add_argument("--day", metavar="YYYY-MM-DD",
                        help="the UTC day (show: default today; send: default yesterday)")
        p_.set_defaults(func=_cmd_tlsrpt)
    for p_ in (rshow, rsend):
        p_.add_argument("--store", metavar="PATH",
                        help="this store file instead of tlsrpt.store (a shell lacks the "
                             "service's STATE_DIRECTORY)")
    rsend.add_argument("--now", action="store_true",
                       help="send now, not at the daily time (with --day of today: the counts "
                            "so far, a partial report)")

    demo = sub.add_parser("demo", help="mail between four sites through both gateways (lab)",
                          description="Build the lab (gatelab: network namespaces, Postfix, "
                                      "NSD and Unbound with DNSSEC) with an outbound and an "
                                      "inbound gateway, send mail A -> B, A -> D and A -> B "
                                      "under a wrong TLSA, report how each message travelled "
                                      "and remove the lab. Needs root and a source checkout "
                                      "(scripts/demo installs what it needs first). Exit 0 "
                                      "when every scenario behaved as expected.")
    demo.add_argument("--keep", action="store_true", help="leave the lab up until Enter")
    demo.set_defaults(func=_cmd_demo)

    ver = sub.add_parser("version", help="print the version",
                         description="Print the version of smtpgate.")
    ver.add_argument("-v", "--verbose", action="store_true", help="also the runtime versions")
    ver.set_defaults(func=_cmd_version)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

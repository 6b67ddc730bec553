"""``smtpgate``: the command line."""

from __future__ import annotations

import argparse
import ipaddress
import platform
import sys
from collections.abc import Sequence

from . import __version__
from .config import ConfigError, IPAddress, load

DEFAULT_CONFIG = "/etc/smtpgate/smtpgate.yaml"


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"smtpgate: {exc}", file=sys.stderr)
        return 2
    if args.check:
        roles = ", ".join(f"{lst.label} ({lst.mode})" for lst in config.listeners)
        print(f"{config.source}: OK: {len(config.listeners)} listener(s): {roles}")
        return 0
    from .server import run  # uvloop and the server only when we really run

    return run(args.config, config, args.worker_metrics)


def _cmd_check(args: argparse.Namespace) -> int:
    import asyncio

    from .check import check
    from .config import Config

    try:
        config = load(args.config) if args.config else Config(listeners=())
    except ConfigError as exc:
        print(f"smtpgate: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(check(config, args.target, _print_now, connect=args.connect,
                             helo=args.helo, step_timeout=args.timeout, mta=args.mta))


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


def _cmd_version(args: argparse.Namespace) -> int:
    from importlib.metadata import version


    print(f"smtpgate {__version__}")
    if args.verbose:
        deps = ("uvloop", "cryptography", "dnspython", "prometheus-client", "pyyaml")
        print(f"python {platform.python_version()}, "
              + ", ".join(f"{d} {version(d)}" for d in deps))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smtpgate",
        description="Transparent encryption gateway for port-25 SMTP.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway",
                         description="Run the gateway in the foreground. SIGHUP reloads the "
                                     "config; SIGTERM drains sessions and stops.")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                     help=f"config file (default: {DEFAULT_CONFIG})")
    # Set by the worker supervisor (config `workers` > 1): serve metrics here, not on
    # metrics.listen, and run as one worker.
    run.add_argument("--worker-metrics", help=argparse.SUPPRESS)
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
                                     "config.")
    chk.add_argument("target", help="destination IP address or host name")
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
    chk.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                     help="limit for the connect, each reply and the TLS handshake "
                          "(default: 10)")
    chk.set_defaults(func=_cmd_check)

    from .keys import add_commands

    add_commands(sub)  # keygen, tlsa, rollover

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

"""``smtpgate``: the command line."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence

from . import __version__
from .config import ConfigError, load

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

    return run(args.config, config)


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
                             helo=args.helo, step_timeout=args.timeout))


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
    chk.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                     help="limit for the connect, each reply and the TLS handshake "
                          "(default: 10)")
    chk.set_defaults(func=_cmd_check)

    from .keys import add_commands

    add_commands(sub)  # keygen, tlsa, rollover

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

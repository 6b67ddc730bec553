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
    return asyncio.run(check(config, args.target, print))


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

    chk = sub.add_parser("check", help="show discovery and the plan for a destination",
                         description="Look up a destination as the gateway would (PTR, "
                                     "forward confirmation, TLSA, each with its DNSSEC status "
                                     "and TTL), match the policy and print the plan. "
                                     "Nothing is sent to the destination.")
    chk.add_argument("target", help="destination IP address or host name")
    chk.add_argument("-c", "--config",
                     help="config file for dns and policy (default: built-in defaults: "
                          "resolver 127.0.0.1:53, policy dane)")
    chk.set_defaults(func=_cmd_check)

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

"""``smtpgate check IP|HOST``: the discovery chain, the matching policy and the plan, as the
gateway would decide them now (a dry run: nothing is sent to the peer's SMTP server)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from .config import Config, IPAddress
from .discovery import discover
from .dns import Answer, Resolver
from .policy import plan


def _line(answer: Answer, note: str = "") -> str:
    return f"  {answer.rdtype:<5} {answer.describe()}{'  ' + note if note else ''}"


async def check(config: Config, target: str, out: Callable[[str], None]) -> int:
    """Prints the report; returns 0, or 1 when the target could not be resolved at all."""
    resolver = Resolver(config.dns)
    try:
        addresses: list[IPAddress] = []
        try:
            addresses.append(ipaddress.ip_address(target))
        except ValueError:
            for rdtype in ("A", "AAAA"):
                answer = await resolver.lookup(target, rdtype)
                out(_line(answer))
                addresses += [ipaddress.ip_address(r.address) for r in answer.records]
            if not addresses:
                out(f"{target}: no addresses")
                return 1
        for address in addresses:
            found = await discover(resolver, address, config.dns.budget)
            out(f"destination {address}")
            for step in found.steps:
                note = ""
                if step.rdtype in ("A", "AAAA") and found.host == step.name:
                    note = "forward-confirmed"
                if step is found.tlsa:
                    note = f"{len(found.usable)} of {len(found.records)} usable"
                out(_line(step, note))
            if found.doubt:
                out(f"  doubt: {found.doubt}")
            p = plan(address, found, config.policy)
            out(f"  plan: {p.describe()}")
        return 0
    finally:
        await resolver.close()

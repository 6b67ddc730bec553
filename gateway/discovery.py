"""Who is behind a destination address, and what does a recipient's domain ask of it: the
walks of ``gateway.walks`` (what they ask and why, ``doubt`` included), driven.

A walk is a generator that yields each question ``(name, rdtype)`` and receives its
``Answer``.  ``_drive`` answers them from the resolver (awaiting the network, within the
budget); ``_replay`` answers them from the cache alone and gives up at the first miss, so a
session to a destination seen recently is planned in one callback right after accept,
without a task or a timer, and its result is remembered until its first answer expires.
"""

from __future__ import annotations

import asyncio

from .answers import failed
from .config import IPAddress
from .dns import Resolver
from .sts import Candidates, Policy, sts_walk
from .walks import (
    Discovery,
    Progress,
    RecipientRule,
    T,
    Walk,
    discover_walk,
    discovery_walk,
    recipient_walk,
)


async def _drive(resolver: Resolver, walk: Walk[T]) -> T:
    """Answers a walk's questions from the resolver (cache, then network)."""
    try:
        question = next(walk)
        while True:
            question = walk.send(await resolver.lookup(*question))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _replay(resolver: Resolver, key: object, walk: Walk[T]) -> tuple[bool, T | None]:
    """Answers a walk from the cache alone: (True, result), or (False, None) at the first
    question the cache cannot answer.  The result is remembered under ``key`` until the
    first answer it used expires: the same walk would give the same result until then."""
    answers = 0
    expires = float("inf")
    try:
        question = next(walk)
        while True:
            found = resolver.cached_until(*question)
            if found is None:
                walk.close()
                return False, None
            answers += 1
            expires = min(expires, found[1])
            question = walk.send(found[0])
    except StopIteration as done:
        resolver.count_hits(answers)
        resolver.remember(key, done.value, expires, answers)
        return True, done.value


def discover_cached(resolver: Resolver, address: IPAddress) -> Discovery | None:
    """The discovery from cached answers only; None when one is missing."""
    key = ("discovery", address)
    found = resolver.recall(key)
    if found is not None:
        return found  # type: ignore[return-value]
    return _replay(resolver, key, discovery_walk(Progress(address)))[1]


async def discover(resolver: Resolver, address: IPAddress, budget: float) -> Discovery:
    """Never raises for DNS trouble and never takes longer than ``budget`` seconds."""
    p = Progress(address)
    try:
        async with asyncio.timeout(budget):
            await _drive(resolver, discover_walk(p))
    except TimeoutError:
        assert p.asking is not None
        name, rdtype = p.asking
        p.steps.append(failed(name, rdtype, "TIMEOUT", f"discovery budget of {budget}s spent"))
        if p.secure_so_far:
            p.doubt = f"{rdtype} lookup of {name} did not finish within the budget"
    return p.result()


def recipient_rule_cached(resolver: Resolver, domain: str,
                          address: IPAddress) -> RecipientRule | None:
    """The rule from cached answers only; None when one is missing."""
    key = ("recipient", domain, address)
    found = resolver.recall(key)
    if found is not None:
        return found  # type: ignore[return-value]
    return _replay(resolver, key, recipient_walk(domain, address))[1]


async def recipient_rule(resolver: Resolver, domain: str, address: IPAddress,
                         budget: float) -> RecipientRule:
    """Never raises for DNS trouble; bounded by ``budget``."""
    try:
        async with asyncio.timeout(budget):
            return await _drive(resolver, recipient_walk(domain, address))
    except TimeoutError:
        return RecipientRule(domain, doubt=f"its lookups did not finish within {budget}s")




def sts_candidates_cached(resolver: Resolver, domain: str, address: IPAddress,
                          policy: Policy) -> Candidates | None:
    """Which MX hosts of ``domain`` listed by its MTA-STS policy are this destination,
    from cached answers only; None when one is missing."""
    key = ("sts", domain, address, policy.mx)
    found = resolver.recall(key)
    if found is not None:
        return found  # type: ignore[return-value]
    return _replay(resolver, key, sts_walk(domain, address, policy))[1]


async def sts_candidates(resolver: Resolver, domain: str, address: IPAddress, policy: Policy,
                         budget: float) -> Candidates:
    """Never raises for DNS trouble; bounded by ``budget``."""
    try:
        async with asyncio.timeout(budget):
            return await _drive(resolver, sts_walk(domain, address, policy))
    except TimeoutError:
        return Candidates(doubt=f"its lookups did not finish within {budget}s")

"""An outbound session's plan: from the config, or from cached DNS answers at once, or from
discovery in a task that runs beside the upstream connect and the peer's banner (no latency
added).  The upgrade is its consumer (``when_planned``); the session only starts it and
says whether the plan is a plain passthrough."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .config import Config, Endpoint
from .context import Context
from .discovery import discover, discover_cached
from .policy import Plan, plan


class Planner:
    __slots__ = ("_config", "_ctx", "_destination", "_task", "plan")

    def __init__(self, ctx: Context, config: Config, destination: Endpoint) -> None:
        self._ctx = ctx
        self._config = config
        self._destination = destination
        self._task: asyncio.Task[None] | None = None
        self.plan: Plan | None = None

    def start(self) -> None:
        """Plans at once where the config or the cache can; otherwise starts discovery.
        Idempotent."""
        if self.plan is not None or self._task is not None:
            return
        ctx, host = self._ctx, self._destination.host
        self.plan = ctx.static_plan(host)
        if self.plan is None and (found := discover_cached(ctx.resolver, host)) is not None:
            self.plan = plan(host, found, self._config.policy)
        if self.plan is None:
            self._task = ctx.tasks.spawn(self._discover(ctx),
                                         name=f"discover {self._destination}")

    async def _discover(self, ctx: Context) -> None:
        host = self._destination.host
        found = await discover(ctx.resolver, host, self._config.dns.budget)
        self.plan = plan(host, found, self._config.policy)

    def when_planned(self, callback: Callable[[Plan | None], None]) -> None:
        """Calls back with the plan once discovery is done (None if it broke)."""
        self.start()  # normally done already, right after accept
        task = self._task
        if task is None or task.done():
            self._ctx.loop.call_soon(callback, self.plan)
            return
        task.add_done_callback(lambda _: callback(self.plan))

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

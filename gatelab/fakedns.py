"""A small in-process DNS server for faults a real resolver will not produce on demand:
drops, stalls, truncation, garbage, an AD bit it has no business setting.  UDP and TCP on
loopback; ``handler`` decides per query."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

# The handler returns a response message, raw bytes, or None to drop the query.
Reply = dns.message.Message | bytes | None
Handler = Callable[[dns.message.QueryMessage, str], Awaitable[Reply]]


def answer(query: dns.message.QueryMessage, *records: str, ad: bool = False,
           rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
           soa_ttl: int | None = None) -> dns.message.Message:
    """A response with ``records`` ("name ttl IN type rdata") in the answer section."""
    r = dns.message.make_response(query)
    r.set_rcode(rcode)
    if ad:
        r.flags |= dns.flags.AD
    for text in records:
        r.answer.append(dns.rrset.from_text(*_split(text)))
    if soa_ttl is not None:
        zone = query.question[0].name.parent()
        r.authority.append(dns.rrset.from_text(
            zone, soa_ttl, "IN", "SOA", f"ns.{zone} host.{zone} 1 3600 600 86400 {soa_ttl}"))
    return r


def _split(text: str) -> list[Any]:
    name, ttl, cls, rdtype, rdata = text.split(None, 4)
    return [name, int(ttl), cls, rdtype, rdata]


class FakeDns:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.queries: list[tuple[str, str, str]] = []  # (name, type, transport)
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1") -> FakeDns:
        loop = asyncio.get_running_loop()
        fake = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                fake._udp = transport  # type: ignore[assignment]

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                fake._spawn(fake._serve_udp(data, addr))

        await loop.create_datagram_endpoint(Udp, local_addr=(host, 0))
        assert self._udp is not None
        self.port = self._udp.get_extra_info("sockname")[1]
        self._tcp = await asyncio.start_server(self._serve_tcp, host, self.port)  # noqa: TID251
        return self

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="fakedns query")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, data: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(data)
        assert isinstance(query, dns.message.QueryMessage)
        q = query.question[0]
        self.queries.append((q.name.to_text().lower(), dns.rdatatype.to_text(q.rdtype),
                             transport))
        reply = await self.handler(query, transport)
        if reply is None or isinstance(reply, bytes):
            return reply
        return reply.to_wire()

    async def _serve_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        wire = await self._reply(data, "udp")
        if wire is not None and self._udp is not None:
            self._udp.sendto(wire, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        try:
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            wire = await self._reply(await reader.readexactly(size), "tcp")
            if wire is not None:
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        finally:
            writer.close()

    def count(self, name: str, rdtype: str) -> int:
        return sum(1 for n, t, _ in self.queries if (n, t) == (name, rdtype))

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

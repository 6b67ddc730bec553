"""A small in-process DNS server for faults a real resolver will not produce on demand:
drops, stalls, truncation, garbage, an AD bit it has no business setting.  UDP and TCP on
loopback; ``handler`` decides per query.

On the caller's event loop (``await FakeDns(handler).start()``), or, for a test whose own
code is not asyncio, on a thread of its own inside a lab namespace, where a gateway finds it
as its resolver::

    resolver = FakeDns(knows_nothing()).serve_in(lab.gw)  # 127.0.0.1:53 in gw
    ...
    resolver.close()
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rrset

if TYPE_CHECKING:
    from gatelab.netlab import Netns

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


def knows_nothing(delay: float = 0.0, failing: str = "tripwire") -> Handler:
    """A resolver that knows nothing: NXDOMAIN without AD for every name (a recipient domain
    then asks nothing of a session), SERVFAIL for names containing ``failing`` (a recipient
    there is refused 450 by the gateway); each answer ``delay`` seconds late."""

    async def handle(query: dns.message.QueryMessage, transport: str) -> Reply:
        name = query.question[0].name.to_text().lower()
        r = dns.message.make_response(query)
        r.set_rcode(dns.rcode.SERVFAIL if failing in name else dns.rcode.NXDOMAIN)
        if delay:
            await asyncio.sleep(delay)
        return r

    return handle


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
        self._loop: asyncio.AbstractEventLoop | None = None  # serve_in()'s, on its thread
        self._thread: threading.Thread | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    ns: Netns | None = None) -> FakeDns:
        """Serves UDP and TCP on ``host:port`` (port 0: a free one, see ``self.port``), in
        the namespace ``ns`` when given."""
        for _ in range(20 if port == 0 else 1):
            try:
                return await self._start(host, port, ns)
            except OSError as exc:
                # Port 0: the free UDP port may be taken for TCP; try another pair.
                if port != 0 or exc.errno != errno.EADDRINUSE:
                    raise
                if self._udp is not None:
                    self._udp.close()
                    self._udp = None
        raise OSError(errno.EADDRINUSE, "no free port for both UDP and TCP")

    async def _start(self, host: str, port: int, ns: Netns | None) -> FakeDns:
        loop = asyncio.get_running_loop()
        fake = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                fake._udp = transport  # type: ignore[assignment]

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                fake._spawn(fake._serve_udp(data, addr))

        if ns is None:
            await loop.create_datagram_endpoint(Udp, local_addr=(host, port))
        else:
            udp = ns.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                            socket.SOCK_DGRAM)
            udp.bind((host, port))
            await loop.create_datagram_endpoint(Udp, sock=udp)
        assert self._udp is not None
        self.port = self._udp.get_extra_info("sockname")[1]
        if ns is None:
            self._tcp = await asyncio.start_server(  # noqa: TID251
                self._serve_tcp, host, self.port)
        else:
            self._tcp = await asyncio.start_server(  # noqa: TID251
                self._serve_tcp, sock=ns.listen(host, self.port))
        return self

    def serve_in(self, ns: Netns | None, host: str = "127.0.0.1", port: int = 53) -> FakeDns:
        """Starts serving ``host:port`` in ``ns`` (None: this process's namespace; port 0:
        a free one, see ``self.port``) on an event loop of its own (a thread);
        :meth:`close` stops it."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True, name="fakedns")
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self.start(host, port, ns), loop).result(10)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stops what :meth:`serve_in` started (the server, then its loop and thread)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="fakedns query")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, data: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None  # not a DNS message: no answer
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

    def names(self, since: int = 0) -> list[str]:
        """The names asked for, in order, from the ``since``-th query on."""
        return [n for n, _, _ in self.queries[since:]]

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

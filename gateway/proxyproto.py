"""PROXY protocol v2 header (haproxy's proxy-protocol.txt, section 2.2): tells an MTA that
supports it (Postfix smtpd_upstream_proxy_protocol = haproxy) the client's real address."""

from __future__ import annotations

import struct

from .config import Endpoint

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY = 0x21  # version 2, command PROXY
_TCP4, _TCP6 = 0x11, 0x21


def v2_header(client: Endpoint, destination: Endpoint) -> bytes:
    """The header for a TCP connection from ``client`` to ``destination`` (same family)."""
    if client.host.version != destination.host.version:
        raise ValueError(f"{client} and {destination} differ in address family")
    family = _TCP4 if client.host.version == 4 else _TCP6
    body = (client.host.packed + destination.host.packed
            + struct.pack("!HH", client.port, destination.port))
    return SIGNATURE + struct.pack("!BBH", _PROXY, family, len(body)) + body

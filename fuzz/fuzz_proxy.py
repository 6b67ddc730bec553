#!/usr/bin/env python3
"""Fuzz gateway.proxyproto.v2_header with arbitrary endpoints and read every header back
with an independent decoder written from haproxy's proxy-protocol.txt, section 2.2 (not
from the code under test).  Input: one byte for the families, then the address and port
bytes (missing bytes are zero).

Invariants: endpoints of different families are refused with ValueError (documented),
nothing else is raised; a header decodes to exactly the two endpoints, as a PROXY command
over TCP, with nothing after the address block.
"""

from __future__ import annotations

import ipaddress

import common

from gateway.config import Endpoint
from gateway.proxyproto import v2_header

# proxy-protocol.txt 2.2: the 12-byte signature, then ver_cmd, fam, len (network order).
SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
ADDRESS_BYTES = {0x1: 4, 0x2: 16}  # AF_INET, AF_INET6 (the high nibble of fam)


def decode_v2(header: bytes) -> tuple[tuple[str, int], tuple[str, int], bytes]:
    """(source, destination, bytes after the address block) of a TCP PROXY header."""
    assert header[:12] == SIG, "bad signature"
    ver_cmd, fam = header[12], header[13]
    assert ver_cmd >> 4 == 0x2, "version is not 2"
    assert ver_cmd & 0xF == 0x1, "command is not PROXY"
    assert fam & 0xF == 0x1, "transport is not STREAM"
    size = ADDRESS_BYTES[fam >> 4]
    length = int.from_bytes(header[14:16], "big")
    assert len(header) == 16 + length, "length does not cover the rest"
    block = header[16:]
    assert length >= 2 * size + 4, "address block too short"
    src, dst = block[:size], block[size:2 * size]
    src_port = int.from_bytes(block[2 * size:2 * size + 2], "big")
    dst_port = int.from_bytes(block[2 * size + 2:2 * size + 4], "big")
    return ((str(ipaddress.ip_address(src)), src_port),
            (str(ipaddress.ip_address(dst)), dst_port), block[2 * size + 4:])


def endpoint(raw: bytes, v6: bool) -> Endpoint:
    size = 16 if v6 else 4
    address = raw[:size].ljust(size, b"\x00")
    port = int.from_bytes(raw[size:size + 2].ljust(2, b"\x00"), "big")
    return Endpoint(ipaddress.ip_address(address), port)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    flags, rest = data[0], data[1:]
    client = endpoint(rest, bool(flags & 1))
    destination = endpoint(rest[18:], bool(flags & 2))
    if client.host.version != destination.host.version:
        try:
            v2_header(client, destination)
        except ValueError:
            return
        raise AssertionError("mixed families accepted")
    header = v2_header(client, destination)
    src, dst, tlvs = decode_v2(header)
    assert src == (str(client.host), client.port), (src, client)
    assert dst == (str(destination.host), destination.port), (dst, destination)
    assert tlvs == b"", "unexpected TLVs"


def seeds() -> list[bytes]:
    v4 = bytes([192, 0, 2, 1]) + (25000).to_bytes(2, "big")
    v6 = ipaddress.ip_address("2001:db8::1").packed + (65535).to_bytes(2, "big")
    return [b"\x00" + v4 + bytes(12) + v4, b"\x03" + v6 + v6, b"\x01" + v6 + v4,
            b"\x00" + bytes(36), b"\x03" + b"\xff" * 36]


if __name__ == "__main__":
    common.main(test_one_input, seeds)

"""Admission is a pure function: every refusal rule as a plain call."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from gateway.admission import Refusal, admit, classify_connect_error, unreachable_reply
from gateway.config import Direction, Endpoint


def ep(text: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(text), port)


CLIENT = ep("198.51.100.2", 40000)
DEST = ep("203.0.113.2", 25)
GW = ep("198.51.100.1", 10025)


def verdict(**kw: object) -> Refusal | None:
    args: dict[str, object] = {
        "active": 0, "max_sessions": 10, "direction": Direction.OUTBOUND, "client": CLIENT,
        "destination": DEST, "own_mark": 0x2525, "client_mark": 0,
        "own_upstreams": set(), "is_gateway": lambda e: e == GW,
    }
    args.update(kw)
    return admit(**args)  # type: ignore[arg-type]


def test_admits_an_ordinary_connection() -> None:
    assert verdict() is None


def test_session_limit() -> None:
    assert verdict(active=9) is None
    assert verdict(active=10) is Refusal.LIMIT
    assert Refusal.LIMIT.reply == b"421 4.3.2 smtpgate: too many sessions, try again later\r\n"


def test_loop_by_mark() -> None:
    assert verdict(client_mark=0x2525) is Refusal.LOOP
    assert verdict(client_mark=0x2524) is None
    # mark 0 disables marking: an unmarked client is not "ours"
    assert verdict(own_mark=0, client_mark=0) is None


def test_loop_by_own_upstream_address() -> None:
    assert verdict(own_upstreams={("198.51.100.2", 40000)}) is Refusal.LOOP
    assert verdict(own_upstreams={("198.51.100.2", 40001)}) is None


def test_loop_by_destination_being_the_gateway() -> None:
    assert verdict(destination=GW) is Refusal.LOOP
    # Inbound never forwards to the original destination, so it is not a loop there (A6).
    assert verdict(destination=GW, direction=Direction.INBOUND) is None


def test_loop_wins_over_limit() -> None:
    """A looped connection is refused as a loop even when full: the reason must be right."""
    assert verdict(active=10, client_mark=0x2525) is Refusal.LOOP


@pytest.mark.parametrize(("exc", "label"), [
    (TimeoutError(), "timeout"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "x"), "refused"),
    (ConnectionResetError(errno.ECONNRESET, "x"), "reset"),
    (OSError(errno.EHOSTUNREACH, "x"), "unreachable"),
    (OSError(errno.ENETUNREACH, "x"), "unreachable"),
    (OSError(errno.EMFILE, "x"), "resources"),
    (OSError(errno.ENFILE, "x"), "resources"),
    (OSError(errno.EACCES, "x"), "error"),
])
def test_connect_error_labels(exc: BaseException, label: str) -> None:
    assert classify_connect_error(exc) == label


def test_unreachable_reply_is_one_safe_line() -> None:
    reply = unreachable_reply(
        "refused: 203.0.113.2:25 (Connection refused)\r\nEVIL\x00" + "x" * 999)
    assert reply.startswith(b"421 4.4.1 smtpgate: upstream refused: 203.0.113.2:25")
    assert reply.endswith(b"\r\n") and reply.count(b"\r\n") == 1 and b"\x00" not in reply
    assert len(reply) < 512  # RFC 5321 4.5.3.1.5: a reply line is at most 512 octets


def test_out_of_files_is_not_blamed_on_the_upstream() -> None:
    reply = unreachable_reply("resources: 203.0.113.2:25 (Too many open files)", "resources")
    assert reply == (b"421 4.3.2 smtpgate: out of local resources: resources: "
                     b"203.0.113.2:25 (Too many open files)\r\n")


@pytest.mark.parametrize("text", ["203.0.113.5", "2001:db8::5", "2001:db8:0:0:1::1",
                                  "::ffff:192.0.2.1", "fe80::1%eth0"])
def test_endpoints_from_sockets_say_what_ipaddress_says(text: str) -> None:
    """The address cache (netfilter) formats an address once; its text must be exactly
    the text an Endpoint made anywhere else has, or admission's own-upstream check and
    the log would disagree with the config."""
    import socket

    from gateway.netfilter import _endpoint, sock_endpoint

    plain = text.split("%", maxsplit=1)[0]
    made = Endpoint(ipaddress.ip_address(plain), 25)
    for _ in range(2):  # parsed, then from the cache
        got = sock_endpoint((text, 25) if ":" not in text else (text, 25, 0, 0))
        assert (got, str(got), got.host_text) == (made, str(made), str(made.host))
    family = socket.AF_INET6 if made.host.version == 6 else socket.AF_INET
    raw = (socket.AF_INET.to_bytes(2, "little") + (25).to_bytes(2, "big") + made.host.packed
           + bytes(8)) if family == socket.AF_INET else (
        socket.AF_INET6.to_bytes(2, "little") + (25).to_bytes(2, "big") + bytes(4)
        + made.host.packed + bytes(4))
    got = _endpoint(family, raw)
    assert (got, str(got)) == (made, str(made))

"""SMTP on the wire (gateway/smtp.py): reply framing, capabilities, limits as values, the two
kinds of protocol error; and the machines' transition tables (gateway/upgrade.py,
gateway/offload.py) read as data."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

import pytest

from gateway import offload, upgrade
from gateway.commands import Result
from gateway.config import Level
from gateway.offload import Offload, OffloadState
from gateway.policy import Action, Auth, Plan
from gateway.smtp import (
    LIMITS,
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    ReplyReader,
    capabilities,
    lost_capabilities,
    take_line,
)
from gateway.upgrade import Upgrade, UpgradeState


def test_reply_reader_multiline_and_limits() -> None:
    r = ReplyReader()
    r.feed(b"250-a\r\n250-b\r\n250 c\r\n250 next")
    first = r.next()
    assert first == Reply(250, (b"a", b"b", b"c"), b"250-a\r\n250-b\r\n250 c\r\n")
    assert r.next() is None  # "250 next" has no line end yet
    r2 = ReplyReader()
    r2.feed(b"250-a\r\n251 b\r\n")
    with pytest.raises(RemoteProtocolError, match="code changed"):
        r2.next()


def test_capability_parsing_and_comparison() -> None:
    caps = capabilities(Reply(250, (b"mx", b"pipelining", b"SIZE 100", b"AUTH PLAIN LOGIN"),
                              b""))
    assert caps == {"PIPELINING": "", "SIZE": "100", "AUTH": "PLAIN LOGIN"}
    assert lost_capabilities({"SIZE": ""}, {"SIZE": "1000"}) == ["SIZE"]  # limit appeared
    assert lost_capabilities({"SIZE": "1000"}, {"SIZE": "2000"}) == []
    assert lost_capabilities({"AUTH": "X"}, {}) == []  # AUTH is not the MTA's business here


def test_limits_are_values_each_reader_keeps() -> None:
    """Two readers with different limits side by side: nothing global is rewritten."""
    small, default = ReplyReader(Limits(line=10, reply_lines=2, held=20)), ReplyReader()
    for reader in (small, default):
        reader.feed(b"250-" + b"x" * 20 + b"\r\n")
    with pytest.raises(RemoteProtocolError, match="too long"):
        small.next()
    assert default.next() is None and Limits() == LIMITS  # a continuation line, no reply yet
    lines = bytearray(b"250-a\r\n250-b\r\n250 c\r\n")
    three = ReplyReader(Limits(reply_lines=2))
    three.feed(bytes(lines))
    with pytest.raises(RemoteProtocolError, match="too many lines"):
        three.next()
    with pytest.raises(RemoteProtocolError, match="command line too long"):
        take_line(bytearray(b"NOOP " + b"x" * 20 + b"\r\n"), Limits(line=10))
    assert take_line(bytearray(b"NOOP " + b"x" * 20 + b"\r\n")) == b"NOOP " + b"x" * 20 + b"\r\n"


def test_the_machines_take_their_limits() -> None:
    m = Upgrade(limits=Limits(held=8))
    m.peer_data(b"220 mx.b.test ESMTP\r\n")
    m.client_data(b"EHLO a\r\n")
    m.peer_data(b"250 mx\r\n")
    out = m.client_data(b"MAIL FROM:<a@a.test>\r\n")
    assert m.reason == "too much held before the TLS upgrade", out
    assert Upgrade().limits is LIMITS and Offload(limits=Limits(held=8)).limits.held == 8


# -- the transition tables --------------------------------------------------------------------

def successors(table: Mapping[Enum, frozenset[Enum]], start: Enum) -> set[Enum]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize(("table", "states", "start"), [
    (upgrade.TRANSITIONS, UpgradeState, UpgradeState.BANNER),
    (offload.TRANSITIONS, OffloadState, OffloadState.BANNER)])
def test_each_table_names_every_state_and_every_state_can_end(
        table: Mapping[Enum, frozenset[Enum]], states: type[Enum], start: Enum) -> None:
    done = states["DONE"]
    assert set(table) == set(states)
    assert table[done] == frozenset()
    assert successors(table, start) == set(states)  # every state can be reached
    for state in states:
        if state is not done:
            assert done in table[state], state  # a relay or a defer is possible anywhere


def test_a_reply_is_read_only_where_the_machine_waits_for_one() -> None:
    """The peer's replies wait (unparsed) in the states where the shell has the turn."""
    assert not set(Upgrade.ON_REPLY) & {*upgrade._WAITING, UpgradeState.HANDSHAKE,
                                        UpgradeState.DONE}
    assert set(Offload.ON_REPLY) == set(OffloadState) - {
        OffloadState.COMMAND, OffloadState.HANDSHAKE, OffloadState.DONE}
    for event, states in upgrade.ACCEPTS.items():
        assert states and hasattr(Upgrade, event), event


PLAN = Plan(Action.TRY_TLS, Auth.NONE, Level.DANE, "opportunistic")


def test_a_shell_event_out_of_turn_is_our_bug_not_the_peers() -> None:
    m = Upgrade()
    with pytest.raises(LocalProtocolError, match="plan_ready in state banner"):
        m.plan_ready(PLAN)
    with pytest.raises(LocalProtocolError, match="tls_done in state banner"):
        m.tls_done(True, Result.TLS, "x")
    with pytest.raises(LocalProtocolError, match="reconnected in state banner"):
        m.reconnected()
    with pytest.raises(LocalProtocolError, match="tls_done in state banner"):
        Offload().tls_done(True, "TLSv1.3")
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


def test_a_move_outside_the_table_is_refused() -> None:
    m = Upgrade()
    with pytest.raises(LocalProtocolError, match="no move from banner to handshake"):
        m._go(UpgradeState.HANDSHAKE)
    m.peer_data(b"220 mx.b.test ESMTP\r\n")  # a move the table has
    assert m.state is UpgradeState.GREETING
    o = Offload()
    with pytest.raises(LocalProtocolError, match="no move from banner to handshake"):
        o._go(OffloadState.HANDSHAKE)

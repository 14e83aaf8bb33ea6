"""Idle sessions hold no XML parser: between stanzas a connection gives its lxml parser back
(server.xml.parser), and its next read borrows one or makes one. Clients see no difference."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from server.stream.c2s import C2SConnection
from server.xml import parser as parser_module
from tests.conftest import RunningServer
from tests.rawclient import CLIENT, RawClient


@pytest.fixture(params=["shared", "new"])
def pool(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """shared: parsers are lent between connections; new: none is kept, so every read makes a
    parser that first reads the stream's opening tag again."""
    if request.param == "new":
        no_parsers_kept(monkeypatch)
    yield request.param


def no_parsers_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parser_module, "_POOL_SIZE", 0)
    parser_module._pool().idle.clear()


def connection(server: RunningServer, jid: str) -> C2SConnection:
    found = [c for c in server.server.connections if c.bound and str(c.jid) == jid]
    assert len(found) == 1, jid
    return found[0]


def holds_parser(conn: C2SConnection) -> bool:
    return not conn._parser.idle


async def until(condition: object, timeout: float = 5.0) -> None:
    async def wait() -> None:
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)
    await asyncio.wait_for(wait(), timeout)


async def chat(sender: RawClient, receiver: RawClient, to: str, body: str,
               text: str | None = None) -> None:
    """body: as sent (XML); text: what arrives, if not the same."""
    await sender.send(f"<message to='{to}' type='chat'><body>{body}</body></message>")
    msg = await receiver.next()
    while msg.tag != f"{{{CLIENT}}}message":  # presence echoes
        msg = await receiver.next()
    assert msg.get("from") == sender.jid  # type: ignore[attr-defined]
    assert msg.findtext(f"{{{CLIENT}}}body") == (body if text is None else text)


async def test_idle_sessions_hold_no_parser_and_still_chat(server: RunningServer,
                                                          pool: str) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.raw_login("alice@a.test", resource="r")
    bob = await server.raw_login("bob@a.test", resource="r")
    await alice.send("<presence/>")
    await bob.send("<presence/>")
    conns = [connection(server, "alice@a.test/r"), connection(server, "bob@a.test/r")]
    await until(lambda: not any(map(holds_parser, conns)))
    for i in range(3):
        await chat(alice, bob, "bob@a.test/r", f"hi {i}")
        await chat(bob, alice, "alice@a.test/r", f"hello {i} &amp; <![CDATA[<x>]]>",
                   f"hello {i} & <x>")
        assert not any(map(holds_parser, conns))
    await alice.close()
    await bob.close()


async def test_a_stanza_split_across_reads_keeps_its_parser(server: RunningServer,
                                                            pool: str) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.raw_login("alice@a.test", resource="r")
    bob = await server.raw_login("bob@a.test", resource="r")
    alice_conn = connection(server, "alice@a.test/r")
    await alice.send("<message to='bob@a.test/r' type='chat'><bo")
    await until(lambda: holds_parser(alice_conn))
    # Meanwhile bob's reads borrow (or make) parsers of their own, several times.
    for i in range(3):
        await chat(bob, alice, "alice@a.test/r", f"meanwhile {i}")
    assert holds_parser(alice_conn)
    await alice.send("dy>split</body></message>")
    msg = await bob.next()
    assert msg.findtext(f"{{{CLIENT}}}body") == "split" and msg.get("from") == "alice@a.test/r"
    await until(lambda: not holds_parser(alice_conn))
    # Text left between stanzas is still this connection's own error.
    await alice.send("<presence/>text")
    # Her initial presence comes back (RFC 6121 §4.2.2), before or after bob's message: read it
    # here, so that what follows the next <presence/> is the stream error.
    await alice.next_of("presence")
    await chat(bob, alice, "alice@a.test/r", "unaffected")
    await alice.send("<presence/>")
    assert await alice.stream_error() == "bad-format"
    await chat(bob, bob, "bob@a.test/r", "still here")
    await bob.close()


async def test_slixmpp_chat_with_parsers_made_anew(server: RunningServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    no_parsers_kept(monkeypatch)
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.client("alice@a.test")
    bob = await server.client("bob@a.test")
    got: asyncio.Queue[str] = asyncio.Queue()
    bob.add_event_handler("message", lambda m: got.put_nowait(str(m["body"])))
    conns = [connection(server, "alice@a.test/slix"), connection(server, "bob@a.test/slix")]
    await until(lambda: not any(map(holds_parser, conns)))
    for i in range(3):
        alice.send_message(mto="bob@a.test/slix", mbody=f"hello bob {i}", mtype="chat")
        assert await asyncio.wait_for(got.get(), 5) == f"hello bob {i}"
    await until(lambda: not any(map(holds_parser, conns)))

"""Offline messages (XEP-0160, RFC 6121 §8.5.2.2.1) over real sockets."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lxml import etree

from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import CLIENT, RawClient, sync

STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
DELAY = "{urn:xmpp:delay}delay"
MESSAGE = f"{{{CLIENT}}}message"
PRESENCE = f"{{{CLIENT}}}presence"
IQ = f"{{{CLIENT}}}iq"


def error_condition(el: etree._Element) -> tuple[str | None, str | None]:
    error = el.find(f"{{{CLIENT}}}error")
    assert error is not None, etree.tostring(el)
    for c in error:
        if etree.QName(c).namespace == STANZAS and etree.QName(c).localname != "text":
            return error.get("type"), etree.QName(c).localname
    return error.get("type"), None


async def send_messages(sender: RawClient, to: str, bodies: list[str]) -> list[etree._Element]:
    for i, body in enumerate(bodies):
        await sender.send(f"<message to='{to}' type='chat' id='m{i}'><body>{body}</body>"
                          f"<thread>t1</thread></message>")
    return await sync(sender)


async def come_online(client: RawClient, priority: int = 0) -> list[etree._Element]:
    """Initial presence; returns the stanzas that arrive with it (own presence excluded)."""
    await client.send(f"<presence><priority>{priority}</priority></presence>")
    return [el for el in await sync(client, "online") if el.tag != PRESENCE]


async def test_stored_and_delivered_in_order_with_delay(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test")
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert await send_messages(bob, "alice@a.test", ["one", "two", "three"]) == []
    assert await server.server.storage.offline.count("alice", "a.test") == 3

    alice = await server.raw_login("alice@a.test")
    # Bound but not available: nothing is delivered yet (XEP-0160 §3).
    assert await sync(alice) == []
    got = await come_online(alice)
    assert [m.findtext(f"{{{CLIENT}}}body") for m in got] == ["one", "two", "three"]
    for i, message in enumerate(got):
        assert message.tag == MESSAGE
        assert message.get("from") == "bob@a.test/raw"
        assert message.get("to") == "alice@a.test"
        assert message.get("id") == f"m{i}"
        assert message.findtext(f"{{{CLIENT}}}thread") == "t1"
        delay = message.find(DELAY)
        assert delay is not None and delay.get("from") == "a.test"
        stamp = datetime.fromisoformat(delay.get("stamp", "").replace("Z", "+00:00"))
        assert before <= stamp <= datetime.now(UTC)
    assert await server.server.storage.offline.count("alice", "a.test") == 0

    # Delivered once: a second resource coming online gets nothing.
    alice2 = await server.raw_login("alice@a.test", resource="second")
    assert await come_online(alice2) == []
    # Now that alice is available, messages go straight to her and are not stored.
    assert await send_messages(bob, "alice@a.test", ["live"]) == []
    assert [m.findtext(f"{{{CLIENT}}}body") for m in await sync(alice)
            if m.tag == MESSAGE] == ["live"]
    assert await server.server.storage.offline.count("alice", "a.test") == 0


def counted_loads(server: RunningServer, monkeypatch: Any) -> list[str]:
    """The users whose offline messages are read from now on."""
    offline = server.server.storage.offline
    reads: list[str] = []
    load = offline.load

    async def counted(user: str, domain: str) -> Any:
        reads.append(user)
        return await load(user, domain)

    monkeypatch.setattr(offline, "load", counted)
    return reads


async def test_no_read_for_an_account_known_to_hold_none(
        server: RunningServer, monkeypatch: Any) -> None:
    """The initial presence of an account without stored messages reads nothing (issue 25
    item 6); one with messages still gets them, and after their delivery it is known empty."""
    reads = counted_loads(server, monkeypatch)
    for user in ("alice", "bob", "carol"):
        await server.add_user(f"{user}@a.test")
    alice = await server.raw_login("alice@a.test")
    assert await come_online(alice) == []
    assert reads == []
    bob = await server.raw_login("bob@a.test")
    assert await send_messages(bob, "carol@a.test", ["held"]) == []
    carol = await server.raw_login("carol@a.test")
    got = await come_online(carol)
    assert [m.findtext(f"{{{CLIENT}}}body") for m in got] == ["held"]
    assert reads == ["carol", "carol"]  # the batch, then none left
    await carol.close()
    again = await server.raw_login("carol@a.test", resource="again")
    assert await come_online(again) == []
    assert reads == ["carol", "carol"]


async def test_negative_priority_does_not_take_offline_messages(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test")
    await send_messages(bob, "alice@a.test", ["kept"])
    shy = await server.raw_login("alice@a.test", resource="shy")
    assert await come_online(shy, priority=-1) == []
    # RFC 6121 §8.5.2.1.1: a negative-priority resource is not a target: still stored.
    await send_messages(bob, "alice@a.test", ["also kept"])
    assert await server.server.storage.offline.count("alice", "a.test") == 2
    alice = await server.raw_login("alice@a.test", resource="main")
    got = await come_online(alice, priority=1)
    assert [m.findtext(f"{{{CLIENT}}}body") for m in got] == ["kept", "also kept"]


async def test_headline_is_not_stored(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test")
    await bob.send("<message to='alice@a.test' type='headline'><body>news</body></message>")
    assert await sync(bob) == []
    assert await server.server.storage.offline.count("alice", "a.test") == 0


async def test_quota_gives_resource_constraint(tmp_path: Path) -> None:
    running = await start_server(tmp_path, "[offline]\nmax_messages = 2\n")
    try:
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        bob = await running.raw_login("bob@a.test")
        replies = await send_messages(bob, "alice@a.test", ["a", "b", "c"])
        assert len(replies) == 1
        assert replies[0].get("type") == "error" and replies[0].get("id") == "m2"
        assert error_condition(replies[0]) == ("wait", "resource-constraint")
        assert await running.server.storage.offline.count("alice", "a.test") == 2
    finally:
        await stop_server(running)


async def test_messages_survive_a_restart(tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    try:
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        bob = await running.raw_login("bob@a.test")
        assert await send_messages(bob, "alice@a.test", ["before", "restart"]) == []
        await bob.close()
    finally:
        await stop_server(running)
    running = await start_server(tmp_path)
    try:
        alice = await running.raw_login("alice@a.test")
        got = await come_online(alice)
        assert [m.findtext(f"{{{CLIENT}}}body") for m in got] == ["before", "restart"]
        assert all(m.find(DELAY) is not None for m in got)
        await alice.close()
    finally:
        await stop_server(running)


async def test_message_to_unknown_account_is_service_unavailable(server: RunningServer) -> None:
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test")
    replies = await send_messages(bob, "nobody@a.test", ["hello?"])
    assert len(replies) == 1 and replies[0].get("type") == "error"
    assert error_condition(replies[0]) == ("cancel", "service-unavailable")


async def test_disco_advertises_msgoffline(server: RunningServer) -> None:
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test")
    await bob.send("<iq type='get' id='d1' to='a.test'>"
                   "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    reply = await bob.expect(IQ)
    features = {f.get("var") for f in reply.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert "msgoffline" in features


async def test_slixmpp_client_gets_offline_messages(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test")
    await send_messages(bob, "alice@a.test", ["hi from the past"])
    xmpp = await server.client("alice@a.test", presence=False, plugins=("xep_0203",))
    got: asyncio.Queue[object] = asyncio.Queue()
    xmpp.add_event_handler("message", got.put_nowait)
    xmpp.send_presence()
    msg = await asyncio.wait_for(got.get(), 5)
    assert msg["body"] == "hi from the past"  # type: ignore[index]
    assert msg["delay"]["from"] == "a.test"  # type: ignore[index]


async def test_too_many_accounts_holding_messages_means_reading_for_all(
        server: RunningServer, monkeypatch: Any) -> None:
    """Beyond the limit the set is dropped (memory): every initial presence reads again."""
    from server.modules import offline as offline_module

    monkeypatch.setattr(offline_module, "_MAX_HOLDING", 1)
    for user in ("alice", "bob", "carol", "dave"):
        await server.add_user(f"{user}@a.test")
    bob = await server.raw_login("bob@a.test")
    assert await send_messages(bob, "carol@a.test", ["c"]) == []
    assert await send_messages(bob, "dave@a.test", ["d"]) == []  # the second: over the limit
    reads = counted_loads(server, monkeypatch)
    alice = await server.raw_login("alice@a.test")
    assert await come_online(alice) == []
    assert reads == ["alice"]
    dave = await server.raw_login("dave@a.test")
    assert [m.findtext(f"{{{CLIENT}}}body") for m in await come_online(dave)] == ["d"]


async def test_a_message_stored_while_its_account_came_online_is_delivered(
        server: RunningServer, monkeypatch: Any) -> None:
    """Stored for an offline bob, but the store ends only after bob's initial presence read
    the (still empty) storage: delivered to him then, not left until his next login."""
    for user in ("alice", "bob"):
        await server.add_user(f"{user}@a.test")
    offline = server.server.storage.offline
    release = asyncio.Event()
    slow_store = offline.store

    async def store(*args: Any) -> Any:
        await release.wait()
        return await slow_store(*args)
    monkeypatch.setattr(offline, "store", store)
    alice = await server.raw_login("alice@a.test")
    await alice.send("<message to='bob@a.test' type='chat' id='late'><body>late</body>"
                     "</message>")
    await asyncio.sleep(0.2)  # routed to offline storage, the store waits
    bob = await server.raw_login("bob@a.test")
    assert await come_online(bob) == []  # its read found nothing yet
    release.set()
    got = await bob.next_of("message", 5)
    assert got.get("id") == "late" and got.findtext(f"{{{CLIENT}}}body") == "late"

"""Blocking Command (XEP-0191): the blocklist protocol and its enforcement, over real sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from lxml import etree
from slixmpp import JID as SlixJID

from server.jid import JID
from server.modules.blocking import Blocklist
from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import CLIENT, RawClient, end_stream
from tests.test_offline import IQ, MESSAGE, PRESENCE, come_online, error_condition, sync
from tests.test_presence import next_presence

BLOCKING = "urn:xmpp:blocking"
BLOCKED = "{urn:xmpp:blocking:errors}blocked"


def items(el: etree._Element) -> list[str]:
    return [i.get("jid", "") for i in el.iter(f"{{{BLOCKING}}}item")]


async def iq(client: RawClient, type_: str, payload: str, ident: str) -> etree._Element:
    """Send an iq to the own account; returns its answer (pushes before it are kept aside
    in client.pushes)."""
    await client.send(f"<iq type='{type_}' id='{ident}'>{payload}</iq>")
    while True:
        el = await client.next()
        if el.tag == IQ and el.get("id") == ident:
            return el
        client.pushes.append(el)  # type: ignore[attr-defined]


async def login(server: RunningServer, jid: str, resource: str = "raw",
                available: bool = True) -> RawClient:
    client = await server.raw_login(jid, resource=resource)
    client.pushes = []  # type: ignore[attr-defined]
    if available:
        await come_online(client)
    return client


async def blocklist(client: RawClient) -> list[str]:
    reply = await iq(client, "get", f"<blocklist xmlns='{BLOCKING}'/>", "bl")
    assert reply.get("type") == "result", etree.tostring(reply)
    assert reply.find(f"{{{BLOCKING}}}blocklist") is not None
    return items(reply)


def block(*jids: str) -> str:
    return f"<block xmlns='{BLOCKING}'>" + "".join(f"<item jid='{j}'/>" for j in jids) + "</block>"


def unblock(*jids: str) -> str:
    return (f"<unblock xmlns='{BLOCKING}'>" + "".join(f"<item jid='{j}'/>" for j in jids)
            + "</unblock>")


async def pushes(client: RawClient) -> list[etree._Element]:
    got = [el for el in [*client.pushes, *await sync(client)]  # type: ignore[attr-defined]
           if el.tag == IQ and el.get("type") == "set"]
    client.pushes = []  # type: ignore[attr-defined]
    return got


@pytest.fixture
async def users(server: RunningServer) -> RunningServer:
    for user in ("alice", "bob", "carol"):
        await server.add_user(f"{user}@a.test")
    return server


# -- matching (XEP-0191 §6, XEP-0016 §2.1) -------------------------------------------------------

@pytest.mark.parametrize(("item", "jid", "blocked"), [
    ("bob@a.test", "bob@a.test", True),
    ("bob@a.test", "bob@a.test/phone", True),
    ("bob@a.test/phone", "bob@a.test/phone", True),
    ("bob@a.test/phone", "bob@a.test/laptop", False),
    ("bob@a.test/phone", "bob@a.test", False),
    ("a.test", "bob@a.test/phone", True),
    ("a.test", "a.test", True),
    ("a.test", "a.test/service", True),
    ("a.test/service", "a.test/service", True),
    ("a.test/service", "a.test", False),
    ("a.test/service", "bob@a.test/service", False),
    ("b.test", "bob@a.test", False),
    ("bob@b.test", "bob@a.test", False),
])
def test_matching(item: str, jid: str, blocked: bool) -> None:
    assert Blocklist([item]).blocks(JID.parse(jid)) is blocked
    assert not Blocklist().blocks(JID.parse(jid))


# -- the protocol ------------------------------------------------------------------------------

async def test_block_list_unblock_and_pushes(users: RunningServer) -> None:
    alice = await login(users, "alice@a.test", "one")
    watcher = await login(users, "alice@a.test", "two")
    bystander = await login(users, "alice@a.test", "three")  # never asks for the blocklist
    assert await blocklist(alice) == []
    assert await blocklist(watcher) == []

    reply = await iq(alice, "set", block("Bob@A.test", "b.test", "carol@a.test/Phone"), "b1")
    assert reply.get("type") == "result"
    assert sorted(await blocklist(watcher)) == ["b.test", "bob@a.test", "carol@a.test/Phone"]
    for client in (alice, watcher):
        (push,) = await pushes(client)
        assert push.get("to") == client.jid  # type: ignore[attr-defined]
        assert push.find(f"{{{BLOCKING}}}block") is not None
        assert items(push) == ["bob@a.test", "b.test", "carol@a.test/Phone"]
    assert await pushes(bystander) == []

    reply = await iq(alice, "set", unblock("bob@a.test"), "u1")
    assert reply.get("type") == "result"
    (push,) = await pushes(watcher)
    assert push.find(f"{{{BLOCKING}}}unblock") is not None and items(push) == ["bob@a.test"]
    assert sorted(await blocklist(alice)) == ["b.test", "carol@a.test/Phone"]
    await pushes(alice)

    # An empty <unblock/> unblocks everyone and is pushed as such (XEP-0191 §3.5).
    reply = await iq(alice, "set", f"<unblock xmlns='{BLOCKING}'/>", "u2")
    assert reply.get("type") == "result"
    (push,) = await pushes(watcher)
    unblock_all = push.find(f"{{{BLOCKING}}}unblock")
    assert unblock_all is not None and len(unblock_all) == 0
    assert await blocklist(alice) == []
    assert await pushes(bystander) == []
    assert await users.server.storage.blocklists.get("alice", "a.test") == []


async def test_block_errors(users: RunningServer) -> None:
    alice = await login(users, "alice@a.test")
    reply = await iq(alice, "set", f"<block xmlns='{BLOCKING}'/>", "e1")
    assert error_condition(reply) == ("modify", "bad-request")
    reply = await iq(alice, "set", block("@bad@@"), "e2")
    assert error_condition(reply) == ("modify", "jid-malformed")
    reply = await iq(alice, "set", block("ok@a.test", "x@"), "e3")
    assert error_condition(reply) == ("modify", "jid-malformed")
    assert await blocklist(alice) == []  # all or nothing
    reply = await iq(alice, "set", f"<blocklist xmlns='{BLOCKING}'/>", "e4")
    assert error_condition(reply) == ("modify", "bad-request")
    # Another account's blocklist is not ours to read.
    await alice.send(f"<iq type='get' id='e5' to='bob@a.test'><blocklist xmlns='{BLOCKING}'/></iq>")
    reply = await alice.expect(IQ)
    assert reply.get("type") == "error"


async def test_blocklist_is_stored(tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    try:
        await running.add_user("alice@a.test")
        alice = await login(running, "alice@a.test")
        assert (await iq(alice, "set", block("bob@b.test"), "b")).get("type") == "result"
    finally:
        await stop_server(running)
    running = await start_server(tmp_path)
    try:
        alice = await login(running, "alice@a.test")
        assert await blocklist(alice) == ["bob@b.test"]
    finally:
        await stop_server(running)


# -- enforcement -------------------------------------------------------------------------------

async def test_blocked_contact_gets_service_unavailable(users: RunningServer) -> None:
    alice = await login(users, "alice@a.test")
    bob = await login(users, "bob@a.test")
    assert (await iq(alice, "set", block("bob@a.test"), "b")).get("type") == "result"
    await bob.send("<message to='alice@a.test' id='m1' type='chat'><body>hi</body></message>")
    await bob.send("<message to='alice@a.test/raw' id='m2'><body>hi</body></message>")
    await bob.send("<iq to='alice@a.test/raw' id='q1' type='get'>"
                   "<query xmlns='jabber:iq:version'/></iq>")
    await bob.send("<iq to='alice@a.test/raw' id='q2' type='result'/>")
    await bob.send("<presence to='alice@a.test' type='subscribe'/>")
    await bob.send("<presence to='alice@a.test/raw'/>")
    replies = await sync(bob)
    assert [(r.tag, r.get("id")) for r in replies] == [(MESSAGE, "m1"), (MESSAGE, "m2"), (IQ, "q1")]
    for reply in replies:
        assert reply.get("type") == "error" and reply.get("from", "").startswith("alice@a.test")
        assert error_condition(reply) == ("cancel", "service-unavailable")
        assert reply.find(f".//{BLOCKED}") is None  # the contact does not learn it is blocked
    # Nothing reached alice; carol still gets through.
    await pushes(alice)
    assert await sync(alice) == []
    carol = await login(users, "carol@a.test")
    await carol.send("<message to='alice@a.test' id='c1' type='chat'><body>hey</body></message>")
    assert await sync(carol) == []
    got = await sync(alice)
    assert [m.get("id") for m in got if m.tag == MESSAGE] == ["c1"]

    # Unblocked: bob gets through again.
    assert (await iq(alice, "set", unblock("bob@a.test"), "u")).get("type") == "result"
    await bob.send("<message to='alice@a.test' id='m3' type='chat'><body>back</body></message>")
    assert await sync(bob) == []
    assert [m.get("id") for m in await sync(alice) if m.tag == MESSAGE] == ["m3"]


async def test_domain_block_applies_to_offline_account(users: RunningServer) -> None:
    """The blocklist of an account without a session is read from storage: a blocked sender's
    message is bounced, not stored; and it is read when the stanza comes, not remembered from
    the session that ended."""
    alice = await login(users, "alice@a.test")
    assert (await iq(alice, "set", block("a.test/ignored", "carol@a.test"), "b")).get(
        "type") == "result"
    await end_stream(alice)  # the server's </stream:stream>: her only session is over
    carol = await login(users, "carol@a.test")
    bob = await login(users, "bob@a.test")
    await carol.send("<message to='alice@a.test' id='m1' type='chat'><body>x</body></message>")
    (reply,) = await sync(carol)
    assert (reply.get("id"), error_condition(reply)) == ("m1", ("cancel", "service-unavailable"))
    await bob.send("<message to='alice@a.test' id='m2' type='chat'><body>y</body></message>")
    assert await sync(bob) == []
    offline = users.server.storage.offline
    assert await offline.count("alice", "a.test") == 1
    # Storage changes while alice is away (as another node or an admin tool would change it):
    # the next stanzas follow the stored list, so nothing of the old session's list is used.
    blocklists = users.server.storage.blocklists
    await blocklists.remove("alice", "a.test", ["carol@a.test"])
    await blocklists.add("alice", "a.test", ["bob@a.test"])
    await carol.send("<message to='alice@a.test' id='m3' type='chat'><body>z</body></message>")
    assert await sync(carol) == []
    await bob.send("<message to='alice@a.test' id='m4' type='chat'><body>w</body></message>")
    (reply,) = await sync(bob)
    assert (reply.get("id"), error_condition(reply)) == ("m4", ("cancel", "service-unavailable"))
    assert await offline.count("alice", "a.test") == 2


async def test_message_to_blocked_contact_is_not_acceptable(users: RunningServer) -> None:
    alice = await login(users, "alice@a.test")
    bob = await login(users, "bob@a.test")
    assert (await iq(alice, "set", block("bob@a.test", "b.test"), "b")).get("type") == "result"
    await pushes(alice)
    await alice.send("<message to='bob@a.test/raw' id='m1' type='chat'><body>hi</body></message>")
    await alice.send("<message to='someone@b.test' id='m2'><body>hi</body></message>")
    await alice.send("<iq to='bob@a.test/raw' id='q1' type='get'>"
                     "<ping xmlns='urn:xmpp:ping'/></iq>")
    await alice.send("<presence to='bob@a.test/raw'/>")
    replies = await sync(alice)
    assert [(r.tag, r.get("id")) for r in replies] == [(MESSAGE, "m1"), (MESSAGE, "m2"), (IQ, "q1")]
    for reply in replies:
        assert reply.get("type") == "error"
        assert error_condition(reply) == ("modify", "not-acceptable")
        error = reply.find(f"{{{CLIENT}}}error")
        assert error is not None and error.find(BLOCKED) is not None
    assert [el for el in await sync(bob) if el.tag != PRESENCE or el.get("from") != bob.jid] == []  # type: ignore[attr-defined]


async def presences_before(client: RawClient, sender: RawClient, mark: str) -> list[etree._Element]:
    """The presences `client` receives before a message that `sender` sends it now: what was
    routed to `client` before that message."""
    await sender.send(f"<message to='{client.jid}' id='{mark}'><body>.</body></message>")  # type: ignore[attr-defined]
    seen: list[etree._Element] = []
    while True:
        el = await client.next()
        if el.tag == MESSAGE and el.get("id") == mark:
            return seen
        if el.tag == PRESENCE:
            seen.append(el)


async def test_block_sends_unavailable_to_subscribed_contact(users: RunningServer) -> None:
    alice = await login(users, "alice@a.test")
    bob = await login(users, "bob@a.test")
    carol = await login(users, "carol@a.test")
    # bob subscribes to alice's presence.
    await bob.send("<presence to='alice@a.test' type='subscribe'/>")
    await next_presence(alice, "subscribe", "bob@a.test")
    await alice.send("<presence to='bob@a.test' type='subscribed'/>")
    await next_presence(bob, "subscribed", "alice@a.test")
    await alice.send("<presence><status>here</status></presence>")
    while (await next_presence(bob, None, "alice@a.test/raw")).findtext(
            f"{{{CLIENT}}}status") != "here":
        pass  # first the presence she had when bob's subscription was approved

    assert (await iq(alice, "set", block("bob@a.test"), "b")).get("type") == "result"
    gone = await next_presence(bob, "unavailable", "alice@a.test")
    assert gone.get("from") == "alice@a.test/raw"
    # Blocked: alice's presence changes no longer reach bob.
    await alice.send("<presence><status>still here</status></presence>")
    await sync(alice)  # her presence was handled (broadcast or dropped) before the answer
    assert [etree.tostring(p) for p in await presences_before(bob, carol, "after-block")] == []
    # Unblocked: bob gets alice's current presence again (XEP-0191 §3.4).
    assert (await iq(alice, "set", unblock("bob@a.test"), "u")).get("type") == "result"
    back = await next_presence(bob, None, "alice@a.test")
    assert (back.get("from"), back.findtext(f"{{{CLIENT}}}status")) == (
        "alice@a.test/raw", "still here")


async def test_slixmpp_plugin(users: RunningServer) -> None:
    xmpp = await users.client("alice@a.test", plugins=("xep_0030", "xep_0191"))
    blocking = xmpp.plugin["xep_0191"]
    assert await blocking.get_blocked_jids() == set()
    pushed: asyncio.Queue[object] = asyncio.Queue()
    xmpp.add_event_handler("blocked", pushed.put_nowait)
    await blocking.block([SlixJID("bob@a.test"), SlixJID("b.test")])
    push = await asyncio.wait_for(pushed.get(), 5)
    assert {str(i["jid"]) for i in push["block"]["items"]} == {"bob@a.test", "b.test"}  # type: ignore[index]
    assert {str(j) for j in await blocking.get_blocked_jids()} == {"bob@a.test", "b.test"}
    await blocking.unblock([SlixJID("b.test")])
    assert {str(j) for j in await blocking.get_blocked_jids()} == {"bob@a.test"}
    info = await xmpp.plugin["xep_0030"].get_info(jid=SlixJID("a.test"))
    assert "urn:xmpp:blocking" in info["disco_info"]["features"]

    bob = await login(users, "bob@a.test")
    got: asyncio.Queue[object] = asyncio.Queue()
    xmpp.add_event_handler("message", got.put_nowait)
    await bob.send("<message to='alice@a.test' id='m1' type='chat'><body>hi</body></message>")
    (reply,) = await sync(bob)
    assert error_condition(reply) == ("cancel", "service-unavailable")
    # carol is not blocked; her message, sent after bob's was refused, is the first to arrive.
    carol = await login(users, "carol@a.test")
    await carol.send("<message to='alice@a.test' id='c1' type='chat'><body>hey</body></message>")
    first = await asyncio.wait_for(got.get(), 5)
    assert (first["id"], str(first["from"]), first["body"]) == (  # type: ignore[index]
        "c1", "carol@a.test/raw", "hey")

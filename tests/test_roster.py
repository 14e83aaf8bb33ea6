"""jabber:iq:roster over real sockets: get, set, remove, pushes, versioning, errors."""

from __future__ import annotations

import asyncio
import weakref

import pytest
from lxml import etree

from server.jid import JID
from tests.conftest import RunningServer
from tests.rawclient import CLIENT, RawClient
from tests.test_presence import next_presence

ROSTER = "jabber:iq:roster"
IQ = f"{{{CLIENT}}}iq"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


# Stanzas that arrived before an awaited answer, by client (weakly: a dead client's id may be
# reused by a new one, its stanzas must not be).
_skipped: weakref.WeakKeyDictionary[RawClient, list[etree._Element]] = weakref.WeakKeyDictionary()


async def request(client: RawClient, xml: str, id_: str) -> etree._Element:
    """Send an iq and wait for its answer; other stanzas are kept for push()."""
    await client.send(xml)
    while True:
        el = await client.next()
        if el.tag == IQ and el.get("id") == id_:
            return el
        _skipped.setdefault(client, []).append(el)


def kept(client: RawClient) -> list[etree._Element]:
    """What request() set aside for this client, not yet taken by push()."""
    return _skipped.get(client, [])


async def push(client: RawClient) -> etree._Element:
    while True:
        waiting = _skipped.get(client)
        el = waiting.pop(0) if waiting else await client.next()
        if el.tag == IQ and el.get("type") == "set":
            assert el.get("from") in (None, client.jid.split("/")[0])
            await client.send(f"<iq type='result' id='{el.get('id')}'/>")
            return el.find(f"{{{ROSTER}}}query/{{{ROSTER}}}item")


def error_of(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find(f"{{{CLIENT}}}error")
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


async def test_set_get_push_remove_and_versions(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    pc = await server.raw_login("alice@a.test", resource="pc")
    phone = await server.raw_login("alice@a.test", resource="phone")
    quiet = await server.raw_login("alice@a.test", resource="quiet")  # never asks: no pushes
    first = await request(pc, f"<iq type='get' id='g1'><query xmlns='{ROSTER}'/></iq>", "g1")
    version = first.find(f"{{{ROSTER}}}query").get("ver")
    assert version is not None and len(first.find(f"{{{ROSTER}}}query")) == 0
    await request(phone, f"<iq type='get' id='g2'><query xmlns='{ROSTER}'/></iq>", "g2")
    reply = await request(pc, f"<iq type='set' id='s1'><query xmlns='{ROSTER}'>"
                              "<item jid='Bob@A.test' name='Bob'><group>Friends</group></item>"
                              "</query></iq>", "s1")
    assert reply.get("type") == "result"
    for client in (pc, phone):
        item = await push(client)
        assert item.get("jid") == "bob@a.test" and item.get("subscription") == "none"
        assert item.findtext(f"{{{ROSTER}}}group") == "Friends"
    # Versioning: the current version gives an empty result, an old one the full roster.
    full = await request(pc, f"<iq type='get' id='g3'><query xmlns='{ROSTER}' ver='{version}'/>"
                             "</iq>", "g3")
    query = full.find(f"{{{ROSTER}}}query")
    new_version = query.get("ver")
    assert new_version != version and [i.get("jid") for i in query] == ["bob@a.test"]
    same = await request(pc, f"<iq type='get' id='g4'><query xmlns='{ROSTER}' "
                             f"ver='{new_version}'/></iq>", "g4")
    assert same.get("type") == "result" and len(same) == 0
    # Remove: pushed with subscription='remove'; removing again is item-not-found.
    await request(pc, f"<iq type='set' id='r1'><query xmlns='{ROSTER}'>"
                      "<item jid='bob@a.test' subscription='remove'/></query></iq>", "r1")
    for client in (pc, phone):
        assert (await push(client)).get("subscription") == "remove"
    again = await request(pc, f"<iq type='set' id='r2'><query xmlns='{ROSTER}'>"
                              "<item jid='bob@a.test' subscription='remove'/></query></iq>", "r2")
    assert error_of(again) == "item-not-found"
    # The resource that never requested the roster got no push (RFC 6121 §2.1.6): the first
    # stanza it receives is the answer to a ping sent after every change above was pushed.
    assert kept(quiet) == []
    await quiet.send("<iq type='get' id='p' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    first = await quiet.next()
    assert (first.tag, first.get("id"), first.get("type")) == (IQ, "p", "result"), \
        etree.tostring(first)
    # Nor did the other two get anything beyond the pushes they acknowledged.
    for client in (pc, phone):
        assert [etree.tostring(el) for el in kept(client)] == []


@pytest.mark.parametrize(("item", "condition"), [
    ("<item jid='a@b@c'/>", "jid-malformed"),
    ("<item jid='bob@a.test/res'/>", "jid-malformed"),
    ("<item jid='alice@a.test'/>", "bad-request"),
    ("<item jid='bob@a.test'><group>x</group><group>x</group></item>", "bad-request"),
    ("<item jid='bob@a.test'><group></group></item>", "not-acceptable"),
    ("<item jid='bob@a.test' name='" + "n" * 1100 + "'/>", "not-acceptable"),
    ("<item jid='bob@a.test'/><item jid='carol@a.test'/>", "bad-request"),
    ("", "bad-request"),
])
async def test_roster_set_errors(server: RunningServer, item: str, condition: str) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw_login("alice@a.test")
    reply = await request(client, f"<iq type='set' id='e'><query xmlns='{ROSTER}'>{item}"
                                  "</query></iq>", "e")
    assert error_of(reply) == condition


async def test_subscription_attribute_from_client_is_ignored(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw_login("alice@a.test")
    await request(client, f"<iq type='set' id='s'><query xmlns='{ROSTER}'>"
                          "<item jid='bob@a.test' subscription='both' ask='subscribe'/>"
                          "</query></iq>", "s")
    roster = await request(client, f"<iq type='get' id='g'><query xmlns='{ROSTER}'/></iq>", "g")
    item = roster.find(f"{{{ROSTER}}}query/{{{ROSTER}}}item")
    assert item.get("subscription") == "none" and item.get("ask") is None


async def test_max_roster_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import start_server, stop_server
    running = await start_server(tmp_path, "[roster]\nmax_items = 2\n")
    try:
        await running.add_user("alice@a.test")
        client = await running.raw_login("alice@a.test")
        for n in range(3):
            reply = await request(client, f"<iq type='set' id='s{n}'><query xmlns='{ROSTER}'>"
                                          f"<item jid='c{n}@a.test'/></query></iq>", f"s{n}")
            if n < 2:
                assert reply.get("type") == "result"
            else:
                assert error_of(reply) == "not-allowed"
    finally:
        await stop_server(running)


async def test_pre_approval(server: RunningServer) -> None:
    """RFC 6121 §3.4: alice pre-approves bob; bob's later request is approved at once."""
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.raw_login("alice@a.test")
    await request(alice, f"<iq type='get' id='g'><query xmlns='{ROSTER}'/></iq>", "g")
    await alice.send("<presence/>")
    await alice.send("<presence to='bob@a.test' type='subscribed'/>")
    item = await push(alice)
    assert item.get("jid") == "bob@a.test" and item.get("approved") == "true"
    bob = await server.raw_login("bob@a.test")
    await bob.send("<presence/>")
    await bob.send("<presence to='alice@a.test' type='subscribe'/>")
    answer = await next_presence(bob, "subscribed")
    assert answer.get("from") == "alice@a.test"
    await next_presence(bob, None, "alice@a.test")  # alice's presence follows at once
    item = await push(alice)
    assert item.get("subscription") == "from" and item.get("approved") is None


def held_reads(monkeypatch: pytest.MonkeyPatch, store: object, method: str
               ) -> tuple[list[str], asyncio.Event]:
    """store.method(user, domain) made to note the user and wait for the event."""
    reads: list[str] = []
    release = asyncio.Event()
    read = getattr(store, method)

    async def held(user: str, domain: str) -> object:
        reads.append(user)
        await release.wait()
        return await read(user, domain)

    monkeypatch.setattr(store, method, held)
    return reads, release


async def test_roster_read_once_at_bind_and_not_kept_when_forgotten_meanwhile(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The roster is read ahead at bind; the initial presence and the roster get share that
    read. A copy forgotten while it is read ([cluster]: changed on another node) is not kept."""
    await server.add_user("alice@a.test")
    reads, release = held_reads(monkeypatch, server.server.storage.rosters, "load")
    alice = await server.raw_login("alice@a.test")
    assert reads == ["alice"]  # read at bind, before any stanza asks for it
    await alice.send(f"<presence/><iq type='get' id='g1'><query xmlns='{ROSTER}'/></iq>")
    await asyncio.sleep(0.2)
    assert reads == ["alice"]  # presence and roster get wait for that same read
    rosters = server.server.rosters
    bare = JID.parse("alice@a.test")
    rosters.forget(bare)
    release.set()
    answer = await request(alice, "<iq type='get' id='g2'><query xmlns='jabber:iq:roster'/>"
                           "</iq>", "g2")
    assert answer.get("type") == "result"
    assert reads == ["alice", "alice"]  # the forgotten copy was not kept: read again
    assert rosters.cached(bare) is not None

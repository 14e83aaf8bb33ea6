"""Presence and subscriptions between real slixmpp and raw clients (RFC 6121 §3–§4)."""

from __future__ import annotations

import asyncio

from lxml import etree

from tests.conftest import RunningServer
from tests.rawclient import CLIENT, RawClient, sync

PRESENCE = f"{{{CLIENT}}}presence"
IQ = f"{{{CLIENT}}}iq"
ROSTER = "jabber:iq:roster"


async def next_presence(client: RawClient, type_: str | None = None,
                        from_: str | None = None) -> etree._Element:
    """The next presence of that type (roster pushes and others are skipped)."""
    while True:
        el = await client.next()
        if el.tag == IQ and el.get("type") == "set":  # acknowledge roster pushes
            await client.send(f"<iq type='result' id='{el.get('id')}'/>")
            continue
        if el.tag == PRESENCE and el.get("type") == type_ and (
                from_ is None or el.get("from", "").startswith(from_)):
            return el


async def roster_of(client: RawClient) -> dict[str, etree._Element]:
    await client.send(f"<iq type='get' id='r1'><query xmlns='{ROSTER}'/></iq>")
    while True:
        el = await client.next()
        if el.tag == IQ and el.get("id") == "r1":
            return {i.get("jid"): i for i in el.iter(f"{{{ROSTER}}}item")}


async def nothing_more(client: RawClient) -> None:
    """Nothing else is queued: a ping's answer is the next stanza."""
    await client.send("<iq type='get' id='probe-end' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    el = await client.next()
    assert el.tag == IQ and el.get("id") == "probe-end", etree.tostring(el)


async def subscribe_both(server: RunningServer, a: RawClient, b: RawClient, ajid: str,
                         bjid: str) -> None:
    await a.send(f"<presence to='{bjid}' type='subscribe'/>")
    req = await next_presence(b, "subscribe")
    assert req.get("from") == ajid
    await b.send(f"<presence to='{ajid}' type='subscribed'/>")
    await next_presence(a, "subscribed")
    # After 'subscribed', the new watcher gets the current presence (RFC 6121 §3.1.5).
    await next_presence(a, None, bjid)
    await b.send(f"<presence to='{ajid}' type='subscribe'/>")
    await next_presence(a, "subscribe")
    await a.send(f"<presence to='{bjid}' type='subscribed'/>")
    await next_presence(b, "subscribed")


async def test_subscription_handshake_and_presence(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.raw_login("alice@a.test", resource="pc")
    bob = await server.raw_login("bob@a.test", resource="pc")
    await roster_of(alice)
    await roster_of(bob)
    await alice.send("<presence/>")
    await next_presence(alice, None, "alice@a.test/pc")  # own presence echoed
    await bob.send("<presence/>")
    await next_presence(bob, None, "bob@a.test/pc")
    await subscribe_both(server, alice, bob, "alice@a.test", "bob@a.test")
    roster = await roster_of(alice)
    assert roster["bob@a.test"].get("subscription") == "both"
    # A presence update reaches the subscriber with its extensions intact.
    await bob.send("<presence><show>away</show><status>lunch</status>"
                   "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v'/>"
                   "</presence>")
    update = await next_presence(alice, None, "bob@a.test/pc")
    assert update.findtext(f"{{{CLIENT}}}show") == "away"
    assert update.find("{http://jabber.org/protocol/caps}c").get("ver") == "v"
    # Abrupt disconnect: alice sees bob go unavailable.
    bob.writer.transport.abort()
    gone = await next_presence(alice, "unavailable", "bob@a.test/pc")
    assert gone.get("from") == "bob@a.test/pc"
    # Bob comes back: his initial presence reaches alice, and alice's reaches him (probe).
    bob2 = await server.raw_login("bob@a.test", resource="phone")
    await bob2.send("<presence/>")
    seen = set()
    while len(seen) < 2:
        p = await bob2.next()
        if p.tag == PRESENCE:
            seen.add(p.get("from"))
    assert seen == {"alice@a.test/pc", "bob@a.test/phone"}
    await next_presence(alice, None, "bob@a.test/phone")


async def test_pending_request_redelivered_at_login(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.raw_login("alice@a.test")
    await alice.send("<presence to='bob@a.test' type='subscribe'><status>hi bob</status></presence>")
    roster = await roster_of(alice)
    assert roster["bob@a.test"].get("ask") == "subscribe"
    bob = await server.raw_login("bob@a.test")
    await bob.send("<presence/>")
    req = await next_presence(bob, "subscribe")
    assert req.get("from") == "alice@a.test"
    assert req.findtext(f"{{{CLIENT}}}status") == "hi bob"


async def test_probe_from_stranger_reveals_nothing(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("eve@a.test")
    alice = await server.raw_login("alice@a.test")
    await alice.send("<presence><status>secret</status></presence>")
    eve = await server.raw_login("eve@a.test")
    await eve.send("<presence to='alice@a.test' type='probe'/>")
    answer = await next_presence(eve, "unsubscribed")
    assert answer.get("from") == "alice@a.test"
    await eve.send("<presence to='nobody@a.test' type='probe'/>")
    answer = await next_presence(eve, "unsubscribed")
    assert answer.get("from") == "nobody@a.test"


async def test_directed_presence_undone_at_logout(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test")
    await bob.send("<presence/>")
    await next_presence(bob, None, "bob@a.test")
    alice = await server.raw_login("alice@a.test")
    await alice.send("<presence/>")
    await alice.send("<presence to='bob@a.test'><status>directed</status></presence>")
    p = await next_presence(bob, None, "alice@a.test")
    assert p.findtext(f"{{{CLIENT}}}status") == "directed"
    await alice.close()
    gone = await next_presence(bob, "unavailable", "alice@a.test")
    assert gone.get("from") == "alice@a.test/raw"


async def set_priority(client: RawClient, priority: int) -> None:
    """Send presence with that priority and wait for the server's echo of it to the client
    itself (RFC 6121 §4.2.2): from then on, routing uses the new priority."""
    await client.send(f"<presence><priority>{priority}</priority></presence>")
    while True:
        echo = await next_presence(client, None, client.jid)
        if echo.get("from") == client.jid and echo.findtext(
                f"{{{CLIENT}}}priority") == str(priority):
            return


async def messages_until(client: RawClient, marker: str) -> list[str]:
    """Bodies of the messages that arrive before the one with id=marker."""
    bodies: list[str] = []
    while True:
        el = await client.next_of("message")
        if el.get("id") == marker:
            return bodies
        bodies.append(el.findtext(f"{{{CLIENT}}}body") or "")


async def test_priority_routing_of_bare_messages(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    high = await server.raw_login("bob@a.test", resource="high")
    low = await server.raw_login("bob@a.test", resource="low")
    await set_priority(high, 5)
    await set_priority(low, 1)
    alice = await server.raw_login("alice@a.test")
    await alice.send("<message to='bob@a.test' type='chat'><body>to the top</body></message>")
    # A marker to each full JID, sent after: what arrives before it was routed before it.
    for client in (high, low):
        await alice.send(f"<message to='{client.jid}' id='mark1'><body>.</body></message>")
    assert await messages_until(high, "mark1") == ["to the top"]
    assert await messages_until(low, "mark1") == []
    # Negative priority everywhere: no resource gets bare-JID messages (RFC 6121 §8.5.2.1.1);
    # the message waits in offline storage.
    await set_priority(high, -1)
    await set_priority(low, -1)
    await alice.send("<message to='bob@a.test' type='chat' id='m2'><body>nobody</body></message>")
    for client in (high, low):
        await alice.send(f"<message to='{client.jid}' id='mark2'><body>.</body></message>")
    assert await messages_until(high, "mark2") == []
    assert await messages_until(low, "mark2") == []
    assert await server.server.storage.offline.count("bob", "a.test") == 1
    # ... and reaches the first resource that comes online with a non-negative priority.
    later = await server.raw_login("bob@a.test", resource="later")
    await later.send("<presence/>")
    stored = await later.next_of("message")
    assert stored.get("id") == "m2" and stored.findtext(f"{{{CLIENT}}}body") == "nobody"
    assert stored.find("{urn:xmpp:delay}delay") is not None


async def test_slixmpp_subscription_and_roster(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.client("alice@a.test")
    bob = await server.client("bob@a.test")
    for xmpp in (alice, bob):  # decide explicitly, not by slixmpp's automatic answers
        xmpp.roster.auto_authorize = None  # None: neither accept nor reject by itself
        xmpp.roster.auto_subscribe = False
    bob.add_event_handler("presence_subscribe",
                          lambda p: bob.send_presence(pto=p["from"].bare, ptype="subscribed"))
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def available(p):  # type: ignore[no-untyped-def]
        if p["from"].bare == "bob@a.test" and not got.done():
            got.set_result(str(p["from"]))
    alice.add_event_handler("presence_available", available)
    alice.send_presence(pto="bob@a.test", ptype="subscribe")
    assert await asyncio.wait_for(got, 5) == "bob@a.test/slix"
    roster = await alice.get_roster()
    items = roster["roster"]["items"]
    assert items["bob@a.test"]["subscription"] == "to", items


async def test_unsubscribe_and_cancel_with_pushes_and_unavailable(server: RunningServer) -> None:
    """RFC 6121 §3.2 (cancel: unsubscribed) and §3.3 (unsubscribe), end to end."""
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.raw_login("alice@a.test", resource="pc")
    bob = await server.raw_login("bob@a.test", resource="pc")
    await roster_of(alice)
    await roster_of(bob)
    await alice.send("<presence/>")
    await bob.send("<presence/>")
    await subscribe_both(server, alice, bob, "alice@a.test", "bob@a.test")
    # Bob cancels alice's subscription to him: alice gets unavailable, then 'unsubscribed'.
    await bob.send("<presence to='alice@a.test' type='unsubscribed'/>")
    gone = await next_presence(alice, "unavailable", "bob@a.test/pc")
    assert gone.get("to", "").startswith("alice@a.test")
    await next_presence(alice, "unsubscribed", "bob@a.test")
    assert (await roster_of(alice))["bob@a.test"].get("subscription") == "from"
    assert (await roster_of(bob))["alice@a.test"].get("subscription") == "to"
    # Bob unsubscribes from alice: her roster drops the "from" (RFC 6121 §3.3).
    await bob.send("<presence to='alice@a.test' type='unsubscribe'/>")
    await next_presence(alice, "unsubscribe", "bob@a.test")
    assert (await roster_of(alice))["bob@a.test"].get("subscription") == "none"
    assert (await roster_of(bob))["alice@a.test"].get("subscription") == "none"
    # Presence no longer flows either way. The marker goes first on bob's stream (handled in
    # order: his presence has been routed when it is answered), then on alice's (what was
    # routed to her is queued before her answer).
    await bob.send("<presence><status>unseen</status></presence>")
    await sync(bob)
    leaked = [etree.tostring(el) for el in await sync(alice)
              if el.tag == PRESENCE and not el.get("from", "").startswith("alice@")]
    assert leaked == []


async def test_presence_to_own_bare_jid_reaches_other_resources(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    pc = await server.raw_login("alice@a.test", resource="pc")
    phone = await server.raw_login("alice@a.test", resource="phone")
    await phone.send("<presence/>")
    await next_presence(phone, None, "alice@a.test/phone")
    await pc.send("<presence to='alice@a.test'><status>note to self</status></presence>")
    note = await next_presence(phone, None, "alice@a.test/pc")
    assert note.findtext(f"{{{CLIENT}}}status") == "note to self"


async def test_message_types_to_bare_jid(server: RunningServer) -> None:
    """RFC 6121 §8.5.2: headline to every non-negative resource, groupchat bounced,
    error dropped, chat to the highest priority."""
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    one = await server.raw_login("bob@a.test", resource="one")
    two = await server.raw_login("bob@a.test", resource="two")
    await set_priority(one, 2)
    await set_priority(two, 1)
    alice = await server.raw_login("alice@a.test")
    await alice.send("<message to='bob@a.test' type='headline'><body>news</body></message>")
    for client in (one, two):
        el = await client.next_of("message")
        assert el.findtext(f"{{{CLIENT}}}body") == "news"
    await alice.send("<message to='bob@a.test' type='groupchat' id='g'><body>x</body></message>")
    err = await alice.next_of("message")
    assert err.get("type") == "error" and err.get("id") == "g"
    assert err.find(f"{{{CLIENT}}}error/{{urn:ietf:params:xml:ns:xmpp-stanzas}}service-unavailable") is not None
    await alice.send("<message to='bob@a.test' type='error' id='e'><body>x</body></message>")
    await alice.send("<message to='bob@a.test' type='chat' id='c'><body>top</body></message>")
    el = await one.next_of("message")
    assert el.get("id") == "c"  # the error-type message was dropped, not delivered

"""Per-contact visibility (hide/unhide) and the cross-domain subscription rule, with real
clients over sockets."""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import CLIENT, RawClient
from tests.test_presence import next_presence, nothing_more, roster_of, subscribe_both
from tests.test_watchers import WATCHERS_NS, probe, rows_of, watchers_iq

STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
IQ = f"{{{CLIENT}}}iq"
STATUS = f"{{{CLIENT}}}status"


async def iq_set(client: RawClient, payload: str, id_: str) -> etree._Element:
    await client.send(f"<iq type='set' id='{id_}'>{payload}</iq>")
    while True:
        el = await client.next()
        if el.tag == IQ and el.get("id") == id_:
            return el
        if el.tag == IQ and el.get("type") == "set":  # roster pushes
            await client.send(f"<iq type='result' id='{el.get('id')}'/>")


async def online(server: RunningServer, jid: str, resource: str = "raw") -> RawClient:
    client = await server.raw_login(jid, resource=resource)
    await roster_of(client)
    await client.send("<presence/>")
    await next_presence(client, None, f"{jid}/{resource}")
    return client


async def test_hide_and_unhide(server: RunningServer) -> None:
    for user in ("alice", "bob", "carol"):
        await server.add_user(f"{user}@a.test")
    alice = await online(server, "alice@a.test", "pc")
    bob = await online(server, "bob@a.test")
    carol = await online(server, "carol@a.test")
    await subscribe_both(server, alice, bob, "alice@a.test", "bob@a.test")
    await next_presence(bob, None, "alice@a.test")  # bob is a subscriber now
    await subscribe_both(server, alice, carol, "alice@a.test", "carol@a.test")
    await next_presence(carol, None, "alice@a.test")
    await nothing_more(bob)

    # Hide from bob: bob sees alice go offline, nothing else changes for carol.
    reply = await iq_set(alice, f"<hide xmlns='{WATCHERS_NS}' jid='bob@a.test/any'/>", "h1")
    assert reply.get("type") == "result", etree.tostring(reply)
    gone = await next_presence(bob, "unavailable", "alice@a.test")
    assert gone.get("from") == "alice@a.test/pc"
    # Broadcasts skip bob; carol still gets them.
    await alice.send("<presence><status>busy</status></presence>")
    update = await next_presence(carol, None, "alice@a.test")
    assert update.findtext(STATUS) == "busy"
    await nothing_more(bob)
    # A probe is answered as if alice were offline (not 'unsubscribed').
    answer = await probe(bob, "alice@a.test")
    assert answer.get("type") == "unavailable" and answer.get("from") == "alice@a.test"
    assert (await probe(carol, "alice@a.test")).findtext(STATUS) == "busy"
    rows = rows_of(await watchers_iq(alice))
    assert (rows["bob@a.test"]["kind"], rows["bob@a.test"]["status"]) == ("subscriber", "refused")
    assert rows["carol@a.test"]["status"] == "active"
    # Bob logging in again while hidden from does not learn alice's presence either.
    bob2 = await server.raw_login("bob@a.test", resource="second")
    await bob2.send("<presence/>")
    await next_presence(bob2, None, "bob@a.test/second")
    await nothing_more(bob2)

    # Unhide: bob gets alice's current presence, and broadcasts again.
    reply = await iq_set(alice, f"<unhide xmlns='{WATCHERS_NS}' jid='bob@a.test'/>", "h2")
    assert reply.get("type") == "result"
    back = await next_presence(bob, None, "alice@a.test")
    assert back.findtext(STATUS) == "busy"
    await alice.send("<presence><status>free</status></presence>")
    assert (await next_presence(bob, None, "alice@a.test")).findtext(STATUS) == "free"
    assert (await probe(bob, "alice@a.test")).findtext(STATUS) == "free"


async def test_hidden_set_is_stored(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await online(server, "alice@a.test", "pc")
    bob = await online(server, "bob@a.test")
    await subscribe_both(server, alice, bob, "alice@a.test", "bob@a.test")
    await next_presence(bob, None, "alice@a.test")  # bob is a subscriber now
    reply = await iq_set(alice, f"<hide xmlns='{WATCHERS_NS}' jid='bob@a.test'/>", "h1")
    assert reply.get("type") == "result"
    await next_presence(bob, "unavailable", "alice@a.test")
    # Hiding twice changes nothing and sends nothing.
    reply = await iq_set(alice, f"<hide xmlns='{WATCHERS_NS}' jid='bob@a.test'/>", "h2")
    assert reply.get("type") == "result"
    await alice.close()
    await nothing_more(bob)
    # Alice comes back (a new session, the set read from storage): her initial presence skips
    # bob, and bob's probe while she is offline also says unavailable.
    assert (await probe(bob, "alice@a.test")).get("type") == "unavailable"
    alice2 = await server.raw_login("alice@a.test", resource="phone")
    await alice2.send("<presence><status>back</status></presence>")
    await next_presence(alice2, None, "alice@a.test/phone")
    await nothing_more(bob)
    assert (await probe(bob, "alice@a.test")).get("type") == "unavailable"


async def test_hide_requests_checked(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    alice = await server.raw_login("alice@a.test")
    for payload, condition in ((f"<hide xmlns='{WATCHERS_NS}' jid='alice@a.test'/>", "bad-request"),
                               (f"<hide xmlns='{WATCHERS_NS}' jid='a.test'/>", "bad-request"),
                               (f"<hide xmlns='{WATCHERS_NS}' jid='@@'/>", "jid-malformed"),
                               (f"<frob xmlns='{WATCHERS_NS}'/>", "bad-request")):
        reply = await iq_set(alice, payload, "x")
        assert reply.get("type") == "error"
        assert reply.find(f"{{{CLIENT}}}error/{{{STANZAS}}}{condition}") is not None, payload
    # Another account's bare JID is not a target.
    await alice.send(f"<iq type='set' id='y' to='bob@a.test'>"
                     f"<hide xmlns='{WATCHERS_NS}' jid='eve@a.test'/></iq>")
    reply = await alice.next()
    assert reply.get("type") == "error"


async def subscribe_refused(server: RunningServer) -> None:
    alice = await online(server, "alice@a.test")
    bob = await online(server, "bob@b.test")
    await bob.send("<presence to='alice@a.test' type='subscribe'/>")
    answer = await next_presence(bob, "unsubscribed", "alice@a.test")
    assert answer.get("from") == "alice@a.test"
    await nothing_more(alice)
    assert "bob@b.test" not in await roster_of(alice)


async def test_cross_domain_subscriptions_can_be_refused(tmp_path: Path) -> None:
    running = await start_server(tmp_path, """
        [presence]
        cross_domain_subscriptions = false
        """)
    try:
        for jid in ("alice@a.test", "bob@b.test", "carol@a.test"):
            await running.add_user(jid)
        await subscribe_refused(running)
        # Within the domain, subscriptions work as before.
        carol = await online(running, "carol@a.test")
        await carol.send("<presence to='alice@a.test' type='subscribe'/>")
        alice = await running.raw_login("alice@a.test", resource="two")
        await alice.send("<presence/>")
        request = await next_presence(alice, "subscribe", "carol@a.test")
        assert request.get("from") == "carol@a.test"
    finally:
        await stop_server(running)


async def test_cross_domain_subscriptions_allowed_by_default(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@b.test")
    alice = await online(server, "alice@a.test")
    bob = await online(server, "bob@b.test")
    await bob.send("<presence to='alice@a.test' type='subscribe'/>")
    request = await next_presence(alice, "subscribe", "bob@b.test")
    assert request.get("from") == "bob@b.test"

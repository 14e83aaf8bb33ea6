"""PEP (XEP-0163) on the pubsub engine (XEP-0060), over real sockets: raw clients where the
wire matters (errors, preconditions, notifications), slixmpp for avatars (XEP-0084), nicknames
(XEP-0172) and entity capabilities (XEP-0115); plus unit tests of the pure engine."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

from lxml import etree
from slixmpp import JID as SlixJID

from server.jid import JID
from server.modules.caps import EntityCaps, caps_hash
from server.modules.pubsub import engine
from server.storage.base import RosterItem
from tests.conftest import RunningServer
from tests.rawclient import RawClient, condition

PUBSUB = "http://jabber.org/protocol/pubsub"
EVENT = PUBSUB + "#event"
OWNER = PUBSUB + "#owner"
ERRORS = PUBSUB + "#errors"
CAPS = "http://jabber.org/protocol/caps"
DISCO = "http://jabber.org/protocol/disco#info"
CLIENT = "jabber:client"
DEVICELIST = "eu.siacs.conversations.axolotl.devicelist"
BOOKMARKS = "urn:xmpp:bookmarks:1"


def q(namespace: str, name: str) -> str:
    return f"{{{namespace}}}{name}"


def options(**fields: str) -> str:
    """A publish-options form."""
    inner = "".join(f"<field var='pubsub#{k}'><value>{v}</value></field>"
                    for k, v in fields.items())
    return (f"<publish-options><x xmlns='jabber:x:data' type='submit'>"
            f"<field var='FORM_TYPE' type='hidden'><value>{PUBSUB}#publish-options</value>"
            f"</field>{inner}</x></publish-options>")


def publish(node: str, payload: str, item_id: str | None = None, extra: str = "",
            iq_id: str = "p1") -> str:
    attr = f" id='{item_id}'" if item_id else ""
    return (f"<iq type='set' id='{iq_id}'><pubsub xmlns='{PUBSUB}'><publish node='{node}'>"
            f"<item{attr}>{payload}</item></publish>{extra}</pubsub></iq>")


def items(owner: str, node: str, extra: str = "", inner: str = "") -> str:
    return (f"<iq type='get' id='g1' to='{owner}'><pubsub xmlns='{PUBSUB}'>"
            f"<items node='{node}'{extra}>{inner}</items></pubsub></iq>")


def app_condition(reply: etree._Element) -> str | None:
    error = reply.find(q(CLIENT, "error"))
    assert error is not None
    found = [etree.QName(c).localname for c in error if etree.QName(c).namespace == ERRORS]
    return found[0] if found else None


def item_ids(reply: etree._Element) -> list[str]:
    assert reply.get("type") == "result", etree.tostring(reply)
    return [i.get("id", "") for i in reply.iter(q(PUBSUB, "item"))]


async def friends(server: RunningServer, a: str, b: str) -> None:
    """a and b see each other's presence (subscription both), written before they log in."""
    for user, contact in ((a, b), (b, a)):
        local, domain = user.split("@")
        await server.server.storage.rosters.put(local, domain,
                                                RosterItem(contact, subscription="both"))


def caps_query(features: list[str], node: str = "urn:test") -> tuple[str, str]:
    """A disco#info answer for these features and its XEP-0115 ver (sha-1)."""
    body = "<identity category='client' type='pc' name='t'/>" + "".join(
        f"<feature var='{f}'/>" for f in features)
    query = etree.fromstring(f"<query xmlns='{DISCO}'>{body}</query>")
    ver = caps_hash(query, "sha-1")
    assert ver is not None
    return body, ver


async def online_with_caps(client: RawClient, features: list[str]) -> str:
    """Send available presence with caps for these features and answer the server's disco#info
    query; returns the ver."""
    body, ver = caps_query(features)
    await client.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' ver='{ver}'/>"
                      "</presence>")
    while True:
        iq = await client.next_of("iq")
        query = iq.find(q(DISCO, "query"))
        if iq.get("type") == "get" and query is not None:
            assert query.get("node") == f"urn:test#{ver}"
            await client.send(f"<iq type='result' id='{iq.get('id')}' to='{iq.get('from')}'>"
                              f"<query xmlns='{DISCO}' node='urn:test#{ver}'>{body}</query></iq>")
            return ver


async def ask(client: RawClient, xml: str) -> etree._Element:
    """Send an iq; its answer, keeping every other stanza that came first for next()."""
    sent = etree.fromstring(xml)
    await client.send(xml)
    kept = []
    try:
        while True:
            el = await client.next()
            if el.tag == q(CLIENT, "iq") and el.get("id") == sent.get("id"):
                return el
            kept.append(el)
    finally:
        client._queue[:0] = kept


def caps_of(server: Any) -> EntityCaps:
    """The entity-capabilities module (server/modules/caps.py) of a running server."""
    module = server.modules["caps"]
    assert isinstance(module, EntityCaps)
    return module


async def wait_caps(server: RunningServer, ver: str) -> None:
    caps = caps_of(server.server)
    for _ in range(200):
        if caps.verified(ver):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("caps never cached")


async def alice_and_interested_bob(server: RunningServer, node: str, resource: str,
                                   others: tuple[str, ...] = (), contacts: tuple[str, ...] = ()
                                   ) -> tuple[RawClient, RawClient, str]:
    """alice online, and bob, her contact ('both'), online with caps asking for node+notify;
    (alice, bob, bob's caps ver). `others`: more accounts made; `contacts`: those of them
    who are alice's contacts too."""
    for user in ("alice", "bob", *others):
        await server.add_user(f"{user}@a.test")
    for contact in ("bob", *contacts):
        await friends(server, "alice@a.test", f"{contact}@a.test")
    alice = await server.raw_login("alice@a.test")
    await alice.send("<presence/>")
    bob = await server.raw_login("bob@a.test", resource=resource)
    ver = await online_with_caps(bob, [DISCO, CAPS, f"{node}+notify"])
    await wait_caps(server, ver)
    return alice, bob, ver


async def next_event(client: RawClient, timeout: float = 5.0) -> etree._Element:
    while True:
        message = await client.next_of("message", timeout)
        event = message.find(q(EVENT, "event"))
        if event is not None:
            assert message.get("type") == "headline"
            return message


_pings = iter(range(1, 1 << 30))


async def no_event(client: RawClient) -> None:
    """No event reached the client so far. Notifications are routed before the result of the
    publish (retract, configure, ...) that caused them, so once that result is in, a ping
    from the client is answered after any event meant for it: none may come first."""
    ident = f"no-event-{next(_pings)}"
    came = await ask(client, f"<iq type='get' id='{ident}'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert came.get("type") == "result", etree.tostring(came)
    before, client._queue[:] = list(client._queue), []
    events = [el for el in before if el.find(q(EVENT, "event")) is not None]
    assert not events, f"unexpected event {etree.tostring(events[0])!r}"


async def no_event_within(client: RawClient, timeout: float) -> None:
    """No event within `timeout`: for what is sent in the background after a result (the
    last item on subscribing, §6.1.7), where no marker orders it."""
    try:
        message = await next_event(client, timeout)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected event {etree.tostring(message)!r}")


# -- the engine, pure -------------------------------------------------------------------------


def test_caps_hash_of_the_xep_0115_example() -> None:
    """XEP-0115 §5.3: the complex example's ver."""
    query = etree.fromstring(f"""<query xmlns='{DISCO}'>
      <identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>
      <identity xml:lang='el' category='client' name='Ψ 0.11' type='pc'/>
      <feature var='http://jabber.org/protocol/caps'/>
      <feature var='http://jabber.org/protocol/disco#info'/>
      <feature var='http://jabber.org/protocol/disco#items'/>
      <feature var='http://jabber.org/protocol/muc'/>
      <x xmlns='jabber:x:data' type='result'>
        <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value></field>
        <field var='ip_version'><value>ipv4</value><value>ipv6</value></field>
        <field var='os'><value>Mac</value></field>
        <field var='os_version'><value>10.5.1</value></field>
        <field var='software'><value>Psi</value></field>
        <field var='software_version'><value>0.11</value></field>
      </x></query>""")
    assert caps_hash(query, "sha-1") == "q07IKJEyjvHSyhy//CH0CxmKi8w="
    # §5.4: duplicate features make it unfit for caching.
    etree.SubElement(query, q(DISCO, "feature"), var="http://jabber.org/protocol/muc")
    assert caps_hash(query, "sha-1") is None


def test_config_forms_and_preconditions() -> None:
    config = engine.node_config()
    assert config["access_model"] == "presence" and config["max_items"] == 1
    form = etree.fromstring(options(access_model="open", max_items="max",
                                    persist_items="true", unknown="x"))[0]
    values = engine.form_values(form, engine.PUBLISH_OPTIONS)
    assert values == {"access_model": "open", "max_items": "max", "persist_items": True}
    assert engine.unmet_preconditions(config, values) == ["pubsub#access_model",
                                                          "pubsub#max_items"]
    # A publish-options field the service does not know cannot be met (§7.1.5).
    try:
        engine.publish_options(form)
    except engine.PubsubError as err:
        assert (err.condition, err.app) == ("conflict", "precondition-not-met")
    else:
        raise AssertionError("an unknown publish option was accepted")
    assert engine.max_items({"max_items": "max"}, 50) == 50
    assert engine.max_items({"max_items": 500}, 50) == 50
    rendered = engine.form_values(engine.config_form(config, type_="submit"), engine.NODE_CONFIG)
    assert rendered == config
    for model, facts, error in [
            ("presence", {"subscriber": False}, "presence-subscription-required"),
            ("whitelist", {"subscriber": True}, "closed-node"),
            ("roster", {"in_roster": False}, "not-in-roster-group")]:
        try:
            engine.check_access({"access_model": model},
                                **{"owner": False, "subscriber": False, "in_roster": False,
                                   **facts})
        except engine.PubsubError as err:
            assert err.app == error
        else:
            raise AssertionError(model)
    assert engine.may_access({"access_model": "open"}, owner=False, subscriber=False,
                             in_roster=False)


# -- over the wire ----------------------------------------------------------------------------


async def test_publish_retrieve_overwrite_and_retract(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    alice = await server.raw_login("alice@a.test")
    node = "urn:xmpp:test"
    conf = options(max_items="3")
    reply = await alice.ask(publish(node, "<p xmlns='urn:t'>1</p>", "one", conf))
    assert reply.get("type") == "result" and reply.get("id") == "p1"
    assert item_ids(reply) == ["one"]
    # No id: the service makes one.
    reply = await alice.ask(publish(node, "<p xmlns='urn:t'>2</p>", extra=conf))
    generated = item_ids(reply)[0]
    assert generated
    await alice.ask(publish(node, "<p xmlns='urn:t'>3</p>", "three", conf))
    # Overwrite by id: 'one' replaced, and now the newest.
    await alice.ask(publish(node, "<p xmlns='urn:t'>1b</p>", "one", conf))
    reply = await alice.ask(items("alice@a.test", node))
    assert item_ids(reply) == [generated, "three", "one"]
    assert [p.text for p in reply.iter("{urn:t}p")] == ["2", "3", "1b"]
    publisher = {i.get("publisher") for i in reply.iter(q(PUBSUB, "item"))}
    assert publisher == {"alice@a.test"}
    # A fourth item pushes out the oldest (max_items 3).
    await alice.ask(publish(node, "<p xmlns='urn:t'>4</p>", "four", conf))
    assert item_ids(await alice.ask(items("alice@a.test", node))) == ["three", "one", "four"]
    assert item_ids(await alice.ask(items("alice@a.test", node, " max_items='2'"))) == [
        "one", "four"]
    by_id = await alice.ask(items("alice@a.test", node, inner="<item id='three'/>"))
    assert item_ids(by_id) == ["three"]
    missing = await alice.ask(items("alice@a.test", node, inner="<item id='nope'/>"))
    assert condition(missing) == "item-not-found"
    # Retract: gone, and a second time item-not-found.
    retract = (f"<iq type='set' id='r1'><pubsub xmlns='{PUBSUB}'><retract node='{node}'>"
               "<item id='three'/></retract></pubsub></iq>")
    assert (await alice.ask(retract)).get("type") == "result"
    assert item_ids(await alice.ask(items("alice@a.test", node))) == ["one", "four"]
    assert condition(await alice.ask(retract)) == "item-not-found"
    # Unknown node.
    assert condition(await alice.ask(items("alice@a.test", "urn:none"))) == "item-not-found"
    # Persisted: a new server instance... the store has them (read directly).
    stored = await server.server.storage.pep.items("alice", "a.test", node)  # type: ignore[attr-defined]
    assert [i.id for i in stored] == ["one", "four"]


async def test_errors(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.raw_login("alice@a.test")
    bob = await server.raw_login("bob@a.test")
    # Publishing to someone else's PEP service.
    reply = await bob.ask(publish("urn:n", "<x xmlns='urn:x'/>").replace(
        "type='set'", "type='set' to='alice@a.test'"))
    assert condition(reply) == "forbidden"
    # No node, no item, two payloads, unknown precondition value.
    reply = await alice.ask(f"<iq type='set' id='e1'><pubsub xmlns='{PUBSUB}'><publish>"
                            "<item><x xmlns='urn:x'/></item></publish></pubsub></iq>")
    assert (condition(reply), app_condition(reply)) == ("bad-request", "nodeid-required")
    reply = await alice.ask(f"<iq type='set' id='e2'><pubsub xmlns='{PUBSUB}'>"
                            "<publish node='urn:n'/></pubsub></iq>")
    assert (condition(reply), app_condition(reply)) == ("bad-request", "item-required")
    reply = await alice.ask(publish("urn:n", "<x xmlns='urn:x'/><y xmlns='urn:x'/>"))
    assert (condition(reply), app_condition(reply)) == ("bad-request", "invalid-payload")
    reply = await alice.ask(publish("urn:n", "<x xmlns='urn:x'/>",
                                    extra=options(access_model="bogus")))
    assert condition(reply) == "not-acceptable"
    # Too big a payload.
    reply = await alice.ask(publish("urn:n", f"<x xmlns='urn:x'>{'a' * 70000}</x>"))
    assert (condition(reply), app_condition(reply)) == ("not-acceptable", "payload-too-big")
    # An account that does not exist.
    reply = await alice.ask(items("nobody@a.test", "urn:n"))
    assert condition(reply) == "service-unavailable"
    # Subscribing to a node that does not exist (XEP-0060 §6.1.3.12).
    reply = await bob.ask(f"<iq type='set' id='e3' to='alice@a.test'><pubsub xmlns='{PUBSUB}'>"
                          "<subscribe node='urn:n' jid='bob@a.test'/></pubsub></iq>")
    assert condition(reply) == "item-not-found"
    # The owner namespace is the owner's only.
    reply = await bob.ask(f"<iq type='set' id='e4' to='alice@a.test'><pubsub xmlns='{OWNER}'>"
                          "<delete node='urn:n'/></pubsub></iq>")
    assert condition(reply) == "forbidden"


async def test_publish_options_preconditions(server: RunningServer) -> None:
    """XEP-0060 §7.1.5 the way OMEMO and bookmarks clients use it."""
    await server.add_user("alice@a.test")
    alice = await server.raw_login("alice@a.test")
    bookmark = ("<conference xmlns='urn:xmpp:bookmarks:1' name='Room' autojoin='true'>"
                "<nick>al</nick></conference>")
    xep0402 = options(persist_items="true", max_items="max",
                      send_last_published_item="never", access_model="whitelist")
    reply = await alice.ask(publish(BOOKMARKS, bookmark, "room@muc.a.test", xep0402))
    assert reply.get("type") == "result", etree.tostring(reply)
    # The node got the publish-options as its configuration.
    reply = await alice.ask(f"<iq type='get' id='c1'><pubsub xmlns='{OWNER}'>"
                            f"<configure node='{BOOKMARKS}'/></pubsub></iq>")
    fields = {f.get("var"): f.findtext(q("jabber:x:data", "value"))
              for f in reply.iter(q("jabber:x:data", "field"))}
    assert fields["pubsub#access_model"] == "whitelist"
    assert fields["pubsub#max_items"] == "max"
    assert fields["pubsub#send_last_published_item"] == "never"
    # The same options again: fine; another item kept beside the first (max).
    reply = await alice.ask(publish(BOOKMARKS, bookmark, "other@muc.a.test", xep0402))
    assert reply.get("type") == "result"
    assert item_ids(await alice.ask(items("alice@a.test", BOOKMARKS))) == [
        "room@muc.a.test", "other@muc.a.test"]
    # Different options on an existing node: conflict + precondition-not-met, nothing stored.
    reply = await alice.ask(publish(BOOKMARKS, bookmark, "third@muc.a.test",
                                    options(access_model="open")))
    assert (condition(reply), app_condition(reply)) == ("conflict", "precondition-not-met")
    assert len(item_ids(await alice.ask(items("alice@a.test", BOOKMARKS)))) == 2
    # What Conversations does then: reconfigure the node, publish again.
    reply = await alice.ask(
        f"<iq type='set' id='c2'><pubsub xmlns='{OWNER}'><configure node='{BOOKMARKS}'>"
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
        f"<value>{PUBSUB}#node_config</value></field><field var='pubsub#access_model'>"
        "<value>open</value></field></x></configure></pubsub></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    reply = await alice.ask(publish(BOOKMARKS, bookmark, "third@muc.a.test",
                                    options(access_model="open")))
    assert reply.get("type") == "result"


async def test_open_device_list_read_by_a_stranger(server: RunningServer) -> None:
    """OMEMO (XEP-0384): the device list and bundles are published access_model=open, and
    anyone (no subscription) reads them to start a session."""
    await server.add_user("alice@a.test")
    await server.add_user("mallory@a.test")
    alice = await server.raw_login("alice@a.test")
    stranger = await server.raw_login("mallory@a.test")
    devices = "<list xmlns='eu.siacs.conversations.axolotl'><device id='1234'/></list>"
    reply = await alice.ask(publish(DEVICELIST, devices, "current",
                                    options(access_model="open")))
    assert reply.get("type") == "result"
    bundle_node = "eu.siacs.conversations.axolotl.bundles:1234"
    bundle = ("<bundle xmlns='eu.siacs.conversations.axolotl'><signedPreKeyPublic "
              "signedPreKeyId='1'>AAAA</signedPreKeyPublic><identityKey>BBBB</identityKey>"
              "</bundle>")
    assert (await alice.ask(publish(bundle_node, bundle, "current",
                                    options(access_model="open")))).get("type") == "result"
    reply = await stranger.ask(items("alice@a.test", DEVICELIST))
    assert item_ids(reply) == ["current"]
    device = reply.find(".//{eu.siacs.conversations.axolotl}device")
    assert device is not None and device.get("id") == "1234"
    reply = await stranger.ask(items("alice@a.test", bundle_node, " max_items='1'"))
    assert reply.findtext(".//{eu.siacs.conversations.axolotl}identityKey") == "BBBB"
    # A node with the default access model (presence) is closed to the stranger.
    await alice.ask(publish("urn:xmpp:avatar:metadata",
                            "<metadata xmlns='urn:xmpp:avatar:metadata'/>", "x"))
    reply = await stranger.ask(items("alice@a.test", "urn:xmpp:avatar:metadata"))
    assert (condition(reply), app_condition(reply)) == ("not-authorized",
                                                        "presence-subscription-required")


async def test_bookmarks_whitelist_not_readable_by_others(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    await friends(server, "alice@a.test", "bob@a.test")
    alice = await server.raw_login("alice@a.test")
    bob = await server.raw_login("bob@a.test", resource="b")
    bookmarks_caps = [DISCO, CAPS, f"{BOOKMARKS}+notify"]
    await online_with_caps(bob, bookmarks_caps)
    await alice.send("<presence/>")
    conf = options(persist_items="true", max_items="max", send_last_published_item="never",
                   access_model="whitelist")
    reply = await ask(alice, publish(BOOKMARKS, "<conference xmlns='urn:xmpp:bookmarks:1'/>",
                                    "room@muc.a.test", conf))
    assert reply.get("type") == "result"
    # Even a contact with subscription both, interested in the node, sees nothing.
    reply = await ask(bob, items("alice@a.test", BOOKMARKS))
    assert (condition(reply), app_condition(reply)) == ("not-allowed", "closed-node")
    await no_event(bob)
    # The owner reads them.
    assert item_ids(await ask(alice, items("alice@a.test", BOOKMARKS))) == [
        "room@muc.a.test"]


async def test_notifications_follow_caps_and_access(server: RunningServer) -> None:
    """XEP-0163 §4.3: an event goes to the owner's resources and to contacts' resources with
    <node>+notify in their (hash-verified, cached) caps; the last item goes to a resource that
    comes online; retracts are notified."""
    nick = "http://jabber.org/protocol/nick"
    alice, bob, ver = await alice_and_interested_bob(server, nick, "b1", ("carol", "dave"),
                                                     contacts=("carol",))
    # carol: a contact without +notify; dave: interested, but not a contact.
    carol = await server.raw_login("carol@a.test")
    await online_with_caps(carol, [DISCO, CAPS])
    dave = await server.raw_login("dave@a.test")
    await dave.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' ver='{ver}'/>"
                    "</presence>")  # the same ver as bob's: known, not asked again
    reply = await ask(alice, publish(nick, f"<nick xmlns='{nick}'>Alice</nick>", "n1"))
    assert reply.get("type") == "result"
    for client in (bob, alice):
        message = await next_event(client)
        assert message.get("from") == "alice@a.test"
        got = message.find(f"{{{EVENT}}}event/{{{EVENT}}}items")
        assert got is not None and got.get("node") == nick
        assert got.findtext(f"{{{EVENT}}}item/{{{nick}}}nick") == "Alice"
    await no_event(carol)
    await no_event(dave)
    await no_event(bob)
    # A second resource of bob, coming online with the known caps, gets the last item.
    bob2 = await server.raw_login("bob@a.test", resource="b2")
    await bob2.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' ver='{ver}'/>"
                    "</presence>")
    last = await next_event(bob2)
    assert last.get("to") == "bob@a.test/b2"
    assert last.findtext(f".//{{{nick}}}nick") == "Alice"
    # Retract: notified (notify_retract is on by default).
    reply = await ask(alice, f"<iq type='set' id='r1'><pubsub xmlns='{PUBSUB}'>"
                      f"<retract node='{nick}'><item id='n1'/></retract></pubsub></iq>")
    assert reply.get("type") == "result"
    for client in (bob, bob2):
        message = await next_event(client)
        retract = message.find(f".//{{{EVENT}}}retract")
        assert retract is not None and retract.get("id") == "n1"
    await no_event(carol)


async def test_unverified_caps_are_not_cached(server: RunningServer) -> None:
    """XEP-0115 §5: an answer that does not hash to the ver serves that resource only: it gets
    what it asked for, and another resource with the same ver is asked again."""
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    await friends(server, "alice@a.test", "bob@a.test")
    nick = "http://jabber.org/protocol/nick"
    alice = await server.raw_login("alice@a.test")
    await ask(alice, publish(nick, f"<nick xmlns='{nick}'>A</nick>"))
    bob = await server.raw_login("bob@a.test", resource="b1")
    body, _ = caps_query([DISCO, f"{nick}+notify"])
    await bob.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' ver='forged'/>"
                   "</presence>")
    iq = await bob.next_of("iq")
    await bob.send(f"<iq type='result' id='{iq.get('id')}' to='{iq.get('from')}'>"
                   f"<query xmlns='{DISCO}'>{body}</query></iq>")
    # The features serve this resource: the last item comes once they are known (§4.3.2).
    message = await next_event(bob)
    assert message.findtext(f".//{{{nick}}}nick") == "A"
    # Not kept for anyone else: a second resource with the same ver is asked in turn.
    bob2 = await server.raw_login("bob@a.test", resource="b2")
    await bob2.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' ver='forged'/>"
                    "</presence>")
    iq = await bob2.next_of("iq")
    query = iq.find(q(DISCO, "query"))
    assert iq.get("type") == "get" and query is not None
    assert query.get("node") == "urn:test#forged"
    await ask(alice, publish(nick, f"<nick xmlns='{nick}'>B</nick>", iq_id="p2"))
    message = await next_event(bob)  # the resource itself still gets what it asked for
    assert message.findtext(f".//{{{nick}}}nick") == "B"


async def test_delete_and_purge_notify(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    alice = await server.raw_login("alice@a.test")
    await alice.send("<presence/>")
    node = "urn:xmpp:test"
    await ask(alice, publish(node, "<p xmlns='urn:t'/>", "a"))
    await next_event(alice)  # the owner's own resources are notified
    reply = await ask(alice, f"<iq type='set' id='o1'><pubsub xmlns='{OWNER}'><purge node='{node}'/>"
                            "</pubsub></iq>")
    assert reply.get("type") == "result"
    assert (await next_event(alice)).find(f".//{{{EVENT}}}purge") is not None
    assert item_ids(await ask(alice, items("alice@a.test", node))) == []
    reply = await ask(alice, f"<iq type='set' id='o2'><pubsub xmlns='{OWNER}'><delete node='{node}'>"
                            "<redirect uri='xmpp:alice@a.test?;node=urn:new'/></delete></pubsub></iq>")
    assert reply.get("type") == "result"
    deleted = (await next_event(alice)).find(f".//{{{EVENT}}}delete")
    assert deleted is not None and deleted.get("node") == node
    redirect = deleted.find(f"{{{EVENT}}}redirect")
    assert redirect is not None and redirect.get("uri") == "xmpp:alice@a.test?;node=urn:new"
    reply = await ask(alice, items("alice@a.test", node))
    assert condition(reply) == "item-not-found"
    # The account's disco#info says it is a PEP service.
    reply = await ask(alice, f"<iq type='get' id='d1' to='alice@a.test'><query xmlns='{DISCO}'/></iq>")
    identity = [(i.get("category"), i.get("type")) for i in reply.iter(q(DISCO, "identity"))]
    assert ("pubsub", "pep") in identity
    features = {f.get("var") for f in reply.iter(q(DISCO, "feature"))}
    assert f"{PUBSUB}#publish-options" in features


def test_engine_node_operations_are_pure() -> None:
    """The sans-IO engine decides on a Node and returns notifications (no I/O): subscription
    states (§6.1, authorize §6.1.2.2, outcasts §4.1), who is notified (§7.1.2.1, §6.3
    deliver), affiliation changes (§8.9), publish models (§7.1.3.1), the last item (§6.1.7)."""
    def jid(text: str) -> JID:
        return JID.parse(text)

    def error(call: Any) -> tuple[str, str | None]:
        try:
            call()
        except engine.PubsubError as err:
            return err.condition, err.app
        raise AssertionError("no error")

    node = engine.Node(engine.node_config({"access_model": "authorize"}),
                       {"alice@a.test": "owner", "bob@a.test": "member",
                        "eve@a.test": "outcast"})
    stranger = {"owner": False, "subscriber": False, "in_roster": False}
    carol = jid("carol@a.test/pc")
    assert engine.subscription_state(node, carol, carol, {**stranger, **node.facts(carol)}) \
        == "pending"
    bob = jid("bob@a.test")
    assert engine.subscription_state(node, bob, bob, {**stranger, **node.facts(bob)}) \
        == "subscribed"
    eve = jid("eve@a.test")
    assert error(lambda: engine.subscription_state(node, eve, eve, {
        **stranger, **node.facts(eve)})) == ("forbidden", None)
    assert error(lambda: engine.subscription_state(node, carol, bob, stranger)) == (
        "bad-request", "invalid-jid")
    presence = engine.Node(engine.node_config())
    assert error(lambda: engine.subscription_state(presence, carol, carol, stranger)) == (
        "not-authorized", "presence-subscription-required")
    # Notified: subscribed, not pending, not deliver = false.
    node.subscriptions.update({"bob@a.test": "subscribed", "carol@a.test/pc": "pending",
                               "dave@b.test": "subscribed"})
    node.options["dave@b.test"] = {"deliver": False}
    assert engine.subscribers(node) == ["bob@a.test"]
    requests = engine.authorization_requests("alice@a.test", "n", node, "carol@a.test/pc")
    assert [r.to for r in requests] == [("alice@a.test",)]
    # Affiliations: outcasts lose their subscriptions; the last owner stays.
    assert engine.change_affiliations(node, [(bob, "outcast")]) == ["bob@a.test"]
    assert "bob@a.test" not in node.subscriptions and node.affiliation(bob) == "outcast"
    before = dict(node.affiliations)
    assert error(lambda: engine.change_affiliations(node, [(jid("alice@a.test"), "none")])) \
        == ("not-acceptable", None)
    assert error(lambda: engine.change_affiliations(node, [(bob, "king")]))[0] == "bad-request"
    assert node.affiliations == before
    # Publish models.
    open_node = engine.Node(engine.node_config({"publish_model": "open"}),
                            {"eve@a.test": "outcast"})
    engine.check_publisher(open_node, carol)
    assert error(lambda: engine.check_publisher(open_node, eve)) == ("forbidden", None)
    subscribers = engine.Node(engine.node_config({"publish_model": "subscribers"}),
                              subscriptions={"carol@a.test": "subscribed"})
    engine.check_publisher(subscribers, carol)  # the bare JID's subscription
    assert error(lambda: engine.check_publisher(subscribers, bob)) == ("forbidden", None)
    # The last item.
    item = ("i1", "alice@a.test", "<p xmlns='urn:t'>x</p>")
    everyone = {"owner": False, "subscriber": True, "in_roster": True}
    last = engine.Node(engine.node_config({"send_last_published_item": "on_sub"}))
    assert engine.last_item("alice@a.test", "n", last, carol, everyone, item, None,
                            on_sub=False) is None
    sent = engine.last_item("alice@a.test", "n", last, carol, everyone, item, None, on_sub=True)
    assert sent is not None and sent.to == ("carol@a.test/pc",)
    assert sent.message.findtext(f".//{{{EVENT}}}item/{{urn:t}}p") == "x"
    last.options["carol@a.test/pc"] = {"deliver": False}
    assert engine.last_item("alice@a.test", "n", last, carol, everyone, item, None,
                            on_sub=True) is None
    assert engine.last_item("alice@a.test", "n", presence, carol, stranger, item, None,
                            on_sub=True) is None  # the access model refuses


# -- with slixmpp -----------------------------------------------------------------------------

SLIX_PLUGINS = ("xep_0030", "xep_0115", "xep_0060", "xep_0163", "xep_0084", "xep_0172")


async def wait_interest(server: RunningServer, jid: str, interest: str) -> None:
    """Until the server knows (from caps) that the resource wants these notifications."""
    caps = caps_of(server.server)
    for _ in range(250):
        session = server.server.sessions.get(JID.parse(jid))
        if session is not None and caps.wants(session, interest):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{jid} never showed interest in {interest}")


async def test_nickname_notification_to_a_notify_contact_with_slixmpp(
        server: RunningServer) -> None:
    """XEP-0172 over PEP: bob (a contact, whose caps say nick+notify) gets alice's nickname;
    the caps hash slixmpp computes is verified and cached."""
    nick = "http://jabber.org/protocol/nick"
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    await friends(server, "alice@a.test", "bob@a.test")
    alice = await server.client("alice@a.test", plugins=SLIX_PLUGINS)
    bob = await server.client("bob@a.test", plugins=SLIX_PLUGINS)
    got: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

    def on_nick(msg: Any) -> None:
        if not got.done():
            got.set_result((str(msg["from"]), msg["pubsub_event"]["items"]["item"]["nick"]["nick"]))

    bob.add_event_handler("user_nick_publish", on_nick)
    await wait_interest(server, "bob@a.test/slix", f"{nick}+notify")
    session = server.server.sessions.get(JID.parse("bob@a.test/slix"))
    assert session is not None
    caps = caps_of(server.server)
    resource = caps.caps.get(session)
    assert resource is not None and resource.ver is not None
    assert caps.verified(resource.ver)  # slixmpp's hash verified
    await alice.plugin["xep_0172"].publish_nick("Alice L.")
    assert await asyncio.wait_for(got, 5) == ("alice@a.test", "Alice L.")


async def test_avatar_with_slixmpp(server: RunningServer) -> None:
    """XEP-0084: data and metadata; the contact is notified of the metadata and fetches the
    data by id."""
    meta_ns = "urn:xmpp:avatar:metadata"
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    await friends(server, "alice@a.test", "bob@a.test")
    alice = await server.client("alice@a.test", plugins=SLIX_PLUGINS)
    bob = await server.client("bob@a.test", plugins=SLIX_PLUGINS)
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def on_metadata(msg: Any) -> None:
        if not got.done():
            got.set_result(msg["pubsub_event"]["items"]["item"])

    bob.add_event_handler("avatar_metadata_publish", on_metadata)
    await wait_interest(server, "bob@a.test/slix", f"{meta_ns}+notify")
    image = bytes(range(256)) * 4
    avatar = alice.plugin["xep_0084"]
    await avatar.publish_avatar(image)
    avatar_id = hashlib.sha1(image).hexdigest()
    await avatar.publish_avatar_metadata(
        [{"id": avatar_id, "type": "image/png", "bytes": len(image)}])
    item = await asyncio.wait_for(got, 5)
    assert item["id"] == avatar_id
    assert item["avatar_metadata"]["items"][0]["id"] == avatar_id
    reply = await bob.plugin["xep_0084"].retrieve_avatar(SlixJID("alice@a.test"), avatar_id)
    data = reply["pubsub"]["items"]["item"]["avatar_data"]["value"]
    assert data == image
    assert base64.b64encode(data)  # (what clients cache)
    # A new resource of bob gets the last metadata when it comes online.
    later: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    bob2 = await server.client("bob@a.test", resource="second", plugins=SLIX_PLUGINS,
                               presence=False)

    def on_later(msg: Any) -> None:
        if not later.done():
            later.set_result(msg)

    bob2.add_event_handler("avatar_metadata_publish", on_later)
    bob2.send_presence()
    message = await asyncio.wait_for(later, 5)
    assert message["pubsub_event"]["items"]["item"]["id"] == avatar_id


async def test_no_notifications_to_a_contact_who_blocked_the_owner(server: RunningServer) -> None:
    """Notifications are routed like any message: the recipient's blocklist (XEP-0191)
    applies."""
    nick = "http://jabber.org/protocol/nick"
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    await friends(server, "alice@a.test", "bob@a.test")
    alice = await server.raw_login("alice@a.test")
    bob = await server.raw_login("bob@a.test")
    ver = await online_with_caps(bob, [DISCO, CAPS, f"{nick}+notify"])
    await wait_caps(server, ver)
    await ask(alice, publish(nick, f"<nick xmlns='{nick}'>One</nick>", iq_id="p1"))
    assert (await next_event(bob)).findtext(f".//{{{nick}}}nick") == "One"
    reply = await ask(bob, "<iq type='set' id='b1'><block xmlns='urn:xmpp:blocking'>"
                           "<item jid='alice@a.test'/></block></iq>")
    assert reply.get("type") == "result"
    await ask(alice, publish(nick, f"<nick xmlns='{nick}'>Two</nick>", iq_id="p2"))
    await no_event(bob)


async def test_limits_from_config(tmp_path: Any) -> None:
    """[pep] max_nodes, max_items (what `max` means) and max_payload_size."""
    from tests.conftest import start_server, stop_server
    running = await start_server(tmp_path, "[pep]\nmax_nodes = 2\nmax_items = 3\n"
                                           "max_payload_size = 300\n")
    try:
        await running.add_user("alice@a.test")
        alice = await running.raw_login("alice@a.test")
        for n in range(5):
            reply = await alice.ask(publish("urn:a", f"<p xmlns='urn:t'>{n}</p>", f"i{n}",
                                            options(max_items="max"), iq_id=f"a{n}"))
            assert reply.get("type") == "result"
        assert item_ids(await alice.ask(items("alice@a.test", "urn:a"))) == ["i2", "i3", "i4"]
        assert (await alice.ask(publish("urn:b", "<p xmlns='urn:t'/>"))).get("type") == "result"
        reply = await alice.ask(publish("urn:c", "<p xmlns='urn:t'/>"))
        assert (condition(reply), app_condition(reply)) == ("not-allowed", "max-nodes-exceeded")
        reply = await alice.ask(publish("urn:b", f"<p xmlns='urn:t'>{'x' * 300}</p>"))
        assert (condition(reply), app_condition(reply)) == ("not-acceptable", "payload-too-big")
        # Deleting the account takes its nodes (FK cascade).
        await running.server.storage.accounts.delete("alice", "a.test")
        assert await running.server.storage.pep.nodes("alice", "a.test") == {}  # type: ignore[attr-defined]
    finally:
        await stop_server(running)


# -- a real OMEMO exchange (XEP-0384, slixmpp-omemo), when the plugin is installed ---------------


def omemo_plugin() -> bool:
    """Register an in-memory slixmpp-omemo implementation as xep_0384; False without it."""
    try:
        import omemo
        from omemo.storage import Just, Maybe, Nothing
        from slixmpp.plugins import register_plugin
        from slixmpp_omemo import XEP_0384
    except ImportError:
        return False

    class MemoryStorage(omemo.Storage):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.data: dict[str, Any] = {}

        async def _load(self, key: str) -> Maybe[Any]:
            return Just(self.data[key]) if key in self.data else Nothing()

        async def _store(self, key: str, value: Any) -> None:
            self.data[key] = value

        async def _delete(self, key: str) -> None:
            self.data.pop(key, None)

    class MemoryOmemo(XEP_0384):  # type: ignore[misc, unused-ignore]
        default_config = {"fallback_message": "This message is OMEMO encrypted."}

        def plugin_init(self) -> None:
            self._memory = MemoryStorage()
            super().plugin_init()

        @property
        def storage(self) -> Any:
            return self._memory

        @property
        def _btbv_enabled(self) -> bool:
            return True  # blind trust before verification: first-seen devices are trusted

        async def _devices_blindly_trusted(self, blindly_trusted: Any, identifier: Any) -> None:
            pass

        async def _prompt_manual_trust(self, manually_trusted: Any, identifier: Any) -> None:
            session_manager = await self.get_session_manager()
            for device in manually_trusted:
                await session_manager.set_trust(device.bare_jid, device.identity_key, "BTBV")

    register_plugin(MemoryOmemo)
    return True


def omemo_of(client: Any) -> Any:
    return client.plugin["xep_0384"]


async def test_omemo_exchange_with_slixmpp_omemo(server: RunningServer) -> None:
    """Two clients publish device lists and bundles through presenced (OMEMO 0.3 and 2, open
    nodes), find each other's devices and exchange a message that decrypts."""
    import pytest
    if not omemo_plugin():
        pytest.skip("slixmpp-omemo is not installed")
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    await friends(server, "alice@a.test", "bob@a.test")
    plugins = ("xep_0030", "xep_0060", "xep_0115", "xep_0163", "xep_0280", "xep_0334",
               "xep_0384")
    loop = asyncio.get_running_loop()
    clients = []
    for user in ("alice", "bob"):
        client = await server.client(f"{user}@a.test", plugins=plugins)
        clients.append(client)
    for client in clients:
        # The plugin publishes its device list and bundle after binding; wait until both are
        # stored (read back by the session manager).
        session_manager = await omemo_of(client).get_session_manager()
        assert session_manager is not None
    pep = server.server.storage.pep  # type: ignore[attr-defined]
    for _ in range(250):
        nodes = [await pep.nodes(u, "a.test") for u in ("alice", "bob")]
        if all(any("devicelist" in n or n.endswith(":devices") for n in ns) and
               any("bundle" in n for n in ns) for ns in nodes):
            break
        await asyncio.sleep(0.04)
    else:
        raise AssertionError(f"OMEMO data never published: {nodes}")
    alice, bob = clients
    # Device lists and bundles are open: their configuration says so.
    for node, config in nodes[0].items():
        if "bundle" in node or "devicelist" in node or node.endswith(":devices"):
            assert config["access_model"] == "open", (node, config)
    decrypted: asyncio.Future[str] = loop.create_future()

    async def on_message(msg: Any) -> None:
        omemo_bob = omemo_of(bob)
        if omemo_bob.is_encrypted(msg) and not decrypted.done():
            plain, _device = await omemo_bob.decrypt_message(msg)
            decrypted.set_result(plain["body"])

    bob.add_event_handler("message", on_message)
    message = alice.make_message(mto=SlixJID("bob@a.test"), mtype="chat")
    message["body"] = "meet at noon"
    encrypted, errors = await omemo_of(alice).encrypt_message(
        message, SlixJID("bob@a.test"))
    assert encrypted is not None, errors
    assert "meet at noon" not in str(encrypted)
    encrypted.send()
    assert await asyncio.wait_for(decrypted, 10) == "meet at noon"


async def test_slixmpp_public_and_private_pep_storage(server: RunningServer) -> None:
    """What slixmpp's own integration tests test_pep and test_user_avatar do: XEP-0222 and
    XEP-0223 storage (publish-options), the owner's own avatar notification, clearing it."""
    from slixmpp.exceptions import IqError
    from slixmpp.plugins.xep_0060.stanza import Item
    from slixmpp.xmlstream import ElementBase, register_stanza_plugin

    class Mystanza(ElementBase):
        namespace = "random-ns"
        name = "mystanza"
        plugin_attrib = "mystanza"
        interfaces = {"test"}

    register_stanza_plugin(Item, Mystanza)
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    plugins = ("xep_0060", "xep_0163", "xep_0222", "xep_0223", "xep_0084", "xep_0115")
    alice = await server.client("alice@a.test", plugins=plugins)
    bob = await server.client("bob@a.test", plugins=plugins)
    first = Mystanza()
    first["test"] = "public-value"
    await alice.plugin["xep_0222"].store(first, id="toto")
    fetched = await alice.plugin["xep_0222"].retrieve(first.namespace)
    assert fetched["pubsub"]["items"]["item"]["mystanza"]["test"] == "public-value"
    second = Mystanza()
    second["test"] = "private-value"
    await alice.plugin["xep_0223"].store(second, node="private-random", id="toto")
    fetched = await alice.plugin["xep_0223"].retrieve("private-random")
    assert fetched["pubsub"]["items"]["item"]["mystanza"]["test"] == "private-value"
    try:
        await bob.plugin["xep_0060"].get_item(jid=alice.boundjid.bare, node="private-random",
                                       item_id="toto")
    except IqError as exc:
        assert exc.iq["error"]["condition"] == "not-allowed"
    else:
        raise AssertionError("bob read alice's private storage")
    # test_user_avatar: clear, publish, the owner's own resource is notified, read back.
    avatar = alice.plugin["xep_0084"]
    await alice.plugin["xep_0115"].update_caps()
    await avatar.stop()
    await avatar.publish_avatar(b"")
    data = b"coucou coucou"
    await avatar.publish_avatar(data)
    metadata: Any = {"id": avatar.generate_id(data), "bytes": 13, "type": "image/jpeg"}
    event = alice.wait_until("avatar_metadata_publish")
    message, _ = await asyncio.wait_for(
        asyncio.gather(event, avatar.publish_avatar_metadata(metadata)), 10)
    info = message["pubsub_event"]["items"]["item"]["avatar_metadata"]["info"]
    assert (info["bytes"], info["type"], info["id"]) == (13, "image/jpeg", metadata["id"])
    got = await avatar.retrieve_avatar(SlixJID(alice.boundjid.bare), info["id"])
    assert got["pubsub"]["items"]["item"]["avatar_data"]["value"] == data


async def test_owner_disco_items_lists_nodes(server: RunningServer) -> None:
    """Prosody's pubsub_preconditions: the owner's disco#items names its nodes (with their
    title); a node's items by id."""
    await server.add_user("alice@a.test")
    alice = await server.raw_login("alice@a.test")
    tune = "http://jabber.org/protocol/tune"
    await alice.ask(publish(tune, f"<tune xmlns='{tune}'/>", "current"))
    reply = await alice.ask(
        f"<iq type='set' id='c1'><pubsub xmlns='{OWNER}'><configure node='{tune}'>"
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
        f"<value>{PUBSUB}#node_config</value></field><field var='pubsub#title'>"
        "<value>Nice tunes</value></field><field var='pubsub#description'/></x></configure>"
        "</pubsub></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    items_ns = "http://jabber.org/protocol/disco#items"
    reply = await alice.ask(f"<iq type='get' id='d1'><query xmlns='{items_ns}'/></iq>")
    listed = [(i.get("jid"), i.get("node"), i.get("name")) for i in reply.iter(q(items_ns, "item"))]
    assert listed == [("alice@a.test", tune, "Nice tunes")]
    reply = await alice.ask(f"<iq type='get' id='d2'><query xmlns='{items_ns}' node='{tune}'/></iq>")
    assert [i.get("name") for i in reply.iter(q(items_ns, "item"))] == ["current"]
    # The configuration form writes booleans as 1/0, as Prosody does.
    reply = await alice.ask(f"<iq type='get' id='c2'><pubsub xmlns='{OWNER}'>"
                            f"<configure node='{tune}'/></pubsub></iq>")
    fields = {f.get("var"): f.findtext(q("jabber:x:data", "value"))
              for f in reply.iter(q("jabber:x:data", "field"))}
    assert fields["pubsub#persist_items"] == "1" and fields["pubsub#title"] == "Nice tunes"
    # Another account's disco#items is still the disco module's (no nodes listed).
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test")
    reply = await bob.ask(f"<iq type='get' id='d3' to='alice@a.test'><query xmlns='{items_ns}'/></iq>")
    assert reply.get("type") == "result" and list(reply.iter(q(items_ns, "item"))) == []


# -- across federation ------------------------------------------------------------------------


async def answer_discos(client: RawClient, body: str, ver: str, askers: set[str]) -> None:
    """Answer the caps disco#info queries from these JIDs (keeping other stanzas)."""
    kept = []
    try:
        while askers:
            el = await client.next(10)
            query = el.find(q(DISCO, "query"))
            if el.tag == q(CLIENT, "iq") and el.get("type") == "get" and query is not None:
                askers.discard(el.get("from", ""))
                await client.send(f"<iq type='result' id='{el.get('id')}' to='{el.get('from')}'>"
                                  f"<query xmlns='{DISCO}' node='urn:test#{ver}'>{body}</query>"
                                  "</iq>")
            else:
                kept.append(el)
    finally:
        client._queue[:0] = kept


async def test_notifications_across_federation(tmp_path: Any) -> None:
    """A contact on another server: its resource's caps (learnt from its presence, asked over
    s2s, hash-verified) decide, and the notification travels by federation; and the other
    server's notifications reach our user."""
    from tests.test_federation import ONE, TWO, federated
    from tests.test_presence import next_presence, roster_of, subscribe_both
    nick = "http://jabber.org/protocol/nick"
    ajid, bjid = f"alice@{ONE}", f"bob@{TWO}"
    async with federated(tmp_path, certificates=False) as fed:
        alice = await fed.one.raw_login(ajid, resource="pc")
        bob = await fed.login_two()
        await roster_of(alice)
        await roster_of(bob)
        await alice.send("<presence/>")
        await bob.send("<presence/>")
        await subscribe_both(None, alice, bob, ajid, bjid)  # type: ignore[arg-type]
        body, ver = caps_query([DISCO, CAPS, f"{nick}+notify"])
        await bob.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' ver='{ver}'/>"
                       "</presence>")
        # Bob's own server asks, and so does one.test, for alice's PEP service.
        await answer_discos(bob, body, ver, {bjid, ajid})
        caps = caps_of(fed.one.server)
        for _ in range(250):
            if list(caps.remote_wanting(JID.parse(bjid), f"{nick}+notify")) == [f"{bjid}/pc"]:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("one.test never learnt bob's caps")
        assert caps.verified(ver)
        reply = await ask(alice, publish(nick, f"<nick xmlns='{nick}'>Alice</nick>", "n1"))
        assert reply.get("type") == "result"
        message = await next_event(bob, 10)
        assert message.get("from") == ajid and message.get("to") == f"{bjid}/pc"
        assert message.findtext(f".//{{{nick}}}nick") == "Alice"
        # The other way: alice's caps (a ver both servers know now) reach two.test with her
        # presence; bob's nickname comes to her over s2s.
        await alice.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' "
                         f"ver='{ver}'/></presence>")
        while True:
            seen = await next_presence(bob, None, ajid)
            if seen.find(q(CAPS, "c")) is not None:
                break
        reply = await ask(bob, publish(nick, f"<nick xmlns='{nick}'>Bob</nick>", "n1"))
        assert reply.get("type") == "result"
        message = await next_event(alice, 10)
        while message.get("from") == ajid:  # her own, earlier
            message = await next_event(alice, 10)
        assert message.get("from") == bjid
        assert message.findtext(f".//{{{nick}}}nick") == "Bob"


# -- explicit subscriptions (XEP-0060 §6.1 on PEP nodes, XEP-0163 §4) -------------------------


def subscribe(owner: str, node: str, jid: str, iq_id: str = "s1", verb: str = "subscribe") -> str:
    return (f"<iq type='set' id='{iq_id}' to='{owner}'><pubsub xmlns='{PUBSUB}'>"
            f"<{verb} node='{node}' jid='{jid}'/></pubsub></iq>")


def subscription_of(reply: etree._Element) -> tuple[str | None, str | None]:
    assert reply.get("type") == "result", etree.tostring(reply)
    sub = reply.find(f"{{{PUBSUB}}}pubsub/{{{PUBSUB}}}subscription")
    assert sub is not None
    return sub.get("jid"), sub.get("subscription")


async def test_explicit_subscriptions_to_pep_nodes(server: RunningServer) -> None:
    """A contact subscribes explicitly (no caps at all): it gets the last item at once
    (§6.1.7, on_sub_and_presence), then every notification, at its bare JID; the access model
    decides who may subscribe; subscriptions are listed, persisted, and end with unsubscribe."""
    for user in ("alice", "bob", "carol"):
        await server.add_user(f"{user}@a.test")
    await friends(server, "alice@a.test", "bob@a.test")
    alice = await server.raw_login("alice@a.test")
    bob = await server.raw_login("bob@a.test")
    carol = await server.raw_login("carol@a.test")
    for client in (bob, carol):
        await client.send("<presence/>")  # available, without caps: no +notify
    nick = "http://jabber.org/protocol/nick"
    await ask(alice, publish(nick, f"<nick xmlns='{nick}'>Al</nick>", "n1"))
    reply = await ask(bob, subscribe("alice@a.test", nick, "bob@a.test"))
    assert subscription_of(reply) == ("bob@a.test", "subscribed")
    last = await next_event(bob)
    assert last.get("from") == "alice@a.test"
    assert last.findtext(f".//{{{nick}}}nick") == "Al"
    # A stranger may not subscribe to a presence-model node (§6.1.3.2); nor to another's JID.
    reply = await ask(carol, subscribe("alice@a.test", nick, "carol@a.test"))
    assert (condition(reply), app_condition(reply)) == ("not-authorized",
                                                        "presence-subscription-required")
    reply = await ask(carol, subscribe("alice@a.test", nick, "bob@a.test"))
    assert (condition(reply), app_condition(reply)) == ("bad-request", "invalid-jid")
    # The next publication reaches the explicit subscriber (sent to its bare JID).
    await ask(alice, publish(nick, f"<nick xmlns='{nick}'>Alice</nick>", "n2", iq_id="p2"))
    event = await next_event(bob)
    assert event.get("to") == "bob@a.test"
    assert event.findtext(f".//{{{nick}}}nick") == "Alice"
    await no_event(carol)
    # An open node: anyone subscribes; the subscriber lists its subscriptions (§5.6).
    tune = "http://jabber.org/protocol/tune"
    await ask(alice, publish(tune, f"<tune xmlns='{tune}'/>", "t1", options(access_model="open"),
                             iq_id="p3"))
    reply = await ask(carol, subscribe("alice@a.test", tune, "carol@a.test/raw", "s2"))
    assert subscription_of(reply) == ("carol@a.test/raw", "subscribed")
    assert (await next_event(carol)).find(f".//{{{tune}}}tune") is not None
    reply = await ask(carol, f"<iq type='get' id='l1' to='alice@a.test'><pubsub xmlns='{PUBSUB}'>"
                             "<subscriptions/></pubsub></iq>")
    listed = [(s.get("node"), s.get("jid"), s.get("subscription"))
              for s in reply.iter(q(PUBSUB, "subscription"))]
    assert listed == [(tune, "carol@a.test/raw", "subscribed")]
    # The owner sees every subscription of a node (§8.8.1).
    reply = await ask(alice, f"<iq type='get' id='l2'><pubsub xmlns='{OWNER}'>"
                             f"<subscriptions node='{nick}'/></pubsub></iq>")
    assert [(s.get("jid"), s.get("subscription"))
            for s in reply.iter(q(OWNER, "subscription"))] == [("bob@a.test", "subscribed")]
    # Persisted, in the store, and read back after the cache is dropped.
    stored = await server.server.storage.pep.subscriptions("alice", "a.test")  # type: ignore[attr-defined]
    assert stored == {nick: {"bob@a.test": "subscribed"},
                      tune: {"carol@a.test/raw": "subscribed"}}
    server.server.modules["pep"]._forget(JID.parse("alice@a.test"))  # type: ignore[attr-defined]
    await ask(alice, publish(tune, f"<tune xmlns='{tune}'><title>x</title></tune>", "t2",
                             options(access_model="open"), iq_id="p4"))
    assert (await next_event(carol)).get("to") == "carol@a.test/raw"
    # Unsubscribe: no more notifications; a second time, not-subscribed (§6.2.3.2).
    unsub = subscribe("alice@a.test", tune, "carol@a.test/raw", "u1", "unsubscribe")
    assert (await ask(carol, unsub)).get("type") == "result"
    reply = await ask(carol, unsub)
    assert (condition(reply), app_condition(reply)) == ("unexpected-request", "not-subscribed")
    await ask(alice, publish(tune, f"<tune xmlns='{tune}'/>", "t3", options(access_model="open"),
                             iq_id="p5"))
    await no_event(carol)
    # The access model is checked at each notification: carol subscribes again, then the node
    # becomes presence-only (she sees no presence of alice's) and she gets nothing more.
    await ask(carol, subscribe("alice@a.test", tune, "carol@a.test", "s3"))
    reply = await ask(alice, f"<iq type='set' id='c1'><pubsub xmlns='{OWNER}'><configure "
                             f"node='{tune}'><x xmlns='jabber:x:data' type='submit'><field "
                             f"var='FORM_TYPE' type='hidden'><value>{PUBSUB}#node_config</value>"
                             "</field><field var='pubsub#access_model'><value>presence</value>"
                             "</field></x></configure></pubsub></iq>")
    assert reply.get("type") == "result"
    await next_event(carol)  # the last item, on subscribing
    await ask(alice, publish(tune, f"<tune xmlns='{tune}'/>", "t4", iq_id="p6"))
    await no_event(carol)
    # Deleting bob's account removes his subscription (both backends: tests/test_storage.py).
    await server.server.storage.accounts.delete("bob", "a.test")
    stored = await server.server.storage.pep.subscriptions("alice", "a.test")  # type: ignore[attr-defined]
    assert stored == {tune: {"carol@a.test": "subscribed"}}


async def test_last_item_on_subscription_follows_send_last_published_item(
        server: RunningServer) -> None:
    """XEP-0060 §6.1.7: on_sub and on_sub_and_presence send the newest item on subscribing,
    never does not."""
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.raw_login("alice@a.test")
    bob = await server.raw_login("bob@a.test")
    await bob.send("<presence/>")
    for n, when in enumerate(("on_sub", "never", "on_sub_and_presence")):
        node = f"urn:test:{when}"
        await ask(alice, publish(node, f"<p xmlns='urn:t'>{n}</p>", "old", iq_id=f"o{n}",
                                 extra=options(access_model="open",
                                               send_last_published_item=when)))
        await ask(alice, publish(node, f"<p xmlns='urn:t'>{n}</p>", "new", iq_id=f"n{n}",
                                 extra=options(access_model="open",
                                               send_last_published_item=when)))
        reply = await ask(bob, subscribe("alice@a.test", node, "bob@a.test", f"s{n}"))
        assert subscription_of(reply) == ("bob@a.test", "subscribed")
        if when == "never":
            await no_event_within(bob, 0.3)
            continue
        event = await next_event(bob)
        got = event.find(f"{{{EVENT}}}event/{{{EVENT}}}items")
        assert got is not None and got.get("node") == node
        assert [i.get("id") for i in got] == ["new"]  # only the newest


async def test_authorize_access_model_on_pep(server: RunningServer) -> None:
    """XEP-0060 §4.5 authorize on a PEP node: a subscription is pending (§6.1.2.2) and reads
    are refused until the owner approves with the §8.6 form; approval is told to the
    subscriber (with the last item), a denial too."""
    for user in ("alice", "carol", "dave"):
        await server.add_user(f"{user}@a.test")
    alice = await server.raw_login("alice@a.test")
    await alice.send("<presence/>")
    carol = await server.raw_login("carol@a.test")
    dave = await server.raw_login("dave@a.test")
    for client in (carol, dave):
        await client.send("<presence/>")
    node = "urn:test:diary"
    reply = await ask(alice, publish(node, "<p xmlns='urn:t'>secret</p>", "d1",
                                     options(access_model="authorize")))
    assert reply.get("type") == "result", etree.tostring(reply)
    await next_event(alice)
    reply = await ask(carol, subscribe("alice@a.test", node, "carol@a.test"))
    assert subscription_of(reply) == ("carol@a.test", "pending")
    reply = await ask(carol, items("alice@a.test", node))
    assert (condition(reply), app_condition(reply)) == ("not-authorized", "not-subscribed")
    request = await alice.next_of("message")
    assert request.get("from") == "alice@a.test"
    form = request.find(q("jabber:x:data", "x"))
    assert form is not None and form.get("type") == "form"
    values = {f.get("var"): f.findtext(q("jabber:x:data", "value"))
              for f in form.iter(q("jabber:x:data", "field"))}
    assert values["FORM_TYPE"] == f"{PUBSUB}#subscribe_authorization"
    assert (values["pubsub#node"], values["pubsub#subscriber_jid"]) == (node, "carol@a.test")
    # Publishing meanwhile: the pending subscriber gets nothing.
    await ask(alice, publish(node, "<p xmlns='urn:t'>secret 2</p>", "d2",
                             options(access_model="authorize"), iq_id="p2"))
    await no_event(carol)

    def answer(jid: str, allow: str) -> str:
        return (f"<message to='alice@a.test' id='a-{jid}'><x xmlns='jabber:x:data' "
                "type='submit'><field var='FORM_TYPE' type='hidden'>"
                f"<value>{PUBSUB}#subscribe_authorization</value></field>"
                f"<field var='pubsub#node'><value>{node}</value></field>"
                f"<field var='pubsub#subscriber_jid'><value>{jid}</value></field>"
                f"<field var='pubsub#allow'><value>{allow}</value></field></x></message>")

    await alice.send(answer("carol@a.test", "true"))
    told = await next_event(carol)
    sub = told.find(f"{{{EVENT}}}event/{{{EVENT}}}subscription")
    assert sub is not None and (sub.get("node"), sub.get("subscription")) == (node, "subscribed")
    last = await next_event(carol)
    assert last.findtext(".//{urn:t}p") == "secret 2"
    assert item_ids(await ask(carol, items("alice@a.test", node))) == ["d2"]
    await ask(alice, publish(node, "<p xmlns='urn:t'>3</p>", "d3",
                             options(access_model="authorize"), iq_id="p3"))
    assert (await next_event(carol)).findtext(".//{urn:t}p") == "3"
    # dave asks, alice denies: dave is told 'none', and stays out.
    reply = await ask(dave, subscribe("alice@a.test", node, "dave@a.test", "s2"))
    assert subscription_of(reply) == ("dave@a.test", "pending")
    await alice.send(answer("dave@a.test", "false"))
    told = await next_event(dave)
    sub = told.find(f"{{{EVENT}}}event/{{{EVENT}}}subscription")
    assert sub is not None and sub.get("subscription") == "none"
    reply = await ask(dave, items("alice@a.test", node))
    assert condition(reply) == "not-authorized"
    stored = await server.server.storage.pep.subscriptions("alice", "a.test")  # type: ignore[attr-defined]
    assert stored == {node: {"carol@a.test": "subscribed"}}


async def test_itemreply_and_roster_groups(server: RunningServer) -> None:
    """pubsub#itemreply = publisher puts the publisher's JID on the items of notifications
    (Prosody's pep_itemreply; by default none is given); access_model roster with
    pubsub#roster_groups_allowed admits the contacts of those roster groups only (§4.5)."""
    for user in ("alice", "bob", "carol"):
        await server.add_user(f"{user}@a.test")
    await server.server.storage.rosters.put("alice", "a.test", RosterItem(
        "bob@a.test", subscription="both", groups=("Friends",)))
    await server.server.storage.rosters.put("alice", "a.test", RosterItem(
        "carol@a.test", subscription="both", groups=("Work",)))
    alice = await server.raw_login("alice@a.test")
    await alice.send("<presence/>")
    tune = "http://jabber.org/protocol/tune"
    await ask(alice, publish(tune, f"<tune xmlns='{tune}'/>", "t1"))
    item = (await next_event(alice)).find(f".//{{{EVENT}}}item")
    assert item is not None and item.get("publisher") is None
    reply = await ask(alice, publish(tune, f"<tune xmlns='{tune}'/>", "t2", iq_id="p2",
                                     extra=options(itemreply="publisher")))
    assert (condition(reply), app_condition(reply)) == ("conflict", "precondition-not-met")
    assert condition(await ask(alice, publish(tune, f"<tune xmlns='{tune}'/>", "t2",
                                              iq_id="p3", extra=options(itemreply="x")))) \
        == "not-acceptable"
    reply = await ask(alice, f"<iq type='set' id='c1'><pubsub xmlns='{OWNER}'><configure "
                             f"node='{tune}'><x xmlns='jabber:x:data' type='submit'><field "
                             f"var='FORM_TYPE' type='hidden'><value>{PUBSUB}#node_config</value>"
                             "</field><field var='pubsub#itemreply'><value>publisher</value>"
                             "</field><field var='pubsub#access_model'><value>roster</value>"
                             "</field><field var='pubsub#roster_groups_allowed'>"
                             "<value>Friends</value></field></x></configure></pubsub></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    await ask(alice, publish(tune, f"<tune xmlns='{tune}'/>", "t3", iq_id="p4"))
    got = None
    while got is None or got.get("id") != "t3":
        got = (await next_event(alice)).find(f".//{{{EVENT}}}item")
    assert got.get("publisher") == "alice@a.test"
    bob = await server.raw_login("bob@a.test")
    carol = await server.raw_login("carol@a.test")
    assert item_ids(await ask(bob, items("alice@a.test", tune))) == ["t3"]
    reply = await ask(carol, items("alice@a.test", tune))
    assert (condition(reply), app_condition(reply)) == ("not-authorized", "not-in-roster-group")


async def test_an_unanswered_caps_query_does_not_hold_up_shutdown(tmp_path: Any) -> None:
    """The server asks a new resource what its caps mean; a client that never answers (and
    then goes) must not keep shutdown draining until the caps timeout (10 s)."""
    from tests.conftest import start_server
    running = await start_server(tmp_path)
    await running.add_user("bob@a.test")
    bob = await running.raw_login("bob@a.test")
    _, ver = caps_query([DISCO, CAPS])
    await bob.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' ver='{ver}'/>"
                   "</presence>")
    iq = await bob.next_of("iq")  # the disco#info query, left unanswered
    assert iq.find(q(DISCO, "query")) is not None
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(running.server.stop(), 8)
    assert asyncio.get_running_loop().time() - started < 5


def unlabelled(form: etree._Element) -> list[str]:
    """The fields (by var) and list options (var=value) of a XEP-0004 form shown without a
    label (issue 19: profanity shows '[field3] (null)'); hidden fields are never shown, and
    engine.UNLABELLED is the one field Prosody's scansion scripts want without a label."""
    data = "jabber:x:data"
    missing = []
    for field in form.iter(q(data, "field")):
        if field.get("type") == "hidden":
            continue
        if not field.get("label") and field.get("var") not in engine.UNLABELLED:
            missing.append(field.get("var", "?"))
        missing += [f"{field.get('var')}={o.findtext(q(data, 'value'))}"
                    for o in field.findall(q(data, "option")) if not o.get("label")]
    return missing


async def test_every_pep_form_is_labelled(server: RunningServer) -> None:
    """XEP-0004 §3.2, XEP-0060 §16.4.4: the node configuration and default forms have a label
    on every field and every list option."""
    await server.add_user("alice@a.test")
    alice = await server.raw_login("alice@a.test")
    await ask(alice, publish("urn:n", "<x xmlns='urn:x'/>"))
    for body in ("<configure node='urn:n'/>", "<default/>"):
        reply = await ask(alice, f"<iq type='get' id='f1'><pubsub xmlns='{OWNER}'>{body}"
                                 "</pubsub></iq>")
        form = reply.find(".//{jabber:x:data}x")
        assert form is not None, etree.tostring(reply)
        assert len(form.findall(".//{jabber:x:data}option")) >= 10
        assert unlabelled(form) == []


async def test_hostile_numbers_ids_and_publish_options(server: RunningServer) -> None:
    """Issue 20: max_items that is not a positive number is bad-request (not the whole node);
    item ids and node names have a length limit with a clear error; a publish-options field
    the service does not know is a precondition it cannot meet (XEP-0060 §7.1.5)."""
    await server.add_user("alice@a.test")
    alice = await server.raw_login("alice@a.test")
    for n in range(3):
        await ask(alice, publish("urn:n", f"<x xmlns='urn:x'>{n}</x>", f"i{n}", iq_id=f"p{n}"))
    await ask(alice, f"<iq type='set' id='c0'><pubsub xmlns='{OWNER}'><configure node='urn:n'>"
                     "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' "
                     f"type='hidden'><value>{PUBSUB}#node_config</value></field><field "
                     "var='pubsub#max_items'><value>10</value></field></x></configure>"
                     "</pubsub></iq>")
    await ask(alice, publish("urn:n", "<x xmlns='urn:x'>more</x>", "i3", iq_id="p3"))
    assert item_ids(await ask(alice, items("alice@a.test", "urn:n", " max_items='2'"))) == [
        "i2", "i3"]
    for bad in ("-5", "0", "", "²", "1.5", "abc", "9" * 30):
        reply = await ask(alice, items("alice@a.test", "urn:n", f" max_items='{bad}'"))
        assert condition(reply) == "bad-request", (bad, etree.tostring(reply))
    # Ids: the limit (a full JID's 3071 bytes) is accepted, one byte more is not.
    reply = await ask(alice, publish("urn:n", "<x xmlns='urn:x'/>", "a" * 3071, iq_id="l1"))
    assert reply.get("type") == "result", etree.tostring(reply)
    reply = await ask(alice, publish("urn:n", "<x xmlns='urn:x'/>", "é" * 1536, iq_id="l2"))
    assert condition(reply) == "not-acceptable"
    assert "3071" in (reply.findtext(".//{urn:ietf:params:xml:ns:xmpp-stanzas}text") or "")
    reply = await ask(alice, items("alice@a.test", "urn:n", inner=f"<item id='{'b' * 10000}'/>"))
    assert condition(reply) == "not-acceptable"
    reply = await ask(alice, f"<iq type='set' id='l3'><pubsub xmlns='{PUBSUB}'><retract "
                             f"node='urn:n'><item id='{'c' * 10000}'/></retract></pubsub></iq>")
    assert condition(reply) == "not-acceptable"
    reply = await ask(alice, publish("n" * 1025, "<x xmlns='urn:x'/>", iq_id="l4"))
    assert condition(reply) == "not-acceptable"
    reply = await ask(alice, f"<iq type='set' id='l5'><pubsub xmlns='{PUBSUB}'><create "
                             f"node='{'n' * 1025}'/></pubsub></iq>")
    assert condition(reply) == "not-acceptable"
    # An unknown publish option: precondition-not-met, for an existing node and a new one
    # (which is then not created).
    for node in ("urn:n", "urn:new"):
        reply = await ask(alice, publish(node, "<x xmlns='urn:x'/>", "u",
                                         options(bogus_option="1"), iq_id="o1"))
        assert (condition(reply), app_condition(reply)) == ("conflict", "precondition-not-met")
    reply = await ask(alice, items("alice@a.test", "urn:new"))
    assert condition(reply) == "item-not-found"
    assert "u" not in item_ids(await ask(alice, items("alice@a.test", "urn:n")))


def subscribe_options(**fields: str) -> str:
    """A XEP-0060 §6.3 subscription options form."""
    inner = "".join(f"<field var='pubsub#{k}'><value>{v}</value></field>"
                    for k, v in fields.items())
    return (f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
            f"<value>{PUBSUB}#subscribe_options</value></field>{inner}</x>")


async def test_subscription_options_on_pep(server: RunningServer) -> None:
    """PEP on the one iq front gets XEP-0060 §6.3 subscription options: advertised; set with
    the subscription (§6.3.7) or later (§6.3.5); pubsub#deliver = false stops notifications
    and the last item; kept in the store with the subscription and gone with it; §6.4 default
    options; the §6.3.4/§6.3.6 errors."""
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.raw_login("alice@a.test")
    bob = await server.raw_login("bob@a.test")
    await bob.send("<presence/>")
    reply = await ask(bob, f"<iq type='get' id='d1' to='alice@a.test'><query xmlns='{DISCO}'/>"
                           "</iq>")
    assert f"{PUBSUB}#subscription-options" in {f.get("var")
                                                for f in reply.iter(q(DISCO, "feature"))}
    tune = "http://jabber.org/protocol/tune"
    await ask(alice, publish(tune, f"<tune xmlns='{tune}'><title>1</title></tune>", "t1",
                             options(access_model="open")))
    body = (f"<iq type='set' id='s1' to='alice@a.test'><pubsub xmlns='{PUBSUB}'>"
            f"<subscribe node='{tune}' jid='bob@a.test'/><options>"
            f"{subscribe_options(deliver='false')}</options></pubsub></iq>")
    assert subscription_of(await ask(bob, body)) == ("bob@a.test", "subscribed")
    await ask(alice, publish(tune, f"<tune xmlns='{tune}'><title>2</title></tune>", "t2",
                             iq_id="p2"))
    await no_event(bob)  # neither the last item nor the new one
    stored = await server.server.storage.pep.subscription_options(  # type: ignore[attr-defined]
        "alice", "a.test")
    assert stored == {tune: {"bob@a.test": {"deliver": False}}}

    def get(jid: str = "bob@a.test", iq_id: str = "o1") -> str:
        return (f"<iq type='get' id='{iq_id}' to='alice@a.test'><pubsub xmlns='{PUBSUB}'>"
                f"<options node='{tune}' jid='{jid}'/></pubsub></iq>")

    def values(reply: etree._Element) -> dict[str | None, str | None]:
        assert reply.get("type") == "result", etree.tostring(reply)
        form = reply.find(".//{jabber:x:data}x")
        assert form is not None and unlabelled(form) == []
        return {f.get("var"): f.findtext(q("jabber:x:data", "value"))
                for f in form.iter(q("jabber:x:data", "field"))}

    assert values(await ask(bob, get()))["pubsub#deliver"] == "0"
    # Read back after the cache is dropped, then turned on again (§6.3.5).
    server.server.modules["pep"]._forget(JID.parse("alice@a.test"))  # type: ignore[attr-defined]
    assert values(await ask(bob, get(iq_id="o2")))["pubsub#deliver"] == "0"
    reply = await ask(bob, f"<iq type='set' id='o3' to='alice@a.test'><pubsub xmlns='{PUBSUB}'>"
                           f"<options node='{tune}' jid='bob@a.test'>"
                           f"{subscribe_options(deliver='1')}</options></pubsub></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    await ask(alice, publish(tune, f"<tune xmlns='{tune}'><title>3</title></tune>", "t3",
                             iq_id="p3"))
    event = await next_event(bob)
    assert event.get("to") == "bob@a.test" and event.findtext(f".//{{{tune}}}title") == "3"
    # §6.4: the default options.
    reply = await ask(bob, f"<iq type='get' id='o4' to='alice@a.test'><pubsub xmlns='{PUBSUB}'>"
                           f"<default node='{tune}'/></pubsub></iq>")
    assert values(reply) == {"FORM_TYPE": f"{PUBSUB}#subscribe_options", "pubsub#deliver": "1",
                             "pubsub#include_body": "0"}
    # Errors: another's options (forbidden), a bad form (§6.3.6), no subscription (§6.3.4).
    reply = await ask(bob, get("alice@a.test", "o5"))
    assert condition(reply) == "forbidden"
    reply = await ask(bob, f"<iq type='set' id='o6' to='alice@a.test'><pubsub xmlns='{PUBSUB}'>"
                           f"<options node='{tune}' jid='bob@a.test'>"
                           f"{subscribe_options(colour='red')}</options></pubsub></iq>")
    assert (condition(reply), app_condition(reply)) == ("bad-request", "invalid-options")
    assert (await ask(bob, subscribe("alice@a.test", tune, "bob@a.test", "u1",
                                     "unsubscribe"))).get("type") == "result"
    reply = await ask(bob, get(iq_id="o7"))
    assert (condition(reply), app_condition(reply)) == ("unexpected-request", "not-subscribed")
    assert await server.server.storage.pep.subscription_options(  # type: ignore[attr-defined]
        "alice", "a.test") == {}


def test_requester_and_jid_errors_are_one() -> None:
    """The one iq front reads who asks and the 'jid' of a request the same way for PEP and
    the service: a malformed 'from' is jid-malformed (RFC 6120 §8.3.3.8), a malformed 'jid'
    bad-request with <invalid-jid/> (XEP-0060 §6.1.3.1)."""
    from server.errors import StanzaError
    from server.modules.pubsub.protocol import jid_attr, requester
    good = etree.fromstring("<iq from='alice@a.test/pc'/>")
    assert str(requester(good, None)) == "alice@a.test/pc"
    cases: list[tuple[Any, str, tuple[str, str | None]]] = [
        (lambda el: requester(el, None), "<iq from='@@'/>", ("jid-malformed", None)),
        (jid_attr, "<subscribe jid='a@b@c'/>", ("bad-request", "invalid-jid")),
        (jid_attr, "<subscribe/>", ("bad-request", "invalid-jid"))]
    for check, bad, expected in cases:
        try:
            check(etree.fromstring(bad))
        except StanzaError as err:
            assert (err.condition, getattr(err, "app", None)) == expected, bad
        else:
            raise AssertionError(f"{bad} accepted")


async def test_notifications_are_serialised_once() -> None:
    """The one front fans a notification out through writer.addressed_copies (DESIGN.md rule
    3, as MUC does): every routed copy is addressed to its recipient, with one id, and its
    bytes come from the one serialisation of the template."""
    from server.modules.pubsub.protocol import PubsubProtocol
    from server.xml import writer

    routed: list[etree._Element] = []

    class Router:
        def route(self, stanza: etree._Element, _origin: object) -> None:
            routed.append(stanza)

    class Server:
        router = Router()

    front = PubsubProtocol()
    front.server = Server()  # type: ignore[assignment]
    event = engine.items_event("urn:n", [engine.item_element(EVENT, "i1", None)])
    targets = ["bob@a.test/pc", "carol@a.test", "dave@b.test/x"]
    await front.deliver([engine.Notification(engine.event_message("alice@a.test", event),
                                             tuple(targets))])
    assert [m.get("to") for m in routed] == targets
    assert len({m.get("id") for m in routed}) == 1
    for message in routed:
        assert id(message) in writer._SHARED  # bytes made once, for all of them
        data = writer.serialize(message, "jabber:client")
        assert etree.fromstring(data).get("to") == message.get("to")
        assert b"<item id=\"i1\"/>" in data


async def test_publications_of_many_accounts_share_commits(server: RunningServer) -> None:
    """Items published at once by several accounts are committed together (the group commit,
    server/modules/pubsub/writer.py), each publish answered only once its item is stored:
    every result is followed by the item in the store, and an account's own later
    publication is the one kept."""
    users = [f"u{n}@a.test" for n in range(8)]
    for user in users:
        await server.add_user(user)
    clients = [await server.raw_login(user) for user in users]
    pep = server.server.modules["pep"]
    tune = "http://jabber.org/protocol/tune"
    before = pep._writer.batches  # type: ignore[attr-defined]
    rounds = 3
    for n in range(rounds):
        await asyncio.gather(*(c.send(publish(tune, f"<tune xmlns='{tune}'><title>{u}/{n}</title>"
                                              "</tune>", "current", iq_id=f"p{n}"))
                               for c, u in zip(clients, users, strict=True)))
        for client in clients:
            reply = await client.next_of("iq")
            assert reply.get("type") == "result" and reply.get("id") == f"p{n}"
    batches = pep._writer.batches - before  # type: ignore[attr-defined]
    assert batches < rounds * len(users), batches  # some commits were shared
    store = pep.store  # type: ignore[attr-defined]
    for user in users:
        local, domain = user.split("@")
        stored = await store.items(local, domain, tune)
        assert [(i.id, etree.fromstring(i.payload).findtext(q(tune, "title"))) for i in stored] \
            == [("current", f"{user}/{rounds - 1}")]


async def test_the_last_item_comes_from_memory_and_follows_retracts(
        server: RunningServer, monkeypatch: Any) -> None:
    """XEP-0163 §4.3.2: a resource that comes online with +notify gets the newest item, kept
    in memory since its publish committed (no store read); a retract or purge forgets it, so
    the next resource gets what the store has then, read once and kept."""
    nick = "http://jabber.org/protocol/nick"
    alice, _bob, ver = await alice_and_interested_bob(server, nick, "b0")
    store = server.server.modules["pep"].store  # type: ignore[attr-defined]
    reads: list[str] = []
    items = store.items

    async def counted(user: str, domain: str, node: str, **kw: Any) -> Any:
        reads.append(node)
        return await items(user, domain, node, **kw)
    monkeypatch.setattr(store, "items", counted)

    async def newest_for_a_new_resource(resource: str) -> str | None:
        client = await server.raw_login("bob@a.test", resource=resource)
        await client.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' "
                          f"ver='{ver}'/></presence>")
        try:
            message = await next_event(client, timeout=1.5)
        except TimeoutError:
            return None
        return message.findtext(f".//{{{nick}}}nick")

    for n in (1, 2):
        reply = await ask(alice, publish(nick, f"<nick xmlns='{nick}'>A{n}</nick>", f"n{n}"))
        assert reply.get("type") == "result"
    assert await newest_for_a_new_resource("b1") == "A2"
    assert reads == []  # from memory
    reply = await ask(alice, f"<iq type='set' id='r1'><pubsub xmlns='{PUBSUB}'>"
                      f"<retract node='{nick}'><item id='n2'/></retract></pubsub></iq>")
    assert reply.get("type") == "result"
    # max_items is 1 (the PEP default): n1 went when n2 came, so the node is empty now
    assert await newest_for_a_new_resource("b2") is None  # read again, then kept
    assert reads == [nick]
    assert await newest_for_a_new_resource("b3") is None
    assert reads == [nick]
    reply = await ask(alice, publish(nick, f"<nick xmlns='{nick}'>A3</nick>", "n3"))
    assert reply.get("type") == "result"
    assert await newest_for_a_new_resource("b4") == "A3"
    assert reads == [nick]
    reply = await ask(alice, f"<iq type='set' id='x1'><pubsub xmlns='{OWNER}'>"
                      f"<purge node='{nick}'/></pubsub></iq>")
    assert reply.get("type") == "result"
    assert await newest_for_a_new_resource("b5") is None

"""Bookmarks (XEP-0402 in PEP, XEP-0048 in private XML) kept as one list (XEP-0402 §5.3,
urn:xmpp:bookmarks:1#compat), over real sockets with raw clients."""

from __future__ import annotations

from lxml import etree

from tests.conftest import RunningServer
from tests.rawclient import RawClient, condition
from tests.test_pep import (
    BOOKMARKS,
    CAPS,
    DISCO,
    EVENT,
    PUBSUB,
    app_condition,
    ask,
    friends,
    item_ids,
    items,
    next_event,
    no_event,
    online_with_caps,
    options,
    publish,
    q,
    wait_caps,
)

LEGACY = "storage:bookmarks"
PRIVATE = "jabber:iq:private"
XEP0402 = {"persist_items": "true", "max_items": "max", "send_last_published_item": "never",
           "access_model": "whitelist"}


def set_legacy(body: str, iq_id: str = "ps") -> str:
    return (f"<iq type='set' id='{iq_id}'><query xmlns='{PRIVATE}'>"
            f"<storage xmlns='{LEGACY}'>{body}</storage></query></iq>")


async def get_legacy(client: RawClient) -> etree._Element:
    reply = await ask(client, f"<iq type='get' id='pg'><query xmlns='{PRIVATE}'>"
                              f"<storage xmlns='{LEGACY}'/></query></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    storage = reply.find(f"{{{PRIVATE}}}query/{{{LEGACY}}}storage")
    assert storage is not None
    return storage


def rooms(storage: etree._Element) -> dict[str, tuple[str | None, str | None, str | None]]:
    return {c.get("jid", ""): (c.get("name"), c.get("autojoin"), c.findtext(q(LEGACY, "nick")))
            for c in storage.iter(q(LEGACY, "conference"))}


def event_items(message: etree._Element) -> tuple[list[str], list[str]]:
    """(published ids, retracted ids) of a bookmarks notification."""
    holder = message.find(f"{{{EVENT}}}event/{{{EVENT}}}items")
    assert holder is not None and holder.get("node") == BOOKMARKS
    return ([i.get("id", "") for i in holder.findall(q(EVENT, "item"))],
            [r.get("id", "") for r in holder.findall(q(EVENT, "retract"))])


async def test_whitelist_bookmarks_reach_the_owners_resources_only(
        server: RunningServer) -> None:
    """XEP-0402 published with publish-options access_model=whitelist: every resource of the
    owner is notified (the publishing one too); a contact interested in the node (+notify,
    subscription both) gets nothing and cannot read them, nor can a stranger."""
    for user in ("alice", "bob", "eve"):
        await server.add_user(f"{user}@a.test")
    await friends(server, "alice@a.test", "bob@a.test")
    phone = await server.raw_login("alice@a.test", resource="phone")
    laptop = await server.raw_login("alice@a.test", resource="laptop")
    bob = await server.raw_login("bob@a.test")
    eve = await server.raw_login("eve@a.test")
    ver = await online_with_caps(phone, [DISCO, CAPS, f"{BOOKMARKS}+notify"])
    await wait_caps(server, ver)
    for client in (laptop, bob):  # the same caps: known now, not asked again
        await client.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' "
                          f"ver='{ver}'/></presence>")
    await eve.send("<presence/>")
    conference = (f"<conference xmlns='{BOOKMARKS}' name='Coven' autojoin='true'>"
                  "<nick>al</nick></conference>")
    reply = await ask(phone, publish(BOOKMARKS, conference, "coven@muc.a.test",
                                     options(**XEP0402)))
    assert reply.get("type") == "result", etree.tostring(reply)
    for client, resource in ((laptop, "laptop"), (phone, "phone")):
        message = await next_event(client)
        assert message.get("from") == "alice@a.test"
        assert message.get("to") == f"alice@a.test/{resource}"
        assert event_items(message) == (["coven@muc.a.test"], [])
        nick = message.findtext(f".//{{{BOOKMARKS}}}conference/{{{BOOKMARKS}}}nick")
        assert nick == "al"
    await no_event(bob)
    await no_event(eve)
    for other in (bob, eve):
        reply = await ask(other, items("alice@a.test", BOOKMARKS))
        assert (condition(reply), app_condition(reply)) == ("not-allowed", "closed-node")
    assert item_ids(await ask(laptop, items("alice@a.test", BOOKMARKS))) == ["coven@muc.a.test"]


async def test_private_xml_and_pep_bookmarks_are_one_list(server: RunningServer) -> None:
    """XEP-0402 §5.3: the account announces #compat; a XEP-0048 list stored in private XML
    becomes PEP items (room JID as id, whitelist node), notified to the owner; XEP-0402 items
    read back through private XML (with the <url/> bookmarks kept); replacing the XEP-0048 list
    publishes only what changed and retracts what went."""
    await server.add_user("alice@a.test")
    legacy = await server.raw_login("alice@a.test", resource="old")
    modern = await server.raw_login("alice@a.test", resource="new")
    await legacy.send("<presence/>")
    await online_with_caps(modern, [DISCO, CAPS, f"{BOOKMARKS}+notify"])
    reply = await ask(modern, f"<iq type='get' id='d1' to='alice@a.test'>"
                              f"<query xmlns='{DISCO}'/></iq>")
    features = {f.get("var") for f in reply.iter(q(DISCO, "feature"))}
    assert f"{BOOKMARKS}#compat" in features
    # Before any bookmark: an empty XEP-0048 list, and no PEP node.
    assert rooms(await get_legacy(legacy)) == {}
    assert condition(await ask(modern, items("alice@a.test", BOOKMARKS))) == "item-not-found"
    # The old client stores two rooms and a URL.
    reply = await ask(legacy, set_legacy(
        "<conference jid='one@muc.a.test' name='One' autojoin='true'><nick>al</nick>"
        "</conference><conference jid='two@muc.a.test' name='Two'/>"
        "<url name='Site' url='https://a.test/'/>"))
    assert reply.get("type") == "result", etree.tostring(reply)
    published = [event_items(await next_event(modern)) for _ in range(2)]
    assert sorted(ids[0] for ids, _ in published) == ["one@muc.a.test", "two@muc.a.test"]
    reply = await ask(modern, items("alice@a.test", BOOKMARKS))
    assert item_ids(reply) == ["one@muc.a.test", "two@muc.a.test"]
    one = reply.find(f".//{{{PUBSUB}}}item[@id='one@muc.a.test']/{{{BOOKMARKS}}}conference")
    assert one is not None and one.get("name") == "One" and one.get("autojoin") == "true"
    assert one.findtext(q(BOOKMARKS, "nick")) == "al"
    config = await ask(modern, f"<iq type='get' id='c1'><pubsub xmlns='{PUBSUB}#owner'>"
                               f"<configure node='{BOOKMARKS}'/></pubsub></iq>")
    fields = {f.get("var"): f.findtext(q("jabber:x:data", "value"))
              for f in config.iter(q("jabber:x:data", "field"))}
    assert fields["pubsub#access_model"] == "whitelist"
    # A XEP-0402 client adds a room (with the same options): the old client sees three.
    extension = "<extensions><pinned xmlns='urn:xmpp:bookmarks-pinning:0'/></extensions>"
    reply = await ask(modern, publish(
        BOOKMARKS, f"<conference xmlns='{BOOKMARKS}' name='Three'><nick>x</nick>{extension}"
                   "</conference>", "three@muc.a.test", options(**XEP0402)))
    assert reply.get("type") == "result", etree.tostring(reply)
    await next_event(modern)
    storage = await get_legacy(legacy)
    assert rooms(storage) == {"one@muc.a.test": ("One", "true", "al"),
                              "two@muc.a.test": ("Two", "false", None),
                              "three@muc.a.test": ("Three", "false", "x")}
    assert [u.get("url") for u in storage.iter(q(LEGACY, "url"))] == ["https://a.test/"]
    # The old client writes its list back: 'one' dropped, 'two' changed, 'three' as it was.
    # Notified: the retraction of 'one' and the new 'two'; nothing for 'three'.
    reply = await ask(legacy, set_legacy(
        "<conference jid='two@muc.a.test' name='Two again' autojoin='1'/>"
        "<conference jid='three@muc.a.test' name='Three'><nick>x</nick></conference>",
        "ps2"))
    assert reply.get("type") == "result"
    changes = [event_items(await next_event(modern)) for _ in range(2)]
    assert sorted(changes) == [([], ["one@muc.a.test"]), (["two@muc.a.test"], [])]
    await no_event(modern)
    reply = await ask(modern, items("alice@a.test", BOOKMARKS))
    assert item_ids(reply) == ["three@muc.a.test", "two@muc.a.test"]
    # The XEP-0402 <extensions/> of 'three' survived the old client's round trip.
    assert reply.find(".//{urn:xmpp:bookmarks-pinning:0}pinned") is not None
    two = reply.find(f".//{{{PUBSUB}}}item[@id='two@muc.a.test']/{{{BOOKMARKS}}}conference")
    assert two is not None and (two.get("name"), two.get("autojoin")) == ("Two again", "true")
    # The URL went with the old client's last list (it had none).
    assert list((await get_legacy(legacy)).iter(q(LEGACY, "url"))) == []

"""The pubsub service at pubsub.<domain> (XEP-0060), over real sockets with raw clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import RawClient, condition
from tests.test_pep import ERRORS, EVENT, OWNER, PUBSUB, app_condition, ask, item_ids, q

SERVICE = "pubsub.a.test"
DATA = "jabber:x:data"
INFO = "http://jabber.org/protocol/disco#info"
ITEMS = "http://jabber.org/protocol/disco#items"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(tmp_path, "[pubsub]\nenabled = true\n")
    try:
        yield running
    finally:
        await stop_server(running)


def iq(type_: str, body: str, owner: bool = False, iq_id: str = "x") -> str:
    namespace = OWNER if owner else PUBSUB
    return (f"<iq type='{type_}' to='{SERVICE}' id='{iq_id}'><pubsub xmlns='{namespace}'>"
            f"{body}</pubsub></iq>")


def config_form(**fields: str) -> str:
    inner = "".join(f"<field var='pubsub#{k}'><value>{v}</value></field>"
                    for k, v in fields.items())
    return (f"<x xmlns='{DATA}' type='submit'><field var='FORM_TYPE' type='hidden'>"
            f"<value>{PUBSUB}#node_config</value></field>{inner}</x>")


def ok(reply: etree._Element) -> etree._Element:
    assert reply.get("type") == "result", etree.tostring(reply)
    return reply


async def users(server: RunningServer, *names: str) -> list[RawClient]:
    clients = []
    for name in names:
        await server.add_user(f"{name}@a.test")
        client = await server.raw_login(f"{name}@a.test")
        await client.send("<presence/>")  # notifications to the bare JID need a resource
        await client.next_of("presence")  # its own, back (RFC 6121 §4.2.2)
        clients.append(client)
    return clients


async def test_create_publish_subscribe_and_notify(server: RunningServer) -> None:
    alice, bob = await users(server, "alice", "bob")
    # Instant node: the service names it.
    reply = ok(await alice.ask(iq("set", "<create/>")))
    instant = reply.find(f".//{{{PUBSUB}}}create")
    assert instant is not None and instant.get("node")
    # A named node with a configuration form.
    ok(await alice.ask(iq("set", "<create node='news'/><configure>"
                                 f"{config_form(title='News', max_items='2')}</configure>")))
    assert condition(await alice.ask(iq("set", "<create node='news'/>"))) == "conflict"
    # bob subscribes (open node) and gets what alice publishes.
    reply = ok(await bob.ask(iq("set", "<subscribe node='news' jid='bob@a.test/raw'/>")))
    sub = reply.find(f".//{{{PUBSUB}}}subscription")
    assert sub is not None and sub.get("subscription") == "subscribed"
    # Someone else's JID: bad-request invalid-jid.
    reply = await bob.ask(iq("set", "<subscribe node='news' jid='alice@a.test'/>"))
    assert (condition(reply), app_condition(reply)) == ("bad-request", "invalid-jid")
    reply = ok(await alice.ask(iq("set", "<publish node='news'><item id='1'>"
                                         "<entry xmlns='urn:t'>one</entry></item></publish>")))
    assert item_ids(reply) == ["1"]
    message = await bob.next_of("message")
    assert message.get("from") == SERVICE and message.get("type") == "headline"
    assert message.findtext(f".//{{{EVENT}}}item/{{urn:t}}entry") == "one"
    # Only owners and publishers publish.
    reply = await bob.ask(iq("set", "<publish node='news'><item><e xmlns='urn:t'/></item>"
                                    "</publish>"))
    assert condition(reply) == "forbidden"
    # max_items 2.
    for n in (2, 3):
        ok(await ask(alice, iq("set", f"<publish node='news'><item id='{n}'>"
                                      f"<entry xmlns='urn:t'>{n}</entry></item></publish>")))
    assert item_ids(await ask(bob, iq("get", "<items node='news'/>"))) == ["2", "3"]
    # Retract notifies; unsubscribe stops notifications.
    ok(await alice.ask(iq("set", "<retract node='news' notify='true'><item id='2'/></retract>")))
    retract = None
    while retract is None:
        retract = (await bob.next_of("message")).find(f".//{{{EVENT}}}retract")
    assert retract.get("id") == "2"
    ok(await ask(bob, iq("set", "<unsubscribe node='news' jid='bob@a.test/raw'/>")))
    reply = await ask(bob, iq("set", "<unsubscribe node='news' jid='bob@a.test/raw'/>"))
    assert (condition(reply), app_condition(reply)) == ("unexpected-request", "not-subscribed")
    # Publishing to a node that does not exist.
    reply = await alice.ask(iq("set", "<publish node='nope'><item><e xmlns='urn:t'/></item>"
                                      "</publish>"))
    assert condition(reply) == "item-not-found"
    # The entity's own subscriptions and affiliations.
    reply = ok(await alice.ask(iq("get", "<affiliations/>")))
    affs = {a.get("node"): a.get("affiliation") for a in reply.iter(q(PUBSUB, "affiliation"))}
    assert affs == {"news": "owner", instant.get("node"): "owner"}
    assert ERRORS  # (the errors namespace is checked through app_condition)


async def test_owner_management_and_whitelist(server: RunningServer) -> None:
    alice, bob, carol = await users(server, "alice", "bob", "carol")
    ok(await alice.ask(iq("set", "<create node='team'/><configure>"
                                 f"{config_form(access_model='whitelist')}</configure>")))
    reply = await bob.ask(iq("get", "<items node='team'/>"))
    assert (condition(reply), app_condition(reply)) == ("not-allowed", "closed-node")
    assert condition(await bob.ask(iq("set", "<subscribe node='team' jid='bob@a.test'/>"))) \
        == "not-allowed"
    # Not the owner: forbidden.
    assert condition(await bob.ask(iq("get", "<configure node='team'/>", owner=True))) \
        == "forbidden"
    # alice makes bob a publisher, carol a member.
    ok(await alice.ask(iq("set", "<affiliations node='team'>"
                                 "<affiliation jid='bob@a.test' affiliation='publisher'/>"
                                 "<affiliation jid='carol@a.test' affiliation='member'/>"
                                 "</affiliations>", owner=True)))
    reply = ok(await alice.ask(iq("get", "<affiliations node='team'/>", owner=True)))
    affs = {a.get("jid"): a.get("affiliation") for a in reply.iter(q(OWNER, "affiliation"))}
    assert affs == {"alice@a.test": "owner", "bob@a.test": "publisher",
                    "carol@a.test": "member"}
    # The last owner cannot go.
    reply = await alice.ask(iq("set", "<affiliations node='team'><affiliation "
                                      "jid='alice@a.test' affiliation='none'/></affiliations>",
                               owner=True))
    assert condition(reply) == "not-acceptable"
    ok(await carol.ask(iq("set", "<subscribe node='team' jid='carol@a.test'/>")))
    ok(await bob.ask(iq("set", "<publish node='team'><item id='b'><e xmlns='urn:t'>hi</e>"
                               "</item></publish>")))
    message = await carol.next_of("message")
    assert message.findtext(".//{urn:t}e") == "hi"
    # The owner sees and changes subscriptions.
    reply = ok(await alice.ask(iq("get", "<subscriptions node='team'/>", owner=True)))
    subs = [(s.get("jid"), s.get("subscription")) for s in reply.iter(q(OWNER, "subscription"))]
    assert subs == [("carol@a.test", "subscribed")]
    ok(await alice.ask(iq("set", "<subscriptions node='team'><subscription jid='carol@a.test' "
                                 "subscription='none'/></subscriptions>", owner=True)))
    reply = ok(await carol.ask(iq("get", "<subscriptions/>")))
    assert list(reply.iter(q(PUBSUB, "subscription"))) == []
    # Configure: read the form, change max_items.
    reply = ok(await alice.ask(iq("get", "<configure node='team'/>", owner=True)))
    fields = {f.get("var"): f.findtext(q(DATA, "value")) for f in reply.iter(q(DATA, "field"))}
    assert fields["pubsub#access_model"] == "whitelist"
    ok(await alice.ask(iq("set", f"<configure node='team'>{config_form(title='Team')}"
                                 "</configure>", owner=True)))
    # Unsupported access model on the service.
    reply = await alice.ask(iq("set", "<configure node='team'>"
                                      f"{config_form(access_model='presence')}</configure>",
                               owner=True))
    assert condition(reply) == "not-acceptable"


async def test_purge_delete_redirect_and_disco(server: RunningServer) -> None:
    alice, bob = await users(server, "alice", "bob")
    ok(await alice.ask(iq("set", f"<create node='blog'/><configure>{config_form(title='Blog')}"
                                 "</configure>")))
    ok(await alice.ask(iq("set", "<publish node='blog'><item id='p1'><e xmlns='urn:t'/></item>"
                                 "</publish>")))
    ok(await bob.ask(iq("set", "<subscribe node='blog' jid='bob@a.test'/>")))
    # disco#items of the service: its nodes; of a node: its items.
    reply = ok(await bob.ask(f"<iq type='get' to='{SERVICE}' id='d1'>"
                             f"<query xmlns='{ITEMS}'/></iq>"))
    listed = [(i.get("node"), i.get("name")) for i in reply.iter(q(ITEMS, "item"))]
    assert listed == [("blog", "Blog")]
    reply = ok(await bob.ask(f"<iq type='get' to='{SERVICE}' id='d2'>"
                             f"<query xmlns='{ITEMS}' node='blog'/></iq>"))
    assert [i.get("name") for i in reply.iter(q(ITEMS, "item"))] == ["p1"]
    # disco#info of a node: leaf, with the meta-data form.
    reply = ok(await bob.ask(f"<iq type='get' to='{SERVICE}' id='d3'>"
                             f"<query xmlns='{INFO}' node='blog'/></iq>"))
    identity = reply.find(f".//{{{INFO}}}identity")
    assert identity is not None and identity.get("type") == "leaf"
    fields = {f.get("var"): [v.text for v in f.findall(q(DATA, "value"))]
              for f in reply.iter(q(DATA, "field"))}
    assert fields["FORM_TYPE"] == [f"{PUBSUB}#meta-data"]
    assert fields["pubsub#owner"] == ["alice@a.test"]
    assert fields["pubsub#title"] == ["Blog"]
    reply = await bob.ask(f"<iq type='get' to='{SERVICE}' id='d4'>"
                          f"<query xmlns='{INFO}' node='none'/></iq>")
    assert condition(reply) == "item-not-found"
    # The service itself.
    reply = ok(await bob.ask(f"<iq type='get' to='{SERVICE}' id='d5'>"
                             f"<query xmlns='{INFO}'/></iq>"))
    features = {f.get("var") for f in reply.iter(q(INFO, "feature"))}
    assert f"{PUBSUB}#create-nodes" in features
    # Purge and delete (with redirect) notify the subscriber.
    ok(await alice.ask(iq("set", "<purge node='blog'/>", owner=True)))
    purge = None
    while purge is None:
        purge = (await bob.next_of("message")).find(f".//{{{EVENT}}}purge")
    assert item_ids(await bob.ask(iq("get", "<items node='blog'/>"))) == []
    assert condition(await bob.ask(iq("set", "<delete node='blog'/>", owner=True))) == "forbidden"
    ok(await alice.ask(iq("set", "<delete node='blog'><redirect uri='xmpp:pubsub.a.test?;"
                                 "node=blog2'/></delete>", owner=True)))
    deleted = None
    while deleted is None:
        deleted = (await bob.next_of("message")).find(f".//{{{EVENT}}}delete")
    redirect = deleted.find(q(EVENT, "redirect"))
    assert redirect is not None and redirect.get("uri") == "xmpp:pubsub.a.test?;node=blog2"
    assert condition(await bob.ask(iq("get", "<items node='blog'/>"))) == "item-not-found"


async def test_last_item_on_subscribe_and_persistence(server: RunningServer) -> None:
    alice, bob = await users(server, "alice", "bob")
    ok(await alice.ask(iq("set", "<create node='status'/><configure>"
                                 f"{config_form(send_last_published_item='on_sub')}"
                                 "</configure>")))
    ok(await alice.ask(iq("set", "<publish node='status'><item id='now'><s xmlns='urn:t'>"
                                 "busy</s></item></publish>")))
    ok(await ask(bob, iq("set", "<subscribe node='status' jid='bob@a.test/raw'/>")))
    message = await bob.next_of("message")
    assert message.findtext(".//{urn:t}s") == "busy"
    # Stored: another module instance reads the same nodes back.
    stored = await server.server.storage.pubsub.nodes("", SERVICE)  # type: ignore[attr-defined]
    assert stored["status"]["subscriptions"] == {"bob@a.test/raw": "subscribed"}
    assert stored["status"]["affiliations"] == {"alice@a.test": "owner"}

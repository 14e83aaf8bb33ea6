"""The pubsub service at pubsub.<domain> (XEP-0060), over real sockets with raw clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import RawClient, condition
from tests.test_pep import (
    ERRORS,
    EVENT,
    OWNER,
    PUBSUB,
    app_condition,
    ask,
    item_ids,
    q,
    unlabelled,
)

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
    # §8.8.4: carol is told (one iq front for PEP and the service: both tell).
    told = (await carol.next_of("message")).find(f".//{{{EVENT}}}subscription")
    assert told is not None and (told.get("jid"), told.get("subscription")) == (
        "carol@a.test", "none")
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


async def test_never_sends_no_last_item(server: RunningServer) -> None:
    """§6.1.7: send_last_published_item = never (the service's default) sends nothing."""
    alice, bob = await users(server, "alice", "bob")
    ok(await alice.ask(iq("set", "<create node='quiet'/>")))
    ok(await alice.ask(iq("set", "<publish node='quiet'><item id='1'><s xmlns='urn:t'/></item>"
                                 "</publish>")))
    ok(await ask(bob, iq("set", "<subscribe node='quiet' jid='bob@a.test'/>")))
    with pytest.raises(TimeoutError):
        await bob.next_of("message", 0.4)


def authorization(node: str, jid: str, allow: str) -> str:
    return (f"<message to='{SERVICE}' id='auth'><x xmlns='{DATA}' type='submit'>"
            f"<field var='FORM_TYPE' type='hidden'><value>{PUBSUB}#subscribe_authorization"
            f"</value></field><field var='pubsub#node'><value>{node}</value></field>"
            f"<field var='pubsub#subscriber_jid'><value>{jid}</value></field>"
            f"<field var='pubsub#allow'><value>{allow}</value></field></x></message>")


async def test_authorize_access_model(server: RunningServer) -> None:
    """XEP-0060 §4.5 authorize: the subscription is pending (§6.1.2.2), the owner gets the
    §8.6.1 form, approves (the subscriber is told, and gets the last item) or denies; only an
    owner's answer counts; reads need an approved subscription."""
    alice, bob, carol = await users(server, "alice", "bob", "carol")
    ok(await alice.ask(iq("set", "<create node='club'/><configure>"
                                 f"{config_form(access_model='authorize', send_last_published_item='on_sub')}"
                                 "</configure>")))
    ok(await alice.ask(iq("set", "<publish node='club'><item id='1'><s xmlns='urn:t'>hello</s>"
                                 "</item></publish>")))
    reply = ok(await bob.ask(iq("set", "<subscribe node='club' jid='bob@a.test'/>")))
    sub = reply.find(f".//{{{PUBSUB}}}subscription")
    assert sub is not None and sub.get("subscription") == "pending"
    reply = await bob.ask(iq("get", "<items node='club'/>"))
    assert (condition(reply), app_condition(reply)) == ("not-authorized", "not-subscribed")
    request = await alice.next_of("message")
    assert request.get("from") == SERVICE
    values = {f.get("var"): f.findtext(q(DATA, "value")) for f in request.iter(q(DATA, "field"))}
    assert values["FORM_TYPE"] == f"{PUBSUB}#subscribe_authorization"
    assert (values["pubsub#node"], values["pubsub#subscriber_jid"]) == ("club", "bob@a.test")
    # The owner's pending list shows it; bob's answering for himself does nothing.
    reply = ok(await alice.ask(iq("get", "<subscriptions node='club'/>", owner=True)))
    assert [(s.get("jid"), s.get("subscription"))
            for s in reply.iter(q(OWNER, "subscription"))] == [("bob@a.test", "pending")]
    await bob.send(authorization("club", "bob@a.test", "true"))
    with pytest.raises(TimeoutError):
        await bob.next_of("message", 0.4)
    await alice.send(authorization("club", "bob@a.test", "true"))
    told = await bob.next_of("message")
    state = told.find(f"{{{EVENT}}}event/{{{EVENT}}}subscription")
    assert state is not None and (state.get("node"), state.get("subscription")) == (
        "club", "subscribed")
    last = await bob.next_of("message")
    assert last.findtext(".//{urn:t}s") == "hello"
    assert item_ids(await ask(bob, iq("get", "<items node='club'/>"))) == ["1"]
    # carol is denied.
    reply = ok(await carol.ask(iq("set", "<subscribe node='club' jid='carol@a.test'/>")))
    await alice.next_of("message")
    await alice.send(authorization("club", "carol@a.test", "false"))
    told = await carol.next_of("message")
    state = told.find(f"{{{EVENT}}}event/{{{EVENT}}}subscription")
    assert state is not None and state.get("subscription") == "none"
    ok(await alice.ask(iq("set", "<publish node='club'><item id='2'><s xmlns='urn:t'>more</s>"
                                 "</item></publish>")))
    assert (await bob.next_of("message")).findtext(".//{urn:t}s") == "more"
    with pytest.raises(TimeoutError):
        await carol.next_of("message", 0.4)
    stored = await server.server.storage.pubsub.nodes("", SERVICE)  # type: ignore[attr-defined]
    assert stored["club"]["subscriptions"] == {"bob@a.test": "subscribed"}


async def test_service_limits_from_config(tmp_path: Path) -> None:
    """[pubsub] max_nodes_per_user, max_items and max_payload_size; a bad value is a config
    error naming file, line and key."""
    from tests.test_config import only_error
    running = await start_server(tmp_path, "[pubsub]\nmax_nodes_per_user = 2\nmax_items = 2\n"
                                           "max_payload_size = 300\n")
    try:
        alice, bob = await users(running, "alice", "bob")
        for name in ("a", "b"):
            ok(await alice.ask(iq("set", f"<create node='{name}'/><configure>"
                                         f"{config_form(max_items='max')}</configure>")))
        reply = await alice.ask(iq("set", "<create node='c'/>"))
        assert (condition(reply), app_condition(reply)) == ("not-allowed", "max-nodes-exceeded")
        ok(await bob.ask(iq("set", "<create node='c'/>")))  # the limit is per user
        for n in range(4):
            ok(await alice.ask(iq("set", f"<publish node='a'><item id='{n}'><e xmlns='urn:t'/>"
                                         "</item></publish>")))
        assert item_ids(ok(await alice.ask(iq("get", "<items node='a'/>")))) == ["2", "3"]
        reply = await alice.ask(iq("set", f"<publish node='a'><item><e xmlns='urn:t'>"
                                          f"{'x' * 300}</e></item></publish>"))
        assert (condition(reply), app_condition(reply)) == ("not-acceptable", "payload-too-big")
    finally:
        await stop_server(running)
    (tmp_path / "bad").mkdir()
    error = only_error(tmp_path / "bad", "[pubsub]\nmax_nodes_per_user = 0\n")
    assert (error.key, error.line) == ("pubsub.max_nodes_per_user", 2), str(error)


async def test_node_creation_restricted_to_admins(tmp_path: Path) -> None:
    """[pubsub] restrict_node_creation = "admins" (Prosody's default, as its pubsub_advanced
    test expects): others get <forbidden/>."""
    running = await start_server(tmp_path, '[pubsub]\nrestrict_node_creation = "admins"\n',
                                 top='admins = ["boss@a.test"]')
    try:
        boss, romeo = await users(running, "boss", "romeo")
        assert condition(await romeo.ask(iq("set", "<create node='n'/>"))) == "forbidden"
        ok(await boss.ask(iq("set", "<create node='n'/>")))
    finally:
        await stop_server(running)


async def test_deleted_accounts_leave_the_service(server: RunningServer) -> None:
    """An account deleted (presenced deluser) loses its subscriptions and affiliations, and
    the nodes it alone owned go with their items, when the service reads its nodes again."""
    alice, bob, carol = await users(server, "alice", "bob", "carol")
    ok(await bob.ask(iq("set", "<create node='bobs'/>")))
    ok(await bob.ask(iq("set", "<publish node='bobs'><item id='1'><e xmlns='urn:t'/></item>"
                               "</publish>")))
    ok(await carol.ask(iq("set", "<create node='carols'/>")))
    ok(await carol.ask(iq("set", "<affiliations node='carols'><affiliation jid='bob@a.test' "
                                 "affiliation='publisher'/></affiliations>", owner=True)))
    for client, jid in ((alice, "alice@a.test"), (bob, "bob@a.test")):
        ok(await client.ask(iq("set", f"<subscribe node='carols' jid='{jid}'/>")))
    ok(await alice.ask(iq("set", "<subscribe node='bobs' jid='alice@a.test'/>")))
    await server.server.storage.accounts.delete("bob", "a.test")
    service = server.server.modules["pubsub"]
    service._nodes.clear()  # type: ignore[attr-defined]  # as after a restart
    reply = ok(await alice.ask(f"<iq type='get' to='{SERVICE}' id='d1'>"
                               f"<query xmlns='{ITEMS}'/></iq>"))
    assert [i.get("node") for i in reply.iter(q(ITEMS, "item"))] == ["carols"]
    stored = await server.server.storage.pubsub.nodes("", SERVICE)  # type: ignore[attr-defined]
    assert set(stored) == {"carols"}
    assert stored["carols"]["affiliations"] == {"carol@a.test": "owner"}
    assert stored["carols"]["subscriptions"] == {"alice@a.test": "subscribed"}
    assert await server.server.storage.pubsub.items("", SERVICE, "bobs") == []  # type: ignore[attr-defined]


async def test_publish_model(server: RunningServer) -> None:
    """pubsub#publish_model: publishers (the default: owners and publishers), subscribers (and
    whoever is subscribed) or open (anyone but outcasts)."""
    alice, bob = await users(server, "alice", "bob")
    publish = "<publish node='{}'><item><e xmlns='urn:t'/></item></publish>"
    ok(await alice.ask(iq("set", "<create node='p'/>")))
    assert condition(await bob.ask(iq("set", publish.format("p")))) == "forbidden"
    ok(await alice.ask(iq("set", "<create node='s'/><configure>"
                                 f"{config_form(publish_model='subscribers')}</configure>")))
    assert condition(await bob.ask(iq("set", publish.format("s")))) == "forbidden"
    ok(await bob.ask(iq("set", "<subscribe node='s' jid='bob@a.test'/>")))
    ok(await ask(bob, iq("set", publish.format("s"))))
    ok(await alice.ask(iq("set", "<create node='o'/><configure>"
                                 f"{config_form(publish_model='open')}</configure>")))
    ok(await ask(bob, iq("set", publish.format("o"))))
    ok(await ask(alice, iq("set", "<affiliations node='o'><affiliation jid='bob@a.test' "
                                  "affiliation='outcast'/></affiliations>", owner=True)))
    assert condition(await ask(bob, iq("set", publish.format("o")))) == "forbidden"


SUBSCRIBE_OPTIONS = f"{PUBSUB}#subscribe_options"


def options_form(**fields: str) -> str:
    inner = "".join(f"<field var='pubsub#{k}'><value>{v}</value></field>"
                    for k, v in fields.items())
    return (f"<x xmlns='{DATA}' type='submit'><field var='FORM_TYPE' type='hidden'>"
            f"<value>{SUBSCRIBE_OPTIONS}</value></field>{inner}</x>")


def form_fields(reply: etree._Element) -> dict[str | None, str | None]:
    return {f.get("var"): f.findtext(q(DATA, "value")) for f in reply.iter(q(DATA, "field"))}


def publish(node: str, item_id: str) -> str:
    return (f"<publish node='{node}'><item id='{item_id}'><s xmlns='urn:t'>{item_id}</s>"
            "</item></publish>")


async def test_subscription_options_get_submit_and_deliver(server: RunningServer) -> None:
    """XEP-0060 §6.3.2 get and §6.3.5 submit the options; pubsub#deliver = false stops the
    notifications to that subscription, true brings them back; the feature is advertised."""
    alice, bob = await users(server, "alice", "bob")
    reply = ok(await bob.ask(f"<iq type='get' to='{SERVICE}' id='d'><query xmlns='{INFO}'/>"
                             "</iq>"))
    assert f"{PUBSUB}#subscription-options" in {f.get("var")
                                                for f in reply.iter(q(INFO, "feature"))}
    ok(await alice.ask(iq("set", "<create node='n'/>")))
    ok(await bob.ask(iq("set", "<subscribe node='n' jid='bob@a.test'/>")))
    reply = ok(await bob.ask(iq("get", "<options node='n' jid='bob@a.test'/>")))
    holder = reply.find(f".//{{{PUBSUB}}}options")
    assert holder is not None and (holder.get("node"), holder.get("jid")) == ("n", "bob@a.test")
    assert form_fields(reply) == {"FORM_TYPE": SUBSCRIBE_OPTIONS, "pubsub#deliver": "1",
                                  "pubsub#include_body": "0"}
    ok(await bob.ask(iq("set", "<options node='n' jid='bob@a.test'>"
                               f"{options_form(deliver='false', include_body='true')}"
                               "</options>")))
    reply = ok(await bob.ask(iq("get", "<options node='n' jid='bob@a.test'/>")))
    assert (form_fields(reply)["pubsub#deliver"], form_fields(reply)["pubsub#include_body"]) \
        == ("0", "1")
    ok(await alice.ask(iq("set", publish("n", "muted"))))
    with pytest.raises(TimeoutError):
        await bob.next_of("message", 0.4)
    ok(await bob.ask(iq("set", f"<options node='n' jid='bob@a.test'>{options_form(deliver='1')}"
                               "</options>")))
    ok(await alice.ask(iq("set", publish("n", "heard"))))
    assert (await bob.next_of("message")).findtext(".//{urn:t}s") == "heard"
    # The options go with the subscription: a new one starts from the defaults.
    ok(await bob.ask(iq("set", f"<options node='n' jid='bob@a.test'>{options_form(deliver='0')}"
                               "</options>")))
    ok(await bob.ask(iq("set", "<unsubscribe node='n' jid='bob@a.test'/>")))
    stored = await server.server.storage.pubsub.nodes("", SERVICE)  # type: ignore[attr-defined]
    assert stored["n"]["options"] == {}
    ok(await bob.ask(iq("set", "<subscribe node='n' jid='bob@a.test'/>")))
    assert form_fields(ok(await bob.ask(iq("get", "<options node='n' jid='bob@a.test'/>")))
                       )["pubsub#deliver"] == "1"


async def test_subscription_options_errors(server: RunningServer) -> None:
    """§6.3.4 and §6.3.6: the error cases."""
    alice, bob, carol = await users(server, "alice", "bob", "carol")
    ok(await alice.ask(iq("set", "<create node='n'/>")))
    ok(await bob.ask(iq("set", "<subscribe node='n' jid='bob@a.test'/>")))

    async def error(client: RawClient, type_: str, body: str) -> tuple[str | None, str | None]:
        reply = await client.ask(iq(type_, body))
        assert reply.get("type") == "error", etree.tostring(reply)
        return condition(reply), app_condition(reply)

    # Not subscribed.
    assert await error(carol, "get", "<options node='n' jid='carol@a.test'/>") == (
        "unexpected-request", "not-subscribed")
    # Another entity's options: forbidden, but the owner may.
    assert await error(carol, "get", "<options node='n' jid='bob@a.test'/>") == (
        "forbidden", None)
    ok(await alice.ask(iq("get", "<options node='n' jid='bob@a.test'/>")))
    # No such node; no JID; a malformed JID.
    assert (await error(bob, "get", "<options node='gone' jid='bob@a.test'/>"))[0] \
        == "item-not-found"
    assert await error(bob, "get", "<options node='n'/>") == ("bad-request", "jid-required")
    assert await error(bob, "get", "<options node='n' jid='@@'/>") == (
        "bad-request", "invalid-jid")
    # §6.3.6: an unknown field, a bad value, another form, or no form at all.
    for form in (options_form(colour="blue"), options_form(deliver="maybe"),
                 config_form(title="x"), ""):
        assert await error(bob, "set", f"<options node='n' jid='bob@a.test'>{form}</options>"
                           ) == ("bad-request", "invalid-options"), form
    assert await error(carol, "set", "<options node='n' jid='bob@a.test'>"
                                     f"{options_form(deliver='0')}</options>") == (
        "forbidden", None)
    # §6.3.7: subscribing with bad options subscribes nothing.
    assert await error(carol, "set", "<subscribe node='n' jid='carol@a.test'/><options>"
                                     f"{options_form(colour='red')}</options>") == (
        "bad-request", "invalid-options")
    stored = await server.server.storage.pubsub.nodes("", SERVICE)  # type: ignore[attr-defined]
    assert "carol@a.test" not in stored["n"]["subscriptions"]
    # §6.4: the defaults of a node that does not exist.
    assert (await error(bob, "get", "<default node='gone'/>"))[0] == "item-not-found"


async def test_subscribe_and_configure_and_defaults(server: RunningServer) -> None:
    """§6.3.7: options beside subscribe apply at once (no last item with deliver = false);
    §6.4: the default options, generic and of a node."""
    alice, bob = await users(server, "alice", "bob")
    ok(await alice.ask(iq("set", "<create node='s'/><configure>"
                                 f"{config_form(send_last_published_item='on_sub')}"
                                 "</configure>")))
    ok(await alice.ask(iq("set", publish("s", "first"))))
    ok(await bob.ask(iq("set", "<subscribe node='s' jid='bob@a.test'/><options>"
                               f"{options_form(deliver='false')}</options>")))
    ok(await alice.ask(iq("set", publish("s", "second"))))
    with pytest.raises(TimeoutError):
        await bob.next_of("message", 0.4)
    reply = ok(await bob.ask(iq("get", "<options node='s' jid='bob@a.test'/>")))
    assert form_fields(reply)["pubsub#deliver"] == "0"
    for body, node in (("<default/>", None), ("<default node='s'/>", "s")):
        reply = ok(await bob.ask(iq("get", body)))
        default = reply.find(f".//{{{PUBSUB}}}default")
        assert default is not None and default.get("node") == node
        assert form_fields(reply) == {"FORM_TYPE": SUBSCRIBE_OPTIONS, "pubsub#deliver": "1",
                                      "pubsub#include_body": "0"}


async def test_subscription_options_survive_a_restart(tmp_path: Path) -> None:
    """The options are kept in the node's stored state: after a restart deliver = false still
    holds for bob, and carol (defaults) still gets notifications."""
    running = await start_server(tmp_path, "[pubsub]\nenabled = true\n")
    try:
        alice, bob, carol = await users(running, "alice", "bob", "carol")
        ok(await alice.ask(iq("set", "<create node='k'/>")))
        ok(await bob.ask(iq("set", "<subscribe node='k' jid='bob@a.test'/><options>"
                                   f"{options_form(deliver='0', include_body='1')}</options>")))
        ok(await carol.ask(iq("set", "<subscribe node='k' jid='carol@a.test'/>")))
    finally:
        await stop_server(running)
    running = await start_server(tmp_path, "[pubsub]\nenabled = true\n")
    try:
        alice, bob, carol = [await running.raw_login(f"{n}@a.test")
                             for n in ("alice", "bob", "carol")]
        for client in (bob, carol):
            await client.send("<presence/>")
            await client.next_of("presence")
        reply = ok(await bob.ask(iq("get", "<options node='k' jid='bob@a.test'/>")))
        assert (form_fields(reply)["pubsub#deliver"],
                form_fields(reply)["pubsub#include_body"]) == ("0", "1")
        ok(await alice.ask(iq("set", publish("k", "after"))))
        assert (await carol.next_of("message")).findtext(".//{urn:t}s") == "after"
        with pytest.raises(TimeoutError):
            await bob.next_of("message", 0.4)
    finally:
        await stop_server(running)


async def test_every_service_form_is_labelled(server: RunningServer) -> None:
    """Issue 19 item 5: the node configuration, default configuration, subscription options
    (§6.3, §6.4), node meta-data (disco#info) and authorization request (§8.6) forms have a
    label on every shown field and every list option."""
    alice, bob = await users(server, "alice", "bob")
    ok(await alice.ask(iq("set", "<create node='n'/><configure>"
                                 f"{config_form(access_model='authorize')}</configure>")))
    ok(await alice.ask(iq("set", "<create node='o'/>")))
    ok(await bob.ask(iq("set", "<subscribe node='o' jid='bob@a.test'/>")))
    forms = []
    for client, type_, body, owner in (
            (alice, "get", "<configure node='n'/>", True),
            (alice, "get", "<default/>", True),
            (bob, "get", "<options node='o' jid='bob@a.test'/>", False),
            (bob, "get", "<default/>", False)):
        reply = ok(await client.ask(iq(type_, body, owner=owner)))
        forms.append(reply.find(f".//{{{DATA}}}x"))
    reply = ok(await alice.ask(f"<iq type='get' to='{SERVICE}' id='i'><query xmlns='{INFO}' "
                               "node='n'/></iq>"))
    forms.append(reply.find(f".//{{{DATA}}}x"))
    await bob.send(iq("set", "<subscribe node='n' jid='bob@a.test'/>"))
    forms.append((await alice.next_of("message")).find(f"{{{DATA}}}x"))
    assert all(form is not None for form in forms)
    for form in forms:
        assert unlabelled(form) == [], etree.tostring(form)
    assert len(forms[0].findall(f".//{{{DATA}}}option")) >= 10


async def test_hostile_max_items_ids_and_publish_options(server: RunningServer) -> None:
    """Issue 20 on the service: max_items not a positive number is bad-request; over-long
    item ids and node names are refused; an unknown publish option is a precondition that
    cannot be met (XEP-0060 §7.1.5)."""
    (alice,) = await users(server, "alice")
    ok(await alice.ask(iq("set", "<create node='n'/>")))
    for n in range(3):
        ok(await alice.ask(iq("set", publish("n", f"i{n}"), iq_id=f"p{n}")))
    reply = ok(await alice.ask(iq("get", "<items node='n' max_items='1'/>")))
    assert item_ids(reply) == ["i2"]
    for bad in ("-5", "0", "²", "x"):
        reply = await alice.ask(iq("get", f"<items node='n' max_items='{bad}'/>"))
        assert condition(reply) == "bad-request", bad
    reply = await alice.ask(iq("set", publish("n", "i" * 3072)))
    assert condition(reply) == "not-acceptable"
    reply = await alice.ask(iq("set", f"<create node='{'n' * 1025}'/>"))
    assert condition(reply) == "not-acceptable"
    unknown = (f"<publish-options><x xmlns='{DATA}' type='submit'><field var='FORM_TYPE' "
               f"type='hidden'><value>{PUBSUB}#publish-options</value></field>"
               "<field var='pubsub#no_such_option'><value>1</value></field></x>"
               "</publish-options>")
    reply = await alice.ask(iq("set", publish("n", "u") + unknown))
    assert (condition(reply), app_condition(reply)) == ("conflict", "precondition-not-met")
    assert "u" not in item_ids(ok(await alice.ask(iq("get", "<items node='n'/>"))))

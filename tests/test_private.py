"""Private XML storage (XEP-0049), over real sockets."""

from __future__ import annotations

from lxml import etree
from slixmpp.xmlstream import ElementBase

from server.modules import private as private_module
from tests.conftest import RunningServer
from tests.rawclient import condition

PRIVATE = "jabber:iq:private"
QUERY = f"{{{PRIVATE}}}query"


class Prefs(ElementBase):
    name = "prefs"
    namespace = "urn:example:prefs"
    plugin_attrib = "prefs"
    interfaces = {"colour"}
    sub_interfaces = interfaces






async def test_store_and_retrieve_with_slixmpp(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    alice = await server.client("alice@a.test", plugins=("xep_0049",))
    alice.plugin["xep_0049"].register(Prefs)
    prefs = Prefs()
    prefs["colour"] = "blue"
    await alice.plugin["xep_0049"].store(prefs)
    reply = await alice.plugin["xep_0049"].retrieve("prefs")
    assert reply["private"]["prefs"]["colour"] == "blue"

    # Another session of the same account sees it.
    other = await server.client("alice@a.test", resource="two", plugins=("xep_0049",))
    other.plugin["xep_0049"].register(Prefs)
    reply = await other.plugin["xep_0049"].retrieve("prefs")
    assert reply["private"]["prefs"]["colour"] == "blue"


async def test_keys_replacement_and_unknown(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    client = await server.raw_login("alice@a.test")
    # Unknown: the requested element comes back empty.
    reply = await client.ask(f"<iq type='get' id='g0'><query xmlns='{PRIVATE}'>"
                              "<a xmlns='urn:one'/></query></iq>")
    assert reply.get("type") == "result"
    stored = reply.find(f"{QUERY}/{{urn:one}}a")
    assert stored is not None and len(stored) == 0 and not stored.text
    # Two in one set; the key is (name, namespace).
    reply = await client.ask(f"<iq type='set' id='s1'><query xmlns='{PRIVATE}'>"
                              "<a xmlns='urn:one'><v>1</v></a><b xmlns='urn:one'><v>2</v></b>"
                              "<a xmlns='urn:two'><v>3</v></a></query></iq>")
    assert reply.get("type") == "result" and reply.get("id") == "s1"
    reply = await client.ask(f"<iq type='set' id='s2'><query xmlns='{PRIVATE}'>"
                              "<a xmlns='urn:one' x='y'><v>4</v></a></query></iq>")
    assert reply.get("type") == "result"
    for name, namespace, value in (("a", "urn:one", "4"), ("b", "urn:one", "2"),
                                   ("a", "urn:two", "3")):
        reply = await client.ask(f"<iq type='get' id='g'><query xmlns='{PRIVATE}'>"
                                  f"<{name} xmlns='{namespace}'/></query></iq>")
        item = reply.find(f"{QUERY}/{{{namespace}}}{name}")
        assert item is not None, etree.tostring(reply)
        assert item.findtext(f"{{{namespace}}}v") == value
        assert item.get("x") == ("y" if namespace == "urn:one" and name == "a" else None)
    await client.close()

    # Bob's storage is his own.
    bob = await server.raw_login("bob@a.test")
    reply = await bob.ask(f"<iq type='get' id='g'><query xmlns='{PRIVATE}'>"
                           "<a xmlns='urn:one'/></query></iq>")
    item = reply.find(f"{QUERY}/{{urn:one}}a")
    assert item is not None and len(item) == 0
    await bob.close()


async def test_errors(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    client = await server.raw_login("alice@a.test")
    cases = [
        # XEP-0049 §2.3: another user's data.
        (f"<iq type='get' id='e1' to='bob@a.test'><query xmlns='{PRIVATE}'>"
         "<a xmlns='urn:one'/></query></iq>", "forbidden"),
        (f"<iq type='set' id='e2' to='bob@a.test'><query xmlns='{PRIVATE}'>"
         "<a xmlns='urn:one'/></query></iq>", "forbidden"),
        # No child element.
        (f"<iq type='get' id='e3'><query xmlns='{PRIVATE}'/></iq>", "not-acceptable"),
        (f"<iq type='set' id='e4'><query xmlns='{PRIVATE}'/></iq>", "not-acceptable"),
        # Reserved namespaces (XEP-0049 §3).
        (f"<iq type='set' id='e5'><query xmlns='{PRIVATE}'><query xmlns='{PRIVATE}'/>"
         "</query></iq>", "not-acceptable"),
        (f"<iq type='set' id='e6'><query xmlns='{PRIVATE}'><x xmlns='jabber:server'/>"
         "</query></iq>", "not-acceptable"),
        (f"<iq type='get' id='e7'><query xmlns='{PRIVATE}'><x xmlns='jabber:client'/>"
         "</query></iq>", "not-acceptable"),
        # Too big.
        (f"<iq type='set' id='e8'><query xmlns='{PRIVATE}'><a xmlns='urn:big'>"
         f"{'x' * (private_module.MAX_ITEM_SIZE + 1)}</a></query></iq>", "not-acceptable"),
        # Not a query: no handler for it.
        (f"<iq type='get' id='e9'><other xmlns='{PRIVATE}'><a xmlns='urn:one'/></other></iq>",
         "bad-request"),
    ]
    for xml, expected in cases:
        reply = await client.ask(xml)
        assert condition(reply) == expected, xml[:80]
    # A set refused for one child stored none of them.
    reply = await client.ask(f"<iq type='set' id='m'><query xmlns='{PRIVATE}'>"
                              "<ok xmlns='urn:ok'/><x xmlns='jabber:client'/></query></iq>")
    assert condition(reply) == "not-acceptable"
    reply = await client.ask(f"<iq type='get' id='g'><query xmlns='{PRIVATE}'>"
                              "<ok xmlns='urn:ok'><v/></ok></query></iq>")
    assert len(reply.find(f"{QUERY}/{{urn:ok}}ok")) == 0
    reply = await client.ask("<iq type='get' id='d' to='a.test'>"
                              "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    features = {f.get("var") for f in reply.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert PRIVATE in features
    await client.close()

"""PEP (XEP-0163) and pubsub.<domain> (XEP-0060) in a cluster (issue 22 item 4): the state
is in the shared database, notifications cross nodes, caches are dropped across nodes.

Two nodes of a.test with a private PostgreSQL and Redis (tests/test_cluster.py's fixture)."""

from __future__ import annotations

from lxml import etree

from tests.conftest import RunningServer
from tests.redis import redis_server, redis_url  # noqa: F401 (fixtures)
from tests.test_cluster import (  # noqa: F401 (the nodes fixture)
    ALICE,
    BOB,
    eventually,
    nodes,
    sees,
)
from tests.test_pep import (
    CAPS,
    DISCO,
    EVENT,
    PUBSUB,
    ask,
    friends,
    next_event,
    no_event,
    online_with_caps,
    publish,
    wait_caps,
)

NICK = "http://jabber.org/protocol/nick"
SERVICE = "pubsub.a.test"


async def test_pep_notification_and_last_item_across_nodes(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    one, two = nodes
    await one.add_user("carol@a.test")
    await friends(one, ALICE, BOB)
    await friends(one, ALICE, "carol@a.test")
    alice = await one.raw_login(ALICE, "pc")
    await alice.send("<presence/>")
    # Bob on node2, interested in nicks (XEP-0115 caps verified there). His coming online
    # makes node2 read Alice's nodes (none yet) for the last items (§4.3.2).
    bob = await two.raw_login(BOB, "b1")
    ver = await online_with_caps(bob, [DISCO, CAPS, f"{NICK}+notify"])
    await wait_caps(two, ver)
    # Carol on node2: a contact without +notify gets nothing.
    carol = await two.raw_login("carol@a.test", "c1")
    await online_with_caps(carol, [DISCO, CAPS])
    await eventually(sees(one, f"{BOB}/b1"), "node1 sees bob available")
    await eventually(sees(one, "carol@a.test/c1"), "node1 sees carol available")
    # Alice publishes on node1: bob's resource on node2 is notified (XEP-0163 §4.3), and her
    # own resource.
    reply = await ask(alice, publish(NICK, f"<nick xmlns='{NICK}'>Alice</nick>", "n1"))
    assert reply.get("type") == "result", etree.tostring(reply)
    for client in (bob, alice):
        message = await next_event(client)
        assert message.get("from") == ALICE
        got = message.find(f"{{{EVENT}}}event/{{{EVENT}}}items")
        assert got is not None and got.get("node") == NICK
        assert got.findtext(f"{{{EVENT}}}item/{{{NICK}}}nick") == "Alice"
    assert message.get("to") == f"{ALICE}/pc"
    await no_event(carol)
    # A late subscriber on node2: a second resource of bob comes online with the known caps
    # and gets the last item, read from the shared database (node2's copy of Alice's nodes,
    # read before the node existed, was dropped when node1 created it).
    bob2 = await two.raw_login(BOB, "b2")
    await bob2.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' ver='{ver}'/>"
                    "</presence>")
    last = await next_event(bob2)
    assert last.get("to") == f"{BOB}/b2"
    assert last.findtext(f".//{{{NICK}}}nick") == "Alice"
    # A newer item published on node1: node2, which kept the newest item of the node in
    # memory when it sent it to b2, hears of it; the next resource to come online there gets
    # the new one.
    reply = await ask(alice, publish(NICK, f"<nick xmlns='{NICK}'>Alicia</nick>", "n2"))
    assert reply.get("type") == "result", etree.tostring(reply)
    for client in (bob, bob2):
        assert (await next_event(client)).findtext(f".//{{{NICK}}}nick") == "Alicia"
    bob3 = await two.raw_login(BOB, "b3")
    await bob3.send(f"<presence><c xmlns='{CAPS}' hash='sha-1' node='urn:test' ver='{ver}'/>"
                    "</presence>")
    last = await next_event(bob3)
    assert (last.get("to"), last.findtext(f".//{{{NICK}}}nick")) == (f"{BOB}/b3", "Alicia")
    # Retract on node1 (notify_retract): bob's resources on node2 hear it.
    reply = await ask(alice, f"<iq type='set' id='r1'><pubsub xmlns='{PUBSUB}'>"
                      f"<retract node='{NICK}'><item id='n2'/></retract></pubsub></iq>")
    assert reply.get("type") == "result"
    for client in (bob, bob2, bob3):
        retract = (await next_event(client)).find(f".//{{{EVENT}}}retract")
        assert retract is not None and retract.get("id") == "n2"
    for client in (alice, bob, bob2, bob3, carol):
        await client.close()


async def test_pubsub_service_subscription_on_another_node(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    """pubsub.a.test: the node made on node1, the subscription on node2; node1's copy of the
    service's nodes is dropped, so its next publish reaches the subscriber on node2."""
    one, two = nodes
    alice = await one.raw_login(ALICE, "pc")
    await alice.send("<presence/>")
    bob = await two.raw_login(BOB, "b1")
    await bob.send("<presence/>")
    # (node1 must know bob's session: a headline to a full JID it does not know is dropped,
    # RFC 6121 §8.5.3.2.1; the directory's replica follows a bind within milliseconds.)
    await eventually(sees(one, f"{BOB}/b1"), "node1 sees bob")
    reply = await ask(alice, f"<iq type='set' id='c1' to='{SERVICE}'><pubsub xmlns='{PUBSUB}'>"
                      "<create node='news'/></pubsub></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    reply = await ask(alice, f"<iq type='set' id='p0' to='{SERVICE}'><pubsub xmlns='{PUBSUB}'>"
                      "<publish node='news'><item id='i0'><entry xmlns='urn:test'>zero</entry>"
                      "</item></publish></pubsub></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    reply = await ask(bob, f"<iq type='set' id='s1' to='{SERVICE}'><pubsub xmlns='{PUBSUB}'>"
                      f"<subscribe node='news' jid='{BOB}/b1'/></pubsub></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    subscription = reply.find(f".//{{{PUBSUB}}}subscription")
    assert subscription is not None and subscription.get("subscription") == "subscribed"
    reply = await ask(alice, f"<iq type='set' id='p1' to='{SERVICE}'><pubsub xmlns='{PUBSUB}'>"
                      "<publish node='news'><item id='i1'><entry xmlns='urn:test'>one</entry>"
                      "</item></publish></pubsub></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    while True:
        message = await next_event(bob)
        if message.find(f".//{{{EVENT}}}item[@id='i1']") is not None:
            break
    assert message.get("from") == SERVICE and message.get("to") == f"{BOB}/b1"
    assert message.findtext(".//{urn:test}entry") == "one"
    for client in (alice, bob):
        await client.close()

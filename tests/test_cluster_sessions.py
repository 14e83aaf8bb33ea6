"""Sessions across the nodes of a cluster (issue 22 items 2 and 4): caches that modules keep per
account dropped on every node when the account changes on one, XEP-0198 resumption on another
node than the one the session was on, carbons and CSI with the resources on different nodes.
Two in-process Servers for a.test on 127.0.0.1 and 127.0.0.2 with a private Redis and
PostgreSQL, clients over real sockets (tests/test_cluster.py has the fixtures)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
import redis.asyncio
from lxml import etree

from server.cluster import keys
from server.jid import JID
from tests.conftest import RunningServer
from tests.rawclient import CLIENT, RawClient, sync
from tests.redis import redis_server, redis_url  # noqa: F401 (fixtures)
from tests.test_carbons import CARBONS, archive_ids, carbon, login, stanza_ids
from tests.test_cluster import ALICE, BOB, MESSAGE, eventually, nodes, raw_available, sees  # noqa: F401
from tests.test_csi import ACTIVE, INACTIVE, describe, until_held
from tests.test_presence import next_presence, roster_of, subscribe_both
from tests.test_sasl2 import B2, S2, ping, q, scram_sasl2
from tests.test_stream_management import SM, bodies, drop, read_all, resume, sm_login, tag

CAROL = "carol@a.test"
IQ = f"{{{CLIENT}}}iq"
BLOCKING = "urn:xmpp:blocking"
ROSTER = "jabber:iq:roster"


async def next_message(client: RawClient, timeout: float = 5.0) -> etree._Element:
    return await client.next_of("message", timeout)


async def test_a_block_on_one_node_stops_delivery_on_the_other(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    """bob blocks alice from his resource on node2; his resource on node1 gets nothing more
    from alice at once (XEP-0191 §3.3): node1 dropped its cached copy of bob's blocklist."""
    one, two = nodes
    await one.add_user(CAROL)
    phone = await raw_available(one, BOB, "phone")
    desk = await raw_available(two, BOB, "desk")
    alice = await raw_available(one, ALICE, "laptop")
    carol = await raw_available(one, CAROL, "pc")
    await eventually(sees(one, f"{BOB}/desk"), "node1 sees bob/desk")
    await eventually(sees(two, f"{BOB}/phone"), "node2 sees bob/phone")
    # Before: node1 has bob's (empty) blocklist cached and delivers.
    await alice.send(f"<message to='{BOB}/phone' type='chat' id='before'><body>1</body>"
                     "</message>")
    assert (await next_message(phone)).get("id") == "before"
    # Both resources asked for the blocklist (XEP-0191 §3.2), so both get the push (and for
    # the roster: a resource on another node counts as interested when it did).
    for client in (phone, desk):
        await client.ask(f"<iq type='get' id='r'><query xmlns='{ROSTER}'/></iq>",
                         skip_others=True)
        answer = await client.ask(f"<iq type='get' id='bl'><blocklist xmlns='{BLOCKING}'/></iq>",
                                  skip_others=True)
        assert answer.get("type") == "result"
    answer = await desk.ask(f"<iq type='set' id='b1'><block xmlns='{BLOCKING}'>"
                            f"<item jid='{ALICE}'/></block></iq>", skip_others=True)
    assert answer.get("type") == "result"
    for client in (desk, phone):  # XEP-0191 §3.3: the push to every interested resource
        push = await client.next_of("iq")
        assert push.find(f"{{{BLOCKING}}}block/{{{BLOCKING}}}item").get("jid") == ALICE
    # alice's message to bob's node1 resource is not delivered; carol's, sent after, is.
    await alice.send(f"<message to='{BOB}/phone' type='chat' id='after'><body>2</body>"
                     "</message>")
    await carol.send(f"<message to='{BOB}/phone' type='chat' id='carol'><body>3</body>"
                     "</message>")
    assert (await next_message(phone)).get("id") == "carol"
    # Unblocked on node2: node1 delivers again.
    answer = await desk.ask(f"<iq type='set' id='u1'><unblock xmlns='{BLOCKING}'>"
                            f"<item jid='{ALICE}'/></unblock></iq>", skip_others=True)
    assert answer.get("type") == "result"
    await phone.next_of("iq")  # the unblock push
    await desk.next_of("iq")
    await alice.send(f"<message to='{BOB}/phone' type='chat' id='again'><body>4</body>"
                     "</message>")
    got = await next_message(phone)
    while got.get("type") == "error":  # the bounce of 'after' is alice's, not bob's
        got = await next_message(phone)
    assert got.get("id") == "again"
    for client in (phone, desk, alice, carol):
        await client.close()


async def test_a_roster_change_on_one_node_is_seen_on_the_other(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    one, two = nodes
    laptop = await raw_available(one, ALICE, "laptop")
    phone = await raw_available(two, ALICE, "phone")
    await eventually(sees(two, f"{ALICE}/laptop"), "node2 sees alice/laptop")
    # Both fetch the roster: each node now has alice's (empty) roster cached, and both
    # resources are interested (RFC 6121 §2.1.6).
    for client in (laptop, phone):
        answer = await client.ask(f"<iq type='get' id='r0'><query xmlns='{ROSTER}'/></iq>",
                                  skip_others=True)
        assert answer.find(f"{{{ROSTER}}}query/{{{ROSTER}}}item") is None
    # The interest reaches node1 through the directory (published when the roster was asked).
    await eventually(lambda: getattr(one.server.sessions.get(JID.parse(f"{ALICE}/phone")),
                                     "interested", False), "node1 knows alice/phone's interest")
    answer = await laptop.ask(f"<iq type='set' id='r1'><query xmlns='{ROSTER}'>"
                              f"<item jid='{BOB}' name='Bob'/></query></iq>", skip_others=True)
    assert answer.get("type") == "result"
    push = await phone.next_of("iq")  # RFC 6121 §2.1.6: the push reaches node2
    assert push.find(f"{{{ROSTER}}}query/{{{ROSTER}}}item").get("jid") == BOB
    # node2 reads the roster afresh, not its stale copy.
    answer = await phone.ask(f"<iq type='get' id='r2'><query xmlns='{ROSTER}'/></iq>",
                             skip_others=True)
    items = answer.findall(f"{{{ROSTER}}}query/{{{ROSTER}}}item")
    assert [(i.get("jid"), i.get("name")) for i in items] == [(BOB, "Bob")]
    for client in (laptop, phone):
        await client.close()


async def mutual_subscription(one: RawClient, two: RawClient, node_one: RunningServer,
                              node_two: RunningServer) -> None:
    """bob (client one, on node_one) and alice (two, on node_two) subscribed both ways."""
    await roster_of(one)
    await roster_of(two)
    # RFC 6121 §3.1.3: requests go to resources that asked for the roster; that interest
    # reaches the other node through the directory.
    for node, jid in ((node_one, two.jid), (node_two, one.jid)):  # type: ignore[attr-defined]
        await eventually(lambda n=node, j=jid: getattr(n.server.sessions.get(JID.parse(j)),
                                                         "interested", False), f"{jid} known")
    await one.send("<presence/>")
    await subscribe_both(None, one, two, BOB, ALICE)  # type: ignore[arg-type]


async def test_resumption_on_the_other_node_moves_the_session(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    """XEP-0198 §5 across nodes: alice's session on node1 loses its TCP connection and is
    resumed on node2 with its previd. What she had not acknowledged and what came while she
    was away arrive once each, h goes on from where it was, bob never sees her unavailable."""
    one, two = nodes
    alice, previd = await sm_login(one)
    await alice.send("<presence/>")
    await next_presence(alice, None, ALICE)
    bob = await two.raw_login(BOB, "pc")
    await eventually(sees(two, f"{ALICE}/phone"), "node2 sees alice/phone")
    await mutual_subscription(bob, alice, two, one)
    so_far = await read_all(alice)
    for n in range(1, 4):
        await bob.send(f"<message to='{ALICE}' type='chat'><body>m{n}</body></message>")
    assert await bodies(alice, 3) == ["m1", "m2", "m3"]
    # Only m1 was processed: acknowledged; the server's count of ours, asked for.
    await alice.send(f"<a xmlns='{SM}' h='{so_far + 1}'/>")
    await alice.send(f"<r xmlns='{SM}'/>")
    while (el := await alice.next()).tag != tag("a"):
        pass
    handled = el.get("h")
    drop(alice)
    await eventually(lambda: one.server.sessions.local(JID.parse(f"{ALICE}/phone"))  # type: ignore[attr-defined]
                     .transport is None, "node1 noticed the drop")
    # Detached on node1: still available to bob, and messages for it are queued there.
    for n in range(4, 6):
        await bob.send(f"<message to='{ALICE}' type='chat'><body>m{n}</body></message>")
    await asyncio.sleep(0.3)
    stale = two.server.sessions.get(JID.parse(f"{ALICE}/phone"))  # node2's proxy, to node1
    assert stale is not None and stale.remote
    new, answer = await resume(two, previd, so_far + 1)
    assert answer.tag == tag("resumed") and answer.get("previd") == previd, \
        etree.tostring(answer)
    assert answer.get("h") == handled  # what node1 had handled of alice's
    assert await bodies(new, 4) == ["m2", "m3", "m4", "m5"]
    # The session is node2's now, and only node2's.
    assert type(two.server.sessions.get(JID.parse(f"{ALICE}/phone"))).__name__ == "Session"
    assert one.server.sessions.local(JID.parse(f"{ALICE}/phone")) is None  # type: ignore[attr-defined]
    await eventually(sees(one, f"{ALICE}/phone"), "node1 sees alice/phone on node2")
    # A stanza routed to node1 by a node that did not know yet: node1 forwards it.
    stale.send(etree.fromstring(f"<message xmlns='{CLIENT}' type='chat' from='{BOB}/pc' "
                                f"to='{ALICE}/phone'><body>late</body></message>"))
    assert await bodies(new, 1) == ["late"]
    # It goes on: both ways, counted from where it was; no duplicate, no unavailable.
    await bob.send(f"<message to='{ALICE}/phone' type='chat'><body>m6</body></message>")
    assert await bodies(new, 1) == ["m6"]
    await new.send(f"<message to='{BOB}' type='chat'><body>back</body></message>")
    await new.send(f"<r xmlns='{SM}'/>")
    while (el := await new.next()).tag != tag("a"):
        assert el.tag != MESSAGE, etree.tostring(el)  # nothing delivered twice
    assert int(el.get("h", "")) == int(handled or 0) + 1
    while True:
        el = await bob.next(5)
        assert not (el.tag == f"{{{CLIENT}}}presence" and el.get("type") == "unavailable"), \
            "bob saw alice go"
        if el.tag == MESSAGE:
            assert (el.findtext(f"{{{CLIENT}}}body"), el.get("from")) == ("back", f"{ALICE}/phone")
            break
    # The id now names node2's session: another account cannot use it, an unknown one fails.
    _stranger, answer = await resume(one, previd, 0, jid=BOB)
    assert answer.tag == tag("failed")
    _other, answer = await resume(one, "no-such-id", 0)
    assert answer.find("{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found") is not None
    for client in (new, bob):
        await client.close()


async def test_sasl2_inline_resumption_on_the_other_node_moves_the_session(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    """XEP-0388 §2.6 with XEP-0198 §5 inline, across nodes: alice enables resumable SM in
    Bind 2 on node1, loses her TCP connection, and resumes inside SASL2's <authenticate/> on
    node2. <success/> carries <resumed/> (no <bound/>: XEP-0386), the session moves as with
    <resume/> (server/cluster/handover.py): what she had not acknowledged and what came while
    she was away arrive once each, after <success/>; it goes on from node2."""
    one, two = nodes
    alice = await one.raw()
    success, _after = await scram_sasl2(
        alice, bind=f"<tag>Test</tag><enable xmlns='{SM}' resume='true'/>")
    jid = success.findtext(q(S2, "authorization-identifier")) or ""
    enabled = success.find(f"{q(B2, 'bound')}/{q(SM, 'enabled')}")
    assert enabled is not None and enabled.get("resume") == "true", etree.tostring(success)
    previd = enabled.get("id")
    await alice.send("<presence/>")
    await next_presence(alice, None, ALICE)
    bob = await two.raw_login(BOB, "pc")
    await eventually(sees(two, jid), "node2 sees alice's session on node1")
    await bob.send(f"<message to='{jid}' type='chat'><body>one</body></message>")
    assert (await alice.next_of("message")).findtext(f"{{{CLIENT}}}body") == "one"
    drop(alice)  # nothing acknowledged
    await eventually(lambda: one.server.sessions.local(JID.parse(jid))  # type: ignore[attr-defined]
                     .transport is None, "node1 noticed the drop")
    await bob.send(f"<message to='{jid}' type='chat'><body>two</body></message>")
    await asyncio.sleep(0.3)  # queued on node1, for the detached session
    back = await two.raw()
    success, _after = await scram_sasl2(
        back, bind="<tag>Test</tag>", extra=f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    resumed = success.find(q(SM, "resumed"))
    assert resumed is not None and resumed.get("previd") == previd, etree.tostring(success)
    assert success.findtext(q(S2, "authorization-identifier")) == jid
    assert success.find(q(B2, "bound")) is None
    assert await bodies(back, 2) == ["one", "two"]
    # The session is node2's now, and only node2's; it goes on from there, once.
    assert type(two.server.sessions.get(JID.parse(jid))).__name__ == "Session"
    assert one.server.sessions.local(JID.parse(jid)) is None  # type: ignore[attr-defined]
    await bob.send(f"<message to='{jid}' type='chat'><body>three</body></message>")
    assert await bodies(back, 1) == ["three"]
    await back.send(f"<r xmlns='{SM}'/>")
    while (el := await back.next()).tag != tag("a"):
        assert el.tag != MESSAGE, etree.tostring(el)  # nothing delivered twice
    # The same id resumes nothing on node1 any more (it names node2's session, now bound).
    again = await one.raw()
    success, _after = await scram_sasl2(
        again, bind="<tag>Other</tag>", extra=f"<resume xmlns='{SM}' previd='no-such-id' h='0'/>")
    failed = success.find(q(SM, "failed"))
    assert failed is not None and failed.find(
        "{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found") is not None
    for client in (back, bob, again):
        await client.close()


async def archived(client: RawClient, ident: str, count: int) -> dict[str, str]:
    for attempt in range(50):
        found = await archive_ids(client, f"{ident}{attempt}")
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    return found


def carbons_on(node: RunningServer, jid: str) -> Callable[[], bool]:
    """The node knows that the session jid on another node has carbons on."""
    def check() -> bool:
        session = node.server.sessions.get(JID.parse(jid))
        return session is not None and session.remote and CARBONS in session.flags
    return check


async def test_carbons_between_resources_on_different_nodes(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    """XEP-0280 with each account's two resources on different nodes: <sent/> and <received/>
    copies cross the nodes, each with its own account's archive id (XEP-0359 §3), matching
    what the account's archive (one database) returns."""
    one, two = nodes
    bob_phone = await login(one, BOB, "phone")
    bob_laptop = await login(two, BOB, "laptop")
    alice_phone = await login(two, ALICE, "phone")
    alice_laptop = await login(one, ALICE, "laptop")
    for node, jid in ((one, f"{BOB}/laptop"), (two, f"{BOB}/phone"),
                      (one, f"{ALICE}/phone"), (two, f"{ALICE}/laptop")):
        await eventually(carbons_on(node, jid), f"{jid}'s carbons known on the other node")
    # bob/phone (node1) -> alice's bare JID: bob/laptop (node2) gets <sent/>, alice's two
    # resources (one per node) the message itself.
    await bob_phone.send(f"<message to='{ALICE}' type='chat' id='b1'><body>from bob</body>"
                         "</message>")
    sent = carbon(await next_message(bob_laptop), "sent")
    assert sent.get("id") == "b1"
    live = [await next_message(alice_phone), await next_message(alice_laptop)]
    for copy in live:
        assert copy.get("id") == "b1" and copy.find(f"{{{CARBONS}}}received") is None
    alice_ids = {stanza_ids(copy)[0] for copy in live}
    assert [by for by, _ in alice_ids] == [ALICE], alice_ids
    [(by, bob_sent_id)] = stanza_ids(sent)
    assert by == BOB, etree.tostring(sent)
    # alice/laptop (node1) -> bob/phone (node1): bob/laptop (node2) gets <received/>,
    # alice/phone (node2) <sent/>.
    await alice_laptop.send(f"<message to='{BOB}/phone' type='chat' id='a1'>"
                            "<body>from alice</body></message>")
    direct = await next_message(bob_phone)
    received = carbon(await next_message(bob_laptop), "received")
    alice_sent = carbon(await next_message(alice_phone), "sent")
    assert direct.get("id") == received.get("id") == alice_sent.get("id") == "a1"
    [(by, bob_received_id)] = stanza_ids(received)
    assert by == BOB and stanza_ids(direct) == [(BOB, bob_received_id)]
    [(by, alice_sent_id)] = stanza_ids(alice_sent)
    assert by == ALICE
    # The one database's archive, queried on node2 (node1 archived them: once its group
    # commit is in, which a query on node2 cannot wait for, hence the polling).
    bob_archive = await archived(bob_laptop, "bq", 2)
    alice_archive = await archived(alice_phone, "aq", 2)
    assert bob_archive == {"from bob": bob_sent_id, "from alice": bob_received_id}
    assert alice_archive == {"from bob": alice_ids.pop()[1], "from alice": alice_sent_id}
    assert not set(bob_archive.values()) & set(alice_archive.values())
    # Disabled on node2: node1 copies to it no more (a message, then a marker behind it).
    reply = await alice_phone.ask(f"<iq type='set' id='d1'><disable xmlns='{CARBONS}'/></iq>",
                                  skip_others=True)
    assert reply.get("type") == "result"
    await eventually(lambda: not carbons_on(one, f"{ALICE}/phone")(), "node1 sees it off")
    await alice_laptop.send(f"<message to='{BOB}/phone' type='chat' id='a2'><body>2</body>"
                            "</message>")
    await next_message(bob_phone)
    await bob_phone.send(f"<message to='{ALICE}/phone' type='chat' id='mark'><body>m</body>"
                         "</message>")
    assert (await next_message(alice_phone)).get("id") == "mark"
    for client in (bob_phone, bob_laptop, alice_phone, alice_laptop):
        await client.close()


async def test_csi_holds_presence_from_the_other_node_until_active(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    """XEP-0352 on node2 for presence that contacts on node1 send: held while inactive (only
    the latest per contact), delivered on <active/>."""
    one, two = nodes
    bob = await raw_available(two, BOB, "desk")
    alice = await raw_available(one, ALICE, "laptop")
    await eventually(sees(one, f"{BOB}/desk"), "node1 sees bob/desk")
    await mutual_subscription(bob, alice, two, one)
    await sync(bob)
    await sync(alice)
    await bob.send(INACTIVE)
    await sync(bob)
    await alice.send("<presence><show>away</show></presence>")
    await alice.send("<presence><show>dnd</show></presence>")
    await until_held(two, f"{BOB}/desk", 1)  # the later replaced the earlier
    await asyncio.sleep(0.2)
    await until_held(two, f"{BOB}/desk", 1)  # and nothing went out (an iq would flush it)
    await bob.send(ACTIVE)
    assert [describe(el) for el in await sync(bob)] == [f"presence:{ALICE}:dnd"]
    for client in (bob, alice):
        await client.close()


async def test_bind2_device_resource_is_the_same_on_every_node(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    """XEP-0386 §3.2: one client installation (its SASL2 user-agent id) gets the same resource
    on any node, and binding it on node2 ends its earlier session on node1 (RFC 6120
    §7.7.2.2, settled in the directory)."""
    one, two = nodes
    first = await one.raw()
    success, _after = await scram_sasl2(first)
    jid = success.findtext(q(S2, "authorization-identifier")) or ""
    assert jid.startswith(f"{ALICE}/Test/")
    await eventually(sees(two, jid, available=False), "node2 knows the session")
    again = await two.raw()
    success, _after = await scram_sasl2(again)
    assert success.findtext(q(S2, "authorization-identifier")) == jid
    assert await first.stream_error(10) == "conflict"
    await ping(again)
    await eventually(sees(one, jid, available=False), "node1 names node2's session")
    await again.close()


async def test_archive_preferences_changed_on_one_node_apply_on_the_other(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    """XEP-0313 §6: alice says 'never' from node2; node1, which archives what bob sends her
    there, follows at once (its cached preferences dropped)."""
    one, two = nodes
    laptop = await raw_available(one, ALICE, "laptop")
    phone = await raw_available(two, ALICE, "phone")
    bob = await raw_available(one, BOB, "pc")
    await bob.send(f"<message to='{ALICE}/laptop' type='chat'><body>first</body></message>")
    await next_message(laptop)
    assert set(await archived(phone, "a0", 1)) == {"first"}  # node1 has her prefs cached now
    answer = await phone.ask("<iq type='set' id='p1'><prefs xmlns='urn:xmpp:mam:2' "
                             "default='never'/></iq>", skip_others=True)
    assert answer.get("type") == "result"  # answered once every node was told
    await bob.send(f"<message to='{ALICE}/laptop' type='chat'><body>secret</body></message>")
    await next_message(laptop)
    # bob's archive has it (the same write on node1 as alice's would be); alice's does not.
    assert set(await archived(bob, "b0", 2)) == {"first", "secret"}
    assert set(await archive_ids(phone, "a1")) == {"first"}
    for client in (laptop, phone, bob):
        await client.close()


async def test_a_change_is_answered_only_after_every_node_dropped_its_copy(
        nodes: tuple[RunningServer, RunningServer], redis_url: str,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """The answer to a change waits for each other node's acknowledgement (after its forget):
    a subscriber that hears the change and never acknowledges it (a node that hangs) holds the
    answer for the whole wait, which is then logged; the two real nodes alone answer at once."""
    _one, two = nodes
    phone = await raw_available(two, ALICE, "phone")
    loop = asyncio.get_running_loop()

    async def set_prefs(ident: str, default: str) -> float:
        started = loop.time()
        answer = await phone.ask(f"<iq type='set' id='{ident}'><prefs xmlns='urn:xmpp:mam:2' "
                                 f"default='{default}'/></iq>", skip_others=True)
        assert answer.get("type") == "result"
        return loop.time() - started

    assert await set_prefs("p1", "never") < 1.5  # node1 acknowledged
    silent = redis.asyncio.from_url(redis_url)
    listener = silent.pubsub()
    await listener.subscribe(keys.INVALIDATE)
    try:
        caplog.set_level(logging.WARNING, logger="presenced")
        assert await set_prefs("p2", "always") >= 1.5  # waited for the silent one
        assert any("event=cluster-ack-timeout missing=1" in r.getMessage()
                   for r in caplog.records)
    finally:
        await listener.aclose()
        await silent.aclose()
    await phone.close()

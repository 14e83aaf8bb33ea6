"""XEP-0198 Stream Management over real sockets: counting, server-side <r/>, resumption on the
same and the other listener, and nothing lost when a session is not resumed — with raw bytes
(the wire as the XEP writes it) and with slixmpp's xep_0198 plugin through TCP drops."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest
import slixmpp
from lxml import etree

from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.rawclient import CLIENT, RawClient
from tests.test_presence import next_presence

SM = "urn:xmpp:sm:3"
ENABLE = f"<enable xmlns='{SM}' resume='true'/>"


def tag(name: str) -> str:
    return f"{{{SM}}}{name}"


@pytest.fixture
async def sm_server(tmp_path: Path) -> RunningServer:
    running = await start_server(tmp_path, "[stream_management]\nresume_timeout = 2\n"
                                           "max_unacked = 3\n")
    await running.add_user("alice@a.test")
    await running.add_user("bob@a.test")
    yield running  # type: ignore[misc]
    await stop_server(running)


async def sm_login(running: RunningServer, jid: str = "alice@a.test",
                   resource: str = "phone", *, direct_tls: bool = False,
                   resume: bool = True) -> tuple[RawClient, str]:
    """A raw client logged in with SM enabled; returns (client, SM id)."""
    user, domain = jid.split("@")
    client = await running.raw(direct_tls=direct_tls)
    await client.authenticate(domain, user, PASSWORD)
    features = await client.open(domain)
    assert features.find(tag("sm")) is not None  # XEP-0198 §2: offered after authentication
    await client.send(f"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                      f"<resource>{resource}</resource></bind></iq>")
    bound = await client.expect(f"{{{CLIENT}}}iq")
    client.jid = bound.findtext(".//{urn:ietf:params:xml:ns:xmpp-bind}jid")  # type: ignore[attr-defined]
    await client.send(ENABLE if resume else f"<enable xmlns='{SM}'/>")
    enabled = await client.expect(tag("enabled"))
    count_stanzas(client)
    if resume:
        assert enabled.get("resume") == "true" and enabled.get("max", "").isdigit()
    return client, enabled.get("id", "")


async def resume(running: RunningServer, previd: str, h: int, *, direct_tls: bool = False,
                 jid: str = "alice@a.test") -> tuple[RawClient, etree._Element]:
    user, domain = jid.split("@")
    client = await running.raw(direct_tls=direct_tls)
    await client.authenticate(domain, user, PASSWORD)
    await client.open(domain)
    await client.send(f"<resume xmlns='{SM}' previd='{previd}' h='{h}'/>")
    return client, await client.next()


async def bodies(client: RawClient, count: int) -> list[str]:
    out = []
    while len(out) < count:
        el = await client.next(10)
        if el.tag == f"{{{CLIENT}}}message":
            out.append(el.findtext(f"{{{CLIENT}}}body") or "")
    return out


def count_stanzas(client: RawClient) -> None:
    """From now on client.sm_count is how many stanzas we have read (what our h would be)."""
    client.sm_count = 0  # type: ignore[attr-defined]
    original = client.next

    async def counted_next(timeout: float = 5.0) -> etree._Element:
        el = await original(timeout)
        if etree.QName(el).namespace == CLIENT:
            client.sm_count += 1  # type: ignore[attr-defined]
        return el
    client.next = counted_next  # type: ignore[method-assign]


async def read_all(client: RawClient) -> int:
    """Read what the server sent so far (up to a ping's answer); returns sm_count."""
    await client.send("<iq type='get' id='flush' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    while (await client.next()).get("id") != "flush":
        pass
    return int(client.sm_count)  # type: ignore[attr-defined]


def drop(client: RawClient) -> None:
    """The network goes away: no </stream:stream>, no TCP FIN from the application."""
    client.writer.transport.abort()


async def test_acks_count_stanzas_and_the_server_asks(sm_server: RunningServer) -> None:
    alice, _ = await sm_login(sm_server)
    # h counts the stanzas the server handled from us, not nonzas (XEP-0198 §4).
    await alice.send(f"<r xmlns='{SM}'/>")
    a = await alice.expect(tag("a"))
    assert a.get("h") == "0"
    await alice.send("<presence/>")
    await alice.send("<iq type='get' id='p1' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    await alice.send(f"<r xmlns='{SM}'/>")
    seen = [await alice.next() for _ in range(3)]  # own presence, pong, <a/>
    assert seen[-1].tag == tag("a") and seen[-1].get("h") == "2", [e.tag for e in seen]
    # The server asks once max_unacked (3) stanzas are unacknowledged: we had 2.
    bob, _ = await sm_login(sm_server, "bob@a.test", "pc", resume=False)
    await bob.send("<message to='alice@a.test/phone' type='chat'><body>1</body></message>")
    got = await alice.next()
    assert got.findtext(f"{{{CLIENT}}}body") == "1"
    request = await alice.next()
    assert request.tag == tag("r")
    await alice.send(f"<a xmlns='{SM}' h='3'/>")
    # Acknowledging more than was sent ends the stream (handled-count-too-high).
    await alice.send(f"<a xmlns='{SM}' h='9'/>")
    assert await alice.stream_error() == "undefined-condition"


async def test_enable_rules(sm_server: RunningServer) -> None:
    client = await sm_server.raw()
    await client.authenticate("a.test", "alice", PASSWORD)
    await client.open("a.test")
    await client.send(ENABLE)  # XEP-0198 §3: before binding
    failed = await client.expect(tag("failed"))
    assert failed.find("{urn:ietf:params:xml:ns:xmpp-stanzas}unexpected-request") is not None
    alice, _ = await sm_login(sm_server)
    await alice.send(ENABLE)  # twice
    failed = await alice.expect(tag("failed"))
    assert failed.find("{urn:ietf:params:xml:ns:xmpp-stanzas}unexpected-request") is not None
    # An unknown previd: <failed/>, and the stream may bind a new resource instead.
    other, answer = await resume(sm_server, "no-such-id", 0)
    assert answer.tag == tag("failed")
    assert answer.find("{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found") is not None
    await other.send("<iq type='set' id='b2'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"
                     "</iq>")
    bound = await other.expect(f"{{{CLIENT}}}iq")
    assert bound.get("type") == "result"


@pytest.mark.parametrize("direct_tls", [False, True], ids=["same-listener", "other-listener"])
async def test_resume_redelivers_exactly_the_unacked(sm_server: RunningServer,
                                                     direct_tls: bool) -> None:
    alice, previd = await sm_login(sm_server)
    await alice.send("<presence/>")
    await next_presence(alice, None, "alice@a.test")
    bob = await sm_server.raw_login("bob@a.test", "pc")
    await subscribe(bob, alice)
    so_far = await read_all(alice)
    for n in range(1, 4):
        await bob.send(f"<message to='alice@a.test' type='chat'><body>m{n}</body></message>")
    assert await bodies(alice, 3) == ["m1", "m2", "m3"]
    # Only m1 was processed by the app: acknowledge up to it.
    await alice.send(f"<a xmlns='{SM}' h='{so_far + 1}'/>")
    await alice.send(f"<r xmlns='{SM}'/>")
    while (el := await alice.next()).tag != tag("a"):
        pass
    handled = el.get("h")
    drop(alice)
    await asyncio.sleep(0.2)
    # Detached: still available to contacts, and messages for it are queued.
    for n in range(4, 6):
        await bob.send(f"<message to='alice@a.test' type='chat'><body>m{n}</body></message>")
    new, answer = await resume(sm_server, previd, so_far + 1, direct_tls=direct_tls)
    assert answer.tag == tag("resumed") and answer.get("previd") == previd
    assert answer.get("h") == handled  # what the server had handled of ours
    assert await bodies(new, 4) == ["m2", "m3", "m4", "m5"]
    # The session goes on: messages both ways, and no unavailable presence ever reached bob.
    await new.send("<message to='bob@a.test' type='chat'><body>back</body></message>")
    while True:
        el = await bob.next(5)
        assert not (el.tag == f"{{{CLIENT}}}presence" and el.get("type") == "unavailable")
        if el.tag == f"{{{CLIENT}}}message":
            assert el.findtext(f"{{{CLIENT}}}body") == "back"
            assert el.get("from") == "alice@a.test/phone"
            break
    # The old previd cannot be used by another account.
    _stranger, answer = await resume(sm_server, previd, 0, jid="bob@a.test")
    assert answer.tag == tag("failed")


async def test_not_resumed_in_time_loses_nothing(sm_server: RunningServer) -> None:
    alice, _ = await sm_login(sm_server)
    await alice.send("<presence/>")
    await next_presence(alice, None, "alice@a.test")
    bob = await sm_server.raw_login("bob@a.test", "pc")
    await subscribe(bob, alice)
    await bob.send("<message to='alice@a.test' type='chat'><body>kept 1</body></message>")
    await bob.send("<iq type='get' id='q1' to='alice@a.test/phone'>"
                   "<query xmlns='jabber:iq:version'/></iq>")
    assert await bodies(alice, 1) == ["kept 1"]
    drop(alice)
    await asyncio.sleep(0.2)
    await bob.send("<message to='alice@a.test/phone' type='chat'><body>kept 2</body></message>")
    # resume_timeout = 2: then contacts see alice go, the iq is answered with an error...
    answered = gone = False
    while not (answered and gone):
        el = await bob.next(10)
        if el.tag == f"{{{CLIENT}}}iq" and el.get("id") == "q1":
            assert el.get("type") == "error"
            answered = True
        if el.tag == f"{{{CLIENT}}}presence" and el.get("type") == "unavailable":
            assert el.get("from") == "alice@a.test/phone"
            gone = True
    # ... and both messages wait in offline storage, each once.
    again = await sm_server.raw_login("alice@a.test", "laptop")
    await again.send("<presence/>")
    got = await bodies(again, 2)
    assert got == ["kept 1", "kept 2"]
    await again.send("<iq type='get' id='p1' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    while (el := await again.next(5)).tag != f"{{{CLIENT}}}iq":
        assert el.tag != f"{{{CLIENT}}}message", etree.tostring(el)


async def test_clean_close_and_shutdown_lose_nothing(tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    await running.add_user("alice@a.test")
    await running.add_user("bob@a.test")
    try:
        alice, _ = await sm_login(running)
        await alice.send("<presence/>")
        bob = await running.raw_login("bob@a.test", "pc")
        await bob.send("<message to='alice@a.test' type='chat'><body>unacked</body></message>")
        assert await bodies(alice, 1) == ["unacked"]
        drop(alice)  # resumable, and then the server shuts down gracefully
        await asyncio.sleep(0.2)
    finally:
        await stop_server(running)
    running = await start_server(tmp_path)
    try:
        again = await running.raw_login("alice@a.test", "laptop")
        await again.send("<presence/>")
        assert await bodies(again, 1) == ["unacked"]
    finally:
        await stop_server(running)


async def subscribe(bob: RawClient, alice: RawClient) -> None:
    """Mutual presence subscription between bob and alice (both online)."""
    from tests.test_presence import roster_of, subscribe_both
    await roster_of(bob)  # RFC 6121 §3.1.3: requests go to resources that asked for the roster
    await roster_of(alice)
    await bob.send("<presence/>")  # presence goes to available resources only
    await subscribe_both(None, bob, alice, "bob@a.test", "alice@a.test")  # type: ignore[arg-type]


# -- slixmpp's xep_0198 through TCP drops in a burst ---------------------------------------------

async def test_slixmpp_resumes_through_drops_without_loss_or_duplicates(
        sm_server: RunningServer) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    rng = random.Random(198)
    alice = slixmpp.ClientXMPP("alice@a.test/phone", PASSWORD)
    alice.register_plugin("xep_0198")
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    alice.ssl_context = ctx
    received: list[str] = []
    resumed = asyncio.Event()
    started = asyncio.Event()
    alice.add_event_handler("session_start", lambda _e: (alice.send_presence(), started.set()))
    alice.add_event_handler("session_resumed", lambda _e: resumed.set())
    alice.add_event_handler("message", lambda m: received.append(str(m["body"])))
    host, port = sm_server.address("c2s")

    def reconnect(_event: object) -> None:
        alice.connect(host, port)
    alice.add_event_handler("disconnected", reconnect)
    alice.connect(host, port)
    await asyncio.wait_for(started.wait(), 10)
    bob = await sm_server.raw_login("bob@a.test", "pc")
    sent = [f"burst {n}" for n in range(60)]
    drops = sorted(rng.sample(range(5, 55), 3))
    resumes = 0
    for n, body in enumerate(sent):
        await bob.send(f"<message to='alice@a.test/phone' type='chat'><body>{body}</body></message>")
        if n in drops:
            resumed.clear()
            alice.transport.abort()  # type: ignore[union-attr]
            await asyncio.wait_for(resumed.wait(), 10)
            resumes += 1
        elif n % 7 == 0:
            await asyncio.sleep(0.01)
    for _ in range(200):
        if len(received) >= len(sent):
            break
        await asyncio.sleep(0.05)
    alice.del_event_handler("disconnected", reconnect)
    alice.disconnect()
    assert resumes == 3
    assert received == sent  # none lost, none twice, in order


async def test_acknowledged_means_archived(sm_server: RunningServer,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """XEP-0198 <a/> only once what the acknowledged stanzas wrote is committed (issue 12: the
    archive's group commit runs behind delivery)."""
    store = sm_server.server.storage.archive  # type: ignore[attr-defined]
    original = store.append

    async def slow_append(entries):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.3)  # a slow disk: commits lag behind delivery
        return await original(entries)
    monkeypatch.setattr(store, "append", slow_append)
    alice, _ = await sm_login(sm_server)
    bob = await sm_server.raw_login("bob@a.test", "pc")
    for n in range(5):
        await alice.send(f"<message to='bob@a.test/pc' type='chat'><body>a{n}</body></message>")
    await alice.send(f"<r xmlns='{SM}'/>")
    while (el := await alice.next()).tag != tag("a"):
        pass
    assert el.get("h") == "5"
    assert await store.count("alice@a.test") == 5  # committed before the <a/> went out
    assert [b for b in await bodies(bob, 5)] == [f"a{n}" for n in range(5)]


async def test_a_closed_sessions_unacked_messages_are_not_delivered_or_archived_twice(
        tmp_path: Path) -> None:
    """Issue 19 item 2: a session with carbons and SM closes with a carbon copy and a
    message to its full JID unacknowledged. The carbon goes nowhere (its original is with the
    other resources), the message goes only to the resource that never had it (no carbons
    there), and the archive keeps each message once (it was archived when it came)."""
    from tests.test_carbons import ENABLE as CARBONS_ON
    from tests.test_carbons import archive_ids
    running = await start_server(tmp_path)  # no <r/> from the server: nothing gets acked
    try:
        for user in ("alice", "bob"):
            await running.add_user(f"{user}@a.test")
        phone, _ = await sm_login(running, resume=False)
        assert (await phone.ask(CARBONS_ON)).get("type") == "result"
        await phone.send("<presence/>")
        laptop = await running.raw_login("alice@a.test", "laptop")
        assert (await laptop.ask(CARBONS_ON)).get("type") == "result"
        await laptop.send("<presence/>")
        tablet = await running.raw_login("alice@a.test", "tablet")  # no carbons
        await tablet.send("<presence/>")
        bob = await running.raw_login("bob@a.test", "pc")
        for client in (phone, laptop, tablet):
            await collect(client)
        await bob.send("<message to='alice@a.test/phone' type='chat' id='m1'>"
                       "<body>to the phone</body></message>")
        assert await bodies(phone, 1) == ["to the phone"]
        assert (await laptop.next_of("message")).find(
            "{urn:xmpp:carbons:2}received") is not None
        await laptop.send("<message to='bob@a.test' type='chat' id='m2'>"
                          "<body>from the laptop</body></message>")
        assert (await phone.next_of("message")).find("{urn:xmpp:carbons:2}sent") is not None
        await collect(phone)
        await phone.close()  # both unacknowledged
        await asyncio.sleep(0.3)
        # The tablet (no carbons) gets the message to the phone; the laptop gets nothing more.
        got = [el for el in await collect(tablet) if el.tag == f"{{{CLIENT}}}message"]
        assert [el.findtext(f"{{{CLIENT}}}body") for el in got] == ["to the phone"]
        extra = [el for el in await collect(laptop) if el.tag == f"{{{CLIENT}}}message"]
        assert extra == [], [etree.tostring(el) for el in extra]
        archive = await archive_ids(laptop, "q1")
        assert sorted(archive) == ["from the laptop", "to the phone"]
        assert await running.server.storage.archive.count("alice@a.test") == 2  # type: ignore[attr-defined]
        assert await running.server.storage.offline.count("alice", "a.test") == 0
    finally:
        await stop_server(running)


async def collect(client: RawClient) -> list[etree._Element]:
    """Everything that arrives before the answer to a ping."""
    await client.send("<iq type='get' id='collect' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    out = []
    while (el := await client.next()).get("id") != "collect":
        out.append(el)
    return out

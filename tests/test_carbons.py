"""Message Carbons (XEP-0280) over real sockets: <sent/> and <received/> copies as the wire
carries them (raw bytes), the eligibility rules of §6, <private/> and <no-copy/>, bare-JID
delivery, and slixmpp's xep_0280 plugin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import slixmpp
from lxml import etree

from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import CLIENT, RawClient
from tests.schema import validate_stream_bytes

CARBONS = "urn:xmpp:carbons:2"
FORWARD = "urn:xmpp:forward:0"
MESSAGE = f"{{{CLIENT}}}message"
BODY = f"{{{CLIENT}}}body"
ENABLE = f"<iq type='set' id='c1'><enable xmlns='{CARBONS}'/></iq>"


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[RunningServer]:
    server = await start_server(tmp_path)
    for user in ("alice", "bob"):
        await server.add_user(f"{user}@a.test")
    yield server
    await stop_server(server)


async def login(running: RunningServer, jid: str, resource: str, *, carbons: bool = True,
                priority: int = 0) -> RawClient:
    client = await running.raw_login(jid, resource)
    if carbons:
        reply = await client.ask(ENABLE)
        assert reply.get("type") == "result", etree.tostring(reply)
    await client.send(f"<presence><priority>{priority}</priority></presence>")
    await client.send("<iq type='get' id='sync' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    while (await client.next()).get("id") != "sync":
        pass
    return client


async def next_message(client: RawClient, timeout: float = 5.0) -> etree._Element:
    return await client.next_of("message", timeout)


def carbon(wrapper: etree._Element, kind: str) -> etree._Element:
    """The forwarded message of a <sent/>/<received/> carbon (asserts the XEP's shape)."""
    held = wrapper.find(f"{{{CARBONS}}}{kind}")
    assert held is not None, etree.tostring(wrapper)
    inner = held.find(f"{{{FORWARD}}}forwarded/{MESSAGE}")
    assert inner is not None, etree.tostring(wrapper)
    return inner


async def barrier(sender: RawClient, to: str, *receivers: RawClient, kind: str = "") -> None:
    """Send a marker chat message; each receiver's next message must be it (or its carbon of
    `kind`): whatever the test sent before it produced nothing for that receiver."""
    await sender.send(f"<message to='{to}' type='chat' id='marker'><body>marker</body></message>")
    for receiver in receivers:
        got = await next_message(receiver)
        if got.get("id") != "marker":
            inner = carbon(got, kind) if kind else got
            assert inner.get("id") == "marker", etree.tostring(got)


async def test_received_and_sent_copies_on_the_wire(running: RunningServer) -> None:
    phone = await login(running, "alice@a.test", "phone")
    laptop = await login(running, "alice@a.test", "laptop")
    bob = await login(running, "bob@a.test", "pc", carbons=False)
    # An incoming message to one resource: <received/> to the other (§5).
    await bob.send("<message to='alice@a.test/phone' type='chat' id='m1'>"
                   "<body>hi phone</body></message>")
    got = await next_message(phone)
    assert got.get("id") == "m1" and got.find(f"{{{CARBONS}}}received") is None
    copy = await next_message(laptop)
    assert copy.get("from") == "alice@a.test" and copy.get("to") == "alice@a.test/laptop"
    inner = carbon(copy, "received")
    assert (inner.get("from"), inner.get("to"), inner.get("id")) == (
        "bob@a.test/pc", "alice@a.test/phone", "m1")
    assert inner.findtext(BODY) == "hi phone"
    # On the wire: a jabber:client message inside XEP-0297 forwarded inside received.
    assert b"<received xmlns=\"urn:xmpp:carbons:2\"><forwarded xmlns=\"urn:xmpp:forward:0\">" \
           b"<message xmlns=\"jabber:client\"" in bytes(laptop.received)
    # An outgoing message: <sent/> to the sender's other resources (§6), not to the sender.
    await phone.send("<message to='bob@a.test' type='chat' id='m2'><body>hi bob</body></message>")
    got = await next_message(bob)
    assert got.get("id") == "m2" and got.get("from") == "alice@a.test/phone"
    copy = await next_message(laptop)
    assert copy.get("from") == "alice@a.test" and copy.get("type") == "chat"
    inner = carbon(copy, "sent")
    assert (inner.get("from"), inner.get("to"), inner.findtext(BODY)) == (
        "alice@a.test/phone", "bob@a.test", "hi bob")
    await barrier(bob, "alice@a.test/laptop", phone, kind="received")
    validate_stream_bytes(bytes(laptop.received))  # RFC 6120's schemas (tests/schema.py)


async def test_only_enabled_resources_get_copies_until_they_disable(
        running: RunningServer) -> None:
    phone = await login(running, "alice@a.test", "phone")
    laptop = await login(running, "alice@a.test", "laptop")
    tablet = await login(running, "alice@a.test", "tablet", carbons=False)
    bob = await login(running, "bob@a.test", "pc", carbons=False)
    await bob.send("<message to='alice@a.test/phone' type='chat' id='m1'><body>1</body></message>")
    assert (await next_message(phone)).get("id") == "m1"
    assert carbon(await next_message(laptop), "received").get("id") == "m1"
    # The tablet never enabled carbons: its next message is the marker sent to it (of which
    # the others get carbons).
    await barrier(bob, "alice@a.test/tablet", tablet, phone, laptop, kind="received")
    reply = await laptop.ask(f"<iq type='set' id='d1'><disable xmlns='{CARBONS}'/></iq>",
                             skip_others=True)
    assert reply.get("type") == "result"
    await bob.send("<message to='alice@a.test/phone' type='chat' id='m2'><body>2</body></message>")
    assert (await next_message(phone)).get("id") == "m2"
    await barrier(bob, "alice@a.test/laptop", laptop)
    # The server advertises the feature (§3).
    info = await phone.ask("<iq type='get' id='i1' to='a.test'>"
                           "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
                           skip_others=True)
    assert CARBONS in [f.get("var") for f in info.iter(
        "{http://jabber.org/protocol/disco#info}feature")]


async def test_private_and_no_copy_are_honoured(running: RunningServer) -> None:
    phone = await login(running, "alice@a.test", "phone")
    laptop = await login(running, "alice@a.test", "laptop")
    bob = await login(running, "bob@a.test", "pc", carbons=False)
    private = f"<private xmlns='{CARBONS}'/>"
    no_copy = "<no-copy xmlns='urn:xmpp:hints'/>"
    for n, hint in enumerate((private, no_copy)):
        # Outgoing: no <sent/> copy; the recipient still gets the message.
        await phone.send(f"<message to='bob@a.test' type='chat' id='out{n}'><body>x</body>"
                         f"{hint}</message>")
        got = await next_message(bob)
        assert got.get("id") == f"out{n}"
        # The recipient's server removes <private/> before delivery (§7); <no-copy/> stays.
        assert got.find(f"{{{CARBONS}}}private") is None
        assert (got.find("{urn:xmpp:hints}no-copy") is not None) is (hint == no_copy)
        # Incoming: no <received/> copy.
        await bob.send(f"<message to='alice@a.test/phone' type='chat' id='in{n}'><body>y</body>"
                       f"{hint}</message>")
        got = await next_message(phone)
        assert got.get("id") == f"in{n}" and got.find(f"{{{CARBONS}}}private") is None
    await barrier(bob, "alice@a.test/laptop", laptop)


async def test_which_messages_are_eligible(running: RunningServer) -> None:
    phone = await login(running, "alice@a.test", "phone")
    laptop = await login(running, "alice@a.test", "laptop")
    bob = await login(running, "bob@a.test", "pc", carbons=False)
    copied = [
        "<message type='chat' id='chat-state'>"
        "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
        "<message id='normal-body'><body>normal</body></message>",
        "<message type='normal' id='receipt'><received xmlns='urn:xmpp:receipts' id='x'/>"
        "</message>",
        "<message type='error' id='error'><error type='cancel'>"
        "<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
    ]
    not_copied = [
        "<message type='groupchat' id='groupchat'><body>room</body></message>",
        "<message type='headline' id='headline'><body>news</body></message>",
        "<message type='normal' id='normal-empty'><thread>t</thread></message>",
    ]
    for xml in copied + not_copied:
        await bob.send(xml.replace("<message", "<message to='alice@a.test/phone'", 1))
    received: list[str | None] = []
    while len(received) < len(copied):
        received.append(carbon(await next_message(laptop), "received").get("id"))
    assert received == ["chat-state", "normal-body", "receipt", "error"]
    await barrier(bob, "alice@a.test/laptop", laptop)
    # Outgoing: chat is copied, groupchat never; an error a client sends is not copied.
    await phone.send("<message to='bob@a.test' type='groupchat' id='g'><body>g</body></message>")
    await phone.send("<message to='bob@a.test' type='error' id='e'><error type='cancel'>"
                     "<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"
                     "</message>")
    await phone.send("<message to='bob@a.test' type='chat' id='c'><body>c</body></message>")
    assert carbon(await next_message(laptop), "sent").get("id") == "c"


async def test_bare_jid_delivery(running: RunningServer) -> None:
    phone = await login(running, "alice@a.test", "phone", priority=5)
    laptop = await login(running, "alice@a.test", "laptop", priority=5)
    desktop = await login(running, "alice@a.test", "desktop", priority=1)
    bob = await login(running, "bob@a.test", "pc", carbons=False)
    # To the bare JID, delivered to both top-priority resources: neither gets a carbon of it;
    # the lower-priority desktop, which did not get it, gets one.
    await bob.send("<message to='alice@a.test' type='chat' id='b1'><body>both</body></message>")
    assert (await next_message(phone)).get("id") == "b1"
    assert (await next_message(laptop)).get("id") == "b1"
    assert carbon(await next_message(desktop), "received").get("id") == "b1"
    await barrier(bob, "alice@a.test/desktop", phone, laptop, desktop, kind="received")
    # Delivered to one resource: the others get <received/> copies.
    await laptop.send("<presence><priority>0</priority></presence>")
    await bob.send("<iq type='get' id='sync' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    while (await bob.next()).get("id") != "sync":
        pass
    await bob.send("<message to='alice@a.test' type='chat' id='b2'><body>one</body></message>")
    assert (await next_message(phone)).get("id") == "b2"
    assert carbon(await next_message(laptop), "received").get("id") == "b2"
    assert carbon(await next_message(desktop), "received").get("id") == "b2"


async def test_messages_to_ones_own_account(running: RunningServer) -> None:
    """§6: a <sent/> copy to every carbon-enabled resource but the sender, as Prosody's
    mod_carbons does; §5: <received/> to those the delivery did not reach (the sender never
    gets a copy of its own message)."""
    phone = await login(running, "alice@a.test", "phone")
    laptop = await login(running, "alice@a.test", "laptop")
    tablet = await login(running, "alice@a.test", "tablet", priority=-1)
    await phone.send("<message to='alice@a.test/laptop' type='chat' id='s1'><body>note</body>"
                     "</message>")
    assert carbon(await next_message(laptop), "sent").get("id") == "s1"
    assert (await next_message(laptop)).get("id") == "s1"
    assert carbon(await next_message(tablet), "sent").get("id") == "s1"
    assert carbon(await next_message(tablet), "received").get("id") == "s1"
    await barrier(laptop, "alice@a.test/phone", phone, kind="sent")


SID = "urn:xmpp:sid:0"
MAM = "urn:xmpp:mam:2"
STANZA_ID = f"{{{SID}}}stanza-id"


def stanza_ids(message: etree._Element) -> list[tuple[str | None, str | None]]:
    return [(s.get("by"), s.get("id")) for s in message.findall(STANZA_ID)]


async def archive_ids(client: RawClient, ident: str) -> dict[str, str]:
    """Body -> archive id of the client's own archive (a XEP-0313 query, all of it)."""
    await client.send(f"<iq type='set' id='{ident}'><query xmlns='{MAM}' queryid='{ident}'/>"
                      "</iq>")
    found: dict[str, str] = {}
    while True:
        el = await client.next()
        if el.get("id") == ident:
            assert el.get("type") == "result", etree.tostring(el)
            return found
        result = el.find(f"{{{MAM}}}result")
        if result is not None:
            inner = result.find(f"{{{FORWARD}}}forwarded/{MESSAGE}")
            assert inner is not None and inner.find(STANZA_ID) is None, etree.tostring(el)
            found[inner.findtext(BODY) or ""] = result.get("id") or ""


async def test_copies_carry_their_own_accounts_archive_ids(running: RunningServer) -> None:
    """Issue 19 item 1 (Gajim showed bob's messages twice): a <sent/> copy carries the
    sender's archive id (XEP-0359 §3, 'by' the sender's bare JID), never the recipient's; a
    <received/> copy the recipient's; each matches what that account's archive query returns
    for the message, and no account ever sees another account's ids."""
    bob_phone = await login(running, "bob@a.test", "phone")
    bob_laptop = await login(running, "bob@a.test", "laptop")
    alice_phone = await login(running, "alice@a.test", "phone")
    alice_laptop = await login(running, "alice@a.test", "laptop")
    await bob_phone.send("<message to='alice@a.test' type='chat' id='b1'><body>from bob</body>"
                         "</message>")
    sent = carbon(await next_message(bob_laptop), "sent")
    assert sent.get("id") == "b1"
    live = {await next_message(alice_phone), await next_message(alice_laptop)}
    for copy in live:
        assert copy.get("id") == "b1" and copy.find(f"{{{CARBONS}}}received") is None
    alice_ids = {stanza_ids(copy)[0] for copy in live}
    assert [by for by, _ in alice_ids] == ["alice@a.test"], alice_ids
    [(by, bob_sent_id)] = stanza_ids(sent)
    assert by == "bob@a.test", etree.tostring(sent)

    # Alice answers to one of bob's resources: bob's other gets a <received/> copy.
    await alice_laptop.send("<message to='bob@a.test/phone' type='chat' id='a1'>"
                            "<body>from alice</body></message>")
    direct = await next_message(bob_phone)
    received = carbon(await next_message(bob_laptop), "received")
    alice_sent = carbon(await next_message(alice_phone), "sent")
    assert direct.get("id") == received.get("id") == alice_sent.get("id") == "a1"
    [(by, bob_received_id)] = stanza_ids(received)
    assert by == "bob@a.test" and stanza_ids(direct) == [("bob@a.test", bob_received_id)]
    [(by, alice_sent_id)] = stanza_ids(alice_sent)
    assert by == "alice@a.test"

    bob_archive = await archive_ids(bob_laptop, "bq")
    alice_archive = await archive_ids(alice_phone, "aq")
    assert bob_archive == {"from bob": bob_sent_id, "from alice": bob_received_id}
    assert alice_archive == {"from bob": alice_ids.pop()[1], "from alice": alice_sent_id}
    assert not set(bob_archive.values()) & set(alice_archive.values())


async def test_slixmpp_carbons(running: RunningServer) -> None:
    phone = await running.client("alice@a.test", resource="phone", plugins=("xep_0280",))
    laptop = await running.client("alice@a.test", resource="laptop", plugins=("xep_0280",))
    bob = await running.client("bob@a.test", resource="pc")
    await phone.plugin["xep_0280"].enable(timeout=5)
    await laptop.plugin["xep_0280"].enable(timeout=5)
    received: asyncio.Queue[object] = asyncio.Queue()
    sent: asyncio.Queue[object] = asyncio.Queue()
    laptop.add_event_handler("carbon_received", received.put_nowait)
    laptop.add_event_handler("carbon_sent", sent.put_nowait)
    bob.send_message(mto=slixmpp.JID("alice@a.test/phone"), mbody="to the phone", mtype="chat")
    msg = await asyncio.wait_for(received.get(), 5)
    inner = msg["carbon_received"]  # type: ignore[index]
    assert inner["body"] == "to the phone" and inner["from"] == "bob@a.test/pc"
    phone.send_message(mto=slixmpp.JID("bob@a.test"), mbody="from the phone", mtype="chat")
    msg = await asyncio.wait_for(sent.get(), 5)
    inner = msg["carbon_sent"]  # type: ignore[index]
    assert inner["body"] == "from the phone" and inner["to"] == "bob@a.test"
    assert str(inner["from"]) == "alice@a.test/phone"


def test_eligibility_rules() -> None:
    """§6 and §7 as a pure function (also what decides for recipients on other servers)."""
    from server.modules.carbons import eligible

    def el(xml: str) -> etree._Element:
        return etree.fromstring(xml.replace("<message", f"<message xmlns='{CLIENT}'", 1))
    private = f"<private xmlns='{CARBONS}'/>"
    cases = [
        ("<message type='chat'><body>x</body></message>", True, True),
        (f"<message type='chat'><body>x</body>{private}</message>", False, False),
        ("<message type='chat'><body>x</body><no-copy xmlns='urn:xmpp:hints'/></message>",
         False, False),
        ("<message><body>x</body></message>", True, True),
        ("<message type='normal'/>", False, False),
        ("<message><displayed xmlns='urn:xmpp:chat-markers:0' id='1'/></message>", True, True),
        ("<message type='groupchat'><body>x</body></message>", False, False),
        ("<message type='headline'><body>x</body></message>", False, False),
        ("<message type='error'><body>x</body></message>", True, False),
    ]
    for xml, incoming, outgoing in cases:
        assert eligible(el(xml), incoming=True) is incoming, xml
        assert eligible(el(xml), incoming=False) is outgoing, xml

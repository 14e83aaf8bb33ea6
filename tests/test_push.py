"""Push Notifications (XEP-0357) over real sockets: a client registers an app server (a slixmpp
ComponentXMPP on our component listener), and messages that arrive while the account has no
connected session — offline, or detached and waiting for stream management resumption — are
published to the app server's node with the urn:xmpp:push:summary form."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import slixmpp
from lxml import etree
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from server.jid import JID
from tests.conftest import RunningServer, start_server, stop_server
from tests.process import free_ports
from tests.rawclient import CLIENT, RawClient, condition

PUSH = "urn:xmpp:push:0"
PUBSUB = "http://jabber.org/protocol/pubsub"
DATA = "jabber:x:data"
SECRET = "component secret"
APP = "push.a.test"
OPTIONS = ("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
           "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
           "<field var='secret'><value>s3cret</value></field>{extra}</x>")
WITH_BODY = ("<field var='urn:presenced:push:include-body'><value>true</value></field>")


@dataclass
class Publish:
    sender: str
    to: str
    node: str
    fields: dict[str, str]
    options: dict[str, str] | None


def _form(x: Any) -> dict[str, str]:
    return {f.get("var"): f.findtext(f"{{{DATA}}}value") or ""
            for f in x.iter(f"{{{DATA}}}field")}


class AppServer:
    """A slixmpp component acting as the XEP-0357 app server: records every publish and
    answers it (with `error` when set)."""

    def __init__(self, port: int) -> None:
        self.publishes: asyncio.Queue[Publish] = asyncio.Queue()
        self.error: str | None = None
        self.xmpp = slixmpp.ComponentXMPP(APP, SECRET, "127.0.0.1", port)
        self.xmpp.register_handler(Callback("push", MatchXPath(
            f"{{jabber:component:accept}}iq/{{{PUBSUB}}}pubsub"), self._publish))

    async def start(self) -> None:
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.xmpp.add_event_handler("session_start", lambda _e: started.set_result(None))
        self.xmpp.connect()
        await asyncio.wait_for(started, 10)

    def _publish(self, iq: Any) -> None:
        xml = iq.xml
        publish = xml.find(f"{{{PUBSUB}}}pubsub/{{{PUBSUB}}}publish")
        form = publish.find(f"{{{PUBSUB}}}item/{{{PUSH}}}notification/{{{DATA}}}x")
        options = xml.find(f"{{{PUBSUB}}}pubsub/{{{PUBSUB}}}publish-options/{{{DATA}}}x")
        self.publishes.put_nowait(Publish(
            xml.get("from"), xml.get("to"), publish.get("node"), _form(form),
            None if options is None else _form(options)))
        if self.error is None:
            iq.reply().send()
        else:
            self.xmpp.send_raw(
                f"<iq type='error' id='{xml.get('id')}' to='{xml.get('from')}' from='{APP}'>"
                f"<error type='cancel'><{self.error} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                "</error></iq>")

    async def next(self, timeout: float = 5.0) -> Publish:
        return await asyncio.wait_for(self.publishes.get(), timeout)


@contextlib.asynccontextmanager
async def push_server(tmp_path: Path, extra: str = "", resume_timeout: float = 30) -> (
        AsyncIterator[tuple[RunningServer, AppServer]]):
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    (port,) = free_ports(1, "127.0.0.1")
    running = await start_server(
        tmp_path, f'[components]\n"{APP}" = {{ secret = "{SECRET}" }}\n'
                  f"[stream_management]\nresume_timeout = {resume_timeout}\n" + extra,
        listen_extra=f'component = ["127.0.0.1:{port}"]')
    app = AppServer(running.address("component")[1])
    try:
        for user in ("alice", "bob"):
            await running.add_user(f"{user}@a.test")
        await app.start()
        yield running, app
    finally:
        app.xmpp.disconnect()
        await stop_server(running)


async def login(running: RunningServer, jid: str, resource: str = "pc") -> RawClient:
    client = await running.raw_login(jid, resource)
    await client.send("<presence/>")
    return client


async def enable(client: RawClient, node: str = "node1", options: str | None = "",
                 service: str = APP) -> etree._Element:
    form = "" if options is None else OPTIONS.format(extra=options)
    node_attr = f" node='{node}'" if node else ""
    return await client.ask(f"<iq type='set' id='e-{node}'><enable xmlns='{PUSH}' "
                            f"jid='{service}'{node_attr}>{form}</enable></iq>", skip_others=True)


async def offline(running: RunningServer, client: RawClient, jid: str) -> None:
    await client.close()
    for _ in range(200):
        if not running.server.sessions.get(JID.parse(jid)):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{jid} still online")


def chat(to: str, body: str) -> str:
    return f"<message to='{to}' type='chat'><body>{body}</body></message>"


async def test_offline_messages_are_notified(tmp_path: Path) -> None:
    async with push_server(tmp_path) as (running, app):
        alice = await login(running, "alice@a.test", "phone")
        reply = await enable(alice)
        assert reply.get("type") == "result", etree.tostring(reply)
        # §4: the account advertises the feature.
        info = await alice.ask("<iq type='get' id='i1' to='alice@a.test'>"
                               "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
                               skip_others=True)
        assert PUSH in [f.get("var") for f in info.iter(
            "{http://jabber.org/protocol/disco#info}feature")]
        bob = await login(running, "bob@a.test")
        # Alice is connected: no notification (the next publish is for a later message).
        await bob.send(chat("alice@a.test", "you are here"))
        assert (await alice.next_of("message")).findtext(f"{{{CLIENT}}}body") == "you are here"
        await offline(running, alice, "alice@a.test/phone")
        await bob.send(chat("alice@a.test", "first"))
        await bob.send(chat("alice@a.test", "second"))
        # Chat states and groupchat wake no one.
        await bob.send("<message to='alice@a.test' type='chat'>"
                       "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>")
        await bob.send(chat("alice@a.test", "third"))
        notes = [await app.next() for _ in range(3)]
        assert [(n.sender, n.to, n.node) for n in notes] == [("alice@a.test", APP, "node1")] * 3
        assert [n.fields for n in notes] == [
            {"FORM_TYPE": "urn:xmpp:push:summary", "message-count": str(count),
             "last-message-sender": "bob@a.test/pc"} for count in (1, 2, 3)]
        # The publish-options go with each publish (§5).
        assert notes[0].options == {
            "FORM_TYPE": "http://jabber.org/protocol/pubsub#publish-options", "secret": "s3cret"}
        # Back online (the offline messages arrive), then away again: the count starts anew.
        alice = await login(running, "alice@a.test", "phone")
        while (await alice.next_of("message")).findtext(f"{{{CLIENT}}}body") != "third":
            pass
        await offline(running, alice, "alice@a.test/phone")
        await bob.send(chat("alice@a.test", "gone again"))
        note = await app.next()
        assert note.fields["message-count"] == "1"
        assert app.publishes.empty()


async def test_detached_sessions_are_notified(tmp_path: Path) -> None:
    from tests.test_stream_management import drop, sm_login
    async with push_server(tmp_path, resume_timeout=1) as (running, app):
        alice, _ = await sm_login(running, "alice@a.test", "phone")
        await alice.send("<presence/>")
        assert (await enable(alice)).get("type") == "result"
        bob = await login(running, "bob@a.test")
        drop(alice)  # the network goes: the session waits for resumption, detached
        session = None
        for _ in range(200):
            session = running.server.sessions.get(JID.parse("alice@a.test/phone"))
            if session is not None and session.transport is None:
                break
            await asyncio.sleep(0.01)
        assert session is not None and session.transport is None
        await bob.send(chat("alice@a.test/phone", "are you there?"))
        note = await app.next()
        assert session.transport is None and running.server.sessions.get(session.jid)  # still
        assert note.fields["message-count"] == "1"
        assert note.fields["last-message-sender"] == "bob@a.test/pc"
        assert "last-message-body" not in note.fields
        # Not resumed in time: the message goes to offline storage, without a second
        # notification; the next message is notified as the second one.
        offline_store = running.server.storage.offline
        for _ in range(300):
            if await offline_store.count("alice", "a.test") == 1:
                break
            await asyncio.sleep(0.01)
        assert running.server.sessions.get(JID.parse("alice@a.test/phone")) is None
        assert await offline_store.count("alice", "a.test") == 1
        await asyncio.sleep(0.1)  # a second notification would be on its way by now
        await bob.send(chat("alice@a.test", "hello?"))
        note = await app.next()
        assert note.fields["message-count"] == "2"
        assert await offline_store.count("alice", "a.test") == 2
        await asyncio.sleep(0.3)
        assert app.publishes.empty()


async def test_bodies_only_when_asked(tmp_path: Path) -> None:
    async with push_server(tmp_path) as (running, app):
        alice = await login(running, "alice@a.test", "phone")
        assert (await enable(alice, "with-body", WITH_BODY)).get("type") == "result"
        assert (await enable(alice, "plain", None)).get("type") == "result"
        bob = await login(running, "bob@a.test")
        await offline(running, alice, "alice@a.test/phone")
        await bob.send(chat("alice@a.test", "secret words"))
        notes = {n.node: n for n in [await app.next(), await app.next()]}
        assert notes["with-body"].fields["last-message-body"] == "secret words"
        # Our own field is not passed on to the app server.
        assert notes["with-body"].options == {
            "FORM_TYPE": "http://jabber.org/protocol/pubsub#publish-options", "secret": "s3cret"}
        assert "last-message-body" not in notes["plain"].fields
        assert notes["plain"].options is None


async def test_include_body_setting(tmp_path: Path) -> None:
    async with push_server(tmp_path, "[push]\ninclude_body = true\n") as (running, app):
        alice = await login(running, "alice@a.test", "phone")
        assert (await enable(alice, options=None)).get("type") == "result"
        bob = await login(running, "bob@a.test")
        await offline(running, alice, "alice@a.test/phone")
        await bob.send(chat("alice@a.test", "for everyone"))
        assert (await app.next()).fields["last-message-body"] == "for everyone"


async def test_enable_disable_and_errors(tmp_path: Path) -> None:
    async with push_server(tmp_path, "[push]\nmax_registrations = 2\n") as (running, app):
        alice = await login(running, "alice@a.test", "phone")
        assert condition(await enable(alice, node="")) == "bad-request"
        assert condition(await enable(alice, service="not a jid@")) == "bad-request"
        bad_form = ("<iq type='set' id='bf'><enable xmlns='urn:xmpp:push:0' jid='push.a.test' "
                    "node='n'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
                    "<value>urn:something:else</value></field></x></enable></iq>")
        assert condition(await alice.ask(bad_form, skip_others=True)) == "bad-request"
        assert (await enable(alice, "n1")).get("type") == "result"
        assert (await enable(alice, "n2")).get("type") == "result"
        assert condition(await enable(alice, "n3")) == "resource-constraint"
        assert (await enable(alice, "n2")).get("type") == "result"  # again: replaced
        store = running.server.storage.push  # type: ignore[attr-defined]
        assert [r.node for r in await store.get("alice", "a.test")] == ["n1", "n2"]
        reply = await alice.ask(f"<iq type='set' id='d1'><disable xmlns='{PUSH}' jid='{APP}' "
                                "node='n1'/></iq>", skip_others=True)
        assert reply.get("type") == "result"
        assert [r.node for r in await store.get("alice", "a.test")] == ["n2"]
        bob = await login(running, "bob@a.test")
        await offline(running, alice, "alice@a.test/phone")
        # The app server says the node is unknown: the registration is forgotten.
        app.error = "item-not-found"
        await bob.send(chat("alice@a.test", "one"))
        assert (await app.next()).node == "n2"
        for _ in range(200):
            if not await store.get("alice", "a.test"):
                break
            await asyncio.sleep(0.01)
        assert await store.get("alice", "a.test") == []
        app.error = None
        await bob.send(chat("alice@a.test", "two"))
        with pytest.raises(asyncio.TimeoutError):
            await app.next(0.5)
        # Disabling every node of an app server.
        alice = await login(running, "alice@a.test", "phone")
        assert (await enable(alice, "a")).get("type") == "result"
        assert (await enable(alice, "b")).get("type") == "result"
        reply = await alice.ask(f"<iq type='set' id='d2'><disable xmlns='{PUSH}' jid='{APP}'/>"
                                "</iq>", skip_others=True)
        assert reply.get("type") == "result"
        assert await store.get("alice", "a.test") == []

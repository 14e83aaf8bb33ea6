"""The module system (server/module.py): modules as instances with their own config section,
iq dispatch by (type, namespace, element name), nonzas, session slots, the filter/user chain
that runs each filter once per stanza even when one awaits, declared dependencies between
modules (needs, uses) and the list of events (server/events.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from server import events
from server.app import Server
from server.config import ConfigErrors, int_option, load_config
from server.events import Hooks
from server.jid import JID
from server.module import (
    Module,
    ModuleError,
    SessionSlot,
    Stanza,
    hook,
    iq_get,
    iq_set,
    load_order,
    nonza,
)
from server.modules import MODULES, config_sections
from server.modules.pubsub.pep import Pep
from server.modules.vcard import VCard
from server.sessions import Session
from server.xml import stanza as st
from tests.conftest import RunningServer, stop_server, write_config
from tests.rawclient import CLIENT, condition

DEMO = "urn:presenced:test:demo"


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoSettings:
    greeting_count: int = field(metadata=int_option(1, 9, 2))


class Demo(Module):
    """A module as a contributor would write one: settings, two payloads of one namespace,
    a nonza, per-session state and two filters (one of them awaiting)."""

    name = "demo"
    features = (DEMO,)
    settings = DemoSettings
    greeted = SessionSlot[int](0)

    def __init__(self, server: Server, config: DemoSettings) -> None:
        super().__init__(server, config)
        self.filtered: list[tuple[str, str | None]] = []  # (filter, stanza id)
        self.started = False

    async def start(self) -> None:
        self.started = True

    @iq_get(DEMO, "hello", to=("host",))
    def hello(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        count = self.greeted.get(origin) + 1
        self.greeted.set(origin, count)
        answer = st.element(f"{{{DEMO}}}hello", {"count": str(count),
                                                  "limit": str(self.config.greeting_count)})
        return st.result(stanza, answer)

    @iq_set(DEMO, "hello", to=("host",))
    def hello_set(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        return st.result(stanza, st.element(f"{{{DEMO}}}set"))

    @iq_get(DEMO, "bye", to=("host",))
    async def bye(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        await asyncio.sleep(0)
        return st.result(stanza, st.element(f"{{{DEMO}}}bye"))

    @nonza(f"{{{DEMO}}}knock")
    def knock(self, session: Session, _el: Stanza) -> None:
        session.send(st.element(st.MESSAGE, {"from": session.jid.domain, "to": session.jid_str,
                                             "id": "knocked"}))

    @hook("filter/user", priority=200)
    def slow_filter(self, stanza: Stanza, _origin: Session | None, _to: JID) -> Any:
        if stanza.tag != st.MESSAGE:
            return None

        async def later() -> None:
            await asyncio.sleep(0.01)  # e.g. a storage read
            self.filtered.append(("slow", stanza.get("id")))
        return later()

    @hook("filter/user", priority=-200)
    def last_filter(self, stanza: Stanza, _origin: Session | None, _to: JID) -> Any:
        if stanza.tag == st.MESSAGE:
            self.filtered.append(("last", stanza.get("id")))
            if stanza.get("id") == "drop-me":
                return True  # consumed
        return None


async def start_demo(tmp: Path, extra: str = "") -> RunningServer:
    path = write_config(tmp, extra)
    sections = {**config_sections(), "demo": DemoSettings}
    server = Server(load_config(path, sections=sections), extra_modules=(Demo,))
    await server.start()
    return RunningServer(server, tmp / "data", path)


async def test_module_instance_settings_dispatch_and_slots(tmp_path: Path) -> None:
    running = await start_demo(tmp_path, "[demo]\ngreeting_count = 7\n")
    try:
        demo = running.server.modules["demo"]
        assert isinstance(demo, Demo) and demo.started and demo.server is running.server
        await running.add_user("alice@a.test")
        alice = await running.raw_login("alice@a.test")
        for expected in ("1", "2"):  # the slot keeps per-session state
            answer = await alice.ask(f"<iq type='get' to='a.test' id='h{expected}'>"
                                     f"<hello xmlns='{DEMO}'/></iq>")
            hello = answer.find(f"{{{DEMO}}}hello")
            assert hello is not None
            assert (hello.get("count"), hello.get("limit")) == (expected, "7")
        # Same namespace, other element: another handler; a set goes to the set handler.
        answer = await alice.ask(f"<iq type='get' to='a.test' id='b1'><bye xmlns='{DEMO}'/></iq>")
        assert answer.find(f"{{{DEMO}}}bye") is not None
        answer = await alice.ask(f"<iq type='set' to='a.test' id='s1'><hello xmlns='{DEMO}'/></iq>")
        assert answer.find(f"{{{DEMO}}}set") is not None
        # An element of the namespace that no handler declared: bad-request (RFC 6120
        # §8.3.3.1); a namespace nobody handles: service-unavailable.
        answer = await alice.ask(f"<iq type='get' to='a.test' id='x1'><other xmlns='{DEMO}'/></iq>")
        assert condition(answer) == "bad-request"
        answer = await alice.ask("<iq type='get' to='a.test' id='x2'><x xmlns='urn:nobody'/></iq>")
        assert condition(answer) == "service-unavailable"
        # Its feature is in the server's disco#info.
        info = await alice.ask("<iq type='get' to='a.test' id='d1'>"
                               "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        assert DEMO in {f.get("var") for f in info.iter(
            "{http://jabber.org/protocol/disco#info}feature")}
        # A declared nonza reaches its handler; an undeclared one ends the stream.
        await alice.send(f"<knock xmlns='{DEMO}'/>")
        knocked = await alice.next_of("message")
        assert knocked.get("id") == "knocked"
        await alice.send("<unknown xmlns='urn:presenced:test:nothing'/>")
        assert await alice.stream_error() == "unsupported-stanza-type"
    finally:
        await stop_server(running)


async def test_each_filter_runs_once_even_when_one_awaits(tmp_path: Path) -> None:
    running = await start_demo(tmp_path)
    try:
        demo = running.server.modules["demo"]
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        alice = await running.raw_login("alice@a.test")
        bob = await running.raw_login("bob@a.test")
        await bob.send("<presence/>")
        await bob.next_of("presence")
        await alice.send("<message to='bob@a.test' type='chat' id='m1'><body>1</body></message>")
        got = await bob.next_of("message")
        while got.get("id") == "greeting":
            got = await bob.next_of("message")
        assert got.get("id") == "m1" and got.findtext(f"{{{CLIENT}}}body") == "1"
        # The awaiting filter ran first, once; the later filter once, after it (the old chain
        # re-routed the stanza through every filter again).
        assert demo.filtered == [("slow", "m1"), ("last", "m1")]
        # A filter after an awaiting one may still consume the stanza.
        await alice.send("<message to='bob@a.test' type='chat' id='drop-me'><body>2</body>"
                         "</message>")
        await alice.send("<message to='bob@a.test' type='chat' id='m3'><body>3</body></message>")
        got = await bob.next_of("message")
        assert got.get("id") == "m3"
        assert demo.filtered[2:] == [("slow", "drop-me"), ("last", "drop-me"), ("slow", "m3"),
                                     ("last", "m3")]
    finally:
        await stop_server(running)


def test_module_settings_errors_name_file_line_and_key(tmp_path: Path) -> None:
    sections = {**config_sections(), "demo": DemoSettings}
    path = tmp_path / "c.toml"
    path.write_text('domains = ["a.test"]\n\n[demo]\ngreeting_count = 12\ncolour = "red"\n')
    with pytest.raises(ConfigErrors) as caught:
        load_config(path, sections=sections)
    lines = str(caught.value).splitlines()
    assert lines == [
        f"{path}:4: [demo] greeting_count: expected an integer from 1 to 9",
        f"{path}:5: [demo] colour: unknown key; expected one of greeting_count",
    ]
    # Without the module, its table is unknown like any other.
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    assert f"{path}:3: demo: unknown table" in str(caught.value)
    # Defaults when the table is absent.
    path.write_text('domains = ["a.test"]\n')
    assert load_config(path, sections=sections).section("demo") == DemoSettings(greeting_count=2)


def test_session_slots_are_per_session() -> None:
    slot = SessionSlot[int](5)
    other = SessionSlot[str]("x")
    one = Session(JID.parse("a@a.test/1"), None)
    two = Session(JID.parse("a@a.test/2"), None)
    assert slot.get(one) == 5 and one.state is None  # reading allocates nothing
    slot.set(one, 6)
    other.set(two, "y")
    assert (slot.get(one), slot.get(two), other.get(one), other.get(two)) == (6, 5, "x", "y")
    slot.clear(one)
    assert slot.get(one) == 5


# -- declared dependencies and events --------------------------------------------------------


class Greeter(Module):
    """Written from docs/developing.md, "Adding a module", alone: it needs the vCard module, uses PEP when
    it is there, and reacts to an event."""

    name = "greeter"
    needs = (VCard,)
    uses = (Pep,)

    @hook(events.SESSION_BOUND)
    async def greet(self, session: Session) -> None:
        user = session.jid
        assert user.local is not None
        avatar = await self.needed(VCard).avatar_hash(user.local, user.domain)
        pep = "yes" if self.server.module(Pep) is not None else "no"
        message = st.element(st.MESSAGE, {"from": user.domain, "to": session.jid_str,
                                          "id": "greeting"})
        st.child(message, f"{{{CLIENT}}}body", text=f"pep={pep} avatar={avatar or '-'}")
        session.send(message)


async def start_with(tmp: Path, modules: list[str] = MODULES,
                     extra_modules: tuple[type[Module], ...] = (Greeter,)) -> RunningServer:
    path = write_config(tmp)
    server = Server(load_config(path), extra_modules=extra_modules, modules=modules)
    await server.start()
    return RunningServer(server, tmp / "data", path)


async def greeting(running: RunningServer, jid: str) -> str:
    await running.add_user(jid)
    client = await running.raw_login(jid)
    message = await client.next_of("message")
    assert message.get("id") == "greeting"
    return message.findtext(f"{{{CLIENT}}}body") or ""


async def test_a_module_that_needs_another_and_reacts_to_an_event(tmp_path: Path) -> None:
    running = await start_with(tmp_path)
    try:
        assert await greeting(running, "alice@a.test") == "pep=yes avatar=-"
        # The typed lookups: the instance the server loaded, by class.
        assert running.server.module(Greeter) is running.server.modules["greeter"]
        assert isinstance(running.server.module(Pep), Pep)
    finally:
        await stop_server(running)


async def test_removing_a_used_module_leaves_a_server_without_the_feature(
        tmp_path: Path) -> None:
    # PEP is used by vcard, private and the greeter; the roster module by nobody (rosters are
    # the core's). Without both, the server runs, and only their features are gone.
    without = [m for m in MODULES if m not in ("pubsub.pep", "roster")]
    running = await start_with(tmp_path, without)
    try:
        assert running.server.module(Pep) is None
        assert await greeting(running, "alice@a.test") == "pep=no avatar=-"
        await running.add_user("bob@a.test")
        alice = await running.raw_login("alice@a.test", "two")
        bob = await running.raw_login("bob@a.test")
        # A vCard with a photo is stored (no avatar is converted to PEP, XEP-0398) ...
        answer = await alice.ask("<iq type='set' id='v1'><vCard xmlns='vcard-temp'><PHOTO>"
                                 "<TYPE>image/png</TYPE><BINVAL>iVBORw0KGgo=</BINVAL></PHOTO>"
                                 "</vCard></iq>", skip_others=True)
        assert answer.get("type") == "result"
        # ... the account is no PEP service any more, nor offers the conversion ...
        info = await bob.ask("<iq type='get' id='d1' to='alice@a.test'>"
                             "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>", skip_others=True)
        features = {f.get("var") for f in info.iter(
            "{http://jabber.org/protocol/disco#info}feature")}
        assert "http://jabber.org/protocol/pubsub#publish" not in features
        assert "urn:xmpp:pep-vcard-conversion:0" not in features
        publish = await alice.ask(
            "<iq type='set' id='p1'><pubsub xmlns='http://jabber.org/protocol/pubsub'>"
            "<publish node='n'><item id='1'><x xmlns='urn:x'/></item></publish></pubsub></iq>",
            skip_others=True)
        assert condition(publish) == "service-unavailable"
        roster = await alice.ask("<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>",
                                 skip_others=True)
        assert condition(roster) == "service-unavailable"
        # ... and presence (with the core's rosters) and messages work as before.
        await bob.send("<presence/>")
        echo = await bob.next_of("presence")
        assert echo.get("from") == bob.jid
        await alice.send("<message to='bob@a.test/raw' type='chat' id='m1'><body>hi</body>"
                         "</message>")
        got = await bob.next_of("message")
        while got.get("id") == "greeting":
            got = await bob.next_of("message")
        assert got.get("id") == "m1"
    finally:
        await stop_server(running)


async def test_removing_a_needed_module_is_refused_at_start(tmp_path: Path) -> None:
    without = [m for m in MODULES if m != "vcard"]
    with pytest.raises(ModuleError) as caught:
        await start_with(tmp_path, without)
    assert str(caught.value).startswith("module greeter needs module vcard, which is not loaded")
    # Ours declare theirs too: watchers reads presence's fetches and settings.
    with pytest.raises(ModuleError, match="module watchers needs module presence"):
        await start_with(tmp_path, [m for m in MODULES if m != "presence"], ())


class Misspelt(Module):
    name = "misspelt"

    @hook("session-closd")
    def closed(self, session: Session, reason: str) -> None:
        pass


async def test_an_unknown_event_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(ModuleError) as caught:
        await start_with(tmp_path, extra_modules=(Misspelt,))
    assert "module misspelt: unknown event 'session-closd'" in str(caught.value)
    hooks = Hooks()
    with pytest.raises(KeyError):
        hooks.add("presence/availble", lambda *_: None)
    hooks.add("session-closed", lambda *_: None)  # a known name as a string still works
    assert hooks.has(events.SESSION_CLOSED)


def test_events_say_their_arguments_and_kind() -> None:
    assert events.known("filter/user") is events.FILTER_USER and events.FILTER_USER.stops
    assert not events.SESSION_CLOSED.stops and events.SESSION_CLOSED.fired_by == "server/app.py"
    assert events.SESSION_CLOSED.args == ("session", "reason: str")
    with pytest.raises(ValueError):
        events.Event("session-closed", (), stops=False, fired_by="tests")


async def test_notify_awaits_what_handlers_return_in_order() -> None:
    hooks = Hooks()
    seen: list[str] = []

    async def later(name: str) -> None:
        await asyncio.sleep(0)
        seen.append(name)
    hooks.add(events.SERVER_STARTED, lambda _s: later("low"), priority=-1)
    hooks.add(events.SERVER_STARTED, lambda _s: seen.append("sync") and None)
    hooks.add(events.SERVER_STARTED, lambda _s: later("high"), priority=5)
    await hooks.notify(events.SERVER_STARTED, None)
    assert seen == ["sync", "high", "low"]  # all called first, then awaited by priority


def test_load_order_follows_needs_and_uses_and_keeps_the_rest() -> None:
    def module(name: str, needs: tuple[type[Module], ...] = (),
               uses: tuple[type[Module], ...] = ()) -> type[Module]:
        return type(name, (Module,), {"name": name, "needs": needs, "uses": uses})
    a = module("a")
    b = module("b")
    c = module("c", needs=(a,))
    d = module("d", uses=(c,))
    e = module("e", uses=(module("absent"),))
    assert load_order([d, b, c, e, a]) == [b, e, a, c, d]
    x = module("x")
    y = module("y", needs=(x,))
    x.needs = (y,)
    with pytest.raises(ModuleError, match="cycle: x, y"):
        load_order([x, y])


async def test_drain_waits_for_handlers_and_ends_a_stuck_one() -> None:
    """Shutdown waits for every handler a stream started (storage closes after them), but a
    handler stuck on an unreachable store is cancelled after the timeout: a stop always ends."""
    from server.router import Router
    from server.sessions import SessionManager

    router = Router(frozenset({"a.test"}), SessionManager(10), Hooks())
    finished: list[str] = []

    async def quick() -> None:
        await asyncio.sleep(0.05)
        finished.append("quick")

    async def stuck() -> None:
        await asyncio.Event().wait()

    router.spawn(quick())
    hung = router.spawn(stuck())
    began = asyncio.get_running_loop().time()
    await router.drain(timeout=0.3)
    assert finished == ["quick"]
    assert hung.cancelled()
    assert 0.25 < asyncio.get_running_loop().time() - began < 2.0

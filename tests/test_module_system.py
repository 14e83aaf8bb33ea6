"""The module system (server/module.py): modules as instances with their own config section,
iq dispatch by (type, namespace, element name), nonzas, session slots, and the filter/user
chain that runs each filter once per stanza even when one awaits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from server.app import Server
from server.config import ConfigErrors, int_option, load_config
from server.jid import JID
from server.module import Module, SessionSlot, Stanza, hook, iq_get, iq_set, nonza
from server.modules import config_sections
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

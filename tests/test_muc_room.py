"""One MUC room as a plain object (server/modules/muc/room.py): no sockets, no server. Every
method returns the stanzas to send; these tests read them."""

from __future__ import annotations

import time

import pytest
from lxml import etree

from server.errors import StanzaError
from server.jid import JID
from server.modules.muc.room import (
    LABELS,
    Bucket,
    Room,
    RoomConfig,
    apply_form,
    config_form,
    nick_key,
)
from server.xml import stanza as st

CLIENT = "jabber:client"
MUC = "http://jabber.org/protocol/muc"
USER = MUC + "#user"
XDATA = "jabber:x:data"
ROOM = JID.parse("room@muc.a.test")


def presence(history: str | None = None) -> etree._Element:
    x = f"<x xmlns='{MUC}'>{history or ''}</x>"
    return etree.fromstring(f"<presence xmlns='{CLIENT}'>{x}</presence>")


def new_room(**config: object) -> Room:
    return Room(ROOM, RoomConfig(**config), b"key")  # type: ignore[arg-type]


def said(room: Room, who: JID, text: str) -> list[etree._Element]:
    message = etree.fromstring(f"<message xmlns='{CLIENT}' type='groupchat'><body>{text}"
                               "</body></message>")
    return room.groupchat(who, message)


def to_of(stanzas: list[etree._Element]) -> list[str | None]:
    return [s.get("to") for s in stanzas]


ALICE = JID.parse("alice@a.test/pc")
ALICE_PHONE = JID.parse("alice@a.test/phone")
BOB = JID.parse("bob@a.test/pc")


# -- nicknames (RFC 8266 §2.4) ------------------------------------------------------------------

def test_nick_key_maps_case_and_width() -> None:
    assert nick_key("Alice") == nick_key("ALICE") == nick_key("alice")
    assert nick_key("Alice") != nick_key("Alicia")


@pytest.mark.parametrize("variant", ["alice", "ALICE", "aLiCe"])
def test_a_case_variant_of_an_occupants_nick_is_a_conflict(variant: str) -> None:
    room = new_room()
    room.join(ALICE, "Alice", presence(), created=True)
    with pytest.raises(StanzaError) as caught:
        room.join(BOB, variant, presence(), created=False)
    assert caught.value.condition == "conflict"
    assert room.occupant(variant) is room.occupant("Alice")


def test_a_case_variant_of_a_registered_nick_is_a_conflict() -> None:
    room = new_room()
    room.nicks[ALICE.bare] = "Alice"
    with pytest.raises(StanzaError) as caught:
        room.join(BOB, "ALICE", presence(), created=True)
    assert caught.value.condition == "conflict"
    room.join(ALICE, "alice", presence(), created=False)  # its holder may use any case


def test_a_nick_change_into_someone_elses_case_variant_is_a_conflict() -> None:
    room = new_room()
    room.join(ALICE, "Alice", presence(), created=True)
    room.join(BOB, "Bob", presence(), created=False)
    with pytest.raises(StanzaError):
        room.change_nick(BOB, "aLICE")
    # One's own nick in another case is a change like any other (303, then the new one).
    out = room.change_nick(ALICE, "ALICE")
    gone = [s for s in out if s.get("type") == "unavailable"]
    assert gone and all(s.get("from") == f"{ROOM}/Alice" for s in gone)
    assert room.occupant("alice") is not None and room.occupant("alice").nick == "ALICE"  # type: ignore[union-attr]


# -- sessions and occupants (XEP-0045 §7.2) ------------------------------------------------------

def test_a_second_session_under_another_nick_is_another_occupant() -> None:
    room = new_room()
    room.set_affiliation(ALICE, "owner")  # the service does it for a room's creator
    room.join(ALICE, "Alice", presence(), created=True)
    out = room.join(ALICE_PHONE, "Phone", presence(), created=False)
    assert set(room.occupants) == {nick_key("Alice"), nick_key("Phone")}
    # The others (Alice's first session too) get the new occupant's presence.
    assert str(ALICE) in to_of(out)
    # Same affiliation: it is the account's.
    assert room.occupant("Phone").affiliation == "owner"  # type: ignore[union-attr]
    # The same nick from another session joins the sessions into one occupant.
    room2 = new_room()
    room2.join(ALICE, "Alice", presence(), created=True)
    room2.join(ALICE_PHONE, "Alice", presence(), created=False)
    assert len(room2.occupants) == 1 and len(room2.occupant("Alice").sessions) == 2  # type: ignore[union-attr]
    # One of them leaving leaves the occupant in.
    room2.leave(ALICE_PHONE, None)
    assert room2.occupant("Alice") is not None


# -- history (XEP-0045 §7.2.15) ------------------------------------------------------------------

@pytest.mark.parametrize("attrs", ["maxstanzas='\u00b2'", "maxchars='-1'", "seconds=''",
                                   f"maxstanzas='{'9' * 5000}'", "maxchars='1e9'"])
def test_unreadable_history_limits_are_ignored(attrs: str) -> None:
    room = new_room()
    room.join(ALICE, "Alice", presence(), created=True)
    for n in range(3):
        said(room, ALICE, f"m{n}")
    out = room.join(BOB, "Bob", presence(f"<history {attrs}/>"), created=False)
    assert [m.findtext(f"{{{CLIENT}}}body") for m in out if m.tag == st.MESSAGE and
            m.find(f"{{{CLIENT}}}body") is not None] == ["m0", "m1", "m2"]


@pytest.mark.parametrize(("attrs", "expected"), [
    ("maxstanzas='2'", ["m1", "m2"]), ("maxstanzas='0'", []), ("maxchars='0'", []),
    ("seconds='3600'", ["m0", "m1", "m2"])])
def test_history_limits(attrs: str, expected: list[str]) -> None:
    room = new_room()
    room.join(ALICE, "Alice", presence(), created=True)
    for n in range(3):
        said(room, ALICE, f"m{n}")
    out = room.join(BOB, "Bob", presence(f"<history {attrs}/>"), created=False)
    assert [m.findtext(f"{{{CLIENT}}}body") for m in out
            if m.find(f"{{{CLIENT}}}body") is not None] == expected


def test_history_restored_from_the_archive() -> None:
    room = new_room(history_length=2)

    def archived(text: str, extra: str = "") -> etree._Element:
        return etree.fromstring(
            f"<message xmlns='{CLIENT}' type='groupchat' from='{ROOM}/Alice'>{text}{extra}"
            "</message>")
    room.restore_history([
        ("1", time.time() - 30, archived("<body>one</body>")),
        ("2", time.time() - 20, archived("<body>two</body>")),
        ("3", time.time() - 15, archived("<subject>a notice, not history</subject>")),
        ("4", time.time() - 10, archived("<body>three</body>")),
    ])
    out = room.join(BOB, "Bob", presence(), created=True)
    history = [m for m in out if m.find(f"{{{CLIENT}}}body") is not None]
    assert [m.findtext(f"{{{CLIENT}}}body") for m in history] == ["two", "three"]
    ids = [m.find("{urn:xmpp:sid:0}stanza-id") for m in history]
    assert [(i.get("id"), i.get("by")) for i in ids if i is not None] == [
        ("2", str(ROOM)), ("4", str(ROOM))]
    assert all(m.find("{urn:xmpp:delay}delay") is not None for m in history)


# -- rate limits ------------------------------------------------------------------------------------

def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = Bucket()
    assert [bucket.take(1.0, 3, 100.0) for _ in range(4)] == [True, True, True, False]
    assert 0 < bucket.wait(1.0) <= 1.0
    assert not bucket.take(1.0, 3, 100.5)
    assert bucket.take(1.0, 3, 101.1)


# -- forms (XEP-0045 §10.2, XEP-0004) -------------------------------------------------------------

def test_every_config_field_and_option_has_a_label() -> None:
    form = config_form(RoomConfig(), ROOM)
    fields = form.findall(f"{{{XDATA}}}field")
    shown = [f for f in fields if f.get("type") != "hidden"]
    assert len(shown) == len(LABELS) - 4  # the roominfo fields are not in it
    # The hidden FORM_TYPE is not shown: no label (as Prosody, whose scripts are strict).
    assert [f.get("label") for f in fields if f.get("type") == "hidden"] == [None]
    for field in shown:
        assert field.get("label"), etree.tostring(field)
        for option in field.findall(f"{{{XDATA}}}option"):
            assert option.get("label") and option.get("label") != option.findtext(
                f"{{{XDATA}}}value"), etree.tostring(option)


@pytest.mark.parametrize("value", ["\u00b2", "-3", "9" * 5000, "x"])
def test_config_numbers_are_read_strictly(value: str) -> None:
    form = etree.fromstring(
        f"<x xmlns='{XDATA}' type='submit'><field var='muc#roomconfig_maxusers'>"
        f"<value>{value}</value></field></x>")
    with pytest.raises(StanzaError) as caught:
        apply_form(RoomConfig(), form, 100)
    assert caught.value.condition == "bad-request"


# -- service hosts declare their iq handlers (server/services.py) ---------------------------------

def test_service_iq_handlers_are_declared_and_dispatched() -> None:
    from typing import Any

    from server.module import iq_get, iq_set
    from server.services import ServiceModule

    class Echo(ServiceModule):
        name = "echo-test"
        identity = ("component", "generic")
        display_name = "Echo"

        @iq_get("urn:example:echo", "echo", to="service")
        def at_service(self, stanza: Any, _origin: Any, to: JID) -> Any:
            return st.result(stanza, etree.fromstring(f"<echo xmlns='urn:example:echo'>{to}"
                                                      "</echo>"))

        @iq_set("urn:example:echo", "echo", to="service-bare")
        def at_entity(self, stanza: Any, _origin: Any, to: JID) -> Any:
            return st.result(stanza)

    service = Echo(None, None)  # type: ignore[arg-type]
    # Not handlers of the user domains: the router never sees them.
    assert service.iq_handlers() == []

    def iq(type_: str, to: str) -> etree._Element:
        return etree.fromstring(f"<iq xmlns='{CLIENT}' type='{type_}' id='1' to='{to}' "
                                "from='a@a.test/r'><echo xmlns='urn:example:echo'/></iq>")
    answer = service.route(iq("get", "echo.a.test"), None, JID.parse("echo.a.test"))
    assert answer.get("type") == "result" and answer[0].text == "echo.a.test"
    answer = service.route(iq("set", "x@echo.a.test"), None, JID.parse("x@echo.a.test"))
    assert answer.get("type") == "result"
    # Not declared for that type and target: left to handle() (None: service-unavailable).
    assert service.route(iq("get", "x@echo.a.test"), None, JID.parse("x@echo.a.test")) is None
    assert service.route(iq("set", "echo.a.test"), None, JID.parse("echo.a.test")) is None


def test_two_service_handlers_for_one_iq_are_refused() -> None:
    from typing import Any

    from server.module import iq_get
    from server.services import ServiceModule

    class Twice(ServiceModule):
        name = "twice-test"
        identity = ("component", "generic")
        display_name = "Twice"

        @iq_get("urn:example:x", "x", to="service")
        def one(self, stanza: Any, _origin: Any, _to: JID) -> Any:
            return None

        @iq_get("urn:example:x", "x", to=("service", "service-bare"))
        def two(self, stanza: Any, _origin: Any, _to: JID) -> Any:
            return None

    with pytest.raises(ValueError, match="two handlers"):
        Twice(None, None)  # type: ignore[arg-type]

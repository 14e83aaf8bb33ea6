"""In-band registration (XEP-0077) over real sockets: with an invitation's token sent first as
XEP-0445 <preauth/> (what Conversations and Dino do), open mode throttled per address, mode
none; password change and account removal by the user; the welcome message; and the
subscription to the inviter (XEP-0379) after a pars registration, seen by slixmpp."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from lxml import etree

from server.modules.invites import new_invitation
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.rawclient import RawClient

TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
REGISTER = "jabber:iq:register"
DATA_FORMS = "jabber:x:data"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NEW = "a-long-new-password"


async def unauthenticated(running: RunningServer) -> tuple[RawClient, etree._Element]:
    """A stream after STARTTLS, before SASL: (client, features)."""
    client = await running.raw()
    features = await client.open("a.test")
    if features.find(f"{{{TLS_NS}}}starttls") is not None:
        await client.send(f"<starttls xmlns='{TLS_NS}'/>")
        await client.expect(f"{{{TLS_NS}}}proceed")
        await client.starttls()
        features = await client.open("a.test")
    return client, features


def condition(reply: etree._Element) -> str | None:
    if reply.get("type") != "error":
        return None
    error = reply.find("{jabber:client}error")
    assert error is not None
    return next(etree.QName(c).localname for c in error
                if etree.QName(c).namespace == STANZAS and etree.QName(c).localname != "text")


def register_iq(username: str, password: str) -> str:
    return (f"<iq type='set' id='r1'><query xmlns='{REGISTER}'><username>{username}</username>"
            f"<password>{password}</password></query></iq>")


def preauth_iq(token: str) -> str:
    return f"<iq type='set' id='p1'><preauth xmlns='urn:xmpp:pars:0' token='{token}'/></iq>"


async def make_invitation(running: RunningServer, inviter: str | None = "admin",
                          uses: int = 1, lifetime: float = 3600) -> str:
    invitation = new_invitation("a.test", inviter, uses=uses, lifetime=lifetime)
    await running.server.storage.invites.create(invitation)  # type: ignore[attr-defined]
    return invitation.token


async def can_log_in(running: RunningServer, jid: str, password: str) -> bool:
    client = await running.raw()
    try:
        await client.authenticate("a.test", jid.split("@")[0], password)
        return True
    except AssertionError:
        return False
    finally:
        await client.close()


@pytest.fixture
async def invite_server(tmp_path: Path) -> RunningServer:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_server(
        tmp_path, '[register]\nwelcome_message = "Welcome to $host, $username!"\n')
    await running.add_user("admin@a.test")
    try:
        yield running  # type: ignore[misc]
    finally:
        await stop_server(running)


async def test_pars_token_registers_and_subscribes(invite_server: RunningServer) -> None:
    running = invite_server
    token = await make_invitation(running)
    client, features = await unauthenticated(running)
    # XEP-0077 §4: the stream feature.
    assert features.find("{http://jabber.org/features/iq-register}register") is not None
    assert condition(await client.ask(preauth_iq(token))) is None  # XEP-0445 §3
    form = await client.ask(f"<iq type='get' id='g1'><query xmlns='{REGISTER}'/></iq>")
    assert form.get("type") == "result"
    query = form.find(f"{{{REGISTER}}}query")
    assert query is not None
    assert query.find(f"{{{REGISTER}}}username") is not None
    assert query.find(f"{{{REGISTER}}}password") is not None
    fields = query.findall(f"{{{DATA_FORMS}}}x/{{{DATA_FORMS}}}field")
    # XEP-0004: every field the user fills has a label; no token field is asked for now.
    assert {f.get("var"): f.get("label") for f in fields if f.get("type") != "hidden"} == {
        "username": "Username", "password": "Password"}
    reply = await client.ask(register_iq("juliet", NEW))
    assert reply.get("type") == "result", etree.tostring(reply)
    await client.close()
    # The token had one use.
    client, _features = await unauthenticated(running)
    assert condition(await client.ask(preauth_iq(token))) == "item-not-found"
    await client.close()

    juliet = await running.client("juliet@a.test", NEW)
    await juliet.get_roster()
    assert juliet.client_roster["admin@a.test"]["subscription"] == "both"
    _v, admins = await running.server.storage.rosters.load("admin", "a.test")
    assert [(i.contact, i.subscription) for i in admins] == [("juliet@a.test", "both")]


async def test_welcome_message_arrives(invite_server: RunningServer) -> None:
    running = invite_server
    token = await make_invitation(running, inviter=None)
    client, _features = await unauthenticated(running)
    assert condition(await client.ask(preauth_iq(token))) is None
    assert (await client.ask(register_iq("romeo", NEW))).get("type") == "result"
    await client.close()
    stored = await running.server.storage.offline.load("romeo", "a.test")
    assert len(stored) == 1 and b"Welcome to a.test, romeo!" in stored[0][1]
    assert (await running.server.storage.rosters.load("romeo", "a.test"))[1] == []


async def test_token_in_the_form_field(invite_server: RunningServer) -> None:
    running = invite_server
    token = await make_invitation(running)
    client, _features = await unauthenticated(running)
    form = await client.ask(f"<iq type='get' id='g1'><query xmlns='{REGISTER}'/></iq>")
    labels = {f.get("var"): f.get("label") for f in form.iter(f"{{{DATA_FORMS}}}field")}
    assert labels["token"] == "Invitation token"
    reply = await client.ask(
        f"<iq type='set' id='r1'><query xmlns='{REGISTER}'><x xmlns='{DATA_FORMS}' "
        f"type='submit'><field var='FORM_TYPE'><value>{REGISTER}</value></field>"
        f"<field var='username'><value>viaform</value></field>"
        f"<field var='password'><value>{NEW}</value></field>"
        f"<field var='token'><value>{token}</value></field></x></query></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    await client.close()
    assert await can_log_in(running, "viaform@a.test", NEW)


async def test_registration_errors(invite_server: RunningServer) -> None:
    running = invite_server
    await running.add_user("taken@a.test")
    token = await make_invitation(running, uses=5)
    expired = await make_invitation(running, lifetime=-1)
    client, _features = await unauthenticated(running)
    # Invite mode: no token, no account.
    assert condition(await client.ask(register_iq("nobody", NEW))) == "not-allowed"
    assert condition(await client.ask(preauth_iq("no-such-token-at-all"))) == "item-not-found"
    assert condition(await client.ask(preauth_iq(expired))) == "item-not-found"
    assert condition(await client.ask(preauth_iq(token))) is None
    assert condition(await client.ask(register_iq("taken", NEW))) == "conflict"
    assert condition(await client.ask(register_iq("TAKEN", NEW))) == "conflict"
    assert condition(await client.ask(register_iq("shorty", "short"))) == "not-acceptable"
    assert condition(await client.ask(register_iq("a b", NEW))) == "not-acceptable"
    assert condition(await client.ask(
        f"<iq type='set' id='r1'><query xmlns='{REGISTER}'><username>x</username></query></iq>"
    )) == "not-acceptable"
    assert condition(await client.ask(
        f"<iq type='set' id='r1'><query xmlns='{REGISTER}'><remove/></query></iq>"
    )) == "not-authorized"
    await client.close()
    invitation = await running.server.storage.invites.get(token)  # type: ignore[attr-defined]
    assert invitation.uses_left == 5  # refusals use nothing
    for user in ("nobody", "shorty", "a b"):
        assert not await running.server.storage.accounts.exists(user, "a.test")


async def test_mode_none(tmp_path: Path) -> None:
    running = await start_server(tmp_path, '[register]\nmode = "none"\n')
    try:
        await running.add_user("admin@a.test")
        token = await make_invitation(running)
        client, features = await unauthenticated(running)
        assert features.find("{http://jabber.org/features/iq-register}register") is None
        assert condition(await client.ask(
            f"<iq type='get' id='g1'><query xmlns='{REGISTER}'/></iq>")) == "service-unavailable"
        assert condition(await client.ask(preauth_iq(token))) == "item-not-found"
        assert condition(await client.ask(register_iq("someone", NEW))) == "not-allowed"
        await client.close()
        assert not await running.server.storage.accounts.exists("someone", "a.test")
    finally:
        await stop_server(running)


async def test_open_mode_is_throttled_per_address(tmp_path: Path) -> None:
    running = await start_server(tmp_path, '[register]\nmode = "open"\nopen_limit = 2\n')
    try:
        results = []
        for name in ("one", "two", "three"):
            client, _features = await unauthenticated(running)
            results.append(condition(await client.ask(register_iq(name, NEW))))
            await client.close()
        assert results == [None, None, "resource-constraint"]
        assert await can_log_in(running, "two@a.test", NEW)
        assert not await running.server.storage.accounts.exists("three", "a.test")
    finally:
        await stop_server(running)


async def test_stanzas_other_than_registration_still_need_authentication(
        invite_server: RunningServer) -> None:
    client, _features = await unauthenticated(invite_server)
    await client.send("<iq type='get' id='v1'><query xmlns='jabber:iq:version'/></iq>")
    assert await client.stream_error() == "not-authorized"


async def test_password_change_and_removal(invite_server: RunningServer) -> None:
    running = invite_server
    await running.add_user("alice@a.test")
    alice = await running.raw_login("alice@a.test")
    got = await alice.ask(f"<iq type='get' id='q1'><query xmlns='{REGISTER}'/></iq>",
                          skip_others=True)
    assert got.find(f"{{{REGISTER}}}query/{{{REGISTER}}}registered") is not None
    assert got.findtext(f"{{{REGISTER}}}query/{{{REGISTER}}}username") == "alice"
    # XEP-0077 §3.3: a new password.
    assert condition(await alice.ask(register_iq("alice", "short"), skip_others=True)) \
        == "not-acceptable"
    assert condition(await alice.ask(register_iq("admin", NEW), skip_others=True)) \
        == "not-allowed"
    assert condition(await alice.ask(register_iq("alice", NEW), skip_others=True)) is None
    assert await can_log_in(running, "alice@a.test", NEW)
    assert not await can_log_in(running, "alice@a.test", PASSWORD)
    # §3.2: removal answers, then the account and its streams go.
    reply = await alice.ask(f"<iq type='set' id='x1'><query xmlns='{REGISTER}'><remove/>"
                            "</query></iq>", skip_others=True)
    assert reply.get("type") == "result"
    assert await alice.stream_error() == "not-authorized"
    assert not await running.server.storage.accounts.exists("alice", "a.test")

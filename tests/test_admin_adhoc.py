"""XEP-0133 service administration over real sockets, driven by slixmpp's xep_0133/xep_0050
plugins as an admin of [admins], and refused for everyone else (server/modules/admin_adhoc.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import slixmpp

from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.rawclient import CLIENT

ADMIN = "http://jabber.org/protocol/admin"
CMD = "http://jabber.org/protocol/commands"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NODE_CREATE = "urn:xmpp:invite#create-account"
PLUGINS = ("xep_0030", "xep_0004", "xep_0050", "xep_0133")


@pytest.fixture
async def admin_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_server(tmp_path, top='admins = ["root@a.test"]')
    try:
        await running.add_user("root@a.test")
        await running.add_user("alice@a.test")
        yield running
    finally:
        await stop_server(running)


async def run(xmpp: slixmpp.ClientXMPP, name: str,
              values: dict[str, Any] | None = None) -> Any:
    """Run an XEP-0133 command with slixmpp: execute, then (values given) submit the form
    with complete. The last answer (an iq); an error answer raises CommandError."""
    loop = asyncio.get_running_loop()
    first: asyncio.Future[Any] = loop.create_future()
    session: dict[str, Any] = {
        "next": lambda iq, s: first.set_result(iq),
        "error": lambda iq, s: first.set_exception(CommandError(iq)),
    }
    getattr(xmpp.plugin["xep_0133"], name.replace("-", "_"))(session=session)
    iq = await asyncio.wait_for(first, 10)
    if values is None:
        return iq
    assert iq["command"]["status"] == "executing", iq
    asked = iq["command"]["form"]
    assert asked["type"] == "form"
    for var, field in asked.get_fields().items():  # XEP-0004 §3.2: labels on what is shown
        assert field["type"] == "hidden" or field["label"], var
    form = xmpp.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", ftype="hidden", value=ADMIN)
    for var, value in values.items():
        form.add_field(var=var, value=value)
    second: asyncio.Future[Any] = loop.create_future()
    session["payload"] = form
    session["next"] = lambda iq, s: second.set_result(iq)
    session["error"] = lambda iq, s: second.set_exception(CommandError(iq))
    xmpp.plugin["xep_0050"].complete_command(session)
    return await asyncio.wait_for(second, 10)


class CommandError(Exception):
    def __init__(self, iq: Any) -> None:
        super().__init__(str(iq))
        self.condition = iq["error"]["condition"]
        # slixmpp files an error answer (no sessionid) under "client:" and would hand the
        # next command's answer to this one's handlers: forget it, as a client UI would.
        iq.stream.plugin["xep_0050"].sessions.pop("client:", None)


async def login_fails(server: RunningServer, jid: str, password: str) -> bool:
    try:
        await server.client(jid, password)
    except AssertionError:
        return True
    return False


async def wait_disconnected(xmpp: slixmpp.ClientXMPP) -> None:
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    xmpp.add_event_handler("disconnected",
                           lambda _e: gone.done() or gone.set_result(None))
    await asyncio.wait_for(gone, 10)


async def test_admin_lists_and_runs_the_commands(admin_server: RunningServer) -> None:
    server = admin_server
    root = await server.client("root@a.test", plugins=PLUGINS)
    items = await asyncio.wait_for(root.plugin["xep_0133"].get_commands(), 5)
    nodes = {i[1]: i[2] for i in items["disco_items"]["items"]}
    for name in ("get-registered-users-num", "get-registered-users-list", "add-user",
                 "delete-user", "end-user-session", "change-user-password",
                 "get-online-users-num", "get-online-users-list", "announce", "set-motd",
                 "edit-motd", "delete-motd"):
        assert f"{ADMIN}#{name}" in nodes, name
    assert nodes["watchers"] == "Who watches my presence"  # adhoc's own are still there
    info = await asyncio.wait_for(root.plugin["xep_0030"].get_info(
        slixmpp.JID("a.test"), node=f"{ADMIN}#add-user"), 5)
    assert ("automation", "command-node", None, "Add User") in \
        info["disco_info"]["identities"]

    # add-user: the new account logs in with the password given.
    done = await run(root, "add-user", {"accountjid": "bob@a.test", "password": "bob-pw-1",
                                        "password-verify": "bob-pw-1"})
    assert done["command"]["status"] == "completed"
    assert await server.server.storage.accounts.exists("bob", "a.test")
    bob = await server.client("bob@a.test", "bob-pw-1", plugins=("xep_0030",))

    # get-online-users-num / -list: root, bob (alice is not online).
    done = await run(root, "get-online-users-num")
    assert done["command"]["status"] == "completed"
    assert done["command"]["form"].get_fields()["onlineusersnum"]["value"] == "2"
    done = await run(root, "get-online-users-list", {"max_items": "25"})
    listed = done["command"]["form"].get_fields()["onlineuserjids"]["value"]
    assert sorted(str(j) for j in listed) == ["bob@a.test", "root@a.test"]
    done = await run(root, "get-registered-users-num")
    assert done["command"]["form"].get_fields()["registeredusersnum"]["value"] == "3"
    done = await run(root, "get-registered-users-list", {"max_items": "none"})
    listed = done["command"]["form"].get_fields()["registereduserjids"]["value"]
    assert [str(j) for j in listed] == ["alice@a.test", "bob@a.test", "root@a.test"]

    # announce: a message from the domain reaches every online session.
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    bob.add_event_handler("message", lambda m: got.done() or got.set_result(m))
    await run(root, "announce", {"announcement": "maintenance at noon"})
    message = await asyncio.wait_for(got, 5)
    assert message["body"] == "maintenance at noon" and str(message["from"]) == "a.test"

    # change-user-password: the new one works, the old one no longer does.
    await run(root, "change-user-password", {"accountjid": "bob@a.test",
                                             "password": "bob-pw-2"})
    assert await login_fails(server, "bob@a.test", "bob-pw-1")
    await server.client("bob@a.test", "bob-pw-2", resource="second")

    # end-user-session: bob's sessions are closed by the server.
    closed = asyncio.ensure_future(wait_disconnected(bob))
    done = await run(root, "end-user-session", {"accountjids": ["bob@a.test"]})
    assert done["command"]["status"] == "completed"
    await closed
    for _ in range(100):  # both of bob's sessions, unbound once their streams closed
        if not server.server.sessions.is_online(_jid("bob@a.test")):
            break
        await asyncio.sleep(0.05)
    assert not server.server.sessions.is_online(_jid("bob@a.test"))

    # delete-user: gone, and cannot log in.
    await run(root, "delete-user", {"accountjids": ["bob@a.test"]})
    assert not await server.server.storage.accounts.exists("bob", "a.test")
    assert await login_fails(server, "bob@a.test", "bob-pw-2")


def _jid(text: str) -> Any:
    from server.jid import JID
    return JID.parse(text)


async def test_refused_for_non_admins(admin_server: RunningServer) -> None:
    server = admin_server
    alice = await server.client("alice@a.test", plugins=PLUGINS)
    items = await asyncio.wait_for(alice.plugin["xep_0133"].get_commands(), 5)
    nodes = [i[1] for i in items["disco_items"]["items"]]
    assert not [n for n in nodes if n.startswith(ADMIN)]
    with pytest.raises(CommandError) as refused:
        await run(alice, "add-user")
    assert refused.value.condition == "forbidden"
    with pytest.raises(CommandError) as refused:
        await run(alice, "get-online-users-num")
    assert refused.value.condition == "forbidden"
    # Submitting the form straight away is refused too, and changes nothing.
    raw = await server.raw_login("alice@a.test")
    reply = await raw.ask(
        f"<iq type='set' id='x1' to='a.test'><command xmlns='{CMD}' "
        f"node='{ADMIN}#add-user' action='complete'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='accountjid'><value>mallory@a.test</value></field>"
        "<field var='password'><value>pw</value></field>"
        "<field var='password-verify'><value>pw</value></field></x></command></iq>")
    assert reply.find(f"{{{CLIENT}}}error/{{{STANZAS}}}forbidden") is not None
    assert not await server.server.storage.accounts.exists("mallory", "a.test")


async def test_bad_input_gets_stanza_errors(admin_server: RunningServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    server = admin_server
    root = await server.raw_login("root@a.test")

    async def ask(node: str, body: str = "", attrs: str = "action='complete'") -> Any:
        return await root.ask(
            f"<iq type='set' id='b' to='a.test'><command xmlns='{CMD}' node='{ADMIN}#{node}' "
            f"{attrs}>{body}</command></iq>", skip_others=True)

    def form(**fields: str) -> str:
        inner = "".join(f"<field var='{k.replace('password_', 'password-')}'><value>{v}</value></field>"
                        for k, v in fields.items())
        return f"<x xmlns='jabber:x:data' type='submit'>{inner}</x>"

    def condition(reply: Any) -> str | None:
        error = reply.find(f"{{{CLIENT}}}error")
        return None if error is None else error[0].tag.split("}")[1]

    assert condition(await ask("add-user", form(accountjid="x@a.test", password="a",
                                                password_verify="b"))) == "not-acceptable"
    assert condition(await ask("add-user", form(accountjid="x@elsewhere.test", password="a",
                                                password_verify="a"))) == "bad-request"
    assert condition(await ask("add-user", form(accountjid="@@", password="a",
                                                password_verify="a"))) == "jid-malformed"
    assert condition(await ask("add-user", form(accountjid="alice@a.test", password="a",
                                                password_verify="a"))) == "conflict"
    assert condition(await ask("add-user", form(password="a"))) == "bad-request"
    assert condition(await ask("change-user-password", form(
        accountjid="nobody@a.test", password="a"))) == "item-not-found"
    assert condition(await ask("delete-user", form(accountjids="nobody@a.test"))) == \
        "item-not-found"
    assert condition(await ask("get-online-users-list", form(max_items="7"))) == "bad-request"
    # XEP-0050 §4.6: an unknown session id, and a form-less "complete".
    assert condition(await ask("announce", form(announcement="hi"),
                               "action='complete' sessionid='made-up'")) == "bad-request"
    assert condition(await ask("announce")) == "bad-request"
    assert condition(await ask("nope", attrs="action='execute'")) == "item-not-found"
    # A form asked for, then cancelled: the session is gone.
    asked = await ask("announce", attrs="action='execute'")
    command = asked.find(f"{{{CMD}}}command")
    assert command.get("status") == "executing"
    sessionid = command.get("sessionid")
    cancelled = await ask("announce", attrs=f"action='cancel' sessionid='{sessionid}'")
    assert cancelled.find(f"{{{CMD}}}command").get("status") == "canceled"
    assert condition(await ask("announce", form(announcement="hi"),
                               f"action='complete' sessionid='{sessionid}'")) == "bad-request"
    assert "Traceback" not in caplog.text


async def no_message_at_login(client: Any, domain: str) -> None:
    """Initial presence, then a ping: nothing but presence comes before the pong."""
    await client.send(f"<presence/><iq type='get' id='p' to='{domain}'>"
                      "<ping xmlns='urn:xmpp:ping'/></iq>")
    while (el := await client.next()).tag != f"{{{CLIENT}}}iq":
        assert el.tag != f"{{{CLIENT}}}message"


async def test_message_of_the_day_survives_a_restart(tmp_path: Path) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_server(tmp_path, top='admins = ["root@a.test"]')
    try:
        await running.add_user("root@a.test")
        await running.add_user("alice@a.test")
        root = await running.client("root@a.test", plugins=PLUGINS)
        await run(root, "set-motd", {"motd": ["Welcome to a.test", "Be nice."]})
        raw = await running.raw_login("alice@a.test")
        await raw.send("<presence/>")
        message = await raw.next_of("message")
        assert message.get("from") == "a.test"
        assert message.findtext(f"{{{CLIENT}}}body") == "Welcome to a.test\nBe nice."
        # The form of edit-motd is the same; b.test has none.
        await running.add_user("carol@b.test")
        carol = await running.raw_login("carol@b.test")
        await no_message_at_login(carol, "b.test")
    finally:
        await stop_server(running)
    running = await start_server(tmp_path, top='admins = ["root@a.test"]')
    try:
        raw = await running.raw_login("alice@a.test")
        await raw.send("<presence/>")
        message = await raw.next_of("message")
        assert message.findtext(f"{{{CLIENT}}}body") == "Welcome to a.test\nBe nice."
        root = await running.client("root@a.test", PASSWORD, plugins=PLUGINS)
        shown: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        root.plugin["xep_0133"].edit_motd(session={
            "next": lambda iq, s: shown.set_result(iq), "error": lambda iq, s: None})
        form = (await asyncio.wait_for(shown, 10))["command"]["form"]
        assert form.get_fields()["motd"]["value"] == ["Welcome to a.test", "Be nice."]
        root.plugin["xep_0050"].sessions.clear()
        done = await run(root, "delete-motd")
        assert done["command"]["status"] == "completed"
        again = await running.raw_login("alice@a.test", resource="again")
        await no_message_at_login(again, "a.test")
    finally:
        await stop_server(running)


async def test_message_of_the_day_changes_reach_the_next_login(
        admin_server: RunningServer) -> None:
    """The message of the day is cached per domain: set, edit and delete replace the copy."""
    server = admin_server
    first = await server.raw_login("alice@a.test", resource="r0")
    await no_message_at_login(first, "a.test")  # none yet: "none" is what is cached
    root = await server.client("root@a.test", plugins=PLUGINS)
    for n, text in enumerate(("Welcome", "Welcome, edited"), 1):
        await run(root, "set-motd", {"motd": [text]})
        root.plugin["xep_0050"].sessions.clear()
        raw = await server.raw_login("alice@a.test", resource=f"r{n}")
        await raw.send("<presence/>")
        message = await raw.next_of("message")
        assert message.findtext(f"{{{CLIENT}}}body") == text
    await run(root, "delete-motd")
    last = await server.raw_login("alice@a.test", resource="r9")
    await no_message_at_login(last, "a.test")


async def test_admin_creates_an_invitation(admin_server: RunningServer) -> None:
    """XEP-0401 §3.2 urn:xmpp:invite#create-account: the link and xmpp: URI, a token that
    registers over XEP-0077 (pars), and the new account and the admin are contacts."""
    from tests.test_register import NEW, condition, preauth_iq, register_iq, unauthenticated

    server = admin_server
    root = await server.client("root@a.test", plugins=PLUGINS)
    items = await asyncio.wait_for(root.plugin["xep_0050"].get_commands("a.test"), 5)
    assert NODE_CREATE in [i[1] for i in items["disco_items"]["items"]]
    loop = asyncio.get_running_loop()
    asked: asyncio.Future[Any] = loop.create_future()
    session: dict[str, Any] = {"next": lambda iq, s: asked.set_result(iq),
                               "error": lambda iq, s: asked.set_exception(CommandError(iq))}
    root.plugin["xep_0050"].start_command("a.test", NODE_CREATE, session)
    form = (await asyncio.wait_for(asked, 10))["command"]["form"]
    assert all(f["label"] for f in form.get_fields().values() if f["type"] != "hidden")
    submit = root.plugin["xep_0004"].make_form(ftype="submit")
    for var, value in (("uses", "2"), ("expires", "1d"), ("group", "Friends")):
        submit.add_field(var=var, value=value)
    done: asyncio.Future[Any] = loop.create_future()
    session.update(payload=submit, next=lambda iq, s: done.set_result(iq),
                   error=lambda iq, s: done.set_exception(CommandError(iq)))
    root.plugin["xep_0050"].complete_command(session)
    result = (await asyncio.wait_for(done, 10))["command"]["form"].get_fields()
    uri = result["uri"]["value"]
    assert uri.startswith("xmpp:root@a.test?roster;preauth=")
    token = uri.split("preauth=")[1].split(";")[0]
    assert result["landing-url"]["value"].endswith(f"/invite/{token}")
    invitation = await server.server.storage.invites.get(token)  # type: ignore[attr-defined]
    assert (invitation.inviter, invitation.uses_left, invitation.group) == ("root", 2, "Friends")
    assert 86000 < invitation.expires - invitation.created <= 86400

    client, _features = await unauthenticated(server)
    assert condition(await client.ask(preauth_iq(token))) is None
    reply = await client.ask(register_iq("juliet", NEW))
    assert reply.get("type") == "result"
    await client.close()
    _v, roster = await server.server.storage.rosters.load("root", "a.test")
    assert [(i.contact, i.subscription) for i in roster] == [("juliet@a.test", "both")]

    # Bad input, and non-admins (XEP-0401 §3.2 is for admins).
    raw = await server.raw_login("root@a.test", resource="raw")
    for fields in ("<field var='uses'><value>0</value></field>",
                   "<field var='uses'><value>1e3</value></field>",
                   "<field var='expires'><value>soon</value></field>"):
        reply = await raw.ask(
            f"<iq type='set' id='i' to='a.test'><command xmlns='{CMD}' node='{NODE_CREATE}' "
            f"action='complete'><x xmlns='jabber:x:data' type='submit'>{fields}</x></command>"
            "</iq>", skip_others=True)
        assert reply.find(f"{{{CLIENT}}}error/{{{STANZAS}}}bad-request") is not None, fields
    alice = await server.raw_login("alice@a.test")
    reply = await alice.ask(
        f"<iq type='set' id='i' to='a.test'><command xmlns='{CMD}' node='{NODE_CREATE}' "
        "action='execute'/></iq>")
    assert reply.find(f"{{{CLIENT}}}error/{{{STANZAS}}}forbidden") is not None

"""Invitations (XEP-0401), their page and form, and XEP-0379 mutual subscription, over real
sockets: the CLI makes the invitation (a real `presenced` process on the same database), the
page is fetched over HTTPS (aiohttp; Debian's Chromium in the browser test), the new account
logs in with slixmpp and finds its inviter subscribed both ways."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lxml import etree

from server.app import Server
from server.config import load_config
from server.modules.invites import new_invitation
from server.storage.invites import Invitation
from tests.conftest import RunningServer, stop_server, write_config
from tests.process import free_port, presenced
from tests.test_browser import BROWSER_DIR, STEP_TIMEOUT, _line, browser_ready

__all__ = ["browser_ready"]  # the fixture, imported for the browser test

NEW_PASSWORD = "a-long-new-password"
DATA_FORMS = "jabber:x:data"


async def start_invites(tmp: Path, extra: str = "", top: str = 'admins = ["admin@a.test"]'
                        ) -> RunningServer:
    """A server with an HTTPS listener on a fixed free port (the CLI prints links with it)."""
    path = write_config(tmp, extra, top)
    port = free_port()
    path.write_text(path.read_text().replace("https = []", f'https = ["127.0.0.1:{port}"]', 1))
    server = Server(load_config(path))
    await server.start()
    return RunningServer(server, tmp / "data", path)


def cli_invite(running: RunningServer, *args: str) -> tuple[str, str, str]:
    """(page link, xmpp: URI, summary) printed by `presenced invite create`."""
    done = subprocess.run(presenced("invite", "create", "--config", str(running.config_path),
                                    *args), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    link, uri, summary = done.stdout.strip().splitlines()
    return link, uri, summary


def local_url(link: str) -> str:
    """The link's path on the test server (a.test does not resolve here)."""
    return re.sub(r"^https://a\.test:", "https://127.0.0.1:", link)


def web() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False),
                                 cookie_jar=aiohttp.CookieJar(unsafe=True))


async def open_page(http: aiohttp.ClientSession, link: str) -> tuple[int, str]:
    async with http.get(local_url(link)) as response:
        return response.status, await response.text()


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found is not None, page
    return found.group(1)


async def post_form(http: aiohttp.ClientSession, link: str, username: str,
                    password: str = NEW_PASSWORD, again: str | None = None, *,
                    csrf: str | None = None, headers: dict[str, str] | None = None
                    ) -> tuple[int, str]:
    if csrf is None:
        status, page = await open_page(http, link)
        assert status == 200, page
        csrf = csrf_of(page)
    form = {"csrf": csrf, "username": username, "password": password,
            "password2": password if again is None else again}
    async with http.post(local_url(link), data=form, headers=headers or {}) as response:
        return response.status, await response.text()


async def roster_of(xmpp: Any) -> dict[str, str]:
    await xmpp.get_roster()
    own = xmpp.boundjid.bare  # slixmpp lists the account itself
    return {str(jid): xmpp.client_roster[jid]["subscription"] for jid in xmpp.client_roster
            if str(jid) != own}


@pytest.fixture
async def web_server(tmp_path: Path) -> Any:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_invites(tmp_path, "[invites]\nform_limit = 100\n")
    await running.add_user("admin@a.test")
    try:
        yield running
    finally:
        await stop_server(running)


# -- the whole way, as an invited person takes it ------------------------------------------------


async def test_cli_invitation_page_form_account_subscribed(web_server: RunningServer) -> None:
    running = web_server
    admin = await running.client("admin@a.test")
    assert await roster_of(admin) == {}
    pushes: asyncio.Queue[Any] = asyncio.Queue()
    admin.add_event_handler("roster_update", pushes.put_nowait)
    seen: asyncio.Queue[str] = asyncio.Queue()
    admin.add_event_handler("presence_available", lambda p: seen.put_nowait(str(p["from"])))

    link, uri, summary = cli_invite(running, "--group", "Friends")
    port = running.address("https")[1]
    token = link.rsplit("/", 1)[1]
    assert link == f"https://a.test:{port}/invite/{token}"
    # XEP-0401 §3.1: from an account, a roster URI that allows in-band registration.
    assert uri == f"xmpp:admin@a.test?roster;preauth={token};ibr=y"
    assert "from admin@a.test" in summary and "1 use(s)" in summary

    async with web() as http:
        status, page = await open_page(http, link)
        assert status == 200
        assert "admin@a.test</strong> invites you" in page
        assert f'href="{uri}"' in page  # the button opening the xmpp: URI
        for field in ("username", "password", "password2"):  # a label for every field
            assert f'<label for="{field}">' in page and f'id="{field}"' in page
        assert "at least 8 characters" in page  # the rules are shown
        status, done = await post_form(http, link, "newbie")
        assert status == 201, done
        assert "newbie@a.test" in done
        # The invitation had one use: the page is gone now.
        status, _page = await open_page(http, link)
        assert status == 404

    # XEP-0401 §3.5: the inviter gets the roster push at once.
    update = await asyncio.wait_for(pushes.get(), 10)
    assert update["roster"]["items"]["newbie@a.test"]["subscription"] == "both"
    assert update["roster"]["items"]["newbie@a.test"]["groups"] == ["Friends"]

    newbie = await running.client("newbie@a.test", NEW_PASSWORD)
    assert await roster_of(newbie) == {"admin@a.test": "both"}
    assert newbie.client_roster["admin@a.test"]["groups"] == ["Friends"]
    # Presence flows both ways: the inviter sees the new account come online...
    assert (await asyncio.wait_for(seen.get(), 10)).startswith("newbie@a.test/")
    # ... and the new account got the inviter's presence (its probe was answered).
    for _ in range(100):
        if newbie.client_roster["admin@a.test"].resources:
            break
        await asyncio.sleep(0.05)
    assert newbie.client_roster["admin@a.test"].resources


async def test_invitation_from_a_named_user_and_from_nobody(web_server: RunningServer) -> None:
    running = web_server
    await running.add_user("carol@a.test")
    link, uri, _summary = cli_invite(running, "--from", "carol@a.test", "--uses", "2")
    assert uri.startswith("xmpp:carol@a.test?roster;preauth=")
    link2, uri2, summary2 = cli_invite(running, "--no-contact")
    assert re.fullmatch(r"xmpp:a\.test\?register;preauth=[A-Za-z0-9_-]+", uri2)
    assert "from nobody" in summary2
    async with web() as http:
        assert (await post_form(http, link, "dave"))[0] == 201
        assert (await post_form(http, link, "erin"))[0] == 201   # two uses
        assert (await open_page(http, link))[0] == 404
        assert (await post_form(http, link2, "frank"))[0] == 201
    rosters = running.server.storage.rosters
    _v, carols = await rosters.load("carol", "a.test")
    assert {i.contact: i.subscription for i in carols} == {"dave@a.test": "both",
                                                            "erin@a.test": "both"}
    assert (await rosters.load("frank", "a.test"))[1] == []
    assert (await rosters.load("admin", "a.test"))[1] == []


def test_cli_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    for args, message in ((["--from", "ghost@a.test"], "no such user: ghost@a.test"),
                          (["--from", "x@elsewhere.test"], "not a domain of this server"),
                          (["--admin"], "no account of `admins`"),
                          (["--expires", "soon"], "not a duration"),
                          (["--uses", "0"], "not a number from 1")):
        done = subprocess.run(presenced("invite", "create", "--config", str(path), *args),
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode != 0, args
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


# -- what the form refuses ------------------------------------------------------------------------


async def test_form_errors(web_server: RunningServer) -> None:
    running = web_server
    await running.add_user("taken@a.test")
    link, _uri, _summary = cli_invite(running)
    async with web() as http:
        for username, password, again, status, text in (
                ("taken", NEW_PASSWORD, None, 409, "this username is taken"),
                ("Taken", NEW_PASSWORD, None, 409, "this username is taken"),  # normalised
                ("ok", "short", None, 400, "at least 8 characters"),
                ("ok", NEW_PASSWORD, NEW_PASSWORD + "x", 400, "not the same"),
                ("no spaces", NEW_PASSWORD, None, 400, "the username must be"),
                ("<script>alert(1)</script>", NEW_PASSWORD, None, 400,
                 "the username must be")):
            got, page = await post_form(http, link, username, password, again)
            assert (got, text in page) == (status, True), (username, page)
            assert "<script>" not in page  # everything echoed is escaped
        assert "&lt;script&gt;" in page
        # Nothing was used up by the refusals.
        assert (await open_page(http, link))[0] == 200
        # CSRF: no field, a wrong one, or a foreign Origin.
        status, page = await open_page(http, link)
        csrf = csrf_of(page)
        assert (await post_form(http, link, "ok", csrf="0" * 64))[0] == 403
        assert (await post_form(http, link, "ok", csrf=csrf,
                                headers={"Origin": "https://evil.example"}))[0] == 403
    async with web() as other:  # another browser: no cookie, so the field is worthless
        assert (await post_form(other, link, "ok", csrf=csrf))[0] == 403
    assert not await running.server.storage.accounts.exists("ok", "a.test")


async def test_used_unknown_and_expired_invitations(web_server: RunningServer) -> None:
    running = web_server
    # Made here rather than by the CLI, whose start may take longer than the lifetime.
    invitation = new_invitation("a.test", "admin", uses=1, lifetime=2)
    await running.server.storage.invites.create(invitation)  # type: ignore[attr-defined]
    port = running.address("https")[1]
    link = f"https://a.test:{port}/invite/{invitation.token}"
    async with web() as http:
        status, page = await open_page(http, link)
        assert status == 200
        await asyncio.sleep(max(0.0, invitation.expires - time.time()) + 0.1)
        status, page = await open_page(http, link)
        assert status == 404 and "not valid" in page
        assert (await open_page(http, link[:-3] + "AAA"))[0] == 404
        assert (await open_page(http, link.rsplit("/", 1)[0] + "/<x>"))[0] == 404


async def test_form_posts_are_rate_limited_per_address(tmp_path: Path) -> None:
    running = await start_invites(tmp_path, "[invites]\nform_limit = 3\n")
    try:
        await running.add_user("admin@a.test")
        link, _uri, _summary = cli_invite(running)
        async with web() as http:
            statuses = [(await post_form(http, link, "x", "short"))[0] for _ in range(4)]
            assert statuses == [400, 400, 400, 429]
    finally:
        await stop_server(running)


async def test_mode_none_has_no_form_and_refuses(tmp_path: Path) -> None:
    running = await start_invites(tmp_path, '[register]\nmode = "none"\n')
    try:
        await running.add_user("admin@a.test")
        link, uri, _summary = cli_invite(running)
        assert not uri.endswith(";ibr=y")  # XEP-0401 §3.1: no in-band registration
        async with web() as http:
            status, page = await open_page(http, link)
            assert status == 200 and "<form" not in page
            cookie_page_csrf = re.search(r'name="csrf"', page)
            assert cookie_page_csrf is None
    finally:
        await stop_server(running)


# -- users ask for invitations (XEP-0401 §3.1 ad-hoc command) ------------------------------------


async def execute(client: Any, node: str) -> etree._Element:
    return await client.ask(
        "<iq type='set' id='x1' to='a.test'><command xmlns='http://jabber.org/protocol/commands'"
        f" node='{node}' action='execute'/></iq>", skip_others=True)


async def test_users_ask_for_invitations_by_adhoc(tmp_path: Path) -> None:
    running = await start_invites(tmp_path, "[invites]\nallow_users = true\n")
    try:
        await running.add_user("alice@a.test")
        alice = await running.raw_login("alice@a.test")
        items = await alice.ask("<iq type='get' id='d1' to='a.test'><query xmlns='http://jabber."
                                "org/protocol/disco#items' node='http://jabber.org/protocol/"
                                "commands'/></iq>", skip_others=True)
        assert "urn:xmpp:invite#invite" in etree.tostring(items).decode()
        reply = await execute(alice, "urn:xmpp:invite#invite")
        assert reply.get("type") == "result", etree.tostring(reply)
        values = {f.get("var"): f.findtext(f"{{{DATA_FORMS}}}value")
                  for f in reply.iter(f"{{{DATA_FORMS}}}field")}
        assert values["FORM_TYPE"] == "urn:xmpp:invite#invitation"
        found = re.fullmatch(r"xmpp:alice@a\.test\?roster;preauth=([A-Za-z0-9_-]+);ibr=y",
                             values["uri"] or "")
        assert found is not None, values
        token = found.group(1)
        port = running.address("https")[1]
        assert values["landing-url"] in (f"https://127.0.0.1:{port}/invite/{token}",)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", values["expire"] or "")
        invitation = await running.server.storage.invites.get(token)  # type: ignore[attr-defined]
        assert isinstance(invitation, Invitation)
        assert invitation.inviter == "alice" and invitation.uses_left == 1
        assert 604700 < invitation.expires - time.time() <= 604800
        await alice.close()
    finally:
        await stop_server(running)


async def test_adhoc_invitations_off_by_default(web_server: RunningServer) -> None:
    alice = await web_server.raw_login("admin@a.test")
    reply = await execute(alice, "urn:xmpp:invite#invite")
    assert reply.get("type") == "error"
    assert reply.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found") is not None
    await alice.close()


# -- XEP-0157 --------------------------------------------------------------------------------------


async def test_contact_addresses_in_disco_info(tmp_path: Path) -> None:
    running = await start_invites(
        tmp_path, '[contact_info]\nabuse = ["mailto:abuse@a.test", "xmpp:abuse@a.test"]\n'
                  'admin = ["xmpp:admin@a.test"]\n')
    try:
        await running.add_user("alice@a.test")
        alice = await running.raw_login("alice@a.test")
        info = await alice.ask("<iq type='get' id='i1' to='a.test'><query xmlns='http://jabber."
                               "org/protocol/disco#info'/></iq>", skip_others=True)
        forms = info.findall(f".//{{{DATA_FORMS}}}x")
        assert len(forms) == 1
        fields = {f.get("var"): [v.text for v in f.findall(f"{{{DATA_FORMS}}}value")]
                  for f in forms[0].findall(f"{{{DATA_FORMS}}}field")}
        assert fields == {"FORM_TYPE": ["http://jabber.org/network/serverinfo"],
                          "abuse-addresses": ["mailto:abuse@a.test", "xmpp:abuse@a.test"],
                          "admin-addresses": ["xmpp:admin@a.test"]}
        await alice.close()
    finally:
        await stop_server(running)


async def test_no_contact_addresses_no_form(web_server: RunningServer) -> None:
    alice = await web_server.raw_login("admin@a.test")
    info = await alice.ask("<iq type='get' id='i1' to='a.test'><query xmlns='http://jabber."
                           "org/protocol/disco#info'/></iq>", skip_others=True)
    assert info.find(f".//{{{DATA_FORMS}}}x") is None
    await alice.close()


# -- in Debian's Chromium -------------------------------------------------------------------------


async def test_invitation_in_chromium(tmp_path: Path, browser_ready: None) -> None:
    """The CLI's link opens in Chromium (a.test mapped to loopback), which shows the client for
    its platform and the xmpp: button, and registers through the form by its labels; the
    account logs in with slixmpp, subscribed to the inviter."""
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_invites(tmp_path)
    process: asyncio.subprocess.Process | None = None
    try:
        await running.add_user("admin@a.test")
        link, uri, _summary = cli_invite(running)
        options = {"url": link, "username": "browsed", "password": NEW_PASSWORD,
                   "resolve": "a.test", "timeoutMs": int(STEP_TIMEOUT * 1000)}
        process = await asyncio.create_subprocess_exec(
            "node", str(BROWSER_DIR / "invite.mjs"), json.dumps(options),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert process.stdout is not None and process.stderr is not None
        out: list[str] = []
        try:
            button = await _line(process.stdout, out)
            assert button == f"button {uri}", out
            assert await _line(process.stdout, out) == "registered browsed@a.test", out
            assert await asyncio.wait_for(process.wait(), STEP_TIMEOUT) == 0
        except (AssertionError, TimeoutError) as exc:
            errors = (await process.stderr.read()).decode()[-4000:]
            raise AssertionError(f"{exc}\nstdout: {out}\nstderr: {errors}") from exc
        newbie = await running.client("browsed@a.test", NEW_PASSWORD)
        assert await roster_of(newbie) == {"admin@a.test": "both"}
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        await stop_server(running)



"""The admin web page (/admin, server/modules/webadmin.py) over real sockets: an aiohttp client
logs in with an admin's XMPP password, is refused without TLS, without the form token, from a
foreign origin, as a non-admin, and after too many failures; each action on the accounts page
is checked over XMPP (slixmpp logs in with the new account or password; a removed account's
session ends); the online, server-link and room pages show what the server has; the graphs are
SVG pictures of the samples. The pure pieces (ring buffer, SVG, cookie signer) get direct unit
tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from lxml import etree

from server.app import Server
from server.config import load_config
from server.http.admin import CookieSigner, History, Ticket, svg_chart
from server.stream.scram import derive_credentials
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server, write_config
from tests.process import free_ports
from tests.rawclient import insecure_context
from tests.test_browser import BROWSER_DIR, STEP_TIMEOUT, browser_ready  # noqa: F401 (fixture)
from tests.test_http import start_web, url
from tests.test_register import condition, preauth_iq, register_iq, unauthenticated
from tests.test_storage_failures import fill, mounted_tmpfs

ADMINS = 'admins = ["root@a.test"]'
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Browser:
    """An aiohttp session with a cookie jar that keeps cookies of 127.0.0.1 (unsafe=True)."""

    def __init__(self, running: RunningServer, kind: str = "https") -> None:
        self.running = running
        self.kind = kind
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def close(self) -> None:
        await self.session.close()

    def url(self, path: str) -> str:
        return url(self.running, path, self.kind)

    async def get(self, path: str, **kw: object) -> tuple[aiohttp.ClientResponse, str]:
        async with self.session.get(self.url(path), ssl=insecure_context(),
                                    allow_redirects=False, **kw) as response:  # type: ignore[arg-type]
            text = await response.text()
        found = _CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return response, text

    async def post(self, path: str, data: dict[str, str], *, csrf: str | None = None,
                   headers: dict[str, str] | None = None) -> tuple[aiohttp.ClientResponse, str]:
        form = dict(data)
        form.setdefault("csrf", self.csrf if csrf is None else csrf)
        async with self.session.post(self.url(path), data=form, ssl=insecure_context(),
                                     allow_redirects=False, headers=headers or {}) as response:
            text = await response.text()
        found = _CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return response, text

    async def login(self, jid: str, password: str = PASSWORD) -> aiohttp.ClientResponse:
        response, _ = await self.get("/admin/login")
        assert response.status == 200
        response, _ = await self.post("/admin/login", {"jid": jid, "password": password})
        return response


@pytest.fixture
async def web(tmp_path: Path) -> AsyncIterator[RunningServer]:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_web(tmp_path, top=ADMINS)
    await running.add_user("root@a.test")
    await running.add_user("bob@a.test")
    try:
        yield running
    finally:
        await stop_server(running)


@pytest.fixture
async def admin(web: RunningServer) -> AsyncIterator[Browser]:
    browser = Browser(web)
    try:
        response = await browser.login("root@a.test")
        assert response.status == 303, await response.text()
        assert response.headers["Location"] == "/admin"
        response, _ = await browser.get("/admin")  # the session's form token
        assert response.status == 200
        yield browser
    finally:
        await browser.close()


async def test_login_sets_a_strict_cookie_and_shows_the_pages(web: RunningServer) -> None:
    browser = Browser(web)
    try:
        response, text = await browser.get("/admin/accounts")
        assert response.status == 303 and response.headers["Location"] == "/admin/login"
        response = await browser.login("root")  # a bare localpart: the first domain
        assert response.status == 303
        cookie = next(c for c in response.headers.getall("Set-Cookie")
                      if c.startswith("presenced_admin="))
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "secure", "path"} <= attributes
        assert "samesite=strict" in cookie.lower()
        assert "Path=/admin" in cookie
        # The cookie is signed, not a password: neither it nor the data dir holds one.
        assert PASSWORD not in cookie
        # Its key is in the database, shared by every node (server/storage/keystore.py).
        key = await web.server.storage.secrets.get("webadmin-cookie")
        assert key is not None and len(key) >= 32
        assert not (web.data_dir / "webadmin-cookie.key").exists()
        for path, expected in (("/admin", "Overview"), ("/admin/accounts", "bob@a.test"),
                               ("/admin/online", "Nobody is online"),
                               ("/admin/s2s", "No server-to-server link"),
                               ("/admin/rooms", "No room")):
            response, text = await browser.get(path)
            assert response.status == 200, (path, text)
            assert expected in text, path
            assert "script-src" not in response.headers["Content-Security-Policy"]
            assert response.headers["Cache-Control"] == "no-store"
        response, text = await browser.get("/admin")
        assert text.count("<svg") == 4
        for title in ("Messages routed per second", "Client sessions",
                      "Server-to-server links", "Memory (resident)"):
            assert f"<title>{title}</title>" in text
        response, _ = await browser.get("/admin/nothing")
        assert response.status == 404
        response, _ = await browser.get("/administrator")
        assert response.status == 404
        # Logging out ends the session: the same cookie no longer opens a page.
        jar = list(browser.session.cookie_jar)
        response, _ = await browser.post("/admin/logout", {})
        assert response.status == 303
        for morsel in jar:
            browser.session.cookie_jar.update_cookies({morsel.key: morsel.value})
        response, _ = await browser.get("/admin/accounts")
        assert response.status == 303 and response.headers["Location"] == "/admin/login"
    finally:
        await browser.close()


async def test_wrong_password_and_non_admins_are_refused(web: RunningServer) -> None:
    browser = Browser(web)
    try:
        for jid, password in (("root@a.test", "wrong"), ("bob@a.test", PASSWORD),
                              ("nobody@a.test", PASSWORD), ("root@a.test/res", PASSWORD),
                              ("@@", PASSWORD)):
            response = await browser.login(jid, password)
            assert response.status == 403, jid
            assert "Wrong address or password" in await response.text()
            assert "presenced_admin" not in {c.key for c in browser.session.cookie_jar}
            response, _ = await browser.get("/admin")
            assert response.status == 303
        # A POST without a session is refused, and adds nothing.
        response, _ = await browser.post("/admin/accounts", {
            "action": "add", "jid": "eve@a.test", "password": "x1", "password2": "x1"})
        assert response.status == 403
        assert not await web.server.storage.accounts.exists("eve", "a.test")
        # The login form itself needs its token (and the cookie it came with).
        fresh = Browser(web)
        try:
            response, _ = await fresh.post("/admin/login", {"jid": "root@a.test",
                                                            "password": PASSWORD}, csrf="x")
            assert response.status == 403
        finally:
            await fresh.close()
    finally:
        await browser.close()


async def test_forms_need_the_session_token_and_our_origin(web: RunningServer,
                                                           admin: Browser) -> None:
    add = {"action": "add", "jid": "eve@a.test", "password": "pw-eve", "password2": "pw-eve"}
    for csrf in ("", "forged", admin.csrf[:-1] + ("A" if admin.csrf[-1] != "A" else "B")):
        response, _ = await admin.post("/admin/accounts", add, csrf=csrf)
        assert response.status == 403, csrf
    response, _ = await admin.post("/admin/accounts", add,
                                   headers={"Origin": "https://evil.example"})
    assert response.status == 403
    assert not await web.server.storage.accounts.exists("eve", "a.test")
    # Another admin session's token is not this one's.
    other = Browser(web)
    try:
        assert (await other.login("root@a.test")).status == 303
        await other.get("/admin/accounts")
        assert other.csrf != admin.csrf
        response, _ = await admin.post("/admin/accounts", add, csrf=other.csrf)
        assert response.status == 403
    finally:
        await other.close()
    response, text = await admin.post("/admin/accounts", add)
    assert response.status == 200, text
    assert await web.server.storage.accounts.exists("eve", "a.test")


async def test_account_actions_are_seen_over_xmpp(web: RunningServer, admin: Browser) -> None:
    response, text = await admin.post("/admin/accounts", {
        "action": "add", "jid": "carol@a.test", "password": "carol-pw",
        "password2": "carol-pw"})
    assert response.status == 200 and "added carol@a.test" in text
    carol = await web.client("carol@a.test", "carol-pw")
    # Found by a part of its name, and shown online.
    response, text = await admin.get("/admin/accounts?q=aro")
    assert "carol@a.test" in text and "bob@a.test" not in text and "1 session(s)" in text
    # Refusals: a duplicate, a foreign domain, differing or unusable passwords.
    for form, says in (
            ({"jid": "carol@a.test", "password": "p", "password2": "p"}, "exists already"),
            ({"jid": "x@elsewhere.test", "password": "p", "password2": "p"},
             "not a domain of this server"),
            ({"jid": "dave@a.test", "password": "p1", "password2": "p2"}, "differ"),
            ({"jid": "dave@a.test", "password": "", "password2": ""}, "unusable password"),
            ({"jid": "da ve@a.test", "password": "p", "password2": "p"}, "not a valid")):
        response, text = await admin.post("/admin/accounts", {"action": "add", **form})
        assert response.status == 400 and says in text, (form, text)
    assert not await web.server.storage.accounts.exists("dave", "a.test")
    # A new password works at once; the old one no longer does.
    response, text = await admin.post("/admin/accounts", {
        "action": "password", "jid": "bob@a.test", "password": "new-bob",
        "password2": "new-bob"})
    assert response.status == 200 and "changed the password of bob@a.test" in text
    await web.client("bob@a.test", "new-bob", resource="new")
    with pytest.raises(AssertionError, match="login failed"):
        await web.client("bob@a.test", PASSWORD, resource="old")
    # Removal ends the account's session and its logins.
    ended = asyncio.get_running_loop().create_future()
    carol.add_event_handler("disconnected",
                            lambda _e: ended.done() or ended.set_result(None))
    response, text = await admin.post("/admin/accounts", {"action": "remove",
                                                          "jid": "carol@a.test"})
    assert response.status == 200 and "removed carol@a.test and ended 1 session" in text
    await asyncio.wait_for(ended, 10)
    assert not await web.server.storage.accounts.exists("carol", "a.test")
    with pytest.raises(AssertionError, match="login failed"):
        await web.client("carol@a.test", "carol-pw", resource="again")
    response, text = await admin.post("/admin/accounts", {"action": "remove",
                                                          "jid": "root@a.test"})
    assert response.status == 400 and "your own account" in text
    response, text = await admin.post("/admin/accounts", {"action": "remove",
                                                          "jid": "carol@a.test"})
    assert response.status == 400 and "no such account" in text


async def test_invitation_from_the_page_registers_in_band_and_subscribes(
        web: RunningServer, admin: Browser) -> None:
    response, text = await admin.post("/admin/accounts", {
        "action": "invite", "domain": "a.test", "uses": "1", "expires": "1d",
        "group": "Friends", "contact": "1"})
    assert response.status == 200, text
    found = re.search(r"(https://[^ <]+/invite/([A-Za-z0-9_-]+)) — or in a client: "
                      r"(xmpp:root@a\.test\?roster;preauth=([A-Za-z0-9_%-]+);ibr=y)", text)
    assert found is not None, text
    link, token = found.group(1), found.group(2)
    assert found.group(4) == token
    # The invitation's own page opens...
    host, port = web.address("https")
    async with admin.session.get(f"https://{host}:{port}/invite/{token}",
                                 ssl=insecure_context()) as page:
        assert page.status == 200
    assert link.endswith(f"/invite/{token}")
    # ...and the token registers in-band (XEP-0445, XEP-0077), subscribed to the admin.
    client, _features = await unauthenticated(web)
    assert condition(await client.ask(preauth_iq(token))) is None
    reply = await client.ask(register_iq("erin", "erin-password"))
    assert reply.get("type") == "result", etree.tostring(reply)
    await client.close()
    erin = await web.client("erin@a.test", "erin-password")
    await erin.get_roster()
    assert erin.client_roster["root@a.test"]["subscription"] == "both"
    assert erin.client_roster["root@a.test"]["groups"] == ["Friends"]
    # Refusals.
    for form, says in (({"uses": "0"}, "uses: a whole number"), ({"uses": "1x"}, "uses:"),
                       ({"expires": "soon"}, "not a duration"),
                       ({"domain": "elsewhere.test"}, "not a domain of this server")):
        response, text = await admin.post("/admin/accounts", {"action": "invite", **form})
        assert response.status == 400 and says in text, (form, text)


async def test_an_admin_password_change_ends_its_web_sessions(web: RunningServer,
                                                              admin: Browser) -> None:
    response, _ = await admin.get("/admin/accounts")
    assert response.status == 200
    await web.server.storage.accounts.set_credentials("root", "a.test",
                                                      derive_credentials("changed"))
    response, _ = await admin.get("/admin/accounts")
    assert response.status == 303


async def test_online_page_shows_resource_address_and_transport_escaped(
        web: RunningServer, admin: Browser) -> None:
    await web.client("bob@a.test", resource="<b>phone&")
    raw = await web.raw_login("root@a.test", resource="desk")
    try:
        response, text = await admin.get("/admin/online")
        assert response.status == 200
        assert "2 session(s)" in text
        assert "&lt;b&gt;phone&amp;" in text and "<b>phone" not in text
        row = next(r for r in text.split("<tr>") if "desk" in r)
        assert "root@a.test" in row and ">c2s<" in row and "127.0.0.1:" in row
        # The graphs sample the sessions: a new sample counts both.
        module = web.server.modules["webadmin"]
        module._sample()  # type: ignore[attr-defined]
        assert module.history.samples[-1].sessions == 2  # type: ignore[attr-defined]
        response, text = await admin.get("/admin")
        assert "Client sessions: 2 sessions" in text
        # Messages routed per second: the growth of the routed count between two samples.
        await asyncio.sleep(0.1)
        module._sample()  # type: ignore[attr-defined]
        assert module.history.samples[-1].messages == 0  # type: ignore[attr-defined]
        for n in range(3):
            await raw.send(f"<message to='root@a.test/desk' type='chat'><body>{n}</body>"
                           "</message>")
        for _ in range(3):
            await raw.next_of("message")
        await asyncio.sleep(0.1)
        module._sample()  # type: ignore[attr-defined]
        assert module.history.samples[-1].messages > 0  # type: ignore[attr-defined]
    finally:
        await raw.close()


async def test_rooms_page_lists_rooms_with_occupants(web: RunningServer, admin: Browser) -> None:
    raw = await web.raw_login("bob@a.test", resource="pc")
    try:
        await raw.send("<presence to='lobby@muc.a.test/Bob'>"
                       "<x xmlns='http://jabber.org/protocol/muc'/></presence>")
        for _ in range(100):
            if web.server.modules["muc"].rooms:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        response, text = await admin.get("/admin/rooms")
        assert response.status == 200 and "1 room(s)" in text
        row = next(r for r in text.split("<tr>") if "lobby@muc.a.test" in r)
        assert "<td>1</td>" in row
    finally:
        await raw.close()


async def test_plain_http_is_refused_unless_a_trusted_proxy_says_https(tmp_path: Path) -> None:
    running = await start_web(tmp_path, '[http]\ntrusted_proxies = ["127.0.0.1/32"]\n',
                              http=True, top=ADMINS)
    try:
        await running.add_user("root@a.test")
        browser = Browser(running, "http")
        try:
            response, text = await browser.get("/admin/login")
            assert response.status == 403 and "TLS only" in text
            response, _ = await browser.post("/admin/login", {"jid": "root@a.test",
                                                              "password": PASSWORD})
            assert response.status == 403
            response, text = await browser.get("/admin/login",
                                               headers={"X-Forwarded-Proto": "https"})
            assert response.status == 200 and 'name="password"' in text
            response, text = await browser.get("/admin/login",
                                               headers={"X-Forwarded-Proto": "http"})
            assert response.status == 403
        finally:
            await browser.close()
    finally:
        await stop_server(running)
    # Without trusted_proxies the header is not believed.
    running = await start_web(tmp_path / "2", http=True, top=ADMINS)
    try:
        browser = Browser(running, "http")
        try:
            response, _ = await browser.get("/admin/login",
                                            headers={"X-Forwarded-Proto": "https"})
            assert response.status == 403
        finally:
            await browser.close()
    finally:
        await stop_server(running)


async def test_failed_logins_wait(tmp_path: Path) -> None:
    running = await start_web(tmp_path, "[limits]\nauth_failures_free = 2\nauth_delay = 60\n",
                              top=ADMINS)
    browser = Browser(running)
    try:
        await running.add_user("root@a.test")
        for _ in range(3):
            assert (await browser.login("root@a.test", "guess")).status == 403
        # In its delay even the right password is not heard.
        response = await browser.login("root@a.test")
        assert response.status == 429
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert "try again" in await response.text()
    finally:
        await browser.close()
        await stop_server(running)


async def test_s2s_page_shows_the_link(tmp_path: Path) -> None:
    port_one, = free_ports(1, "127.0.0.51")
    port_two, = free_ports(1, "127.0.0.52")
    path = write_config(tmp_path / "one",
                        f'[s2s]\nroutes = {{ "two.test" = "127.0.0.52:{port_two}" }}\n',
                        'admins = ["root@one.test"]', domains=("one.test",), host="127.0.0.51",
                        s2s=f"127.0.0.51:{port_one}")
    path.write_text(path.read_text().replace("https = []", 'https = ["127.0.0.51:0"]', 1))
    server = Server(load_config(path))
    await server.start()
    one = RunningServer(server, tmp_path / "one" / "data", path)
    two = await start_server(tmp_path / "two",
                             f'[s2s]\nroutes = {{ "one.test" = "127.0.0.51:{port_one}" }}\n',
                             domains=("two.test",), host="127.0.0.52",
                             s2s=f"127.0.0.52:{port_two}")
    browser = Browser(one)
    try:
        await one.add_user("root@one.test")
        await two.add_user("bob@two.test")
        bob = await two.raw_login("bob@two.test", resource="pc")
        root = await one.raw_login("root@one.test")
        await root.send("<message to='bob@two.test/pc' type='chat'><body>hi</body></message>")
        got = await bob.next_of("message", timeout=15)
        assert got.findtext("{jabber:client}body") == "hi"
        assert (await browser.login("root@one.test")).status == 303
        response, text = await browser.get("/admin/s2s")
        assert response.status == 200
        row = next(r for r in text.split("<tr>") if "<td>out</td>" in r)
        assert "two.test" in row and "ready" in row and "127.0.0.52" in row
        module = one.server.modules["webadmin"]
        module._sample()  # type: ignore[attr-defined]
        assert module.history.samples[-1].s2s >= 1  # type: ignore[attr-defined]
        await root.close()
        await bob.close()
    finally:
        await browser.close()
        await stop_server(two)
        await stop_server(one)


async def test_a_full_disk_is_a_503_then_works_again(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """SQLite on a full file system: adding an account answers 503 (try again), with no
    traceback; with room again the same form works."""
    caplog.set_level(logging.INFO)
    with mounted_tmpfs(tmp_path / "data") as data:
        running = await start_web(tmp_path, top=ADMINS)
        browser = Browser(running)
        try:
            await running.add_user("root@a.test")
            assert (await browser.login("root@a.test")).status == 303
            await browser.get("/admin/accounts")
            add = {"action": "add", "jid": "fay@a.test", "password": "fay-pw",
                   "password2": "fay-pw"}
            filler = fill(data)
            response, text = await browser.post("/admin/accounts", add)
            assert response.status == 503 and response.headers["Retry-After"] == "10", text
            assert not any(r.exc_info for r in caplog.records)
            filler.unlink()
            for _ in range(50):
                response, text = await browser.post("/admin/accounts", add)
                if response.status != 503:
                    break
                await asyncio.sleep(0.2)
            assert response.status == 200 and "added fay@a.test" in text, text
        finally:
            await browser.close()
            with contextlib.suppress(FileNotFoundError):
                (data / "filler").unlink()
            await stop_server(running)


# -- the pure pieces ----------------------------------------------------------------------------


def test_history_rate_and_ring() -> None:
    history = History(span=60, every=5)
    assert history.add(100.0, 10, 1, 0, 50.0).messages == 0  # the first has no rate
    assert history.add(105.0, 60, 1, 0, 50.0).messages == 10.0
    assert history.add(110.0, 60, 2, 1, 51.0).messages == 0.0
    for i in range(40):
        history.add(115.0 + 5 * i, 60, 2, 1, 51.0)
    assert len(history.samples) == 13  # one hour of 5 s samples here is 60 s
    assert history.series("sessions")[-1] == (310.0, 2.0)


def test_svg_chart_draws_the_points_of_the_hour_only() -> None:
    now = 10_000.0
    points = [(now - 4000, 99.0), (now - 3000, 2.0), (now - 60, 4.0), (now, 3.0)]
    svg = svg_chart("Messages <per> second", "msg/s", points, now)
    tree = etree.fromstring(svg)
    assert tree.tag == "{http://www.w3.org/2000/svg}svg"
    polyline = tree.find("{http://www.w3.org/2000/svg}polyline")
    assert polyline is not None
    coords = [tuple(map(float, p.split(","))) for p in polyline.get("points", "").split()]
    assert len(coords) == 3  # the one older than the hour is left out
    assert coords[-1][0] > coords[0][0]
    ys = [y for _, y in coords]
    assert ys[1] < ys[2] < ys[0]  # 4 is drawn higher than 3, higher than 2
    assert "Messages &lt;per&gt; second: 3 msg/s" in svg and "max 4" in svg
    empty = etree.fromstring(svg_chart("Sessions", "sessions", [], now))
    assert empty.find("{http://www.w3.org/2000/svg}polyline") is None
    assert "no data yet" in etree.tostring(empty).decode()


def test_cookie_signer_binds_key_account_and_time() -> None:
    signer = CookieSigner(b"k" * 32)
    ticket = Ticket("root@a.test", int(time.time()) + 60, "n1")
    value = signer.sign(ticket, b"stored-key")
    assert signer.verify(value, b"stored-key") == ticket
    assert signer.verify(value, b"other-stored-key") is None  # password changed
    assert CookieSigner(b"x" * 32).verify(value, b"stored-key") is None
    payload, mac = value.split(".")
    forged = signer.sign(Ticket("bob@a.test", ticket.expires, "n1"), b"x").split(".")[0]
    assert signer.verify(f"{forged}.{mac}", b"stored-key") is None
    assert signer.verify(value, b"stored-key", now=ticket.expires + 1) is None
    for junk in ("", ".", "abc", "abc.def", f"{payload}.%%%", "W10.x"):
        assert signer.verify(junk, b"stored-key") is None
    assert signer.token("csrf", "n1") != signer.token("csrf", "n2")


# -- in a real browser --------------------------------------------------------------------------


@pytest.mark.usefixtures("browser_ready")
async def test_in_chromium_login_add_an_account_and_see_the_graphs(
        web: RunningServer, tmp_path: Path) -> None:
    """tests/browser/admin.mjs in Debian's Chromium: log in, add an account (which then logs in
    over XMPP), see the four graphs; the screenshots are kept as tmp_path/admin.png and accounts.png."""
    module = web.server.modules["webadmin"]
    await web.client("bob@a.test", resource="one")
    module._sample()  # type: ignore[attr-defined]
    await web.client("root@a.test", resource="two")
    module._sample()  # type: ignore[attr-defined]
    host, port = web.address("https")
    shot = tmp_path / "admin.png"
    options = {"origin": f"https://{host}:{port}", "jid": "root@a.test", "password": PASSWORD,
               "newJid": "dana@a.test", "newPassword": "dana-pw", "screenshot": str(shot),
               "accountsScreenshot": str(tmp_path / "accounts.png"),
               "timeoutMs": int(STEP_TIMEOUT * 1000)}
    process = await asyncio.create_subprocess_exec(
        "node", str(BROWSER_DIR / "admin.mjs"), json.dumps(options),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), 3 * STEP_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = out.decode().splitlines()
    assert process.returncode == 0, f"{lines}\n{err.decode()[-3000:]}"
    assert [line[5:] for line in lines if line.startswith("step ")] == [
        "logged-in", "added", "graphs"]
    assert "graph Client sessions" in lines
    assert shot.stat().st_size > 10_000
    assert (tmp_path / "accounts.png").stat().st_size > 10_000
    await web.client("dana@a.test", "dana-pw")

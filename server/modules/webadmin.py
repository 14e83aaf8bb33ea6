"""The admin web page at /admin on the HTTP server (server/modules/http.py), for the accounts in
the top-level ``admins`` list: accounts (find, add, remove, reset a password), who is online and
from where, server-to-server links, rooms, and graphs of the last hour.

    [webadmin]
    enabled = true            # unset: on when [listen] https (or http) is set
    session_lifetime = 28800  # seconds a login lasts

Security:
- TLS only: a request over the plain listener is refused unless it comes from one of
  ``[http] trusted_proxies`` saying it terminated TLS (X-Forwarded-Proto / Forwarded proto).
- Login with the XMPP account's password, checked against its stored SCRAM keys (RFC 5802 §3:
  StoredKey recomputed from the password; no password is kept). Failed logins are delayed per
  address and per account by two AuthBackoff of server/limits.py with the ``[limits] auth_*``
  settings — for every address, trusted ones too: an admin login is worth the wait.
- The session is a cookie (HttpOnly, Secure, SameSite=Strict, Path=/admin) signed with the key
  in <data_dir>/webadmin-cookie.key and bound to the account's StoredKey: a password change,
  or the account leaving ``admins``, ends it. Logging out forgets it.
- Every POST carries a token derived from the session (the login form: from a cookie of its
  own), compared in constant time; a foreign Origin is refused too.
- Every value shown goes through html.escape; the pages carry a CSP without scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from server.config import boolean, option, seconds_option
from server.http import admin as ui
from server.http.admin import CookieSigner, History, Ticket, esc
from server.jid import JID, InvalidJID
from server.limits import AuthBackoff
from server.module import Module
from server.modules.http import HTTP
from server.modules.invites import Invites, parse_duration
from server.modules.muc import Muc
from server.storage.base import AccountExists, Credentials, NoSuchAccount
from server.storage.db import StorageUnavailable
from server.storage.keystore import shared_secret
from server.stream.connection import XMLStreamConnection
from server.stream.scram import derive_credentials, fake_keys, prepare_password, verify_password
from server.xml.numbers import NumberError, parse_int

if TYPE_CHECKING:
    from server.app import Server

log = logging.getLogger("presenced.webadmin")

PREFIX = "/admin"
SESSION_COOKIE = "presenced_admin"
LOGIN_COOKIE = "presenced_admin_login"
_MESSAGE = "{jabber:client}message"
_SHOWN = 500  # accounts listed at most on one page (narrow it with the search)


@dataclass(frozen=True, slots=True, kw_only=True)
class WebAdminSettings:
    # Unset: on when [listen] https or http is set.
    enabled: bool | None = field(metadata=option("true or false", boolean, None))
    session_lifetime: float = field(metadata=seconds_option(28800))


@dataclass(frozen=True, slots=True)
class _Admin:
    jid: JID
    ticket: Ticket
    csrf: str


class WebAdmin(Module):
    name = "webadmin"
    settings = WebAdminSettings
    uses = (HTTP, Invites, Muc)  # its pages, the invitation form and the rooms page

    def __init__(self, server: Server, config: WebAdminSettings) -> None:
        super().__init__(server, config)
        self.core = server  # an admin's view of the core (server-to-server links), as HTTP's
        self._http: HTTP | None = None
        self._signer = CookieSigner(b"")
        self.history = History()
        self._sampler: asyncio.Task[None] | None = None
        self._logged_out: dict[str, int] = {}  # nonce -> its expiry
        limits = server.config.limits
        self._by_address, self._by_account = (
            AuthBackoff(free=limits.auth_failures_free, delay=limits.auth_delay,
                        max_delay=limits.auth_max_delay, forget=limits.auth_forget)
            for _ in range(2))
        self._pages = {
            PREFIX: self._overview, PREFIX + "/": self._overview,
            PREFIX + "/accounts": self._accounts, PREFIX + "/online": self._online,
            PREFIX + "/s2s": self._s2s, PREFIX + "/rooms": self._rooms,
        }

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        http = self.server.module(HTTP)
        if http is None or not http.enabled or self.config.enabled is False:
            return
        self._http = http
        data_dir = self.server.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Every node checks the cookie any node signed (the key file of an older version is
        # imported once: server/storage/keystore.py).
        self._signer = CookieSigner(await shared_secret(
            self.server.storage.secrets, "webadmin-cookie",
            legacy=data_dir / "webadmin-cookie.key", min_size=32))
        http.route(PREFIX, self._request, prefix=True)
        self._sample()
        self._sampler = asyncio.ensure_future(self._sampling())

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None

    async def _sampling(self) -> None:
        while True:
            await asyncio.sleep(ui.SAMPLE_EVERY)
            self._sample()

    def _sample(self) -> None:
        http = self._http
        metrics = http.metrics if http is not None else None
        messages = metrics.stanzas.get(_MESSAGE, 0) if metrics is not None else 0
        self.history.add(time.time(), messages, len(self.server.sessions),
                         len(self._s2s_links()), ui.resident_mib())

    # -- requests ----------------------------------------------------------------------------

    async def _request(self, request: web.Request) -> web.StreamResponse:
        try:
            response = await self._serve(request)
        except StorageUnavailable:  # logged once by the storage's Outage; try again later
            response = web.Response(status=503, text="the database is unavailable; try again\n")
            response.headers["Retry-After"] = "10"
        headers = response.headers
        headers["Content-Security-Policy"] = ui.CSP
        headers["X-Content-Type-Options"] = "nosniff"
        headers["X-Frame-Options"] = "DENY"
        # "no-referrer" would make browsers send "Origin: null" with the forms (Fetch §3.2.5)
        headers["Referrer-Policy"] = "same-origin"
        headers["Cache-Control"] = "no-store"
        return response

    async def _serve(self, request: web.Request) -> web.Response:
        assert self._http is not None
        path = request.path
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            return web.Response(status=404, text="not found\n")  # /administrator...
        if self._http.scheme(request) != "https":
            log.info("event=webadmin-refused reason=no-tls address=%s",
                     self._http.client_address(request))
            return web.Response(status=403, text="the admin page is served over TLS only\n")
        if request.method == "POST":
            if self._http.foreign_form(request):
                return self._forbidden(request, "foreign-origin")
        elif request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="method not allowed\n")
        if path == PREFIX + "/login":
            if request.method == "POST":
                return await self._login_post(request)
            return self._login_form(request)
        handler = self._pages.get(path)
        if handler is None and path != PREFIX + "/logout":
            return web.Response(status=404, text="not found\n")
        admin = await self._admin(request)
        if admin is None:
            if request.method == "POST":
                return self._forbidden(request, "no-session")
            return _redirect(PREFIX + "/login")
        form: dict[str, str] = {}
        if request.method == "POST":
            posted = await request.post()
            form = {k: v for k, v in posted.items() if isinstance(v, str)}
            if not secrets.compare_digest(form.get("csrf", "").encode(), admin.csrf.encode()):
                return self._forbidden(request, "csrf")
            if path == PREFIX + "/logout":
                return self._logout(admin)
        assert handler is not None
        return await handler(request, admin, form)

    def _forbidden(self, request: web.Request, reason: str) -> web.Response:
        assert self._http is not None
        log.info("event=webadmin-refused reason=%s address=%s", reason,
                 self._http.client_address(request))
        return web.Response(status=403, text=f"refused ({reason})\n")

    def _html(self, title: str, body: str, admin: _Admin | None, here: str = "",
              status: int = 200) -> web.Response:
        text = ui.page(title, body, here=here, admin=str(admin.jid) if admin else None,
                       csrf=admin.csrf if admin else "")
        return web.Response(status=status, text=text, content_type="text/html")

    def _cookie(self, response: web.Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, path=PREFIX, max_age=max_age, secure=True,
                            httponly=True, samesite="Strict")

    # -- sessions ----------------------------------------------------------------------------

    async def _admin(self, request: web.Request) -> _Admin | None:
        """The logged-in admin of this request, or None."""
        value = request.cookies.get(SESSION_COOKIE)
        if not value:
            return None
        claim = CookieSigner.read(value)
        if claim is None or claim.nonce in self._logged_out or \
                claim.jid not in self.server.config.admins:
            return None
        jid = JID.parse(claim.jid)
        assert jid.local is not None
        credentials = await self.server.storage.accounts.get_credentials(jid.local, jid.domain)
        if credentials is None:
            return None
        ticket = self._signer.verify(value, credentials.strongest.stored_key)
        if ticket is None:
            return None
        return _Admin(jid, ticket, self._signer.token("csrf", ticket.nonce))

    def _logout(self, admin: _Admin) -> web.Response:
        now = int(time.time())
        self._logged_out = {n: e for n, e in self._logged_out.items() if e > now}
        self._logged_out[admin.ticket.nonce] = admin.ticket.expires
        log.info("event=webadmin-logout jid=%s", admin.jid)
        response = _redirect(PREFIX + "/login")
        response.del_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    def _login_form(self, request: web.Request, error: str = "", status: int = 200,
                    jid: str = "") -> web.Response:
        nonce = secrets.token_urlsafe(18)
        note = f'<p class="error">{esc(error)}</p>' if error else ""
        token = self._signer.token("login", nonce)
        body = (f"{note}<form method=\"post\" action=\"{PREFIX}/login\"><fieldset>"
                f'<input type="hidden" name="csrf" value="{esc(token)}">'
                f'<label>Address <input name="jid" value="{esc(jid)}" autocomplete="username" '
                f'required></label><label>Password <input name="password" type="password" '
                f'autocomplete="current-password" required></label>'
                f"<button>Log in</button></fieldset></form>"
                f"<p>For the accounts in <code>admins</code> of the server's configuration.</p>")
        response = self._html("Log in", body, None, status=status)
        self._cookie(response, LOGIN_COOKIE, nonce, 3600)
        return response

    async def _login_post(self, request: web.Request) -> web.Response:
        assert self._http is not None
        posted = await request.post()
        form = {k: v for k, v in posted.items() if isinstance(v, str)}
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        expected = self._signer.token("login", nonce)
        if not nonce or not secrets.compare_digest(form.get("csrf", "").encode(),
                                                   expected.encode()):
            return self._forbidden(request, "csrf")
        address = self._http.client_address(request) or "?"
        text = form.get("jid", "").strip()[:3071]
        try:
            jid = JID.parse(text if "@" in text else f"{text}@{self.server.default_domain}")
        except InvalidJID:
            return self._login_form(request, "Wrong address or password.", 403, text)
        account = str(jid.bare)
        now = time.monotonic()
        wait = max(self._by_address.remaining(address, now),
                   self._by_account.remaining(account, now))
        if wait > 0:
            log.info("event=webadmin-login-refused reason=backoff address=%s jid=%s wait=%.0f",
                     address, account, wait)
            response = self._login_form(
                request, f"Too many failed logins: try again in {wait:.0f} s.", 429, text)
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        ok = False
        credentials: Credentials | None = None
        if jid.local is not None and not jid.resource and account in self.server.config.admins:
            credentials = await self.server.storage.accounts.get_credentials(jid.local,
                                                                             jid.domain)
        password = form.get("password", "")
        keys = credentials.strongest if credentials is not None else fake_keys(
            account, "sha256", self.server.config.c2s.scram_iterations)
        # PBKDF2 off the event loop; an unknown or non-admin account costs the same time.
        ok = await asyncio.to_thread(verify_password, password, keys) and credentials is not None
        if not ok or credentials is None:
            self._by_address.failed(address, now)
            self._by_account.failed(account, now)
            log.info("event=webadmin-login-failed address=%s jid=%s", address, account)
            return self._login_form(request, "Wrong address or password, or not an admin.",
                                    403, text)
        self._by_account.succeeded(account)
        ticket = Ticket(account, int(time.time() + self.config.session_lifetime),
                        secrets.token_urlsafe(18))
        log.info("event=webadmin-login jid=%s address=%s", account, address)
        response = _redirect(PREFIX)
        response.set_cookie(SESSION_COOKIE, self._signer.sign(ticket,
                                                              credentials.strongest.stored_key),
                            path=PREFIX, max_age=int(self.config.session_lifetime),
                            secure=True, httponly=True, samesite="Strict")
        response.del_cookie(LOGIN_COOKIE, path=PREFIX)
        return response

    # -- pages -------------------------------------------------------------------------------

    def _csrf_field(self, admin: _Admin) -> str:
        return f'<input type="hidden" name="csrf" value="{esc(admin.csrf)}">'

    async def _overview(self, request: web.Request, admin: _Admin,
                        _form: dict[str, str]) -> web.Response:
        now = time.time()
        graphs = "".join(ui.svg_chart(title, unit, self.history.series(name), now)
                         for name, title, unit in ui.GRAPHS)
        rooms = self._muc()
        facts = [("Domains", ", ".join(self.server.config.domains)),
                 ("Client sessions", str(len(self.server.sessions))),
                 ("Server-to-server links", str(len(self._s2s_links()))),
                 ("Rooms", str(len(rooms.rooms)) if rooms is not None else "no MUC service")]
        body = (ui.table(("", ""), [(esc(k), esc(v)) for k, v in facts], "")
                + f'<h2>The last hour</h2><div class="graphs">{graphs}</div>'
                + f"<p>Sampled every {ui.SAMPLE_EVERY:.0f} s since the server started.</p>")
        return self._html("Overview", body, admin, PREFIX)

    def _account_of(self, text: str) -> JID:
        """A bare JID at one of our domains (a bare localpart: at the first domain)."""
        text = text.strip()
        try:
            jid = JID.parse(text if "@" in text else f"{text}@{self.server.default_domain}")
        except InvalidJID as exc:
            raise ValueError(f"{text!r} is not a valid address: {exc}") from None
        if jid.local is None or jid.resource:
            raise ValueError(f"{text!r} is not an address of the form user@domain")
        if jid.domain not in self.server.hosts:
            raise ValueError(f"{jid.domain} is not a domain of this server")
        return jid

    async def _credentials(self, form: dict[str, str]) -> Credentials:
        password = form.get("password", "")
        if password != form.get("password2", ""):
            raise ValueError("the two passwords differ")
        try:  # RFC 8265 §4.2: one that does not prepare could never be used to log in
            prepare_password(password)
        except ValueError as exc:
            raise ValueError(f"unusable password ({exc or 'empty'})") from None
        return await asyncio.to_thread(derive_credentials, password,
                                       self.server.config.c2s.scram_iterations)

    async def _act(self, admin: _Admin, form: dict[str, str]) -> tuple[bool, str]:
        """Carry out the accounts page's POST: (worked, what to tell)."""
        action = form.get("action", "")
        accounts = self.server.storage.accounts
        jid = self._account_of(form.get("jid", ""))
        assert jid.local is not None
        if action == "add":
            credentials = await self._credentials(form)
            try:
                await accounts.create(jid.local, jid.domain, credentials)
            except AccountExists:
                return False, f"{jid} exists already"
            log.info("event=webadmin-account-added jid=%s by=%s", jid, admin.jid)
            return True, f"added {jid}"
        if action == "password":
            credentials = await self._credentials(form)
            try:
                await accounts.set_credentials(jid.local, jid.domain, credentials)
            except NoSuchAccount:
                return False, f"no such account: {jid}"
            log.info("event=webadmin-password-reset jid=%s by=%s", jid, admin.jid)
            return True, f"changed the password of {jid}"
        if action == "remove":
            if jid == admin.jid.bare:
                return False, "you cannot remove your own account here"
            try:
                await accounts.delete(jid.local, jid.domain)
            except NoSuchAccount:
                return False, f"no such account: {jid}"
            ended = 0
            for session in self.server.sessions.resources(jid):
                session.close("not-authorized", "account removed")
                ended += 1
            log.info("event=webadmin-account-removed jid=%s by=%s sessions=%d", jid,
                     admin.jid, ended)
            return True, f"removed {jid}" + (f" and ended {ended} session(s)" if ended else "")
        raise ValueError(f"unknown action {action[:40]!r}")

    async def _invite(self, admin: _Admin, form: dict[str, str]) -> str:
        """The accounts page's "create an invitation": what to tell (ValueError: why not)."""
        invites = self.server.module(Invites)
        if invites is None:
            raise ValueError("the invites module is not loaded")
        domain = form.get("domain", "") or self.server.default_domain
        if domain not in self.server.hosts:
            raise ValueError(f"{domain} is not a domain of this server")
        try:
            uses = parse_int(form.get("uses", "1").strip() or "1", minimum=1, maximum=10000)
        except NumberError:
            raise ValueError("uses: a whole number from 1 to 10000") from None
        lifetime = parse_duration(form.get("expires", "") or "7d")
        group = form.get("group", "").strip()[:200] or None
        # XEP-0379: the admin becomes the invitee's contact when asked and on that domain.
        inviter = admin.jid.local if form.get("contact") and \
            admin.jid.domain == domain else None
        _invitation, uri, url = await invites.create(domain, inviter, uses=uses,
                                                    lifetime=lifetime, group=group)
        log.info("event=invitation-created via=webadmin by=%s domain=%s uses=%d", admin.jid,
                 domain, uses)
        return (f"invitation for {domain}, {uses} use(s): {url} — or in a client: {uri}")

    async def _accounts(self, request: web.Request, admin: _Admin,
                        form: dict[str, str]) -> web.Response:
        note = ""
        status = 200
        if request.method == "POST":
            try:
                if form.get("action") == "invite":
                    ok, message = True, await self._invite(admin, form)
                else:
                    ok, message = await self._act(admin, form)
            except ValueError as exc:
                ok, message = False, str(exc)
            note = f'<p class="{"notice" if ok else "error"}">{esc(message)}</p>'
            status = 200 if ok else 400
        query = request.query.get("q", "").strip()[:200]
        domain = request.query.get("domain", "")
        domains = [d for d in self.server.config.domains if d == domain] or \
            list(self.server.config.domains)
        found: list[JID] = []
        total = 0
        for d in domains:
            for user in await self.server.storage.accounts.list(d):
                total += 1
                if query.lower() in user.lower():
                    found.append(JID.from_parts(user, d))
        csrf = self._csrf_field(admin)
        rows = []
        for jid in found[:_SHOWN]:
            online = len(self.server.sessions.resources(jid))
            remove = "" if jid == admin.jid.bare else (
                f'<form method="post" class="inline">{csrf}'
                f'<input type="hidden" name="action" value="remove">'
                f'<input type="hidden" name="jid" value="{esc(jid)}">'
                f'<button name="remove" value="{esc(jid)}">Remove</button></form>')
            rows.append((esc(jid), esc(f"{online} session(s)" if online else "offline"),
                         "admin" if str(jid) in self.server.config.admins else "", remove))
        more = (f"<p>{len(found) - _SHOWN} more: narrow the search.</p>"
                if len(found) > _SHOWN else "")
        search = (f'<form method="get"><input name="q" value="{esc(query)}" '
                  f'placeholder="part of a name"><button>Find</button> '
                  f"{len(found)} of {total} account(s)</form>")
        add = (f'<form method="post"><fieldset><legend>Add an account</legend>{csrf}'
               f'<input type="hidden" name="action" value="add">'
               f'<label>Address <input name="jid" required placeholder="user@'
               f'{esc(self.server.default_domain)}"></label>'
               f'<label>Password <input name="password" type="password" '
               f'autocomplete="new-password" required></label>'
               f'<label>Again <input name="password2" type="password" '
               f'autocomplete="new-password" required></label>'
               f"<button>Add</button></fieldset></form>")
        reset = (f'<form method="post"><fieldset><legend>Reset a password</legend>{csrf}'
                 f'<input type="hidden" name="action" value="password">'
                 f'<label>Address <input name="jid" required></label>'
                 f'<label>New password <input name="password" type="password" '
                 f'autocomplete="new-password" required></label>'
                 f'<label>Again <input name="password2" type="password" '
                 f'autocomplete="new-password" required></label>'
                 f"<button>Change</button></fieldset></form>")
        options = "".join(f"<option>{esc(d)}</option>" for d in self.server.config.domains)
        invite = (f'<form method="post"><fieldset><legend>Create an invitation</legend>{csrf}'
                  f'<input type="hidden" name="action" value="invite">'
                  f'<label>Domain <select name="domain">{options}</select></label>'
                  f'<label>Uses <input name="uses" value="1" size="4" inputmode="numeric">'
                  f'</label><label>Valid for <input name="expires" value="7d" size="5">'
                  f'</label><label>Roster group <input name="group"></label>'
                  f'<label><input type="checkbox" name="contact" value="1" checked> '
                  f"add me as a contact</label><button>Create</button></fieldset></form>")
        body = (note + search + ui.table(("Account", "Online", "", ""), rows, "No account found.")
                + more + add + reset + invite)
        return self._html("Accounts", body, admin, PREFIX + "/accounts", status)

    async def _online(self, _request: web.Request, admin: _Admin,
                      _form: dict[str, str]) -> web.Response:
        rows = []
        for session in sorted(self.server.sessions.all(), key=lambda s: s.jid_str):
            transport = session.transport
            if isinstance(transport, XMLStreamConnection):
                kind, peer = transport.kind, transport.peer
            else:
                kind, peer = "detached (XEP-0198)", ""
            rows.append((esc(session.bare_str), esc(session.jid.resource or ""), esc(kind),
                         esc(peer), esc(session.priority)))
        body = (f"<p>{len(rows)} session(s).</p>"
                + ui.table(("Account", "Resource", "Transport", "From", "Priority"), rows,
                           "Nobody is online."))
        return self._html("Online", body, admin, PREFIX + "/online")

    def _s2s_links(self) -> list[tuple[str, str, str, str, str]]:
        """(direction, local, remote, peer address, state) of every server-to-server stream."""
        federation = self.core.federation
        if federation is None:
            return []
        links = []
        for (local, remote), out in list(federation.outbound.items()):
            links.append(("out", local, remote, out.peer,
                          "ready" if out.ready else "connecting"))
        for stream in list(federation.inbound):
            pairs = sorted(stream.negotiation.authenticated)
            if not pairs:
                links.append(("in", "", "", stream.peer, "authenticating"))
            for local, remote in pairs:
                links.append(("in", local, remote, stream.peer, "ready"))
        return links

    async def _s2s(self, _request: web.Request, admin: _Admin,
                   _form: dict[str, str]) -> web.Response:
        links = sorted(self._s2s_links(), key=lambda link: (link[2], link[0]))
        note = "" if self.core.federation is not None else "<p>Federation is off.</p>"
        body = note + ui.table(("Direction", "Local domain", "Remote domain", "Address",
                                "State"),
                               [tuple(esc(v) for v in link) for link in links],
                               "No server-to-server link.")
        return self._html("Server links", body, admin, PREFIX + "/s2s")

    def _muc(self) -> Muc | None:
        return self.server.module(Muc)

    async def _rooms(self, _request: web.Request, admin: _Admin,
                     _form: dict[str, str]) -> web.Response:
        muc = self._muc()
        if muc is None:
            return self._html("Rooms", "<p>The MUC module is not loaded.</p>", admin,
                              PREFIX + "/rooms")
        rows = []
        for jid in sorted(muc.rooms, key=str):
            room = muc.rooms[jid]
            config = room.config
            kinds = [word for on, word in ((config.persistent, "persistent"),
                                           (config.public, "public"),
                                           (config.members_only, "members-only"),
                                           (config.moderated, "moderated"),
                                           (bool(config.password), "password"))
                     if on]
            rows.append((esc(jid), esc(config.name), esc(len(room.occupants)),
                         esc(", ".join(kinds)), esc(room.subject or "")))
        body = (f"<p>{len(rows)} room(s).</p>"
                + ui.table(("Room", "Name", "Occupants", "Kind", "Subject"), rows,
                           "No room."))
        return self._html("Rooms", body, admin, PREFIX + "/rooms")


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})

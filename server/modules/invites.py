"""Invitations (XEP-0401) with a landing page, and the mutual subscription of inviter and
invitee (XEP-0379).

    [invites]
    allow_users = false     # users may ask for invitations (ad-hoc urn:xmpp:invite#invite)
    expire_after = 604800   # seconds an invitation a user asks for stays valid
    form_limit = 10         # registration form posts one IP address may make per minute

An invitation is a secret token. The operator makes one with ``presenced invite create``;
users (allow_users) with the XEP-0401 §3.1 ad-hoc command. It is given as a link to the page
``https://<domain>:<port>/invite/<token>`` (served by the HTTP module) and as an ``xmpp:`` URI:
``xmpp:inviter@domain?roster;preauth=TOKEN;ibr=y`` when it comes from an account (XEP-0401
§3.1), ``xmpp:domain?register;preauth=TOKEN`` when not (§3.4).

The page (XEP-0401 §3.2) says who invites, recommends a client for the visitor's platform (from
the User-Agent; no script), has a button that opens the ``xmpp:`` URI in an installed client,
and a registration form for those without one. The form is CSRF-safe (a SameSite=Strict cookie
and a hidden field that must be its HMAC with the token; a foreign Origin is refused) and
rate-limited per IP address. Registering, by the form or in-band with the token (XEP-0445, see
register.py), uses one of the invitation's uses; then the new account and the inviter are in
each other's rosters with subscription 'both' (XEP-0379 §3, XEP-0401 §3.5: the inviter gets a
roster push at once), in the invitation's group if it has one.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import html
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from aiohttp import web

from server import events
from server.config import Config, bool_option, int_option, seconds_option
from server.errors import StanzaError
from server.jid import JID
from server.module import Module, ModuleContext, Stanza, hook
from server.modules.adhoc import AdHoc
from server.modules.http import HTTP
from server.modules.register import USERNAME_RULE, Register
from server.storage import invites as invite_store
from server.storage.base import RosterItem
from server.storage.invites import Invitation
from server.xml import ns
from server.xml import stanza as st

if TYPE_CHECKING:
    pass

log = logging.getLogger("presenced.invites")

PREFIX = "/invite/"
NODE_INVITE = "urn:xmpp:invite#invite"  # XEP-0401 §3.1
FORM_TYPE = "urn:xmpp:invite#invitation"
COOKIE = "presenced_invite"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}")
_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_DURATION = re.compile(r"(\d{1,9})([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True, slots=True, kw_only=True)
class InvitesSettings:
    allow_users: bool = field(metadata=bool_option(False))
    expire_after: float = field(metadata=seconds_option(604800.0))
    form_limit: int = field(metadata=int_option(1, 100000, 10))


# -- making invitations (the CLI and the ad-hoc command) ----------------------------------------


def parse_duration(text: str) -> int:
    """'7d', '12h', '30m', '90s', '2w' or seconds -> seconds; ValueError otherwise."""
    found = _DURATION.fullmatch(text.strip())
    if found is None or int(found.group(1)) == 0:
        raise ValueError(f"not a duration such as 7d, 12h or 30m: {text!r}")
    return int(found.group(1)) * _UNITS[found.group(2)]


def new_invitation(domain: str, inviter: str | None, *, uses: int, lifetime: float,
                   group: str | None = None) -> Invitation:
    now = int(time.time())
    return Invitation(secrets.token_urlsafe(24), domain, inviter, uses, now,
                      now + int(lifetime), group)


def xmpp_uri(invitation: Invitation, ibr: bool = True) -> str:
    """XEP-0401 §3.1 (from an account; ibr=y when it may register here) and §3.4."""
    token = quote(invitation.token, safe="")
    if invitation.inviter is not None:
        jid = quote(f"{invitation.inviter}@{invitation.domain}", safe="@")
        return f"xmpp:{jid}?roster;preauth={token}" + (";ibr=y" if ibr else "")
    return f"xmpp:{quote(invitation.domain, safe='')}?register;preauth={token}"


def page_base(config: Config, domain: str) -> str:
    """The page's base URL without a running server: [http] external_url, else
    https://<domain>:<port> of the first HTTPS listener (http:// of a plain one)."""
    http = config.modules.get("http")
    external = getattr(http, "external_url", None)
    if external:
        return str(external).rstrip("/")
    listen = config.listen
    for scheme, addresses in (("https", listen.https), ("http", listen.http)):
        for address in addresses:
            return f"{scheme}://{domain}:{address.port}"
    return f"https://{domain}"


def expiry_text(invitation: Invitation) -> str:
    """XEP-0082 DateTime."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(invitation.expires))


# -- the page's clients, by platform --------------------------------------------------------------

_CLIENTS = {
    "android": ("Android", [("Conversations", "https://f-droid.org/packages/eu.siacs.conversations/"),
                            ("Conversations (Google Play)",
                             "https://play.google.com/store/apps/details?id=eu.siacs.conversations")]),
    "ios": ("iPhone and iPad", [("Monal", "https://apps.apple.com/app/id317711500"),
                                ("Siskin IM", "https://siskin.im/")]),
    "macos": ("macOS", [("Monal", "https://apps.apple.com/app/id1637078500"),
                        ("Gajim", "https://gajim.org/download/")]),
    "windows": ("Windows", [("Gajim", "https://gajim.org/download/")]),
    "linux": ("Linux", [("Dino", "https://dino.im/#download"),
                        ("Gajim", "https://gajim.org/download/")]),
}


def platform_of(user_agent: str) -> str | None:
    ua = user_agent.lower()
    if "android" in ua:
        return "android"
    if any(k in ua for k in ("iphone", "ipad", "ipod")):
        return "ios"
    if "mac os x" in ua or "macintosh" in ua:
        return "macos"
    if "windows" in ua:
        return "windows"
    if "linux" in ua or "x11" in ua:
        return "linux"
    return None


class Invites(Module):
    name = "invites"
    settings = InvitesSettings
    stores = (invite_store.SPEC,)
    # Registration by invitation, the landing pages and the ad-hoc command, each when loaded.
    uses = (Register, HTTP, AdHoc)

    def __init__(self, server: ModuleContext, config: InvitesSettings) -> None:
        super().__init__(server, config)
        self._key = secrets.token_bytes(32)  # CSRF field = HMAC(key, cookie | token)
        self._http: HTTP | None = None
        self._posts: dict[str, collections.deque[float]] = {}  # IP -> form posts

    @property
    def _store(self) -> invite_store.InviteStoreSQL:
        store: invite_store.InviteStoreSQL = self.store_of(invite_store.SPEC)
        return store

    @property
    def _register(self) -> Register | None:
        return self.server.module(Register)

    async def start(self) -> None:
        http = self.server.module(HTTP)
        if http is not None and http.enabled:
            self._http = http
            http.route(PREFIX, self._page, prefix=True)
        if self.config.allow_users:
            adhoc = self.server.module(AdHoc)
            if adhoc is not None:
                adhoc.commands[NODE_INVITE] = ("Invite user", self._invite_command)
        await self._store.purge(int(time.time()) - 86400)  # expired for a day: gone

    async def create(self, domain: str, inviter: str | None, *, uses: int, lifetime: float,
                     group: str | None = None) -> tuple[Invitation, str, str]:
        """A new invitation, stored: (it, its xmpp: URI, its page's URL). For the admin page
        (server/modules/webadmin.py)."""
        invitation = new_invitation(domain, inviter, uses=uses, lifetime=lifetime, group=group)
        await self._store.create(invitation)
        return invitation, xmpp_uri(invitation, self._ibr), self.landing_url(invitation)

    def landing_url(self, invitation: Invitation) -> str:
        base = (self._http.base_url() if self._http is not None
                else page_base(self.server.config, invitation.domain))
        return f"{base}{PREFIX}{invitation.token}"

    @property
    def _ibr(self) -> bool:
        register = self._register
        return register is not None and register.config.mode != "none"

    # -- XEP-0401 §3.1: a user asks for an invitation ----------------------------------------

    async def _invite_command(self, requester: JID) -> Stanza:
        assert requester.local is not None
        invitation = new_invitation(requester.domain, requester.local, uses=1,
                                    lifetime=self.config.expire_after)
        await self._store.create(invitation)
        log.info("event=invitation-created inviter=%s uses=1 via=adhoc", requester)
        return self.invitation_form(invitation)

    def invitation_form(self, invitation: Invitation) -> Stanza:
        """The XEP-0401 result form: the xmpp: URI, the landing page, the expiry (also what
        admin_adhoc.py's create-account command answers)."""
        form = st.element(ns.q(ns.DATA_FORMS, "x"), {"type": "result"})
        for var, type_, label, value in (
                ("FORM_TYPE", "hidden", None, FORM_TYPE),
                ("uri", "text-single", "Invitation URI", xmpp_uri(invitation, self._ibr)),
                ("landing-url", "text-single", "Invitation web page",
                 self.landing_url(invitation)),
                ("expire", "text-single", "Valid until", expiry_text(invitation))):
            attrs = {"var": var, "type": type_}
            if label is not None:
                attrs["label"] = label
            item = st.child(form, ns.q(ns.DATA_FORMS, "field"), attrs)
            st.child(item, ns.q(ns.DATA_FORMS, "value"), text=value)
        return form

    # -- XEP-0379: inviter and invitee subscribe to each other -------------------------------

    @hook(events.ACCOUNT_REGISTERED)
    async def registered(self, jid: JID, invitation: Invitation | None) -> None:
        if invitation is None or invitation.inviter is None:
            return
        inviter = JID.from_parts(invitation.inviter, invitation.domain)
        if not await self.server.storage.accounts.exists(invitation.inviter, inviter.domain):
            return
        groups = (invitation.group,) if invitation.group else ()
        rosters = self.server.rosters
        for owner, contact in ((inviter, jid), (jid, inviter)):
            async with rosters.lock(owner):
                roster = await rosters.get(owner)
                old = roster.items.get(str(contact))
                item = RosterItem(contact=str(contact), name=old.name if old else None,
                                  groups=tuple(dict.fromkeys((*(old.groups if old else ()),
                                                              *groups))),
                                  subscription="both", listed=True)
                await rosters.put(owner, item)  # RFC 6121 §2.1.6 push to the inviter
        log.info("event=invitation-subscribed inviter=%s invitee=%s", inviter, jid)

    # -- the page ----------------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.StreamResponse:
        token = unquote(request.path[len(PREFIX):]).strip("/")
        address = self._http.client_address(request) if self._http is not None else None
        if request.method not in ("GET", "HEAD", "POST"):
            return _html(405, "Not allowed", "<p>This page is read or posted only.</p>",
                         {"Allow": "GET, HEAD, POST"})
        if request.method == "POST" and self._throttled(address or "?"):
            log.info("event=invite-form-refused reason=rate-limit address=%s", address)
            return _html(429, "Too many attempts",
                         "<p>Too many attempts from your address. Wait a minute and try "
                         "again.</p>", {"Retry-After": "60"})
        invitation = None
        if _TOKEN.fullmatch(token):
            found = await self._store.get(token)
            if found is not None and found.usable(time.time()):
                invitation = found
        if invitation is None:
            return _html(404, "Invitation not valid",
                         "<p>This invitation is not valid: it was used already, it "
                         "expired, or the link is incomplete. Ask the person who invited you "
                         "for a new one.</p>")
        if request.method == "POST":
            return await self._post(request, invitation, address)
        cookie = request.cookies.get(COOKIE, "")
        if not _TOKEN.fullmatch(cookie):
            cookie = secrets.token_urlsafe(24)
        response = self._render(request, invitation, cookie)
        response.set_cookie(COOKIE, cookie, path=PREFIX, httponly=True, samesite="Strict",
                            secure=self._http is not None
                            and self._http.scheme(request) == "https")
        return response

    def _csrf(self, cookie: str, token: str) -> str:
        return hmac.new(self._key, f"{cookie}|{token}".encode(), hashlib.sha256).hexdigest()

    def _throttled(self, address: str) -> bool:
        now = time.monotonic()
        posts = self._posts.setdefault(address, collections.deque())
        while posts and posts[0] <= now - 60:
            posts.popleft()
        if len(self._posts) > 10000:
            for key in [k for k, v in self._posts.items() if not v and k != address]:
                del self._posts[key]
        if len(posts) >= self.config.form_limit:
            return True
        posts.append(now)
        return False

    async def _post(self, request: web.Request, invitation: Invitation,
                    address: str | None) -> web.StreamResponse:
        if self._http is not None and self._http.foreign_form(request):
            log.info("event=invite-form-refused reason=origin address=%s", address)
            return _html(403, "Refused", "<p>This form must be sent from its own page.</p>")
        try:
            form = await request.post()
        except ValueError:
            return _html(400, "Bad request", "<p>The form could not be read.</p>")
        cookie = request.cookies.get(COOKIE, "")

        def value(name: str) -> str:
            got = form.get(name, "")
            return got if isinstance(got, str) else ""

        sent = value("csrf")
        if not cookie or not hmac.compare_digest(sent, self._csrf(cookie, invitation.token)):
            log.info("event=invite-form-refused reason=csrf address=%s", address)
            return _html(403, "Refused", "<p>This form expired or came from another page. "
                         "<a href=''>Open the invitation again</a>.</p>")
        username, password = value("username"), value("password")
        register = self._register
        error: str | None = None
        status = 400
        if register is None:
            error, status = "Registration is not available on this server.", 403
        elif password != value("password2"):
            error = "The two passwords are not the same."
        if error is None and register is not None:
            try:
                jid = await register.register(username, invitation.domain, password,
                                              token=invitation.token, address=address,
                                              via="web")
            except StanzaError as exc:
                error = exc.text or exc.condition
                status = {"conflict": 409, "forbidden": 403, "not-allowed": 403,
                          "resource-constraint": 429}.get(exc.condition, 400)
                log.info("event=invite-form-refused reason=%s address=%s", exc.condition,
                         address)
            else:
                return self._done(jid)
        response = self._render(request, invitation, cookie, error=error, username=username)
        response.set_status(status)
        return response

    # -- HTML (everything from outside is escaped) -------------------------------------------

    def _render(self, request: web.Request, invitation: Invitation, cookie: str, *,
                error: str | None = None, username: str = "") -> web.Response:
        e = html.escape
        domain = invitation.domain
        who = (f"<strong>{e(invitation.inviter)}@{e(domain)}</strong> invites you"
               if invitation.inviter else "You are invited")
        uri = xmpp_uri(invitation, self._ibr)
        platform = platform_of(request.headers.get("User-Agent", ""))
        order = [platform] if platform else []
        order += [p for p in _CLIENTS if p not in order]
        clients = []
        for key in order:
            label, apps = _CLIENTS[key]
            links = ", ".join(f"<a href='{e(url)}'>{e(app)}</a>" for app, url in apps)
            mark = " class='yours'" if key == platform else ""
            clients.append(f"<li{mark} data-platform='{key}'>{e(label)}: {links}</li>")
        recommended = ""
        if platform is not None:
            app, url = _CLIENTS[platform][1][0]
            recommended = (f"<p id='recommended'>On {e(_CLIENTS[platform][0])} we recommend "
                           f"<a href='{e(url)}'>{e(app)}</a>.</p>")
        register = self._register
        form = ""
        if register is not None and register.config.mode != "none":
            problem = f"<p class='error' role='alert'>{e(error)}</p>" if error else ""
            form = f"""
<h2>No app yet? Create your account here</h2>
{problem}
<form method="post" action="{e(PREFIX + invitation.token)}">
<input type="hidden" name="csrf" value="{e(self._csrf(cookie, invitation.token))}">
<p><label for="username">Username</label>
<input id="username" name="username" required maxlength="64" autocomplete="username"
 value="{e(username)}"><span class="at">@{e(domain)}</span></p>
<p class="rule">{e(USERNAME_RULE[0].upper() + USERNAME_RULE[1:])}.</p>
<p><label for="password">Password</label>
<input id="password" name="password" type="password" required
 minlength="{register.config.min_password_length}" autocomplete="new-password"></p>
<p><label for="password2">Password (again)</label>
<input id="password2" name="password2" type="password" required
 minlength="{register.config.min_password_length}" autocomplete="new-password"></p>
<p class="rule">The password needs {e(register.password_rule)}.</p>
<p><button type="submit" id="register">Create account</button></p>
</form>"""
        body = f"""
<p>{who} to chat on <strong>{e(domain)}</strong>, an XMPP server.</p>
<p>This invitation is valid until {e(expiry_text(invitation))}.</p>
<h2>1. Install an app</h2>
{recommended}
<ul id="clients">{"".join(clients)}</ul>
<h2>2. Open the invitation in it</h2>
<p><a class="button" id="open" href="{e(uri)}">Open in your app</a></p>
<p class="rule">The app creates your account and adds the contact for you.</p>
{form}"""
        return _html(200, f"Invitation to {domain}", body)

    def _done(self, jid: JID) -> web.Response:
        e = html.escape
        body = (f"<p id='done'>Your account <strong>{e(str(jid))}</strong> is ready.</p>"
                f"<p>Install an XMPP app and log in as <code>{e(str(jid))}</code> with the "
                "password you chose.</p>")
        return _html(201, "Account created", body)


def _html(status: int, title: str, body: str,
          headers: dict[str, str] | None = None) -> web.Response:
    e = html.escape
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 36em; margin: 2em auto; padding: 0 1em;
       line-height: 1.5; color: #222; }}
.button, button {{ display: inline-block; padding: .6em 1.2em; background: #1565c0;
       color: #fff; border: 0; border-radius: .3em; text-decoration: none; font-size: 1em; }}
label {{ display: block; font-weight: bold; }}
input {{ font-size: 1em; padding: .3em; }}
.rule {{ color: #555; font-size: .9em; }}
.error {{ color: #b00020; font-weight: bold; }}
li.yours {{ font-weight: bold; }}
</style></head>
<body><h1>{e(title)}</h1>
{body}
</body></html>
"""
    all_headers = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
                   "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                   "X-Frame-Options": "DENY"}
    all_headers.update(headers or {})
    return web.Response(status=status, text=page, content_type="text/html",
                        headers=all_headers)


# -- presenced invite create ------------------------------------------------------------------


async def create_for_cli(config: Config, *, inviter: str | None, domain: str | None,
                         admin: bool, contact: bool, uses: int, lifetime: int,
                         group: str | None) -> tuple[Invitation, list[str]]:
    """The invitation `presenced invite create` makes, and the lines it prints: the page's
    link, the xmpp: URI, then what it allows. The inviter: --from; else (--admin, or by
    default) the first account of `admins` on the domain, so the new account and the admin
    become contacts; --no-contact: nobody. ValueError says what is wrong."""
    from server.storage import CORE_STORES, open_storage

    if inviter is not None:
        try:
            jid = JID.parse(inviter)
        except ValueError as exc:
            raise ValueError(f"invalid JID {inviter!r}: {exc}") from None
        if jid.local is None or jid.resource is not None:
            raise ValueError(f"{inviter!r} is not a bare JID of the form user@domain")
        if domain is not None and domain != jid.domain:
            raise ValueError(f"the inviter {jid} is not of --domain {domain}")
        domain = jid.domain
    domain = domain or config.domains[0]
    if domain not in config.domains:
        raise ValueError(f"{domain} is not a domain of this server; it serves "
                         f"{', '.join(config.domains)} (see --config)")
    storage = await open_storage(config, (*CORE_STORES, invite_store.SPEC))
    try:
        local: str | None = None
        if inviter is not None:
            local = JID.parse(inviter).local
            assert local is not None
            if not await storage.accounts.exists(local, domain):
                raise ValueError(f"no such user: {local}@{domain}")
        elif contact or admin:
            for admin_jid in config.admins:
                parsed = JID.parse(admin_jid)
                if parsed.domain == domain and parsed.local is not None and \
                        await storage.accounts.exists(parsed.local, domain):
                    local = parsed.local
                    break
            if admin and local is None:
                raise ValueError(f"no account of `admins` exists on {domain}: add one, or "
                                 "name the inviter with --from")
        invitation = new_invitation(domain, local, uses=uses, lifetime=lifetime, group=group)
        store: invite_store.InviteStoreSQL = getattr(storage, "invites")  # noqa: B009
        await store.create(invitation)
    finally:
        await storage.close()
    register = config.modules.get("register")
    ibr = getattr(register, "mode", "invite") != "none"
    who = f"from {local}@{domain}" if local else "from nobody (no contact is added)"
    lines = [f"{page_base(config, domain)}{PREFIX}{invitation.token}",
             xmpp_uri(invitation, ibr),
             f"valid until {expiry_text(invitation)}, {uses} use(s), {who}"
             + (f", group {group}" if group else "")]
    return invitation, lines

"""In-Band Registration (XEP-0077), with invitations (XEP-0445 pre-authenticated IBR).

    [register]
    mode = "invite"          # "invite": only with an invitation; "open": anyone; "none": nobody
    welcome_message = "..."  # sent to each new account ($username, $host replaced); unset: none
    min_password_length = 8
    open_limit = 3           # open mode: accounts one IP address may make per open_period
    open_period = 3600

Before authenticating, a client asks for the form (`<query xmlns='jabber:iq:register'/>` get,
XEP-0077 §3.1) and sends username and password (set); with an invitation it first sends the
token (`<preauth xmlns='urn:xmpp:pars:0' token='...'/>`, XEP-0445 §3), as Conversations and
Dino do when they open `xmpp:...?register;preauth=TOKEN` or `?roster;preauth=TOKEN;ibr=y`.
The token may also come as the form's `token` field. A logged-in user changes the password
(§3.3) or removes the account (§3.2) with the same namespace.

`register()` is the one way an account is made by a user (the invitation page uses it too): it
checks mode, token, name and password, makes the account, fires `account-registered`
(jid, invitation or None: the invites module subscribes inviter and invitee, XEP-0379) and
sends the welcome message.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import precis_i18n

from server import events
from server.config import Invalid, choice_option, int_option, option, seconds_option
from server.errors import StanzaError
from server.jid import JID, InvalidJID, normalize_localpart
from server.module import Module, Stanza, hook, iq_get, iq_set
from server.sessions import Session
from server.storage import invites as invite_store
from server.storage.base import AccountExists, NoSuchAccount
from server.storage.invites import Invitation
from server.stream.scram import derive_credentials
from server.xml import stanza as st

if TYPE_CHECKING:
    from server.app import Server
    from server.stream.c2s import C2SConnection

log = logging.getLogger("presenced.register")

NS = "jabber:iq:register"
FEATURE_NS = "http://jabber.org/features/iq-register"
PARS = "urn:xmpp:pars:0"
DATA_FORMS = "jabber:x:data"
QUERY = f"{{{NS}}}query"
PREAUTH = f"{{{PARS}}}preauth"
MODES = ("invite", "open", "none")
MAX_USERNAME = 64
MAX_PASSWORD = 1024
# Shown on the page and in the form's instructions; checked on the normalised localpart.
USERNAME_RULE = "1 to 64 letters, digits, '.', '_' or '-'"
_USERNAME = re.compile(r"[\w.-]{1,64}")


def _text(value: Any, _ctx: Any) -> str | None:
    if not isinstance(value, str):
        raise Invalid
    return value or None


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterSettings:
    mode: str = field(metadata=choice_option("invite", *MODES))
    # Sent as a message from the domain to every new account; $username and $host replaced.
    welcome_message: str | None = field(metadata=option("a string", _text))
    min_password_length: int = field(metadata=int_option(1, 1024, 8))
    # Open mode: at most open_limit accounts per IP address in open_period seconds.
    open_limit: int = field(metadata=int_option(1, 1000000, 3))
    open_period: float = field(metadata=seconds_option(3600.0))


class Register(Module):
    name = "register"
    features = (NS,)
    settings = RegisterSettings
    stores = (invite_store.SPEC,)

    def __init__(self, server: Server, config: RegisterSettings) -> None:
        super().__init__(server, config)
        self._made: dict[str, collections.deque[float]] = {}  # IP -> times (open mode)

    @property
    def _invites(self) -> invite_store.InviteStoreSQL:
        store: invite_store.InviteStoreSQL = self.store_of(invite_store.SPEC)
        return store

    # -- the rules ---------------------------------------------------------------------------

    @property
    def password_rule(self) -> str:
        return f"at least {self.config.min_password_length} characters"

    def check_username(self, username: str) -> str:
        """The normalised localpart, or StanzaError not-acceptable."""
        try:
            user = normalize_localpart(username.strip())
        except InvalidJID:
            user = ""
        if not _USERNAME.fullmatch(user):
            raise StanzaError("not-acceptable", f"the username must be {USERNAME_RULE}")
        return user

    def check_password(self, password: str) -> None:
        if len(password) < self.config.min_password_length or len(password) > MAX_PASSWORD:
            raise StanzaError("not-acceptable", f"the password must have {self.password_rule}")
        try:  # RFC 8265 §4.2: one that does not prepare could never be used to log in
            precis_i18n.get_profile("OpaqueString").enforce(password)
        except UnicodeError:
            raise StanzaError("not-acceptable", "the password has characters that cannot be "
                              "used (RFC 8265 OpaqueString)") from None

    async def valid_invitation(self, token: str, domain: str) -> Invitation | None:
        found = await self._invites.get(token) if token else None
        if found is None or found.domain != domain or not found.usable(time.time()):
            return None
        return found

    def _throttled(self, address: str | None) -> bool:
        """Open mode: has this address made open_limit accounts within open_period?"""
        if address is None:
            return False
        now = time.monotonic()
        made = self._made.setdefault(address, collections.deque())
        while made and made[0] <= now - self.config.open_period:
            made.popleft()
        if len(self._made) > 10000:  # forget addresses with nothing recent
            for key in [k for k, v in self._made.items() if not v and k != address]:
                del self._made[key]
        return len(made) >= self.config.open_limit

    # -- making an account -------------------------------------------------------------------

    async def register(self, username: str, domain: str, password: str, *,
                       token: str | None = None, address: str | None = None,
                       via: str = "ibr") -> JID:
        """Make an account; StanzaError (XEP-0077 §3.1 conditions) when it cannot be."""
        mode = self.config.mode
        if mode == "none":
            raise StanzaError("not-allowed", "registration is closed on this server")
        if domain not in self.server.hosts:
            raise StanzaError("not-allowed", f"{domain} is not served here")
        user = self.check_username(username)
        self.check_password(password)
        invitation: Invitation | None = None
        if token:
            invitation = await self.valid_invitation(token, domain)
            if invitation is None:
                raise StanzaError("forbidden", "this invitation is not valid: it was used, "
                                  "it expired, or it never existed")
        elif mode == "invite":
            raise StanzaError("not-allowed", "registration needs an invitation")
        elif self._throttled(address):
            raise StanzaError("resource-constraint",
                              "too many accounts were made from your address; try later")
        accounts = self.server.storage.accounts
        if await accounts.exists(user, domain):
            raise StanzaError("conflict", "this username is taken")
        iterations = self.server.config.c2s.scram_iterations
        # PBKDF2 for two hashes: off the event loop.
        credentials = await asyncio.get_running_loop().run_in_executor(
            None, derive_credentials, password, iterations)
        if invitation is not None and await self._invites.consume(
                invitation.token, domain, int(time.time())) is None:
            raise StanzaError("forbidden", "this invitation was used meanwhile")
        try:
            await accounts.create(user, domain, credentials)
        except AccountExists:
            if invitation is not None:
                await self._invites.refund(invitation.token)
            raise StanzaError("conflict", "this username is taken") from None
        if invitation is None and address is not None:
            self._made.setdefault(address, collections.deque()).append(time.monotonic())
        jid = JID.from_parts(user, domain)
        log.info("event=registered jid=%s via=%s invitation=%s inviter=%s address=%s", jid, via,
                 "yes" if invitation else "no",
                 (invitation.inviter if invitation and invitation.inviter else "-"),
                 address or "-")
        # Each awaited on its own: one failing does not stop the others.
        for pending in self.server.hooks.notify_nowait(events.ACCOUNT_REGISTERED, jid, invitation):
            try:
                await pending
            except Exception:
                log.exception("event=account-registered-hook-failed jid=%s", jid)
        await self._welcome(jid)
        return jid

    async def _welcome(self, jid: JID) -> None:
        text = self.config.welcome_message
        if not text:
            return
        body = text.replace("$username", jid.local or "").replace("$host", jid.domain)
        message = st.element(st.MESSAGE, {"from": jid.domain, "to": str(jid), "type": "chat",
                                          "id": f"welcome-{int(time.time())}"})
        st.child(message, "{jabber:client}body", text=body)
        pending = self.server.router.route(message, None)
        if pending is not None:
            await pending

    # -- XEP-0077 before authentication (hooks of server/stream/c2s.py) ----------------------

    @hook(events.C2S_PRE_AUTH_FEATURES)
    def stream_feature(self, _stream: C2SConnection) -> list[Stanza]:
        if self.config.mode == "none":
            return []
        return [st.element(f"{{{FEATURE_NS}}}register")]  # XEP-0077 §4

    @hook(events.C2S_PRE_AUTH_IQ)
    def pre_auth_iq(self, stream: C2SConnection, iq: Stanza) -> Any:
        return self._pre_auth(stream, iq)

    async def _pre_auth(self, stream: C2SConnection, iq: Stanza) -> Stanza:
        payload = iq[0]
        domain = stream.negotiation.domain or self.server.default_domain
        if payload.tag == PREAUTH:
            # XEP-0445 §3: the token comes first; registration then needs no other right.
            if iq.get("type") != "set":
                raise StanzaError("bad-request", "send the token with type='set'")
            token = payload.get("token", "")
            if self.config.mode == "none" or await self.valid_invitation(token, domain) is None:
                log.info("event=preauth-refused peer=%s reason=invalid-token", stream.peer)
                raise StanzaError("item-not-found", "this invitation is not valid: it was "
                                  "used, it expired, or it never existed")
            stream.pre_auth["token"] = token
            return st.result(iq)
        if iq.get("type") == "get":
            if self.config.mode == "none":
                raise StanzaError("service-unavailable", "registration is closed")
            return st.result(iq, self._form(stream.pre_auth.get("token")))
        if payload.find(f"{{{NS}}}remove") is not None:
            raise StanzaError("not-authorized", "log in to remove your account")
        username, password, token = _fields(payload)
        if username is None or password is None:
            raise StanzaError("not-acceptable", "username and password are required")
        address = stream.peer.rpartition(":")[0].strip("[]") or None
        try:
            await self.register(username, domain, password,
                                token=token or stream.pre_auth.get("token"), address=address)
        except StanzaError as exc:
            log.info("event=registration-refused peer=%s reason=%s", stream.peer, exc.condition)
            raise
        stream.pre_auth.pop("token", None)
        return st.result(iq)

    def _form(self, token: str | None) -> Stanza:
        """XEP-0077 §3.1 fields, and the same as a XEP-0004 form (§5) with labels."""
        query = st.element(QUERY)
        rules = (f"Choose a username ({USERNAME_RULE}) and a password "
                 f"({self.password_rule}).")
        if self.config.mode == "invite" and not token:
            rules += " Registration needs an invitation: enter its token."
        st.child(query, f"{{{NS}}}instructions", text=rules)
        st.child(query, f"{{{NS}}}username")
        st.child(query, f"{{{NS}}}password")
        form = st.child(query, f"{{{DATA_FORMS}}}x", {"type": "form"})
        st.child(form, f"{{{DATA_FORMS}}}title", text="Create an account")
        st.child(form, f"{{{DATA_FORMS}}}instructions", text=rules)
        fields = [("FORM_TYPE", "hidden", None), ("username", "text-single", "Username"),
                  ("password", "text-private", "Password")]
        if self.config.mode == "invite" and not token:
            fields.append(("token", "text-single", "Invitation token"))
        for var, type_, label in fields:
            attrs = {"var": var, "type": type_}
            if label is not None:
                attrs["label"] = label
            item = st.child(form, f"{{{DATA_FORMS}}}field", attrs)
            if var == "FORM_TYPE":
                st.child(item, f"{{{DATA_FORMS}}}value", text=NS)
            else:
                st.child(item, f"{{{DATA_FORMS}}}required")
        return query

    # -- XEP-0077 for a logged-in user -------------------------------------------------------

    @iq_get(NS, "query", to=("host", "self"))
    def registered(self, stanza: Stanza, origin: Session | None) -> Stanza:
        """§3.2.1: a registered entity gets <registered/> and its username."""
        user = _own(origin, stanza)
        query = st.element(QUERY)
        st.child(query, f"{{{NS}}}registered")
        st.child(query, f"{{{NS}}}username", text=user.local)
        return st.result(stanza, query)

    @iq_set(NS, "query", to=("host", "self"))
    async def change(self, stanza: Stanza, origin: Session | None) -> Stanza | bool:
        user = _own(origin, stanza)
        assert origin is not None and user.local is not None
        payload = stanza[0]
        accounts = self.server.storage.accounts
        if payload.find(f"{{{NS}}}remove") is not None:
            # §3.2: the result first, then the account and its sessions go.
            try:
                await accounts.delete(user.local, user.domain)
            except NoSuchAccount:
                raise StanzaError("item-not-found", "no such account") from None
            origin.send(st.result(stanza))
            log.info("event=unregistered jid=%s", user)
            for session in self.server.sessions.resources(user):
                session.close("not-authorized", "the account was removed")
            return True
        username, password, _token = _fields(payload)
        if password is None:
            raise StanzaError("not-acceptable", "a new password is required")
        if username is not None:
            try:
                same = normalize_localpart(username.strip()) == user.local
            except InvalidJID:
                same = False
            if not same:
                raise StanzaError("not-allowed", "you can change your own password only")
        self.check_password(password)
        credentials = await asyncio.get_running_loop().run_in_executor(
            None, derive_credentials, password, self.server.config.c2s.scram_iterations)
        try:
            await accounts.set_credentials(user.local, user.domain, credentials)
        except NoSuchAccount:
            raise StanzaError("item-not-found", "no such account") from None
        log.info("event=password-changed jid=%s", user)
        return st.result(stanza)


def _own(origin: Session | None, stanza: Stanza) -> JID:
    """The sender's account: these requests are about one's own registration."""
    if origin is None or origin.jid.local is None:
        raise StanzaError("forbidden", "only for this server's own users")
    to = stanza.get("to")
    if to is not None and to not in (origin.jid.domain, origin.bare_str):
        raise StanzaError("forbidden", "only for your own account")
    return origin.jid.bare


def _fields(query: Stanza) -> tuple[str | None, str | None, str | None]:
    """(username, password, token) from the legacy fields or a submitted form (§5)."""
    values: dict[str, str | None] = {
        name: query.findtext(f"{{{NS}}}{name}") for name in ("username", "password")}
    values["token"] = None
    form = query.find(f"{{{DATA_FORMS}}}x")
    if form is not None and form.get("type") == "submit":
        for item in form.iter(f"{{{DATA_FORMS}}}field"):
            var = item.get("var")
            if var in ("username", "password", "token"):
                values[var] = item.findtext(f"{{{DATA_FORMS}}}value") or ""
    return values["username"], values["password"], values["token"]

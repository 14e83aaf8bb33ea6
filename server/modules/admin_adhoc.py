"""Service Administration (XEP-0133): ad-hoc commands (XEP-0050) for the accounts in the
top-level ``admins`` list, as Gajim, Psi and Dino's admin menus and slixmpp's xep_0133 drive them.

Commands (node ``http://jabber.org/protocol/admin#<name>``, sent to one of our domains):

  add-user              accountjid, password, password-verify            (§4.1)
  delete-user           accountjids (jid-multi)                          (§4.2)
  end-user-session      accountjids (a bare JID ends every resource)     (§4.5)
  change-user-password  accountjid, password                             (§4.7)
  get-registered-users-num, -list: the domain's accounts (max_items)   (§4.13, §4.18)
  get-online-users-num  the number of online accounts of the domain     (§4.15)
  get-online-users-list max_items; the online accounts                   (§4.21)
  announce              announcement: a message to every online session (§4.23)
  set-motd / edit-motd  motd: sent to each session at its initial presence (§4.24, §4.25)
  delete-motd           (§4.26)

A command with input answers the first ``execute`` with a form (status executing) and keeps the
session id; the submitted form (action complete, next or execute) completes it. A form submitted
in the first request completes at once. Everyone else gets <forbidden/> and does not see the
commands in disco#items (XEP-0050 §2.2: the responder decides what a requester may see).

The message of the day is stored per domain (server/storage/motd.py), so it survives restarts,
and cached per domain for the logins (read at every initial presence otherwise, while the
stream's next stanzas wait: issue 25 item 6); set/edit/delete here replace the cached copy.
  urn:xmpp:invite#create-account  uses, expires, group: an invitation (XEP-0401 §3.2) whose
                        new accounts and the admin become contacts (XEP-0379); offered when
                        server/modules/invites.py is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import precis_i18n

from server import ctl, events
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, SessionSlot, Stanza, hook
from server.modules.invites import Invites, parse_duration
from server.sessions import Session
from server.storage.base import AccountExists, NoSuchAccount
from server.storage.motd import SPEC as MOTD_SPEC
from server.storage.motd import MotdStore
from server.stream.scram import derive_credentials
from server.xml import ns
from server.xml import stanza as st
from server.xml.numbers import NumberError, parse_int

if TYPE_CHECKING:
    from server.app import Server

log = logging.getLogger("presenced")

ADMIN = "http://jabber.org/protocol/admin"
NODE_CREATE_ACCOUNT = "urn:xmpp:invite#create-account"  # XEP-0401 §3.2: for admins
_X = ns.q(ns.DATA_FORMS, "x")
_FIELD = ns.q(ns.DATA_FORMS, "field")
_VALUE = ns.q(ns.DATA_FORMS, "value")
_SESSION_LIFETIME = 600.0  # seconds a half-done command waits for its form
_MAX_SESSIONS = 64         # half-done commands kept at once (the oldest go first)
_MAX_ITEMS = ("25", "50", "75", "100", "150", "200", "none")
# [cluster]: seconds a cached message of the day is used before it is read again (another node
# may have changed it).
MOTD_RECHECK = 10.0

Values = dict[str, list[str]]


@dataclass(frozen=True)
class Field:
    var: str
    type: str
    label: str
    required: bool = False
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Context:
    requester: JID
    domain: str  # the domain the command was sent to


Run = Callable[[Context, Values], Awaitable[Stanza]]


@dataclass(frozen=True)
class Command:
    name: str                       # shown to users (XEP-0050 §2.2)
    fields: tuple[Field, ...]       # () : no input, completes at the first execute
    run: Run
    instructions: str = ""
    current: Callable[[Context], Awaitable[Values]] | None = None  # the form's initial values


class AdminAdHoc(Module):
    name = "admin_adhoc"
    stores = (MOTD_SPEC,)
    uses = (Invites,)  # the XEP-0401 create-account command, when invitations are loaded
    motd_sent = SessionSlot[bool](False)

    def __init__(self, server: Server, config: Any) -> None:
        super().__init__(server, config)
        # domain -> (its message of the day or None, time.monotonic() when read). With
        # [cluster] an admin may change it on another node, and no invalidation tells us:
        # there the copy is read again once it is MOTD_RECHECK seconds old (a change reaches
        # the logins on every node within that); alone, it is only replaced by our commands.
        self._motds: dict[str, tuple[str | None, float]] = {}
        self._motd_changes = 0  # bumped by every change: a read begun before one is not kept
        jid_multi = Field("accountjids", "jid-multi", "The Jabber ID(s)", required=True)
        password = Field("password", "text-private", "The password for this account",
                         required=True)
        commands: dict[str, Command] = {
            "add-user": Command("Add User", (
                Field("accountjid", "jid-single", "The Jabber ID for the account to be added",
                      required=True),
                password,
                Field("password-verify", "text-private", "Retype password", required=True),
            ), self._add_user, "Fill out this form to add a user."),
            "delete-user": Command("Delete User", (jid_multi,), self._delete_user,
                                   "Fill out this form to delete users."),
            "end-user-session": Command("End User Session", (jid_multi,), self._end_session,
                                        "Fill out this form to end users' sessions."),
            "change-user-password": Command("Change User Password", (
                Field("accountjid", "jid-single", "The Jabber ID for this account",
                      required=True),
                password,
            ), self._change_password, "Fill out this form to change a user's password."),
            "get-registered-users-num": Command("Get Number of Registered Users", (),
                                                self._registered_num),
            "get-registered-users-list": Command("Get List of Registered Users", (
                Field("max_items", "list-single", "Maximum number of items to show",
                      options=_MAX_ITEMS),
            ), self._registered_list, "Choose how many registered users to list."),
            "get-online-users-num": Command("Get Number of Online Users", (),
                                            self._online_num),
            "get-online-users-list": Command("Get List of Online Users", (
                Field("max_items", "list-single", "Maximum number of items to show",
                      options=_MAX_ITEMS),
            ), self._online_list, "Choose how many online users to list."),
            "announce": Command("Send Announcement to Online Users", (
                Field("subject", "text-single", "Subject"),
                Field("announcement", "text-multi", "Announcement", required=True),
            ), self._announce, "Fill out this form to make an announcement to all online "
                               "users of this service."),
            "set-motd": Command("Set Message of the Day", (
                Field("motd", "text-multi", "Message of the Day", required=True),
            ), self._set_motd, "Set the message users see when they log in."),
            "edit-motd": Command("Edit Message of the Day", (
                Field("motd", "text-multi", "Message of the Day", required=True),
            ), self._set_motd, "Edit the message users see when they log in.",
                self._current_motd),
            "delete-motd": Command("Delete Message of the Day", (), self._delete_motd),
        }
        # node -> command: XEP-0133's under its namespace, XEP-0401's invitation for admins.
        self.commands: dict[str, Command] = {
            f"{ADMIN}#{name}": command for name, command in commands.items()}
        self.commands[NODE_CREATE_ACCOUNT] = Command("Create an invitation", (
            Field("uses", "text-single", "How many accounts it may create (default 1)"),
            Field("expires", "text-single", "Valid for, e.g. 7d, 12h (default: [invites] "
                                            "expire_after)"),
            Field("group", "text-single", "Roster group the new accounts put you in"),
        ), self._create_invitation, "An invitation to create an account on this server: you "
                                    "and the new account become contacts (XEP-0379).")
        # sessionid -> (node, requester, expires at): commands waiting for their form.
        self._pending: dict[str, tuple[str, JID, float]] = {}

    @property
    def motd(self) -> MotdStore:
        store: MotdStore = self.store_of(MOTD_SPEC)
        return store

    def is_admin(self, jid: JID | None) -> bool:
        return jid is not None and str(jid.bare) in self.server.config.admins

    # -- discovery ---------------------------------------------------------------------------

    @hook(events.DISCO_NODE, priority=10)
    def disco_node(self, query: Stanza, origin: Session | None, node: str) -> object:
        """Before adhoc's own handler: admins see these commands too (XEP-0050 §2.2), and
        each is an automation/command-node (§2.3)."""
        if origin is None or not self.is_admin(origin.jid):
            return None
        domain = origin.jid.domain
        if query.tag == ns.q(ns.DISCO_ITEMS, "query") and node == ns.COMMANDS:
            for node_name, command in self.commands.items():
                if node_name == NODE_CREATE_ACCOUNT and self._invites() is None:
                    continue
                st.child(query, ns.q(ns.DISCO_ITEMS, "item"),
                         {"jid": domain, "node": node_name, "name": command.name})
            return None  # adhoc adds its own commands and answers
        found = self._command(node)
        if query.tag == ns.q(ns.DISCO_INFO, "query") and found is not None:
            st.child(query, ns.q(ns.DISCO_INFO, "identity"),
                     {"category": "automation", "type": "command-node", "name": found.name})
            for feature in (ns.COMMANDS, ns.DATA_FORMS):
                st.child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": feature})
            return True
        return None

    def _command(self, node: str) -> Command | None:
        if node == NODE_CREATE_ACCOUNT and self._invites() is None:
            return None
        return self.commands.get(node)

    def _invites(self) -> Invites | None:
        return self.server.module(Invites)

    # -- execution ---------------------------------------------------------------------------

    @hook(events.ADHOC_EXECUTE)
    def execute(self, stanza: Stanza, request: Stanza, requester: JID) -> object:
        node = request.get("node", "")
        command = self._command(node)
        if command is None:
            return None
        return self._execute(stanza, request, requester, node, command)

    async def _execute(self, stanza: Stanza, request: Stanza, requester: JID, node: str,
                       command: Command) -> Stanza:
        if not self.is_admin(requester):
            log.info("event=admin-command-refused jid=%s node=%s", requester, node)
            raise StanzaError("forbidden", "only the server's admins may run this command")
        action = request.get("action", "execute")
        sessionid = request.get("sessionid")
        self._expire()
        if sessionid is not None:
            pending = self._pending.get(sessionid)
            if pending is None or pending[0] != node or pending[1] != requester:
                # XEP-0050 §4.6: <bad-request/> (bad-sessionid).
                raise StanzaError("bad-request", f"no command session {sessionid!r}")
        if action == "cancel":
            if sessionid is not None:
                self._pending.pop(sessionid, None)
            return _command(node, sessionid or secrets.token_hex(8), "canceled")
        if action not in ("execute", "next", "complete"):
            raise StanzaError("bad-request", f"action {action!r} does not apply to {node!r}")
        form = request.find(_X)
        if command.fields and (form is None or form.get("type") != "submit"):
            if sessionid is not None or action != "execute":
                raise StanzaError("bad-request", "submit the command's form")
            return await self._ask(node, command, self._context(stanza, requester))
        values = _values(form) if form is not None else {}
        for field in command.fields:
            # jid-multi fields are checked by _many (which takes the older singular name too).
            given = any(v.strip() for v in values.get(field.var, []))
            if field.required and field.type != "jid-multi" and not given:
                raise StanzaError("bad-request", f"{field.var} is required")
        result = await command.run(self._context(stanza, requester), values)
        if sessionid is not None:
            self._pending.pop(sessionid, None)
        log.info("event=admin-command jid=%s node=%s", requester, node)
        answer = _command(node, sessionid or secrets.token_hex(8), "completed")
        answer.append(result)
        return answer

    def _context(self, stanza: Stanza, requester: JID) -> Context:
        to = stanza.get("to")  # the domain the command went to; absent: the requester's
        return Context(requester, JID.parse(to).domain if to else requester.domain)

    async def _ask(self, node: str, command: Command, ctx: Context) -> Stanza:
        requester = ctx.requester
        current = await command.current(ctx) if command.current is not None else {}
        sessionid = secrets.token_hex(8)
        while len(self._pending) >= _MAX_SESSIONS:
            self._pending.pop(next(iter(self._pending)))
        self._pending[sessionid] = (node, requester, time.monotonic() + _SESSION_LIFETIME)
        answer = _command(node, sessionid, "executing")
        # XEP-0050 §3.4: one stage, so "complete" is the action to take.
        actions = st.child(answer, ns.q(ns.COMMANDS, "actions"), {"execute": "complete"})
        st.child(actions, ns.q(ns.COMMANDS, "complete"))
        form = _form("form", command.name, command.instructions)
        for field in command.fields:
            el = st.child(form, _FIELD, {"var": field.var, "type": field.type,
                                         "label": field.label})
            if field.required:
                st.child(el, ns.q(ns.DATA_FORMS, "required"))
            for value in current.get(field.var, []):
                st.child(el, _VALUE, text=value)
            for option in field.options:
                st.child(st.child(el, ns.q(ns.DATA_FORMS, "option"), {"label": option}),
                         _VALUE, text=option)
        answer.append(form)
        return answer

    def _expire(self) -> None:
        now = time.monotonic()
        for sessionid in [s for s, (_n, _r, until) in self._pending.items() if until < now]:
            del self._pending[sessionid]

    # -- the commands ------------------------------------------------------------------------

    def _account(self, text: str, ctx: Context) -> JID:
        try:
            jid = JID.parse(text.strip())
        except InvalidJID as exc:
            raise StanzaError("jid-malformed", f"{text!r}: {exc}") from None
        if jid.local is None or jid.domain not in self.server.hosts:
            raise StanzaError("bad-request", f"{text!r} is not an account of this server")
        return jid

    async def _credentials(self, password: str) -> Any:
        try:  # RFC 8265 §4.2: one that does not prepare could never be used to log in
            precis_i18n.get_profile("OpaqueString").enforce(password)
        except UnicodeError as exc:
            raise StanzaError("not-acceptable", f"unusable password: {exc}") from None
        iterations = self.server.config.c2s.scram_iterations
        return await asyncio.to_thread(derive_credentials, password, iterations)

    async def _add_user(self, ctx: Context, values: Values) -> Stanza:
        jid = self._account(_one(values, "accountjid"), ctx)
        if jid.resource:
            raise StanzaError("bad-request", "accountjid must be a bare JID")
        password = _one(values, "password")
        if password != _one(values, "password-verify"):
            raise StanzaError("not-acceptable", "the passwords do not match")
        credentials = await self._credentials(password)
        assert jid.local is not None
        try:
            await self.server.storage.accounts.create(jid.local, jid.domain, credentials)
        except AccountExists:
            raise StanzaError("conflict", f"{jid} already exists") from None
        log.info("event=account-added jid=%s by=%s", jid, ctx.requester)
        return _note(f"added {jid}")

    async def _delete_user(self, ctx: Context, values: Values) -> Stanza:
        jids = [self._account(text, ctx).bare for text in _many(values, "accountjids")]
        accounts = self.server.storage.accounts
        for jid in jids:
            assert jid.local is not None
            if not await accounts.exists(jid.local, jid.domain):
                raise StanzaError("item-not-found", f"no account {jid}")
        for jid in jids:
            assert jid.local is not None
            ctl.end_sessions(self.server, jid, "not-authorized", "the account was deleted")
            with contextlib.suppress(NoSuchAccount):  # deleted meanwhile: done as asked
                await accounts.delete(jid.local, jid.domain)
            log.info("event=account-deleted jid=%s by=%s", jid, ctx.requester)
        return _note(f"deleted {', '.join(map(str, jids))}")

    async def _end_session(self, ctx: Context, values: Values) -> Stanza:
        jids = [self._account(text, ctx) for text in _many(values, "accountjids")]
        ended = sum(ctl.end_sessions(self.server, jid, "policy-violation",
                                     "session ended by an administrator") for jid in jids)
        return _note(f"ended {ended} session(s)")

    async def _change_password(self, ctx: Context, values: Values) -> Stanza:
        jid = self._account(_one(values, "accountjid"), ctx).bare
        credentials = await self._credentials(_one(values, "password"))
        assert jid.local is not None
        try:
            await self.server.storage.accounts.set_credentials(jid.local, jid.domain,
                                                               credentials)
        except NoSuchAccount:
            raise StanzaError("item-not-found", f"no account {jid}") from None
        log.info("event=password-changed jid=%s by=%s", jid, ctx.requester)
        return _note(f"changed the password of {jid}")

    def _online(self, domain: str) -> list[str]:
        return sorted({s.bare_str for s in self.server.sessions.all()
                       if s.jid.domain == domain})

    async def _registered(self, domain: str) -> list[str]:
        return [f"{user}@{domain}" for user in
                sorted(await self.server.storage.accounts.list(domain))]

    async def _registered_num(self, ctx: Context, values: Values) -> Stanza:
        form = _form("result", "Number of Registered Users")
        _field(form, "registeredusersnum", "text-single", "The number of registered users",
               [str(len(await self._registered(ctx.domain)))])
        return form

    async def _registered_list(self, ctx: Context, values: Values) -> Stanza:
        form = _form("result", "Registered Users")
        _field(form, "registereduserjids", "jid-multi", "The list of all users",
               _limited(await self._registered(ctx.domain), values))
        return form

    async def _online_num(self, ctx: Context, values: Values) -> Stanza:
        form = _form("result", "Number of Online Users")
        _field(form, "onlineusersnum", "text-single", "The number of online users",
               [str(len(self._online(ctx.domain)))])
        return form

    async def _online_list(self, ctx: Context, values: Values) -> Stanza:
        form = _form("result", "Online Users")
        _field(form, "onlineuserjids", "jid-multi", "The list of all online users",
               _limited(self._online(ctx.domain), values))
        return form

    async def _announce(self, ctx: Context, values: Values) -> Stanza:
        text = "\n".join(values.get("announcement", []))
        subject = "\n".join(values.get("subject", [])).strip() or None
        count = ctl.announce(self.server, ctx.domain, text, subject)
        return _note(f"sent to {count} session(s)")

    async def _set_motd(self, ctx: Context, values: Values) -> Stanza:
        text = "\n".join(values.get("motd", []))
        await self.motd.set(ctx.domain, text)
        self._motd_changed(ctx.domain, text)
        log.info("event=motd-set domain=%s by=%s", ctx.domain, ctx.requester)
        return _note("message of the day set")

    async def _create_invitation(self, ctx: Context, values: Values) -> Stanza:
        invites = self._invites()
        if invites is None:
            raise StanzaError("item-not-found", "invitations are not available")
        uses_text = (values.get("uses") or [""])[0].strip() or "1"
        try:
            uses = parse_int(uses_text, minimum=1, maximum=10000, name="uses")
        except NumberError as exc:
            raise StanzaError("bad-request", str(exc)) from None
        expires = (values.get("expires") or [""])[0].strip()
        try:
            lifetime = parse_duration(expires) if expires else invites.config.expire_after
        except ValueError as exc:
            raise StanzaError("bad-request", str(exc)) from None
        group = (values.get("group") or [""])[0].strip() or None
        # The admin is the inviter when the invitation is for the admin's own domain.
        inviter = ctx.requester.local if ctx.requester.domain == ctx.domain else None
        invitation, _uri, _url = await invites.create(ctx.domain, inviter, uses=uses,
                                                      lifetime=lifetime, group=group)
        log.info("event=invitation-created inviter=%s uses=%d via=admin-adhoc",
                 ctx.requester, uses)
        return invites.invitation_form(invitation)

    async def _current_motd(self, ctx: Context) -> Values:
        # XEP-0133 §4.25: the edit form shows the message as it is.
        text = await self.motd.get(ctx.domain)
        return {"motd": text.split("\n")} if text else {}

    async def _delete_motd(self, ctx: Context, values: Values) -> Stanza:
        existed = await self.motd.delete(ctx.domain)
        self._motd_changed(ctx.domain, None)
        log.info("event=motd-deleted domain=%s by=%s", ctx.domain, ctx.requester)
        return _note("message of the day deleted" if existed else "there was no message of "
                     "the day")

    def _motd_changed(self, domain: str, text: str | None) -> None:
        self._motd_changes += 1
        self._motds[domain] = (text, time.monotonic())

    async def _motd_of(self, domain: str) -> str | None:
        """The domain's message of the day, from the cache when it may be used."""
        cached = self._motds.get(domain)
        now = time.monotonic()
        if cached is not None and (not self.server.config.cluster.enabled
                                   or now - cached[1] < MOTD_RECHECK):
            return cached[0]
        changes = self._motd_changes
        text = await self.motd.get(domain)
        if changes == self._motd_changes:  # else a command replaced it while we read
            self._motds[domain] = (text, now)
        return text

    # -- message of the day at login ---------------------------------------------------------

    @hook(events.PRESENCE_AVAILABLE)
    def available(self, session: Session, first: bool) -> object:
        # Once per session, at its initial presence: the client is ready for messages then.
        if not first or self.motd_sent.get(session) or session.jid.domain not in \
                self.server.hosts:
            return None
        self.motd_sent.set(session, True)
        return self._send_motd(session)

    async def _send_motd(self, session: Session) -> None:
        text = await self._motd_of(session.jid.domain)
        if text:
            session.send(ctl.server_message(session.jid.domain, session.jid_str, text))


# -- forms -------------------------------------------------------------------------------------


def _command(node: str, sessionid: str, status: str) -> Stanza:
    return st.element(ns.q(ns.COMMANDS, "command"),
                      {"node": node, "sessionid": sessionid, "status": status})


def _note(text: str) -> Stanza:
    # XEP-0050 §3.4: a note tells the requester what happened.
    return st.element(ns.q(ns.COMMANDS, "note"), {"type": "info"}, text=text)


def _form(type_: str, title: str, instructions: str = "") -> Stanza:
    form = st.element(_X, {"type": type_})
    st.child(form, ns.q(ns.DATA_FORMS, "title"), text=title)
    if instructions:
        st.child(form, ns.q(ns.DATA_FORMS, "instructions"), text=instructions)
    # XEP-0133 §3: FORM_TYPE is the admin namespace (hidden, so without a label).
    _field(form, "FORM_TYPE", "hidden", None, [ADMIN])
    return form


def _field(form: Stanza, var: str, type_: str, label: str | None, values: list[str]) -> None:
    attrs = {"var": var, "type": type_}
    if label is not None:
        attrs["label"] = label
    el = st.child(form, _FIELD, attrs)
    for value in values:
        st.child(el, _VALUE, text=value)


def _values(form: Stanza) -> Values:
    found: Values = {}
    for field in form.iter(_FIELD):
        var = field.get("var")
        if var:
            found[var] = [v.text or "" for v in field.iter(_VALUE)]
    return found


def _limited(jids: list[str], values: Values) -> list[str]:
    """XEP-0133 §4.18, §4.21: at most max_items of them (one of the form's options)."""
    limit = (values.get("max_items") or ["none"])[0]
    if limit not in _MAX_ITEMS:
        raise StanzaError("bad-request", f"max_items must be one of {', '.join(_MAX_ITEMS)}")
    return jids if limit == "none" else jids[:int(limit)]  # one of the fixed options


def _one(values: Values, var: str) -> str:
    found = values.get(var) or [""]
    if len(found) != 1:
        raise StanzaError("bad-request", f"{var} takes one value")
    return found[0]


def _many(values: Values, var: str) -> list[str]:
    # XEP-0133 1.3 renamed accountjid to accountjids for these: accept both.
    found = [v for v in values.get(var, []) + values.get(var[:-1], []) if v.strip()]
    if not found:
        raise StanzaError("bad-request", f"{var} is required")
    return found

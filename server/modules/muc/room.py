"""One MUC room (XEP-0045): its configuration, affiliations, occupants, history and subject.

The room does not send anything itself: every method returns the stanzas to send (each
already addressed), which the service delivers. That keeps the room a plain object that tests
and the service drive alike.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import hmac
import json
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

import precis_i18n
from lxml import etree

from server.errors import StanzaError
from server.jid import JID
from server.xml import ns
from server.xml import stanza as st
from server.xml.numbers import NumberError, parse_int, parse_optional_int
from server.xml.writer import addressed_copies

MUC = "http://jabber.org/protocol/muc"
MUC_USER = MUC + "#user"
MUC_ADMIN = MUC + "#admin"
MUC_OWNER = MUC + "#owner"
ROOMCONFIG = MUC + "#roomconfig"
ROOMINFO = MUC + "#roominfo"

AFFILIATIONS = ("owner", "admin", "member", "none", "outcast")
_RANK = {"owner": 4, "admin": 3, "member": 2, "none": 1, "outcast": 0}
ROLES = ("moderator", "participant", "visitor", "none")

_X_USER = ns.q(MUC_USER, "x")
_X_MUC = ns.q(MUC, "x")
_BODY = ns.q(ns.CLIENT, "body")
_SUBJECT = ns.q(ns.CLIENT, "subject")
_DELAY = ns.q(ns.DELAY, "delay")
_THREAD = ns.q(ns.CLIENT, "thread")
_STORE = "{urn:xmpp:hints}store"
OCCUPANT_ID = "urn:xmpp:occupant-id:0"  # XEP-0421
SID = "urn:xmpp:sid:0"                  # XEP-0359
# XEP-0410 §3.3: the service answers a self-ping itself (never relayed to the client).
SELF_PING = "http://jabber.org/protocol/muc#self-ping-optimization"
_OCCUPANT_ID = ns.q(OCCUPANT_ID, "occupant-id")
_STANZA_ID = ns.q(SID, "stanza-id")
_CASE_MAPPED = precis_i18n.get_profile("NicknameCaseMapped")


@functools.lru_cache(maxsize=4096)
def nick_key(nick: str) -> str:
    """What two nicknames are compared by (RFC 8266 §2.4: the NicknameCaseMapped profile, so
    'Alice', 'alice' and 'ALICE' are one nickname; XEP-0045 §7.2.9 makes a second a conflict).
    `nick` has passed the case-preserving profile already, which this one accepts too."""
    try:
        return str(_CASE_MAPPED.enforce(nick))
    except UnicodeError:
        return nick


@dataclass(frozen=True, slots=True)
class RoomConfig:
    """muc#roomconfig (XEP-0045 §10.2, §15.5.3); stored as JSON for persistent rooms."""
    name: str = ""
    description: str = ""
    persistent: bool = False
    public: bool = True
    members_only: bool = False
    moderated: bool = False
    password: str = ""          # "" : not password-protected
    whois: str = "moderators"   # who sees occupants' real JIDs: "moderators" | "anyone"
    max_users: int = 0          # 0: no limit
    allow_invites: bool = False
    change_subject: bool = False  # occupants (not only moderators) may change the subject
    history_length: int = 20
    archive: bool = True        # XEP-0313 on the room JID (muc#roomconfig_enablearchiving)
    # roles whose presence the occupants get (muc#roomconfig_presencebroadcast)
    presence_broadcast: tuple[str, ...] = ("moderator", "participant", "visitor")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RoomConfig:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in raw.items() if k in known}
        if "presence_broadcast" in given:
            given["presence_broadcast"] = tuple(given["presence_broadcast"])
        return cls(**given)


# form field var -> (RoomConfig attribute, kind)
FORM_FIELDS: dict[str, tuple[str, str]] = {
    "muc#roomconfig_roomname": ("name", "text-single"),
    "muc#roomconfig_roomdesc": ("description", "text-single"),
    "muc#roomconfig_persistentroom": ("persistent", "boolean"),
    "muc#roomconfig_publicroom": ("public", "boolean"),
    "muc#roomconfig_membersonly": ("members_only", "boolean"),
    "muc#roomconfig_moderatedroom": ("moderated", "boolean"),
    "muc#roomconfig_passwordprotectedroom": ("", "boolean"),  # derived from the secret
    "muc#roomconfig_roomsecret": ("password", "text-private"),
    "muc#roomconfig_whois": ("whois", "list-single"),
    "muc#roomconfig_maxusers": ("max_users", "text-single"),
    "muc#roomconfig_allowinvites": ("allow_invites", "boolean"),
    "muc#roomconfig_changesubject": ("change_subject", "boolean"),
    "muc#roomconfig_historylength": ("history_length", "text-single"),
    "muc#roomconfig_enablearchiving": ("archive", "boolean"),
    "muc#roomconfig_presencebroadcast": ("presence_broadcast", "list-multi"),
}
_BROADCAST_ROLES = ("moderator", "participant", "visitor")


def _truthy(text: str | None) -> bool:
    return (text or "").strip() in ("1", "true")


def field_values(form: etree._Element) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in form.iter(ns.q(ns.DATA_FORMS, "field")):
        var = f.get("var")
        if var:
            out[var] = [v.text or "" for v in f.iter(ns.q(ns.DATA_FORMS, "value"))]
    return out


def apply_form(config: RoomConfig, form: etree._Element, max_history: int) -> RoomConfig:
    """A submitted muc#roomconfig form applied to a configuration; bad-request when a value
    is not what its field takes."""
    values = field_values(form)
    changes: dict[str, Any] = {}
    protected: bool | None = None
    for var, given in values.items():
        if var not in FORM_FIELDS:
            continue
        attr, kind = FORM_FIELDS[var]
        value = given[0] if given else ""
        if var == "muc#roomconfig_passwordprotectedroom":
            protected = _truthy(value)
        elif kind == "boolean":
            if value.strip() not in ("0", "1", "true", "false"):
                raise StanzaError("bad-request", f"{var} takes a boolean")
            changes[attr] = _truthy(value)
        elif attr == "presence_broadcast":
            # XEP-0045 §15.5.3: the roles whose presence is broadcast ("none", Prosody's
            # offline members' presence, is taken and not served)
            if any(role not in (*_BROADCAST_ROLES, "none") for role in given):
                raise StanzaError("bad-request", f"{var} takes {', '.join(_BROADCAST_ROLES)}")
            changes[attr] = tuple(r for r in _BROADCAST_ROLES if r in given)
        elif attr == "whois":
            if value not in ("moderators", "anyone"):
                raise StanzaError("bad-request", "whois is 'moderators' or 'anyone'")
            changes[attr] = value
        elif attr in ("max_users", "history_length"):
            number = 0 if value in ("", "none") else _int(value, var)
            changes[attr] = min(number, max_history) if attr == "history_length" else number
        else:
            changes[attr] = value
    if protected is False:
        changes["password"] = ""
    return replace(config, **changes)


def _int(value: str, var: str) -> int:
    try:
        return parse_int(value.strip(), maximum=1_000_000_000, name=var)
    except NumberError as exc:
        raise StanzaError("bad-request", f"{var} takes a number >= 0 ({exc.reason})") from None


# XEP-0045 §10.2 (example 163) and XEP-0004 §3.2: a label for every field a person reads,
# and for every option of a list, so that a client has something to show (without them
# profanity showed "[field3] (null)").
LABELS: dict[str, str] = {
    "muc#roomconfig_roomname": "Title",
    "muc#roomconfig_roomdesc": "Description",
    "muc#roomconfig_persistentroom": "Persistent (kept when the last occupant leaves)",
    "muc#roomconfig_publicroom": "Public (listed in the room directory)",
    "muc#roomconfig_membersonly": "Members only",
    "muc#roomconfig_moderatedroom": "Moderated (only occupants with voice may speak)",
    "muc#roomconfig_passwordprotectedroom": "Password protected",
    "muc#roomconfig_roomsecret": "Password",
    "muc#roomconfig_whois": "Who may see the real addresses of occupants",
    "muc#roomconfig_maxusers": "Most occupants at once (0: no limit)",
    "muc#roomconfig_allowinvites": "Occupants may invite others",
    "muc#roomconfig_changesubject": "Occupants may change the subject",
    "muc#roomconfig_historylength": "Messages of history sent to a newcomer",
    "muc#roomconfig_enablearchiving": "Archive the discussion (message archive)",
    "muc#roomconfig_presencebroadcast": "Roles whose presence is broadcast",
    "muc#roominfo_description": "Description",
    "muc#roominfo_occupants": "Number of occupants",
    "muc#roominfo_subject": "Subject",
    "muc#roominfo_subjectmod": "Occupants may change the subject",
}
OPTION_LABELS: dict[str, tuple[tuple[str, str], ...]] = {
    "muc#roomconfig_whois": (("moderators", "Moderators only"), ("anyone", "Anyone")),
    "muc#roomconfig_presencebroadcast": (("moderator", "Moderator"),
                                         ("participant", "Participant"),
                                         ("visitor", "Visitor")),
}


def config_form(config: RoomConfig, room: JID) -> etree._Element:
    x = st.element(ns.q(ns.DATA_FORMS, "x"), {"type": "form"})
    st.child(x, ns.q(ns.DATA_FORMS, "title"), text=f"Configuration of {room}")
    _field(x, "FORM_TYPE", "hidden", ROOMCONFIG)
    for var, (attr, kind) in FORM_FIELDS.items():
        if var == "muc#roomconfig_passwordprotectedroom":
            value: Any = bool(config.password)
        else:
            value = getattr(config, attr)
        if kind == "list-multi":
            el = st.child(x, ns.q(ns.DATA_FORMS, "field"),
                          {"var": var, "type": kind, "label": LABELS[var]})
            for one in value:
                st.child(el, ns.q(ns.DATA_FORMS, "value"), text=one)
        else:
            el = _field(x, var, kind, value)
        for option, label in OPTION_LABELS.get(var, ()):
            opt = st.child(el, ns.q(ns.DATA_FORMS, "option"), {"label": label})
            st.child(opt, ns.q(ns.DATA_FORMS, "value"), text=option)
    return x


def _field(x: etree._Element, var: str, kind: str, value: Any) -> etree._Element:
    # No label on a hidden field (FORM_TYPE): XEP-0004 §3.3, it is not shown (nor has
    # Prosody one, which its scansion scripts check strictly).
    attrs = {"var": var, "type": kind} if kind == "hidden" else {
        "var": var, "type": kind, "label": LABELS[var]}
    el = st.child(x, ns.q(ns.DATA_FORMS, "field"), attrs)
    text = ("1" if value else "0") if isinstance(value, bool) else str(value)
    st.child(el, ns.q(ns.DATA_FORMS, "value"), text=text)
    return el


@dataclass(slots=True)
class Bucket:
    """A token bucket: `rate` stanzas a second on average, bursts of up to `burst`."""
    tokens: float = -1.0     # -1: full, not used yet
    refilled: float = 0.0    # when tokens was last brought up to date (monotonic seconds)

    def take(self, rate: float, burst: int, now: float) -> bool:
        """One token if there is one (True); False, and nothing taken, when it is empty."""
        tokens = float(burst) if self.tokens < 0 else min(
            float(burst), self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True

    def wait(self, rate: float) -> float:
        """Seconds until the next token, as of the last take()."""
        return max(0.0, (1.0 - self.tokens) / rate) if rate else 0.0


@dataclass(slots=True)
class Occupant:
    nick: str
    jid: JID                 # bare real JID
    affiliation: str
    role: str
    sessions: dict[JID, etree._Element] = field(default_factory=dict)  # full JID -> presence
    messages: Bucket = field(default_factory=lambda: Bucket())   # [muc] message_rate
    presences: Bucket = field(default_factory=lambda: Bucket())  # [muc] presence_rate

    @property
    def presence(self) -> etree._Element:
        return next(reversed(self.sessions.values()))


@dataclass(slots=True)
class HistoryEntry:
    stamp: float
    message: etree._Element  # the groupchat message as broadcast (from room/nick, no 'to')
    size: int


def stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_stamp(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


Out = list[etree._Element]
_HISTORY_MAX = 10**12  # larger than any history or time span a limit could cut


def _history_limit(spec: etree._Element, name: str) -> int | None:
    """One limit of <history/> (XEP-0045 §7.2.15), or None when absent or unreadable. A
    value that is not a number (or is negative) is ignored, as if not given, rather than
    refusing the join: the limits are a request about how much history to send, which the
    service "SHOULD" honour, and nothing in §7.2.15 makes a bad one a reason to keep someone
    out of the room (Prosody reads them with tonumber() and ignores what it cannot read)."""
    try:
        return parse_optional_int(spec.get(name), maximum=_HISTORY_MAX, name=name)
    except NumberError:
        return None


class Room:
    def __init__(self, jid: JID, config: RoomConfig, id_key: bytes = b"",
                 max_occupants: int = 0) -> None:
        self.id_key = id_key  # XEP-0421: occupant ids are HMACs of the real bare JID
        self.max_occupants = max_occupants  # the service's limit ([muc] max_occupants; 0: none)
        self.jid = jid
        self.jid_str = str(jid)
        self.config = config
        self.affiliations: dict[JID, str] = {}      # bare JID -> owner|admin|member|outcast
        self.reasons: dict[JID, str | None] = {}
        self.nicks: dict[JID, str] = {}             # bare JID -> registered nick (muc#register)
        self.occupants: dict[str, Occupant] = {}    # nick_key(nick) -> occupant
        self.by_jid: dict[JID, Occupant] = {}       # full real JID -> occupant
        self.history: deque[HistoryEntry] = deque(maxlen=max(config.history_length, 0) or None)
        self.subject: str | None = None
        self.subject_from: str | None = None
        self.destroyed = False
        self.fresh = False   # made by a join, its owner has not configured it yet
        self._ids: dict[JID, str] = {}              # bare JID -> its occupant id (XEP-0421)

    # -- who is who --------------------------------------------------------------------------

    def affiliation(self, jid: JID) -> str:
        return self.affiliations.get(jid.bare, "none")

    def occupant_limit(self) -> int:
        """The most occupants the room takes: the service's limit, lowered by the room's
        muc#roomconfig_maxusers; 0: no limit."""
        limits = [n for n in (self.max_occupants, self.config.max_users) if n]
        return min(limits) if limits else 0

    def default_role(self, affiliation: str) -> str:
        if affiliation in ("owner", "admin"):
            return "moderator"
        if self.config.moderated and affiliation == "none":
            return "visitor"
        return "participant"

    def set_config(self, config: RoomConfig) -> None:
        self.config = config
        if self.history.maxlen != (config.history_length or None):
            self.history = deque(list(self.history)[-config.history_length:]
                                 if config.history_length else [],
                                 maxlen=config.history_length or None)

    def set_affiliation(self, jid: JID, affiliation: str, reason: str | None = None) -> None:
        bare = jid.bare
        if affiliation == "none":
            self.affiliations.pop(bare, None)
            self.reasons.pop(bare, None)
            self.nicks.pop(bare, None)
        else:
            self.affiliations[bare] = affiliation
            self.reasons[bare] = reason

    def occupant(self, nick: str) -> Occupant | None:
        """The occupant under this nickname, compared as RFC 8266 §2.4 says (nick_key)."""
        return self.occupants.get(nick_key(nick))

    def nick_owner(self, nick: str) -> JID | None:
        """Who registered this nickname (or a case variant of it), if anyone."""
        key = nick_key(nick)
        return next((j for j, n in self.nicks.items() if nick_key(n) == key), None)

    def owners(self) -> list[JID]:
        return [j for j, a in self.affiliations.items() if a == "owner"]

    def occupant_id(self, occupant: Occupant) -> str:
        known = self._ids.get(occupant.jid)
        if known is not None:
            return known
        digest = hmac.new(self.id_key, f"{self.jid_str} {occupant.jid}".encode(),
                          hashlib.sha256).digest()
        if len(self._ids) >= 10_000:
            self._ids.clear()
        known = self._ids[occupant.jid] = base64.urlsafe_b64encode(digest[:18]).decode()
        return known

    # -- presence ----------------------------------------------------------------------------

    def _x(self, occupant: Occupant, to_moderator: bool, codes: tuple[str, ...] = (),
           is_self: bool = False, role: str | None = None, affiliation: str | None = None,
           nick: str | None = None, actor: str | None = None,
           actor_jid: str | None = None, reason: str | None = None) -> etree._Element:
        # The order of Prosody's (its scansion scripts are strict here; XEP-0045 leaves it
        # open): the status codes, the item, then 110 (the occupant's own presence).
        x = st.element(_X_USER)
        for code in codes:
            if code != "110":
                st.child(x, ns.q(MUC_USER, "status"), {"code": code})
        attrs = {"affiliation": affiliation or occupant.affiliation,
                 "role": role or occupant.role}
        if nick is not None:
            attrs["nick"] = nick
        sees_jids = to_moderator or self.config.whois == "anyone"
        if sees_jids or is_self:
            # the real JID (one's own too, as Prosody shows it); an occupant with several
            # sessions has an item per session, the latest first (Prosody, issue978-multi)
            first = None
            for real in reversed(occupant.sessions) if sees_jids else [
                    next(iter(occupant.sessions), occupant.jid)]:
                made = st.child(x, ns.q(MUC_USER, "item"), {**attrs, "jid": str(real)})
                first = first if first is not None else made
            item = first if first is not None else st.child(x, ns.q(MUC_USER, "item"), attrs)
        else:
            item = st.child(x, ns.q(MUC_USER, "item"), attrs)
        shown = {"nick": actor} if actor is not None else {}
        if actor_jid is not None and (to_moderator or self.config.whois == "anyone"):
            shown["jid"] = actor_jid
        if shown:
            st.child(item, ns.q(MUC_USER, "actor"), shown)
        if reason:
            st.child(item, ns.q(MUC_USER, "reason"), text=reason)
        if "110" in codes:
            st.child(x, ns.q(MUC_USER, "status"), {"code": "110"})
        return x

    def presence_of(self, occupant: Occupant, to: JID, *, unavailable: bool = False,
                    codes: tuple[str, ...] = (), self_codes: tuple[str, ...] = (),
                    **item: Any) -> etree._Element:
        """occupant's presence as `to` (a real full JID) gets it."""
        recipient = self.by_jid.get(to)
        out = self._presence(occupant, recipient is not None and recipient.role == "moderator",
                             recipient is occupant, unavailable=unavailable, codes=codes,
                             self_codes=self_codes, **item)
        out.set("to", str(to))
        return out

    def broadcasts(self, occupant: Occupant) -> bool:
        """Whether the others get this occupant's presence (XEP-0045 §15.5.3
        muc#roomconfig_presencebroadcast; they may still probe it)."""
        return occupant.role in self.config.presence_broadcast

    def presence_for(self, occupant: Occupant, to_moderator: bool) -> etree._Element:
        """occupant's current presence as a moderator or anyone else sees it (no 'to')."""
        return self._presence(occupant, to_moderator, False, unavailable=False, codes=(),
                              self_codes=())

    def _presence(self, occupant: Occupant, to_moderator: bool, is_self: bool, *,
                  unavailable: bool, codes: tuple[str, ...], self_codes: tuple[str, ...],
                  **item: Any) -> etree._Element:
        """occupant's presence as a moderator or not, the occupant itself or not, gets it
        (without 'to')."""
        out = st.element(st.PRESENCE, {"from": f"{self.jid_str}/{occupant.nick}"})
        if unavailable:
            out.set("type", "unavailable")
        else:
            for child in occupant.presence:
                if isinstance(child.tag, str) and child.tag not in (_X_MUC, _X_USER,
                                                                    _OCCUPANT_ID):
                    out.append(copy.deepcopy(child))
        st.child(out, _OCCUPANT_ID, {"id": self.occupant_id(occupant)})
        all_codes = codes + (("110", *self_codes) if is_self else ())
        out.append(self._x(occupant, to_moderator, all_codes, is_self, **item))
        return out

    def broadcast_presence(self, occupant: Occupant, *, unavailable: bool = False,
                           codes: tuple[str, ...] = (), self_codes: tuple[str, ...] = (),
                           also: tuple[JID, ...] = (), **item: Any) -> Out:
        # The occupants get one of three presences (a moderator's, with the real JID; the
        # occupant's own, with 110; everyone else's): each serialised once (DESIGN.md rule 3).
        groups: dict[tuple[bool, bool], list[str]] = {}
        shown = self.broadcasts(occupant)
        for other in self.occupants.values():
            if other is not occupant and not shown:
                continue  # muc#roomconfig_presencebroadcast: not this role's presence
            key = (other.role == "moderator", other is occupant)
            groups.setdefault(key, []).extend(str(real) for real in other.sessions)
        out: Out = []
        # The occupant's own copy last (as XEP-0045 §7.2.3 asks of a join): once a client
        # sees it, the others were sent theirs (slixmpp's itests wait on it, then on another
        # occupant's copy).
        for (to_moderator, is_self), recipients in sorted(groups.items(),
                                                          key=lambda group: group[0][1]):
            out += addressed_copies(self._presence(
                occupant, to_moderator, is_self, unavailable=unavailable, codes=codes,
                self_codes=self_codes, **item), recipients)
        for real in also:
            out.append(self.presence_of(occupant, real, unavailable=unavailable, codes=codes,
                                        **item))
        return out

    def join(self, real: JID, nick: str, presence: etree._Element, *, created: bool,
             renamed: bool = False) -> Out:
        """A presence to room/nick from someone not in the room under that session."""
        x = presence.find(_X_MUC)
        affiliation = self.affiliation(real)
        if affiliation == "outcast":
            raise StanzaError("forbidden", "you are banned from this room")
        taken = self.occupant(nick)
        if taken is not None and taken.jid != real.bare:
            raise StanzaError("conflict", "that nickname is in use")
        if self.nick_owner(nick) not in (None, real.bare):
            raise StanzaError("conflict", "that nickname is registered by someone else")
        # Another session of a user already here under another nickname is another occupant
        # (XEP-0045 §7.2 asks only that a nickname belong to one bare JID, §7.2.9; Prosody
        # does the same): only the same nickname joins the sessions into one occupant.
        if not created and taken is None:
            if self.config.members_only and _RANK[affiliation] < _RANK["member"]:
                raise StanzaError("registration-required", "this room is for members only")
            if self.config.password and affiliation != "owner":
                given = x.findtext(ns.q(MUC, "password")) if x is not None else None
                if given != self.config.password:
                    raise StanzaError("not-authorized", "a password is required")
            # XEP-0045 §7.2.10: a full room answers service-unavailable. Owners and admins
            # get past the room's own maximum (the XEP's MAY), never past the service's.
            limit = self.max_occupants if affiliation in ("owner", "admin") \
                else self.occupant_limit()
            if limit and len(self.occupants) >= limit:
                raise StanzaError("service-unavailable", "the room is full")
        out: Out = []
        if taken is not None:
            # one more session of an occupant: it gets the room; then the others get the
            # occupant's presence with this session too (Prosody, issue978-multi)
            taken.sessions[real] = presence
            self.by_jid[real] = taken
            for other in self.occupants.values():
                if other is not taken and self.broadcasts(other):
                    out.append(self.presence_of(other, real))
            out.append(self.presence_of(taken, real,
                                        self_codes=self._join_codes(False, renamed)))
        else:
            occupant = Occupant(nick, real.bare, affiliation, self.default_role(affiliation),
                                {real: presence})
            for other in self.occupants.values():
                if self.broadcasts(other):
                    out.append(self.presence_of(other, real))
            self.occupants[nick_key(nick)] = occupant
            self.by_jid[real] = occupant
            for other in self.occupants.values() if self.broadcasts(occupant) else ():
                for session in other.sessions:
                    if session != real:
                        out.append(self.presence_of(occupant, session))
            out.append(self.presence_of(occupant, real,
                                        self_codes=self._join_codes(created, renamed)))
        out.extend(self._history_for(real, x))
        out.append(self._subject_message(real))
        if taken is not None:
            out += [p for p in self.broadcast_presence(taken) if p.get("to") != str(real)]
        return out

    def _join_codes(self, created: bool, renamed: bool) -> tuple[str, ...]:
        codes: list[str] = []
        if self.config.whois == "anyone":
            codes.append("100")
        # No 170 for the room's MAM archive: XEP-0045 §7.2.12 asks it for discussions logged
        # to a public archive (a web log), and Prosody (whose scansion scripts expect none
        # with muc_mam on) does not send it either.
        if created:
            codes.append("201")
        if renamed:
            codes.append("210")
        return tuple(codes)

    def restore_history(self, archived: list[tuple[str, float, etree._Element]]) -> None:
        """The discussion history of a room brought back (after a restart) from its archive:
        (archive id, when, the message as archived), oldest first. Only what the history keeps
        (messages with a body or <store/>: not subject changes, moderation notices or the
        tombstones of moderated messages), the last history_length of them, each with its
        XEP-0359 stanza id (the archive id) as it was sent live."""
        if not self.config.history_length:
            return
        for archive_id, when, message in archived:
            if not self.is_historic(message):
                continue
            for old in message.findall(_STANZA_ID):
                message.remove(old)
            st.child(message, _STANZA_ID, {"id": archive_id, "by": self.jid_str})
            self.history.append(HistoryEntry(when, message, len(etree.tostring(message))))

    def _history_for(self, real: JID, x: etree._Element | None) -> Out:
        entries = list(self.history)
        spec = x.find(ns.q(MUC, "history")) if x is not None else None
        if spec is not None:
            maxstanzas = _history_limit(spec, "maxstanzas")
            seconds = _history_limit(spec, "seconds")
            maxchars = _history_limit(spec, "maxchars")
            since = spec.get("since")
            if seconds is not None:
                cutoff = time.time() - seconds
                entries = [e for e in entries if e.stamp >= cutoff]
            if since is not None:
                after = parse_stamp(since)
                if after is not None:
                    entries = [e for e in entries if e.stamp >= after]
            if maxstanzas is not None:
                entries = entries[-maxstanzas:] if maxstanzas else []
            if maxchars is not None:
                budget = maxchars
                kept: list[HistoryEntry] = []
                for entry in reversed(entries):
                    budget -= entry.size
                    if budget < 0:
                        break
                    kept.append(entry)
                entries = kept[::-1]
        out: Out = []
        for entry in entries:
            message = copy.deepcopy(entry.message)
            message.set("to", str(real))
            st.child(message, _DELAY, {"from": self.jid_str, "stamp": stamp(entry.stamp)})
            out.append(message)
        return out

    def _subject_message(self, real: JID) -> etree._Element:
        sender = f"{self.jid_str}/{self.subject_from}" if self.subject_from else self.jid_str
        message = st.element(st.MESSAGE, {"type": "groupchat", "from": sender, "to": str(real)})
        st.child(message, _SUBJECT, text=self.subject or None)
        return message

    def update_presence(self, real: JID, presence: etree._Element) -> Out:
        occupant = self.by_jid[real]
        occupant.sessions[real] = presence
        if presence.find(_X_MUC) is None:
            return self.broadcast_presence(occupant)
        # A join from a session already in the room (a client that lost track): it gets the
        # room again, as at a join (Prosody's resync, muc_subject_issue_667); the others its
        # presence.
        out = [self.presence_of(other, real) for other in self.occupants.values()
               if other is not occupant and self.broadcasts(other)]
        out.append(self.presence_of(occupant, real, self_codes=self._join_codes(False, False)))
        out.extend(self._history_for(real, presence.find(_X_MUC)))
        out.append(self._subject_message(real))
        return out + [p for p in self.broadcast_presence(occupant) if p.get("to") != str(real)]

    def change_nick(self, real: JID, nick: str) -> Out:
        occupant = self.by_jid[real]
        taken = self.occupant(nick)
        if taken is not None and taken is not occupant:
            raise StanzaError("conflict", "that nickname is in use")
        if self.nick_owner(nick) not in (None, occupant.jid):
            raise StanzaError("conflict", "that nickname is registered by someone else")
        if nick == occupant.nick:
            return []
        out = self.broadcast_presence(occupant, unavailable=True, codes=("303",), nick=nick)
        del self.occupants[nick_key(occupant.nick)]
        occupant.nick = nick
        self.occupants[nick_key(nick)] = occupant
        out += self.broadcast_presence(occupant)
        return out

    def leave(self, real: JID, presence: etree._Element | None,
              codes: tuple[str, ...] = (), **item: Any) -> Out:
        """A session went: unavailable presence (or None: its server or stream went away)."""
        occupant = self.by_jid.get(real)
        if occupant is None:
            return []
        item.setdefault("role", "none")
        if len(occupant.sessions) > 1:
            # the occupant stays with its other sessions; this one is told it left, the others
            # get its presence as it is now (Prosody, issue978-multi)
            out = [self.presence_of(occupant, real, unavailable=True, codes=codes, **item)]
            del occupant.sessions[real]
            del self.by_jid[real]
            return out + self.broadcast_presence(occupant)
        out = self.broadcast_presence(occupant, unavailable=True, codes=codes, **item)
        if presence is not None:
            status = presence.find(ns.q(ns.CLIENT, "status"))
            if status is not None:
                for el in out:
                    el.insert(0, copy.deepcopy(status))
        del self.by_jid[real]
        del self.occupants[nick_key(occupant.nick)]
        return out

    def remove(self, occupant: Occupant, codes: tuple[str, ...], **item: Any) -> Out:
        """Kick, ban, loss of membership: every session of the occupant goes."""
        out = self.broadcast_presence(occupant, unavailable=True, codes=codes, role="none",
                                      **item)
        for real in occupant.sessions:
            self.by_jid.pop(real, None)
        del self.occupants[nick_key(occupant.nick)]
        return out

    # -- messages ----------------------------------------------------------------------------

    def groupchat(self, real: JID, message: etree._Element) -> Out:
        """Checks, records and fans out a groupchat message in one go (no archive id)."""
        prepared = self.prepare(real, message)
        return self.fan_out(prepared, str(uuid.uuid4()))

    def prepare(self, real: JID, message: etree._Element) -> etree._Element:
        """A groupchat message from an occupant, checked, as the room sends it (from
        room/nick, without 'to' and stanza id); a subject change takes effect."""
        sender = self.by_jid.get(real)
        if sender is None:
            raise StanzaError("not-acceptable", "you are not in this room")
        if sender.role == "visitor":
            raise StanzaError("forbidden", "visitors may not speak in this moderated room")
        out_message = st.element(st.MESSAGE, {"type": "groupchat",
                                              "from": f"{self.jid_str}/{sender.nick}"})
        sid = message.get("id")
        if sid is not None:
            out_message.set("id", sid)
        for child in message:
            if isinstance(child.tag, str) and child.tag not in (_DELAY, _OCCUPANT_ID,
                                                                _STANZA_ID):
                out_message.append(copy.deepcopy(child))
        st.child(out_message, _OCCUPANT_ID, {"id": self.occupant_id(sender)})
        if self.is_subject_change(message):
            # XEP-0045 §8.1: a subject change is a message with a subject and no body
            if not self.config.change_subject and sender.role != "moderator":
                raise StanzaError("forbidden", "you may not change the subject")
            self.subject = message.findtext(_SUBJECT) or None
            self.subject_from = sender.nick
        return out_message

    @staticmethod
    def is_subject_change(message: etree._Element) -> bool:
        # XEP-0045 §8.1: a <subject/> without <body/>; with a <thread/> it is the subject of
        # a thread, a message like any other (Prosody issue 667)
        return message.find(_SUBJECT) is not None and message.find(_BODY) is None and \
            message.find(_THREAD) is None

    @staticmethod
    def is_historic(message: etree._Element) -> bool:
        """Kept in the discussion history and the archive: a message with a body, or one
        that asks to be stored (XEP-0334 <store/>)."""
        return message.find(_BODY) is not None or message.find(_STORE) is not None

    def fan_out(self, out_message: etree._Element, stanza_id: str) -> Out:
        """A prepared message to every occupant's sessions, kept in the history."""
        st.child(out_message, _STANZA_ID, {"id": stanza_id, "by": self.jid_str})
        if self.is_historic(out_message) and self.config.history_length:
            size = len(etree.tostring(out_message))
            self.history.append(HistoryEntry(time.time(), out_message, size))
        return addressed_copies(out_message, [str(session) for occupant in self.occupants.values()
                                              for session in occupant.sessions])

    def forget_message(self, message_id: str) -> etree._Element | None:
        """Take a message out of the history by its stanza id (or, failing that, the id its
        sender gave it); the message, or None."""
        for by_stanza_id in (True, False):
            for entry in self.history:
                found = entry.message.find(_STANZA_ID)
                ident = (found.get("id") if found is not None else None) if by_stanza_id \
                    else entry.message.get("id")
                if ident == message_id:
                    self.history.remove(entry)
                    return entry.message
        return None

    def private(self, real: JID, nick: str, message: etree._Element) -> Out:
        sender = self.by_jid.get(real)
        if sender is None:
            raise StanzaError("not-acceptable", "you are not in this room")
        target = self.occupant(nick)
        if target is None:
            raise StanzaError("item-not-found", "no such occupant")
        out: Out = []
        for old in message.findall(_OCCUPANT_ID):
            message.remove(old)
        st.child(message, _OCCUPANT_ID, {"id": self.occupant_id(sender)})
        for session in target.sessions:
            forwarded = copy.deepcopy(message)
            forwarded.set("from", f"{self.jid_str}/{sender.nick}")
            forwarded.set("to", str(session))
            if forwarded.find(_X_USER) is None:
                st.child(forwarded, _X_USER)
            out.append(forwarded)
        return out

    # -- ends ---------------------------------------------------------------------------------

    def destroy(self, reason: str | None, venue: str | None) -> Out:
        out: Out = []
        for occupant in self.occupants.values():
            for session in occupant.sessions:
                presence = st.element(st.PRESENCE, {
                    "from": f"{self.jid_str}/{occupant.nick}", "to": str(session),
                    "type": "unavailable"})
                # XEP-0045 §10.9: each occupant is told it left, with <destroy/>; its own
                # presence, so its item and 110 (in Prosody's order: destroy, item, 110)
                x = st.child(presence, _X_USER)
                destroy = st.child(x, ns.q(MUC_USER, "destroy"),
                                   {"jid": venue} if venue else None)
                if reason:
                    st.child(destroy, ns.q(MUC_USER, "reason"), text=reason)
                st.child(x, ns.q(MUC_USER, "item"), {"affiliation": occupant.affiliation,
                                                      "jid": str(session), "role": "none"})
                st.child(x, ns.q(MUC_USER, "status"), {"code": "110"})
                out.append(presence)
        self.occupants.clear()
        self.by_jid.clear()
        self.destroyed = True
        return out

    # -- discovery -----------------------------------------------------------------------------

    def features(self) -> list[str]:
        c = self.config
        return [MUC, ns.DISCO_INFO, ns.PING, SID, OCCUPANT_ID, SELF_PING,
                "urn:xmpp:message-moderate:1",
                "jabber:iq:register",
                "muc_persistent" if c.persistent else "muc_temporary",
                "muc_public" if c.public else "muc_hidden",
                "muc_membersonly" if c.members_only else "muc_open",
                "muc_moderated" if c.moderated else "muc_unmoderated",
                "muc_passwordprotected" if c.password else "muc_unsecured",
                "muc_nonanonymous" if c.whois == "anyone" else "muc_semianonymous",
                *(("urn:xmpp:mam:2",) if c.archive else ())]

    def info_form(self) -> etree._Element:
        x = st.element(ns.q(ns.DATA_FORMS, "x"), {"type": "result"})
        _field(x, "FORM_TYPE", "hidden", ROOMINFO)
        _field(x, "muc#roominfo_description", "text-single", self.config.description)
        _field(x, "muc#roominfo_occupants", "text-single", len(self.occupants))
        _field(x, "muc#roominfo_subject", "text-single", self.subject or "")
        _field(x, "muc#roomconfig_roomname", "text-single", self.config.name)
        _field(x, "muc#roomconfig_changesubject", "boolean", self.config.change_subject)
        _field(x, "muc#roomconfig_allowinvites", "boolean", self.config.allow_invites)
        _field(x, "muc#roominfo_subjectmod", "boolean", self.config.change_subject)
        return x

"""Entity capabilities (XEP-0115): what each available resource can do, from the <c/> of its
presence, for the features that depend on it (PEP notifications, XEP-0163 §4.3: a resource
whose features include ``<node>+notify``).

- Local resources: the caps are read as the presence goes out. A known ``ver`` is used at once;
  an unknown one is asked with disco#info (from the account's own bare JID, as Prosody's
  mod_pep asks) before the presence reaches anyone, so that clients see the query before their
  own presence. The answer's hash is verified (XEP-0115 §5): a verified answer is kept for
  everyone by its ver (a bounded cache); an unverifiable one serves that resource only (§5.4).
- Remote resources: the presence they send our users says which are available with which
  caps; an unknown ver is asked over s2s from the user's bare JID.
- A lookup is made once per (asked JID, ver): a second one meanwhile waits for that answer;
  until a ver is verified each resource with it is asked, so one that is slow or answers
  wrongly holds up no other (as Prosody does).

Events fired (server/events.py): ``caps/known`` (session, features) when a local resource's
features become known with its presence out (at once for a known ver, or when the answer
comes), ``caps/remote-known`` (user's bare JID, remote full JID, features) when a remote
resource's features are known.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lxml import etree

from server import events
from server.jid import JID, InvalidJID
from server.module import Module, SessionSlot, Stanza, hook
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

if TYPE_CHECKING:
    from server.app import Server

log = logging.getLogger("presenced.caps")

CAPS = "http://jabber.org/protocol/caps"
_C = ns.q(CAPS, "c")
_INFO = ns.q(ns.DISCO_INFO, "query")
_IDENTITY = ns.q(ns.DISCO_INFO, "identity")
_FEATURE = ns.q(ns.DISCO_INFO, "feature")
_X = ns.q(ns.DATA_FORMS, "x")
_FIELD = ns.q(ns.DATA_FORMS, "field")
_VALUE = ns.q(ns.DATA_FORMS, "value")
_TIMEOUT = 10.0
_CACHE_SIZE = 10000
HASHES = {"sha-1": "sha1", "sha-224": "sha224", "sha-256": "sha256", "sha-384": "sha384",
          "sha-512": "sha512"}


# -- XEP-0115 §5 verification, pure ------------------------------------------------------------


def caps_string(query: etree._Element) -> str | None:
    """XEP-0115 §5.1 verification string of a disco#info result; None when §5.4 says the
    result is unfit for caching (duplicate identities, features or form types, a form without
    a hidden FORM_TYPE is left out)."""
    identities = []
    for identity in query.findall(_IDENTITY):
        identities.append("/".join((identity.get("category", ""), identity.get("type", ""),
                                    identity.get(ns.q(ns.XML, "lang"), ""),
                                    identity.get("name", ""))))
    features = [f.get("var", "") for f in query.findall(_FEATURE)]
    if len(set(identities)) != len(identities) or len(set(features)) != len(features):
        return None
    parts = [f"{i}<" for i in sorted(identities)] + [f"{f}<" for f in sorted(features)]
    forms: dict[str, list[str]] = {}
    for form in query.findall(_X):
        fields = {}
        form_type = None
        for field in form.findall(_FIELD):
            values = [v.text or "" for v in field.findall(_VALUE)]
            if field.get("var") == "FORM_TYPE":
                if field.get("type") != "hidden" or len(set(values)) != 1:
                    return None
                form_type = values[0]
            else:
                fields[field.get("var", "")] = values
        if form_type is None:
            continue  # §5.4 3.6: forms without FORM_TYPE are ignored
        if form_type in forms:
            return None
        text = [f"{form_type}<"]
        for var in sorted(fields):
            text.append(f"{var}<")
            text += [f"{value}<" for value in sorted(fields[var])]
        forms[form_type] = text
    for form_type in sorted(forms):
        parts += forms[form_type]
    return "".join(parts)


def caps_hash(query: etree._Element, algorithm: str) -> str | None:
    """The ver a disco#info result has under this hash ('sha-1', ...); None if not hashable."""
    name = HASHES.get(algorithm)
    text = caps_string(query)
    if name is None or text is None:
        return None
    return base64.b64encode(hashlib.new(name, text.encode()).digest()).decode()


def features_of(query: etree._Element) -> frozenset[str]:
    return frozenset(f.get("var", "") for f in query.findall(_FEATURE))


_NOTHING: frozenset[str] = frozenset()  # shared: CPython makes a new empty one per call


# -- the module --------------------------------------------------------------------------------


@dataclass(slots=True)
class Caps:
    """What a resource's presence says about its capabilities."""
    ver: str | None
    features: frozenset[str] | None  # None: not known (yet)
    fresh: bool = False  # new with the presence going out: caps/known still to fire


class EntityCaps(Module):
    name = "caps"

    caps = SessionSlot[Caps | None](None)

    def __init__(self, server: Server, config: Any) -> None:
        super().__init__(server, config)
        self._known: dict[str, frozenset[str]] = {}           # verified ver -> features
        # (asked JID, asking JID) -> disco#info node -> its answer
        self._asking: dict[tuple[str, str], dict[str, asyncio.Future[Stanza]]] = {}
        # (asked JID, ver) -> its lookup
        self._asked: dict[tuple[str, str], asyncio.Future[frozenset[str] | None]] = {}
        # remote bare JID -> its available resources (full JID) -> their caps
        self._remote: dict[JID, dict[str, Caps]] = {}

    # -- what other modules ask -----------------------------------------------------------

    def known_features(self, session: Session) -> frozenset[str] | None:
        """The features of a local resource; None while not known."""
        caps = self.caps.get(session)
        return caps.features if caps is not None else None

    def wants(self, session: Session, feature: str) -> bool:
        caps = self.caps.get(session)
        return caps is not None and caps.features is not None and feature in caps.features

    def remote_wanting(self, bare: JID, feature: str) -> Iterator[str]:
        """The available resources (full JIDs) of a remote contact with this feature."""
        for full, caps in self._remote.get(bare, {}).items():
            if caps.features is not None and feature in caps.features:
                yield full

    def verified(self, ver: str) -> bool:
        """Whether a ver's meaning is known (hash-verified) and kept for everyone."""
        return ver in self._known

    # -- local resources ------------------------------------------------------------------

    @hook(events.PRESENCE_OUTGOING)
    def outgoing(self, session: Session, presence: Stanza) -> Awaitable[None] | None:
        """The resource's caps, read as its presence goes out. An unknown ver is asked now,
        before the presence reaches anyone (Prosody's mod_pep does the same: clients see the
        disco#info query before their own presence)."""
        c = presence.find(_C)
        ver = c.get("ver") if c is not None else None
        old = self.caps.get(session)
        if session.presence is not None and old is not None and old.ver == ver:
            return None  # the same caps: nothing new
        if ver is None or c is None:
            self.caps.set(session, Caps(None, _NOTHING, fresh=True))
            return None
        known = self._known.get(ver)
        self.caps.set(session, Caps(ver, known, fresh=known is not None))
        if known is not None:
            return None
        # From the account's own bare JID (its PEP service), as Prosody's mod_pep asks.
        lookup, sent = self._ask(session.jid_str, session.bare_str, ver, c.get("hash"),
                                 c.get("node") or "")
        self.server.router.spawn(self._discovered(session, ver, lookup))
        return sent

    @hook(events.PRESENCE_AVAILABLE)
    def available(self, session: Session, _first: bool) -> None:
        """The presence went out with caps known: caps/known (XEP-0163 §4.3.2: last items)."""
        caps = self.caps.get(session)
        if caps is not None and caps.fresh:
            caps.fresh = False
            if caps.features:
                self._tell(session, caps.features)

    def _tell(self, session: Session, features: frozenset[str]) -> None:
        for pending in self.server.hooks.notify_nowait(events.CAPS_KNOWN, session, features):
            self.server.router.spawn(pending)

    async def _discovered(self, session: Session, ver: str,
                          lookup: asyncio.Future[frozenset[str] | None]) -> None:
        features = await lookup
        caps = self.caps.get(session)
        if caps is None or caps.ver != ver:
            return  # the resource changed its presence meanwhile
        self.caps.set(session, Caps(ver, features or frozenset()))
        if features:
            self._tell(session, features)

    # -- asking ---------------------------------------------------------------------------

    def _ask(self, target: str, from_: str, ver: str, algorithm: str | None,
             node: str) -> tuple[asyncio.Future[frozenset[str] | None], Awaitable[None] | None]:
        """What a caps ver means, asked of the resource (once: a second lookup meanwhile waits
        for that answer); kept for everyone when its hash verifies (XEP-0115 §5.4). The
        lookup, and the routing of the query (to await before anything else goes out)."""
        lookup = self._asked.get((target, ver))
        if lookup is not None:
            return lookup, None
        loop = asyncio.get_running_loop()
        lookup = loop.create_future()
        self._asked[(target, ver)] = lookup
        query_node = f"{node}#{ver}"
        answer: asyncio.Future[Stanza] = loop.create_future()
        self._asking.setdefault((target, from_), {})[query_node] = answer
        # The id Prosody uses; answers are told apart by who answers to whom, and the node.
        iq = st.iq("get", to=target, from_=from_, id_="disco")
        st.child(iq, _INFO, {"node": query_node})
        sent = self.server.router.route(iq, None)
        self.server.router.spawn(self._verify(target, from_, ver, algorithm, query_node, answer,
                                              lookup))
        return lookup, sent

    async def _verify(self, target: str, from_: str, ver: str, algorithm: str | None,
                      query_node: str, answer: asyncio.Future[Stanza],
                      lookup: asyncio.Future[frozenset[str] | None]) -> None:
        features = None
        try:
            reply = await asyncio.wait_for(answer, _TIMEOUT)
            query = reply.find(_INFO) if reply.get("type") == "result" else None
            if query is not None:
                features = features_of(query)
                if algorithm is not None and caps_hash(query, algorithm) == ver:
                    if len(self._known) >= _CACHE_SIZE:
                        self._known.clear()
                    self._known[ver] = features
                else:
                    log.info("event=caps-unverified jid=%s ver=%s", target, ver)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            waiting = self._asking.get((target, from_), {})
            waiting.pop(query_node, None)
            if not waiting:
                self._asking.pop((target, from_), None)
            del self._asked[(target, ver)]
            lookup.set_result(features)

    async def _lookup(self, target: str, from_: str, ver: str, algorithm: str | None,
                      node: str) -> frozenset[str] | None:
        lookup, sent = self._ask(target, from_, ver, algorithm, node)
        if sent is not None:
            await sent
        return await lookup

    @hook(events.IQ_RESPONSE)
    def answered(self, stanza: Stanza, _origin: Session | None, _to: JID) -> object:
        if stanza.get("id") != "disco":
            return None
        waiting = self._asking.get((stanza.get("from", ""), stanza.get("to", "")))
        if not waiting:
            return None
        query = stanza.find(_INFO)
        node = query.get("node") if query is not None else None
        answer = waiting.get(node) if node in waiting else next(iter(waiting.values()))
        if answer is None or answer.done():
            return None
        answer.set_result(st.standalone(stanza))
        return True

    # -- contacts on other servers: their resources' caps, from the presence they send us -

    @hook(events.PRESENCE_BARE, priority=50)
    @hook(events.PRESENCE_FULL, priority=50)
    def remote_presence(self, stanza: Stanza, _origin: Session | None, to: JID) -> None:
        """Watch (never consume) presence from remote resources to our users: which of them
        are available, with which caps."""
        try:
            sender = JID.parse(stanza.get("from") or "")
        except InvalidJID:
            return None
        if sender.resource is None or self.server.router.is_local(sender.domain):
            return None
        type_ = stanza.get("type")
        bare = sender.bare
        full = str(sender)
        if type_ == "unavailable":
            resources = self._remote.get(bare)
            if resources is not None:
                resources.pop(full, None)
                if not resources:
                    del self._remote[bare]
            return None
        if type_ is not None:
            return None
        c = stanza.find(_C)
        ver = c.get("ver") if c is not None else None
        resources = self._remote.get(bare)
        if resources is None:
            if len(self._remote) >= _CACHE_SIZE:
                self._remote.clear()
            resources = self._remote[bare] = {}
        old = resources.get(full)
        if old is not None and old.ver == ver:
            return None
        if ver is None or c is None:
            resources[full] = Caps(None, frozenset())
            return None
        known = self._known.get(ver)
        resources[full] = Caps(ver, known)
        self.server.router.spawn(self._discover_remote(to.bare, sender, ver, c.get("hash"),
                                                       c.get("node") or "", known))
        return None

    async def _discover_remote(self, user: JID, sender: JID, ver: str, algorithm: str | None,
                               node: str, known: frozenset[str] | None) -> None:
        features = known
        if features is None:
            features = await self._lookup(str(sender), str(user), ver, algorithm, node)
            caps = self._remote.get(sender.bare, {}).get(str(sender))
            if caps is None or caps.ver != ver:
                return
            caps.features = features or frozenset()
        if features and user.local is not None:
            await self.server.hooks.notify(events.CAPS_REMOTE_KNOWN, user, sender, features)

    # -- sessions ending, the server stopping ---------------------------------------------

    @hook(events.SESSION_CLOSED)
    def closed(self, session: Session, _reason: str) -> None:
        # A caps query to a session that has gone will not be answered: stop waiting for it.
        self._give_up_asking(lambda target: target == str(session.jid))

    @hook(events.SERVER_STOPPING)
    def stopping(self, _server: object) -> None:
        # Shutdown drains the router's background work: don't hold it up for caps answers.
        self._give_up_asking(lambda _target: True)

    def _give_up_asking(self, which: Callable[[str], bool]) -> None:
        for (target, _from), waiting in list(self._asking.items()):
            if which(target):
                for answer in waiting.values():
                    if not answer.done():
                        answer.set_exception(ConnectionError("the session has gone"))

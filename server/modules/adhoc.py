"""Ad-Hoc Commands (XEP-0050) offered by the server to its own users.

Commands are listed as disco items of the server under the node
'http://jabber.org/protocol/commands' (XEP-0050 §2.2) and run with
<command xmlns='http://jabber.org/protocol/commands' node='...' action='execute'/> sent to the
server's domain. Every command here is single-stage: the first execute completes it, with a
XEP-0004 data form of type 'result'.

  watchers  "Who watches my presence": the requester's watcher information (see
            server/modules/watchers.py) as a table with columns jid, kind, count, last.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from server import events
from server.errors import StanzaError
from server.jid import JID
from server.module import Module, ModuleContext, Stanza, hook, iq_set
from server.presence.watchers import Watcher, timestamp
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

COMMAND = ns.q(ns.COMMANDS, "command")
_X = ns.q(ns.DATA_FORMS, "x")
_FIELD = ns.q(ns.DATA_FORMS, "field")
_VALUE = ns.q(ns.DATA_FORMS, "value")
_WATCHER_COLUMNS = (("jid", "Watcher", "jid-single"), ("kind", "Kind", "text-single"),
                    ("count", "Fetches in the last hour", "text-single"),
                    ("last", "Last fetch", "text-single"))

Run = Callable[[JID], Awaitable[Stanza]]


class AdHoc(Module):
    name = "adhoc"
    features = (ns.COMMANDS,)

    def __init__(self, server: ModuleContext, config: Any) -> None:
        super().__init__(server, config)
        # node -> (name, run); XEP-0050 §2.2: the name is shown to users.
        self.commands: dict[str, tuple[str, Run]] = {
            "watchers": ("Who watches my presence", self._watchers),
        }

    def _requester(self, origin: Session | None) -> JID | None:
        """Commands are for the server's own users (XEP-0050 §2.1: the responder decides)."""
        if (origin is None or origin.jid.local is None
                or origin.jid.domain not in self.server.hosts):
            return None
        return origin.jid.bare

    @hook(events.DISCO_NODE)
    def disco_node(self, query: Stanza, origin: Session | None, node: str) -> object:
        if self._requester(origin) is None:
            return None
        domain = self.server.default_domain if origin is None else origin.jid.domain
        if query.tag == ns.q(ns.DISCO_ITEMS, "query") and node == ns.COMMANDS:
            for name, (label, _run) in self.commands.items():
                st.child(query, ns.q(ns.DISCO_ITEMS, "item"),
                         {"jid": domain, "node": name, "name": label})
            return True
        if query.tag == ns.q(ns.DISCO_INFO, "query") and node in self.commands:
            # XEP-0050 §2.3: a command node is an automation/command-node.
            st.child(query, ns.q(ns.DISCO_INFO, "identity"),
                     {"category": "automation", "type": "command-node",
                      "name": self.commands[node][0]})
            for feature in (ns.COMMANDS, ns.DATA_FORMS):
                st.child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": feature})
            return True
        return None

    @iq_set(ns.COMMANDS, "command")
    async def execute(self, stanza: Stanza, origin: Session | None) -> Stanza:
        request = st.payload(stanza)
        assert request is not None  # the router checked there is exactly one
        requester = self._requester(origin)
        if requester is None:
            raise StanzaError("forbidden", "commands are for this server's users")
        node = request.get("node", "")
        command = self.commands.get(node)
        if command is None:
            # Other modules' commands (admin_adhoc: XEP-0133): "adhoc/execute" (stanza,
            # request, requester) -> an awaitable of the <command/> to answer with.
            pending = self.server.hooks.fire(events.ADHOC_EXECUTE, stanza, request, requester)
            if pending is not None:
                return st.result(stanza, await pending)
            raise StanzaError("item-not-found", f"no command {node!r}")
        action = request.get("action", "execute")
        if action == "cancel":
            # XEP-0050 §3.5: nothing to undo for a single-stage command.
            return st.result(stanza, _command(node, request, "canceled"))
        if action not in ("execute", "complete"):
            raise StanzaError("bad-request", f"action {action!r} does not apply to {node!r}")
        form = await command[1](requester)
        answer = _command(node, request, "completed")
        answer.append(form)
        return st.result(stanza, answer)

    # -- the commands ------------------------------------------------------------------------

    async def _watchers(self, requester: JID) -> Stanza:
        pending = self.server.hooks.fire(events.WATCHERS_LIST, requester)
        if pending is None:
            raise StanzaError("item-not-found", "watcher information is not available")
        rows: list[Watcher] = await pending
        form = st.element(_X, {"type": "result"})
        st.child(form, ns.q(ns.DATA_FORMS, "title"), text="Who watches my presence")
        reported = st.child(form, ns.q(ns.DATA_FORMS, "reported"))
        for var, label, type_ in _WATCHER_COLUMNS:
            st.child(reported, _FIELD, {"var": var, "label": label, "type": type_})
        for row in rows:
            item = st.child(form, ns.q(ns.DATA_FORMS, "item"))
            values = (row.jid, row.kind, str(row.count),
                      timestamp(row.last) if row.last is not None else "")
            for (var, _label, _type), value in zip(_WATCHER_COLUMNS, values, strict=True):
                st.child(st.child(item, _FIELD, {"var": var}), _VALUE, text=value)
        return form


def _command(node: str, request: Stanza, status: str) -> Stanza:
    # XEP-0050 §3.4: the responder names the session; a client may have named it already.
    sessionid = request.get("sessionid") or secrets.token_hex(8)
    return st.element(COMMAND, {"node": node, "sessionid": sessionid, "status": status})

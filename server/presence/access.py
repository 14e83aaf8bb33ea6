"""Access rules (RFC 2778 §5.1.2): one decision per (watcher, presentity).

A watcher sees a presentity's presence when it is the presentity itself or a subscriber
(subscription from/both), and no other rule denies it: modules add rules through the
`access/deny` hook (blocking, per-contact visibility), admins through config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.jid import JID
from server.presence.subscription import is_subscriber
from server.roster import Roster, state_of

if TYPE_CHECKING:
    from server.events import Hooks


class AccessRules:
    def __init__(self, hooks: Hooks) -> None:
        self._hooks = hooks

    def denied(self, presentity: JID, watcher: JID, what: str = "presence") -> bool:
        return self._hooks.fire("access/deny", presentity, watcher, what) is not None

    def may_see_presence(self, presentity: JID, roster: Roster, watcher: JID) -> bool:
        if watcher.bare == presentity:
            return True
        if not is_subscriber(state_of(roster.items.get(str(watcher.bare)))):
            return False
        return not self.denied(presentity, watcher)

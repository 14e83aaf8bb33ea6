"""Moved to server/events.py (the list of events and `Hooks`); kept for the files that still
import from here while the transition lasts (router.py, muc/, pubsub/)."""

from server.events import Hooks, stanza_kinds

__all__ = ["Hooks", "stanza_kinds"]

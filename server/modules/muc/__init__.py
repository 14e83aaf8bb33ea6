"""Multi-User Chat (XEP-0045) at muc.<domain>: rooms made on first join, occupants from here and
from other servers, groupchat and private messages, subject, discussion history, the
muc#roomconfig form, persistent rooms (stored, back after a restart), affiliations and roles
(muc#admin: lists, kick, ban, voice), nickname registration (muc#register), mediated
invitations, voice requests (muc#request), iqs relayed to occupants, destroy; XEP-0410
self-ping, XEP-0421 occupant ids, XEP-0359 stanza ids, XEP-0313 room archive, XEP-0425
moderation (a tombstone in the archive); limits on rooms per user and per account, occupants,
message and presence rate. Room stanzas to our users pass the router's `filter/user` chain
(blocking) in order (Router.deliver_in_order).

    [muc]
    enabled = true                   # the default
    subdomain = "muc"
    restrict_room_creation = false   # or "local" (users of our domains), "admins" ([admins])
    history_length = 20              # messages a new room keeps for joiners
    max_history_length = 100         # the most a room's owner may configure
    max_rooms_per_user = 100         # rooms one user may create (and own); 0: no limit
    max_rooms_joined = 100           # rooms one account may be in at once; 0: no limit
    max_occupants = 1000             # per room (muc#roomconfig_maxusers may lower it)
    message_rate = 5.0               # messages per second per occupant (0: no limit) ...
    message_burst = 20               # ... with bursts of up to this many
    presence_rate = 1.0              # presence updates per second per occupant ...
    presence_burst = 10              # ... with bursts of up to this many

Split by concern, as Prosody's plugins/muc/ is:

    room.py        one room: a plain object returning the stanzas to send (no I/O)
    nicknames.py   RFC 8266 / resourceprep checks of nicknames
    base.py        the [muc] settings, the state the parts share, storage, delivery
    service.py     joins, leaves, routing of presence, messages and iqs, limits
    owner.py       muc#owner: configuration, destroy          (XEP-0045 §10)
    admin.py       muc#admin: affiliations and roles          (XEP-0045 §8, §9)
    register.py    jabber:iq:register with a room             (XEP-0045 §7.10)
    voice.py       voice requests                             (XEP-0045 §7.13, §8.6)
    invite.py      invitations                                (XEP-0045 §7.8)
    moderation.py  message moderation                         (XEP-0425)
    archive.py     the room archive, history after a restart  (XEP-0313)
    cluster.py     [cluster]: each room on one node, moved when the node dies (only imported then)

Each part declares its iq handlers (`@iq_get(ns, element, to="service-bare")`); this file puts
them together into the one module.
"""

from __future__ import annotations

from server.modules.muc.base import MucSettings
from server.modules.muc.moderation import Moderation
from server.modules.muc.owner import Owner
from server.modules.muc.register import Register
from server.modules.muc.room import MUC, OCCUPANT_ID, SELF_PING, SID
from server.modules.muc.service import Service


class Muc(Service, Register, Owner, Moderation):
    """The MUC service module: the parts above, one instance per server."""

    service_features = (MUC, SID, OCCUPANT_ID, SELF_PING)


__all__ = ["Muc", "MucSettings"]

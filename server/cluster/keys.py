"""Every Redis key and channel of the cluster, in one place (the names are the wire format
between nodes: changing one is a cluster-wide upgrade).

    presenced:node:<node>          string: the live incarnation id, PX dead_after (heartbeat)
    presenced:nodes                hash: node -> JSON {"incarnation", "started"} of each joined node
    presenced:stats:<node>         hash: incarnation, heartbeat (unix ms), sessions
    presenced:dir:<bare JID>       hash: resource -> JSON entry (directory.Entry)
    presenced:dir-node:<node>:<incarnation>
                                   set: "<bare>/<resource>" of the sessions that incarnation bound
                                   (read by the survivor that cleans up after it, then deleted)
    presenced:incarnations         hash: "<node>:<incarnation>" -> JSON {"node", "incarnation",
                                   "started"} of every incarnation not yet cleaned up after;
                                   one that is no longer live is reaped (reaper.py), then its
                                   field is removed (a graceful stop removes its own)
    presenced:reap:<node>:<incarnation>
                                   string: the node doing the clean-up of that incarnation
                                   (SET NX PX: one survivor, or the node itself when it rejoins
                                   or stops); kept as a tombstone for a day once done, so that a
                                   node paused longer than dead_after knows it was reaped
    presenced:inbox:<node>         stream: stanzas and commands for that node's sessions
                                   (consumer group "presenced", one consumer per incarnation,
                                   "reaper-<node>" for a node settling another's entries);
                                   an entry is deleted when acknowledged, so what the stream
                                   holds is what no session got yet; k "h": give up a
                                   resumable session (handover.py)
    presenced:sm:<previd>          string: JSON {"n", "i", "j"}: the node holding the resumable
                                   XEP-0198 session previd, and its full JID (handover.py)
    presenced:handover:<token>     list: a holder's answer to a hand-over request (the session's
                                   state as JSON, {} when it has none), EX 60
    presenced:room:<room JID>      string: "<node>:<incarnation>", the room's owner (placement.py),
                                   set by a compare-and-set script only while no live incarnation
                                   holds it; never expires (a dead owner's claim is taken over)
    presenced:placed:room:<node>:<incarnation>
                                   set: the rooms that incarnation claimed (re-homed by the
                                   survivors when it dies)
    presenced:component:<domain>   string: "<node>:<incarnation>", the node an external component
                                   (XEP-0114) of that domain is connected to (routes.py), claimed
                                   by placement.py's compare-and-set script; deleted when it
                                   disconnects, or by the reaper when that incarnation dies
    presenced:placed:component:<node>:<incarnation>
                                   set: the component domains that incarnation claimed
    presenced:room-state:<room JID>
                                   string: JSON, the owner's mirror of a room's occupants (their
                                   nicks, roles, sessions with their node and presence) and of a
                                   non-persistent room's config, so that a new owner rebuilds it
    presenced:pubsub-version:<kind>:<key>
                                   integer: bumped by the node that changes a PEP account's
                                   (kind p, key its bare JID) or a pubsub service's (kind q, its
                                   domain) nodes, before it answers; a node whose copy is older
                                   reads them again (pubsub/cluster.py)
    presenced:bosh:<sid>           string: "<node>:<incarnation>" holding that BOSH session, so
                                   that its requests may reach any node (bosh.py); expires a
                                   little after the session could have ended without a word
    presenced:invalidate           pub/sub channel: "<node> <kind> <bare JID>", fire-and-forget
                                   (the directory's periodic resync covers a lost one; a module's
                                   cache is dropped anyway when the account goes offline). Kinds:
                                     d  the account's directory entries (reload them)
                                     r  its roster (server/roster.py)
                                     b  its blocklist (XEP-0191, modules/blocking.py)
                                     v  its hidden list (modules/visibility.py)
                                     m  its archive preferences (XEP-0313 §6, modules/mam.py)
                                     a  its vCard's avatar hash (XEP-0153, modules/vcard.py)
                                     p  a PEP account's nodes (modules/pubsub/cluster.py)
                                     q  a pubsub service's nodes, by its domain (the same)
                                     k  a component's route, by its domain (routes.py)
                                     n  the nodes: one joined or left (its name; the others
                                        read the live nodes now, not at their next heartbeat)
"""

from __future__ import annotations

PREFIX = "presenced:"
NODES = PREFIX + "nodes"
INCARNATIONS = PREFIX + "incarnations"
INVALIDATE = PREFIX + "invalidate"
# A list each node that dropped a cache entry pushes its name to, so the changing node knows
# every other one did before it answers its client ("<prefix><node>:<counter>").
ACK = PREFIX + "ack:"
GROUP = "presenced"
# Kinds of presenced:invalidate messages.
DIRECTORY, ROSTER, BLOCKLIST, HIDDEN, ARCHIVE_PREFS, AVATAR = "d", "r", "b", "v", "m", "a"
MEMBERSHIP = "n"


def node(name: str) -> str:
    return f"{PREFIX}node:{name}"


def stats(name: str) -> str:
    return f"{PREFIX}stats:{name}"


def directory(bare: str) -> str:
    return f"{PREFIX}dir:{bare}"


DIRECTORY_PATTERN = PREFIX + "dir:*"


def node_sessions(name: str, incarnation: str) -> str:
    return f"{PREFIX}dir-node:{name}:{incarnation}"


def inbox(name: str) -> str:
    return f"{PREFIX}inbox:{name}"


def placed(kind: str, name: str) -> str:
    """The claim of a placed thing (kind "room": a MUC room) by one node's incarnation."""
    return f"{PREFIX}{kind}:{name}"


def placed_by(kind: str, owner: str) -> str:
    """The set of what one incarnation ("<node>:<incarnation>") claimed, of one kind."""
    return f"{PREFIX}placed:{kind}:{owner}"


def bosh(sid: str) -> str:
    return f"{PREFIX}bosh:{sid}"


def room_state(room: str) -> str:
    return f"{PREFIX}room-state:{room}"


def pubsub_version(kind: str, key: str) -> str:
    return f"{PREFIX}pubsub-version:{kind}:{key}"


def incarnation(name: str, incarnation: str) -> str:
    """The field of INCARNATIONS (node names have no ':')."""
    return f"{name}:{incarnation}"


def reap(name: str, incarnation: str) -> str:
    return f"{PREFIX}reap:{name}:{incarnation}"


COMPONENT = "component"  # the placed kind of component routes (routes.py)
COMPONENT_ROUTE = "k"    # the invalidation kind of a component route (routes.py)
HANDOVER = "h"  # an inbox entry: give up a resumable session (handover.py)


def resumption(previd: str) -> str:
    return f"{PREFIX}sm:{previd}"


def handover_answer(token: str) -> str:
    return f"{PREFIX}handover:{token}"

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
                                   holds is what no session got yet
    presenced:room:<room JID>      string: "<node>:<incarnation>", the room's owner (placement.py),
                                   set by a compare-and-set script only while no live incarnation
                                   holds it; never expires (a dead owner's claim is taken over)
    presenced:placed:room:<node>:<incarnation>
                                   set: the rooms that incarnation claimed (re-homed by the
                                   survivors when it dies)
    presenced:room-state:<room JID>
                                   string: JSON, the owner's mirror of a room's occupants (their
                                   nicks, roles, sessions with their node and presence) and of a
                                   non-persistent room's config, so that a new owner rebuilds it
    presenced:pubsub-version:<kind>:<key>
                                   integer: bumped by the node that changes a PEP account's
                                   (kind p, key its bare JID) or a pubsub service's (kind q, its
                                   domain) nodes, before it answers; a node whose copy is older
                                   reads them again (pubsub/cluster.py)
    presenced:invalidate           pub/sub channel: "<node> <kind> <bare JID>" (kind d: directory,
                                   r: roster, p: a PEP account's nodes, q: a pubsub service's
                                   nodes, by its domain), fire-and-forget; a periodic resync
                                   covers a loss of d and r
"""

from __future__ import annotations

PREFIX = "presenced:"
NODES = PREFIX + "nodes"
INCARNATIONS = PREFIX + "incarnations"
INVALIDATE = PREFIX + "invalidate"
GROUP = "presenced"


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


def room_state(room: str) -> str:
    return f"{PREFIX}room-state:{room}"


def pubsub_version(kind: str, key: str) -> str:
    return f"{PREFIX}pubsub-version:{kind}:{key}"


def incarnation(name: str, incarnation: str) -> str:
    """The field of INCARNATIONS (node names have no ':')."""
    return f"{name}:{incarnation}"


def reap(name: str, incarnation: str) -> str:
    return f"{PREFIX}reap:{name}:{incarnation}"

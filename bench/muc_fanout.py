"""MUC fan-out (issue 14): rooms of `occupants` users each (XEP-0045), everyone talking: in each
room the occupants send groupchat messages in turn, at most `window` messages in flight per
room (each is delivered to every occupant, the sender included, §7.4). Counted: the groupchat
messages the clients actually receive (an error bounced to a sender is no delivery), per
second and per server CPU-second (utime+stime of the server's process tree from /proc, over
the measured window). presenced (its room archive turned off in the owner's form, as the
others run without one), Prosody 0.12 (`Component "muc.DOMAIN" "muc"`) and ejabberd
(mod_muc), one fresh server each; rooms are instant rooms (an empty owner's form, §10.1.2),
joined without history.

    python -m bench.muc_fanout [--quick] [--servers presenced,prosody,ejabberd]
                               [--rooms 4] [--occupants 50] [--window 16] [--duration 8]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from bench import feature, loadgen
from bench.feature import FANOUT_ADDRESSES, PeerMaker
from bench.peers import EjabberdPeer, Peer, PresencedPeer, ProsodyPeer
from bench.run import DOMAIN, NO_ARCHIVE, Fleet, Window, split

SERVICE = f"muc.{DOMAIN}"
# presenced archives rooms by default (XEP-0313 on the room JID); Prosody without mod_muc_mam
# and ejabberd without mod_mam do not.
NO_ROOM_ARCHIVE = ("<field var='FORM_TYPE' type='hidden'><value>"
                   "http://jabber.org/protocol/muc#roomconfig</value></field>"
                   "<field var='muc#roomconfig_enablearchiving'><value>0</value></field>")

# Like with like: neither Prosody 0.12's mod_muc nor ejabberd's mod_muc (min_message_interval
# 0) limits an occupant's message rate by default; presenced's [muc] message_rate does.
NO_RATE_LIMIT = "[muc]\nmessage_rate = 0\n"


@dataclass
class MucParams(feature.FanoutParams):  # window: messages in flight per room
    rooms: int = 4          # rooms, each in one generator process
    occupants: int = 50     # per room, all talking

    @classmethod
    def quick(cls) -> MucParams:
        return cls(rooms=1, occupants=5, window=2, warmup=0.5, duration=1.5)

    def layout(self) -> list[tuple[str, list[str]]]:
        """(room JID, its occupants' user names) for each room."""
        return [(f"room{r}@{SERVICE}", [f"m{r:03d}x{i:03d}" for i in range(self.occupants)])
                for r in range(self.rooms)]


SERVERS: dict[str, PeerMaker] = {
    "presenced": lambda host, port: PresencedPeer(  # MUC is on by default, at muc.<domain>
        host=host, c2s_port=port, domains=(DOMAIN,), extra_config=NO_ARCHIVE + NO_RATE_LIMIT),
    "prosody": lambda host, port: ProsodyPeer(host=host, c2s_port=port, domains=(DOMAIN,),
                                              components={SERVICE: "muc"}),
    "ejabberd": lambda host, port: EjabberdPeer(
        host=host, c2s_port=port, domains=(DOMAIN,), in_band_registration=True,
        extra_modules={"mod_muc": {"hosts": [SERVICE]}}),
}


def run(kind: str, p: MucParams, fleet: Fleet, host: str | None = None,
        port: int = 5222) -> dict[str, Any]:
    rooms = p.layout()
    users = [u for _, members in rooms for u in members]

    def measure(peer: Peer, target: loadgen.Target) -> Window:
        if kind == "ejabberd":
            peer.restart()  # the registration sessions came and went
        form = NO_ROOM_ARCHIVE if kind == "presenced" else ""
        return fleet.run("muc", peer, target,
                         split(fleet, "rooms", rooms, window=p.window, form=form),
                         p.warmup, p.duration)

    peer = SERVERS[kind](host or FANOUT_ADDRESSES[kind], port)
    window = feature.on_fresh_server(peer, users, measure, port)
    delivered = sum(r["delivered"] for r in window.results)
    refused = sum(r["refused"] for r in window.results)
    if delivered == 0:
        raise RuntimeError(f"no groupchat message was delivered ({refused} refused)")
    return dict(feature.rates(delivered, window), delivered=delivered, refused=refused,
                sent_per_s=delivered / p.occupants / window.seconds)


def main(argv: list[str] | None = None) -> int:
    p, kinds, _ = feature.parse_params(__doc__ or "", MucParams, MucParams.quick(),
                                       "presenced,prosody,ejabberd", argv)
    feature.run_table(kinds, p, run, (
        f"MUC groupchat fan-out: {p.rooms} rooms x {p.occupants} occupants, all talking, "
        f"<= {p.window} messages in flight per room, {p.duration:g} s measured"), [
        *feature.rate_columns("delivered"),
        ("sent/s", 8, lambda g: f"{g['sent_per_s']:,.0f}"),
        ("refused", 8, lambda g: f"{g['refused']:,}")],
        f"delivered = groupchat messages received by the occupants (each message sent reaches "
        f"all {p.occupants}, the sender's echo included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

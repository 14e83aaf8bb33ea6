"""PEP notifications (issue 13): N users, each with R mutual ('both') contacts made by
subscription handshakes, online with XEP-0115 caps that ask for tune notifications
(``http://jabber.org/protocol/tune+notify``, XEP-0163 §4.2) and answering the servers'
disco#info query for them; they publish a XEP-0118 tune to their own PEP node in turn, at most
`window` publications unanswered per generator process. Counted: the notifications the clients
actually receive (each publication should reach the R contacts and the publisher's own
resource), per second and per server CPU-second (utime+stime of the server's process tree
from /proc, over the measured window). presenced, Prosody 0.12 (mod_pep) and ejabberd
(mod_pubsub with the pep plugin, mod_caps), one fresh server each.

    python -m bench.pep_notify [--quick] [--servers presenced,prosody,ejabberd]
                               [--users 200] [--contacts 10] [--window 16] [--duration 8]
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any

from bench import feature, loadgen
from bench.feature import FANOUT_ADDRESSES, PeerMaker
from bench.peers import EjabberdPeer, Peer, PresencedPeer, ProsodyPeer
from bench.run import DOMAIN, NO_ARCHIVE, Fleet, Window, split


@dataclass
class PepParams(feature.FanoutParams):  # window: publications unanswered per process
    users: int = 200        # online, each publishing in turn
    contacts: int = 10      # 'both' contacts each, along a ring (even)

    @classmethod
    def quick(cls) -> PepParams:
        return cls(users=12, contacts=4, window=4, warmup=0.5, duration=1.5)

    @property
    def accounts(self) -> list[str]:
        return [f"t{i:05d}" for i in range(self.users)]


SERVERS: dict[str, PeerMaker] = {
    "presenced": lambda host, port: PresencedPeer(  # PEP is on by default
        host=host, c2s_port=port, domains=(DOMAIN,), extra_config=NO_ARCHIVE),
    "prosody": lambda host, port: ProsodyPeer(host=host, c2s_port=port, domains=(DOMAIN,),
                                              extra_modules=("pep",)),
    "ejabberd": lambda host, port: EjabberdPeer(
        host=host, c2s_port=port, domains=(DOMAIN,), in_band_registration=True,
        extra_modules={"mod_pubsub": {"plugins": ["flat", "pep"]}}),
}


def run(kind: str, p: PepParams, fleet: Fleet, host: str | None = None,
        port: int = 5222) -> dict[str, Any]:
    users = p.accounts

    def measure(peer: Peer, target: loadgen.Target) -> Window:
        asyncio.run(loadgen.make_rosters(target, users, p.contacts))
        peer.restart()  # nothing left in memory from making the rosters
        return fleet.run("pep", peer, target, split(fleet, "users", users, window=p.window),
                         p.warmup, p.duration)

    peer = SERVERS[kind](host or FANOUT_ADDRESSES[kind], port)
    window = feature.on_fresh_server(peer, users, measure, port)
    got = {k: sum(r[k] for r in window.results)
           for k in ("delivered", "received", "published", "errors")}
    error = next((r["error"] for r in window.results if r["error"]), "")
    if got["delivered"] == 0:
        raise RuntimeError(f"no notification was delivered ({got['published']} publications,"
                           f" {got['errors']} refused: {error})")
    return dict(got, **feature.rates(got["delivered"], window), error=error,
                per_publish=got["delivered"] / max(got["published"], 1),
                publish_per_s=got["published"] / window.seconds)


def parse(argv: list[str] | None) -> tuple[PepParams, list[str]]:
    p, kinds, ap = feature.parse_params(__doc__ or "", PepParams, PepParams.quick(),
                                        "presenced,prosody,ejabberd", argv)
    if p.contacts % 2 or p.contacts >= p.users:
        ap.error("--contacts must be even and smaller than --users")
    return p, kinds


def main(argv: list[str] | None = None) -> int:
    p, kinds = parse(argv)
    feature.run_table(kinds, p, run, (
        f"PEP tune notifications: {p.users} users x {p.contacts} contacts, <= {p.window} "
        f"publications in flight, {p.duration:g} s measured"), [
        *feature.rate_columns("notif"),
        ("per publish", 12, lambda g: f"{g['per_publish']:.2f}"),
        ("publish/s", 10, lambda g: f"{g['publish_per_s']:,.0f}"),
        ("duplicates", 11, lambda g: f"{g['received'] - g['delivered']:,}"),
        ("refused", 8, lambda g: f"{g['errors']:,}" + (f" ({g['error'][:100]})"
                                                      if g["errors"] else ""))],
        "notifications counted once per publication and recipient (duplicates: the same one "
        f"received again, not counted); expected per publish: {p.contacts} contacts + the "
        f"publisher's own resource = {p.contacts + 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

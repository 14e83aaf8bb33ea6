"""The cost of archiving (issue 12): bench/run.py's 1:1 messages scenario, each server
without and with its message archive, one fresh server each: presenced with `[mam] default =
"never"` (the archive filter runs, writes nothing) and `"always"` (both copies of every
message archived, group-committed); Prosody 0.12 without and with mod_mam
(default_archive_policy = true, internal storage); ejabberd without and with mod_mam
(default: always, Mnesia).

    python -m bench.mam_messages [--quick] [--servers presenced,prosody,ejabberd]
                                 [--duration 8] [--pairs 50] [--window 32]
"""

from __future__ import annotations

import sys
from typing import Any

from bench import feature, loadgen
from bench.peers import EjabberdPeer, Peer, PresencedPeer, ProsodyPeer
from bench.run import ADDRESSES, DOMAIN, PASSWORD, Fleet, Params, prepare_accounts
from bench.run import scenario_messages as messages


def make(kind: str, archiving: bool) -> Peer:
    host = ADDRESSES[kind]
    if kind == "presenced":
        policy = "always" if archiving else "never"
        return PresencedPeer(host=host, c2s_port=5222, domains=(DOMAIN,),
                             extra_config=f'[mam]\ndefault = "{policy}"\n')
    if kind == "prosody":
        # mod_mam on its default (internal, file) storage, archiving every conversation.
        return ProsodyPeer(host=host, c2s_port=5222, domains=(DOMAIN,),
                           extra_modules=("mam",) if archiving else (),
                           extra_config="default_archive_policy = true" if archiving else "")
    if kind == "ejabberd":
        # mod_mam on ejabberd's default database (Mnesia), archiving every conversation.
        return EjabberdPeer(host=host, c2s_port=5222, domains=(DOMAIN,),
                            in_band_registration=True,
                            extra_modules={"mod_mam": {"default": "always"}} if archiving
                            else None)
    raise ValueError(kind)


def run(kind: str, archiving: bool, p: Params, fleet: Fleet) -> dict[str, Any]:
    peer = make(kind, archiving)
    target = loadgen.Target(ADDRESSES[kind], 5222, DOMAIN, PASSWORD)
    users = p.general_accounts
    prepare_accounts(peer, target, users)
    peer.start()
    out: dict[str, Any] = {}
    try:
        prepare_accounts(peer, target, users)
        messages(p, peer, fleet, target, out)
    finally:
        peer.stop()
    return out


def both(kind: str, p: Params, fleet: Fleet) -> dict[str, dict[str, Any]]:
    out = {}
    for label, archiving in (("off", False), ("mam", True)):
        got = run(kind, archiving, p, fleet)
        out[label] = {"msgs_per_s": got["msgs_per_s"],
                      "per_cpu_s": got["msgs_per_s"] / max(got["msgs_cpu"][0], 1e-9)}
    return out


def main(argv: list[str] | None = None) -> int:
    p, kinds = feature.parse(__doc__ or "", "presenced,prosody,ejabberd", argv)
    results = feature.run_each(kinds, p, both)
    feature.header(p, "archive")
    for kind, out in results.items():
        if isinstance(out, str):
            feature.row(kind, "", out)
            continue
        for label, got in out.items():
            feature.row(kind, label, got)
    return 0


if __name__ == "__main__":
    sys.exit(main())

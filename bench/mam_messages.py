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

import argparse
import sys
from dataclasses import replace
from typing import Any

from bench import loadgen
from bench.peers import EjabberdPeer, Peer, PresencedPeer, ProsodyPeer, raise_nofile_limit
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--servers", default="presenced,prosody,ejabberd")
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--window", type=int, default=None)
    args = ap.parse_args(argv)
    p = Params.quick() if args.quick else Params()
    p = replace(p, scenarios=("messages",), **{k: v for k, v in (
        ("duration", args.duration), ("pairs", args.pairs), ("window", args.window))
        if v is not None})
    raise_nofile_limit()
    fleet = Fleet(p.procs)
    results: dict[tuple[str, bool], dict[str, Any] | str] = {}
    try:
        for kind in args.servers.split(","):
            for archiving in (False, True):
                try:
                    results[kind, archiving] = run(kind, archiving, p, fleet)
                except Exception as exc:
                    results[kind, archiving] = f"error: {exc}".splitlines()[0][:60]
                print(f"{kind} archiving={archiving}: done", file=sys.stderr, flush=True)
    finally:
        fleet.close()
    print(f"1:1 messages, {p.pairs} pairs x {p.window} in flight, {p.duration:g} s measured")
    print(f"  {'server':10s} {'archive':8s} {'msg/s':>9s} {'msg per server CPU-s':>21s}")
    for (kind, archiving), out in results.items():
        label = "mam" if archiving else "off"
        if isinstance(out, str):
            print(f"  {kind:10s} {label:8s} {out}")
            continue
        server_cpu = out["msgs_cpu"][0]
        print(f"  {kind:10s} {label:8s} {out['msgs_per_s']:9,.0f} "
              f"{out['msgs_per_s'] / max(server_cpu, 1e-9):21,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

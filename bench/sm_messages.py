"""The cost of stream management (issue 11): bench/run.py's 1:1 messages scenario with every
client plain and with XEP-0198 enabled (senders ask for an acknowledgement after each batch,
receivers answer the server's requests), on presenced, Prosody 0.12 (mod_smacks) and
ejabberd (mod_stream_mgmt), one fresh server each.

    python -m bench.sm_messages [--quick] [--servers presenced,prosody,ejabberd]
                                [--duration 8] [--pairs 50] [--window 32]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from bench import loadgen
from bench.peers import EjabberdPeer, Peer, PresencedPeer, ProsodyPeer, raise_nofile_limit
from bench.run import (
    ADDRESSES,
    DOMAIN,
    NO_ARCHIVE,
    PASSWORD,
    Fleet,
    Params,
    prepare_accounts,
    split,
)
from bench.run import _pairs as pairs_of


def make(kind: str) -> Peer:
    host = ADDRESSES[kind]
    if kind == "presenced":
        return PresencedPeer(host=host, c2s_port=5222, domains=(DOMAIN,), extra_config=NO_ARCHIVE)
    if kind == "prosody":
        return ProsodyPeer(host=host, c2s_port=5222, domains=(DOMAIN,),
                           extra_modules=("smacks",))
    if kind == "ejabberd":
        return EjabberdPeer(host=host, c2s_port=5222, domains=(DOMAIN,),
                            in_band_registration=True, extra_modules={"mod_stream_mgmt": {}})
    raise ValueError(kind)


def measure(op: str, p: Params, peer: Peer, fleet: Fleet,
            target: loadgen.Target) -> dict[str, Any]:
    shards = split(fleet, "pairs", pairs_of(p.general_accounts, p.pairs), window=p.window)
    window = fleet.run(op, peer, target, shards, p.warmup, p.duration)
    delivered = sum(r["delivered"] for r in window.results)
    if delivered == 0:
        raise RuntimeError("no message was delivered")
    return {"msgs_per_s": delivered / window.seconds,
            "per_cpu_s": delivered / max(window.server_cpu, 1e-9)}


def run(kind: str, p: Params, fleet: Fleet) -> dict[str, dict[str, Any]]:
    target = loadgen.Target(ADDRESSES[kind], 5222, DOMAIN, PASSWORD)
    users = p.general_accounts
    out: dict[str, dict[str, Any]] = {}
    for op in ("messages", "messages_sm"):  # a fresh server for each
        peer = make(kind)
        prepare_accounts(peer, target, users)
        peer.start()
        try:
            prepare_accounts(peer, target, users)
            out[op] = measure(op, p, peer, fleet, target)
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
    results: dict[str, dict[str, dict[str, Any]] | str] = {}
    try:
        for kind in args.servers.split(","):
            try:
                results[kind] = run(kind, p, fleet)
            except Exception as exc:
                results[kind] = f"error: {exc}".splitlines()[0][:60]
            print(f"{kind}: done", file=sys.stderr, flush=True)
    finally:
        fleet.close()
    print(f"1:1 messages, {p.pairs} pairs x {p.window} in flight, {p.duration:g} s measured")
    print(f"  {'server':10s} {'SM':4s} {'msg/s':>9s} {'msg per server CPU-s':>21s}")
    for kind, out in results.items():
        if isinstance(out, str):
            print(f"  {kind:10s} {out}")
            continue
        for op, label in (("messages", "off"), ("messages_sm", "on")):
            got = out[op]
            print(f"  {kind:10s} {label:4s} {got['msgs_per_s']:9,.0f} {got['per_cpu_s']:21,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

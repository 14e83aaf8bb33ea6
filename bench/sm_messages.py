"""The cost of stream management (issue 11): bench/run.py's 1:1 messages scenario with every
client plain and with XEP-0198 enabled (senders ask for an acknowledgement after each batch,
receivers answer the server's requests), on presenced, Prosody 0.12 (mod_smacks) and
ejabberd (mod_stream_mgmt), one fresh server each.

    python -m bench.sm_messages [--quick] [--servers presenced,prosody,ejabberd]
                                [--duration 8] [--pairs 50] [--window 32]
"""

from __future__ import annotations

import sys
from typing import Any

from bench import feature, loadgen
from bench.peers import EjabberdPeer, Peer, PresencedPeer, ProsodyPeer
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
    p, kinds = feature.parse(__doc__ or "", "presenced,prosody,ejabberd", argv)
    results = feature.run_each(kinds, p, run)
    feature.header(p, "SM")
    for kind, out in results.items():
        if isinstance(out, str):
            feature.row(kind, "", out)
            continue
        for op, label in (("messages", "off"), ("messages_sm", "on")):
            feature.row(kind, label, out[op])
    return 0


if __name__ == "__main__":
    sys.exit(main())

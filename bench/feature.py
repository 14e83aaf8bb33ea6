"""What the per-feature runners (bench/mam_messages.py, sm_messages.py, ws_messages.py) share:
their command line, the 1:1 messages parameters, and one run per server with its failures
reported in the table instead of ending the run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bench.peers import raise_nofile_limit
from bench.run import Fleet, Params


def parse(doc: str, servers: str, argv: list[str] | None) -> tuple[Params, list[str]]:
    """(parameters, server kinds) from the command line of a runner whose docstring is doc."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--servers", default=servers)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--window", type=int, default=None)
    args = ap.parse_args(argv)
    p = Params.quick() if args.quick else Params()
    p = replace(p, scenarios=("messages",), **{k: v for k, v in (
        ("duration", args.duration), ("pairs", args.pairs), ("window", args.window))
        if v is not None})
    return p, args.servers.split(",")


def run_each(kinds: list[str], p: Params,
             run: Callable[[str, Params, Fleet], Any]) -> dict[str, Any]:
    """run(kind, p, fleet) for each server kind; a failure becomes an "error: …" string."""
    raise_nofile_limit()
    fleet = Fleet(p.procs)
    results: dict[str, Any] = {}
    try:
        for kind in kinds:
            try:
                results[kind] = run(kind, p, fleet)
            except Exception as exc:
                results[kind] = f"error: {exc}".splitlines()[0][:60]
            print(f"{kind}: done", file=sys.stderr, flush=True)
    finally:
        fleet.close()
    return results


def header(p: Params, column: str, note: str = "") -> None:
    print(f"1:1 messages, {p.pairs} pairs x {p.window} in flight, {p.duration:g} s measured"
          + (f" ({note})" if note else ""))
    print(f"  {'server':10s} {column:10s} {'msg/s':>9s} {'msg per server CPU-s':>21s}")


def row(kind: str, label: str, got: dict[str, Any] | str) -> None:
    if isinstance(got, str):
        print(f"  {kind:10s} {label:10s} {got}")
    else:
        print(f"  {kind:10s} {label:10s} {got['msgs_per_s']:9,.0f} {got['per_cpu_s']:21,.0f}")

"""What the per-feature runners share (bench/mam_messages.py, sm_messages.py, ws_messages.py,
pep_notify.py, muc_fanout.py): their command line and parameters, a run on a fresh server
(``on_fresh_server``), one run per server with its failures reported in the table instead of
ending the run, and the comparison of variants (``Variant``, ``compare``): a table of how each
server is set up in each variant, measured the same way, one fresh server each."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol, TypeVar

from bench import loadgen
from bench.peers import Peer, raise_nofile_limit
from bench.run import DOMAIN, PASSWORD, Fleet, Params, Window, pairs, prepare_accounts, split

_D = TypeVar("_D")
_T = TypeVar("_T")

# The fan-out runners' servers (bench.run's are on 127.0.0.20-23): a side-by-side run of
# bench.run elsewhere on the machine does not take them.
FANOUT_ADDRESSES = {"presenced": "127.0.0.24", "prosody": "127.0.0.25", "ejabberd": "127.0.0.26"}

PeerMaker = Callable[[str, int], Peer]  # (host, c2s port) -> a server not yet started


@dataclass(frozen=True)
class Variant:
    """One row per server of a comparison: how each kind of server is set up (``servers``:
    kind -> PeerMaker; a kind missing is not run in this variant) and what ``op`` measures
    (a loadgen op, or a runner's own name such as "websocket")."""

    label: str
    servers: Mapping[str, PeerMaker]
    op: str = "messages"


def on_fresh_server(peer: Peer, users: list[str], measure: Callable[[Peer, loadgen.Target], _T],
                    port: int = 5222) -> _T:
    """Accounts for users (files before the start, in-band after, whichever the server takes),
    start it, measure(peer, target), stop it; a server that died while measured is an error."""
    target = loadgen.Target(peer.host, port, DOMAIN, PASSWORD)
    prepare_accounts(peer, target, users)
    peer.start()
    try:
        prepare_accounts(peer, target, users)
        got = measure(peer, target)
        if not peer.running:
            raise RuntimeError(f"the server died:\n{peer.log_tail()}")
    finally:
        peer.stop()
    return got


def messages(op: str, p: Params, peer: Peer, fleet: Fleet,
             target: loadgen.Target) -> dict[str, Any]:
    """bench/run.py's 1:1 messages (op: "messages", or "messages_sm" with XEP-0198), per second
    and per server CPU-second."""
    shards = split(fleet, "pairs", pairs(p.general_accounts, p.pairs), window=p.window)
    window = fleet.run(op, peer, target, shards, p.warmup, p.duration)
    delivered = sum(r["delivered"] for r in window.results)
    if delivered == 0:
        raise RuntimeError("no message was delivered")
    return {"msgs_per_s": delivered / window.seconds,
            "per_cpu_s": delivered / max(window.server_cpu, 1e-9)}


Measure = Callable[[Variant, Params, Peer, Fleet, loadgen.Target], dict[str, Any]]


def compare(kinds: list[str], p: Params, variants: Sequence[Variant], column: str,
            addresses: Mapping[str, str], measure: Measure | None = None,
            note: str = "") -> dict[str, Any]:
    """Each server kind in each variant that sets it up, on a fresh server, measured (by
    default: 1:1 messages with the variant's op); then one table, a row per server and
    variant. Returns the results by kind, then by variant label."""
    how = measure or _messages_of

    def run(kind: str, params: Params, fleet: Fleet) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for variant in variants:
            make = variant.servers.get(kind)
            if make is None:
                continue

            def measured(peer: Peer, target: loadgen.Target,
                         variant: Variant = variant) -> dict[str, Any]:
                return how(variant, params, peer, fleet, target)
            out[variant.label] = on_fresh_server(make(addresses[kind], 5222),
                                                 params.general_accounts, measured)
        return out

    results = run_each(kinds, p, run)
    header(p, column, note)
    for kind, out in results.items():
        if isinstance(out, str):
            row(kind, "", out)
            continue
        for label, got in out.items():
            row(kind, label, got)
    return results


def _messages_of(variant: Variant, p: Params, peer: Peer, fleet: Fleet,
                 target: loadgen.Target) -> dict[str, Any]:
    return messages(variant.op, p, peer, fleet, target)


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


@dataclass
class FanoutParams:
    """What the fan-out runners (bench/pep_notify.py, bench/muc_fanout.py) share."""

    window: int = 16        # in flight: publications per process, messages per room
    warmup: float = 2.0     # seconds not counted
    duration: float = 8.0   # seconds measured
    procs: int = 1          # generator processes


def parse_params(doc: str, params: type[_D], quick: _D, servers: str,
                 argv: list[str] | None) -> tuple[_D, list[str], argparse.ArgumentParser]:
    """(parameters, server kinds, the parser) from a command line whose options are the
    fields of the dataclass params (--quick: start from quick instead of the defaults)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--servers", default=servers)
    defaults = params()
    for f in fields(defaults):  # type: ignore[arg-type]
        ap.add_argument(f"--{f.name}", type=type(getattr(defaults, f.name)), default=None)
    args = ap.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(defaults)  # type: ignore[arg-type]
             if getattr(args, f.name) is not None}
    return (replace(quick if args.quick else defaults, **given),  # type: ignore[type-var]
            args.servers.split(","), ap)


class _Runnable(Protocol):
    procs: int  # generator processes


_P = TypeVar("_P", bound=_Runnable)


def run_each(kinds: list[str], p: _P, run: Callable[[str, _P, Fleet], Any]) -> dict[str, Any]:
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


Column = tuple[str, int, Callable[[dict[str, Any]], str]]  # header, width, cell of a result


def rates(delivered: int, window: Window) -> dict[str, float]:
    """Per second and per server CPU-second over a measured window, and the cores used."""
    return {"per_s": delivered / window.seconds,
            "per_cpu_s": delivered / max(window.server_cpu, 1e-9),
            "cores": window.server_cpu / window.seconds,
            "generator_cores": window.generator_cpu / window.seconds}


def rate_columns(noun: str) -> list[Column]:
    """The columns of rates(): noun/s, noun per server CPU-s, cores server/generator."""
    return [(f"{noun}/s", len(noun) + 6, lambda g: f"{g['per_s']:,.0f}"),
            (f"{noun} per server CPU-s", len(noun) + 19, lambda g: f"{g['per_cpu_s']:,.0f}"),
            ("cores server/gen", 17, lambda g: f"{g['cores']:.2f} / {g['generator_cores']:.2f}")]


def run_table(kinds: list[str], p: _P, run: Callable[[str, _P, Fleet], Any],
              title: str, columns: Sequence[Column], note: str) -> None:
    """run_each, then a table: the title (and the load average before and after, since the
    machine may be shared), one row per server, the note."""
    load = os.getloadavg()[0]
    results = run_each(kinds, p, run)
    print(f"{title} (load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)")
    print("  " + " ".join([f"{'server':10s}", *(f"{h:>{w}s}" for h, w, _ in columns)]))
    for kind, got in results.items():
        cells = [got] if isinstance(got, str) else [f"{cell(got):>{w}s}"
                                                    for _, w, cell in columns]
        print("  " + " ".join([f"{kind:10s}", *cells]))
    print(f"  {note}")


def header(p: Params, column: str, note: str = "") -> None:
    print(f"1:1 messages, {p.pairs} pairs x {p.window} in flight, {p.duration:g} s measured"
          + (f" ({note})" if note else ""))
    print(f"  {'server':10s} {column:10s} {'msg/s':>9s} {'msg per server CPU-s':>21s}")


def row(kind: str, label: str, got: dict[str, Any] | str) -> None:
    if isinstance(got, str):
        print(f"  {kind:10s} {label:10s} {got}")
    else:
        print(f"  {kind:10s} {label:10s} {got['msgs_per_s']:9,.0f} {got['per_cpu_s']:21,.0f}")

"""What the per-feature runners (bench/mam_messages.py, sm_messages.py, ws_messages.py) share:
their command line, the 1:1 messages parameters, and one run per server with its failures
reported in the table instead of ending the run."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol, TypeVar

from bench.peers import raise_nofile_limit
from bench.run import Fleet, Params, Window

_D = TypeVar("_D")


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

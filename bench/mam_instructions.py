"""The cost of archiving in instructions (issue 25 item 1), which a loaded machine does not
distort the way it does wall-clock or CPU-second figures: bench/run.py's 1:1 messages scenario
against presenced run under Valgrind's callgrind, with `[mam] default = "never"` and
`"always"`, each on a fresh server. Instrumentation is switched on at the end of the warm-up
(`callgrind_control -i on`) and the counters dumped once the server is idle after the window
(the archive writes of the window done), so the figure is the server process's instructions
(every thread: the event loop and the SQLite worker) per message delivered in the window. On
PostgreSQL the database's own processes are not counted (their CPU seconds are printed beside
it).

    python -m bench.mam_instructions [--storage sqlite,postgresql] [--pairs 10]
                                     [--window 8] [--warmup 5] [--duration 20]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.peers import PresencedPeer, cpu_seconds, raise_nofile_limit
from bench.pg import PostgresPresencedPeer
from bench.run import ADDRESSES, DOMAIN, PASSWORD, Fleet, Params, pairs, prepare_accounts

_SUMMARY = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.M)


def _wrapper(directory: Path) -> Path:
    """An executable that runs Python under callgrind, instrumentation off until asked."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed (Debian: valgrind)")
    script = directory / "python-callgrind"
    script.write_text(
        "#!/bin/sh\n"
        f"exec {valgrind} --tool=callgrind --instr-atstart=no --dump-line=no "
        f"--callgrind-out-file={directory}/callgrind.%p {sys.executable} \"$@\"\n")
    script.chmod(0o755)
    return script


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=600)


def measure(storage: str, archiving: bool, p: Params, fleet: Fleet,
            directory: Path, keep: bool = False) -> dict[str, Any]:
    policy = "always" if archiving else "never"
    options: dict[str, Any] = {"host": ADDRESSES["presenced"], "c2s_port": 5222,
                               "domains": (DOMAIN,), "log_level": "info",
                               "extra_config": f'[mam]\ndefault = "{policy}"\n', "keep": keep}
    peer = (PostgresPresencedPeer(**options) if storage == "postgresql"
            else PresencedPeer(**options))
    target = loadgen.Target(ADDRESSES["presenced"], 5222, DOMAIN, PASSWORD)
    users = p.general_accounts
    prepare_accounts(peer, target, users)
    run_dir = Path(tempfile.mkdtemp(dir=directory))
    peer.python = str(_wrapper(run_dir))
    peer.start(timeout=900)
    if keep:
        print(f"server directory: {peer.workdir}", flush=True)
    try:
        pid = str(peer.pid)
        shards = [dict(pairs=part, window=p.window) if part else None
                  for part in _shard(pairs(users, p.pairs), len(fleet.conns))]
        db0 = _db_cpu(peer)
        window = fleet.run("messages", peer, target, shards, p.warmup, p.duration,
                           on_warm=lambda: _control("-i", "on", pid), setup_timeout=900)
        settled = _settle(peer)
        _control("-d", pid)
        db1 = _db_cpu(peer)
    finally:
        peer.stop(timeout=120)
    dumps = sorted(run_dir.glob("callgrind.*.*"))
    instructions = sum(int(m.group(1)) for d in dumps
                       for m in [_SUMMARY.search(d.read_bytes())] if m)
    delivered = sum(r["delivered"] for r in window.results)
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"delivered": delivered, "instructions": instructions,
            "per_message": instructions / max(delivered, 1),
            "db_cpu_s": db1 - db0, "settle_s": settled}


def _settle(peer: PresencedPeer, quiet: float = 0.05, timeout: float = 900.0) -> float:
    """Wait until the server is idle (less than `quiet` CPU seconds in one second, twice in
    a row): the archive writes of the window are then counted too. Under Valgrind they hardly
    progress while the load runs (counted in the database file: 2 rows in 20 s of load, all
    the rest after it; the SQLite worker thread seldom gets the GIL back, and each statement's
    answer waits for a turn of the busy event loop), so without this the figure left SQLite
    out. They then run in batches of a thousand, cheaper per row than under a real load.
    Seconds waited."""
    began = time.monotonic()
    last, calm = peer.cpu_seconds(), 0
    while calm < 2 and time.monotonic() - began < timeout:
        time.sleep(1.0)
        now = peer.cpu_seconds()
        calm = calm + 1 if now - last < quiet else 0
        last = now
    return time.monotonic() - began


def _shard(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i::n] for i in range(n)]


def _db_cpu(peer: PresencedPeer) -> float:
    cluster = getattr(peer, "cluster", None)
    if cluster is None:
        return 0.0
    return cpu_seconds(cluster.pids())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--storage", default="sqlite")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--policies", default="never,always")
    ap.add_argument("--keep", metavar="DIR", help="keep the callgrind dumps here "
                    "(for callgrind_annotate)")
    args = ap.parse_args(argv)
    raise_nofile_limit()
    p = replace(Params.quick(), pairs=args.pairs, window=args.window, warmup=args.warmup,
                duration=args.duration, procs=1)
    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mam-instr-"))
    directory.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(p.procs)
    rows = []
    try:
        for storage in args.storage.split(","):
            for policy in args.policies.split(","):
                archiving = policy == "always"
                got = measure(storage, archiving, p, fleet, directory, bool(args.keep))
                rows.append((storage, "always" if archiving else "never", got))
                print(f"{storage:10} {rows[-1][1]:7} {got['delivered']:7d} msgs "
                      f"{got['per_message'] / 1000:9.1f} k instructions/msg "
                      f"(settled {got['settle_s']:.0f} s)"
                      + (f"  (PostgreSQL CPU {got['db_cpu_s']:.2f} s)" if got["db_cpu_s"]
                         else ""), flush=True)
    finally:
        fleet.close()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    by = {(s, a): g["per_message"] for s, a, g in rows}
    for storage in args.storage.split(","):
        off, on = by.get((storage, "never")), by.get((storage, "always"))
        if off and on:
            print(f"{storage}: archiving on costs {on / off:.2f}x; on/off throughput "
                  f"{off / on:.0%} (target >= 70%)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

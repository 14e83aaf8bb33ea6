"""The cost of PEP fan-out in instructions (issue 25 item 2), which a loaded machine does not
distort the way it does CPU seconds: bench/pep_notify.py's scenario (users publishing a tune in
turn to contacts that asked for +notify) against presenced run under Valgrind's callgrind, as
bench/mam_instructions.py does for 1:1 messages. Instrumentation is switched on at the end of
the warm-up and the counters dumped at the end of the window: the server process's
instructions (every thread: the event loop and the SQLite worker) per publication and per
notification delivered.

    python -m bench.pep_instructions [--users 40] [--contacts 10] [--window 8]
                                     [--warmup 5] [--duration 10] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.feature import FANOUT_ADDRESSES
from bench.mam_instructions import _SUMMARY, _control, _wrapper
from bench.peers import PresencedPeer, raise_nofile_limit
from bench.pep_notify import PepParams
from bench.run import DOMAIN, NO_ARCHIVE, PASSWORD, Fleet, prepare_accounts, split


def measure(p: PepParams, fleet: Fleet, directory: Path, keep: bool = False) -> dict[str, Any]:
    users = p.accounts
    peer = PresencedPeer(host=FANOUT_ADDRESSES["presenced"], c2s_port=5222, domains=(DOMAIN,),
                         extra_config=NO_ARCHIVE)
    target = loadgen.Target(peer.host, 5222, DOMAIN, PASSWORD)
    prepare_accounts(peer, target, users)
    peer.start()
    try:
        prepare_accounts(peer, target, users)
        asyncio.run(loadgen.make_rosters(target, users, p.contacts))
        run_dir = Path(tempfile.mkdtemp(dir=directory))
        peer.python = str(_wrapper(run_dir))
        peer.restart(timeout=900)  # under callgrind, nothing in memory from the rosters
        pid = str(peer.pid)
        window = fleet.run("pep", peer, target, split(fleet, "users", users, window=p.window),
                           p.warmup, p.duration, on_warm=lambda: _control("-i", "on", pid),
                           setup_timeout=900)
        _control("-d", pid)
    finally:
        peer.stop(timeout=120)
    instructions = sum(int(m.group(1)) for d in sorted(run_dir.glob("callgrind.*.*"))
                       for m in [_SUMMARY.search(d.read_bytes())] if m)
    if keep:
        print(f"callgrind dumps: {run_dir}", flush=True)
    got = {k: sum(r[k] for r in window.results) for k in ("delivered", "published", "errors")}
    return dict(got, instructions=instructions,
                per_publish=instructions / max(got["published"], 1),
                per_notification=instructions / max(got["delivered"], 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--contacts", type=int, default=10)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--keep", metavar="DIR", help="keep the callgrind dumps here "
                    "(for callgrind_annotate)")
    args = ap.parse_args(argv)
    if args.contacts % 2 or args.contacts >= args.users:
        ap.error("--contacts must be even and smaller than --users")
    raise_nofile_limit()
    p = PepParams(users=args.users, contacts=args.contacts, window=args.window,
                  warmup=args.warmup, duration=args.duration, procs=1)
    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pep-instr-"))
    directory.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(p.procs)
    try:
        got = measure(p, fleet, directory, bool(args.keep))
    finally:
        fleet.close()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    print(f"{got['published']:6d} publications {got['delivered']:7d} notifications "
          f"{got['errors']} refused: {got['per_publish'] / 1000:9.1f} k instructions/publication, "
          f"{got['per_notification'] / 1000:7.1f} k/notification", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

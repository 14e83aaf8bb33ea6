"""python -m tests.fuzz --minutes N [--seed S] [--only family,...]: a long fuzzing run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
import time

from tests.fuzz.runner import FAMILIES, run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: fresh)")
    parser.add_argument("--only", default=",".join(FAMILIES),
                        help=f"families, comma-separated: {','.join(FAMILIES)}")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else secrets.randbelow(1 << 32)
    only = tuple(f for f in args.only.split(",") if f)
    unknown = [f for f in only if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families: {', '.join(unknown)}")
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    print(f"fuzz seed: {seed} (replay: python -m tests.fuzz --seed {seed} "
          f"--minutes {args.minutes:g})", flush=True)
    started = time.monotonic()
    report = asyncio.run(run(args.minutes * 60, seed, only))
    print(f"ran {time.monotonic() - started:.0f} s")
    print(report.summary())
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the fuzzer families within a time budget; the CLI and tests/test_fuzz.py use this."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from tests.fuzz import harvest, pure, stanzas, transports
from tests.fuzz.core import Budget, Report

# Shares of the time budget.
SHARES = {"parser": 0.08, "negotiation": 0.08, "stanzas": 0.44, "tcp": 0.1, "bosh": 0.18,
          "websocket": 0.12}
FAMILIES = tuple(SHARES)


def rng_for(seed: int, family: str) -> random.Random:
    """Each family its own stream of choices: a seed replays a family whatever the others do."""
    return random.Random(f"{seed}:{family}")


async def run(seconds: float, seed: int, only: tuple[str, ...] = FAMILIES,
              tmp: Path | None = None, report: Report | None = None) -> Report:
    report = report or Report()
    harvest.corpus()  # read the suite's stanzas and elements once, before the clocks start
    total = sum(SHARES[f] for f in only)
    budget = {f: Budget(seconds * SHARES[f] / total) for f in only}
    if "parser" in only:
        pure.fuzz_parser(rng_for(seed, "parser"), budget["parser"], report)
    if "negotiation" in only:
        pure.fuzz_negotiation(rng_for(seed, "negotiation"), budget["negotiation"], report)
    with tempfile.TemporaryDirectory() if tmp is None else _keep(tmp) as where:
        base = Path(where)
        if "stanzas" in only:
            await stanzas.fuzz_stanzas(rng_for(seed, "stanzas"), budget["stanzas"], report,
                                       base / "stanzas")
        wanted = {f: budget[f] for f in ("tcp", "bosh", "websocket") if f in only}
        if wanted:
            await transports.fuzz_transports(rng_for(seed, "transports"), wanted, report,
                                             base / "transports")
    return report


class _keep:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        pass

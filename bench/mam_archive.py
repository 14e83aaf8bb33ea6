"""How fast a page in the middle of a big archive comes back (issue 12), on SQLite and
PostgreSQL: one account with `--messages` archived messages (default 100,000) spread over
`--contacts` conversations, written straight through the ArchiveStore in batches; then pages
of 50 in the middle of one conversation by `with` + `start` (forward), and by `with` + RSM
`<before>` an id in the middle (backward), each with the total count as MAM answers it.

    python -m bench.mam_archive [--messages 100000] [--backends sqlite,postgresql]

Prints per backend: insert rate, and the median / 95th percentile milliseconds per page.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from server.config import default_config
from server.storage import CORE_STORES, Storage, open_storage
from server.storage import archive as archive_store
from server.storage.archive import ArchiveEntry, ArchiveQuery, ArchiveStore
from server.stream.scram import derive_credentials

OWNER = "alice@a.test"
_STANZA = (b"<message xmlns='jabber:client' from='alice@a.test/phone' to='%s' type='chat' "
           b"id='%d'><body>message number %d, a line of ordinary chat text</body>"
           b"<origin-id xmlns='urn:xmpp:sid:0' id='%d'/></message>")


async def fill(storage: Storage, messages: int, contacts: int) -> tuple[float, int]:
    """Seconds taken, and the timestamp of the first message."""
    store: ArchiveStore = storage.archive  # type: ignore[attr-defined]
    t0 = 1_700_000_000_000_000
    started = time.perf_counter()
    batch: list[ArchiveEntry] = []
    for n in range(messages):
        contact = f"contact{n % contacts}@b.test"
        batch.append(ArchiveEntry(OWNER, contact, "phone", n % 2 == 0, t0 + n * 1_000_000,
                                  _STANZA % (contact.encode(), n, n, n)))
        if len(batch) == 1000:
            await store.append(batch)
            batch = []
    if batch:
        await store.append(batch)
    return time.perf_counter() - started, t0


async def measure(storage: Storage, messages: int, contacts: int, t0: int,
                  rounds: int) -> dict[str, list[float]]:
    store: ArchiveStore = storage.archive  # type: ignore[attr-defined]
    contact = f"contact{contacts // 2}@b.test"
    middle = t0 + (messages // 2) * 1_000_000
    # An id in the middle of that conversation, for the backward page.
    probe = await store.query(OWNER, ArchiveQuery(with_bare=contact, start=middle, max=1,
                                                  count=False))
    middle_id = probe.items[0].id
    timings: dict[str, list[float]] = {"forward": [], "backward": [], "forward_nocount": []}
    for _ in range(rounds):
        for name, q in (
                ("forward", ArchiveQuery(with_bare=contact, start=middle, max=50)),
                ("backward", ArchiveQuery(with_bare=contact, before=middle_id, max=50)),
                ("forward_nocount", ArchiveQuery(with_bare=contact, start=middle, max=50,
                                                 count=False))):
            started = time.perf_counter()
            page = await store.query(OWNER, q)
            timings[name].append((time.perf_counter() - started) * 1000)
            assert len(page.items) == 50, name
    return timings


async def run_backend(backend: str, messages: int, contacts: int, rounds: int,
                      dsn: str | None, tmp: Path) -> None:
    config = dataclasses.replace(default_config().storage, backend=backend,
                                 path=tmp / f"{backend}.sqlite", dsn=dsn)
    storage = await open_storage(config, (*CORE_STORES, archive_store.SPEC))
    try:
        await storage.accounts.create("alice", "a.test", derive_credentials("x"))
        seconds, t0 = await fill(storage, messages, contacts)
        print(f"{backend}: {messages} messages inserted in {seconds:.1f} s "
              f"({messages / seconds:,.0f}/s in batches of 1000)")
        report("right after the inserts", await measure(storage, messages, contacts, t0,
                                                         rounds))
        # What autovacuum (PostgreSQL) or a periodic ANALYZE leaves: planner statistics and,
        # on PostgreSQL, a visibility map for index-only counts.
        await storage.db.execute("VACUUM ANALYZE archive_messages" if backend == "postgresql"
                                 else "ANALYZE")
        report("after VACUUM ANALYZE" if backend == "postgresql" else "after ANALYZE",
               await measure(storage, messages, contacts, t0, rounds))
    finally:
        await storage.close()


def report(title: str, timings: dict[str, list[float]]) -> None:
    print(f"  {title}:")
    for name, values in timings.items():
        values.sort()
        p95 = values[int(len(values) * 0.95) - 1]
        print(f"    page of 50 in the middle, {name:16s} median "
              f"{statistics.median(values):6.2f} ms   p95 {p95:6.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--contacts", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--backends", default="sqlite,postgresql")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="presenced-mam-bench-") as tmp:
        for backend in args.backends.split(","):
            cluster = None
            dsn = None
            if backend == "postgresql":
                from bench.pgcluster import PostgresCluster
                cluster = PostgresCluster().start()
                dsn = cluster.dsn(cluster.create_database())
            try:
                asyncio.run(run_backend(backend, args.messages, args.contacts, args.rounds,
                                        dsn, Path(tmp)))
            finally:
                if cluster is not None:
                    cluster.stop()


if __name__ == "__main__":
    main()

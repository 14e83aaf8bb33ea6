"""``presenced storage copy``: every row of every store from one database into another, empty
one (SQLite to PostgreSQL and back), in one transaction on the target.

Both sides are opened with the same store specs, hence migrated to the same schema versions;
tables are copied in the specs' order (accounts first), so foreign keys hold at every row.
Rows keep their keys and ids (offline message order survives).
"""

from __future__ import annotations

from collections.abc import Callable

from server.storage import Storage, StorageError
from server.storage.db import Database

BATCH = 500

# (table, rows copied so far in it, its rows, rows copied in all, rows in all)
Progress = Callable[[str, int, int, int, int], None]


async def count(db: Database, table: str) -> int:
    row = await db.fetchrow(f'SELECT count(*) FROM "{table}"')
    return int(row[0]) if row else 0


async def copy(source: Storage, target: Storage, progress: Progress) -> dict[str, int]:
    """Rows copied per table. StorageError when the target is not empty (nothing is written)
    or the two schemas differ."""
    if [s.name for s in source.specs] != [s.name for s in target.specs]:
        raise StorageError("source and target were opened with different stores")
    tables = [table for spec in source.specs for table in spec.tables]
    for table in tables:
        present = await count(target.db, table)
        if present:
            raise StorageError(f"the target is not empty: table {table} has {present} row(s); "
                               "storage copy only fills an empty database")
    totals = {table: await count(source.db, table) for table in tables}
    grand_total, done = sum(totals.values()), 0
    copied: dict[str, int] = {}
    async with target.db.transaction() as tx:
        for table in tables:
            columns = [name for name, _type in await source.db.columns(table)]
            theirs = [name for name, _type in await target.db.columns(table)]
            if sorted(columns) != sorted(theirs):
                raise StorageError(f"table {table} differs: {', '.join(columns)} in the source, "
                                   f"{', '.join(theirs)} in the target")
            names = ", ".join(f'"{c}"' for c in columns)
            rows = await source.db.fetch(f'SELECT {names} FROM "{table}"')
            rows = await target.db.adapt(table, columns, rows)
            insert = (f'INSERT INTO "{table}" ({names}) '
                      f"VALUES ({', '.join('?' for _ in columns)})")
            progress(table, 0, totals[table], done, grand_total)
            for start in range(0, len(rows), BATCH):
                batch = rows[start:start + BATCH]
                await tx.executemany(insert, batch)
                done += len(batch)
                progress(table, start + len(batch), totals[table], done, grand_total)
            copied[table] = len(rows)
        await tx.after_copy(tables)
    return copied

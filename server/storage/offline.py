"""SQLite OfflineStore: messages kept for accounts with no available resource (XEP-0160).

Every call is one SQL statement, hence one transaction of its own on the shared autocommit
connection: a message is committed when store() returns (it survives a process kill).
"""

from __future__ import annotations

from server.storage.store import SQLiteStore

# Appended to sqlite.MIGRATIONS. AUTOINCREMENT: ids never go back, so a message stored while
# another batch is being delivered always sorts after it and survives its deletion.
MIGRATION = [
    """CREATE TABLE offline_messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        domain TEXT NOT NULL,
        localpart TEXT NOT NULL,
        stanza BLOB NOT NULL,
        FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
            ON DELETE CASCADE
    )""",
    "CREATE INDEX offline_messages_owner ON offline_messages (domain, localpart, id)",
]


class SQLiteOfflineStore(SQLiteStore):
    """OfflineStore. Writes hold the storage's write lock (see store.py)."""

    async def store(self, user: str, domain: str, stanza: bytes, max_messages: int) -> bool:
        # The quota check and the insert are one statement, so concurrent senders cannot
        # overshoot it.
        async with self._lock, self._db.execute(
                "INSERT INTO offline_messages (domain, localpart, stanza) "
                "SELECT ?, ?, ? WHERE (SELECT count(*) FROM offline_messages "
                "WHERE domain = ? AND localpart = ?) < ?",
                (domain, user, stanza, domain, user, max_messages)) as cursor:
            return cursor.rowcount == 1

    async def load(self, user: str, domain: str) -> list[tuple[int, bytes]]:
        rows = await self._db.execute_fetchall(
            "SELECT id, stanza FROM offline_messages WHERE domain = ? AND localpart = ? "
            "ORDER BY id", (domain, user))
        return [(row[0], row[1]) for row in rows]

    async def delete(self, user: str, domain: str, up_to: int) -> None:
        async with self._lock:
            await self._db.execute(
                "DELETE FROM offline_messages WHERE domain = ? AND localpart = ? AND id <= ?",
                (domain, user, up_to))

    async def count(self, user: str, domain: str) -> int:
        rows = await self._db.execute_fetchall(
            "SELECT count(*) FROM offline_messages WHERE domain = ? AND localpart = ?",
            (domain, user))
        return int(next(iter(rows))[0])

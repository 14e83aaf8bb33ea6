"""UploadStore on either backend: the metadata of XEP-0363 uploads (the files themselves are
under [upload] path, named by slot id). A row is made when a slot is handed out, claimed by the
one PUT that may use it, and goes with its account (ON DELETE CASCADE); the upload module then
deletes files that have no row any more."""

from __future__ import annotations

from dataclasses import dataclass

from server.storage import StoreSpec
from server.storage.store import Store

_TABLE = """CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    localpart TEXT NOT NULL,
    filename TEXT NOT NULL,
    size BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    created BIGINT NOT NULL,
    claimed BIGINT,
    stored BIGINT,
    FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart) ON DELETE CASCADE
)"""
_INDEXES = ["CREATE INDEX uploads_owner ON uploads (domain, localpart)",
            "CREATE INDEX uploads_created ON uploads (created)"]

MIGRATIONS = {
    "sqlite": [[_TABLE, *_INDEXES]],
    "postgresql": [[_TABLE, *_INDEXES]],
}


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    user: str
    domain: str
    filename: str
    size: int
    content_type: str      # "" when the slot request named none (served as octet-stream)
    created: int           # unix time the slot was handed out
    claimed: int | None    # a PUT began
    stored: int | None     # the whole file is on disk


_COLUMNS = "id, localpart, domain, filename, size, content_type, created, claimed, stored"
_USAGE = "SELECT coalesce(sum(size), 0) FROM uploads WHERE domain = ? AND localpart = ?"


class UploadStoreSQL(Store):
    async def create(self, upload: Upload, quota: int) -> bool:
        """Record a slot unless the owner's uploads (handed out or stored) would then exceed
        quota bytes; NoSuchAccount for a vanished owner."""
        return await self._write(
            upload.user, upload.domain,
            # The casts: PostgreSQL cannot infer the types of parameters in a SELECT list.
            f"INSERT INTO uploads ({_COLUMNS}) SELECT ?, ?, ?, ?, CAST(? AS BIGINT), ?, "
            "CAST(? AS BIGINT), NULL, NULL "
            f"WHERE ({_USAGE}) + CAST(? AS BIGINT) <= CAST(? AS BIGINT)",
            upload.id, upload.user, upload.domain, upload.filename, upload.size,
            upload.content_type, upload.created, upload.domain, upload.user, upload.size,
            quota) == 1

    async def get(self, upload_id: str) -> Upload | None:
        row = await self._first(f"SELECT {_COLUMNS} FROM uploads WHERE id = ?", upload_id)
        if row is None:
            return None
        return Upload(str(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4]),
                      str(row[5]), int(row[6]), _int(row[7]), _int(row[8]))

    async def claim(self, upload_id: str, now: int) -> bool:
        """The one PUT of a slot begins: True once, False for every later attempt."""
        return await self._db.execute(
            "UPDATE uploads SET claimed = ? WHERE id = ? AND claimed IS NULL",
            now, upload_id) == 1

    async def release(self, upload_id: str) -> None:
        """A PUT failed (too large, cut off, a write error): the slot may be used again, until
        it expires (XEP-0363: a slot is spent by the upload that succeeds)."""
        await self._db.execute(
            "UPDATE uploads SET claimed = NULL WHERE id = ? AND stored IS NULL", upload_id)

    async def stored(self, upload_id: str, now: int) -> None:
        await self._db.execute("UPDATE uploads SET stored = ? WHERE id = ?", now, upload_id)

    async def delete(self, upload_id: str) -> None:
        await self._db.execute("DELETE FROM uploads WHERE id = ?", upload_id)

    async def usage(self, user: str, domain: str) -> int:
        row = await self._first(_USAGE, domain, user)
        return int(row[0]) if row is not None else 0

    async def expired(self, stored_before: int, unused_before: int) -> list[str]:
        """Files stored before the first time, and slots handed out before the second that
        never got their whole file."""
        rows = await self._db.fetch(
            "SELECT id FROM uploads WHERE (stored IS NOT NULL AND stored < ?) "
            "OR (stored IS NULL AND created < ?)", stored_before, unused_before)
        return [str(row[0]) for row in rows]

    async def existing(self, upload_ids: list[str]) -> set[str]:
        """Which of these ids have a row."""
        found: set[str] = set()
        for start in range(0, len(upload_ids), 500):
            chunk = upload_ids[start:start + 500]
            marks = ", ".join("?" for _ in chunk)
            rows = await self._db.fetch(f"SELECT id FROM uploads WHERE id IN ({marks})", *chunk)
            found.update(str(row[0]) for row in rows)
        return found


def _int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


SPEC: StoreSpec = StoreSpec(name="uploads", sqlite=UploadStoreSQL, postgresql=UploadStoreSQL,
                            migrations=MIGRATIONS, tables=("uploads",))

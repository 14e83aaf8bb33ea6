"""InviteStore on either backend: invitations (XEP-0401) by their secret token.

An invitation is for one of our domains; it has an inviter (an account of that domain, whose
roster gets the new account, XEP-0379) or none (made by the operator), a number of uses left,
an expiry time, the roster group the two put each other in, and whether the new account is
meant as an admin. Using one is one statement (`consume`), so two registrations racing for the
last use cannot both win. An invitation goes with its inviter's account (ON DELETE CASCADE);
one without an inviter has no account to go with (NULL does not match the foreign key).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.storage import StoreSpec
from server.storage.store import Store

_TABLE = """CREATE TABLE invitations (
    token TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    inviter TEXT,
    uses_left INTEGER NOT NULL,
    created BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    roster_group TEXT,
    admin {bool} NOT NULL DEFAULT {false},
    FOREIGN KEY (domain, inviter) REFERENCES accounts (domain, localpart) ON DELETE CASCADE
)"""
_INDEXES = ["CREATE INDEX invitations_expires ON invitations (expires)",
            "CREATE INDEX invitations_inviter ON invitations (domain, inviter)"]

MIGRATIONS = {
    "sqlite": [[_TABLE.format(bool="INTEGER", false="0"), *_INDEXES]],        # 1
    "postgresql": [[_TABLE.format(bool="BOOLEAN", false="false"), *_INDEXES]],  # 1
}


@dataclass(frozen=True, slots=True)
class Invitation:
    token: str
    domain: str
    inviter: str | None      # localpart of the inviting account, or None (the operator's)
    uses_left: int
    created: int             # unix times
    expires: int
    group: str | None = None  # roster group of the inviter and the new account
    admin: bool = False

    def usable(self, now: float) -> bool:
        return self.uses_left > 0 and now < self.expires


_COLUMNS = "token, domain, inviter, uses_left, created, expires, roster_group, admin"


def _invitation(row: tuple[object, ...]) -> Invitation:
    return Invitation(str(row[0]), str(row[1]), None if row[2] is None else str(row[2]),
                      int(row[3]), int(row[4]), int(row[5]),  # type: ignore[call-overload]
                      None if row[6] is None else str(row[6]), bool(row[7]))


class InviteStoreSQL(Store):
    """InviteStore (the SQL is the same on both backends)."""

    async def create(self, invitation: Invitation) -> None:
        """NoSuchAccount when the inviter's account is gone."""
        i = invitation
        await self._write(
            i.inviter or "", i.domain,
            f"INSERT INTO invitations ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            i.token, i.domain, i.inviter, i.uses_left, i.created, i.expires, i.group, i.admin)

    async def get(self, token: str) -> Invitation | None:
        row = await self._first(f"SELECT {_COLUMNS} FROM invitations WHERE token = ?", token)
        return None if row is None else _invitation(tuple(row))

    async def consume(self, token: str, domain: str, now: int) -> Invitation | None:
        """Use the invitation once if it is for this domain, unexpired and has a use left:
        the invitation as it was, or None (one statement: racing users cannot both win)."""
        found = await self.get(token)
        if found is None or found.domain != domain:
            return None
        taken = await self._db.execute(
            "UPDATE invitations SET uses_left = uses_left - 1 "
            "WHERE token = ? AND uses_left > 0 AND expires > ?", token, now)
        return found if taken == 1 else None

    async def refund(self, token: str) -> None:
        """Give back a use taken by a registration that then failed."""
        await self._db.execute(
            "UPDATE invitations SET uses_left = uses_left + 1 WHERE token = ?", token)

    async def delete(self, token: str) -> bool:
        return await self._db.execute("DELETE FROM invitations WHERE token = ?", token) == 1

    async def list(self, domain: str) -> list[Invitation]:
        """Every invitation of the domain, oldest first."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM invitations WHERE domain = ? ORDER BY created, token",
            domain)
        return [_invitation(tuple(row)) for row in rows]

    async def purge(self, now: int) -> int:
        """Delete expired and used-up invitations; how many went."""
        return await self._db.execute(
            "DELETE FROM invitations WHERE expires <= ? OR uses_left <= 0", now)


SPEC: StoreSpec = StoreSpec(name="invites", sqlite=InviteStoreSQL, postgresql=InviteStoreSQL,
                            migrations=MIGRATIONS, tables=("invitations",))

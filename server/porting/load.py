"""XEP-0227 accounts into the stores (import) and out of them (export), through the stores'
Protocols only, so on SQLite and PostgreSQL alike.

Import is idempotent: each piece (account, roster item, vCard, private item, PEP node and item,
offline message, archived message) is compared with what is stored and written only when it
differs or is missing; a second import of the same file writes nothing and counts everything as
unchanged. An account that exists already keeps its password (its keys are never replaced: the
user may have changed it here since), and the rest of its data is merged.

Run it with the server stopped (as `storage copy`): a running server caches PEP nodes and
archive preferences, and would not see what was written under it until restarted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from server.modules.pubsub import engine
from server.modules.vcard import photo_hash
from server.porting.pie import Account, ArchivedItem, PepNode, user_element, write_user_file
from server.storage import Storage
from server.storage.archive import ArchiveEntry, ArchiveQuery
from server.storage.base import Credentials, NoSuchAccount
from server.stream.scram import derive_credentials
from server.xml.stanza import StanzaError

# What the counters are called in the report, in its order.
KINDS = ("accounts", "roster items", "vCards", "private XML items", "PEP nodes", "PEP items",
         "offline messages", "archived messages")
PAGE = 500
OFFLINE_LIMIT = 1 << 30  # the import is not held to the delivery quota ([offline])
ExportProgress = Callable[[str, int, int], None]  # (domain, accounts written, its accounts)


@dataclass
class Report:
    added: Counter[str] = field(default_factory=Counter)
    unchanged: Counter[str] = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    def skip(self, where: str, why: str) -> None:
        self.skipped.append((where, why))

    def lines(self) -> list[str]:
        def listing(counts: Counter[str]) -> str:
            shown = [f"{counts[k]} {k}" for k in KINDS if counts[k]]
            return ", ".join(shown) if shown else "nothing"

        out = [f"imported: {listing(self.added)}",
               f"already there (unchanged): {listing(self.unchanged)}"]
        if self.skipped:
            out.append(f"skipped: {len(self.skipped)}")
            out += [f"  {where}: {why}" for where, why in self.skipped]
        else:
            out.append("skipped: nothing")
        return out


@dataclass(frozen=True)
class Target:
    domains: tuple[str, ...]   # the server's own domains; accounts elsewhere are skipped
    iterations: int            # SCRAM iterations for keys derived from a plain-text password
    pep_max_items: int         # [pep] max_items: a node keeps at most this many items


async def import_account(storage: Storage, account: Account, target: Target,
                         report: Report) -> None:
    """One account and everything it owns (see the module docstring)."""
    where = account.jid
    if account.error is not None:
        report.skip(where, account.error)
        return
    if account.domain not in target.domains:
        report.skip(where, f"{account.domain} is not a domain of this server (it serves "
                           f"{', '.join(target.domains)})")
        return
    credentials = account.credentials
    if credentials is None and account.password is not None:
        try:
            credentials = derive_credentials(account.password, target.iterations)
        except ValueError as exc:
            report.skip(where, f"unusable password ({exc}); account not imported")
            return
    assert credentials is not None  # pie: no credentials is an error
    existing = await storage.accounts.get_credentials(account.user, account.domain)
    if existing is None:
        await storage.accounts.create(account.user, account.domain, credentials)
        report.added["accounts"] += 1
    elif _same_password(existing, credentials, account.password):
        report.unchanged["accounts"] += 1
    else:
        report.unchanged["accounts"] += 1
        report.skip(where, "the account exists here with another password: kept that one")
    for why in account.skipped:
        report.skip(where, why)
    try:
        await _roster(storage, account, report)
        await _vcard(storage, account, report)
        await _private(storage, account, report)
        await _pep(storage, account, target, report)
        await _offline(storage, account, report)
        await _archive(storage, account, report)
    except NoSuchAccount:  # deleted while we wrote (a server running after all)
        report.skip(where, "the account was deleted during the import")


def _same_password(existing: Credentials, given: Credentials, password: str | None) -> bool:
    if password is not None:
        from server.stream.scram import verify_password
        keys = existing.sha256 or existing.sha1
        return keys is not None and verify_password(password, keys)
    return all(mine == theirs for mine, theirs in ((existing.sha1, given.sha1),
                                                   (existing.sha256, given.sha256))
               if theirs is not None)


async def _roster(storage: Storage, account: Account, report: Report) -> None:
    if not account.roster:
        return
    _version, items = await storage.rosters.load(account.user, account.domain)
    current = {item.contact: item for item in items}
    for item in account.roster:
        if current.get(item.contact) == item:
            report.unchanged["roster items"] += 1
            continue
        await storage.rosters.put(account.user, account.domain, item)
        report.added["roster items"] += 1


async def _vcard(storage: Storage, account: Account, report: Report) -> None:
    if account.vcard is None:
        return
    if await storage.vcards.get(account.user, account.domain) == account.vcard:
        report.unchanged["vCards"] += 1
        return
    try:
        digest = photo_hash(etree.fromstring(account.vcard))
    except StanzaError as exc:
        report.skip(account.jid, f"vCard photo: {exc.text} (no avatar hash in presence)")
        digest = ""
    await storage.vcards.set(account.user, account.domain, account.vcard, digest)
    report.added["vCards"] += 1


async def _private(storage: Storage, account: Account, report: Report) -> None:
    changed = []
    for namespace, name, xml in account.private:
        if await storage.private.get(account.user, account.domain, namespace, name) == xml:
            report.unchanged["private XML items"] += 1
        else:
            changed.append((namespace, name, xml))
    if changed:
        await storage.private.set(account.user, account.domain, changed)
        report.added["private XML items"] += len(changed)


async def _pep(storage: Storage, account: Account, target: Target, report: Report) -> None:
    if not account.pep:
        return
    pep = storage.pep  # type: ignore[attr-defined]
    nodes = await pep.nodes(account.user, account.domain)
    for name, node in account.pep.items():
        stored = nodes.get(name)
        if stored is None:
            await pep.create_node(account.user, account.domain, name, node.config)
            report.added["PEP nodes"] += 1
        elif engine.node_config(stored) == node.config:
            report.unchanged["PEP nodes"] += 1
        else:
            await pep.set_config(account.user, account.domain, name, node.config)
            report.added["PEP nodes"] += 1
        have = {item.id: item for item in await pep.items(account.user, account.domain, name)}
        limit = engine.max_items(node.config, target.pep_max_items)
        wanted = node.items[-limit:]
        if len(wanted) < len(node.items):
            report.skip(account.jid, f"PEP node {name}: {len(node.items) - len(wanted)} oldest "
                                     f"item(s) over the node's limit of {limit}")
        for item in wanted:
            if have.get(item.id) == item:
                report.unchanged["PEP items"] += 1
                continue
            await pep.publish(account.user, account.domain, name, item, limit)
            report.added["PEP items"] += 1


async def _offline(storage: Storage, account: Account, report: Report) -> None:
    if not account.offline:
        return
    have = Counter(stanza for _id, stanza in
                   await storage.offline.load(account.user, account.domain))
    for stanza in account.offline:
        if have[stanza]:
            have[stanza] -= 1
            report.unchanged["offline messages"] += 1
            continue
        await storage.offline.store(account.user, account.domain, stanza, OFFLINE_LIMIT)
        report.added["offline messages"] += 1


async def archived(storage: Storage, owner: str, start: int | None = None,
                   end: int | None = None) -> AsyncIterator[ArchivedItem]:
    """An owner's archive, oldest first, page by page."""
    archive = storage.archive  # type: ignore[attr-defined]
    after: str | None = None
    while True:
        page = await archive.query(owner, ArchiveQuery(start=start, end=end, after=after,
                                                       max=PAGE, count=False))
        for m in page.items:
            yield ArchivedItem(m.ts, m.with_bare, m.with_resource, m.outgoing,
                               bytes(m.stanza), m.id)
        if page.complete or not page.items:
            return
        after = page.items[-1].id


async def _archive(storage: Storage, account: Account, report: Report) -> None:
    if not account.archive:
        return
    owner = account.jid
    key = _archive_key
    have = Counter([key(m) async for m in archived(
        storage, owner, min(m.ts for m in account.archive), max(m.ts for m in account.archive))])
    new: list[ArchiveEntry] = []
    for m in sorted(account.archive, key=lambda m: m.ts):
        if have[key(m)]:
            have[key(m)] -= 1
            report.unchanged["archived messages"] += 1
            continue
        new.append(ArchiveEntry(owner, m.with_bare, m.with_resource, m.outgoing, m.ts,
                                m.stanza))
    for start in range(0, len(new), PAGE):
        ids = await storage.archive.append(new[start:start + PAGE])  # type: ignore[attr-defined]
        if None in ids:
            raise NoSuchAccount(owner)
    if new:
        report.added["archived messages"] += len(new)


def _archive_key(m: ArchivedItem) -> tuple[int, str, bool, bytes]:
    return (m.ts, m.with_bare, m.outgoing, m.stanza)


# -- export -------------------------------------------------------------------------------------


async def export_account(storage: Storage, user: str, domain: str) -> Account:
    account = Account(user, domain)
    account.credentials = await storage.accounts.get_credentials(user, domain)
    _version, account.roster = await storage.rosters.load(user, domain)
    account.vcard = await storage.vcards.get(user, domain)
    account.private = await storage.private.all(user, domain)
    account.offline = [stanza for _id, stanza in await storage.offline.load(user, domain)]
    pep = storage.pep  # type: ignore[attr-defined]
    for name, config in sorted((await pep.nodes(user, domain)).items()):
        account.pep[name] = PepNode(engine.node_config(config),
                                    await pep.items(user, domain, name))
    account.archive = [m async for m in archived(storage, account.jid)]
    return account


async def export(storage: Storage, domains: Sequence[str], path: Path,
                 progress: ExportProgress | None = None) -> int:
    """Every account of the domains into one XEP-0227 file, or when path is a directory one
    file per account named <user>@<host>.xml (Prosody's layout); the number of accounts.
    Written to a temporary file renamed at the end, so a failed export leaves no half file."""
    if path.is_dir():
        return await _export_each(storage, domains, path, progress)
    partial = path.with_name(path.name + ".partial")
    count = 0
    try:
        with etree.xmlfile(str(partial), encoding="utf-8") as out:
            out.write_declaration()
            with out.element("{urn:xmpp:pie:0}server-data", nsmap={None: "urn:xmpp:pie:0"}):
                for domain in domains:
                    users = await storage.accounts.list(domain)
                    with out.element("{urn:xmpp:pie:0}host", {"jid": domain}):
                        for index, user in enumerate(users, 1):
                            out.write(user_element(await export_account(storage, user, domain)))
                            out.flush()
                            count += 1
                            if progress is not None:
                                progress(domain, index, len(users))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return count



def account_file(directory: Path, user: str, domain: str) -> Path:
    return directory / f"{user}@{domain}.xml"


async def _export_each(storage: Storage, domains: Sequence[str], directory: Path,
                       progress: ExportProgress | None) -> int:
    count = 0
    for domain in domains:
        users = await storage.accounts.list(domain)
        for index, user in enumerate(users, 1):
            target = account_file(directory, user, domain)
            partial = target.with_name(target.name + ".partial")
            try:
                write_user_file(partial, await export_account(storage, user, domain))
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
            count += 1
            if progress is not None:
                progress(domain, index, len(users))
    return count

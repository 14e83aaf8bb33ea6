"""`presenced import` and `presenced export` (registered in server/cli.py).

import PATH… reads XEP-0227 files: a file, or a directory of them (prosody-migrator's xep0227
driver writes one <user>@<host>.xml per account; ejabberdctl export_piefxis an index file that
includes one file per host, whose host files are then read through the index only). Progress
goes to stderr (a bar on a terminal, else a line per file and per tenth of a large file), the
report to stdout; the exit status is 1 when a file could not be read (to its end).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from server.cli import CLIError
from server.config import load_config
from server.porting import load, pie
from server.storage import all_store_specs, open_storage

LARGE = 1 << 20  # files from this size on get progress lines when stderr is not a terminal


def files_of(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".xml" and p.is_file())
            included = {target.resolve() for f in files for target in pie.included_files(f)}
            chosen = [f for f in files if f.resolve() not in included]
            if not chosen:
                raise CLIError(f"{path}: no .xml file in this directory")
            found += chosen
        elif path.is_file():
            found.append(path)
        else:
            raise CLIError(f"{path}: no such file or directory")
    return found


class _Progress:
    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._tenth: dict[Path, int] = {}

    def __call__(self, path: Path, done: int, size: int) -> None:
        fraction = done / size if size else 1.0
        if self.tty:
            now = time.monotonic()
            if done < size and now - self._last < 0.1:
                return
            self._last = now
            print(f"\r[{'#' * int(fraction * 30):<30}] {fraction:4.0%}  {path.name}\033[K",
                  end="", file=sys.stderr, flush=True)
            return
        tenth = int(fraction * 10)
        if size >= LARGE and tenth > self._tenth.get(path, 0) and done < size:
            self._tenth[path] = tenth
            print(f"reading {path}: {tenth * 10}%", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def cmd_import(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    files = files_of(list(args.paths))
    target = load.Target(domains=tuple(config.domains),
                         iterations=config.c2s.scram_iterations,
                         pep_max_items=config.section("pep").max_items)
    report = load.Report()
    progress = _Progress()
    unreadable: list[Path] = []

    async def run() -> None:
        storage = await open_storage(config, all_store_specs())
        try:
            for path in files:
                accounts = 0
                try:
                    for account in pie.read(path, progress):
                        await load.import_account(storage, account, target, report)
                        accounts += 1
                except pie.PieError as exc:
                    unreadable.append(path)
                    report.skip(str(path), f"{exc} (after {accounts} account(s))")
                except OSError as exc:
                    unreadable.append(path)
                    report.skip(str(path), f"cannot read: {exc.strerror}")
                if not progress.tty:
                    print(f"read {path}: {accounts} account(s)", file=sys.stderr, flush=True)
        finally:
            await storage.close()

    try:
        asyncio.run(run())
    finally:
        progress.finish()
    for line in report.lines():
        print(line)
    return 1 if unreadable else 0  # what could be read is imported all the same


def cmd_export(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    domains = list(config.domains)
    if args.domain:
        unknown = [d for d in args.domain if d not in config.domains]
        if unknown:
            raise CLIError(f"{', '.join(unknown)}: not a domain of this server (it serves "
                               f"{', '.join(config.domains)})")
        domains = list(args.domain)
    out: Path = args.file
    if out.is_dir():
        if not args.force:
            async def existing() -> list[Path]:
                storage = await open_storage(config, all_store_specs())
                try:
                    return [load.account_file(out, user, domain) for domain in domains
                            for user in await storage.accounts.list(domain)
                            if load.account_file(out, user, domain).exists()]
                finally:
                    await storage.close()
            there = asyncio.run(existing())
            if there:
                raise CLIError(f"{there[0]} exists (and {len(there) - 1} other(s); --force "
                               "replaces them)")
    elif out.exists() and not args.force:
        raise CLIError(f"{out} exists (--force replaces it)")
    tty = sys.stderr.isatty()

    def progress(domain: str, done: int, total: int) -> None:
        if tty:
            print(f"\r{domain}: {done}/{total} account(s)\033[K", end="", file=sys.stderr,
                  flush=True)
        elif done == total:
            print(f"exported {domain}: {total} account(s)", file=sys.stderr, flush=True)

    async def run() -> int:
        storage = await open_storage(config, all_store_specs())
        try:
            return await load.export(storage, domains, out, progress)
        finally:
            await storage.close()

    try:
        count = asyncio.run(run())
    finally:
        if tty:
            print(file=sys.stderr)
    where = f"{out}/<user>@<host>.xml" if out.is_dir() else str(out)
    print(f"exported {count} account(s) of {', '.join(domains)} to {where}")
    return 0


def add_commands(sub: argparse._SubParsersAction,
                 parents: list[argparse.ArgumentParser]) -> None:
    """The two subcommands, for server/cli.py's parser."""
    p = sub.add_parser(
        "import", parents=parents,
        help="import accounts and their data from XEP-0227 files (Prosody, ejabberd)",
        description="import accounts (with their SCRAM keys: passwords keep working), rosters, "
                    "vCards, private XML, bookmarks, PEP nodes, offline messages and archives "
                    "from XEP-0227 files: prosody-migrator's xep0227 output or ejabberdctl "
                    "export_piefxis's; importing twice changes nothing. Stop the server first.")
    p.set_defaults(run=cmd_import)
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="a XEP-0227 file, or a directory of them")
    p = sub.add_parser(
        "export", parents=parents, help="export every account and its data to a XEP-0227 file",
        description="write every account of this server (or of --domain) with its data to one "
                    "XEP-0227 file that presenced import and Prosody's xep0227 driver read")
    p.set_defaults(run=cmd_export)
    p.add_argument("file", type=Path, metavar="FILE",
                   help="the file to write, or a directory: a file <user>@<host>.xml per "
                        "account in it (Prosody's layout, which prosody-migrator reads)")
    p.add_argument("--domain", action="append", metavar="DOMAIN",
                   help="only this domain (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing FILE")

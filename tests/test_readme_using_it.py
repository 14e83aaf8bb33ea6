"""README's "Using it" commands, run as written, one after the other, as a newcomer copies them
(issue 19 item 4: `adduser` without a config and `serve` with one used two databases, and every
login failed). Every `presenced` command of the section runs as a process in a fresh directory
holding a copy of conf/; each `serve` must report the same absolute data directory and the
accounts added so far, and (when its ports are free, always on CI) let them log in."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

from tests.conftest import on_ci
from tests.process import presenced
from tests.rawclient import RawClient

ROOT = Path(__file__).resolve().parent.parent


def using_it() -> list[list[str]]:
    """The commands of README's "Using it" section (its indented lines), comments removed."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.splitlines():
        if line.startswith("    ") and line.strip():
            commands.append(shlex.split(line, comments=True))
    return commands


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def login(user: str, password: str) -> None:
    client = await RawClient.connect("127.0.0.1", 5222)
    try:
        await client.login("localhost", user, password)
    finally:
        await client.close()


async def serve(args: list[str], cwd: Path, accounts: dict[str, str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *presenced(*args), cwd=cwd, env=env(), stderr=subprocess.PIPE)
    assert proc.stderr is not None
    data_line = ""
    started = False
    try:
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            if not line:
                break
            if "event=data " in line:
                data_line = line
            if "event=started" in line:
                started = True
                break
        found = re.search(r"data_dir=(\S+) database=(\S+) accounts=(\d+)", data_line)
        assert found, data_line
        assert found[1] == str(cwd / "presenced-data")  # the same, absolute, every time
        assert found[2] == str(cwd / "presenced-data" / "presenced.sqlite")
        assert int(found[3]) == len(accounts), (data_line, accounts)
        if not started:
            # Another program holds 5222/5223/5281 on this machine: the data line is what
            # matters most; CI's ports are free.
            assert not on_ci(), "README's serve did not start on CI"
            return
        for user, password in accounts.items():
            await login(user, password)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)


async def test_readme_using_it_as_written(tmp_path: Path, hold_default_ports: None) -> None:
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    commands = using_it()
    assert ["presenced", "adduser", "alice@localhost"] in commands
    accounts: dict[str, str] = {}
    for n, command in enumerate(commands):
        if command[0] == "cp":
            subprocess.run(command, cwd=tmp_path, check=True)
            continue
        assert command[0] == "presenced", command
        args = command[1:]
        if args[0] == "serve":
            await serve(args, tmp_path, accounts)
            continue
        password = f"pw {n}"
        result = subprocess.run(presenced(*args), cwd=tmp_path, env=env(), input=password + "\n",
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        if args[0] in ("adduser", "passwd"):
            accounts[args[1].split("@")[0]] = password
            assert str(tmp_path / "presenced-data") in result.stdout or args[0] == "passwd", \
                result.stdout
        elif args[0] == "deluser":
            del accounts[args[1].split("@")[0]]

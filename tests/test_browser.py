"""A real browser client: Converse.js 14 in Debian's Chromium (headless, playwright-core from
npm, tests/browser/) logs in over the WebSocket endpoint it finds through host-meta (and, a
second time, over BOSH), shows a TCP (slixmpp) contact online, receives a chat message from it
and answers.

The npm packages come from tests/browser/package-lock.json (``npm ci``, run here when
node_modules is missing; .ci/run installs chromium and runs it too). Without chromium, node or
the packages the test skips, except under CI, where a skip is a failure (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from server.storage.base import RosterItem
from tests.conftest import PASSWORD, stop_server
from tests.test_http import start_web

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
CHROMIUM = Path("/usr/bin/chromium")
STEP_TIMEOUT = 60.0


def _npm_packages() -> str | None:
    """Why the npm packages cannot be had, or None once they are installed."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not installed"
    if (BROWSER_DIR / "node_modules" / "playwright-core").is_dir() and \
            (BROWSER_DIR / "node_modules" / "converse.js" / "dist").is_dir():
        return None
    env = dict(os.environ, PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1")
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BROWSER_DIR, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        return f"npm ci failed: {done.stderr[-2000:]}"
    return None


@pytest.fixture(scope="module")
def browser_ready() -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    problem = _npm_packages()
    if problem is not None:
        pytest.skip(problem)


async def _line(stream: asyncio.StreamReader, log: list[str]) -> str:
    while True:
        raw = await asyncio.wait_for(stream.readline(), STEP_TIMEOUT)
        if not raw:
            raise AssertionError("the browser script ended early:\n" + "\n".join(log))
        line = raw.decode().rstrip("\n")
        log.append(line)
        if line.startswith("step "):
            return line[5:]


@pytest.mark.parametrize("transport", ["websocket", "bosh"])
async def test_converse_found_through_host_meta(tmp_path: Path, browser_ready: None,
                                                transport: str) -> None:
    """transport bosh: the host-meta Converse gets lacks the WebSocket link."""
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_web(tmp_path, '[http]\ncors_origins = ["https://chat.test"]\n')
    process: asyncio.subprocess.Process | None = None
    errors: list[str] = []
    try:
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        rosters = running.server.storage.rosters
        await rosters.put("alice", "a.test", RosterItem("bob@a.test", name="Bob",
                                                        subscription="both"))
        await rosters.put("bob", "a.test", RosterItem("alice@a.test", subscription="both"))
        bob = await running.client("bob@a.test")  # online over TCP, available presence sent
        got: asyncio.Queue[Any] = asyncio.Queue()
        bob.add_event_handler("message",
                              lambda msg: got.put_nowait(msg) if msg["body"] else None)
        host, port = running.address("https")
        options = {"domain": "a.test", "jid": "alice@a.test", "password": PASSWORD,
                   "contact": "Bob", "serverOrigin": f"https://{host}:{port}",
                   "expect": "hello from a TCP client", "reply": "hello from Converse",
                   "timeoutMs": int(STEP_TIMEOUT * 1000), "transport": transport}
        process = await asyncio.create_subprocess_exec(
            "node", str(BROWSER_DIR / "converse.mjs"), json.dumps(options),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert process.stdout is not None and process.stdin is not None
        assert process.stderr is not None
        stderr = process.stderr

        async def collect() -> None:
            async for raw in stderr:
                errors.append(raw.decode().rstrip())

        collector = asyncio.ensure_future(collect())
        out: list[str] = []
        try:
            assert await _line(process.stdout, out) == "contact-online", errors
            # The browser's session is one of this transport on this server.
            assert any(conn.kind == transport and conn.bound
                       for conn in running.server.connections)
            bob.send_message(mto="alice@a.test", mbody="hello from a TCP client", mtype="chat")
            process.stdin.write(b"go\n")
            assert await _line(process.stdout, out) == "received", errors
            assert await _line(process.stdout, out) == "sent", errors
            reply = await asyncio.wait_for(got.get(), STEP_TIMEOUT)
            assert reply["body"] == "hello from Converse"
            assert str(reply["from"]).startswith("alice@a.test/")
            process.stdin.write(b"go\n")
            assert await asyncio.wait_for(process.wait(), STEP_TIMEOUT) == 0, errors
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\nbrowser stdout: {out}\nstderr:\n"
                                 + "\n".join(errors[-60:])) from exc
        finally:
            collector.cancel()
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        await stop_server(running)

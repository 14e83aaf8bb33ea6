"""Nothing accepted is lost: offline messages and pending subscription requests survive
`kill -9` of a real `presenced serve` process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import textwrap
from pathlib import Path

from tests.process import drain, free_port, presenced
from tests.rawclient import CLIENT, RawClient


def start(config: Path, cwd: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(presenced("serve", "--config", str(config)), cwd=cwd,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "event=started" in line:
            drain(proc)
            return proc
    raise AssertionError("presenced did not start")


def kill_9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


async def login(port: int, user: str, resource: str) -> RawClient:
    client = await RawClient.connect("127.0.0.1", port)
    await client.login("a.test", user, "pw", resource)
    return client


def configure(tmp_path: Path, users: tuple[str, ...], extra: str = "") -> tuple[Path, int]:
    """A config for `presenced serve` (c2s without TLS on a free port, tables in `extra`) and
    the users@a.test with password "pw"; the config's path and the port."""
    port = free_port()
    config = tmp_path / "presenced.toml"
    config.write_text(textwrap.dedent(f"""\
        domains = ["a.test"]
        data_dir = "data"
        [listen]
        c2s = ["127.0.0.1:{port}"]
        c2s_tls = []
        """) + extra)
    for user in users:
        subprocess.run(presenced("adduser", f"{user}@a.test", "--password", "pw", "--config",
                                 str(config)), check=True, cwd=tmp_path)
    return config, port


async def test_offline_message_and_pending_request_survive_kill_9(tmp_path: Path) -> None:
    config, port = configure(tmp_path, ("alice", "bob"))
    proc = start(config, tmp_path)
    try:
        alice = await login(port, "alice", "pc")
        await alice.send("<message to='bob@a.test' type='chat' id='m1'><body>kept</body></message>")
        await alice.send("<presence to='bob@a.test' type='subscribe'/>")
        # The ping's answer comes after both were handled (per-stream order).
        await alice.send("<iq type='get' id='p' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
        while True:
            el = await alice.next()
            assert el.get("type") != "error", el.attrib
            if el.get("id") == "p":
                break
    finally:
        kill_9(proc)
    proc = start(config, tmp_path)
    try:
        bob = await login(port, "bob", "phone")
        await bob.send("<presence/>")
        seen: dict[str, object] = {}
        while "message" not in seen or "subscribe" not in seen:
            el = await asyncio.wait_for(bob.next(), 10)
            if el.tag == f"{{{CLIENT}}}message":
                seen["message"] = el.findtext(f"{{{CLIENT}}}body")
            elif el.get("type") == "subscribe":
                seen["subscribe"] = el.get("from")
        assert seen == {"message": "kept", "subscribe": "alice@a.test"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0

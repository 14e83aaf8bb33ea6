"""Running a cluster as an admin (issue 22 items 5 and 7, serve --workers): the secrets every
node shares in the database, ``presenced serve --workers N``, ``presenced check`` of
[cluster], and /metrics with the cluster's gauges. Real redis-server (tests/redis.py) and
PostgreSQL (tests/pg.py), real clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from server.config import load_config
from server.modules.fast import Fast
from server.modules.muc import Muc
from server.storage import open_storage
from server.stream.scram import derive_credentials
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server, write_config
from tests.process import free_port, presenced, watch_line
from tests.rawclient import CLIENT, RawClient
from tests.redis import redis_server, redis_url  # noqa: F401 (fixtures)
from tests.test_cluster import MESSAGE, cluster_tables, eventually, raw_available, sees
from tests.test_http import fetch, put_file, request_slot, slot_urls
from tests.test_sasl2 import FAST, S2, fast_login, q, scram_sasl2

ROOT = Path(__file__).resolve().parent.parent
ALICE = "alice@a.test"


def token_of(success: etree._Element) -> str:
    """The XEP-0484 token in a SASL2 <success/>."""
    found = success.find(q(FAST, "token"))
    assert found is not None and found.get("token"), etree.tostring(success)
    return found.get("token", "")


def http_listener(host: str) -> str:
    return f'http = ["{host}:0"]'


@pytest.fixture
async def nodes(tmp_path: Path, pg_dsn: str, redis_url: str  # noqa: F811
                ) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two nodes of a.test on one PostgreSQL, with plain HTTP and uploads on one shared path."""
    shared = tmp_path / "uploads"
    extra = f'[upload]\npath = "{shared}"\n'
    one = await start_server(tmp_path / "node1", cluster_tables(pg_dsn, redis_url, "node1") +
                             extra, domains=("a.test",), host="127.0.0.1",
                             listen_extra=http_listener("127.0.0.1"))
    try:
        two = await start_server(tmp_path / "node2", cluster_tables(pg_dsn, redis_url, "node2")
                                 + extra, domains=("a.test",), host="127.0.0.2",
                                 listen_extra=http_listener("127.0.0.2"))
    except BaseException:
        await stop_server(one)
        raise
    await one.add_user(ALICE)
    try:
        yield one, two
    finally:
        await stop_server(two)
        await stop_server(one)


# -- item 5: secrets in the database -------------------------------------------------------------


async def test_a_fast_token_of_one_node_logs_in_on_the_other(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    client = await one.raw()
    success, _after = await scram_sasl2(
        client, extra=f"<request-token xmlns='{FAST}' mechanism='HT-SHA-256-NONE'/>")
    token = token_of(success)
    await client.close()
    other = await two.raw()
    answer = await fast_login(other, token)
    assert answer.tag == q(S2, "success"), etree.tostring(answer)
    await other.close()
    fast_one, fast_two = one.server.module(Fast), two.server.module(Fast)
    assert fast_one is not None and fast_two is not None
    assert fast_one._key == fast_two._key


async def test_an_upload_url_of_one_node_is_good_on_the_other(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    client = await one.raw_login(ALICE)
    put_url, get_url = slot_urls(await request_slot(client, "notes.txt", 11))
    await client.close()
    base_one, base_two = ("http://{}:{}".format(*node.address("http")) for node in (one, two))
    assert put_url.startswith(base_one)
    # Signed by node1, PUT through node2: its HMAC key is the same (storage/keystore.py) and the
    # file lands on the path both share; either node serves it.
    status, _headers, _body = await put_file(put_url.replace(base_one, base_two), b"hello world")
    assert status == 201, status
    for url in (get_url, get_url.replace(base_one, base_two)):
        status, _headers, body = await fetch(url)
        assert (status, body) == (200, b"hello world")
    # A token made with another key is refused: the check does look at it.
    forged = put_url.split("token=")[0] + "token=" + "0" * 64
    status, _headers, _body = await put_file(forged.replace(base_one, base_two), b"other text!")
    assert status == 403, status


async def test_occupant_ids_are_the_same_on_every_node(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    muc_one, muc_two = one.server.module(Muc), two.server.module(Muc)
    assert muc_one is not None and muc_two is not None
    assert len(muc_one.id_key) == 32 and muc_one.id_key == muc_two.id_key
    key = await one.server.storage.secrets.get("muc-occupant-id")
    assert key == muc_one.id_key


async def test_an_upgrade_keeps_the_keys_of_the_old_files(tmp_path: Path) -> None:
    """A data_dir of a version that kept the keys in files: the first start imports them (FAST
    tokens, occupant ids and web admin cookies stay valid), after which the files are not read."""
    data = tmp_path / "data"
    data.mkdir()
    fast_key, muc_key = bytes(range(32)), bytes(range(100, 140))
    (data / "fast-token.key").write_bytes(fast_key)
    (data / "muc-occupant-id.key").write_bytes(muc_key)
    running = await start_server(tmp_path)
    try:
        await running.add_user(ALICE)
        fast, muc = running.server.module(Fast), running.server.module(Muc)
        assert fast is not None and muc is not None
        assert fast._key == fast_key and muc.id_key == muc_key
        secrets = running.server.storage.secrets
        assert await secrets.get("fast-token") == fast_key
        assert await secrets.get("muc-occupant-id") == muc_key
        client = await running.raw()
        success, _after = await scram_sasl2(
            client, extra=f"<request-token xmlns='{FAST}' mechanism='HT-SHA-256-NONE'/>")
        token = token_of(success)
        await client.close()
    finally:
        await stop_server(running)
    (data / "fast-token.key").unlink()
    (data / "muc-occupant-id.key").write_bytes(b"x" * 32)
    running = await start_server(tmp_path)
    try:
        muc = running.server.module(Muc)
        assert muc is not None and muc.id_key == muc_key
        client = await running.raw()
        answer = await fast_login(client, token)
        assert answer.tag == q(S2, "success"), etree.tostring(answer)
        await client.close()
    finally:
        await stop_server(running)


# -- serve --workers N ------------------------------------------------------------------------


class Workers:
    """`presenced serve --workers N` as a real process, its log (parent's and workers') read
    by a thread."""

    def __init__(self, command: list[str], cwd: Path | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(command, cwd=cwd, stderr=subprocess.PIPE, text=True,
                                     env=env, start_new_session=True)
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        state = [0]
        for line in self.proc.stderr:
            watch_line(line, state)
            self.lines.append(line.rstrip())

    def count(self, text: str) -> int:
        return sum(1 for line in list(self.lines) if text in line)

    async def wait_for(self, text: str, times: int = 1, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(text) < times:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {times} × {text!r}:\n" + "\n".join(self.lines[-40:]))
            await asyncio.sleep(0.05)

    def pids(self, node: str) -> list[int]:
        found = []
        for line in list(self.lines):
            if "event=worker-started" in line and f"node={node} " in line:
                found.append(int(line.rsplit("pid=", 1)[1].split()[0]))
        return found

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def worker_config(tmp: Path, pg_dsn: str, redis: str, port: int, node: str | None) -> Path:
    cluster = cluster_tables(pg_dsn, redis, node or "-")
    if node is None:
        cluster = cluster.replace('node = "-"\n', "")
    path = write_config(tmp, cluster, domains=("a.test",))
    text = path.read_text().replace('c2s = ["127.0.0.1:0"]', f'c2s = ["127.0.0.1:{port}"]')
    path.write_text(text.replace('c2s_tls = ["127.0.0.1:0"]', "c2s_tls = []"))
    return path


async def cluster_status(config: Path) -> dict[str, dict[str, object]]:
    proc = await asyncio.create_subprocess_exec(
        *presenced("cluster", "status", "--json", "-c", str(config)),
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return {n["node"]: n for n in map(json.loads, out.decode().splitlines())}


async def directory_nodes(redis: str, bares: list[str]) -> dict[str, str]:
    """bare JID -> the node its (one) session is on, from the cluster's directory in Redis."""
    from server.cluster import connect, keys
    client = connect(redis)
    try:
        found = {}
        for bare in bares:
            entries = await client.hgetall(keys.directory(bare))
            for raw in entries.values():
                found[bare] = json.loads(raw)["n"]
        return found
    finally:
        await client.aclose()


async def test_serve_workers(tmp_path: Path, pg_dsn: str, redis_url: str  # noqa: F811
                             ) -> None:
    port = free_port()
    config = worker_config(tmp_path, pg_dsn, redis_url, port, node="box")
    users = [f"u{i}@a.test" for i in range(12)]
    storage = await open_storage(load_config(config))
    try:
        for jid in users:
            user, domain = jid.split("@")
            await storage.accounts.create(user, domain, derive_credentials(PASSWORD))
    finally:
        await storage.close()
    workers = Workers(presenced("serve", "--workers", "2", "--config", str(config)))
    clients: list[RawClient] = []
    try:
        await workers.wait_for("event=started", 2)
        status = await cluster_status(config)
        assert set(status) == {"box-w1", "box-w2"} and all(n["alive"] for n in status.values())
        # Logins through the one port land on both workers (SO_REUSEPORT spreads them).
        for jid in users:
            client = await RawClient.connect("127.0.0.1", port)
            await client.login("a.test", jid.split("@")[0], PASSWORD, "r")
            await client.send("<presence/>")
            await client.expect(f"{{{CLIENT}}}presence")
            clients.append(client)
        where = await directory_nodes(redis_url, users)
        assert set(where.values()) == {"box-w1", "box-w2"}, where

        async def sessions() -> dict[str, object]:
            return {name: n["sessions"] for name, n in (await cluster_status(config)).items()}
        deadline = time.monotonic() + 20
        while (counts := await sessions()) != {
                name: list(where.values()).count(name) for name in ("box-w1", "box-w2")}:
            assert time.monotonic() < deadline, counts
            await asyncio.sleep(0.3)
        # A message between users on different workers arrives.
        sender = next(i for i, jid in enumerate(users) if where[jid] == "box-w1")
        receiver = next(i for i, jid in enumerate(users) if where[jid] == "box-w2")
        await clients[sender].send(f"<message to='{users[receiver]}/r' type='chat' id='x1'>"
                                   "<body>across workers</body></message>")
        got = await clients[receiver].expect(f"{{{CLIENT}}}message")
        assert (got.get("from"), got.findtext(f"{{{CLIENT}}}body")) == (
            f"{users[sender]}/r", "across workers")
        # SIGHUP to the parent reloads every worker (server/ctl.py reload).
        workers.proc.send_signal(signal.SIGHUP)
        await workers.wait_for("event=reloaded restart_needed=-", 2)
        # A worker that dies is started again, under its name (a new incarnation).
        first = workers.pids("box-w2")
        assert len(first) == 1
        os.kill(first[0], signal.SIGKILL)
        await workers.wait_for("event=worker-died node=box-w2")
        await workers.wait_for("event=started", 3)
        assert len(workers.pids("box-w2")) == 2 and workers.proc.poll() is None
        for client in clients:
            await client.close()
        clients.clear()
        # SIGTERM to the parent stops every worker, and then the parent.
        pids = workers.pids("box-w1") + workers.pids("box-w2")[-1:]
        workers.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(workers.proc.wait, 30) == 0, "\n".join(workers.lines)
        assert workers.count("event=worker-stopped") == 2
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        for client in clients:
            await client.close()
        workers.kill()


def test_workers_need_a_cluster(tmp_path: Path) -> None:
    config = write_config(tmp_path, domains=("a.test",))
    result = subprocess.run(presenced("serve", "--workers", "2", "--config", str(config)),
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2
    assert "--workers needs [cluster] redis in" in result.stderr, result.stderr
    bad = subprocess.run(presenced("serve", "--workers", "0", "--config", str(config)),
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert bad.returncode == 2 and "not a number of workers" in bad.stderr


def test_a_cluster_node_needs_a_name_without_workers(tmp_path: Path, pg_dsn: str,
                                                     redis_url: str) -> None:  # noqa: F811
    config = worker_config(tmp_path, pg_dsn, redis_url, free_port(), node=None)
    result = subprocess.run(presenced("serve", "--config", str(config)), capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2
    assert "[cluster] node: missing" in result.stderr, result.stderr


# -- presenced check ---------------------------------------------------------------------------


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(presenced("check", "--config", str(config)), capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_check_reaches_redis(tmp_path: Path, pg_dsn: str, redis_url: str) -> None:  # noqa: F811
    good = write_config(tmp_path / "good", cluster_tables(pg_dsn, redis_url, "node1"),
                        domains=("a.test",))
    result = check(good)
    assert result.returncode == 0 and result.stdout.strip().endswith(": ok"), result.stdout
    # Nothing listens on the port of a closed socket: a clear line naming the key, status 1.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    bad = write_config(tmp_path / "bad", cluster_tables(pg_dsn, dead, "node1"),
                       domains=("a.test",))
    result = check(bad)
    line = bad.read_text().splitlines().index(f'redis = "{dead}"') + 1
    assert result.returncode == 1, result.stdout
    assert f"error: {bad}:{line}: [cluster] redis: Redis at {dead} is not reachable" in \
        result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    # Without node: only serve --workers can start it; said, not an error.
    nameless = write_config(tmp_path / "nameless", cluster_tables(pg_dsn, redis_url, "-")
                            .replace('node = "-"\n', ""), domains=("a.test",))
    result = check(nameless)
    assert result.returncode == 0 and "note: [cluster] node is unset" in result.stdout


# -- /metrics per node ---------------------------------------------------------------------------


async def scrape(node: RunningServer) -> dict[str, dict[str, float]]:
    """metric sample name -> its node label -> value."""
    from prometheus_client.parser import text_string_to_metric_families
    status, _headers, body = await fetch("http://{}:{}/metrics".format(*node.address("http")))
    assert status == 200, body
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.startswith("presenced_cluster_"):
                found.setdefault(sample.name, {})[sample.labels["node"]] = sample.value
    return found


async def test_metrics_per_node_with_the_cluster_gauges(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    await one.add_user("bob@a.test")
    alice = await raw_available(one, ALICE, "phone")
    bob = await raw_available(two, "bob@a.test", "desk")
    await eventually(sees(one, "bob@a.test/desk"), "node1 sees bob on node2")
    for i in range(3):
        await alice.send(f"<message to='bob@a.test/desk' type='chat' id='m{i}'><body>{i}</body>"
                         "</message>")
        await bob.expect(MESSAGE)
    deadline = time.monotonic() + 15
    while True:  # the inbox gauges are sampled from Redis every 2 s
        first, second = await scrape(one), await scrape(two)
        if "node2" in second.get("presenced_cluster_inbox_pending", {}) or \
                time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert first["presenced_cluster_live_nodes"] == {"node1": 2.0}
    assert second["presenced_cluster_live_nodes"] == {"node2": 2.0}
    assert first["presenced_cluster_stanzas_sent_total"]["node1"] >= 3
    assert second["presenced_cluster_stanzas_received_total"]["node2"] >= 3
    # Sampled (its value depends on how the inbox trims what it acknowledged).
    assert second["presenced_cluster_inbox_length"]["node2"] >= 0
    assert second["presenced_cluster_inbox_pending"] == {"node2": 0.0}
    assert first["presenced_cluster_directory_replica_sessions"]["node1"] >= 1
    assert first["presenced_cluster_directory_replica_jids"]["node1"] >= 1
    age = first["presenced_cluster_incarnation_age_seconds"]["node1"]
    assert 0 < age < 120
    await alice.close()
    await bob.close()


# -- README: Running a cluster, as written -------------------------------------------------------


def readme_cluster() -> tuple[str, list[list[str]]]:
    """The TOML and the commands of README's "Running a cluster" (its indented lines)."""
    import shlex
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Running a cluster\n", 1)[1].split("\n## ", 1)[0]
    toml, commands = [], []
    for line in section.splitlines():
        if line.startswith("    ") and line.strip():
            if line.strip().startswith("presenced "):
                commands.append(shlex.split(line, comments=True))
            else:
                toml.append(line.strip())
    return "\n".join(toml) + "\n", commands


async def test_readme_running_a_cluster(tmp_path: Path, pg_dsn: str,
                                        redis_url: str) -> None:  # noqa: F811
    toml, commands = readme_cluster()
    assert [c[:2] for c in commands] == [["presenced", "check"], ["presenced", "serve"],
                                        ["presenced", "cluster"]]
    # Its placeholders, for our private PostgreSQL and Redis.
    toml = re.sub(r'dsn = "[^"]*"', f'dsn = "{pg_dsn}"', toml)
    toml = re.sub(r'redis = "[^"]*"', f'redis = "{redis_url}"', toml)
    assert toml.count(pg_dsn) == 1 and toml.count(redis_url) == 1
    port = free_port()
    config = write_config(tmp_path, toml + "heartbeat = 0.2\ndead_after = 3.0\n",
                          domains=("a.test",))
    text = config.read_text().replace('c2s = ["127.0.0.1:0"]', f'c2s = ["127.0.0.1:{port}"]')
    config.write_text(text.replace('c2s_tls = ["127.0.0.1:0"]', "c2s_tls = []"))
    assert config.name == "presenced.toml"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    check_cmd, serve_cmd, status_cmd = (presenced(*c[1:]) for c in commands)
    result = subprocess.run(check_cmd, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    workers = Workers(serve_cmd, cwd=tmp_path)
    try:
        await workers.wait_for("event=started", 2)
        result = subprocess.run(status_cmd, cwd=tmp_path, capture_output=True, text=True,
                                timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        rows = [line.split()[:2] for line in result.stdout.splitlines()[1:]]
        assert rows == [["node1-w1", "alive"], ["node1-w2", "alive"]], result.stdout
        workers.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(workers.proc.wait, 30) == 0
    finally:
        workers.kill()


# -- the supervisor, on small commands -----------------------------------------------------------


async def test_supervisor_restarts_then_gives_up(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    import sys

    from server.cluster import workers
    monkeypatch.setattr(workers, "FIRST_DELAY", 0.01)
    runs = tmp_path / "runs"
    dying = [sys.executable, "-c", f"open({str(runs)!r}, 'a').write('x'); raise SystemExit(3)"]
    done = [sys.executable, "-c", "pass"]
    started = time.monotonic()
    # One dies at once every time: restarted, then given up on (status 1); the one that ends
    # with status 0 by itself is not restarted.
    assert await workers.supervise({"n-w1": dying, "n-w2": done}) == 1
    assert runs.read_text() == "x" * workers.GIVE_UP_AFTER
    assert time.monotonic() - started < 20


def test_worker_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from server.cluster import workers
    named = load_config(write_config(tmp_path / "a", '[storage]\nbackend = "postgresql"\n'
                                     'dsn = "postgresql://x@localhost/x"\n[cluster]\n'
                                     'redis = "redis://127.0.0.1:1/0"\nnode = "box"\n'))
    assert workers.worker_names(named, 3) == ["box-w1", "box-w2", "box-w3"]
    nameless = load_config(write_config(tmp_path / "b", '[storage]\nbackend = "postgresql"\n'
                                        'dsn = "postgresql://x@localhost/x"\n[cluster]\n'
                                        'redis = "redis://127.0.0.1:1/0"\n'))
    host = socket.gethostname().split(".")[0]
    names = workers.worker_names(nameless, 2)
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,57}", host):  # a host name as node name
        assert names == [f"{host}-w1", f"{host}-w2"]
    monkeypatch.setattr(socket, "gethostname", lambda: "_bad host!.example.org")
    assert workers.worker_names(nameless, 1) == ["bad-host--w1"]
    assert workers.problem(nameless, 2) is None
    alone = load_config(write_config(tmp_path / "c"))
    assert "--workers needs [cluster] redis" in (workers.problem(alone, 2) or "")

"""The presenced command, run as a subprocess the way an administrator runs it."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import os
import pty
import queue
import resource
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import cli
from server.certs import check_certificate, generate_self_signed
from server.config import load_config
from server.storage import open_storage
from server.storage.base import Credentials, ScramKeys
from tests.conftest import default_ports

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _check_sees_the_default_ports_free(request: pytest.FixtureRequest) -> Iterator[None]:
    """`presenced check` warns about a listening address in use; its tests' configs listen on
    the default ports, which the README tests may hold meanwhile (tests/conftest.py)."""
    if request.node.name.startswith("test_check"):
        with default_ports():
            yield
    else:
        yield


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


def env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def presenced(cwd: Path, *args: str, stdin: str | None = None) -> Result:
    proc = subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, env=env(),
                          input=stdin, stdin=subprocess.DEVNULL if stdin is None else None,
                          capture_output=True, text=True, timeout=60)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_fails(result: Result, code: int, *words: str) -> str:
    """One line on stderr, `presenced: error: ...`, no traceback, nothing on stdout."""
    assert result.code == code, result
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("presenced: error: "), result.err
    for word in words:
        assert word in lines[0], lines[0]
    assert result.out == ""
    return lines[0]


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "presenced.toml"
    path.write_text(textwrap.dedent("""\
        domains = ["a.test", "b.test"]
        data_dir = "data"
        [listen]
        c2s = ["127.0.0.1:0"]
        c2s_tls = ["127.0.0.1:0"]
        [c2s]
        scram_iterations = 5000
        """) + textwrap.dedent(extra))
    return path


def stored(config_path: Path, user: str, domain: str) -> Credentials | None:
    async def read() -> Credentials | None:
        storage = await open_storage(load_config(config_path))
        try:
            return await storage.accounts.get_credentials(user, domain)
        finally:
            await storage.close()
    return asyncio.run(read())


def verifies(credentials: Credentials | None, password: str) -> bool:
    """RFC 5802 §3, computed here independently of the server's SCRAM code."""
    assert credentials is not None
    for name, keys in (("sha1", credentials.sha1), ("sha256", credentials.sha256)):
        assert isinstance(keys, ScramKeys)
        assert keys.iterations == 5000  # [c2s] scram_iterations
        salted = hashlib.pbkdf2_hmac(name, password.encode(), keys.salt, keys.iterations)
        client_key = hmac.digest(salted, b"Client Key", name)
        if hashlib.new(name, client_key).digest() != keys.stored_key:
            return False
        if hmac.digest(salted, b"Server Key", name) != keys.server_key:
            return False
    return True


# -- accounts -----------------------------------------------------------------------------------


def test_account_lifecycle(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    c = "--config", str(config)

    result = presenced(tmp_path, "adduser", "alice@a.test", "--password", "s3cret", *c)
    database = tmp_path / "data" / "presenced.sqlite"  # absolute: which database, always
    assert (result.code, result.out, result.err) == (0, f"added alice@a.test to {database}\n",
                                                     "")
    assert verifies(stored(config, "alice", "a.test"), "s3cret")
    assert stored(config, "alice", "b.test") is None

    # Not a terminal: one line of stdin, without its line end.
    result = presenced(tmp_path, "adduser", "bob@b.test", *c, stdin="pass word \r\n")
    assert result.code == 0, result
    assert verifies(stored(config, "bob", "b.test"), "pass word ")

    assert_fails(presenced(tmp_path, "adduser", "alice@a.test", "-p", "x", *c), 1,
                 "alice@a.test already exists")
    assert verifies(stored(config, "alice", "a.test"), "s3cret")

    result = presenced(tmp_path, "passwd", "alice@a.test", *c, stdin="n3w\n")
    assert (result.code, result.out) == (0, "changed the password of alice@a.test\n"), result
    assert verifies(stored(config, "alice", "a.test"), "n3w")
    assert not verifies(stored(config, "alice", "a.test"), "s3cret")

    result = presenced(tmp_path, "deluser", "alice@a.test", *c)
    assert (result.code, result.out) == (0, "deleted alice@a.test\n"), result
    assert stored(config, "alice", "a.test") is None
    assert_fails(presenced(tmp_path, "deluser", "alice@a.test", *c), 1,
                 "no such user: alice@a.test")
    assert_fails(presenced(tmp_path, "passwd", "alice@a.test", "-p", "x", *c), 1,
                 "no such user: alice@a.test")
    assert stored(config, "bob", "b.test") is not None


def on_terminal(cwd: Path, args: list[str], answers: list[str]) -> Result:
    """Run with a terminal as stdin, typing each answer once its prompt shows."""
    master, slave = pty.openpty()
    # A new session has no controlling terminal, so getpass uses stdin (our pty), not ours.
    proc = subprocess.Popen([sys.executable, "-m", "server", *args], cwd=cwd, env=env(),
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    os.close(slave)
    assert proc.stderr is not None and proc.stdout is not None
    err = b""
    try:
        for n, answer in enumerate(answers):
            deadline = time.monotonic() + 20
            while err.count(b"Password") <= n:
                ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
                assert ready, err
                chunk = os.read(proc.stderr.fileno(), 1024)
                assert chunk, err
                err += chunk
            time.sleep(0.05)  # getpass flushes typed-ahead input when it turns echo off
            os.write(master, answer.encode() + b"\n")
        out, rest = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        os.close(master)
    return Result(proc.returncode, out.decode(), (err + rest).decode())


def test_password_prompt_on_a_terminal(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    args = ["adduser", "alice@a.test", "-c", str(config)]
    result = on_terminal(tmp_path, args, ["first", "second"])
    assert result.code == 1, result
    assert result.err.endswith("presenced: error: the passwords do not match\n"), result
    assert stored(config, "alice", "a.test") is None
    result = on_terminal(tmp_path, args, ["typed pw", "typed pw"])
    database = tmp_path / "data" / "presenced.sqlite"
    assert (result.code, result.out) == (0, f"added alice@a.test to {database}\n"), result
    assert "Traceback" not in result.err and "typed pw" not in result.err  # not echoed
    assert verifies(stored(config, "alice", "a.test"), "typed pw")


def test_jids_are_normalised(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = presenced(tmp_path, "adduser", "Alice@A.Test", "-p", "pw", "-c", str(config))
    database = tmp_path / "data" / "presenced.sqlite"
    assert (result.code, result.out) == (0, f"added alice@a.test to {database}\n"), result
    assert verifies(stored(config, "alice", "a.test"), "pw")


def test_without_config_uses_the_defaults(tmp_path: Path) -> None:
    result = presenced(tmp_path, "adduser", "carol@localhost", "-p", "pw")
    assert result.code == 0, result
    assert (tmp_path / "presenced-data" / "presenced.sqlite").exists()
    assert_fails(presenced(tmp_path, "adduser", "carol@a.test", "-p", "pw"), 1,
                 "a.test is not a domain of this server", "localhost")


@pytest.mark.parametrize(("jid", "words"), [
    ("alice@c.test", ("c.test is not a domain of this server", "a.test, b.test")),
    ("alice@a.test/phone", ("not a bare JID",)),
    ("a.test", ("not a bare JID",)),
    ("@a.test", ("invalid JID '@a.test'",)),
    ("alice@", ("invalid JID 'alice@'",)),
])
def test_bad_jids(tmp_path: Path, jid: str, words: tuple[str, ...]) -> None:
    config = write_config(tmp_path)
    for args in (("adduser", jid, "-p", "pw"), ("passwd", jid, "-p", "pw"), ("deluser", jid)):
        assert_fails(presenced(tmp_path, *args, "-c", str(config)), 1, *words)


def test_empty_password(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert_fails(presenced(tmp_path, "adduser", "alice@a.test", "-c", str(config)), 1,
                 "empty password")  # stdin at its end
    assert_fails(presenced(tmp_path, "adduser", "alice@a.test", "-c", str(config), stdin="\n"),
                 1, "empty password")
    assert_fails(presenced(tmp_path, "adduser", "alice@a.test", "-p", "", "-c", str(config)),
                 1, "empty password")
    assert_fails(presenced(tmp_path, "adduser", "alice@a.test", "-p", "bell\x07", "-c",
                           str(config)), 1, "unusable password", "OpaqueString")
    assert stored(config, "alice", "a.test") is None


def test_invalid_config_lists_every_problem(tmp_path: Path) -> None:
    config = write_config(tmp_path, """\
        [limits]
        max_depth = 0
        idle_timeout = "long"
        """)
    for args, code in ((("adduser", "alice@a.test", "-p", "pw"), 1), (("serve",), 2)):
        result = presenced(tmp_path, *args, "--config", str(config))
        assert result.code == code, result
        assert result.err.splitlines() == [
            f"presenced: error: {config}:9: [limits] max_depth: expected an integer >= 2",
            f"presenced: error: {config}:10: [limits] idle_timeout: expected a number of "
            f"seconds > 0",
        ]


def test_missing_config(tmp_path: Path) -> None:
    assert_fails(presenced(tmp_path, "adduser", "a@a.test", "-p", "x", "-c", "nope.toml"), 1,
                 "nope.toml:0: cannot read it: No such file or directory")
    assert_fails(presenced(tmp_path, "serve", "-c", "nope.toml"), 2, "nope.toml:0: cannot read")


def test_unusable_data_dir(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    config = write_config(tmp_path, "")
    config.write_text(config.read_text().replace('data_dir = "data"',
                                                 'data_dir = "blocker/data"'))
    assert_fails(presenced(tmp_path, "adduser", "a@a.test", "-p", "x", "-c", str(config)), 1,
                 "cannot create", "blocker/data")


def test_database_from_a_newer_presenced(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert presenced(tmp_path, "adduser", "a@a.test", "-p", "x", "-c", str(config)).code == 0
    with sqlite3.connect(tmp_path / "data" / "presenced.sqlite") as db:
        db.execute("UPDATE schema_versions SET version = 999 WHERE store = 'accounts'")
    assert_fails(presenced(tmp_path, "deluser", "a@a.test", "-c", str(config)), 1,
                 "schema version 999, newer than this presenced")


def test_unexpected_errors_suggest_debug(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert presenced(tmp_path, "adduser", "a@a.test", "-p", "x", "-c", str(config)).code == 0
    with sqlite3.connect(tmp_path / "data" / "presenced.sqlite") as db:
        db.execute("DROP TABLE accounts")  # damaged behind our back
    line = assert_fails(presenced(tmp_path, "deluser", "a@a.test", "-c", str(config)), 1,
                        "unexpected", "no such table: accounts", "--debug")
    assert line.startswith("presenced: error: unexpected OperationalError")
    for args in (("--debug", "deluser", "a@a.test"), ("deluser", "a@a.test", "--debug")):
        result = presenced(tmp_path, *args, "-c", str(config))
        assert result.code == 1
        assert "Traceback (most recent call last)" in result.err
        assert "no such table: accounts" in result.err


def test_usage_errors(tmp_path: Path) -> None:
    for args in ((), ("frobnicate",), ("adduser",), ("adduser", "a@a.test", "--bogus"),
                 ("cert",), ("cert", "a.test", "--days", "soon"),
                 ("cert", "a.test", "--days", "0")):
        result = presenced(tmp_path, *args)
        assert result.code == 2, (args, result)
        assert result.err.splitlines()[-1].startswith("presenced: error: ")
        assert "Traceback" not in result.err


def test_version() -> None:
    result = presenced(ROOT, "--version")
    assert result.code == 0
    assert result.out.strip() == "presenced 0.1.0"


# -- check --------------------------------------------------------------------------------------


def test_check_a_good_config(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace(  # the default 127.0.0.1:5281 may be in use
        'c2s_tls = ["127.0.0.1:0"]', 'c2s_tls = ["127.0.0.1:0"]\nhttps = ["127.0.0.1:0"]'))
    result = presenced(tmp_path, "check", "--config", str(config))
    assert result.code == 0, result
    lines = result.out.splitlines()
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < cli.FEW_OPEN_FILES:  # this machine's, not ours
        lines = [line for line in lines if "RLIMIT_NOFILE" not in line]
    assert lines == [
        # The service domains (MUC and pubsub, on by default) are named too: peers check them.
        "note: a self-signed certificate for a.test, b.test, pubsub.a.test, pubsub.b.test, "
        f"muc.a.test, muc.b.test will be made at first start: {tmp_path / 'data' / 'cert.pem'}",
        f"{config}: ok",
    ]
    assert not (tmp_path / "data").exists()  # check changes nothing


def test_check_warns_when_few_files_may_be_open(tmp_path: Path) -> None:
    """Each connection is a file descriptor: a hard RLIMIT_NOFILE of 1024 (which serve cannot
    raise) caps the connections one process holds; check says so, as a warning."""
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace(
        'c2s_tls = ["127.0.0.1:0"]', 'c2s_tls = ["127.0.0.1:0"]\nhttps = ["127.0.0.1:0"]'))

    def low_hard_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    proc = subprocess.run([sys.executable, "-m", "server", "check", "--config", str(config)],
                          cwd=tmp_path, env=env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60,
                          preexec_fn=low_hard_limit)
    assert proc.returncode == 0, proc  # a warning, not an error
    lines = proc.stdout.splitlines()
    assert any(line.startswith("warning: open files (RLIMIT_NOFILE): the hard limit is 1024 "
                               "open files") and "LimitNOFILE=" in line for line in lines), lines
    assert lines[-1] == f"{config}: 0 error(s), 1 warning(s)"


def test_check_reports_config_errors_with_lines(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[log]\nlevel = 'loud'\ncolour = true\n")
    result = presenced(tmp_path, "check", "-c", str(config))
    assert result.code == 1
    assert result.out.splitlines() == [
        f'error: {config}:9: [log] level: expected one of "debug", "info", "warning", "error"',
        f"error: {config}:10: [log] colour: unknown key; expected one of level",
        "2 error(s)",
    ]


def test_check_certificate_problems(tmp_path: Path) -> None:
    generate_self_signed(["a.test"], tmp_path / "a.pem", tmp_path / "a.key")
    generate_self_signed(["a.test", "b.test"], tmp_path / "other.pem", tmp_path / "other.key")
    config = write_config(tmp_path, """\
        [tls]
        certificate = "a.pem"
        key = "other.key"
        [muc]
        enabled = false
        [pubsub]
        enabled = false
        """)
    result = presenced(tmp_path, "check", "-c", str(config))
    assert result.code == 1, result
    assert result.out.splitlines() == [
        f"error: {config}:10: [tls] key: key {tmp_path}/other.key does not belong to "
        f"certificate {tmp_path}/a.pem",
        f"warning: {config}:9: [tls] certificate: certificate {tmp_path}/a.pem is not for "
        f"b.test (it names a.test)",
        f"{config}: 1 error(s), 1 warning(s)",
    ]
    # A warning alone does not fail the check.
    config.write_text(config.read_text().replace("other.key", "a.key"))
    result = presenced(tmp_path, "check", "-c", str(config))
    assert result.code == 0, result
    assert result.out.splitlines()[-1] == f"{config}: 0 error(s), 1 warning(s)"


def test_check_listening_addresses(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path)
        config.write_text(config.read_text().replace(
            'c2s_tls = ["127.0.0.1:0"]', f'c2s_tls = ["127.0.0.1:{port}", "192.0.2.1:5223"]'))
        result = presenced(tmp_path, "check", "-c", str(config))
    assert result.code == 1, result
    lines = result.out.splitlines()
    assert lines[1:] == [
        f"warning: {config}:5: [listen] c2s_tls: 127.0.0.1:{port} is in use "
        f"(by a running presenced?)",
        f"error: {config}:5: [listen] c2s_tls: cannot listen on 192.0.2.1:5223: "
        f"Cannot assign requested address",
        f"{config}: 1 error(s), 1 warning(s)",
    ]


def test_check_unwritable_data_dir(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("")
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('"data"', '"blocker/data"'))
    result = presenced(tmp_path, "check", "-c", str(config))
    assert result.code == 1
    assert f"error: {config}:2: data_dir: {tmp_path}/blocker is not a directory" in \
        result.out.splitlines()


# -- cert ---------------------------------------------------------------------------------------


def test_cert(tmp_path: Path) -> None:
    result = presenced(tmp_path, "cert", "A.test", "b.test", "--out", "out")
    assert result.code == 0, result
    assert result.out.splitlines() == ["out/a.test.pem", "out/a.test.key"]
    cert, key = tmp_path / "out" / "a.test.pem", tmp_path / "out" / "a.test.key"
    assert check_certificate(cert, key, ["a.test", "b.test"]) == []
    assert key.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes()
    assert_fails(presenced(tmp_path, "cert", "a.test", "-o", "out"), 1,
                 "out/a.test.pem exists (--force replaces it)")
    assert key.read_bytes() == before
    result = presenced(tmp_path, "cert", "a.test", "-o", "out", "--force", "--days", "10")
    assert result.code == 0, result
    assert key.read_bytes() != before
    assert [p.severity for p in check_certificate(cert, key, ["a.test"])] == ["warning"]


def test_cert_errors(tmp_path: Path) -> None:
    assert_fails(presenced(tmp_path, "cert", "a b.test"), 1, "invalid domain 'a b.test'")
    (tmp_path / "blocker").write_text("")
    assert_fails(presenced(tmp_path, "cert", "a.test", "--out", "blocker/x"), 1, "blocker")


# -- serve --------------------------------------------------------------------------------------


FEW_OPEN_FILES = 256


def _few_open_files() -> None:
    """In the child before exec: a low soft limit, as systemd gives a service by default."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FEW_OPEN_FILES, hard))


def _open_files_limits(pid: int) -> tuple[str, str]:
    """(soft, hard) as /proc shows them: a number or "unlimited"."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open files limit")


def test_serve_until_sigterm(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace(  # not the default 127.0.0.1:5281: others'
        'c2s_tls = ["127.0.0.1:0"]', 'c2s_tls = ["127.0.0.1:0"]\nhttps = ["127.0.0.1:0"]'))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = hard if hard != resource.RLIM_INFINITY else int(
        Path("/proc/sys/fs/nr_open").read_text())  # unlimited: as far as the kernel allows
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "-c", str(config)],
                            cwd=tmp_path, env=env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_few_open_files)
    stderr = proc.stderr
    assert stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:  # in a thread: a silent hang must not block the test
        for line in stderr:
            lines.put(line)
        lines.put(None)

    pump = threading.Thread(target=read)
    pump.start()
    seen: list[str] = []
    try:
        while not any("event=started" in line for line in seen):
            try:
                line = lines.get(timeout=30)
            except queue.Empty:
                pytest.fail("no event=started within 30 s:\n" + "".join(seen))
            assert line is not None, "".join(seen)  # it ended before it started
            seen.append(line)
        # Each connection is a file descriptor: serve raised its soft limit to the hard one.
        assert _open_files_limits(proc.pid)[0] == str(raised)
        # The self-signed certificate was made for the configured domains.
        assert check_certificate(tmp_path / "data" / "cert.pem", tmp_path / "data" / "key.pem",
                                 ["a.test", "b.test"]) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pump.join(timeout=10)
        stderr.close()
    while (line := lines.get_nowait()) is not None:
        seen.append(line)
    assert "Traceback" not in "".join(seen)
    # Logs: one line per event, key=value.
    assert all(line.startswith("time=") and " level=" in line for line in seen), seen
    assert any("event=certificate-generated" in line for line in seen)
    assert any("event=stopped" in line for line in seen)
    assert any(f"event=open-files-limit soft={raised} was={FEW_OPEN_FILES}" in line
               for line in seen), seen
    # Issue 19 item 4: which data, absolute, and how many accounts (none: the hint says how).
    assert any(f"event=data data_dir={tmp_path / 'data'} database={tmp_path / 'data'}/"
               "presenced.sqlite accounts=0" in line for line in seen), seen
    assert any("event=no-accounts" in line and f"--config {config}" in line for line in seen)


def test_check_domain_certificates(tmp_path: Path) -> None:
    """A hosted domain's own certificate ([tls] domain_certificates) is checked for that
    domain: here it names another one."""
    generate_self_signed(["a.test"], tmp_path / "a.pem", tmp_path / "a.key")
    config = write_config(tmp_path, """\
        [tls]
        domain_certificates = { "b.test" = ["a.pem", "a.key"] }
        """)
    result = presenced(tmp_path, "check", "-c", str(config))
    assert result.code == 0, result  # a warning: clients and peers asking for b.test balk
    assert (f"warning: {config}:9: [tls] domain_certificates: b.test: certificate "
            f"{tmp_path}/a.pem is not for b.test (it names a.test)") in result.out


def test_check_warns_when_the_certificate_does_not_name_external_url(tmp_path: Path) -> None:
    """Issue 19 item 3: upload URLs and host-meta use [http] external_url; clients refuse it
    unless our certificate names its host (behind a proxy, the proxy's counts: not checked)."""
    https = '[listen]\nc2s = ["127.0.0.1:0"]\nhttps = ["127.0.0.1:0"]\n'

    def check(url: str, listen: str = https) -> list[str]:
        config = write_config(tmp_path, "").read_text().split("[listen]")[0]
        path = tmp_path / "presenced.toml"
        path.write_text(config + listen + f'[http]\nexternal_url = "{url}"\n')
        result = presenced(tmp_path, "check", "--config", str(path))
        assert result.code == 0, result
        return [line for line in result.out.splitlines() if "external_url" in line]

    warned = check("https://chat.example:5281")
    assert len(warned) == 1 and warned[0].startswith("warning: ")
    assert "does not name chat.example" in warned[0] and "a.test, b.test" in warned[0]
    assert check("https://a.test:5281/") == []
    assert check("https://muc.b.test") == []  # service domains are named too
    generate_self_signed(["a.test", "b.test"], tmp_path / "data" / "cert.pem",
                         tmp_path / "data" / "key.pem")  # an existing certificate is read
    assert "does not name muc.b.test" in check("https://muc.b.test")[0]
    assert check("https://chat.example", '[listen]\nhttps = []\nhttp = ["127.0.0.1:0"]\n') == []

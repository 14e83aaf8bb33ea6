"""The conftest hook that makes every skip a failure under CI (env CI non-empty), run on a tiny
test tree in a pytest subprocess, with CI set and without; and the summary that names skips."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TESTS = '''\
import pytest


def test_passes():
    assert True


def test_skips():
    pytest.skip("prosody is not installed")


@pytest.mark.skipif(True, reason="ejabberd is not installed")
def test_skipif():
    pass


@pytest.mark.xfail(reason="a known bug", strict=True)
def test_xfails():
    assert False
'''


def run_tiny(tmp_path: Path, ci: str | None, *options: str
             ) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import (pytest_make_collect_report, pytest_runtest_makereport,\n"
        "                            pytest_sessionfinish, pytest_terminal_summary)\n")
    (tmp_path / "test_tiny.py").write_text(TESTS)
    (tmp_path / "test_module_skip.py").write_text(
        "import pytest\n\npytest.importorskip('no_such_module_for_this_test')\n\n\n"
        "def test_never_collected():\n    pass\n")
    # (not this run's xdist worker: PYTEST_XDIST_WORKER says "a worker" to the tiny run)
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs",
                           "-q", *options, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True,
                          text=True, timeout=120)


def test_skips_are_listed_and_pass_off_ci(tmp_path: Path) -> None:
    done = run_tiny(tmp_path, None)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "SKIPPED [1] test_tiny.py:9: prosody is not installed" in out, out
    assert "SKIPPED [1] test_tiny.py:12: ejabberd is not installed" in out, out
    assert "could not import 'no_such_module_for_this_test'" in out, out
    assert "1 passed, 3 skipped, 1 xfailed" in out.splitlines()[-1], out


def test_every_skip_fails_under_ci(tmp_path: Path) -> None:
    done = run_tiny(tmp_path, "true")
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    # A skip in the test body fails it; a skipif mark (evaluated at setup) is an error.
    for outcome, name, reason in (("FAILED", "test_skips", "prosody is not installed"),
                                  ("ERROR", "test_skipif", "ejabberd is not installed")):
        assert (f"{outcome} test_tiny.py::{name} - skipped under CI (CI='true'), where nothing "
                f"may be skipped: {reason}") in out, out
    assert ("SKIPPED (a failure under CI) test_module_skip.py: could not import "
            "'no_such_module_for_this_test'") in out, out
    # xfail is not a skip; the passing test still passes.
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in out.splitlines()[-1], out


def test_a_skipped_module_fails_under_ci_on_xdist_workers(tmp_path: Path) -> None:
    """The suite runs on pytest-xdist's workers (pyproject.toml), whose exit status the
    controller does not read: there a module skipped at collection is a collection error."""
    done = run_tiny(tmp_path, "true", "-n", "2")
    assert done.returncode not in (0, 5), done.stdout + done.stderr
    assert ("ERROR test_module_skip.py - skipped under CI (CI='true'), where nothing may be "
            "skipped: could not import 'no_such_module_for_this_test'") in done.stdout, (
        done.stdout)


def test_empty_ci_variable_is_not_ci(tmp_path: Path) -> None:
    assert run_tiny(tmp_path, "").returncode == 0


def test_the_suite_names_skips_in_its_summary() -> None:
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    flags = options["addopts"].split()
    assert any(f.startswith("-r") and "s" in f[2:] for f in flags), flags

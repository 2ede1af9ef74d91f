"""Shared pytest fixtures.

Tests that need a system binary (Debian's chromium, PostgreSQL) ask for it through `system_binary`: when it is
missing they are skipped locally — and the end of the run says so in capitals — but in CI (`CI=true`, after
`make system-deps`) a missing binary is a failure, so CI can never go green by skipping them.
"""
import glob, os, shutil
from pathlib import Path

import pytest

SYSTEM_BINARIES = {
    "chromium": lambda: shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium"),
    "postgres": lambda: next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None),
}
_skipped_for_system = []

@pytest.fixture(scope="session")
def system_binary():
    "Return a function: `system_binary('chromium')` → path, or skip (fail in CI) when missing."
    def need(name):
        path = SYSTEM_BINARIES[name]()
        if path: return str(path)
        if os.environ.get("CI"): pytest.fail(f"{name} is missing in CI: `make system-deps` should have installed it")
        _skipped_for_system.append(name)
        pytest.skip(f"{name} not installed (run `make system-deps`)")
    return need

@pytest.fixture
def workspace(tmp_path, monkeypatch):
    "A fresh CD4ML_HOME with the default SQLite MLflow store inside it."
    home = tmp_path/"cd4ml-home"
    monkeypatch.setenv("CD4ML_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home

def pytest_terminal_summary(terminalreporter):
    if _skipped_for_system:
        names = ", ".join(sorted(set(_skipped_for_system)))
        terminalreporter.write_sep("!", f"SKIPPED {len(_skipped_for_system)} TEST(S): {names} NOT INSTALLED — run `make system-deps`",
                                   red=True, bold=True)

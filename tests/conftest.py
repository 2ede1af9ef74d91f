"""Shared pytest fixtures.

Tests that need a system binary (Debian's chromium, PostgreSQL) ask for it through `system_binary`: when it is
missing they are skipped locally — and the end of the run says so in capitals — but in CI (`CI=true`, after
`make system-deps`) a missing binary is a failure, so CI can never go green by skipping them.
"""
import glob, json, os, shutil, subprocess, sys
from importlib.metadata import distributions
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
CD4ML = str(Path(sys.executable).parent/"cd4ml")

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

def installed() -> set[str]:
    "`name==version` of every installed distribution, installers included."
    return {f"{d.metadata['Name']}=={d.version}" for d in distributions()}

@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The default pipeline run once, exactly as `make pipeline` runs it: `cd4ml run --json` in the project folder
    with its pipeline.yaml and no overrides (full default data, five candidates, the release step building, serving,
    smoke-, parity- and load-testing the Bento and promoting it), in a fresh CD4ML_HOME. About 35-50 s.

    Returns `result` (the `--json` summary), `env` (for more CLI calls in that workspace), `home`, and the installed
    distributions `installed_before` and `installed_after` it. The workspace is shared by every test that uses it:
    later runs there may add cache entries and MLflow runs, but must not change what the default pipeline computes."""
    home = tmp_path_factory.mktemp("default-run")/"cd4ml-home"
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "CD4ML_HOME": str(home)}
    before = installed()
    r = subprocess.run([CD4ML, "run", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    return SimpleNamespace(result=json.loads(r.stdout), env=env, home=home, installed_before=before, installed_after=installed())

def pytest_terminal_summary(terminalreporter):
    if _skipped_for_system:
        names = ", ".join(sorted(set(_skipped_for_system)))
        terminalreporter.write_sep("!", f"SKIPPED {len(_skipped_for_system)} TEST(S): {names} NOT INSTALLED — run `make system-deps`",
                                   red=True, bold=True)

"""No secret at rest: the passwords of a PostgreSQL store URI, of tracking-server accounts and of the lock role never
appear in what cd4ml or the tracking server writes — error messages, logs, cache files, executed notebooks, MLflow
tags, params and artifacts, the store's tables — nor on a command line that `ps` shows.

One accounts server (`_stores.accounts_server`: every PostgreSQL login needs a password, the server runs with
CD4ML_AUTH=1). In one workspace, from the project folder with the release step on, as users run it:
1. `cd4ml run` through the server as the `pipeline` account (MLFLOW_TRACKING_PASSWORD; CD4ML_LOCK_URI with a password);
2. `cd4ml run` straight on a second database, `postgresql+psycopg://ci:<password>@…` in MLFLOW_TRACKING_URI (the
   training steps come from the cache, whose files now name that store);
3. failing commands whose one-line error names the store.
Then every file of the workspace and of the server's home, the artifact store, the server's log, both databases
(pg_dump) and every command's output are searched for every password.
"""
import json, os, re, subprocess, sys
from pathlib import Path

import pytest

from sqlalchemy.engine import make_url

from _stores import PASSWORDS, ROOT, accounts_server, client_env, login, sql

CD4ML = str(Path(sys.executable).parent/"cd4ml")


def cd4ml(env, *args):
    "`cd4ml ...` from the project folder: (exit code, stdout, stderr)."
    r = subprocess.run([CD4ML, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return r.returncode, r.stdout, r.stderr


def leaks(text: str | bytes, where: str) -> list[str]:
    "`where` once per password found in `text`."
    data = text.encode() if isinstance(text, str) else text
    return [f"{where}: {name}" for name, secret in PASSWORDS.items() if secret.encode() in data]


def descendants(pid: int) -> list[int]:
    "`pid` and every process below it."
    children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t/"children").read_text().split()]
    return [pid] + [d for c in children for d in descendants(c)]


TINY = ["-p", "stores=3", "-p", "items=10", "-p", "days=200", "-p", "horizon=7", "-p", "n_train=4", "-p", "n_valid=2",
        "-p", "models=moving_average,ridge", "-j", "1"]


@pytest.fixture(scope="module")
def server(system_binary, tmp_path_factory):
    with accounts_server(system_binary("postgres"), tmp_path_factory.mktemp("secrets")) as s:
        sql(s.superuser, f"CREATE ROLE ci LOGIN PASSWORD '{PASSWORDS['ci']}'", "CREATE DATABASE direct OWNER ci")
        s.direct = login(s.superuser, "ci", database="direct")     # a second store, used without the server
        yield s


@pytest.fixture(scope="module")
def workspace_runs(server, tmp_path_factory):
    "The two pipeline runs and the failing commands, in one workspace: {name: (exit code, stdout, stderr)}, the workspace."
    home = tmp_path_factory.mktemp("client")/"cd4ml-home"
    via_server = client_env(server, home, "pipeline")
    direct = {**client_env(server, home, None, lock=False), "MLFLOW_TRACKING_URI": server.direct}
    out = {"run via server": cd4ml(via_server, "run", *TINY, "--json"),
           "run direct": cd4ml(direct, "run", *TINY, "--json"),
           "no such model": cd4ml(direct, "models", "rollback", "--name", "nosuch"),
           "no such run": cd4ml(direct, "reproduce", "0" * 32),
           "wrong lock password": cd4ml({**via_server, "CD4ML_LOCK_URI": server.lock.replace(PASSWORDS["cd4ml_lock"], "wrong")},
                                        "models", "rollback"),
           "wrong store password": cd4ml({**direct, "MLFLOW_TRACKING_URI": server.direct.replace(PASSWORDS["ci"], "wrong")}, "models", "list"),
           "wrong account password": cd4ml({**via_server, "MLFLOW_TRACKING_PASSWORD": "wrong"}, "models", "list")}
    return out, home


def test_the_pipeline_runs_with_every_password_in_use(workspace_runs):
    out, home = workspace_runs
    for name in ("run via server", "run direct"):
        code, stdout, stderr = out[name]
        assert code == 0, f"{name}: {stderr[-3000:]}"
        release = json.loads(stdout)["release"]
        assert (release["status"], release["promoted"]) == ("passed", True), release
    steps = json.loads(out["run direct"][1])["steps"]
    assert [s["name"] for s in steps if not s["cached"]] == ["gate", "register", "release"], steps   # training from the cache


def test_errors_name_the_store_without_its_password(server, workspace_runs):
    out, _ = workspace_runs
    shown = re.sub(r":[^:@/]+@", ":***@", server.direct, count=1)          # postgresql+psycopg://ci:***@127.0.0.1:port/direct
    expected = {"no such model": f"error: no registered model 'nosuch' in {shown}: ",
                "no such run": f"error: no MLflow run '{'0' * 32}' in {shown}; ",
                "wrong lock password": "error: cannot take the lock 'registry:sales' in postgresql://cd4ml_lock:***@127.0.0.1:",
                "wrong account password": f"error: the tracking server {server.url} refused the login of user 'pipeline'",
                "wrong store password": f"error: cannot open the tracking store {shown}: "}     # at once, not after retries
    for name, start in expected.items():
        code, _, stderr = out[name]
        assert code == 2 and stderr.startswith(start) and stderr.count("\n") == 1, (name, stderr)
    for name in ("wrong lock password", "wrong store password"): assert "password authentication failed" in out[name][2]


def test_no_password_at_rest(server, workspace_runs, system_binary):
    out, home = workspace_runs
    found = [hit for name, (_, stdout, stderr) in out.items() for hit in leaks(stdout + stderr, name)]
    files = [p for root in (home, server.home, server.artifacts) for p in root.rglob("*") if p.is_file()]
    assert {"runs", "cache", "logs", "bentoml", "mlartifacts"} <= {p.relative_to(home).parts[0] for p in files if home in p.parents}
    assert any(p.suffix == ".ipynb" for p in files) and any(p.name == "_mlflow.json" for p in files)
    found += [hit for p in files for hit in leaks(p.read_bytes(), str(p))]
    found += leaks(server.log.read_bytes(), "tracking server log")
    pg_dump = Path(system_binary("postgres")).parent/"pg_dump"
    for db in ("mlflow", "direct"):
        dump = subprocess.run([pg_dump, "-h", "127.0.0.1", "-p", str(make_url(server.superuser).port), "-U", "cd4ml", db],
                              env={**os.environ, "PGPASSWORD": PASSWORDS["postgres"]}, capture_output=True, check=True).stdout
        assert b"cd4ml.champion_history" in dump                               # the registry is in there
        found += leaks(dump, f"database {db}")
    assert found == []


def test_no_password_on_a_command_line(server):
    "`ps` shows every process's command line: the server's and its workers' hold no password; the files holding settings are 0600."
    pids = descendants(server.process.pid)
    cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in pids]
    assert any(b"mlflow\0server" in c for c in cmdlines) and sum(b"spawn_main" in c for c in cmdlines) == 2   # server, 2 workers
    assert [hit for p, c in zip(pids, cmdlines) for hit in leaks(c, f"pid {p}")] == []
    server_pid = next(p for p, c in zip(pids, cmdlines) if b"mlflow\0server" in c)
    assert f"MLFLOW_BACKEND_STORE_URI={login(server.superuser, 'mlflow_server')}".encode() in \
        Path(f"/proc/{server_pid}/environ").read_bytes().split(b"\0")            # the store reached it another way
    auth = server.home/"tracking-auth"
    assert (auth.stat().st_mode & 0o777, (auth/"basic_auth.ini").stat().st_mode & 0o777, (auth/"secret-key").stat().st_mode & 0o777) == \
        (0o700, 0o600, 0o600)

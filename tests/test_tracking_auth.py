"""Accounts on the shared tracking server: `CD4ML_AUTH=1 scripts/tracking-server` runs MLflow's basic-auth app in front
of a password-protected PostgreSQL store (`_stores.accounts_server`, the deployment of deploy/README.md).

The `pipeline` account registers versions and owns the registered model; the `dashboard` account (MLflow's default
READ permission, nothing more) lists them but cannot change the champion: one line naming the user and the missing
permission, exit 2, the registry exactly as before. Champion changes through the server from several processes are
serialized by the advisory lock in the server's database (`CD4ML_LOCK_URI`, a role that may only connect).

One cluster and one server for the module. Candidates are real sklearn models logged and gated through the server the
way the gate and register steps do it (`_candidates.gate_and_register`); `cd4ml run` through the server, with the
release step, is in test_secrets.py.
"""
import json, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import mlflow
import psycopg
import pytest
from typer.testing import CliRunner

from _stores import CLIENT_VARS, accounts_server, client_env, sql
from _candidates import LOOSE, gate_and_register, log_candidate, train
from cd4ml import registry
from cd4ml.cli import app
from cd4ml.gates import gate_table
from cd4ml.tracking import setup, store_lock

CD4ML = str(Path(sys.executable).parent/"cd4ml")
REGISTER = """import json, sys
from cd4ml import registry
from cd4ml.gates import gates_from_table
run_id, model_uri, gates, acceptance = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(json.dumps(registry.register_candidate(run_id, model_uri, gates_from_table(gates), acceptance, gated_against="1")))"""


@contextmanager
def as_client(env: dict):
    "This process as the `cd4ml` client `env` describes; its environment and MLflow's URIs are restored after."
    with pytest.MonkeyPatch.context() as mp:
        for k in CLIENT_VARS:
            if env.get(k) is not None: mp.setenv(k, env[k])
            else: mp.delenv(k, raising=False)
        try: yield
        finally: mlflow.set_tracking_uri(""); mlflow.set_registry_uri("")


def models(env: dict, *args):
    "`cd4ml models ...` in this process as `env`'s user: (exit code, output)."
    with as_client(env): r = CliRunner().invoke(app, ["models", *map(str, args)], env={"COLUMNS": "300"})
    return r.exit_code, r.output


def snapshot(env: dict) -> dict:
    "Everything a champion change touches: the registered model's aliases and tags, every version's tags."
    with as_client(env):
        c = registry.client()
        rm = c.get_registered_model("sales")
        return {"aliases": {k: str(v) for k, v in rm.aliases.items()}, "tags": rm.tags, "versions": {v.version: v.tags for v in c.search_model_versions("name='sales'")}}


@pytest.fixture(scope="module")
def server(system_binary, tmp_path_factory):
    with accounts_server(system_binary("postgres"), tmp_path_factory.mktemp("auth")) as s: yield s


@pytest.fixture(scope="module")
def accounts(server, tmp_path_factory):
    "Client environments: the pipeline, the dashboard, the admin (each its own workspace), the pipeline without a lock."
    home = tmp_path_factory.mktemp("clients")
    return {"pipeline": client_env(server, home/"pipeline", "pipeline"), "dashboard": client_env(server, home/"dashboard", "dashboard"),
            "admin": client_env(server, home/"admin", "admin"), "unlocked": client_env(server, home/"pipeline", "pipeline", lock=False)}


@pytest.fixture(scope="module")
def candidates(accounts):
    """As the pipeline: version 1 gated and registered (champion); versions 2 and 3, the same model on the same dataset,
    registered as challengers gated against it; two more such runs not registered yet: returned as (run_id, model_uri,
    gate table)."""
    with as_client(accounts["pipeline"]):
        setup()
        v1, results, _ = gate_and_register(*train(), LOOSE)
        assert v1["aliases"] == ["champion"], gate_table(results)
        runs = [log_candidate(*train()) for _ in range(4)]
        for run_id, uri in runs[:2]: registry.register_candidate(run_id, uri, results, LOOSE, auto_promote=False, gated_against="1")
        return [(run_id, uri, gate_table(results)) for run_id, uri in runs[2:]]


def test_a_reader_lists_but_cannot_change_the_champion(server, accounts, candidates):
    before = snapshot(accounts["admin"])
    assert before["aliases"] == {"champion": "1", "challenger": "3"}
    code, out = models(accounts["dashboard"], "list", "--json")
    assert code == 0 and [(v["version"], v["status"]) for v in json.loads(out)] == \
        [("1", "champion"), ("2", "challenger"), ("3", "challenger")]
    for args, action in ((["promote", 2], "promote version 2 of 'sales'"), (["promote", 2, "--force"], "promote version 2 of 'sales'"),
                         (["rollback", "--to", 1], "roll back 'sales'")):
        code, out = models(accounts["dashboard"], *args)
        assert code == 2 and out.strip() == (f"error: user 'dashboard' lacks MANAGE permission on registered model 'sales' at "
                                             f"{server.url}, so it cannot {action}; an MLflow admin can grant it (see deploy/README.md)")
    # without CD4ML_LOCK_URI a change through the server is refused, before anything is written
    code, out = models(accounts["unlocked"], "promote", 2)
    assert code == 2 and f"tracking server {server.url} needs a lock: set CD4ML_LOCK_URI" in out
    # no login, a wrong password
    code, out = models({**accounts["dashboard"], "MLFLOW_TRACKING_USERNAME": None}, "list")
    assert code == 2 and f"the tracking server {server.url} refused a request without login" in out
    code, out = models({**accounts["pipeline"], "MLFLOW_TRACKING_PASSWORD": "wrong"}, "promote", 2)
    assert code == 2 and "refused the login of user 'pipeline': set MLFLOW_TRACKING_USERNAME" in out
    assert snapshot(accounts["admin"]) == before


def test_concurrent_champion_changes_through_the_server_lose_nothing(accounts, candidates):
    """Two `cd4ml models promote` and two auto-promoting registrations, four processes at once, all as the pipeline:
    each is re-checked under the lock against the champion it replaces (same dataset: their scores compare), so all
    four become champion in turn; the history stack and the champion log record every change in the same order."""
    env = accounts["pipeline"]
    jobs = [[CD4ML, "models", "promote", "2", "--json"], [CD4ML, "models", "promote", "3", "--json"],
            *([sys.executable, "-c", REGISTER, run_id, uri, json.dumps(gates), json.dumps(LOOSE)] for run_id, uri, gates in candidates)]
    def run(argv): return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    with ThreadPoolExecutor(len(jobs)) as pool: done = list(pool.map(run, jobs))
    assert [r.returncode for r in done] == [0] * 4, [r.stderr[-2000:] for r in done]
    promoted, registered = [json.loads(r.stdout) for r in done[:2]], [json.loads(r.stdout) for r in done[2:]]
    with as_client(env):
        history, log = registry.champion_history(), registry.champion_log()
        versions = {v["version"]: v for v in registry.list_versions()}
    new = history[1:]
    assert history[0] == "1" and sorted(new) == sorted(["2", "3", *(v["version"] for v in registered)])
    changes = [e for e in log if e["action"] in ("promote", "register") and e["previous"] is not None]
    assert [(e["version"], e["previous"]) for e in changes] == list(zip(new, history[:-1]))    # one change per step, in order
    for p in promoted:                                        # the re-check compared it with the champion it replaced
        previous = history[history.index(p["version"]) - 1]
        assert p["previous"] == previous and p["recheck"][0]["result"] == "pass" and f"version {previous}" in p["recheck"][0]["detail"]
    for v in registered:
        previous = history[history.index(v["version"]) - 1]
        assert versions[v["version"]]["champion_at_registration"] == "1" and not versions[v["version"]]["promotion_declined"]
        assert all(g.passed for g in registry.stored_recheck(versions[v["version"]], versions[previous]))
    assert versions[history[-1]]["status"] == "champion" and {versions[v]["status"] for v in history[:-1]} == {"retired"}


def test_the_lock_is_held_in_the_servers_database(server, accounts, candidates):
    "A champion change through the server waits for the advisory lock in PostgreSQL, taken with a role that can read nothing."
    with pytest.raises(psycopg.errors.InsufficientPrivilege): sql(server.lock, "SELECT * FROM model_versions")
    env = accounts["pipeline"]
    with as_client(env): history = registry.champion_history()
    waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    with as_client(env), store_lock("registry:sales"):
        rollback = subprocess.Popen([CD4ML, "models", "rollback", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(1200):                                  # until it waits on the lock (it first imports cd4ml: seconds)
            if sql(server.superuser, waiting) == [(1,)]: break
            assert rollback.poll() is None, rollback.communicate()
            time.sleep(0.1)
        else: pytest.fail("the rollback never waited for the lock")
        assert registry.champion_history() == history           # nothing changed while we hold the lock
    out, err = rollback.communicate(timeout=300)
    assert rollback.returncode == 0, err
    assert (json.loads(out)["version"], json.loads(out)["previous"]) == (history[-2], history[-1])
    with as_client(env): assert registry.champion_history() == history[:-1]

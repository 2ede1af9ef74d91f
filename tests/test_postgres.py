"""Shared tracking: `cd4ml run`, the registry and rollback on a real PostgreSQL MLflow store, and concurrent runs
against one store (PostgreSQL and SQLite).

A throwaway PostgreSQL cluster (`_stores.pg_cluster`) serves this module.

Each `cd4ml run` is a real subprocess (papermill kernels, gates, register step) on tiny data; the concurrent runs use
distinct seeds and separate CD4ML_HOME workspaces but one MLFLOW_TRACKING_URI, as several machines sharing a store.
The store's schema is created before the concurrent runs start (here by the sequential runs, or one client call):
concurrent *first* connections to an empty store race in MLflow's schema migration — see deploy/README.md.
"""
import json, os, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest

from _stores import pg_cluster, sql, tracking_server
from test_pipeline import copy_project

CD4ML = str(Path(sys.executable).parent/"cd4ml")
TINY = ["-p", "stores=3", "-p", "items=8", "-p", "days=200", "-p", "horizon=7", "-p", "n_train=4", "-p", "n_valid=2",
        "-p", "models=moving_average,ridge", "-j", "1", "-p", "release.bento=false"]   # the Bento release: test_release.py, test_concurrent_release.py
LENIENT = ["-p", "acceptance.max_nwrmsle=10", "-p", "acceptance.min_improvement_vs_baseline=-10",   # runs on any seed register
           "-p", "acceptance.max_regression_vs_champion=10", "-p", "acceptance.max_segment_ratio=100"]
SEEDS = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def postgres(system_binary):
    "A throwaway PostgreSQL cluster with an empty `mlflow` database; yields its SQLAlchemy URI (psycopg 3 driver)."
    with pg_cluster(system_binary("postgres")) as uri: yield uri


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "The default pipeline: ... → evaluate → gate → register."
    return copy_project(tmp_path_factory.mktemp("project"), gates=True)


@pytest.fixture(scope="module")
def training_only(tmp_path_factory):
    "The pipeline up to evaluate (no registry steps): what the SQLite concurrency test can afford."
    return copy_project(tmp_path_factory.mktemp("training-only"))


def cli_env(home: Path, uri: str) -> dict:
    return {**os.environ, "CD4ML_HOME": str(home), "MLFLOW_TRACKING_URI": uri}


def cd4ml(*args, env):
    "The CLI in a subprocess: its parsed --json output."
    r = subprocess.run([CD4ML, *map(str, args), "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def models(monkeypatch):
    "`cd4ml models ...` in this process (a subprocess spends ~10 s importing): the parsed --json output."
    from typer.testing import CliRunner
    from cd4ml.cli import app
    def call(env, *args):
        for k in ("CD4ML_HOME", "MLFLOW_TRACKING_URI"): monkeypatch.setenv(k, env[k])
        r = CliRunner().invoke(app, ["models", *args, "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)
    return call


def run(project, env, *args):
    return cd4ml("run", project, *TINY, *args, env=env)


def check_recorded(client: mlflow.MlflowClient, result: dict):
    "The parent run finished with its lineage, and every candidate's nested run holds exactly the metrics reported."
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cd4ml.dataset"] == result["dataset"]
    assert parent.data.metrics["best_nwrmsle"] == pytest.approx(result["best"]["metrics"]["nwrmsle"], rel=1e-12)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_id for c in children} >= {c["run_id"] for c in result["candidates"]}
    assert all(c.info.status == "FINISHED" for c in children)
    for c in result["candidates"]:
        child = client.get_run(c["run_id"])
        assert child.data.params["model"] == c["model"]
        assert {k: child.data.metrics[k] for k in c["metrics"]} == pytest.approx(c["metrics"], rel=1e-12)
        assert "importance.csv" in {a.path for a in client.list_artifacts(c["run_id"])}   # artifacts readable too


def check_promotions(client: mlflow.MlflowClient, new: set[int], history_before: list[str]):
    """Compare and swap under the store lock, after concurrent runs registered the versions `new`: each promoted
    version was gated against the champion it replaced (the seeds differ, so no stored re-check could pass across
    datasets); every other one was declined, with the reason."""
    model = client.get_registered_model("sales")
    champion, history = model.aliases["champion"], json.loads(model.tags["cd4ml.champion_history"])
    assert history[-1] == str(champion) and champion in new                # the registry's pointers agree
    promoted = history[len(history_before):]
    assert history[:len(history_before)] == history_before and promoted     # nothing lost from the stack
    versions = {int(v.version): v for v in client.search_model_versions("name = 'sales'")}
    for previous, version in zip((history_before[-1:] or [""]) + promoted, promoted):   # "": gated with no champion
        assert (versions[int(version)].tags.get("champion_at_registration") or "") == previous, (history, version)
    for v in new - {int(p) for p in promoted}:
        assert "champion changed" in versions[v].tags["promotion_declined"] and "not comparable" in versions[v].tags["promotion_declined"]
    log = json.loads(model.tags["cd4ml.champion_log"])
    assert sorted(e["version"] for e in log if e["action"] == "register" and int(e["version"]) in new) == sorted(map(str, new))


def concurrently(project, tmp_path, uri, *args) -> list[dict]:
    "`cd4ml run` in one subprocess per seed, all at once, each in its own workspace, all on the store at `uri`."
    def one(seed): return run(project, cli_env(tmp_path/f"home-{seed}", uri), "-p", f"seed={seed}", *args)
    with ThreadPoolExecutor(len(SEEDS)) as pool: return list(pool.map(one, SEEDS))


@pytest.fixture(scope="module")
def sequential(postgres, project, tmp_path_factory):
    "Two runs in one workspace on the PostgreSQL store: the first registers version 1, the second version 2."
    env = cli_env(tmp_path_factory.mktemp("pg-seq")/"cd4ml-home", postgres)
    first = run(project, env)
    second = run(project, env, "-p", "seed=1", *LENIENT)
    return env, first, second


def test_pipeline_registry_and_rollback_on_postgres(postgres, sequential, models):
    env, first, second = sequential
    client = mlflow.MlflowClient(tracking_uri=postgres, registry_uri=postgres)
    for result in (first, second): check_recorded(client, result)
    assert first["registered"] == {"name": "sales", "version": "1", "aliases": ["champion"]}
    assert second["gated"]["champion"] == "1"                           # gated against the champion in PostgreSQL
    assert second["registered"] == {"name": "sales", "version": "2", "aliases": ["champion"]}
    assert not (Path(env["CD4ML_HOME"])/"mlflow.db").exists()            # nothing fell back to the SQLite default
    parents = sorted(r["parent_run_id"] for r in (first, second))
    assert sorted(r for r, in sql(postgres, "SELECT run_uuid FROM runs WHERE run_uuid IN "
                                            f"('{parents[0]}', '{parents[1]}') AND status = 'FINISHED'")) == parents
    assert sql(postgres, "SELECT version, run_id FROM model_versions WHERE name = 'sales' ORDER BY version") == \
        [(1, first["gated"]["run_id"]), (2, second["gated"]["run_id"])]
    assert [(v["version"], v["status"]) for v in models(env, "list")] == [("1", "retired"), ("2", "champion")]
    back = models(env, "rollback")
    assert (back["version"], back["previous"], back["dataset_version"]) == ("1", "2", first["dataset"])
    assert client.get_registered_model("sales").aliases == {"champion": 1}
    assert [(v["version"], v["status"]) for v in models(env, "list")] == [("1", "champion"), ("2", "rolled_back")]


def test_concurrent_runs_on_postgres(postgres, project, sequential, tmp_path):
    "Four runs at once on one PostgreSQL store: every run, metric and model version is recorded, none corrupt."
    before = {v for v, in sql(postgres, "SELECT version FROM model_versions WHERE name = 'sales'")}
    client = mlflow.MlflowClient(tracking_uri=postgres, registry_uri=postgres)
    history_before = json.loads(client.get_registered_model("sales").tags["cd4ml.champion_history"])
    results = concurrently(project, tmp_path, postgres, *LENIENT)
    assert len({r["parent_run_id"] for r in results}) == len({r["dataset"] for r in results}) == len(SEEDS)
    for result in results: check_recorded(client, result)
    versions = {int(v.version): v for v in client.search_model_versions("name = 'sales'")}
    new = {int(r["registered"]["version"]) for r in results}
    assert new == set(versions) - before and len(new) == len(SEEDS)   # one new version each, numbers not reused
    for r in results:
        v = versions[int(r["registered"]["version"])]
        assert v.run_id == r["gated"]["run_id"] and v.tags["dataset_version"] == r["dataset"]
    check_promotions(client, new, history_before)


def test_concurrent_runs_on_sqlite(training_only, tmp_path):
    "Four training runs at once on one SQLite file (four workspaces sharing it): SQLite serializes the writers."
    uri = f"sqlite:///{tmp_path/'shared.db'}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()          # create the schema once (see the module doc)
    results = concurrently(training_only, tmp_path, uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert len({r["parent_run_id"] for r in results}) == len({r["dataset"] for r in results}) == len(SEEDS)
    for result in results: check_recorded(client, result)
    runs = client.search_runs([client.get_experiment_by_name("cd4ml").experiment_id], "attributes.status = 'FINISHED'")
    assert len(runs) == len(SEEDS) * 3                                  # 4 parents with 2 candidates each, nothing else


def test_tracking_server_script(postgres, sequential, tmp_path):
    "`scripts/tracking-server` (make tracking-server) serves the PostgreSQL store over HTTP and proxies artifacts."
    artifacts = tmp_path/"artifacts"
    env = {**os.environ, "CD4ML_HOME": str(tmp_path/"home"), "CD4ML_DB_URI": postgres, "CD4ML_ARTIFACTS": str(artifacts)}
    with tracking_server(env, tmp_path/"server.log") as (url, _):
        client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
        _, first, second = sequential
        assert client.get_run(second["parent_run_id"]).data.tags["cd4ml.dataset"] == second["dataset"]   # the same store
        direct = mlflow.MlflowClient(tracking_uri=postgres, registry_uri=postgres).get_registered_model("sales")
        assert str(client.get_registered_model("sales").aliases["champion"]) == str(direct.aliases["champion"])
        exp = client.create_experiment("via-server")
        assert client.get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")   # proxied: clients need no store access
        run = client.create_run(exp)
        (tmp_path/"note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path/"note.txt"))
        client.log_metric(run.info.run_id, "x", 1.5)
        client.set_terminated(run.info.run_id)
        [stored] = artifacts.rglob("note.txt")
        assert stored.read_text() == "hello" and run.info.run_id in str(stored)
        assert sql(postgres, f"SELECT value FROM metrics WHERE run_uuid = '{run.info.run_id}' AND key = 'x'") == [(1.5,)]

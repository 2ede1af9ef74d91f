"""Runs that share one tracking store, one after another and at once: a PostgreSQL store (a team's tracking server)
and a workspace's own SQLite file; `make tracking-server` on the PostgreSQL store.

PostgreSQL: a database of its own in the session's throwaway cluster (the `postgres` fixture). Two runs one after the
other register versions 1 and 2 (the registry: compare with the champion, rollback); then three `cd4ml run`s of the
default pipeline start at once, each in its own workspace as on three machines, release step on (as `make pipeline`
runs it): every run, metric and model version must be recorded, and each promotion gated against the champion it
replaced.

SQLite: three `cd4ml run`s at once in ONE workspace (one CD4ML_HOME: one SQLite file, one BentoML store), release
step on. Each release imports its registered version into the shared BentoML store, builds a Bento, serves it and
checks it against offline predictions while the other two do the same. Every run must exit 0 having built, served
and parity-checked exactly the version it registered; the champion history must stay consistent (each promotion
gated against the champion it replaced, the other versions declined with the reason). Before the fix two of three
releases failed: `bentofile.yaml` packaged `cd4ml-sales:latest` and the service loaded `cd4ml-sales:latest`, the
model another run had imported last, which knew other stores and items (`/predict answered 422`).

Each `cd4ml run` is a real subprocess (papermill kernels, gates, register and release steps) on tiny data, with
distinct seeds. The store's schema is created before the concurrent runs start (by the runs before them, or one
client call): concurrent *first* connections to an empty store race in MLflow's schema migration — see
deploy/README.md. One more test serves a built Bento on a port an impostor server already holds: the release must
notice that the server answering there is not its Bento and serve on another port.
"""
import json, os, threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from _stores import sql, tracking_server

ROOT = Path(__file__).resolve().parents[1]
TINY = ["-p", "days=200", "-p", "horizon=7", "-p", "n_train=4", "-p", "n_valid=2", "-p", "models=moving_average,ridge", "-j", "1"]
AT_ONCE = ["-p", "stores=2", "-p", "items=6"]      # three runs share two cores
LENIENT = ["-p", "acceptance.max_nwrmsle=10", "-p", "acceptance.min_improvement_vs_baseline=-10",   # runs on any seed register
           "-p", "acceptance.max_regression_vs_champion=10", "-p", "acceptance.max_segment_ratio=100"]


def at_once(cli, runs: list[tuple[dict, int]]) -> list[tuple[int, dict | None, str]]:
    """`cd4ml run` of the project's pipeline.yaml once per (environment, seed) of `runs`, all at once, on tiny data that
    registers on any seed: (exit code, summary, stderr on one line) each."""
    def one(run):
        env, seed = run
        r = cli(env, "run", *TINY, *AT_ONCE, *LENIENT, "-p", f"seed={seed}", "--json", timeout=1200)
        return r.returncode, r.json, r.message
    with ThreadPoolExecutor(len(runs)) as pool: return list(pool.map(one, runs))


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


def packaged(home: Path, bento: str) -> tuple[dict, dict]:
    "The model entry of Bento `bento`'s bento.yaml, and that BentoML model's model.yaml, from the workspace's store."
    name, version = bento.split(":")
    [entry] = yaml.safe_load((home/"bentoml"/"bentos"/name/version/"bento.yaml").read_text())["models"]
    model, model_version = entry["tag"].split(":")
    return entry, yaml.safe_load((home/"bentoml"/"models"/model/model_version/"model.yaml").read_text())


def check_released(client: mlflow.MlflowClient, home: Path, result: dict, scratch: Path):
    "The run's release built, served and parity-checked exactly the version it registered, pinned in its Bento."
    version, rel = result["registered"]["version"], result["release"]
    assert (rel["status"], rel["version"]) == ("passed", version)
    assert rel["smoke"] == {"/livez": 200, "/readyz": 200, "/predict": 200, "/feedback": 200}
    m = rel["measured"]
    assert m["versions_match"] is True and m["parity_max_abs_diff"] <= 1e-9 and m["errors"] == 0   # served = its own version
    recorded = json.loads(Path(client.download_artifacts(result["parent_run_id"], "release/release.json", str(scratch))).read_text())
    assert (recorded["bento"], recorded["version"]) == (rel["bento"], version)
    entry, model = packaged(home, rel["bento"])          # the Bento pins the model imported from this version
    assert entry["alias"] == "packaged" and not entry["tag"].endswith(":latest")
    assert model["labels"] == {"registry_version": version, "dataset_version": result["dataset"]}
    assert (model["metadata"]["version"], model["metadata"]["model_uri"]) == (version, f"models:/sales/{version}")
    tags = client.get_model_version("sales", version).tags
    assert [g["result"] for g in json.loads(tags["release_gates"])] == ["pass"] * 5 and "release_failed" not in tags


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


# ---------------------------------------------------------------------------------------------------------------------
# PostgreSQL

@pytest.fixture(scope="module")
def pg(postgres):
    "An empty database of the session's PostgreSQL cluster: this module's tracking store."
    return postgres.database("tracking")


def on(ws, uri: str) -> dict:
    "The environment of a `cd4ml` subprocess in workspace `ws` tracking to the store at `uri`."
    return {**ws.env, "MLFLOW_TRACKING_URI": uri}


@pytest.fixture(scope="module")
def sequential(pg, new_workspace, cli):
    """Two runs in one workspace on the PostgreSQL store, the Bento release skipped (the release on this store: the
    runs at once below): the first registers version 1, the second version 2."""
    env = on(new_workspace("pg-seq"), pg)
    run = ["run", *TINY, "-p", "stores=3", "-p", "items=8", "-p", "release.bento=false"]
    return env, cli.json(env, *run), cli.json(env, *run, "-p", "seed=1", *LENIENT)


@pytest.fixture
def models(monkeypatch):
    "`cd4ml models ...` in this process (a subprocess spends seconds importing): the parsed --json output."
    from typer.testing import CliRunner
    from cd4ml.cli import app
    def call(env, *args):
        for k in ("CD4ML_HOME", "MLFLOW_TRACKING_URI"): monkeypatch.setenv(k, env[k])
        r = CliRunner().invoke(app, ["models", *args, "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)
    return call


def test_pipeline_registry_and_rollback_on_postgres(pg, sequential, models):
    env, first, second = sequential
    client = mlflow.MlflowClient(tracking_uri=pg, registry_uri=pg)
    for result in (first, second): check_recorded(client, result)
    assert first["registered"] == {"name": "sales", "version": "1", "aliases": ["champion"]}
    assert second["gated"]["champion"] == "1"                           # gated against the champion in PostgreSQL
    assert second["registered"] == {"name": "sales", "version": "2", "aliases": ["champion"]}
    assert not (Path(env["CD4ML_HOME"])/"mlflow.db").exists()            # nothing fell back to the SQLite default
    parents = sorted(r["parent_run_id"] for r in (first, second))
    assert sorted(r for r, in sql(pg, "SELECT run_uuid FROM runs WHERE run_uuid IN "
                                      f"('{parents[0]}', '{parents[1]}') AND status = 'FINISHED'")) == parents
    assert sql(pg, "SELECT version, run_id FROM model_versions WHERE name = 'sales' ORDER BY version") == \
        [(1, first["gated"]["run_id"]), (2, second["gated"]["run_id"])]
    assert [(v["version"], v["status"]) for v in models(env, "list")] == [("1", "retired"), ("2", "champion")]
    back = models(env, "rollback")
    assert (back["version"], back["previous"], back["dataset_version"]) == ("1", "2", first["dataset"])
    assert client.get_registered_model("sales").aliases == {"champion": 1}
    assert [(v["version"], v["status"]) for v in models(env, "list")] == [("1", "champion"), ("2", "rolled_back")]


@pytest.fixture(scope="module")
def pg_at_once(pg, sequential, new_workspace, cli):
    """Three runs at once on the PostgreSQL store after `sequential`, each in a workspace of its own (three machines
    sharing a tracking server): their workspaces and results, and the registry's versions and champion history before."""
    client = mlflow.MlflowClient(tracking_uri=pg, registry_uri=pg)
    before = {v for v, in sql(pg, "SELECT version FROM model_versions WHERE name = 'sales'")}
    history = json.loads(client.get_registered_model("sales").tags["cd4ml.champion_history"])
    seeds = (11, 12, 13)
    workspaces = [new_workspace(f"pg-{seed}") for seed in seeds]
    results = at_once(cli, [(on(ws, pg), seed) for ws, seed in zip(workspaces, seeds)])
    return workspaces, results, before, history


def test_concurrent_runs_on_postgres(pg, pg_at_once, tmp_path):
    """Three runs at once on one PostgreSQL store, release step on: every run, metric and model version is recorded,
    none corrupt; each release served its own version; the promotions were compared and swapped under the store lock."""
    workspaces, results, before, history_before = pg_at_once
    for rc, out, err in results: assert rc == 0 and out is not None, err
    client = mlflow.MlflowClient(tracking_uri=pg, registry_uri=pg)
    assert len({out["parent_run_id"] for _, out, _ in results}) == len({out["dataset"] for _, out, _ in results}) == len(results)
    for ws, (_, out, _) in zip(workspaces, results):
        check_recorded(client, out)
        check_released(client, ws.home, out, tmp_path)
        assert not (ws.home/"mlflow.db").exists()                       # nothing fell back to the SQLite default
    versions = {int(v.version): v for v in client.search_model_versions("name = 'sales'")}
    new = {int(out["registered"]["version"]) for _, out, _ in results}
    assert new == set(versions) - before and len(new) == len(results)   # one new version each, numbers not reused
    for _, out, _ in results:
        v = versions[int(out["registered"]["version"])]
        assert v.run_id == out["gated"]["run_id"] and v.tags["dataset_version"] == out["dataset"]
    check_promotions(client, new, history_before)


def test_tracking_server_script(pg, sequential, tmp_path):
    "`scripts/tracking-server` (make tracking-server) serves the PostgreSQL store over HTTP and proxies artifacts."
    artifacts = tmp_path/"artifacts"
    env = {**os.environ, "CD4ML_HOME": str(tmp_path/"home"), "CD4ML_DB_URI": pg, "CD4ML_ARTIFACTS": str(artifacts)}
    with tracking_server(env, tmp_path/"server.log") as (url, _):
        client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
        _, first, second = sequential
        assert client.get_run(second["parent_run_id"]).data.tags["cd4ml.dataset"] == second["dataset"]   # the same store
        direct = mlflow.MlflowClient(tracking_uri=pg, registry_uri=pg).get_registered_model("sales")
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
        assert sql(pg, f"SELECT value FROM metrics WHERE run_uuid = '{run.info.run_id}' AND key = 'x'") == [(1.5,)]


# ---------------------------------------------------------------------------------------------------------------------
# SQLite: one workspace

@pytest.fixture(scope="module")
def sqlite_at_once(new_workspace, cli):
    "Three runs at once in one workspace on its default store, as `make pipeline` uses it: $CD4ML_HOME/mlflow.db."
    ws = new_workspace("at-once")
    ws.home.mkdir()
    ws.client().search_experiments()             # the schema first (see the module's doc)
    return ws, at_once(cli, [(ws.env, seed) for seed in (1, 2, 3)])


def test_concurrent_releases_in_one_workspace_each_serve_their_own_version(sqlite_at_once, tmp_path):
    ws, results = sqlite_at_once
    for rc, out, err in results: assert rc == 0 and out is not None, err
    client = ws.client()
    for _, out, _ in results:
        check_recorded(client, out)                  # SQLite serialized the writers
        check_released(client, ws.home, out, tmp_path)
    assert len({out["release"]["bento"] for _, out, _ in results}) == len({out["dataset"] for _, out, _ in results}) == len(results)
    new = {int(out["registered"]["version"]) for _, out, _ in results}
    assert new == {1, 2, 3}
    check_promotions(client, new, history_before=[])
    finished = client.search_runs([client.get_experiment_by_name("cd4ml").experiment_id], "attributes.status = 'FINISHED'")
    assert len(finished) == len(results) * 3                                # 3 parents with 2 candidates each, nothing else
    # each release server had a BentoML home of its own: `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir
    # when it starts, which would wipe the metrics of every other server on the workspace's store
    assert not (ws.home/"bentoml"/"prometheus_multiproc_dir").exists()


class Impostor(BaseHTTPRequestHandler):
    "Answers like a ready BentoML server of another Bento."
    def do_GET(self):
        body = json.dumps({"info": {"title": "cd4ml-forecast", "version": "someoneelse"}} if self.path == "/docs.json" else {}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass


def test_a_port_held_by_another_server_is_not_mistaken_for_ours(sqlite_at_once, free_port, tmp_path, monkeypatch):
    "Two releases can be handed the same free port: the one that loses the race serves on another, never tests the other's."
    from cd4ml.release import bento_server
    ws, results = sqlite_at_once
    bento = results[0][1]["release"]["bento"]
    monkeypatch.setenv("CD4ML_HOME", str(ws.home))
    impostor = ThreadingHTTPServer(("127.0.0.1", free_port()), Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    taken = impostor.server_address[1]
    try:
        with bento_server(bento, tmp_path/"server.log", port=taken) as (base, _):
            assert base != f"http://127.0.0.1:{taken}"
            assert httpx.get(f"{base}/docs.json").json()["info"]["version"] == bento.split(":")[1]
    finally: impostor.shutdown()
    log = (tmp_path/"server.log").read_text()
    assert f"port {taken} is taken" in log and "Address already in use" in log

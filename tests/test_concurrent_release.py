"""Concurrent releases: three `cd4ml run`s of the default pipeline, release step on (as `make pipeline` runs it),
started at once in ONE workspace (one CD4ML_HOME, so one BentoML store) on one tracking store — SQLite, then a
throwaway PostgreSQL cluster (test_postgres.py's fixture).

Each release imports its registered version into the shared BentoML store, builds a Bento, serves it and checks it
against offline predictions while the other two do the same. Every run must exit 0 having built, served and
parity-checked exactly the version it registered; the champion history must stay consistent (each promotion gated
against the champion it replaced, the other versions declined with the reason). Before the fix two of three
releases failed: `bentofile.yaml` packaged `cd4ml-sales:latest` and the service loaded `cd4ml-sales:latest`,
the model another run had imported last, which knew other stores and items (`/predict answered 422`).

One more test serves a built Bento on a port an impostor server already holds: the release must notice that the
server answering there is not its Bento and serve on another port.
"""
import json, os, subprocess, sys, threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from _stores import free_port
from test_postgres import LENIENT, check_promotions, postgres   # noqa: F401 (postgres: a fixture, one cluster per module)

ROOT = Path(__file__).resolve().parents[1]
CD4ML = str(Path(sys.executable).parent/"cd4ml")
TINY = ["-p", "stores=2", "-p", "items=6", "-p", "days=200", "-p", "horizon=7", "-p", "n_train=4", "-p", "n_valid=2",
        "-p", "models=moving_average,ridge", "-j", "1", *LENIENT]
SEEDS = [1, 2, 3]


def run_at_once(home: Path, uri: str | None = None) -> list[tuple[int, dict | None, str]]:
    "`cd4ml run` of the project's pipeline.yaml once per seed, all at once, in workspace `home` on the store at `uri` (None: its own SQLite file)."
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"CD4ML_HOME": str(home)}
    if uri: env["MLFLOW_TRACKING_URI"] = uri
    mlflow.MlflowClient(tracking_uri=uri or f"sqlite:///{home/'mlflow.db'}").search_experiments()   # the schema first: see test_postgres.py's module doc
    def one(seed):
        r = subprocess.run([CD4ML, "run", *TINY, "-p", f"seed={seed}", "--json"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1200)
        return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None), " ".join(r.stderr.split())
    with ThreadPoolExecutor(len(SEEDS)) as pool: return list(pool.map(one, SEEDS))


@pytest.fixture(scope="module")
def sqlite_runs(tmp_path_factory):
    "The workspace's default store, as `make pipeline` uses it: $CD4ML_HOME/mlflow.db."
    home = tmp_path_factory.mktemp("concurrent-sqlite")/"cd4ml-home"
    home.mkdir()
    return home, f"sqlite:///{home/'mlflow.db'}", run_at_once(home)


@pytest.fixture(scope="module")
def postgres_runs(postgres, tmp_path_factory):
    home = tmp_path_factory.mktemp("concurrent-pg")/"cd4ml-home"
    return home, postgres, run_at_once(home, postgres)


def packaged(home: Path, bento: str) -> tuple[dict, dict]:
    "The model entry of Bento `bento`'s bento.yaml, and that BentoML model's model.yaml, from the workspace's store."
    name, version = bento.split(":")
    [entry] = yaml.safe_load((home/"bentoml"/"bentos"/name/version/"bento.yaml").read_text())["models"]
    model, model_version = entry["tag"].split(":")
    return entry, yaml.safe_load((home/"bentoml"/"models"/model/model_version/"model.yaml").read_text())


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_concurrent_releases_each_serve_their_own_version(store, request, tmp_path):
    home, uri, results = request.getfixturevalue(f"{store}_runs")
    for rc, out, err in results: assert rc == 0 and out is not None, err
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    for _, out, _ in results:
        version, rel = out["registered"]["version"], out["release"]
        assert (rel["status"], rel["version"]) == ("passed", version)
        assert rel["smoke"] == {"/livez": 200, "/readyz": 200, "/predict": 200}
        m = rel["measured"]
        assert m["versions_match"] is True and m["parity_max_abs_diff"] <= 1e-9 and m["errors"] == 0   # served = its own version
        recorded = json.loads(Path(client.download_artifacts(out["parent_run_id"], "release/release.json", str(tmp_path))).read_text())
        assert (recorded["bento"], recorded["version"]) == (rel["bento"], version)
        entry, model = packaged(home, rel["bento"])          # the Bento pins the model imported from this version
        assert entry["alias"] == "packaged" and not entry["tag"].endswith(":latest")
        assert model["labels"] == {"registry_version": version, "dataset_version": out["dataset"]}
        assert (model["metadata"]["version"], model["metadata"]["model_uri"]) == (version, f"models:/sales/{version}")
        tags = client.get_model_version("sales", version).tags
        assert [g["result"] for g in json.loads(tags["release_gates"])] == ["pass"] * 5 and "release_failed" not in tags
    assert len({out["release"]["bento"] for _, out, _ in results}) == len({out["dataset"] for _, out, _ in results}) == len(SEEDS)
    new = {int(out["registered"]["version"]) for _, out, _ in results}
    assert new == {1, 2, 3}
    check_promotions(client, new, history_before=[])
    # each release server had a BentoML home of its own: `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir
    # when it starts, which would wipe the metrics of every other server on the workspace's store
    assert not (home/"bentoml"/"prometheus_multiproc_dir").exists()


class Impostor(BaseHTTPRequestHandler):
    "Answers like a ready BentoML server of another Bento."
    def do_GET(self):
        body = json.dumps({"info": {"title": "cd4ml-forecast", "version": "someoneelse"}} if self.path == "/docs.json" else {}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass


def test_a_port_held_by_another_server_is_not_mistaken_for_ours(sqlite_runs, tmp_path, monkeypatch):
    "Two releases can be handed the same free port: the one that loses the race serves on another, never tests the other's."
    from cd4ml.release import bento_server
    home, _, results = sqlite_runs
    bento = results[0][1]["release"]["bento"]
    monkeypatch.setenv("CD4ML_HOME", str(home))
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

"""The dask engine on a cluster started apart, as on several machines: `cd4ml run -p engine=dask` with
DASK_SCHEDULER_ADDRESS naming a `dask scheduler` on loopback that two `dask worker` processes joined, each in its
own working directory, one with an empty CD4ML_HOME of its own and one with none. The parts and scratch files are
under a shared location (CD4ML_SHARED_URL, a file:// URL) that is neither the driver's workspace nor a worker's.

The run is the users' one, release step included (the Bento built, served, tested and promoted), on the users' data:
a Kaggle-style Favorita folder streamed into parts by `cd4ml data import FOLDER --engine dask`. Its dataset version
must be the one a pandas-engine run generates from the same simulation and its candidates' metrics that run's; the
features must have been computed by those two workers (a LocalCluster would leave their logs empty), and the workers
must not have touched a workspace.
"""
import json, os, signal, subprocess, sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from _stores import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["-p", "stores=3", "-p", "items=10", "-p", "days=200", "-p", "horizon=7", "-p", "n_train=4", "-p", "n_valid=2",
        "-p", "models=moving_average,ridge", "-p", "part_rows=1000"]     # about 1000 rows per store: one store per part
PARTS = 3


def stop(procs: list):
    "Terminate each process group, then kill what is left after 10 s."
    for p in procs:
        try: os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError: pass
    for p in procs:
        try: p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    "A `dask scheduler` on a loopback port and two `dask worker` processes, each in its own folder and session."
    from distributed import Client
    base = tmp_path_factory.mktemp("cluster")
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("CD4ML_HOME", "CD4ML_SHARED_URL", "DASK_SCHEDULER_ADDRESS")}
    worker = ["worker", address, "--nthreads", "1", "--no-dashboard"]
    members = {"scheduler": (["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"], {}),
               "worker-a": ([*worker, "--name", "worker-a"], {}),                                    # no CD4ML_HOME
               "worker-b": ([*worker, "--name", "worker-b"], {"CD4ML_HOME": str(base/"worker-b-home")})}  # its own, empty
    (base/"worker-b-home").mkdir()
    procs = []
    try:
        for name, (args, extra) in members.items():
            (base/name).mkdir()
            with open(base/f"{name}.log", "w") as log:
                procs.append(subprocess.Popen([str(BIN/"dask"), *args], cwd=base/name, env={**env, **extra}, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            names = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
        assert names == ["worker-a", "worker-b"]
        yield SimpleNamespace(address=address, base=base)
    finally:
        stop(procs)


def run(args: list, env: dict, cwd: Path) -> dict:
    cwd.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([str(BIN/"cd4ml"), "run", *args, *TINY, "--json"], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def tasks_computed(address: str) -> dict:
    "Worker name -> the keys of the feature tasks the scheduler had it compute."
    from distributed import Client
    def computed(dask_worker):
        return [str(e[0]) for e in dask_worker.state.log if len(e) == 5 and e[1] == "compute-task"]
    with Client(address, timeout=30) as client:
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
        return {names[a]: [k for k in keys if k.startswith("_part_frame")] for a, keys in client.run(computed).items()}


def metrics(result) -> dict:
    return {c["model"]: c["metrics"] for c in result["candidates"]}


def test_dask_engine_on_a_separate_cluster(cluster, tmp_path):
    base_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DASK_SCHEDULER_ADDRESS",
                                                                  "CD4ML_SHARED_URL", "CD4ML_HOME")}
    shared = tmp_path/"shared"
    env = {**base_env, "CD4ML_HOME": str(tmp_path/"home"), "DASK_SCHEDULER_ADDRESS": cluster.address,
           "CD4ML_SHARED_URL": f"file://{shared}"}
    from cd4ml.simulate import generate
    generate(tmp_path/"favorita", stores=3, items=10, days=200)           # TINY's simulation, as Kaggle-style files
    imported = subprocess.run([str(BIN/"cd4ml"), "data", "import", str(tmp_path/"favorita"), "--engine", "dask",
                               "--part-rows", "1000", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-4000:]
    imported = json.loads(imported.stdout)
    assert (imported["engine"], imported["parts"]) == ("dask", PARTS)
    result = run([str(ROOT/"pipeline.yaml"), "-p", "engine=dask", "-p", f"dataset={imported['version']}"], env, tmp_path/"driver")
    assert result["dataset"] == imported["version"]

    rel = result["release"]                                                # the users' run: released and promoted
    assert (rel["status"], rel["promoted"]) == ("passed", True), rel
    computed = tasks_computed(cluster.address)
    assert sorted(computed) == ["worker-a", "worker-b"]
    assert len({k for keys in computed.values() for k in keys}) == 2 * PARTS, computed   # train and valid: a task per part
    # (each counted once: on a busy machine the scheduler may start a task on the second worker as well, stealing it)
    staged = shared/"data"/result["dataset"]
    assert sorted(p.name for p in (staged/"sales").iterdir()) == [f"part-{i:05d}.parquet" for i in range(PARTS)]
    assert (staged/"parts.json").exists() and list((shared/"tmp").iterdir()) == []   # scratch files deleted
    assert not (cluster.base/"worker-a"/".cd4ml").exists()                 # workspace() in a task would create it
    assert list((cluster.base/"worker-b-home").iterdir()) == []

    spec = yaml.safe_load((ROOT/"pipeline.yaml").read_text())             # the reference: the pandas engine on the same
    spec["steps"] = [s for s in spec["steps"] if s.get("cache", True)]     # data, up to evaluate (its metrics)
    (tmp_path/"reference").mkdir()
    (tmp_path/"reference"/"pipeline.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path/"reference"/"nbs").symlink_to(ROOT/"nbs")
    reference = run([str(tmp_path/"reference"/"pipeline.yaml"), "-p", "engine=pandas"],
                    {**base_env, "CD4ML_HOME": str(tmp_path/"reference-home")}, tmp_path/"reference")
    assert reference["dataset"] == result["dataset"]
    assert set(metrics(reference)) == set(metrics(result)) == {"moving_average", "ridge"}
    for model, m in metrics(reference).items():
        assert metrics(result)[model] == pytest.approx(m, rel=0, abs=1e-9), model

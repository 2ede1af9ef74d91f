"""Step notebooks run by hand, as a data scientist runs them in JupyterLab: bound to the last `cd4ml run`.

The run is a new user's first (conftest's `first_run`): order lines imported, then the default pipeline.yaml on them,
release step on, as `make pipeline` runs it. Then each step notebook is executed with papermill and no parameters, from the project folder: it must write what
the pipeline wrote, into a scratch folder (never the cache), and the steps that write the registry (gate, register,
release) must run dry and leave the registry and MLflow as they were. `cd4ml nb` copies run the same way. A real
JupyterLab started by `make lab` serves the step notebooks, and its kernel runs one bound to the run.
"""
import asyncio, json, os, pickle, re, signal, subprocess, time, uuid
from pathlib import Path

import httpx
import nbformat
import numpy as np
import pandas as pd
import papermill as pm
import pytest
import yaml
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["data", "validate", "features", "train", "evaluate", "gate", "register", "release"]
DRY = {"gate", "register", "release"}           # they write the registry or MLflow under `cd4ml run`


@pytest.fixture(scope="module")
def run(first_run):
    "The first run, as `make pipeline` runs it; this process (and the kernels papermill starts) on its workspace."
    assert first_run.ran.returncode == 0, first_run.ran.stderr[-3000:]
    result, ws = first_run.ran.json, first_run.workspace
    with ws.in_process():
        executions = {e["name"]: e for e in json.loads((ws.home/"runs"/result["parent_run_id"]/"steps.json").read_text())}
        yield {"home": ws.home, "env": ws.env, "args": first_run.args, "result": result, "executions": executions,
               "client": ws.client()}


def registry_state(client: MlflowClient) -> dict:
    "Everything a step could write: model versions with tags and aliases, the model's tags, every run's tags, metrics, artifacts."
    model = client.get_registered_model("sales")
    versions = {v.version: (v.status, v.tags, v.run_id) for v in client.search_model_versions("name='sales'")}
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    def artifacts(run_id, path=None):
        return [(a.path, a.file_size, artifacts(run_id, a.path) if a.is_dir else None) for a in client.list_artifacts(run_id, path)]
    return {"aliases": model.aliases, "tags": model.tags, "versions": versions,
            "runs": {r.info.run_id: (r.info.status, r.data.tags, r.data.metrics, artifacts(r.info.run_id)) for r in runs}}


def execute(notebook: Path, out: Path, cwd: Path = ROOT) -> nbformat.NotebookNode:
    "Run a notebook with papermill and no parameters, as Run All in JupyterLab does."
    pm.execute_notebook(str(notebook), str(out), cwd=str(cwd), kernel_name="python3", progress_bar=False)
    return nbformat.read(str(out), as_version=4)


@pytest.fixture(scope="module")
def by_hand(run, tmp_path_factory):
    "Every step notebook run by hand after the pipeline run: executed notebooks, and the registry and cache before and after."
    out, cache = tmp_path_factory.mktemp("by-hand"), run["home"]/"cache"
    before, cached = registry_state(run["client"]), sorted(p.name for p in cache.iterdir())
    executed = {step: execute(ROOT/"nbs"/"steps"/f"{step}.ipynb", out/f"{step}.ipynb") for step in STEPS}
    return {"executed": executed, "before": before, "after": registry_state(run["client"]),
            "cached": cached, "cached_after": sorted(p.name for p in cache.iterdir())}


def note(nb) -> str:
    "The output of the notebook's bind cell: which run it is bound to."
    cell = next(c for c in nb.cells if "bind(" in c.source)
    return "".join(o["data"]["text/markdown"] for o in cell.outputs if "text/markdown" in o.get("data", {}))


def stdout(nb) -> str:
    return "".join(o["text"] for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stdout")


def without_created(obj):
    "A validation report without its creation time (`created`: when the file was written, not what it says)."
    return {k: v for k, v in obj.items() if k != "created"} if isinstance(obj, dict) else obj


def assert_json_close(a, b, where):
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a: assert_json_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): assert_json_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9, nan_ok=True), where
    else: assert a == b, where


def assert_same_output(mine: Path, theirs: Path, example: Path | None = None):
    "Output file `mine` says what the pipeline's `theirs` says: JSON, tables and predictions equal, floats to 1e-9."
    where = f"{mine} vs {theirs}"
    if mine.suffix == ".json": assert_json_close(without_created(json.loads(mine.read_text())), without_created(json.loads(theirs.read_text())), where)
    elif mine.suffix in (".parquet", ".csv"):
        read = pd.read_parquet if mine.suffix == ".parquet" else pd.read_csv
        pd.testing.assert_frame_equal(read(mine), read(theirs), check_exact=False, rtol=1e-9, atol=1e-9, obj=where)
    elif mine.suffix == ".html":
        created = re.compile(r"created [0-9T:+-]+")
        assert created.sub("", mine.read_text()) == created.sub("", theirs.read_text()), where
    elif mine.suffix == ".pkl":
        from cd4ml.models import predict
        rows = pd.read_parquet(example)
        np.testing.assert_allclose(predict(pickle.loads(mine.read_bytes()), rows), predict(pickle.loads(theirs.read_bytes()), rows), rtol=1e-9, atol=1e-9)
    else: raise AssertionError(f"no comparison for {mine.name}")


def outputs(step: str) -> list[str]:
    return next(s for s in yaml.safe_load((ROOT/"pipeline.yaml").read_text())["steps"] if s["name"] == step)["outputs"]


def test_each_step_notebook_redoes_its_step(run, by_hand):
    "Run by hand, every step writes what the pipeline wrote, to a scratch folder, and says which run it is bound to."
    run_id, home = run["result"]["parent_run_id"], run["home"]
    for step in STEPS:
        name = "train:ridge" if step == "train" else step           # train.ipynb's default candidate
        ex = run["executions"][name]
        scratch, cached = home/"scratch"/run_id/name.replace(":", "-"), home/"cache"/ex["key"]
        assert f"**Bound to run `{run_id}`**" in note(by_hand["executed"][step]) and f"its `{name}` execution" in note(by_hand["executed"][step])
        assert ("**Dry run**" in note(by_hand["executed"][step])) == (step in DRY), step
        assert sorted(p.name for p in scratch.iterdir()) == sorted(outputs(step)), step
        if step in ("register", "release"): continue                  # dry runs: below
        for f in outputs(step): assert_same_output(scratch/f, cached/f, cached/"example.parquet")
    assert by_hand["cached_after"] == by_hand["cached"]               # nothing written to the cache


def test_registry_steps_run_dry(run, by_hand):
    "Gate, register and release by hand say what they would do, and change neither the registry nor any MLflow run."
    run_id, home, result = run["result"]["parent_run_id"], run["home"], run["result"]
    assert result["registered"]["version"] == "1" and result["release"]["status"] == "passed"
    assert by_hand["after"] == by_hand["before"]
    assert "champion the run compared it with: none" in note(by_hand["executed"]["gate"])   # v1 is champion now, but was not then
    gated = json.loads((home/"scratch"/run_id/"gate"/"gates.json").read_text())
    assert (gated["champion"], gated["passed"]) == (None, True)
    assert f"dry run: the report is not logged with run {gated['run_id']}" in stdout(by_hand["executed"]["gate"])
    assert f"dry run: would register candidate ridge (run {gated['run_id']}) as a new version of sales" in stdout(by_hand["executed"]["register"])
    assert json.loads((home/"scratch"/run_id/"register"/"registered.json").read_text()) is None
    released = json.loads((home/"scratch"/run_id/"release"/"release.json").read_text())
    assert (released["status"], released["version"], released["promoted"]) == ("dry_run", "1", False)
    assert released["verdict"].startswith("dry run: would build the Bento of sales version 1, serve it") and released["verdict"] in stdout(by_hand["executed"]["release"])


def test_cd4ml_nb_writes_a_bound_copy(run, cli, tmp_path):
    "`cd4ml nb STEP --run RUN_ID` writes a copy with the run's parameters injected; run anywhere with no parameters, it redoes the step."
    run_id, home = run["result"]["parent_run_id"], run["home"]
    facts = cli.json(run["env"], "nb", "evaluate", "--run", run_id[:8], "--out", tmp_path/"evaluate.ipynb")
    assert facts == {"notebook": str(tmp_path/"evaluate.ipynb"), "run": run_id, "execution": "evaluate",
                     "outputs": str(home/"scratch"/run_id/"evaluate"), "dry run": False}
    copy = nbformat.read(str(tmp_path/"evaluate.ipynb"), as_version=4)
    assert copy.cells[0].cell_type == "markdown" and copy.cells[0].source.startswith(f"**Bound to run `{run_id}`**")
    injected = next(c for c in copy.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert f'"features": "{home/"cache"/run["executions"]["features"]["key"]}"' in injected.source
    executed = execute(tmp_path/"evaluate.ipynb", tmp_path/"evaluate-run.ipynb", cwd=tmp_path)
    assert note(executed) == ""                                   # bound already: bind() leaves the injected values
    for f in outputs("evaluate"):
        assert_same_output(home/"scratch"/run_id/"evaluate"/f, home/"cache"/run["executions"]["evaluate"]["key"]/f)
    human = cli(run["env"], "nb", "register", "--out", tmp_path/"register.ipynb")
    assert human.returncode == 0 and human.stdout.strip().splitlines()[-1] == str(tmp_path/"register.ipynb"), human.stderr
    injected = next(c for c in nbformat.read(str(tmp_path/"register.ipynb"), as_version=4).cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "dry_run = True" in injected.source


def test_no_run_yet_says_run_the_pipeline_first(workspace, cli, tmp_path):
    "No run in the workspace yet: `cd4ml nb` and a step notebook run by hand both say what to do first."
    r = cli(dict(os.environ), "nb", "train", timeout=120)
    assert r.returncode == 2 and "run `make pipeline` (or `cd4ml run`) first" in r.message, r.stderr
    with pytest.raises(pm.PapermillExecutionError, match="make pipeline"):
        execute(ROOT/"nbs"/"steps"/"validate.ipynb", tmp_path/"validate.ipynb")


def test_edited_step_reruns_with_what_depends_on_it(run, by_hand, cli, tiny_project):
    """A step notebook run by hand and saved (outputs, papermill metadata) reruns nothing. An edited cell reruns its
    step, and the steps that read it when its outputs changed: the cache is keyed by the content of the inputs.
    (Gate, register and release always run, `cache: false`: the copy of the spec leaves them out.)"""
    spec = tiny_project()
    features = spec.parent/"nbs"/"steps"/"features.ipynb"
    def rerun(): return {s["name"]: not s["cached"] for s in cli.json(run["env"], "run", spec, *run["args"])["steps"]}
    nbformat.write(by_hand["executed"]["features"], str(features))         # as saved from JupyterLab after Run All
    assert not any(rerun().values())
    nb = nbformat.read(str(features), as_version=4)
    nb.cells[-1].source += "  # a data scientist's note"
    nbformat.write(nb, str(features))
    assert rerun() == {"data": False, "validate": False, "features": True, "train:moving_average": False, "train:ridge": False, "evaluate": False}
    nb.cells.append(nbformat.v4.new_code_cell('pd.read_parquet(f"{output_dir}/train.parquet").iloc[:-1].to_parquet(f"{output_dir}/train.parquet", index=False)'))
    nbformat.write(nb, str(features))
    assert rerun() == {"data": False, "validate": False, "features": True, "train:moving_average": True, "train:ridge": True, "evaluate": True}


async def run_in_kernel(base: str, token: str, kernel_id: str, cells: list[str]) -> list[dict]:
    "Execute `cells` one by one in a JupyterLab kernel over its websocket, as Run All does; the execute replies."
    from tornado.websocket import websocket_connect
    ws = await websocket_connect(f"ws{base[4:]}/api/kernels/{kernel_id}/channels?token={token}")
    session, replies = uuid.uuid4().hex, []
    for code in cells:
        msg_id = uuid.uuid4().hex
        await ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": session, "username": "test", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False,
                        "stop_on_error": True}}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.read_message(), 300))
            if msg["msg_type"] == "execute_reply" and msg["parent_header"].get("msg_id") == msg_id: break
        replies.append(msg["content"])
        if msg["content"]["status"] != "ok": break
    ws.close()
    return replies


def test_make_lab_serves_and_runs_step_notebooks(run, free_port, tmp_path):
    "`make lab` (as root here, as in most containers) serves the step notebooks, and one runs in its kernel, bound to the run."
    port, token = free_port(), uuid.uuid4().hex
    env = {**run["env"], "PORT": str(port), "JUPYTER_TOKEN": token}
    log = open(tmp_path/"lab.log", "wb")
    started = time.time()
    lab = subprocess.Popen(["make", "lab"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"token {token}"}
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and lab.poll() is None:
            try: status = httpx.get(f"{base}/lab", headers=auth, timeout=5).status_code
            except httpx.TransportError: pass
            if status == 200: break
            time.sleep(0.5)
        assert status == 200, f"JupyterLab did not serve /lab (exit code {lab.poll()}): {(tmp_path/'lab.log').read_text()[-2000:]}"
        nb = httpx.get(f"{base}/api/contents/steps/train.ipynb", headers=auth, timeout=30)
        assert nb.status_code == 200 and any('bind("train", globals())' in c["source"] for c in nb.json()["content"]["cells"])
        session = httpx.post(f"{base}/api/sessions", headers=auth, timeout=60, json={
            "path": "steps/validate.ipynb", "name": "validate.ipynb", "type": "notebook", "kernel": {"name": "python3"}}).json()
        cells = [c["source"] for c in httpx.get(f"{base}/api/contents/steps/validate.ipynb", headers=auth, timeout=30).json()["content"]["cells"]
                 if c["cell_type"] == "code"]
        replies = asyncio.run(run_in_kernel(base, token, session["kernel"]["id"], cells))
        assert [r["status"] for r in replies] == ["ok"] * len(cells), replies[-1]
        httpx.delete(f"{base}/api/sessions/{session['id']}", headers=auth, timeout=30)
        # what the lab's kernel wrote, bound to the latest run that ran validate (every run here found it cached)
        [written] = [p for p in (run["home"]/"scratch").glob("*/validate/validation.json") if p.stat().st_mtime > started]
        key = run["executions"]["validate"]["key"]
        assert_same_output(written, run["home"]/"cache"/key/"validation.json")
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try: lab.wait(30)
        except subprocess.TimeoutExpired: os.killpg(lab.pid, signal.SIGKILL); lab.wait()
        log.close()

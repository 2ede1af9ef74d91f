"""End-to-end tests of `cd4ml run` / `cd4ml reproduce`: the real CLI, real papermill kernels, a real MLflow
SQLite store and real step notebooks, on tiny simulated data in a temp workspace.

One module-scoped pipeline run (`base`) is shared; tests that change step notebooks work on their own copy of
the project so they do not disturb the others (the cache and MLflow store are shared, as in real use).
"""
import json, math, shutil
from pathlib import Path

import mlflow
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ["-p", "stores=3", "-p", "items=8", "-p", "days=200", "-p", "horizon=7", "-p", "n_train=4", "-p", "n_valid=2",
        "-p", "models.hist_gbr.max_iter=30"]
MODELS = ["moving_average", "seasonal_naive", "ridge", "hist_gbr", "lightgbm", "blend"]


def cached(result) -> dict:
    return {s["name"]: s["cached"] for s in result["steps"]}


@pytest.fixture(scope="module")
def env(new_workspace):
    "The module's workspace, for the CLI; this process's MLflow calls (`mlflow.get_run`, ...) read its store too."
    with new_workspace("pipeline").in_process() as ws: yield ws.env


@pytest.fixture(scope="module")
def project(tiny_project):
    "A copy of the project without the registry steps (tested in test_registry_steps.py): runs do not depend on the registry."
    return tiny_project()


@pytest.fixture(scope="module")
def run_json(cli, env):
    "`run_json(spec, *args)`: `cd4ml run --json` of `spec` on tiny data in the module's workspace; it must succeed."
    return lambda spec, *args: cli.json(env, "run", spec, *TINY, *args)


@pytest.fixture(scope="module")
def base(run_json, project):
    "The pipeline run once on tiny data with two parallel workers."
    return run_json(project, "-j", "2")


def test_results(base, env):
    names = [c["model"] for c in base["candidates"]]
    assert names == MODELS
    for c in base["candidates"]:
        m = c["metrics"]
        assert 0 < m["nwrmsle"] < 2 and m["rmse"] > 0 and m["mae"] > 0 and m["r2"] <= 1, c
        assert not c["cached"]
    best = min(base["candidates"], key=lambda c: c["metrics"]["nwrmsle"])
    assert base["best"]["model"] == best["model"] and base["best"]["run_id"] == best["run_id"]
    assert set(base["baselines"]) == {"moving_average", "seasonal_naive"}
    assert base["baselines"]["moving_average"] == next(c for c in base["candidates"] if c["model"] == "moving_average")["metrics"]["nwrmsle"]
    assert 0 < base["oracle_nwrmsle"] < base["baselines"]["moving_average"]      # the simulator's expectation beats the naive forecast
    assert 0 < base["bayes_nwrmsle"] < base["oracle_nwrmsle"]                    # and the log-optimal forecast beats the mean
    ma = base["baselines"]["moving_average"]
    assert base["gain_captured"] == pytest.approx((ma - base["best"]["metrics"]["nwrmsle"]) / (ma - base["bayes_nwrmsle"]), rel=1e-12)
    assert [s["name"] for s in base["steps"]] == ["data", "validate", "features", *[f"train:{m}" for m in MODELS], "evaluate"]
    assert not any(cached(base).values())
    assert base["dataset"].startswith("ds-")


def test_mlflow_records(base, env):
    client = mlflow.MlflowClient()
    parent = client.get_run(base["parent_run_id"])
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["cd4ml.dataset"] == base["dataset"]
    for t in ("cd4ml.git_sha", "cd4ml.git_dirty", "cd4ml.package_lock", "cd4ml.version", "cd4ml.code_hash", "cd4ml.spec_hash"):
        assert tags[t], t
    assert parent.inputs.dataset_inputs[0].dataset.digest == base["dataset"]
    assert math.isclose(parent.data.metrics["best_nwrmsle"], base["best"]["metrics"]["nwrmsle"])
    assert math.isclose(parent.data.metrics["oracle_nwrmsle"], base["oracle_nwrmsle"])
    assert math.isclose(parent.data.metrics["bayes_nwrmsle"], base["bayes_nwrmsle"])
    assert math.isclose(parent.data.metrics["gain_captured"], base["gain_captured"])
    assert {"baseline_ma_nwrmsle", "seasonal_naive_nwrmsle"} <= set(parent.data.metrics)
    assert parent.data.params["stores"] == "3" and parent.data.params["models"] == ",".join(MODELS)
    notebooks = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "notebooks")}
    assert {"data.ipynb", "validate.ipynb", "features.ipynb", "train-ridge.ipynb", "evaluate.ipynb"} <= notebooks
    run_dir = Path(env["CD4ML_HOME"])/"runs"/parent.info.run_id
    executed = nbformat.read(str(run_dir/"train-ridge.ipynb"), as_version=4)
    injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert 'model = "ridge"' in injected.source                                   # papermill injected the parameters
    for c in base["candidates"]:
        child = client.get_run(c["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["model"] == c["model"]
        assert child.data.metrics == pytest.approx(c["metrics"], rel=1e-15)
        assert child.data.tags["cd4ml.cached"] == "False"
        assert {"importance.csv", "intervals.json"} <= {a.path for a in client.list_artifacts(c["run_id"])}
        assert 0 < c["metrics"]["interval_coverage"] < 1                     # logged with the candidate's run
    ridge = next(c for c in base["candidates"] if c["model"] == "ridge")
    info = mlflow.models.get_model_info(ridge["model_uri"])
    assert "mean_14d" in info.signature.inputs.input_names()
    model = mlflow.sklearn.load_model(ridge["model_uri"])
    example = mlflow.models.Model.load(ridge["model_uri"]).load_input_example(mlflow.artifacts.download_artifacts(ridge["model_uri"]))
    assert len(model.predict(example)) == len(example)


def test_no_change_rerun_is_cached(base, env, project, run_json):
    # some steps cached: a new tracked run whose cached candidates point to the models logged before
    again = run_json(project, "-p", "models=ridge,moving_average")
    assert cached(again) == {"data": True, "validate": True, "features": True, "train:ridge": True,
                             "train:moving_average": True, "evaluate": False}
    assert again["parent_run_id"] != base["parent_run_id"] and not again["up_to_date"]
    ridge = next(c for c in again["candidates"] if c["model"] == "ridge")
    base_ridge = next(c for c in base["candidates"] if c["model"] == "ridge")
    assert ridge["metrics"] == base_ridge["metrics"] and ridge["model_uri"] == base_ridge["model_uri"]
    child = mlflow.get_run(ridge["run_id"])
    assert child.data.tags["cd4ml.cached"] == "True" and child.data.tags["cd4ml.model_uri"] == ridge["model_uri"]
    assert child.data.metrics == pytest.approx(base_ridge["metrics"], rel=1e-15)
    # nothing changed at all: up to date, the earlier run's results, nothing run or logged
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    same = run_json(project)
    assert same["up_to_date"] and all(cached(same).values())
    assert same["parent_run_id"] == base["parent_run_id"] and same["candidates"] == base["candidates"]
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before


def test_parameter_change_reruns_what_depends_on_it(base, env, project, run_json):
    r = run_json(project, "-p", "models.ridge.alpha=5.0")
    steps = cached(r)
    assert not steps["train:ridge"] and not steps["evaluate"]
    assert all(steps[s] for s in ["data", "validate", "features", "train:hist_gbr", "train:moving_average"])
    ridge = next(c for c in r["candidates"] if c["model"] == "ridge")
    assert ridge["metrics"] != next(c for c in base["candidates"] if c["model"] == "ridge")["metrics"]
    assert mlflow.get_run(ridge["run_id"]).data.params["alpha"] == "5.0"


def test_notebook_change_reruns_that_step(base, env, tmp_path, run_json, tiny_project):
    spec = tiny_project(tmp_path)
    assert run_json(spec)["up_to_date"]                               # same content, other folder: cached
    nb = nbformat.read(str(tmp_path/"nbs/steps/evaluate.ipynb"), as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("A note for the reader."))
    nbformat.write(nb, str(tmp_path/"nbs/steps/evaluate.ipynb"))
    steps = cached(run_json(spec))
    assert not steps["evaluate"] and all(v for k, v in steps.items() if k != "evaluate"), steps


def test_input_data_change(base, env, project, run_json):
    other = run_json(project, "-p", "seed=1", "-p", "models=ridge")
    assert other["dataset"] != base["dataset"]
    assert not any(cached(other).values()), other["steps"]                 # new data: everything reruns
    # naming the first dataset explicitly reruns only the data step: its output (the version) is unchanged,
    # so every later step is found in the cache by content
    same = run_json(project, "-p", f"dataset={base['dataset']}", "-p", "models=ridge")
    assert same["dataset"] == base["dataset"]
    assert cached(same) == {"data": False, "validate": True, "features": True, "train:ridge": True, "evaluate": False}


def test_force_and_serial_equal_parallel(base, env, project, run_json):
    serial = run_json(project, "--force", "-j", "1")
    assert not any(cached(serial).values())
    assert [c["metrics"] for c in serial["candidates"]] == [c["metrics"] for c in base["candidates"]]
    assert serial["oracle_nwrmsle"] == base["oracle_nwrmsle"]


def test_bad_params_fail_before_running(base, env, project, monkeypatch):
    from typer.testing import CliRunner
    from cd4ml.cli import app
    for k, v in env.items(): monkeypatch.setenv(k, v)
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    for args, message in [(["-p", "colour=red"], "unknown parameter 'colour'"),
                          (["-p", "models=ridge,xgboost"], "unknown model(s) ['xgboost']"),
                          (["-p", "models.ridge.depth=3"], "model 'ridge': unknown parameter(s) ['depth']"),
                          (["-p", "engine=spark"], "engine 'spark' is unknown"),
                          (["-p", "training.sample_fraction=2"], "training.sample_fraction = 2"),
                          (["-p", "training.level=steep"], "training.level = 'steep'; expected one of ['absolute', 'relative', 'auto']"),
                          (["-p", "training.since=July"], "training.since = 'July'; expected a date YYYY-MM-DD"),
                          (["-p", "days"], "is not key=value")]:
        r = CliRunner().invoke(app, ["run", str(project), *args])
        assert r.exit_code == 2, (args, r.output)
        assert message in " ".join(r.output.split()), (args, r.output)
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before


def test_failing_step(base, env, tmp_path, cli, tiny_project):
    spec_path = tiny_project(tmp_path)
    boom = nbformat.v4.new_notebook()
    boom.metadata.kernelspec = {"name": "python3", "display_name": "python3", "language": "python"}
    boom.cells = [nbformat.v4.new_code_cell("model = 'x'\nmodel_params = {}\ninputs = {}\noutput_dir = '.'", metadata={"tags": ["parameters"]}),
                  nbformat.v4.new_code_cell("x = 1"),
                  nbformat.v4.new_code_cell("if model == 'ridge': raise ValueError('ridge exploded')\nopen(f'{output_dir}/ok.txt', 'w').write('ok')")]
    nbformat.write(boom, str(tmp_path/"nbs/steps/boom.ipynb"))
    spec = yaml.safe_load(spec_path.read_text())
    spec["steps"].insert(3, {"name": "boom", "notebook": "nbs/steps/boom.ipynb", "foreach": "models", "inputs": ["features"], "outputs": ["ok.txt"]})
    spec_path.write_text(yaml.safe_dump(spec))
    r = cli(env, "run", spec_path, *TINY, "-p", "models=ridge,moving_average", "-j", "1")
    assert r.returncode == 1, r.stderr
    msg = " ".join(r.stderr.split())
    assert "step 'boom:ridge' failed in" in msg and "boom.ipynb, cell 2" in msg and "ValueError: ridge exploded" in msg, msg
    failed = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'FAILED'", output_format="list")
    parent = next(f for f in failed if "mlflow.parentRunId" not in f.data.tags)
    child = next(f for f in failed if f.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert child.data.params["model"] == "ridge"
    partial = nbformat.read(str(Path(env["CD4ML_HOME"])/"runs"/parent.info.run_id/"boom-ridge.ipynb"), as_version=4)
    assert any(o.get("ename") == "ValueError" for c in partial.cells for o in c.get("outputs", []))
    assert "notebooks/boom-ridge.ipynb" in {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "notebooks")}


def test_reproduce_detects_metric_code_and_data_changes(base, env, tmp_path, cli, run_json, tiny_project):
    spec = tiny_project(tmp_path)
    small = run_json(spec, "-p", "models=moving_average")
    # tamper with a recorded metric: reproduce says which one differs
    ma = small["candidates"][0]
    mlflow.MlflowClient().log_metric(ma["run_id"], "rmse", 123.0)
    r = cli(env, "reproduce", small["parent_run_id"], "--json")
    assert r.returncode == 1
    problems = json.loads(r.stdout)["problems"]
    assert problems == [f"metric differs: moving_average rmse 123.0 → {ma['metrics']['rmse']!r}"], problems
    # change a step notebook: reproduce names it
    nb = nbformat.read(str(tmp_path/"nbs/steps/evaluate.ipynb"), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("print('changed')"))
    nbformat.write(nb, str(tmp_path/"nbs/steps/evaluate.ipynb"))
    r = cli(env, "reproduce", small["parent_run_id"], "--json")
    assert r.returncode == 1
    assert any("step notebook 'evaluate'" in p for p in json.loads(r.stdout)["problems"])
    # the pinned dataset is gone: reproduce refuses before running
    pinned = run_json(spec, "-p", f"dataset={base['dataset']}", "-p", "models=moving_average")
    shutil.rmtree(Path(env["CD4ML_HOME"])/"data"/base["dataset"])
    r = cli(env, "reproduce", pinned["parent_run_id"])
    assert r.returncode == 2 and f"dataset version {base['dataset']}" in r.stderr and "missing" in r.stderr, r.stderr


# The default pipeline as `make pipeline` runs it (the `default_run` fixture of conftest.py): the release step on,
# full default data. These tests reuse that one run.

DEFAULT_STEPS = ["data", "validate", "features", *[f"train:{m}" for m in MODELS], "evaluate", "gate", "register", "release"]
NOISE = ("ERROR!", "Warning", "Traceback", "Downloading artifacts")


def test_default_run_installs_nothing(default_run):
    # BentoML's first `bentoml build` pip-installed uv when it was missing; the new package changed the package
    # lock, so right after a fresh `make install` the second run had no step cached
    assert [s["name"] for s in default_run.result["steps"]] == DEFAULT_STEPS
    assert default_run.result["release"]["promoted"]
    assert default_run.installed_after == default_run.installed_before


def test_default_run_noise_floor_and_blend_champion(default_run):
    r = default_run.result
    ma, best = r["baselines"]["moving_average"], r["best"]["metrics"]["nwrmsle"]
    assert 0 < r["bayes_nwrmsle"] < r["oracle_nwrmsle"] < ma                  # the log-optimal forecast beats the mean
    assert r["gain_captured"] == pytest.approx((ma - best) / (ma - r["bayes_nwrmsle"]), rel=1e-12)
    assert r["gain_captured"] > 0.84, r["gain_captured"]                        # measured 0.843; LightGBM alone 0.829 (bench/bench_models.py)
    assert r["best"]["model"] == "blend" and r["release"]["promoted"]           # a LightGBM + ridge champion, built, served and promoted ...
    parity = next(g for g in r["release"]["gates"] if g["gate"] == "parity")
    assert parity["result"] == "pass" and parity["value"] <= 1e-9               # ... answering as offline to 1e-9


def test_default_run_intervals_cover_80_percent_and_are_registered(default_run):
    import json
    r = default_run.result
    gated = next(c for c in r["candidates"] if c["model"] == r["gated"]["model"])
    coverage = gated["metrics"]["interval_coverage"]                            # calibrated on one validation origin, counted on the other
    assert 0.75 <= coverage <= 0.85, coverage                                    # the 80 ± 5 % target, on the default data
    gates = {g["gate"]: g for g in r["gates"]}
    assert gates["min_interval_coverage"]["value"] == pytest.approx(coverage) and gates["max_interval_coverage"]["result"] == "pass"
    parent = default_run.client.get_run(r["parent_run_id"]).data.metrics
    assert parent["best_interval_coverage"] == pytest.approx(r["best"]["metrics"]["interval_coverage"])
    version = default_run.client.get_model_version("sales", r["registered"]["version"])
    intervals = json.loads(version.tags["intervals"])                           # what the service and cd4ml.predict read
    assert intervals["offsets"][9] < 0 < intervals["offsets"][89] and intervals["n"] > 1000


def test_default_run_reports_show_only_the_run(default_run):
    run_dir = Path(default_run.result["run_dir"])
    reports = sorted(run_dir.glob("*.ipynb"))
    assert [p.stem for p in reports] == sorted(s.replace(":", "-") for s in DEFAULT_STEPS)
    noise = []
    for path in reports:
        for i, cell in enumerate(nbformat.read(str(path), as_version=4).cells):
            for o in cell.get("outputs", []):
                if o["output_type"] == "error": noise.append((path.name, i, f"{o['ename']}: {o['evalue']}"))
                elif o["output_type"] == "stream" and any(n in o["text"] for n in NOISE): noise.append((path.name, i, o["text"][:200]))
    assert noise == []


def test_default_rerun_is_up_to_date(default_run, cli):
    r = cli(default_run.env, "run", ROOT/"pipeline.yaml", "--json")
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["up_to_date"] and again["parent_run_id"] == default_run.result["parent_run_id"]
    assert [(s["name"], s["cached"], s["why"]) for s in again["steps"]] == [(n, True, "cached: up to date") for n in DEFAULT_STEPS]


def test_explain_names_what_changed(default_run, tmp_path, cli, tiny_project):
    # the project's steps up to evaluate, in another folder: the same keys as the default run, so all cached
    # except what a changed notebook and a changed param rerun
    spec = tiny_project(tmp_path)
    nb = nbformat.read(str(tmp_path/"nbs/steps/evaluate.ipynb"), as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("A note for the reader."))
    nbformat.write(nb, str(tmp_path/"nbs/steps/evaluate.ipynb"))
    r = cli(default_run.env, "run", spec, "-p", "models.moving_average.days=28", "--json")
    assert r.returncode == 0, r.stderr
    why = {s["name"]: s["why"] for s in json.loads(r.stdout)["steps"]}
    assert why == {**{n: "cached" for n in DEFAULT_STEPS[:9]},
                   "train:moving_average": "param model_params.days: 14 → 28",
                   "evaluate": "notebook changed; input train.moving_average changed"}, why
    # the table of `--explain`; the change is named against the step's last run
    r = cli({**default_run.env, "COLUMNS": "200"}, "run", spec, "-p", "models.moving_average.days=56", "--explain")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "train:moving_average" in line)
    assert "param model_params.days: 28 → 56" in row, r.stdout
    assert "why" in r.stdout and "│ cached " in r.stdout


def test_default_run_reproduces(default_run, cli):
    r = cli(default_run.env, "reproduce", default_run.result["parent_run_id"], "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["match"] and out["problems"] == [] and out["dataset"] == default_run.result["dataset"]
    assert default_run.client.get_run(out["reproduced_run_id"]).data.tags["cd4ml.reproduces"] == default_run.result["parent_run_id"]
    assert out["skipped_steps"] == ["gate", "register", "release"]
    compared = {(m["run"], m["metric"]) for m in out["metrics"]}
    assert {("pipeline", "best_nwrmsle"), ("pipeline", "oracle_nwrmsle"), ("pipeline", "baseline_ma_nwrmsle")} <= compared
    assert {(m, k) for m in MODELS for k in ("nwrmsle", "rmse", "mae", "r2")} <= compared
    assert all(m["match"] for m in out["metrics"])
    reasons = {m["metric"]: m["reason"] for m in out["not_compared"] if m["run"] == "pipeline"}
    for timing in ("release.p50_ms", "release.p99_ms", "release.max_ms", "release.startup_s", "release.build_s", "release.rps"):
        assert reasons[timing] == "timing: measured in wall time", timing
    assert reasons["release.parity_rows"] == "logged by step 'release', which is not rerun"
    assert not any(m["metric"].startswith(("release.", "gate.")) for m in out["metrics"])

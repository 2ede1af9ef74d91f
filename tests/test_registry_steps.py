"""End-to-end tests of the governance gates and the model registry as pipeline steps: `cd4ml run` with the default
pipeline.yaml (gate and register after evaluate), real papermill kernels, a real MLflow SQLite store and registry, on
tiny simulated data in a temp workspace; `cd4ml models list|rollback` on the same store.

The tests run in order and share one workspace, like a project's life: the first run registers version 1 as champion,
failing gates change nothing, a second passing run on new data is compared with that champion, rollback restores it.
"""
import json, re
from pathlib import Path

import mlflow
import nbformat
import pytest
import yaml
from typer.testing import CliRunner

TINY = ["-p", "stores=3", "-p", "items=8", "-p", "days=200", "-p", "horizon=7", "-p", "n_train=4", "-p", "n_valid=2",
        "-p", "models.hist_gbr.max_iter=30"]


@pytest.fixture(scope="module")
def env(new_workspace):
    "The module's workspace, for the CLI; this process's MLflow calls (`mlflow.get_run`, ...) read its store too."
    with new_workspace("gates").in_process() as ws: yield ws.env


@pytest.fixture(scope="module")
def run(cli, env):
    """`run(spec, *args)`: `cd4ml run --json` on tiny data, the Bento release skipped (the release: test_release.py):
    (exit code, parsed stdout or None, stderr on one line)."""
    def run(spec, *args):
        r = cli(env, "run", spec, *TINY, "-p", "release.bento=false", *args, "--json")
        return r.returncode, r.json, r.message
    return run


def gate(result, name) -> dict:
    return next(g for g in result["gates"] if g["gate"] == name)


@pytest.fixture(scope="module")
def project(tiny_project):
    return tiny_project(registry_steps=True)


@pytest.fixture
def models(env, monkeypatch):
    "`cd4ml models ...` on the test workspace: returns the parsed --json output."
    from cd4ml.cli import app
    for k, v in env.items(): monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    def call(*args):
        r = CliRunner().invoke(app, ["models", *args, "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)
    return call


def test_unknown_acceptance_key_fails_before_running(env, project, tmp_path, monkeypatch):
    from cd4ml.cli import app
    for k, v in env.items(): monkeypatch.setenv(k, v)
    def run_in_process(spec, *args):
        r = CliRunner().invoke(app, ["run", str(spec), *args])
        return r.exit_code, " ".join(r.output.split())
    rc, err = run_in_process(project, "-p", "acceptance.max_nwrmsl=0.3")
    assert rc == 2 and "unknown acceptance key 'max_nwrmsl'" in err, err
    bad = yaml.safe_load(project.read_text())
    bad["acceptance"]["min_improvment_vs_baseline"] = 0.1
    spec = tmp_path/"pipeline.yaml"; spec.write_text(yaml.safe_dump(bad))
    (tmp_path/"nbs").symlink_to(project.parent/"nbs")
    rc, err = run_in_process(spec)
    assert rc == 2 and "acceptance: unknown key(s) ['min_improvment_vs_baseline']" in err, err
    rc, err = run_in_process(project, "-p", "acceptance.auto_promote=maybe")
    assert rc == 2 and "'auto_promote' = 'maybe' is not valid" in err, err
    assert not (Path(env["CD4ML_HOME"])/"mlflow.db").exists()     # nothing ran, nothing logged


@pytest.fixture(scope="module")
def first(run, project):
    "The default pipeline on a fresh workspace: it must end with a registered champion."
    rc, out, err = run(project)
    assert rc == 0, err
    return out


def test_first_run_registers_champion(first, env, models):
    assert [s["name"] for s in first["steps"]][-4:] == ["evaluate", "gate", "register", "release"]
    assert (first["release"]["status"], first["release"]["promoted"]) == ("skipped", True)   # registered as challenger, then promoted
    assert [(g["gate"], g["result"]) for g in first["gates"]] == [
        ("max_nwrmsle", "pass"), ("min_improvement_vs_baseline", "pass"), ("max_regression_vs_champion", "pass"),
        ("max_segment_ratio", "pass"), ("contract", "pass"), ("min_interval_coverage", "pass"), ("max_interval_coverage", "pass")]
    assert "no champion" in gate(first, "max_regression_vs_champion")["detail"]
    assert first["registered"] == {"name": "sales", "version": "1", "aliases": ["champion"]}
    # the gated candidate is the best model that is not a baseline, and it beats the moving average by the threshold
    scores = {c["model"]: c["metrics"]["nwrmsle"] for c in first["candidates"]}
    gated = first["gated"]["model"]
    assert gated not in ("moving_average", "seasonal_naive")
    assert scores[gated] == min(v for m, v in scores.items() if m not in ("moving_average", "seasonal_naive"))
    assert gate(first, "max_nwrmsle")["value"] == pytest.approx(scores[gated], rel=1e-12)
    assert gate(first, "min_improvement_vs_baseline")["value"] == pytest.approx(1 - scores[gated] / scores["moving_average"], rel=1e-9)
    assert gate(first, "min_improvement_vs_baseline")["value"] >= 0.02
    # the registry: version 1 is champion, with the run's lineage, metrics and gate results as tags
    [v1] = models("list")
    run_id = first["gated"]["run_id"]
    assert (v1["version"], v1["aliases"], v1["status"], v1["run_id"], v1["dataset_version"]) == \
           ("1", ["champion"], "champion", run_id, first["dataset"])
    assert v1["nwrmsle"] == pytest.approx(scores[gated], rel=1e-12) and v1["git_sha"]
    assert [g["result"] for g in v1["gates"]] == ["pass"] * 7 and v1["acceptance"]["min_improvement_vs_baseline"] == 0.02
    candidate = mlflow.get_run(run_id)
    assert candidate.data.tags["status"] == "registered" and candidate.data.tags["gates_passed"] == "true"
    assert {"gates/gates.json", "gates/segments.json", "gates/segments.png", "gates/importance.png",
            "gates/partial_dependence.png"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "gates")}
    parent = mlflow.get_run(first["parent_run_id"])
    assert parent.data.tags["cd4ml.gates_passed"] == "true" and parent.data.tags["cd4ml.registered_version"] == "sales/1"
    # the executed gate notebook is the reviewer's report: gate table, fairness table and plots
    report = nbformat.read(f"{first['run_dir']}/gate.ipynb", as_version=4)
    outputs = [o for c in report.cells for o in c.get("outputs", [])]
    html = " ".join("".join(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "max_segment_ratio" in html and "family" in html
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3


def test_no_change_rerun_registers_nothing(first, run, project, models):
    rc, out, err = run(project)
    assert rc == 0 and out["up_to_date"] and out["registered"] == first["registered"], err
    assert [v["version"] for v in models("list")] == ["1"]


@pytest.mark.parametrize("override,failing", [
    ("acceptance.max_nwrmsle=0.3", "max_nwrmsle"),
    ("acceptance.max_segment_ratio=1.01", "max_segment_ratio"),
])
def test_failing_gate_rejects_and_keeps_champion(first, run, project, models, override, failing):
    rc, out, err = run(project, "-p", override)
    assert rc != 0
    assert [g["gate"] for g in out["gates"] if g["result"] == "fail"] == [failing]
    assert out["registered"] is None and out["release"]["status"] == "nothing_registered"
    g = gate(out, failing)
    assert f"rejected by 1 gate(s): {failing} {g['value']:.4g} vs threshold {g['threshold']:.4g}" in err, err
    assert "nothing was promoted" in err and "the champion is still version 1" in err
    # champion unchanged, no new version, the candidate run tagged rejected
    assert [(v["version"], v["aliases"]) for v in models("list")] == [("1", ["champion"])]
    tags = mlflow.get_run(out["gated"]["run_id"]).data.tags
    assert (tags["status"], tags["failed_gates"]) == ("rejected", failing)
    assert mlflow.get_run(out["parent_run_id"]).data.tags["cd4ml.gates_passed"] == "false"
    # the candidate was compared with the champion on the same holdout (same data: the same score)
    assert gate(out, "max_regression_vs_champion")["value"] == pytest.approx(0.0, abs=1e-12)


def test_second_run_is_compared_with_champion_then_rollback(first, run, project, models):
    rc, out, err = run(project, "-p", "seed=1")
    assert rc == 0, err
    assert out["dataset"] != first["dataset"] and out["gated"]["champion"] == "1"
    reg = gate(out, "max_regression_vs_champion")
    # the champion (version 1, trained on the first dataset) was scored on this run's holdout, not its own
    model_score, champion_score = map(float, re.search(r"model ([\d.]+) vs champion ([\d.]+) on the same holdout", reg["detail"]).groups())
    assert model_score == pytest.approx(gate(out, "max_nwrmsle")["value"], abs=1e-4)
    assert abs(champion_score - models("list")[0]["nwrmsle"]) > 1e-3
    assert reg["value"] == pytest.approx(model_score / champion_score - 1, abs=1e-3) and reg["result"] == "pass"
    assert out["registered"] == {"name": "sales", "version": "2", "aliases": ["champion"]}
    assert [(v["version"], v["status"]) for v in models("list")] == [("1", "retired"), ("2", "champion")]
    back = models("rollback")
    assert (back["version"], back["previous"], back["dataset_version"]) == ("1", "2", first["dataset"])
    assert [(v["version"], v["aliases"], v["status"]) for v in models("list")] == [("1", ["champion"], "champion"), ("2", [], "rolled_back")]

"""The dask engine end to end: `cd4ml run -p engine=dask` gives the pandas engine's dataset version and metrics.

Real CLI, real papermill kernels, a real dask LocalCluster (worker processes), on tiny simulated data split into
3 partitions of one store each, so the family pooling really crosses partitions.
"""
import json
from pathlib import Path

import pytest

TINY = ["-p", "stores=3", "-p", "items=10", "-p", "days=200", "-p", "horizon=7", "-p", "n_train=4", "-p", "n_valid=2",
        "-p", "models=moving_average,ridge", "-p", "part_rows=1000"]     # about 1000 rows per store: one store per part


def metrics(result) -> dict:
    return {c["model"]: c["metrics"] for c in result["candidates"]}


def test_dask_engine_equals_pandas(new_workspace, cli, tiny_project):
    env = {k: v for k, v in new_workspace("scale").env.items() if k != "DASK_SCHEDULER_ADDRESS"}   # a LocalCluster
    spec = tiny_project()
    pandas_full = cli.json(env, "run", spec, *TINY, "-p", "engine=pandas")
    dask_full = cli.json(env, "run", spec, *TINY, "-p", "engine=dask")
    assert dask_full["dataset"] == pandas_full["dataset"]                  # same content, same version
    parts = sorted(p.name for p in (Path(env["CD4ML_HOME"])/"data"/dask_full["dataset"]/"sales").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not any(s["cached"] for s in dask_full["steps"])                 # engines share no cached outputs
    reports = [json.loads(p.read_text()) for p in (Path(env["CD4ML_HOME"])/"cache").glob("*/validation.json")]
    assert len(reports) == 2 and reports[0]["valid"]                       # whole tables, and part by part: the same checks
    assert reports[0]["checks"] == reports[1]["checks"]
    rows = json.loads((Path(env["CD4ML_HOME"])/"data"/dask_full["dataset"]/"meta.json").read_text())["rows"]
    assert {c["check"]: c["detail"] for c in reports[0]["checks"]}["sales: not empty"] == f"{rows} rows"
    assert pandas_full["oracle_nwrmsle"] == pytest.approx(dask_full["oracle_nwrmsle"], abs=1e-12)
    assert pandas_full["bayes_nwrmsle"] == pytest.approx(dask_full["bayes_nwrmsle"], abs=1e-12) and pandas_full["bayes_nwrmsle"] > 0
    for model, m in metrics(pandas_full).items():
        assert metrics(dask_full)[model] == pytest.approx(m, rel=0, abs=1e-9), model
    # training.mode=sample (the same series in both engines) is checked in nbs/13_scale.ipynb: a third run costs ~30 s more

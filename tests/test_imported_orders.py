"""End to end on imported data, the way a new user starts (conftest's `first_run`): order lines of a few shops, where
each product sells only every few weeks, imported without `--freq`, then the default pipeline (release step on)
trained on them. And a `-p dataset=` that is empty or names no stored version stops `cd4ml run` before any step runs."""
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cd4ml.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = ["-p", "stores=2", "-p", "items=4", "-p", "days=120", "-p", "horizon=7", "-p", "n_train=2", "-p", "n_valid=1",
        "-p", "models=moving_average"]   # should the check ever let a run through, it stays short


def test_order_lines_are_inferred_daily(first_run):
    imported = first_run.imported
    assert (imported["freq"], imported["stores"], imported["items"]) == ("D", 3, 8)
    assert (imported["start"], imported["end"]) == ("2016-01-04", "2017-07-02")
    sales = pd.read_parquet(Path(imported["path"])/"sales.parquet")
    gaps = sales.sort_values("date").groupby(["store_nbr", "item_nbr"]).date.diff().dt.days
    assert gaps.median() >= 14 and sales.date.dt.day_of_week.nunique() == 7   # intermittent series, daily calendar


def test_default_pipeline_releases_a_model_of_order_lines(first_run):
    imported, r = first_run.imported, first_run.ran
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.json
    assert out["dataset"] == imported["version"]
    assert [s["name"] for s in out["steps"]][-3:] == ["gate", "register", "release"]
    assert [g["result"] for g in out["gates"]] == ["pass"] * 7, out["gates"]   # 5 + the two interval coverage gates
    assert out["registered"] == {"name": "sales", "version": "1", "aliases": ["champion"]}
    rel = out["release"]
    assert (rel["status"], rel["version"], rel["promoted"], rel["champion"]) == ("passed", "1", True, "1"), rel
    assert [g["result"] for g in rel["gates"]] == ["pass"] * 5, rel["gates"]
    client = first_run.workspace.client()
    assert {k: str(v) for k, v in client.get_registered_model("sales").aliases.items()} == {"champion": "1"}
    assert client.get_model_version("sales", "1").tags["dataset_version"] == imported["version"]


@pytest.mark.parametrize("value,message", [
    ("", "-p dataset=: no dataset version given; name one that `cd4ml data list` shows"),
    ("ds-nope", "no dataset version 'ds-nope': there are no datasets yet; run `cd4ml data generate` or `cd4ml data import PATH`"),
])
def test_empty_or_unknown_dataset_fails_before_any_step(workspace, value, message):
    r = CliRunner().invoke(app, ["run", str(ROOT/"pipeline.yaml"), "-p", f"dataset={value}", *TINY])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output
    assert not [p.name for p in workspace.glob("*") if p.name != "data"]     # no run, cache, log or MLflow store


def test_unknown_dataset_among_others_fails_before_any_step(workspace, tmp_path):
    (tmp_path/"few.csv").write_text("when,shop,sku,qty\n2017-01-02,a,x,1\n2017-01-03,a,x,2\n2017-01-04,b,x,1\n")
    assert CliRunner().invoke(app, ["data", "import", str(tmp_path/"few.csv"), "--date-col", "when", "--store-col", "shop",
                                    "--item-col", "sku", "--sales-col", "qty"]).exit_code == 0
    r = CliRunner().invoke(app, ["run", str(ROOT/"pipeline.yaml"), "-p", "dataset=ds-nope", *TINY])
    assert r.exit_code == 2 and "no dataset version 'ds-nope'; see `cd4ml data list`" in " ".join(r.output.split()), r.output
    assert sorted(p.name for p in workspace.glob("*")) == ["data"]

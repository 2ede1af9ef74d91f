"""End to end on weekly data: a weekly sales CSV imported with `--freq W`, the default pipeline with its release step
(Bento built, served, smoke- and load-tested) for a horizon of 8 weeks, then `cd4ml serve`, the web page, feedback,
`cd4ml monitor` and `--retrain`, all on the weekly grid.

The data: the simulator's daily sales of 3 stores x 8 items summed per store-item and week, dated on the week's
Monday. The first 60 weeks are imported; the 8 weeks after them are the actuals the shops report later.
One workspace and one server are shared by the tests below, which run in order like a project's life.
"""
import json

import httpx
import numpy as np
import pandas as pd
import pytest

from cd4ml.release import as_request

START, WEEKS, LATER, HORIZON = pd.Timestamp("2016-01-04"), 60, 8, 8      # 2016-01-04 is a Monday
MODELS = "models=moving_average,ridge"


def weekly_sales() -> pd.DataFrame:
    "Units per store, item and week (dated on its Monday) and whether the item was on promotion that week."
    from cd4ml.simulate import simulate
    daily = simulate(stores=3, items=8, days=7 * (WEEKS + LATER), start=str(START.date()), seed=0)["train"]
    daily["week"] = daily.date - pd.to_timedelta(daily.date.dt.day_of_week, unit="D")
    daily["onpromotion"] = daily.onpromotion.astype("boolean").fillna(False).astype(bool)
    return (daily.groupby(["week", "store_nbr", "item_nbr"], as_index=False)
                 .agg(units=("unit_sales", "sum"), promo=("onpromotion", "any")))


@pytest.fixture(scope="module")
def weekly(new_workspace, cli, running_server):
    "The weekly dataset imported and run through the default pipeline; then a `cd4ml serve` of its champion."
    ws = new_workspace("weekly")
    sales = weekly_sales()
    end = START + pd.Timedelta(weeks=WEEKS - 1)
    csv = ws.home.parent/"weekly.csv"
    sales[sales.week <= end].to_csv(csv, index=False, date_format="%Y-%m-%d")
    dataset = cli.json(ws.env, "data", "import", csv, "--date-col", "week", "--store-col", "store_nbr", "--item-col", "item_nbr",
                       "--sales-col", "units", "--promo-col", "promo", "--freq", "W")
    run = cli(ws.env, "run", "-p", f"dataset={dataset['version']}", "-p", f"horizon={HORIZON}", "-p", MODELS, "-j", "1", "--json")
    with ws.in_process():        # in-process readers (cd4ml.predict, the registry) see the same workspace
        with running_server(ws.home) as base:
            yield {"home": ws.home, "env": ws.env, "dataset": dataset, "end": end, "run": run, "base": base,
                   "later": sales[sales.week > end].rename(columns={"week": "date"}).reset_index(drop=True)}
    from cd4ml import deployment
    deployment._forecasters.clear()


def test_weekly_import_trains_releases_and_promotes(weekly):
    from cd4ml import registry
    assert (weekly["dataset"]["freq"], weekly["dataset"]["end"]) == ("W", str(weekly["end"].date()))
    run = weekly["run"]
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    rel = out["release"]
    assert (rel["status"], rel["version"], rel["promoted"], rel["champion"]) == ("passed", "1", True, "1"), rel["gates"]
    assert rel["smoke"] == {"/livez": 200, "/readyz": 200, "/predict": 200, "/feedback": 200}
    assert rel["measured"]["errors"] == 0 and rel["measured"]["parity_max_abs_diff"] <= 1e-9
    assert [g["result"] for g in out["gates"] + rel["gates"]] == ["pass"] * 12
    v1 = registry.describe_version("1")
    assert (v1["status"], v1["horizon"], v1["freq"], v1["dataset_version"]) == ("champion", HORIZON, "W", weekly["dataset"]["version"])


def on_grid(weekly, n_pairs=24) -> pd.DataFrame:
    "Every forecastable week of the first `n_pairs` store-items of the actuals, with their promotion flags."
    later = weekly["later"]
    pairs = later[["store_nbr", "item_nbr"]].drop_duplicates().head(n_pairs)
    rows = later.merge(pairs, on=["store_nbr", "item_nbr"])
    return pd.DataFrame({"date": rows.date.astype("datetime64[ns]"), "store_nbr": rows.store_nbr.astype("int64"),
                         "item_nbr": rows.item_nbr.astype("int64"), "onpromotion": rows.promo.astype(bool)})


def test_catalog_offers_the_weekly_grid(weekly):
    cat = httpx.get(f"{weekly['base']}/catalog", timeout=30).json()
    mondays = [str((weekly["end"] + pd.Timedelta(weeks=k)).date()) for k in range(1, HORIZON + 1)]
    assert (cat["freq"], cat["grid"], cat["step_days"], cat["max_horizon"]) == ("W", "weekly (Mondays)", 7, HORIZON)
    assert cat["dates"] == mondays and (cat["first_date"], cat["last_date"]) == (mondays[0], mondays[-1])
    info = httpx.get(f"{weekly['base']}/info", timeout=30).json()["champion"]
    assert (info["version"], info["horizon"], info["freq"]) == ("1", HORIZON, "W")


def test_weekly_predictions_equal_the_library(weekly):
    import cd4ml
    rows = on_grid(weekly)
    assert rows.date.nunique() == HORIZON and len(rows) > 100
    r = httpx.post(f"{weekly['base']}/predict", json={"rows": as_request(rows)}, timeout=60)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["predictions"])
    np.testing.assert_allclose(got, cd4ml.predict(rows), rtol=0, atol=1e-9)
    assert got.std() > 0 and set(r.json()["model_versions"]) == {"1"}


def test_off_grid_and_beyond_horizon_are_refused_by_name(weekly, api_token):
    end, base = weekly["end"], weekly["base"]
    row = {"store_nbr": 1, "item_nbr": int(weekly["later"].item_nbr.iloc[0]), "onpromotion": False}
    tuesday, monday = end + pd.Timedelta(days=8), end + pd.Timedelta(weeks=2)
    r = httpx.post(f"{base}/predict", json={"rows": [{**row, "date": str(tuesday.date())}]}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json() == {"error": f"rows[0].date {tuesday.date()} is not on the weekly grid (Mondays); next valid: {monday.date()}",
                        "field": "rows[0].date", "value": str(tuesday.date())}
    too_far = end + pd.Timedelta(weeks=HORIZON + 1)
    r = httpx.post(f"{base}/predict", json={"rows": [{**row, "date": str(too_far.date())}]}, timeout=30)
    assert r.status_code == 422 and f"max_horizon {HORIZON} weeks" in r.json()["error"], r.text
    r = httpx.post(f"{base}/feedback", json={"rows": [{**row, "date": str(tuesday.date()), "unit_sales": 3.0}]}, headers=api_token.headers, timeout=30)
    assert r.status_code == 422 and "is not on the weekly grid (Mondays)" in r.json()["error"], r.text


def test_page_offers_weekly_dates_only(weekly, web_page):
    cat = httpx.get(f"{weekly['base']}/catalog", timeout=30).json()
    page, errors = web_page(weekly["base"])
    page.wait_for_function("document.querySelectorAll('#dates option').length > 0")
    assert "forecasts weekly (Mondays)" in page.text_content("#model")
    assert page.eval_on_selector_all("#dates option", "os => os.map(o => o.value)") == cat["dates"]
    assert [page.get_attribute("#date", a) for a in ("min", "max", "step")] == [cat["first_date"], cat["last_date"], "7"]
    store, item = page.eval_on_selector_all("#stores option", "os => os.map(o => o.value)")[0], \
                  page.eval_on_selector_all("#items option", "os => os.map(o => o.value)")[0]
    page.fill("#store", store); page.fill("#item", item)
    tuesday = str((pd.Timestamp(cat["dates"][0]) + pd.Timedelta(days=1)).date())
    page.fill("#date", tuesday)
    assert page.eval_on_selector("#date", "d => d.validity.stepMismatch")       # the browser itself says: not on the grid
    page.click("#go")
    assert (f'Date "{tuesday}" is not a forecast day: the model forecasts weekly (Mondays); next: {cat["dates"][1]}.'
            in page.text_content("#message")) and page.is_hidden("#answer")
    page.fill("#date", cat["dates"][2]); page.click("#go")
    page.wait_for_selector("#chart rect.target")
    assert float(page.text_content("#units")) >= 0 and page.is_hidden("#message")
    bars = page.eval_on_selector_all("#chart rect.forecast, #chart rect.target", "rs => rs.map(r => r.dataset.date)")
    assert bars == cat["dates"] and page.get_attribute("#chart rect.target", "data-date") == cat["dates"][2]
    assert not errors


def actuals(rows: pd.DataFrame, units) -> list[dict]:
    return [{"date": d.date().isoformat(), "store_nbr": int(s), "item_nbr": int(i), "unit_sales": float(u), "onpromotion": bool(p)}
            for d, s, i, u, p in zip(rows.date, rows.store_nbr, rows.item_nbr, units, rows.onpromotion)]


def test_feedback_on_weekly_dates_shows_in_monitor(weekly, cli, api_token):
    from cd4ml.metrics import nwrmsle, perishable_weight
    from cd4ml.datasets import load_dataset
    rows = on_grid(weekly)
    reported = rows.merge(weekly["later"].rename(columns={"promo": "onpromotion"}), on=["date", "store_nbr", "item_nbr", "onpromotion"])
    assert len(reported) == len(rows)
    r = httpx.post(f"{weekly['base']}/feedback", json={"rows": actuals(reported, reported.units)}, headers=api_token.headers, timeout=60)
    assert r.status_code == 200, r.text
    live = r.json()["live"]["1"]
    m = cli(weekly["env"], "monitor", "--json")
    assert m.returncode in (0, 1) and m.stdout.startswith("{"), m.stderr[-3000:]
    report = json.loads(m.stdout)
    assert (report["champion"], report["horizon"], report["feedback_rows"]) == ("1", HORIZON, len(rows))
    assert report["drift_rows"] >= len(rows) and report["drift"]["unit_sales"]["psi"] is not None
    served = pd.concat([pd.DataFrame({**rec["rows"], "prediction": rec["predictions"]})
                        for rec in map(json.loads, (weekly["home"]/"predictions"/"predictions.jsonl").read_text().splitlines())])
    keys = ["date", "store_nbr", "item_nbr", "onpromotion"]     # each once (the page asked one too), with the week's real flag
    joined = served.astype({"date": "datetime64[ns]"}).drop_duplicates(keys, keep="last").merge(reported, on=keys)
    assert len(joined) == len(rows) and report["live"]["1"]["n"] == live["n"] == len(joined)
    items = load_dataset(weekly["dataset"]["version"]).table("items").set_index("item_nbr")
    expected = nwrmsle(joined.units, joined.prediction, perishable_weight(joined.item_nbr.map(items.perishable)))
    assert report["live"]["1"]["nwrmsle"] == pytest.approx(expected, rel=1e-9) == pytest.approx(live["nwrmsle"], rel=1e-9)


def test_retrain_grows_the_weekly_dataset(weekly, cli, api_token):
    "Demand triples in the reported weeks: monitoring alerts, and --retrain trains, releases and promotes a weekly model for 8 weeks."
    from cd4ml import registry
    rows = on_grid(weekly)
    reported = rows.merge(weekly["later"].rename(columns={"promo": "onpromotion"}), on=["date", "store_nbr", "item_nbr", "onpromotion"])
    r = httpx.post(f"{weekly['base']}/feedback", json={"rows": actuals(reported, reported.units * 3)}, headers=api_token.headers, timeout=60)
    assert r.status_code == 200, r.text
    m = cli(weekly["env"], "monitor", "--retrain", "-p", MODELS, "--json")
    assert m.returncode == 1 and m.stdout.startswith("{"), m.stderr[-3000:]
    report = json.loads(m.stdout)
    assert "accuracy" in {a["kind"] for a in report["alerts"]} and report["retrain"], report["alerts"]
    from cd4ml.datasets import load_dataset
    retrained = report["retrained"]
    grown = load_dataset(retrained["dataset_version"])
    last = weekly["end"] + pd.Timedelta(weeks=LATER)
    assert (grown.meta["freq"], grown.meta["end"], grown.meta["parent"]) == ("W", str(last.date()), weekly["dataset"]["version"])
    assert ((grown.sales.date - START).dt.days % 7 == 0).all()
    assert retrained["result"]["dataset"] == grown.version, {k: v for k, v in retrained.items() if k != "result"}
    assert (retrained["exit_code"], retrained["result"]["release"]["status"], retrained["champion_after"]) == (0, "passed", "2"), \
        {k: v for k, v in retrained.items() if k != "result"}
    v2 = registry.describe_version("2")          # trained for the champion's horizon, released, promoted
    assert (v2["status"], v2["horizon"], v2["freq"], v2["dataset_version"]) == ("champion", HORIZON, "W", grown.version)

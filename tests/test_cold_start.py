"""End to end: an item imported after training (`cd4ml data import --items`) through `cd4ml serve`: in its catalog,
answered from its hierarchy with `cold_start: true` (the web page says so and draws no band), the same numbers as
`cd4ml.predict`, its actuals taken and grown into the dataset a retrain trains on."""
import os
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

LAUNCH = 130   # a new item: the registry's 30 items are 100..129

@pytest.fixture(scope="module")
def served(served_registry, cli, tmp_path_factory):
    def import_a_launch(facts):
        "Item LAUNCH imported as a user does, before the server starts (`os.environ` is on the test's workspace)."
        home = Path(os.environ["CD4ML_HOME"])
        env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}}
        (home/"items.csv").write_text("item_nbr,family,class,perishable\n101,DAIRY,1001,1\n130,DAIRY,1001,1\n")
        return {"imported": cli.json(env, "data", "import", "--items", home/"items.csv")}
    with served_registry(tmp_path_factory.mktemp("cold")/"cd4ml-home", prepare=import_a_launch) as served: yield served

def test_items_import_makes_a_version(served):
    imported = served["imported"]
    from cd4ml.datasets import load_dataset
    assert (imported["items_of"], imported["items_added"]) == (served["dataset"].version, 1)
    items = load_dataset(imported["version"]).table("items")
    assert items.item_nbr.tolist() == list(range(100, 131)) and items.iloc[-1].family == "DAIRY"

def test_the_page_says_a_forecast_is_a_cold_start(served, web_page):
    "The web page: the new item's forecast with a badge saying where it comes from and no band; a known item's without."
    page, errors = web_page(served["base"])
    page.wait_for_function("document.querySelectorAll('#items option').length == 31")
    page.fill("#store", "2 — Guayaquil (type B)"); page.fill("#item", f"{LAUNCH} — DAIRY"); page.fill("#date", "2017-05-01")
    page.click("#go")
    page.wait_for_selector("#chart-box:not([hidden])")
    row = {"date": "2017-05-01", "store_nbr": 2, "item_nbr": LAUNCH, "onpromotion": False}
    body = httpx.post(f"{served['base']}/predict", json={"rows": [row]}, timeout=60).json()
    assert body["cold_start"] == [True]
    assert float(page.text_content("#units")) == pytest.approx(body["predictions"][0], abs=0.051)
    assert page.is_visible("#cold")
    assert "new item here: no sales yet, forecast from its class/family peers" in page.text_content("#cold")
    assert page.query_selector("#chart polygon.band") is None and page.is_hidden("#band-legend")   # no interval: no band
    assert page.text_content("#range") == "" and "NaN" not in page.inner_html("#chart")
    assert page.eval_on_selector_all("#chart rect.forecast, #chart rect.target", "rs => rs.length") == 16
    if os.environ.get("CD4ML_SCREENSHOTS"):                           # opt-in: look at the page as a person would
        page.screenshot(path=str(Path(os.environ["CD4ML_SCREENSHOTS"])/"cold-start-page.png"), full_page=True)
    page.fill("#item", "101 — DAIRY"); page.click("#go")                  # a known item: no badge, its band again
    page.wait_for_selector("#chart polygon.band")
    assert page.is_hidden("#cold") and "10–90 % interval" in page.text_content("#range")
    assert page.is_hidden("#message") and not errors

def test_a_new_item_is_forecast_from_its_hierarchy(served, api_token):
    from cd4ml import deployment
    from cd4ml.logstore import read_log
    base = served["base"]
    assert httpx.get(f"{base}/info").json()["champion"]["items_version"] == served["imported"]["version"]
    rows = [{"date": "2017-05-0%d" % d, "store_nbr": 2, "item_nbr": item, "onpromotion": promo}
            for d in (1, 2) for item in (LAUNCH, 101) for promo in (False, True)]
    r = httpx.post(f"{base}/predict", json={"rows": rows, "quantiles": [0.1, 0.9]}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cold_start"] == [row["item_nbr"] == LAUNCH for row in rows]
    np.testing.assert_allclose(body["predictions"], deployment.predict(rows), rtol=0, atol=1e-9)
    got = np.array(body["predictions"])
    # item 130 (DAIRY, class 1001) in store 2: its class has one DAIRY item (101), fewer than 3 like items, so it gets
    # the level of the family's items there: the mean log1p units on that weekday over the last 8 weeks
    sales = served["dataset"].sales
    last8 = sales[(sales.store_nbr == 2) & sales.item_nbr.isin(range(101, 130, 5))].pivot_table(
        "unit_sales", "date", "item_nbr").reindex(pd.date_range("2017-03-06", "2017-04-30")).fillna(0)
    by_weekday = np.expm1(np.log1p(last8).groupby(last8.index.day_of_week).mean().mean(axis=1))
    np.testing.assert_allclose(got[[0, 4]], by_weekday[[0, 1]], rtol=1e-9)   # Monday 1 May, Tuesday 2 May
    assert got[1] >= got[0] and got[0] > 1                    # a promotion lifts it; not the ~0 of a zero history
    assert body["quantiles"]["0.1"][0] is None and body["quantiles"]["0.9"][2] > got[2]   # no band for a cold start
    logged = {rec["request_id"]: rec for rec in read_log(served["home"]/"predictions")}[body["request_id"]]
    assert logged["cold_start"] == body["cold_start"] and logged["predictions"] == body["predictions"]
    h = httpx.get(f"{base}/history", params={"store_nbr": 2, "item_nbr": LAUNCH}).json()
    assert h["cold_start"] is True and h["interval"] is None and sum(a["unit_sales"] for a in h["actual"]) == 0

    unknown = httpx.post(f"{base}/predict", json={"rows": [{**rows[0], "item_nbr": 131}]}, timeout=60)
    assert unknown.status_code == 422 and unknown.json()["field"] == "rows[0].item_nbr" and unknown.json()["value"] == 131
    actual = {"date": "2017-05-01", "store_nbr": 2, "item_nbr": LAUNCH, "unit_sales": 6.0, "onpromotion": False}
    refused = httpx.post(f"{base}/feedback", json={"rows": [{**actual, "item_nbr": 131}]}, headers=api_token.headers)
    assert refused.status_code == 422 and refused.json()["field"] == "rows[0].item_nbr"
    fed = httpx.post(f"{base}/feedback", json={"rows": [actual]}, headers=api_token.headers, timeout=60)
    assert fed.status_code == 200 and fed.json()["rows"] == 1, fed.text

    from cd4ml.imports import import_items                # another launch, learnt on /admin/reload
    (served["home"]/"more.csv").write_text("item_nbr,family,class,perishable\n131,EGGS,1003,1\n")
    import_items(served["home"]/"more.csv")
    assert httpx.post(f"{base}/admin/reload", headers=api_token.headers, timeout=120).status_code == 200
    again = httpx.post(f"{base}/predict", json={"rows": [{**rows[0], "item_nbr": 131}, rows[0]]}, timeout=60).json()
    assert again["cold_start"] == [True, True] and again["predictions"][1] == pytest.approx(got[0], abs=1e-9)

    from cd4ml.monitor import workspace_report           # what `cd4ml monitor` reports: the new item scored apart
    split = workspace_report()["live_cold_start"]
    assert (split["known"]["n"], split["new"]["n"]) == (0, 1)                   # the one actual posted: item 130's
    assert split["new"]["mae"] == pytest.approx(abs(6.0 - got[0]), abs=1e-9)

    from cd4ml.cli_monitor import feedback_dataset      # what `cd4ml monitor --retrain` trains on
    from cd4ml.datasets import load_dataset
    grown = load_dataset(feedback_dataset({"dataset_version": served["dataset"].version, "feedback_rows": 1}))
    assert LAUNCH in grown.table("items").item_nbr.tolist() and grown.meta["parent"] != served["dataset"].version
    new = grown.sales[grown.sales.item_nbr == LAUNCH]
    assert (new.date.dt.strftime("%Y-%m-%d").tolist(), new.unit_sales.tolist()) == (["2017-05-01"], [6.0])

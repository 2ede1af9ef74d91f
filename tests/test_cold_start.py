"""End to end: a store-item with no sales up to the history end (an item launched after it) through `cd4ml serve`:
answered from its hierarchy with `cold_start: true`, the same numbers as `cd4ml.predict`, and its actuals taken."""
import httpx
import numpy as np
import pandas as pd
import pytest

LAUNCH = 130   # an item in the catalog, never sold: the registry's 30 items are 100..129

def with_a_launch(facts):
    "Serve the registry's versions on their dataset plus item LAUNCH (in its items table, no sales): a cold start."
    import mlflow
    from cd4ml.datasets import save_dataset
    ds = facts["dataset"]
    tables = {name: ds.table(name) for name in ("sales", "items", "stores", "holidays", "oil", "transactions")}
    tables["items"] = pd.concat([tables["items"], pd.DataFrame({"item_nbr": [LAUNCH], "family": ["DAIRY"],
                                                                "class": [1001], "perishable": [1]})], ignore_index=True)
    launched = save_dataset(tables, source="tests: an item launched after the history")
    for version in ("1", "2"): mlflow.MlflowClient().set_model_version_tag("sales", version, "dataset_version", launched.version)
    return {"launched": launched}

@pytest.fixture(scope="module")
def served(served_registry, tmp_path_factory):
    with served_registry(tmp_path_factory.mktemp("cold")/"cd4ml-home", prepare=with_a_launch) as served: yield served

def test_a_new_item_is_forecast_from_its_hierarchy(served, api_token):
    from cd4ml import deployment
    from cd4ml.logstore import read_log
    base = served["base"]
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

    actual = {"date": "2017-05-01", "store_nbr": 2, "item_nbr": LAUNCH, "unit_sales": 6.0, "onpromotion": False}
    fed = httpx.post(f"{base}/feedback", json={"rows": [actual]}, headers=api_token.headers, timeout=60)
    assert fed.status_code == 200 and fed.json()["rows"] == 1, fed.text
    unknown = httpx.post(f"{base}/predict", json={"rows": [{**rows[0], "item_nbr": 131}]}, timeout=60)
    assert unknown.status_code == 422 and unknown.json()["field"] == "rows[0].item_nbr" and unknown.json()["value"] == 131
    refused = httpx.post(f"{base}/feedback", json={"rows": [{**actual, "item_nbr": 131}]}, headers=api_token.headers)
    assert refused.status_code == 422 and refused.json()["field"] == "rows[0].item_nbr"

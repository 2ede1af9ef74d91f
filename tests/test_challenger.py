"""End to end: a challenger in shadow and on a canary never hurts the answer. `cd4ml serve` on the served registry's
champion (v1) with a third version as challenger: one whose model raises, and one retrained the way
`cd4ml monitor --retrain` retrains (the champion's dataset grown by the actuals of its first served days, saved by
`cli_monitor.feedback_dataset`) and left challenger, as with `auto_promote: false`."""
import httpx
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import TransformedTargetRegressor
from sklearn.linear_model import Ridge

from cd4ml.release import as_request, catalog_rows

SHADOW_AND_CANARY = {"CD4ML_SHADOW": "1", "CD4ML_CANARY_PERCENT": "50"}
REPORTED = 8          # days of actuals the retrain adds: the challenger's history ends 8 days after the champion's

def register_challenger(model, dataset_version: str) -> str:
    "Register `model` as the next version of `sales`, trained on `dataset_version`, with the alias `challenger`."
    import mlflow, mlflow.sklearn
    client = mlflow.MlflowClient()
    with mlflow.start_run(experiment_id=client.get_experiment_by_name("serving-tests").experiment_id):
        mlflow.set_tags({"dataset_version": dataset_version, "git_sha": "test"})
        info = mlflow.sklearn.log_model(model, name="model", registered_model_name="sales",
                                        pip_requirements=["scikit-learn", "numpy", "pandas"])
    version = str(info.registered_model_version)
    for tag, value in (("dataset_version", dataset_version), ("horizon", "16"), ("freq", "D")):
        client.set_model_version_tag("sales", version, tag, value)
    client.set_registered_model_alias("sales", "challenger", version)
    return version

def training_frame(ds):
    from cd4ml import features
    end = pd.Timestamp(ds.meta["end"])
    return features.training_frame(ds, [end - pd.Timedelta(days=d) for d in (16, 30, 44, 58)], 16)

def fallback_rows(base) -> dict:
    "(role, reason) -> value of `cd4ml_challenger_fallback_rows_total` on /metrics."
    out = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("cd4ml_challenger_fallback_rows_total{"):
            labels = dict(kv.split("=") for kv in line[line.index("{") + 1:line.index("}")].split(","))
            out[(labels["role"].strip('"'), labels["reason"].strip('"'))] = float(line.split()[-1])
    return out

def offline(model, ds, rows):
    from cd4ml import features, models
    return models.predict(model, features.features_for(ds, rows, pd.Timestamp(ds.meta["end"])))

def test_a_failing_challenger_is_counted_and_the_champion_answers(served_registry, tmp_path):
    def broken(facts):     # fitted with a column the served features lack: its predict raises, as sklearn does
        frame = training_frame(facts["dataset"])
        from cd4ml.features import FEATURES
        model = TransformedTargetRegressor(Ridge(), func=np.log1p, inverse_func=np.expm1)
        model.fit(frame[FEATURES].assign(extra=0.0), frame.unit_sales)
        return {"challenger": register_challenger(model, facts["dataset"].version)}
    with served_registry(tmp_path/"cd4ml-home", env=SHADOW_AND_CANARY, prepare=broken) as served:
        rows = catalog_rows(served["dataset"], 16, 200, seed=3)
        r = httpx.post(f"{served['base']}/predict", json={"rows": as_request(rows)}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["model_versions"]) == {"1"}
        np.testing.assert_allclose(body["predictions"], offline(served["models"]["1"], served["dataset"], rows), rtol=0, atol=1e-9)
        counted = fallback_rows(served["base"])
        assert counted[("shadow", "error")] == 200 and 0 < counted[("canary", "error")] < 200, counted
        log = next(served["home"].glob("server-*.log")).read_text()
        assert f"challenger v{served['challenger']} failed in shadow on 200 rows; the champion answers" in log, log[-3000:]

def test_a_challenger_retrained_on_reported_days_serves_the_days_it_can(served_registry, tmp_path, simulated_tables):
    def retrained(facts):
        from cd4ml import models
        from cd4ml.cli_monitor import feedback_dataset
        from cd4ml.contract import parse_feedback
        from cd4ml.datasets import load_dataset
        from cd4ml.predlog import record_feedback
        ds, end = facts["dataset"], pd.Timestamp(facts["dataset"].meta["end"])
        later = simulated_tables(days=120 + REPORTED)["sales"]
        reported = later[later.date > end]
        record_feedback(parse_feedback([{"date": str(d.date()), "store_nbr": int(s), "item_nbr": int(i),
                                         "unit_sales": float(u), "onpromotion": bool(p)}
                                        for d, s, i, u, p in zip(reported.date, reported.store_nbr, reported.item_nbr,
                                                                 reported.unit_sales, reported.onpromotion)]))
        grown = load_dataset(feedback_dataset({"dataset_version": ds.version, "feedback_rows": len(reported)}))
        model = models.fit(models.make_model("ridge", {"alpha": 1.0}), training_frame(grown))
        return {"grown": grown, "model": model, "challenger": register_challenger(model, grown.version)}
    with served_registry(tmp_path/"cd4ml-home", env=SHADOW_AND_CANARY, prepare=retrained) as served:
        from cd4ml.deployment import route
        from cd4ml.logstore import read_log
        ds, grown, base, v = served["dataset"], served["grown"], served["base"], served["challenger"]
        end = pd.Timestamp(ds.meta["end"])
        assert pd.Timestamp(grown.meta["end"]) == end + pd.Timedelta(days=REPORTED)
        rows = catalog_rows(ds, 16, 400, seed=5)
        r = httpx.post(f"{base}/predict", json={"rows": as_request(rows)}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        theirs = (rows.date > pd.Timestamp(grown.meta["end"])).to_numpy()       # days only the challenger forecasts
        assert 0 < theirs.sum() < len(rows)
        answered = theirs & route(rows, 50)
        assert list(body["model_versions"]) == np.where(answered, v, "1").tolist()
        expected = offline(served["models"]["1"], ds, rows)
        expected[answered] = offline(served["model"], grown, rows[answered])
        np.testing.assert_allclose(body["predictions"], expected, rtol=0, atol=1e-9)
        shadow = read_log(served["home"]/"predictions")[-1]["shadow"]
        assert shadow["model_version"] == v and [p is None for p in shadow["predictions"]] == (~theirs).tolist()
        np.testing.assert_allclose(np.array(shadow["predictions"])[theirs].astype(float),
                                   offline(served["model"], grown, rows[theirs]), rtol=0, atol=1e-9)
        counted = fallback_rows(base)
        predicted = [l for l in httpx.get(f"{base}/metrics", timeout=30).text.splitlines()
                     if l.startswith("cd4ml_predicted_rows_total{") and f'model_version="{v}"' in l and 'role="shadow"' in l]
        assert [float(l.split()[-1]) for l in predicted] == [theirs.sum()], predicted
        assert counted[("shadow", "catalog")] == (~theirs).sum(), counted
        assert counted[("canary", "catalog")] == (~theirs & route(rows, 50)).sum(), counted
        beyond = {"date": str((end + pd.Timedelta(days=17)).date()), "store_nbr": 1, "item_nbr": 100, "onpromotion": False}
        r = httpx.post(f"{base}/predict", json={"rows": [beyond]}, timeout=30)       # the champion's window decides
        assert r.status_code == 422 and "outside the forecastable window" in r.text, r.text

def test_a_challenger_with_no_day_in_common_is_refused_at_start(served_registry, tmp_path):
    "Actuals for all 16 served days: the retrained version's window starts where the champion's ends."
    def disjoint(facts):
        from cd4ml import models
        from cd4ml.datasets import load_dataset, save_dataset, TABLES
        ds = facts["dataset"]
        tables = {name: ds.table(name) for name in TABLES if name in ds}
        sales = tables["sales"]
        moved = sales.assign(date=sales.date + pd.Timedelta(days=16))     # the same history, 16 days on
        grown = save_dataset({**tables, "sales": moved, "oil": tables["oil"].assign(date=tables["oil"].date + pd.Timedelta(days=16)),
                              "transactions": tables["transactions"].assign(date=tables["transactions"].date + pd.Timedelta(days=16))},
                             source="tests: 16 days later")
        register_challenger(models.fit(models.make_model("ridge"), training_frame(load_dataset(grown.version))), grown.version)
        return {}
    with pytest.raises(RuntimeError) as failed:
        with served_registry(tmp_path/"cd4ml-home", env={"CD4ML_SHADOW": "1"}, prepare=disjoint): pass
    said = " ".join(str(failed.value).split())
    assert "server exited with 2" in said and "error: challenger v3 forecasts 2017-05-17..2017-06-01 (history ends 2017-05-16) and champion v1 " \
           "2017-05-01..2017-05-16 (history ends 2017-04-30): no day in common" in said, said[-3000:]

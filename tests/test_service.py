"""End to end: `cd4ml serve` on a real registry, over HTTP on a loopback port.

One server runs the champion (v1) with the challenger (v2) in shadow *and* on a 30 % canary, so every test
below also checks routing: each row must equal the offline prediction of the version that answered it.
"""
import math, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from cd4ml.release import as_request, catalog_rows

ROOT = Path(__file__).resolve().parents[1]
CANARY = 30

@pytest.fixture(scope="module")
def served(served_registry, tmp_path_factory):
    home = tmp_path_factory.mktemp("serve")/"cd4ml-home"
    with served_registry(home, env={"CD4ML_SHADOW": "1", "CD4ML_CANARY_PERCENT": str(CANARY)}) as served: yield served

def offline(served, version, rows):
    "What training/evaluation code computes for `rows` with model `version`."
    from cd4ml import features, models
    ds = served["dataset"]
    return models.predict(served["models"][version], features.features_for(ds, rows, pd.Timestamp(ds.meta["end"])))

def post(base, rows, **kw):
    return httpx.post(f"{base}/predict", json={"rows": rows}, timeout=60, **kw)

def test_served_equals_offline_over_1200_rows(served):
    from cd4ml.deployment import route
    rows = catalog_rows(served["dataset"], 16, 1200)
    assert rows.store_nbr.nunique() == 4 and rows.item_nbr.nunique() == 30 and rows.date.nunique() == 16
    assert 0.4 < rows.onpromotion.mean() < 0.6
    sizes = [1, 2, 7, 40, 150, 400, 600]                     # requests of many sizes, sent concurrently
    bounds = np.cumsum([0] + sizes); assert bounds[-1] == 1200
    chunks = [rows.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda c: post(served["base"], as_request(c)), chunks))
    assert [r.status_code for r in responses] == [200] * len(chunks)
    bodies = [r.json() for r in responses]
    got = np.concatenate([b["predictions"] for b in bodies])
    versions = np.concatenate([b["model_versions"] for b in bodies])
    to_challenger = route(rows, CANARY)
    np.testing.assert_array_equal(versions, np.where(to_challenger, "2", "1"))
    assert 0.15 < to_challenger.mean() < 0.45
    expected = np.where(to_challenger, offline(served, "2", rows), offline(served, "1", rows))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert got.std() > 0.5 and (got >= 0).all()
    assert len({b["request_id"] for b in bodies}) == len(bodies)
    assert bodies[0]["model_version"] == bodies[0]["model_versions"][0]          # a 1-row request names its version
    assert bodies[-1]["model_version"] == "mixed"

CACHE_ROWS = 150

@pytest.fixture(scope="module")
def wide(new_workspace, running_server):
    """A wider catalog: 20 stores x 200 items simulated (4,000 series, stored in parts as the dask engine stores them),
    a ridge champion, served with an answer cache of CACHE_ROWS rows."""
    import mlflow, mlflow.sklearn
    from cd4ml import features, models
    from cd4ml.scale import generate_partitioned
    ws = new_workspace("wide")
    with ws.in_process():                          # the other tests' server and registry stay the process's after
        ds = generate_partitioned(stores=20, items=200, days=130, start="2017-01-01", seed=3)
        end = pd.Timestamp(ds.meta["end"])
        model = models.fit(models.make_model("ridge"), features.training_frame(ds, [end - pd.Timedelta(days=16)], 16))
        client = ws.client()
        with mlflow.start_run(experiment_id=client.create_experiment("wide", artifact_location=(ws.home/"artifacts").as_uri())):
            mlflow.sklearn.log_model(model, name="model", registered_model_name="sales",
                                     pip_requirements=["scikit-learn", "numpy", "pandas"])
        for tag, value in (("dataset_version", ds.version), ("horizon", "16"), ("freq", "D")):
            client.set_model_version_tag("sales", "1", tag, value)
        client.set_registered_model_alias("sales", "champion", "1")
    with running_server(ws.home, env={"CD4ML_CACHE_ROWS": str(CACHE_ROWS)}) as base:
        yield {"dataset": ds, "model": model, "base": base}

def cache_counts(base) -> dict:
    "The answer cache's counters on /metrics, by event, for model version 1."
    lines = httpx.get(f"{base}/metrics").text.splitlines()
    return {event: float(next(l for l in lines if l.startswith(f'cd4ml_answer_cache_{event}_total{{model_version="1"}}')).split()[-1])
            for event in ("hits", "misses", "evictions")}

def test_random_rows_of_a_wide_catalog_equal_offline_cold_and_hot(wide):
    "Rows no cache holds (store-items that never sold among them), then rows it does: all equal the offline prediction."
    from cd4ml.forecaster import offline_predict
    ds, base = wide["dataset"], wide["base"]
    sold = set(zip(ds.sales.store_nbr, ds.sales.item_nbr))
    never = [(s, i) for s in ds.table("stores").store_nbr for i in ds.table("items").item_nbr if (s, i) not in sold][:5]
    rows = pd.concat([catalog_rows(ds, 16, 395, seed=4),
                      catalog_rows(ds, 16, 5, seed=5).assign(store_nbr=[s for s, _ in never], item_nbr=[i for _, i in never])])
    rows = rows.drop_duplicates().reset_index(drop=True)
    assert len(never) == 5 and rows.store_nbr.nunique() == 20 and rows.item_nbr.nunique() > 150
    expected = offline_predict(wide["model"], ds, rows)          # features_for and the model; never sold: hierarchy
    answers = lambda i: post(base, as_request(rows.iloc[[i]])).json()
    n = len(rows)
    with ThreadPoolExecutor(8) as pool: cold = list(pool.map(answers, range(n - 100)))   # concurrent, micro-batched
    cold += [answers(i) for i in range(n - 100, n)]                                        # the last 100 in order
    np.testing.assert_allclose([a["predictions"][0] for a in cold], expected, rtol=0, atol=1e-9)
    never_sold = np.array([(s, i) not in sold for s, i in zip(rows.store_nbr, rows.item_nbr)])
    assert [a["cold_start"][0] for a in cold] == never_sold.tolist() and never_sold.sum() >= 5
    assert cache_counts(base) == {"hits": 0, "misses": n, "evictions": n - CACHE_ROWS}
    hot = post(base, as_request(rows.iloc[n - 100:])).json()["predictions"]         # still among the last 150
    np.testing.assert_allclose(hot, expected[n - 100:], rtol=0, atol=1e-9)
    assert cache_counts(base) == {"hits": 100, "misses": n, "evictions": n - CACHE_ROWS}
    again = post(base, as_request(rows.iloc[:200])).json()["predictions"]           # evicted long ago: computed again
    np.testing.assert_allclose(again, expected[:200], rtol=0, atol=1e-9)
    assert cache_counts(base) == {"hits": 100, "misses": n + 200, "evictions": n + 200 - CACHE_ROWS}

def test_canary_is_sticky_per_store_item(served):
    rows = catalog_rows(served["dataset"], 16, 200, seed=5)
    first = post(served["base"], as_request(rows)).json()["model_versions"]
    again = post(served["base"], as_request(rows.iloc[::-1])).json()["model_versions"]
    assert first == again[::-1]
    by_pair = pd.DataFrame({"pair": rows.store_nbr * 1000 + rows.item_nbr, "v": first}).groupby("pair").v.nunique()
    assert (by_pair == 1).all()

def test_embedded_predict_matches_the_service(served):
    from cd4ml import deployment
    rows = catalog_rows(served["dataset"], 16, 300, seed=9)
    np.testing.assert_allclose(deployment.predict(rows), offline(served, "1", rows), rtol=0, atol=1e-9)
    np.testing.assert_allclose(deployment.predict(as_request(rows), model_version=2), offline(served, "2", rows), rtol=0, atol=1e-9)
    with pytest.raises(Exception, match="model version 2 was registered without intervals"):
        deployment.predict(rows, model_version=2, quantiles=[0.1, 0.9])

def test_prediction_log_has_every_request_with_shadow(served):
    from cd4ml.logstore import read_log
    rows = catalog_rows(served["dataset"], 16, 25, seed=3)
    body = post(served["base"], as_request(rows)).json()
    logged = {r["request_id"]: r for r in read_log(served["home"]/"predictions")}
    rec = logged[body["request_id"]]
    assert rec["predictions"] == body["predictions"] and rec["model_versions"] == body["model_versions"]
    assert rec["rows"]["date"] == [d.date().isoformat() for d in rows.date]
    assert rec["rows"]["item_nbr"] == rows.item_nbr.tolist() and rec["rows"]["onpromotion"] == rows.onpromotion.tolist()
    assert rec["shadow"]["model_version"] == "2"
    np.testing.assert_allclose(rec["shadow"]["predictions"], offline(served, "2", rows), rtol=0, atol=1e-9)
    assert 0 < rec["latency_ms"] < 60_000 and rec["time"].startswith("20")

def test_feedback_live_accuracy_equals_the_monitor_recomputation(served, api_token):
    "/feedback answers from running sums (predlog.LiveAccuracy); they must equal cd4ml.monitor's recomputation from the logs."
    from cd4ml import monitor
    from cd4ml.logstore import read_feedback, read_log
    base, home = served["base"], served["home"]
    rows = catalog_rows(served["dataset"], 16, 300, seed=13)
    asked_here = [post(base, as_request(rows))]
    assert asked_here[0].status_code == 200
    def actuals(frame, units, flip=None):    # flip: where the day's promotion was not what the request asked
        flip = np.zeros(len(frame), bool) if flip is None else flip
        return [{"date": d.date().isoformat(), "store_nbr": int(s), "item_nbr": int(i), "unit_sales": float(u),
                 "onpromotion": bool(p) != bool(f)}
                for d, s, i, u, p, f in zip(frame.date, frame.store_nbr, frame.item_nbr, units, frame.onpromotion, flip)]
    first = httpx.post(f"{base}/feedback", json={"rows": actuals(rows.iloc[:200], np.arange(200) % 7)}, headers=api_token.headers, timeout=60)
    assert first.status_code == 200, first.text
    asked_here.append(post(base, as_request(rows.iloc[150:250])))                 # asked again after their actuals
    assert asked_here[1].status_code == 200
    second = httpx.post(f"{base}/feedback", json={"rows": actuals(rows.iloc[100:300], np.arange(200) * 0.25, flip=np.arange(200) >= 150)},
                        headers=api_token.headers, timeout=60)
    assert second.status_code == 200, second.text                                 # 100 actuals replaced
    assert read_feedback(home/"feedback")[-1]["rows"]["onpromotion"] == (rows.onpromotion.iloc[100:300] != (np.arange(200) >= 150)).tolist()
    live = second.json()["live"]
    full = monitor.live_metrics(monitor.join_feedback(monitor.served_frame(read_log(home/"predictions")),
                                                      monitor.feedback_frame(read_feedback(home/"feedback"))),
                                served["dataset"].table("items"))
    assert sorted(live) == sorted(full) == ["1", "2"]
    for version, m in full.items():
        assert (live[version]["n"], live[version]["roles"]) == (m["n"], m["roles"])
        assert abs(live[version]["nwrmsle"] - m["nwrmsle"]) <= 1e-9 * m["nwrmsle"] and abs(live[version]["mae"] - m["mae"]) <= 1e-9 * m["mae"]
    assert full["2"]["roles"] == ["answer", "shadow"] and full["1"]["n"] > 0 and full["2"]["n"] > full["1"]["n"]
    flags = dict(zip(zip(rows.date, rows.store_nbr, rows.item_nbr), rows.onpromotion))          # the first post's flags,
    flags |= dict(zip(zip(rows.date[100:], rows.store_nbr[100:], rows.item_nbr[100:]),            # then the second's
                      rows.onpromotion[100:] != (np.arange(200) >= 150)))
    asked = set(zip(rows.date, rows.store_nbr, rows.item_nbr, rows.onpromotion))
    joined = monitor.join_feedback(monitor.served_frame(read_log(home/"predictions")), monitor.feedback_frame(read_feedback(home/"feedback")))
    here = joined[(joined.model_version == "2") & joined.request_id.isin([r.json()["request_id"] for r in asked_here])]
    assert len(here) == sum(flags[k[:3]] == k[3] for k in asked) < len(rows)     # shadow: each key once, what-ifs out
    counted = live_counters(httpx.get(f"{base}/metrics", timeout=30).text)      # what Prometheus adds up across pods
    assert counted[("1", "removed")]["rows"] > 0 and counted[("2", "removed")]["rows"] > 0   # the 100 replaced actuals
    for version, m in live.items():
        net = {name: counted[(version, "added")][name] - counted[(version, "removed")][name] for name in counted[(version, "added")]}
        assert net["rows"] == m["n"]
        assert abs(math.sqrt(net["weighted_sq_log_error"] / net["weight"]) - m["nwrmsle"]) <= 1e-9
        assert abs(net["abs_error"] / net["rows"] - m["mae"]) <= 1e-9

def live_counters(metrics: str) -> dict:
    "(model_version, change) -> {sum name: value} of the `cd4ml_live_*_total` counters in a /metrics page."
    out = {}
    for line in metrics.splitlines():
        if line.startswith("cd4ml_live_") and "_total{" in line:
            name, labels = line.split("{")[0].removeprefix("cd4ml_live_").removesuffix("_total"), line.split("{")[1].split("}")[0]
            tags = dict(kv.split("=") for kv in labels.split(","))
            out.setdefault((tags["model_version"].strip('"'), tags["change"].strip('"')), {})[name] = float(line.split()[-1])
    return out

BAD = [  # (body or raw bytes, expected status, text the message must contain)
    ({"rows": []}, 400, "rows is empty"),
    ({}, 400, "rows"),
    ({"rows": [{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100}]}, 400, "rows[0].onpromotion is missing"),
    ({"rows": [{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100, "onpromotion": False, "price": 3}]}, 400, "rows[0].price"),
    ({"rows": [{"date": "2017-05-03", "store_nbr": "1", "item_nbr": 100, "onpromotion": False}]}, 400, "rows[0].store_nbr must be an integer from 0 to 2147483647; got '1'"),
    ({"rows": [{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100, "onpromotion": "yes"}]}, 400, "rows[0].onpromotion must be true or false; got 'yes'"),
    ({"rows": [{"date": "May 3", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}]}, 400, "rows[0].date must be a date 'YYYY-MM-DD'; got 'May 3'"),
    ({"rows": [{"date": "2017-05-03", "store_nbr": 77, "item_nbr": 100, "onpromotion": False}]}, 422, "unknown store 77"),
    ({"rows": [{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 5, "onpromotion": False}]}, 422, "unknown item 5"),
    ({"rows": [{"date": "2017-04-30", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}]}, 422, "rows[0].date 2017-04-30 is outside"),
    ({"rows": [{"date": "2017-05-17", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}]}, 422, "max_horizon 16"),
    ({"rows": [{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}] * 1001}, 400, "1001 rows; at most 1000"),
    ([{"date": "2017-05-03"}], 400, "validation error"),
    (b"{not json", 400, "validation error"),
    ({"rows": [{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}], "quantiles": [0.1, 1.2]}, 400, "quantiles[1] must be a number strictly between 0 and 1; got 1.2"),
    ({"rows": [{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}], "quantiles": [0.9, 0.1]}, 400, "quantiles[1] must be greater than quantiles[0]"),
    ({"rows": [{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}], "quantiles": ["0.1"]}, 400, "quantiles[0] must be a number strictly between 0 and 1; got '0.1'"),
    ({"rows": [{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}], "quantiles": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}, 400, "quantiles has 6 levels; at most 5"),
    # the canary's v2 was registered without intervals: asking for quantiles while it may answer is refused
    ({"rows": [{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}], "quantiles": [0.1, 0.9]}, 422, "quantiles: model version 2 was registered without intervals"),
    (b'{"rows": [' + b'{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100, "onpromotion": false},' * 20000 + b"]}", 413, "over the limit"),
]

@pytest.mark.parametrize("body,status,text", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_a_4xx_naming_field_and_value(served, body, status, text):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{served['base']}/predict", timeout=60, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert text in r.text, r.text

def test_web_json_endpoints_and_bentoml_extras(served):
    base = served["base"]
    assert httpx.get(f"{base}/livez").status_code == 200 and httpx.get(f"{base}/readyz").status_code == 200
    cat = httpx.get(f"{base}/catalog").json()
    assert (cat["history_end"], cat["first_date"], cat["last_date"], cat["max_horizon"]) == ("2017-04-30", "2017-05-01", "2017-05-16", 16)
    assert len(cat["stores"]) == 4 and len(cat["items"]) == 30 and cat["items"][1] == {"item_nbr": 101, "family": "DAIRY"}
    h = httpx.get(f"{base}/history", params={"store_nbr": 2, "item_nbr": 104, "onpromotion": "true"}).json()
    sales = served["dataset"].sales
    actual = sales[(sales.store_nbr == 2) & (sales.item_nbr == 104) & (sales.date == "2017-04-30")].unit_sales.sum()
    assert len(h["actual"]) == 56 and h["actual"][-1] == {"date": "2017-04-30", "unit_sales": actual}
    rows = pd.DataFrame({"date": pd.date_range("2017-05-01", periods=16), "store_nbr": 2, "item_nbr": 104, "onpromotion": True})
    np.testing.assert_allclose([f["prediction"] for f in h["forecast"]], offline(served, "1", rows), rtol=0, atol=1e-9)
    long = httpx.get(f"{base}/history", params={"store_nbr": 2, "item_nbr": 104, "days": 113})
    assert long.status_code == 422 and long.json()["error"] == "days must be between 1 and 112; got 113"
    bad = httpx.get(f"{base}/history", params={"store_nbr": 2, "item_nbr": 9})
    assert bad.status_code == 422 and bad.json()["field"] == "item_nbr" and bad.json()["value"] == 9
    info = httpx.get(f"{base}/info").json()
    assert info["champion"]["version"] == "1" and info["challenger"]["version"] == "2"
    assert info["champion"]["dataset_version"] == served["dataset"].version and info["config"]["shadow"] is True
    metrics = httpx.get(f"{base}/metrics").text
    assert 'endpoint="/predict"' in metrics and "bentoml_service_request" in metrics
    counted = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("cd4ml_predicted_rows_total{")}
    assert counted['model_version="1",role="answer"'] > 0 and counted['model_version="2",role="answer"'] > 0
    assert counted['model_version="2",role="shadow"'] == counted['model_version="1",role="answer"'] + counted['model_version="2",role="answer"']
    assert 'cd4ml_answer_cache_hits_total{model_version="2"}' in metrics and "cd4ml_answer_cache_evictions_total" in metrics
    paths = httpx.get(f"{base}/docs.json").json()["paths"]
    assert "/predict" in paths and "requestBody" in paths["/predict"]["post"]
    assert "<svg" in httpx.get(f"{base}/").text and httpx.get(f"{base}/static/app.js").status_code == 200

@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
def test_fuzzing_every_route_of_the_openapi_finds_no_5xx(served, api_token, with_token):
    paths = httpx.get(f"{served['base']}/docs.json").json()["paths"]
    assert {"/predict", "/feedback", "/livez", "/readyz", "/metrics"} <= set(paths), sorted(paths)
    header = ["--header", f"Authorization: Bearer {api_token.token}"] if with_token else []
    out = subprocess.run([str(Path(sys.executable).parent/"schemathesis"), "run", f"{served['base']}/docs.json",
                          "--checks", "not_a_server_error", "--max-examples", "30", "--phases", "examples,coverage,fuzzing",
                          "--seed", "1", "--workers", "2", *header],
                         capture_output=True, text=True, timeout=600, cwd=served["home"])   # its .schemathesis cache too
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "/predict" in out.stdout and "/feedback" in out.stdout

ASKED = {"date": "2017-05-02", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}
FEEDBACK = {"rows": [{**ASKED, "unit_sales": 2.0}]}

def test_feedback_needs_a_named_token(served, api_token):
    "No token: 401 with WWW-Authenticate; a wrong one: 403; the right one: 200, its name (never the token) in the log."
    base, wrong = served["base"], "not-the-token-" + api_token.token[:8]
    assert post(base, [ASKED]).status_code == 200                 # actuals are taken for served days only
    bare = httpx.post(f"{base}/feedback", json=FEEDBACK, timeout=30)
    assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Bearer"), bare.text
    assert "Authorization: Bearer" in bare.json()["error"]
    assert httpx.post(f"{base}/feedback", json=FEEDBACK, headers={"Authorization": f"Basic {api_token.token}"}, timeout=30).status_code == 401
    assert httpx.post(f"{base}/feedback", json=FEEDBACK, headers={"Authorization": f"Bearer {wrong}"}, timeout=30).status_code == 403
    ok = httpx.post(f"{base}/feedback", json=FEEDBACK, headers=api_token.headers, timeout=30)
    assert ok.status_code == 200 and ok.json()["rows"] == 1, ok.text
    [log] = served["home"].glob("server-*.log")
    text = log.read_text()
    assert "POST /feedback by token 'tests'" in text and "refused POST /feedback" in text, text[-3000:]
    assert api_token.token not in text and wrong not in text
    for path in ("predictions", "feedback"):                     # nor anywhere in what the service wrote
        assert not any(api_token.token in f.read_text() for f in (served["home"]/path).glob("*.jsonl"))

def test_reads_and_the_page_need_no_token_by_default(served):
    base = served["base"]
    assert post(base, [{"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}]).status_code == 200
    for path in ("/", "/static/app.js", "/catalog", "/info", "/history?store_nbr=1&item_nbr=100"):
        assert httpx.get(f"{base}{path}", timeout=30).status_code == 200, path

@pytest.mark.parametrize("content_type", ["multipart/form-data", "text/plain", "application/vnd.bentoml+pickle"])
def test_non_json_body_is_a_415(served, content_type):
    r = httpx.post(f"{served['base']}/predict", content=b'{"rows": []}', headers={"content-type": content_type}, timeout=30)
    assert r.status_code == 415 and r.json()["value"] == content_type, r.text

def test_bento_build_and_serve_behave_the_same(served, running_server, api_token):
    "`cd4ml bento` (import the champion, `bentoml build`), then `bentoml serve TAG`: same answers, Dockerfile inside."
    from cd4ml.bento import build_bento
    facts = build_bento(ROOT)
    assert facts["version"] == "1" and facts["dataset_version"] == served["dataset"].version
    bento_dir = served["home"]/"bentoml"/"bentos"/"cd4ml-forecast"/facts["bento"].split(":")[1]
    assert (bento_dir/"env"/"docker"/"Dockerfile").exists() and (bento_dir/"src"/"cd4ml"/"static"/"app.js").exists()
    rows = catalog_rows(served["dataset"], 16, 60, seed=21)
    serve = lambda port: [str(Path(sys.executable).parent/"bentoml"), "serve", facts["bento"], "--host", "127.0.0.1", "--port", str(port)]
    with running_server(served["home"], env={"BENTOML_HOME": str(served["home"]/"bentoml")}, command=serve, timeout=240) as base:
        assert httpx.get(f"{base}/info").json()["source"] == "bento"
        body = post(base, as_request(rows)).json()
        assert body["model_versions"] == ["1"] * 60
        np.testing.assert_allclose(body["predictions"], offline(served, "1", rows), rtol=0, atol=1e-9)
        import cd4ml                                                  # the Bento packages v1's intervals: same quantiles
        asked = httpx.post(f"{base}/predict", json={"rows": as_request(rows), "quantiles": [0.1, 0.5, 0.9]}, timeout=60).json()
        embedded = cd4ml.predict(rows, model_version=1, quantiles=[0.1, 0.5, 0.9])
        for q in ("0.1", "0.5", "0.9"): np.testing.assert_allclose(asked["quantiles"][q], embedded[q], rtol=0, atol=1e-9)
        assert (np.array(asked["quantiles"]["0.1"]) < np.array(asked["quantiles"]["0.9"])).mean() > 0.9
        assert post(base, [{"date": "2017-05-03", "store_nbr": 77, "item_nbr": 100, "onpromotion": False}]).status_code == 422
        r = httpx.post(f"{base}/admin/reload", headers=api_token.headers)   # a Bento is immutable: rollout is by image
        assert r.status_code == 409 and "Bento image" in r.json()["error"] and r.json()["serving"] == {"champion": "1"}

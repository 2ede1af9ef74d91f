"""One prediction and feedback store for every replica: two `cd4ml serve` processes write to one PostgreSQL database
(CD4ML_DB_URI), and `cd4ml monitor` and a server started afterwards (its live accuracy read from the database at start,
exported as counters) agree with the recomputation over all the traffic, as the clients saw it, to 1e-9."""
import math, threading, time

import httpx
import numpy as np
import pytest

from cd4ml import monitor
from cd4ml.logstore import DbStore, KINDS
from cd4ml.release import as_request, catalog_rows

SECRET = "db-pa55word-never-shown"     # the test cluster trusts loopback logins: the password is carried, not checked


def with_password(uri: str) -> str: return uri.replace("://cd4ml@", f"://cd4ml:{SECRET}@", 1)


def live_sums(metrics: str) -> dict:
    "model_version -> {sum name: added − removed} of the `cd4ml_live_*_total` counters in a /metrics page."
    out = {}
    for line in metrics.splitlines():
        if not line.startswith("cd4ml_live_"): continue
        name, labels = line.split("{")[0].removeprefix("cd4ml_live_").removesuffix("_total"), line.split("{")[1].split("}")[0]
        tags = dict(kv.split("=") for kv in labels.split(","))
        sign = 1 if tags["change"] == '"added"' else -1
        version = tags["model_version"].strip('"')
        out.setdefault(version, {}).setdefault(name, 0.0)
        out[version][name] += sign * float(line.split()[-1])
    return out


def test_tables_are_created_once_by_processes_starting_together(postgres):
    uri, errors = postgres.database("serving_race"), []
    start = threading.Barrier(4)
    def create():
        store = DbStore(uri, schema="race")
        start.wait()
        try: store.check()
        except Exception as e: errors.append(e)
        finally: store.close()
    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert errors == []
    with DbStore(uri, schema="race") as store: assert [store.log(k).records() for k in KINDS] == [[], [], []]


def test_serve_refuses_an_unreachable_database_without_showing_its_password(served_registry, postgres, cli, tmp_path, free_port):
    with served_registry(tmp_path/"cd4ml-home") as served:
        env = {**served["env"], "CD4ML_DB_URI": f"postgresql+psycopg://cd4ml:{SECRET}@127.0.0.1:{free_port()}/serving"}
        r = cli(env, "serve", "--port", str(free_port()), timeout=120)
    assert r.returncode != 0
    assert "cannot connect to the serving database postgresql+psycopg://cd4ml:***@127.0.0.1" in r.message, r.message
    assert SECRET not in r.stdout + r.stderr


def test_two_servers_one_database(served_registry, running_server, postgres, cli, api_token, tmp_path):
    env = {"CD4ML_DB_URI": with_password(postgres.database("serving")), "CD4ML_CANARY_PERCENT": "50"}
    home = tmp_path/"cd4ml-home"
    asked, posted = [], []                         # what the clients sent and got back, in order
    with served_registry(home, env=env) as served, running_server(home, env=env) as other:
        bases, ds = [served["base"], other], served["dataset"]
        rows = catalog_rows(ds, 16, 400, seed=21)
        for k, a in enumerate(range(0, 400, 50)):                   # each request to one of the two, then some again
            for part in ([rows.iloc[a:a + 50]] + ([rows.iloc[a:a + 20]] if k % 3 == 0 else [])):
                r = httpx.post(f"{bases[k % 2]}/predict", json={"rows": as_request(part)}, timeout=60)
                assert r.status_code == 200, r.text
                body = r.json()
                asked.append({"request_id": body["request_id"], "time": "2017-01-01T00:00:00+00:00",
                              "rows": {"date": [d.date().isoformat() for d in part.date],
                                       "store_nbr": part.store_nbr.tolist(), "item_nbr": part.item_nbr.tolist(),
                                       "onpromotion": part.onpromotion.tolist()},
                              "predictions": body["predictions"], "model_versions": body["model_versions"]})
        assert {v for a in asked for v in a["model_versions"]} == {"1", "2"}                  # the canary splits
        for k, (a, b, scale) in enumerate([(0, 200, 1.0), (150, 300, 0.5), (280, 400, 2.0), (0, 60, 3.0)]):
            part = rows.iloc[a:b]                                    # the later posts replace earlier actuals
            units = (np.arange(len(part)) % 7) * scale
            fb = {"date": [d.date().isoformat() for d in part.date], "store_nbr": part.store_nbr.tolist(),
                  "item_nbr": part.item_nbr.tolist(), "unit_sales": units.tolist(),
                  "onpromotion": part.onpromotion.tolist()}                # actuals carry the flag as it was
            body = [dict(zip(fb, values)) for values in zip(*fb.values())]
            r = httpx.post(f"{bases[(k + 1) % 2]}/feedback", json={"rows": body}, headers=api_token.headers, timeout=60)
            assert r.status_code == 200, r.text
            posted.append({"time": f"2017-01-01T00:00:0{k}+00:00", "rows": fb})
            time.sleep(0.01)                                         # posts are ordered by their arrival time
        bad = httpx.post(f"{other}/predict", json={"rows": [{**as_request(rows.iloc[:1])[0], "store_nbr": 99}]}, timeout=30)
        assert bad.status_code == 422
        with DbStore(env["CD4ML_DB_URI"]) as store:                 # everything reaches the database, off the request path
            deadline, expected = time.time() + 60, [len(asked), len(posted), 1]
            while [len(store.log(k).records()) for k in KINDS] != expected and time.time() < deadline: time.sleep(0.2)
            assert [len(store.log(k).records()) for k in KINDS] == expected
            logged = store.log("predictions").records()
            assert sorted(r["request_id"] for r in logged) == sorted(a["request_id"] for a in asked)
    assert not (home/"predictions"/"predictions.jsonl").exists() and not (home/"feedback").exists()

    items = served["dataset"].table("items")
    offline = monitor.live_metrics(monitor.join_feedback(monitor.served_frame(asked), monitor.feedback_frame(posted)), items)
    assert sorted(offline) == ["1", "2"] and all(m["n"] > 50 for m in offline.values())

    def same(version, nwrmsle, mae, n):
        m = offline[version]
        assert n == m["n"], (version, n, m)
        assert abs(nwrmsle - m["nwrmsle"]) <= 1e-9 * m["nwrmsle"] and abs(mae - m["mae"]) <= 1e-9 * m["mae"], (version, m)

    r = cli({**served["env"], **env}, "monitor", "--json", "--no-track")        # the fleet view: every row of the database
    assert r.returncode in (0, 1), r.stderr[-3000:]
    report = r.json
    assert (report["traffic"]["requests"], report["traffic"]["rejected"]) == (len(asked), 1)
    assert sorted(report["live"]) == ["1", "2"]
    for version, m in report["live"].items(): same(version, m["nwrmsle"], m["mae"], m["n"])

    with running_server(home, env=env) as base:                                # a new replica starts from the database
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
    assert 'cd4ml_log_dropped_records_total{kind="predictions"} 0.0' in metrics
    sums = live_sums(metrics)
    assert sorted(sums) == ["1", "2"]
    for version, s in sums.items():
        same(version, math.sqrt(s["weighted_sq_log_error"] / s["weight"]), s["abs_error"] / s["rows"], round(s["rows"]))

    shown = [p for p in home.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert shown == [] and SECRET not in r.stdout + r.stderr                   # server logs, monitor report, stores
    assert any("cd4ml:***@127.0.0.1" in p.read_text() for p in home.glob("server-*.log"))

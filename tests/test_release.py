"""End to end: the release step of the default pipeline.yaml builds the registered version's Bento, serves it with
`bentoml serve <tag>` on a loopback port, smoke-tests and load-tests it, and only then promotes it.

The first release is the default run's (`default_run`: `cd4ml run` as `make pipeline` runs it, full default data),
which releases version 1 and makes it champion. A second run in its workspace (same data and candidates: every
step before the gate cached) registers version 2 with an impossible p99 threshold, and the release gate must keep
it from being promoted, fail the run and say why. (What the default pipeline computes stays the same: the later
tests of that workspace still find the default run up to date.)
"""
import json
from pathlib import Path

import nbformat
import pytest


def release_gate(result, name) -> dict:
    return next(g for g in result["release"]["gates"] if g["gate"] == name)


def bento_servers(tag: str) -> list[str]:
    "Command lines of live processes serving Bento `tag`."
    found = []
    for proc in Path("/proc").iterdir():
        try: argv = (proc/"cmdline").read_bytes().split(b"\0")
        except OSError: continue
        if b"serve" in argv and tag.encode() in argv: found.append(" ".join(a.decode() for a in argv))
    return found


@pytest.fixture(scope="module")
def failed(default_run, cli):
    "The default pipeline again in the default run's workspace, its release gated on an impossible p99: (exit code, summary, stderr on one line)."
    r = cli(default_run.env, "run", "-p", "release.max_p99_ms=0.001", "-p", "release.requests=40", "--json")
    return r.returncode, r.json, r.message


def test_release_serves_the_bento_then_promotes(default_run):
    out, home = default_run.result, default_run.home
    assert [s["name"] for s in out["steps"]][-3:] == ["gate", "register", "release"]
    rel = out["release"]
    assert (rel["status"], rel["version"], rel["promoted"], rel["champion"]) == ("passed", "1", True, "1")
    assert [(g["gate"], g["result"]) for g in rel["gates"]] == [
        ("max_startup_s", "pass"), ("smoke", "pass"), ("parity", "pass"), ("load_errors", "pass"), ("max_p99_ms", "pass")]
    assert rel["smoke"] == {"/livez": 200, "/readyz": 200, "/predict": 200, "/feedback": 200}   # feedback with its own token
    m = rel["measured"]
    assert m["parity_rows"] == 20 and m["parity_max_abs_diff"] <= 1e-9 and m["versions_match"] is True
    assert m["requests"] == 200 and m["errors"] == 0 and 0 < m["p50_ms"] <= m["p99_ms"] <= m["max_ms"] and m["rps"] > 0
    assert m["cache_hits"] < 20             # cold: rows of the whole catalog, not the smoke rows the server just answered
    assert 0 < m["startup_s"] <= 120 and rel["bento"].startswith("cd4ml-forecast:")
    print(f"release step timings: {m['build_s']:.1f} s build, {m['startup_s']:.1f} s to ready, {m['release_s']:.1f} s in all; "
          f"p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms, {m['rps']:.0f} req/s")
    # after the release the version is champion; it was registered as challenger first
    assert out["registered"] == {"name": "sales", "version": "1", "aliases": ["champion"]}
    client = default_run.client
    assert {k: str(v) for k, v in client.get_registered_model("sales").aliases.items()} == {"champion": "1"}
    v1 = client.get_model_version("sales", "1")
    assert v1.tags["status"] == "champion" and [g["result"] for g in json.loads(v1.tags["release_gates"])] == ["pass"] * 5
    # the server is gone; its log is kept, also with the MLflow run; the smoke and load requests are not in the
    # workspace's prediction log, which monitoring reads
    assert bento_servers(rel["bento"]) == []
    [log] = [p for p in (home/"cache").glob("*/server.log") if rel["bento"] in p.read_text()]
    assert f'Starting production HTTP BentoServer from "{rel["bento"]}"' in log.read_text()
    assert "release/server.log" in {a.path for a in client.list_artifacts(out["parent_run_id"], "release")}
    assert not (home/"predictions").exists()
    # the executed notebook reports the gates and the latency histogram
    report = nbformat.read(f"{out['run_dir']}/release.ipynb", as_version=4)
    outputs = [o for c in report.cells for o in c.get("outputs", [])]
    assert any("max_p99_ms" in "".join(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    assert client.get_run(out["parent_run_id"]).data.tags["cd4ml.release"] == "passed"


def test_failing_perf_gate_keeps_the_champion(default_run, failed, monkeypatch):
    rc, out, err = failed
    assert rc != 0 and out is not None, err
    p99 = release_gate(out, "max_p99_ms")
    assert p99["result"] == "fail" and p99["threshold"] == 0.001 and p99["value"] > 0.001
    assert [g["gate"] for g in out["release"]["gates"] if g["result"] == "fail"] == ["max_p99_ms"], out["release"]["gates"]
    assert (f"the release of sales version 2 rejected by 1 gate(s): max_p99_ms {p99['value']:.4g} vs threshold 0.001" in err
            and "the champion is still version 1 and version 2 is tagged status=release_failed" in err), err
    # the gates before it passed: version 2 was registered, then not promoted
    assert [g["result"] for g in out["gates"]] == ["pass"] * 7   # interval coverage gates included
    assert out["registered"] == {"name": "sales", "version": "2", "aliases": []}
    assert (out["release"]["promoted"], out["release"]["champion"], out["release"]["version_status"]) == (False, "1", "release_failed")
    client = default_run.client
    assert str(client.get_registered_model("sales").aliases["champion"]) == "1"
    assert "challenger" not in client.get_registered_model("sales").aliases
    v2 = client.get_model_version("sales", "2")
    assert v2.tags["status"] == "release_failed" and v2.tags["release_failed"].startswith("max_p99_ms: p99 ")
    assert client.get_run(out["parent_run_id"]).data.tags["cd4ml.release"] == "failed"
    from cd4ml import registry
    monkeypatch.setenv("CD4ML_HOME", str(default_run.home)); monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert [(e["action"], e["version"]) for e in registry.champion_log()] == [
        ("register", "1"), ("promote", "1"), ("register", "2"), ("release_failed", "2")]
    assert registry.champion_history() == ["1"]
    assert bento_servers(out["release"]["bento"]) == []


def test_an_item_imported_after_make_pipeline_is_served_as_a_cold_start(default_run, cli, running_server, tmp_path):
    """A user's path after `make pipeline`: `cd4ml data import --items` with an item the released champion never saw,
    then `cd4ml serve`: the new item is answered from its class and family, flagged `cold_start`; a known one is not.
    On a copy of the default run's workspace, which the other tests find as the run left it."""
    import shutil
    import httpx
    import pandas as pd
    home = tmp_path/"cd4ml-home"
    shutil.copytree(default_run.home, home, ignore=shutil.ignore_patterns("*.lock"))
    env = {**default_run.env, "CD4ML_HOME": str(home)}
    version = default_run.result["dataset"]
    items = pd.read_parquet(home/"data"/version/"items.parquet")
    new, known = int(items.item_nbr.max()) + 1, items.iloc[0]
    (tmp_path/"items.csv").write_text("item_nbr,family,class,perishable\n"
                                      f"{new},{known.family},{known['class']},{known.perishable}\n")
    imported = cli.json(env, "data", "import", "--items", tmp_path/"items.csv")
    assert (imported["items_of"], imported["items_added"]) == (version, 1)
    end = pd.Timestamp(cli.json(env, "data", "show", version)["end"])
    rows = [{"date": (end + pd.Timedelta(days=1)).date().isoformat(), "store_nbr": 1, "item_nbr": int(item),
             "onpromotion": False} for item in (new, known.item_nbr)]
    with running_server(home, env=env) as base:
        assert httpx.get(f"{base}/info", timeout=30).json()["champion"]["items_version"] == imported["version"]
        r = httpx.post(f"{base}/predict", json={"rows": rows}, timeout=60)
        history = lambda days: httpx.get(f"{base}/history", timeout=30,
                                         params={"store_nbr": 1, "item_nbr": int(known.item_nbr), "days": days})
        chart, longer = history(112), history(113)
    assert r.status_code == 200, r.text
    # the chart: the last 112 days of sales (the features read a year; the served state keeps 112 days of sales)
    sales = pd.read_parquet(home/"data"/version/"sales.parquet", filters=[("store_nbr", "==", 1),
                                                                          ("item_nbr", "==", int(known.item_nbr))])
    last = sales.set_index("date").unit_sales.reindex(pd.date_range(end=end, periods=112), fill_value=0.0)
    assert chart.status_code == 200 and [a["unit_sales"] for a in chart.json()["actual"]] == last.tolist()
    assert longer.status_code == 422 and longer.json()["error"] == "days must be between 1 and 112; got 113"
    body = r.json()
    assert body["cold_start"] == [True, False]
    assert all(p >= 0 for p in body["predictions"]) and body["predictions"][0] > 0

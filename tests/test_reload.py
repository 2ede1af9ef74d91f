"""A served champion changes without a restart: `cd4ml models promote` and `rollback` while clients send /predict, the
periodic poll of the registry, and a version that fails to load (the old one keeps serving). Real `cd4ml serve`."""
import threading, time
from pathlib import Path

import httpx
import pytest

THREADS = 3

class Load:
    "Client threads sending one /predict each after the other until stopped; every answer as (sent, status, body)."
    def __init__(self, base: str, body: dict):
        self.base, self.body, self.answers, self.stop = base, body, [], threading.Event()
        self.threads = [threading.Thread(target=self._send) for _ in range(THREADS)]

    def _send(self):
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try: r = client.post("/predict", json=self.body); answer = (sent, r.status_code, r.json())
                except Exception as e: answer = (sent, None, repr(e))
                self.answers.append(answer)

    def after(self, moment: float, n: int = 10) -> list:
        "Wait (at most 120 s) until `n` requests sent after `moment` were answered; their answers."
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            later = [a for a in self.answers if a[0] > moment]
            if len(later) >= n: return later
            time.sleep(0.05)
        pytest.fail(f"fewer than {n} answers after the mark")

    def __enter__(self):
        for t in self.threads: t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads: t.join(90)

def one_row(base: str) -> dict:
    "A request of one forecastable row, from the served catalog."
    cat = httpx.get(f"{base}/catalog").json()
    return {"rows": [{"date": cat["dates"][0], "store_nbr": cat["stores"][0]["store_nbr"],
                      "item_nbr": cat["items"][0]["item_nbr"], "onpromotion": False}]}

def check_answers(load: Load, versions: set):
    "Every request answered 200 by one of `versions`, each version always giving the same prediction for the row."
    failed = [a for a in load.answers if a[1] != 200]
    assert not failed, failed[:3]
    by_version = {}
    for _, _, body in load.answers: by_version.setdefault(body["model_version"], set()).add(body["predictions"][0])
    assert set(by_version) <= versions, by_version.keys()
    assert all(len(p) == 1 for p in by_version.values()), by_version      # the version named is the one that answered
    return {v: p.pop() for v, p in by_version.items()}

def reloads(base: str) -> dict:
    "`cd4ml_model_reloads_total` on /metrics, by outcome."
    return {line.split('outcome="')[1].split('"')[0]: float(line.split()[-1])
            for line in httpx.get(f"{base}/metrics").text.splitlines() if line.startswith("cd4ml_model_reloads_total{")}

def champion(base: str) -> str: return httpx.get(f"{base}/info").json()["champion"]["version"]

def test_promote_and_rollback_under_load_swap_without_a_failed_request(served_registry, cli, api_token, tmp_path):
    with served_registry(tmp_path/"home", env={"CD4ML_RELOAD_SECONDS": "0"}) as served:
        base, env = served["base"], served["env"]
        assert httpx.post(f"{base}/admin/reload").status_code == 401                        # a write: token needed
        with Load(base, one_row(base)) as load:
            load.after(0)
            assert cli(env, "models", "promote", "2", "--force").returncode == 0
            assert {a[2]["model_version"] for a in load.after(time.monotonic())} == {"1"}   # not reloaded: no poll
            r = httpx.post(f"{base}/admin/reload", headers=api_token.headers, timeout=120)
            assert r.json() == {"before": {"champion": "1"}, "serving": {"champion": "2"}, "changed": True}
            promoted = time.monotonic()
            assert {a[2]["model_version"] for a in load.after(promoted)} == {"2"}
            rolling_back = time.monotonic()
            assert cli(env, "models", "rollback").returncode == 0
            r = httpx.post(f"{base}/admin/reload", headers=api_token.headers, timeout=120)
            assert r.json() == {"before": {"champion": "2"}, "serving": {"champion": "1"}, "changed": True}
            rolled_back = time.monotonic()
            assert {a[2]["model_version"] for a in load.after(rolled_back)} == {"1"}
        predictions = check_answers(load, {"1", "2"})
        assert set(predictions) == {"1", "2"} and predictions["1"] != pytest.approx(predictions["2"], abs=1e-6)
        assert {a[2]["model_version"] for a in load.answers if promoted < a[0] < rolling_back} == {"2"}
        assert reloads(base) == {"swapped": 2.0, "failed": 0.0}
        assert champion(base) == "1"
        again = httpx.post(f"{base}/admin/reload", headers=api_token.headers, timeout=120).json()
        assert again == {"before": {"champion": "1"}, "serving": {"champion": "1"}, "changed": False}

def broken_version(home: Path) -> str:
    "A version of `sales` whose artifact folder is empty (this process is on `home`), tagged as trained: its number."
    from mlflow import MlflowClient
    c = MlflowClient()
    one = c.get_model_version("sales", "1")
    (home/"broken-model").mkdir()
    tags = {k: one.tags[k] for k in ("dataset_version", "horizon", "freq")}
    return c.create_model_version("sales", (home/"broken-model").as_uri(), one.run_id, tags=tags).version

def test_the_poll_follows_the_registry_and_a_broken_version_keeps_the_old_one(served_registry, cli, api_token,
                                                                                tmp_path):
    home = tmp_path/"home"
    with served_registry(home, env={"CD4ML_RELOAD_SECONDS": "0.2"}) as served:
        base, env = served["base"], served["env"]
        with Load(base, one_row(base)) as load:
            load.after(0)
            assert cli(env, "models", "promote", "2", "--force").returncode == 0
            deadline = time.monotonic() + 120
            while champion(base) != "2": assert time.monotonic() < deadline, "the poll never served v2"; time.sleep(0.1)
            seen = time.monotonic()
            assert {a[2]["model_version"] for a in load.after(seen)} == {"2"}
            broken = broken_version(home)
            assert cli(env, "models", "promote", broken, "--force").returncode == 0
            r = httpx.post(f"{base}/admin/reload", headers=api_token.headers, timeout=120)
            assert r.status_code == 502 and f"could not load champion v{broken}: " in r.json()["error"], r.text
            assert "still serving champion v2" in r.json()["error"]
            assert r.json()["serving"] == {"champion": "2"}
            assert {a[2]["model_version"] for a in load.after(time.monotonic())} == {"2"}
        check_answers(load, {"1", "2"})
        counted = reloads(base)
        assert counted["swapped"] == 1 and counted["failed"] >= 1, counted
        assert champion(base) == "2"
    logged = (home/f"server-{base.rsplit(':', 1)[1]}.log").read_text()
    assert "could not load champion v3: " in logged and "now serving champion v2" in logged

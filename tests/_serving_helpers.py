"""Shared by tests/test_service.py and tests/test_web.py: a small registry with a champion and a challenger,
and a real forecast server on a free loopback port, started by `cd4ml serve` and stopped by its process group."""
from __future__ import annotations
import os, signal, socket, subprocess, sys, time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def simulated_tables(stores=4, items=30, days=120, seed=0) -> dict:
    "Hand-made sales with a weekly cycle, promotions and item levels; zero-sale rows absent, as in Favorita."
    rng = np.random.default_rng(seed)
    dates = pd.date_range("2017-01-01", periods=days, freq="D")
    g = pd.MultiIndex.from_product([dates, range(1, stores + 1), range(100, 100 + items)],
                                   names=["date", "store_nbr", "item_nbr"]).to_frame(index=False)
    level = rng.gamma(2.0, 2.0, size=items)[g.item_nbr - 100] * (1 + 0.2 * (g.store_nbr % 3))
    g["onpromotion"] = rng.random(len(g)) < 0.1
    weekly = 1 + 0.3 * (g.date.dt.day_of_week >= 5)
    g["unit_sales"] = rng.poisson(level * weekly * np.where(g.onpromotion, 1.6, 1.0)).astype(float)
    families = ["GROCERY I", "DAIRY", "BREAD/BAKERY", "BEVERAGES", "PRODUCE"]
    return {"sales": g[g.unit_sales > 0],
            "items": pd.DataFrame({"item_nbr": range(100, 100 + items), "family": [families[i % 5] for i in range(items)],
                                   "class": [1000 + i % 7 for i in range(items)], "perishable": [i % 2 for i in range(items)]}),
            "stores": pd.DataFrame({"store_nbr": range(1, stores + 1), "city": ["Quito", "Guayaquil", "Cuenca", "Loja"][:stores],
                                    "state": ["Pichincha", "Guayas", "Azuay", "Loja"][:stores], "type": ["A", "B", "C", "D"][:stores],
                                    "cluster": range(1, stores + 1)}),
            "holidays": pd.DataFrame({"date": [dates[-20], dates[-3]], "type": ["Holiday", "Holiday"], "locale": ["National", "Local"],
                                      "locale_name": ["Ecuador", "Quito"], "description": ["a", "b"], "transferred": [False, False]}),
            "oil": pd.DataFrame({"date": dates, "dcoilwtico": 50 + rng.normal(0, 0.5, days)}),
            "transactions": g[g.unit_sales > 0].groupby(["date", "store_nbr"], as_index=False).unit_sales.sum()
                              .rename(columns={"unit_sales": "transactions"})}

def build_registry(home: Path) -> dict:
    """Dataset + two ridge models (16 days ahead) registered as `sales` v1 (champion) and v2 (challenger), in CD4ML_HOME=`home`.
    Returns the dataset and both fitted models, for offline comparisons."""
    os.environ["CD4ML_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import mlflow, mlflow.sklearn
    from cd4ml import features, models
    from cd4ml.core import tracking_uri
    from cd4ml.datasets import save_dataset
    ds = save_dataset(simulated_tables(), source="tests simulated")
    end = pd.Timestamp(ds.meta["end"])
    frame = features.training_frame(ds, [end - pd.Timedelta(days=d) for d in (16, 30, 44, 58)], 16)
    fitted = {}
    mlflow.set_tracking_uri(tracking_uri()); mlflow.set_registry_uri(tracking_uri())
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("serving-tests", artifact_location=(home/"artifacts").as_uri())  # not ./mlruns
    for version, alpha, alias in (("1", 1.0, "champion"), ("2", 300.0, "challenger")):
        model = models.fit(models.make_model("ridge", {"alpha": alpha}), frame)
        with mlflow.start_run(experiment_id=experiment):
            mlflow.set_tags({"dataset_version": ds.version, "git_sha": "test"})
            mlflow.sklearn.log_model(model, name="model", registered_model_name="sales",
                                     pip_requirements=["scikit-learn", "numpy", "pandas"])
        client.set_model_version_tag("sales", version, "dataset_version", ds.version)
        for tag, value in (("horizon", "16"), ("freq", "D")): client.set_model_version_tag("sales", version, tag, value)   # as trained
        client.set_registered_model_alias("sales", alias, version)
        fitted[version] = model
    mlflow.set_tracking_uri(None)
    return {"dataset": ds, "models": fitted}

def request_rows(ds, n=1200, seed=1) -> pd.DataFrame:
    "n random request rows over every store, item, forecastable day and both promotion states."
    rng = np.random.default_rng(seed)
    end = pd.Timestamp(ds.meta["end"])
    stores, items = ds.table("stores").store_nbr.to_numpy(), ds.table("items").item_nbr.to_numpy()
    return pd.DataFrame({"date": (end + pd.to_timedelta(rng.integers(1, 17, n), unit="D")).astype("datetime64[ns]"),
                         "store_nbr": rng.choice(stores, n).astype("int64"), "item_nbr": rng.choice(items, n).astype("int64"),
                         "onpromotion": rng.random(n) < 0.3})

def as_json_rows(frame: pd.DataFrame) -> list[dict]:
    return [{"date": d.date().isoformat(), "store_nbr": int(s), "item_nbr": int(i), "onpromotion": bool(p)}
            for d, s, i, p in zip(frame.date, frame.store_nbr, frame.item_nbr, frame.onpromotion)]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def serve_command(port: int, *args: str) -> list[str]:
    "`cd4ml serve` when the CLI has it; else the same typer command function run directly."
    from cd4ml.cli import app
    if any((c.name or c.callback.__name__) == "serve" for c in app.registered_commands):
        return [str(BIN/"cd4ml"), "serve", "--port", str(port), *args]
    return [sys.executable, "-c", "import typer; from cd4ml.cli_serve import serve; typer.run(serve)", "--port", str(port), *args]

@contextmanager
def running_server(home: Path, *args: str, env: dict | None = None, command: list[str] | None = None, timeout: float = 120):
    "A forecast server on a free loopback port; yields its base URL; stops its whole process group."
    port = free_port()
    log = open(home/f"server-{port}.log", "w+")
    full_env = {**os.environ, "CD4ML_HOME": str(home), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(command(port) if callable(command) else serve_command(port, *args), env=full_env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0); raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200: break
            except httpx.HTTPError: pass
            if time.time() > deadline:
                log.seek(0); raise RuntimeError(f"server not ready after {timeout}s:\n{log.read()[-3000:]}")
            time.sleep(0.3)
        yield base
    finally:
        try: os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError: pass
        try: proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(5)
        log.close()


@contextmanager
def served_registry(home: Path, env: dict | None = None, prepare=None):
    """A registry in `home` (see `build_registry`) and a server on it; yields the registry facts with `home` and `base`.
    `prepare(reg)` may return more facts to add before the server starts. CD4ML_HOME and MLFLOW_TRACKING_URI are restored."""
    old = {k: os.environ.get(k) for k in ("CD4ML_HOME", "MLFLOW_TRACKING_URI")}
    try:
        reg = build_registry(home)
        if prepare: reg.update(prepare(reg))
        with running_server(home, env=env) as base:
            yield {**reg, "home": home, "base": base}
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v

"""Real candidates for registry tests: a hand-made frame, a real sklearn model on it, logged and gated the way the
pipeline's train, gate and register steps do it. Shared by test_registry.py and test_tracking_auth.py."""
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from sklearn.compose import TransformedTargetRegressor
from sklearn.linear_model import LinearRegression

from cd4ml import gates, registry
from cd4ml.core import Cd4mlError
from cd4ml.metrics import nwrmsle

FEATS = ["lag_1", "promo_now"]
STORES = pd.DataFrame({"store_nbr": range(1, 9), "city": "Quito", "state": "P",
                       "type": list("AABBCCDD"), "cluster": [1, 1, 2, 2, 3, 3, 4, 4]})
ITEMS = pd.DataFrame({"item_nbr": range(1, 7), "family": ["BREAD", "DAIRY", "DAIRY", "PRODUCE", "BEVERAGES", "BREAD"],
                      "class": 1, "perishable": [1, 1, 1, 1, 0, 0]})
LOOSE = {"max_segment_ratio": 4.0, "min_segment_rows": 10, "max_regression_vs_champion": 0.05}


def frame(seed, days=6, promo_effect=0.5):
    "8 stores x 6 items x `days`: log1p(sales) = lag_1 + promo_effect*promo + noise (store 8 is 10x noisier)."
    rng = np.random.default_rng(seed)
    f = pd.MultiIndex.from_product([range(1, 9), range(1, 7), range(days)], names=["store_nbr", "item_nbr", "day"]).to_frame(index=False)
    f["onpromotion"] = rng.random(len(f)) < 0.5
    f["promo_now"], f["lag_1"] = f.onpromotion.astype("float64"), rng.uniform(0.5, 3.0, len(f))
    noise = rng.normal(0, np.where(f.store_nbr == 8, 0.3, 0.03))
    f["unit_sales"] = np.expm1(f.lag_1 + promo_effect * f.promo_now + noise)
    f["weight"] = np.where(f.item_nbr.map(ITEMS.set_index("item_nbr").perishable) == 1, 1.25, 1.0)
    return f


HOLDOUT = frame(seed=0)


def train(promo_effect=0.5, promo_dtype="float64"):
    "A real sklearn model (linear on log1p sales) fitted on a training frame; returns it and its training inputs."
    f = frame(seed=1, days=10, promo_effect=promo_effect)
    X = f[FEATS].astype({"promo_now": promo_dtype})
    return TransformedTargetRegressor(LinearRegression(), func=np.log1p, inverse_func=np.expm1).fit(X, f.unit_sales), X


def log_candidate(model, X, dataset="ds-000000000001", sha="a1b2c3d4e5f6"):
    "Log `model` like the pipeline does: nested run with metric nwrmsle under a run tagged with lineage."
    pred = model.predict(HOLDOUT[list(X.columns)])
    with mlflow.start_run(tags={"dataset_version": dataset, "git_sha": sha}):
        with mlflow.start_run(nested=True) as run:
            mlflow.log_metric("nwrmsle", nwrmsle(HOLDOUT.unit_sales, pred, HOLDOUT.weight))
            mlflow.sklearn.log_model(model, name="model", signature=infer_signature(X, pred), pip_requirements=["scikit-learn"])
    return run.info.run_id, f"runs:/{run.info.run_id}/model"


def gate_and_register(model, X, acceptance, **lineage):
    "What the gate + register steps do, on the shared holdout; returns (version dict or error, gate results)."
    run_id, uri = log_candidate(model, X, **lineage)
    found = registry.champion_model()
    champion_pred = None if found is None else found[0].predict(HOLDOUT[FEATS])
    results, _ = gates.all_gates(HOLDOUT, model.predict(HOLDOUT[list(X.columns)]), np.expm1(HOLDOUT.lag_1), champion_pred,
                                 registry.input_schema(uri), gates.schema_of(HOLDOUT, FEATS), acceptance, ITEMS, STORES)
    try: return registry.register_or_reject(run_id, uri, results, acceptance), results, run_id
    except Cd4mlError as e: return e, results, run_id

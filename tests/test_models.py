"""Forecasting library on a stored, simulated dataset: features from a `Dataset` (as the pipeline and the
service read it), served/offline parity, leakage, and every candidate surviving a skops round trip (the
format `mlflow.sklearn` stores) with identical predictions."""
import numpy as np
import pytest
import skops.io

from cd4ml.datasets import load_dataset, save_dataset
from cd4ml.features import FEATURES, features_for, forecast_origins, training_frame
from cd4ml.metrics import nwrmsle
from cd4ml.models import BASELINES, CANDIDATES, fit, make_model, predict
from cd4ml.simulate import simulate

REQUEST = ["date", "store_nbr", "item_nbr", "onpromotion"]


@pytest.fixture
def dataset(workspace):
    raw = simulate(stores=3, items=12, days=200, seed=1)
    tables = {"sales": raw["train"], "items": raw["items"], "stores": raw["stores"], "holidays": raw["holidays_events"],
              "oil": raw["oil"], "transactions": raw["transactions"], "truth": raw["truth"]}
    return load_dataset(save_dataset(tables, source="simulator seed=1").version)


def test_dataset_frames_parity_and_leakage(dataset):
    split = forecast_origins(dataset, horizon=7, n_train=4, n_valid=1)
    frame = training_frame(dataset, split["train"] + [split["holdout"]], 7)
    assert set(frame.origin) == set(split["train"] + [split["holdout"]])
    assert frame.expected.notna().all() and (frame.unit_sales >= 0).mean() > 0.99
    hold = frame[frame.origin == split["holdout"]]
    served = features_for(dataset, hold[REQUEST], split["holdout"])
    np.testing.assert_allclose(served.to_numpy(), hold[FEATURES].to_numpy(), rtol=0, atol=1e-9)
    # the same requests against a copy of the data without any sale after the origin
    sales = dataset.sales[dataset.sales.date <= split["holdout"]]
    cut = {name: dataset.table(name) for name in ("items", "stores", "holidays", "oil", "transactions")}
    np.testing.assert_array_equal(features_for({**cut, "sales": sales}, hold[REQUEST], split["holdout"]).to_numpy(),
                                  served.to_numpy())


def test_candidates_round_trip_through_skops(dataset):
    split = forecast_origins(dataset, horizon=7, n_train=4, n_valid=1)
    train, hold = training_frame(dataset, split["train"], 7), training_frame(dataset, [split["holdout"]], 7)
    small = {"random_forest": {"n_estimators": 5}, "hist_gbr": {"max_iter": 10}, "lightgbm": {"n_estimators": 20, "min_child_samples": 20}}
    scores = {}
    for name in CANDIDATES:
        model = fit(make_model(name, small.get(name)), train)
        blob = skops.io.dumps(model)
        loaded = skops.io.loads(blob, trusted=skops.io.get_untrusted_types(data=blob))
        np.testing.assert_array_equal(predict(loaded, hold), predict(model, hold))
        scores[name] = nwrmsle(hold.unit_sales, predict(model, hold), hold.weight)
    assert all(np.isfinite(v) and 0 < v < 2 for v in scores.values()), scores
    assert min(scores[n] for n in CANDIDATES if n not in BASELINES) < scores["moving_average"], scores

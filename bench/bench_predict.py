"""Benchmark one model call in-process: `models.predict` on a frame vs the model compiled at load (`cd4ml.compiled`).

Every candidate, with its default parameters, absolute and relative to the recent level, is fit on a small simulated
history (5 stores x 30 items), then called on 1 row and on 1,000 rows (random rows, some categories unseen in
training): milliseconds per call, median of repeated calls, each way, and the largest difference between the two
answers (target: <= 1e-9 relative). The service calls the compiled model; `models.predict` is the offline path.
Exit code 1 if an answer differs. Run: `.venv/bin/python bench/bench_predict.py` (called by `make bench`; ~1 min).
"""
import sys, time

import numpy as np
import pandas as pd

from cd4ml import models
from cd4ml.candidates import CANDIDATES
from cd4ml.compiled import _compile, compile_model
from cd4ml.features import FEATURES, forecast_origins, training_frame
from cd4ml.models import CATEGORICAL
from cd4ml.simulate import simulate

def per_call_ms(f, X, seconds: float = 0.3) -> float:
    "Median milliseconds of `f(X)` over repeated calls for about `seconds`."
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter(); f(X); times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000

def main() -> int:
    raw = simulate(stores=5, items=30, days=300, seed=0)
    data = {"sales": raw["train"], "items": raw["items"], "stores": raw["stores"]}
    train = training_frame(data, forecast_origins(data, horizon=16, n_train=6, n_valid=1)["train"], 16)
    rng = np.random.default_rng(0)
    X = train[FEATURES].to_numpy("float64")[rng.integers(0, len(train), 1000)]
    for c in CATEGORICAL: X[:, FEATURES.index(c)] = rng.integers(-1, 40, len(X))
    print(f"{len(train):,} training rows; ms per call, models.predict on a frame -> compiled")
    print(f"{'model':>15} {'level':>9} {'1 row':>16} {'1,000 rows':>16} {'max rel diff':>12}")
    ok = True
    for name in CANDIDATES:
        for level in ("absolute", "relative") if name not in models.BASELINES else ("absolute",):
            model = models.fit(models.make_model(name, level=level), train)
            fast, slow = compile_model(model), lambda X: models.predict(model, pd.DataFrame(X, columns=FEATURES))
            diff = float(np.max(np.abs(fast(X) - slow(X)) / np.maximum(1.0, np.abs(slow(X)))))
            ok &= diff <= 1e-9 and _compile(model) is not None
            cells = [f"{per_call_ms(slow, X[:n]):6.3f} -> {per_call_ms(fast, X[:n]):6.3f}" for n in (1, 1000)]
            print(f"{name:>15} {level:>9} {cells[0]:>16} {cells[1]:>16} {diff:>12.1e}")
    print(f"  target compiled == models.predict to 1e-9, every candidate compiled: {'met' if ok else 'NOT MET'}")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())

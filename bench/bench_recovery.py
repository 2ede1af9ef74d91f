"""Benchmark: after a level shift, how many weeks of post-shift data does a retrain need to beat the moving average?

The simulator's demand jumps x2.5 on one day (`--drift level=2.5@DATE`). For k = 1, 2, 3, 4, 6, 8, 13 weeks of
post-shift sales, a retrain is made as `cd4ml monitor --retrain` makes it (the pipeline's origins on the data up to
then: horizon 7, 4 training and 2 validation origins, as in tests/test_monitor.py), with the library calls of the
features and train steps (`training_frame`, `training_set`, `make_model`, `fit`), once per mechanism of the spec's
`training` block:
  none           every training origin, as is
  since          `since: <shift date>`: training origins before the shift dropped
  half_life      `half_life: 14`: an origin's weight halves every 14 days before the last one
  level          `level: relative`: sales relative to each series' recent level, origins at a level break dropped
  auto           `level: auto`, the default: relative when a training origin lies at a level break, else as is
Each model then forecasts the two following weeks (origins at the data's end and a week later, features from the
history up to each origin, as the service does), scored by NWRMSLE against the 14-day moving average on the same rows.
Weeks to recovery: the smallest k from which the model beats the moving average at every k measured, on each of
three simulated worlds (seeds). Target: <= 4 weeks on every seed for LightGBM (the default pipeline's best candidate)
with the default `level: auto` (met / not met; exit 1 if not met); the other models and mechanisms are shown beside it.

Usage: .venv/bin/python bench/bench_recovery.py [--stores 6] [--items 20] [--seeds 0,1,2] [--models ridge,lightgbm]
"""
import argparse, sys, time

import numpy as np
import pandas as pd

from cd4ml.core import Cd4mlError
from cd4ml.features import forecast_origins, training_frame
from cd4ml.metrics import nwrmsle
from cd4ml.models import fit, make_model, predict
from cd4ml.models import training_config, training_level, training_set
from cd4ml.simulate import simulate

WEEKS = (1, 2, 3, 4, 6, 8, 13)       # post-shift weeks of data the retrain sees
SCORED_WEEKS = 2                     # then scored on the weeks after
TARGET = 4                           # weeks to recovery, at most
PRE_DAYS, HORIZON, N_TRAIN, N_VALID = 200, 7, 4, 2
START = pd.Timestamp("2016-01-01")
SHIFT = START + pd.Timedelta(days=PRE_DAYS)
MECHANISMS = {"none": {"level": "absolute"}, "since": {"since": str(SHIFT.date()), "level": "absolute"},
              "half_life": {"half_life": 14, "level": "absolute"}, "level": {"level": "relative"}, "auto": {}}   # auto: the default


def world(stores: int, items: int, seed: int) -> dict:
    "The simulated tables, demand x2.5 from `SHIFT` on, long enough for the last k and its scored weeks."
    sim = simulate(stores=stores, items=items, days=PRE_DAYS + 7 * (max(WEEKS) + SCORED_WEEKS), start=str(START.date()),
                   seed=seed, drift=f"level=2.5@{SHIFT.date()}")
    return {"meta": {"freq": "D"}, "sales": sim["train"].drop(columns="id"), "items": sim["items"], "stores": sim["stores"],
            "holidays": sim["holidays_events"], "oil": sim["oil"], "transactions": sim["transactions"]}


def scores(data: dict, k: int, models: list) -> dict:
    "NWRMSLE on the weeks after `k` post-shift weeks: the moving average's, and each (model, mechanism)'s (None: no rows)."
    end = SHIFT + pd.Timedelta(days=7 * k - 1)
    seen = {**data, "sales": data["sales"][data["sales"].date <= end]}
    origins = forecast_origins(seen, HORIZON, N_TRAIN, N_VALID)
    train, valid = (training_frame(seen, origins[part], HORIZON) for part in ("train", "valid"))
    later = training_frame(data, [end + pd.Timedelta(days=7 * w) for w in range(SCORED_WEEKS)], HORIZON)
    error = lambda model: nwrmsle(later.unit_sales, predict(model, later), later.weight)
    out = {"moving_average": error(fit(make_model("moving_average"), train))}
    for mechanism, training in MECHANISMS.items():
        training = training_config(training)
        level = training["level"] = training_level([train, valid], training)   # as the train step decides
        try: rows = training_set(train, training)
        except Cd4mlError: rows = None                       # `since` the shift: no training origin yet
        for name in models:
            out[name, mechanism] = None if rows is None else error(fit(make_model(name, None, level), rows))
    return out


def weeks_to_recovery(beats: list) -> int | None:
    "The smallest k from which every k measured beats the baseline (None: not even at the last)."
    for i, k in enumerate(WEEKS):
        if all(beats[i:]): return k
    return None


TARGETED = ("lightgbm", "auto")


def table_for(seed: int, stores: int, items: int, models: list) -> dict:
    "k -> `scores` on the world of `seed`, printed as it goes (* where the moving average is beaten)."
    data, table = world(stores, items, seed), {}
    print(f"seed {seed}\n{'k weeks':>7} {'moving avg':>10}  " + "  ".join(f"{f'{n} {m}':>18}" for n in models for m in MECHANISMS))
    for k in WEEKS:
        table[k] = scores(data, k, models)
        cells = [f"{'-' if v is None else f'{v:.3f}'}{'*' if v is not None and v < table[k]['moving_average'] else ' '}"
                 for v in (table[k][n, m] for n in models for m in MECHANISMS)]
        print(f"{k:>7} {table[k]['moving_average']:>10.3f}  " + "  ".join(f"{c:>18}" for c in cells), flush=True)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", type=int, default=6)
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default="ridge,lightgbm")
    args = parser.parse_args()
    models, seeds, t0 = args.models.split(","), [int(s) for s in args.seeds.split(",")], time.time()
    print(f"{args.stores} stores x {args.items} items, demand x2.5 from {SHIFT.date()} after {PRE_DAYS} days; horizon {HORIZON}, "
          f"{N_TRAIN} training + {N_VALID} validation origins; NWRMSLE on the {SCORED_WEEKS} weeks after k post-shift weeks "
          "(* beats the moving average)")
    tables = {seed: table_for(seed, args.stores, args.items, models) for seed in seeds}
    print(f"weeks to recovery (seeds {', '.join(map(str, seeds))}), target <= {TARGET} on every seed:")
    ok = True
    for name in models:
        for mechanism in MECHANISMS:
            weeks = [weeks_to_recovery([t[k][name, mechanism] is not None and t[k][name, mechanism] < t[k]["moving_average"]
                                        for k in WEEKS]) for t in tables.values()]
            met = all(w is not None and w <= TARGET for w in weeks)
            if (name, mechanism) == TARGETED: ok = met
            shown = ", ".join(f"> {WEEKS[-1]}" if w is None else str(w) for w in weeks)
            print(f"{name:>10} {mechanism:>10}: {shown:<16} {'met' if met else 'not met'}{' (the target)' if (name, mechanism) == TARGETED else ''}")
    print(f"{time.time() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

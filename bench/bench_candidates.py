"""Benchmark: what each candidate adds, on the default data and on the medium preset's 20.8 M rows (`make bench`).

For each dataset, the pipeline run as a user runs it (`cd4ml run ... --json`, every step, the release included; -j 1
so each candidate trains alone and its time is its own), then one table from the run summary, candidates in the
spec's order (simplest first):

  nwrmsle         on the validation origins
  vs MA           1 - nwrmsle / moving_average's: its gain over the baseline
  adds            1 - nwrmsle / the best simpler candidate's (the ones above it): what it adds
  captured        (MA - nwrmsle) / (MA - Bayes floor): the share of the achievable gain (simulated data only)
                  (these three as `cd4ml run` shows them: `cd4ml.cli_run.candidate_gains`)
  train s         wall seconds of its train step (fit, validation forecast, intervals, permutation importance)

under a line with the Bayes floor and the oracle (the true mean). Then, on the default data only, the direct
multi-horizon comparison of `nbs/12_models.ipynb`: one LightGBM with `days_ahead` a feature (the candidate) against
separate LightGBMs per group of horizons (`cd4ml.models.per_horizon`), fitted on the run's own training rows and scored
on its validation rows.

Datasets, each run in a fresh workspace deleted at the end (nothing cached; nothing registered or served in yours):
  default   pipeline.yaml's generated data (10 stores x 50 items x 730 days, 64,000 training rows): ~2-3 min
  medium    `cd4ml data generate --preset medium --engine dask` (20.8 M rows, 35,100 series), with the run settings
            of scripts/pipeline_preset.py (engine=dask, a 10 % training sample of the series, -j 1): ~5-8 min. The
            dataset (0.5 GB) is generated once into $CD4ML_HOME (~1-2 min) and hard-linked into the run's workspace.
            CD4ML_BENCH_MEDIUM=0 skips it.
The run's wall time and the peak resident memory of its process tree are printed too (scripts/pipeline_preset.py).
Measured on 2 cores shared with other work, the medium dataset already stored: 6.7 min for both at load average ~4,
10.2 min at ~12 (the medium run 4.6 and 7.6 min, peak RSS 3.3 GB).

Usage: .venv/bin/python bench/bench_candidates.py        (CD4ML_BENCH_MEDIUM=0: the default data only)
"""
import json, os, shutil, sys, tempfile, time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/"scripts"))
from pipeline_preset import CD4ML, JOBS, RUN_PARAMS, measured, stored   # noqa: E402

HORIZON_GROUPS = {"one, days_ahead a feature": (), "two: days 1-7, 8-16": (7,), "four: 4 days each": (4, 8, 12),
                  "sixteen: one per day": tuple(range(1, 16))}


def run(what: str, overrides: list[str]) -> dict:
    "`cd4ml run pipeline.yaml -p ... -j JOBS --json` in the current CD4ML_HOME: its summary (exits if it failed)."
    args = [x for p in overrides for x in ("-p", p)]
    result, _, _ = measured(what, [CD4ML, "run", str(ROOT/"pipeline.yaml"), *args, "-j", JOBS, "--json"])
    if result is None: sys.exit(f"{what}: the run failed")
    return result


def candidate_rows(result: dict) -> list[dict]:
    "One row per candidate of a run summary, in the spec's order: the summary's gains (`candidate_gains`), its train time."
    from cd4ml.cli_run import candidate_gains
    seconds = {s["name"]: s["seconds"] for s in result["steps"]}
    return [{**g, "train_s": seconds[f"train:{g['model']}"]} for g in candidate_gains(result)]


def pct(x): return "" if x is None else f"{x:+.2%}"


def print_table(title: str, result: dict, rows: list[dict]):
    "The candidates table (markdown) under the dataset's floors."
    bayes, oracle = result.get("bayes_nwrmsle"), result.get("oracle_nwrmsle")
    floors = (f"Bayes floor {bayes:.4f}, oracle {oracle:.4f}" if bayes is not None
              else "no Bayes floor (the data was not simulated)")
    print(f"\n### {title}: dataset {result['dataset']}; {floors}; best {result['best']['model']}\n")
    print("| candidate | NWRMSLE | vs moving_average | adds (vs best simpler) | gain captured | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        captured = "" if r["gain_captured"] is None else f"{r['gain_captured']:.3f}"
        print(f"| {r['model']} | {r['nwrmsle']:.4f} | {pct(r['vs_moving_average'])} | {pct(r['adds'])} | {captured} | "
              f"{r['train_s']:.1f} |")


def horizon_comparison(result: dict) -> list[dict]:
    "LightGBM as one model for every horizon and as separate models per group of horizons, on the run's own rows."
    import pandas as pd
    from cd4ml.metrics import nwrmsle
    from cd4ml.models import fit, per_horizon, predict, training_config, training_set
    step = next(s for s in json.loads((Path(result["run_dir"])/"steps.json").read_text()) if s["name"] == "train:lightgbm")
    folder, training = step["parameters"]["inputs"]["features"], training_config(step["parameters"]["training"])
    train = training_set(pd.read_parquet(f"{folder}/train.parquet"), training)
    valid = pd.read_parquet(f"{folder}/valid.parquet")
    rows = []
    for name, edges in HORIZON_GROUPS.items():
        start, cpu = time.perf_counter(), time.process_time()
        err = nwrmsle(valid.unit_sales, predict(fit(per_horizon(edges), train), valid), valid.weight)
        rows.append({"models": name, "nwrmsle": err, "seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu})
    candidate = next(c for c in result["candidates"] if c["model"] == "lightgbm")["metrics"]["nwrmsle"]
    if abs(rows[0]["nwrmsle"] - candidate) > 1e-9:   # one group is the candidate itself: same rows, same fit
        sys.exit(f"one LightGBM for every horizon scored {rows[0]['nwrmsle']:.6f}, the run's candidate {candidate:.6f}")
    return rows


def print_horizons(rows: list[dict], ma: float):
    print(f"\n### default data: one model for every horizon, or one per group of horizons (LightGBM, "
          f"{len(rows)} fits on the run's training rows)\n")
    print("| models | NWRMSLE | vs one model | vs moving_average | fit + predict s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['models']} | {r['nwrmsle']:.4f} | {pct(r['nwrmsle'] / rows[0]['nwrmsle'] - 1)} | "
              f"{pct(1 - r['nwrmsle'] / ma)} | {r['seconds']:.1f} |")


@contextmanager
def fresh_workspace(dataset: str | None = None):   # a stored dataset of the current workspace to link into the new one
    "CD4ML_HOME set to a new workspace, deleted after: the runs register, serve and cache nothing in the user's."
    from cd4ml.core import workspace
    from cd4ml.datasets import data_root
    source, home = data_root()/dataset if dataset else None, os.environ.get("CD4ML_HOME")
    with tempfile.TemporaryDirectory(prefix="candidates-", dir=workspace("bench")) as tmp:   # beside the data: hard links work
        if source:   # hard links, not a symlink: the dask engine would take a symlinked dataset for a foreign one and copy it
            shutil.copytree(source, Path(tmp)/"data"/dataset, copy_function=os.link)
        os.environ["CD4ML_HOME"] = tmp
        try: yield
        finally:
            if home is None: os.environ.pop("CD4ML_HOME")
            else: os.environ["CD4ML_HOME"] = home


def default_data() -> dict:
    "The default pipeline: its candidates, and the horizon comparison on its rows."
    with fresh_workspace():
        result = run("default data: cd4ml run", [])
        rows, horizons = candidate_rows(result), horizon_comparison(result)
    print_table("default data (pipeline.yaml)", result, rows)
    print_horizons(horizons, result["baselines"]["moving_average"])
    return {"dataset": result["dataset"], "candidates": rows, "horizons": horizons}


def medium() -> dict:
    "The medium preset, generated once into $CD4ML_HOME, run with scripts/pipeline_preset.py's settings."
    version = stored("medium")
    if version is None:
        ds, _, _ = measured("medium: cd4ml data generate --preset medium --engine dask (once: kept in $CD4ML_HOME)",
                            [CD4ML, "data", "generate", "--preset", "medium", "--engine", "dask", "--json"])
        if ds is None: sys.exit("medium: generating the dataset failed")
        version = ds["version"]
    else: print(f"\nmedium: dataset {version} is stored in $CD4ML_HOME already")
    with fresh_workspace(version):
        result = run("medium preset: cd4ml run", [f"dataset={version}", *RUN_PARAMS])
    rows = candidate_rows(result)
    print_table(f"medium preset (20.8 M rows; {', '.join(RUN_PARAMS[:3])})", result, rows)
    return {"dataset": result["dataset"], "candidates": rows}


def main() -> int:
    from cd4ml.core import workspace
    start, out = time.time(), {"default": default_data()}
    if os.environ.get("CD4ML_BENCH_MEDIUM", "1") == "1": out["medium"] = medium()
    else: print("\nmedium preset (20.8 M rows) skipped (CD4ML_BENCH_MEDIUM=0)")
    path = workspace("bench")/"candidates.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\nbench_candidates: {(time.time() - start) / 60:.1f} min; numbers in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

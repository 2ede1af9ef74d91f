"""Benchmark: what does running the pipeline as papermill step notebooks cost, at equal parallelism?

Side by side, in one run, on the default data (pipeline.yaml), each in a fresh workspace:
  (1) plain, 1 process  — one Python process making the step notebooks' library calls, with the runner's MLflow
                          logging (parent run, lineage tags, dataset input, a nested run per candidate with its
                          model); candidates trained one after another; no plots
  (2) cd4ml run -j 1    — `cd4ml run --force -j 1`: every step executed by papermill in one warm kernel, so the
                          candidates too are trained one after another
  (3) plain, 2 processes — (1), but the candidates trained by a pool of two worker processes (started, like the
                          runner's kernels, while the data is made), the parent logging each one as it finishes
  (4) cd4ml run -j 2    — `cd4ml run --force -j 2`: two warm kernels, two candidates at a time
  (5) cached            — `cd4ml run -j 2` again in (4)'s workspace, nothing changed: every step from the cache
Prints overhead (2)/(1) and (4)/(3) (target <= 1.15 each) and cache (5)/(4) (target <= 0.05), met or not met.
(1)-(4) run in interleaved rounds (--rounds, default 2), each in a fresh workspace; the best wall time of each
counts, so other load on the machine weighs less. CPU seconds of each whole process tree are shown beside.
Steps marked `cache: false` (gate, register, release: they read and write the registry, which the plain process
does not mimic) are left out of all five, so the ratios compare the same work.

Usage: .venv/bin/python bench/bench_pipeline.py [--spec pipeline.yaml] [--rounds N] [-p key=value ...]
"""
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CD4ML = str(Path(sys.executable).parent/"cd4ml")
TARGETS = {"overhead": 1.15, "cache": 0.05}


def train_candidate(name: str, params: dict, folder: str) -> dict:
    "The train step notebook's work for one candidate: fit, score, and its files in `folder` (prefixed by `name`)."
    import pickle
    import pandas as pd
    from cd4ml.features import FEATURES
    from cd4ml.metrics import score
    from cd4ml.models import feature_importance, fit, make_model, predict
    out = Path(folder)
    train, valid = (pd.read_parquet(out/f"{part}.parquet") for part in ("train", "valid"))
    fitted = fit(make_model(name, params), train)
    valid["prediction"] = predict(fitted, valid)
    metrics = score(valid.unit_sales, valid.prediction, valid.weight)
    (out/f"{name}.pkl").write_bytes(pickle.dumps(fitted))
    valid[["origin", "date", "store_nbr", "item_nbr", "unit_sales", "weight", "prediction"]] \
        .to_parquet(out/f"{name}-predictions.parquet", index=False)
    valid[FEATURES].head(100).assign(unit_sales=valid.unit_sales.head(100)).to_parquet(out/f"{name}-example.parquet", index=False)
    feature_importance(fitted, valid).to_csv(out/f"{name}-importance.csv", index=False)
    return metrics


def log_candidate(name: str, params: dict, metrics: dict, folder: Path):
    "What the runner logs for a finished candidate: a nested run with params, metrics, importance and the model."
    import pickle
    import mlflow, pandas as pd
    from cd4ml.tracking import log_model
    with mlflow.start_run(run_name=f"train:{name}", nested=True):
        mlflow.log_params({"model": name, **params})
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(folder/f"{name}-importance.csv"))
        example = pd.read_parquet(folder/f"{name}-example.parquet")
        log_model(pickle.loads((folder/f"{name}.pkl").read_bytes()), example.drop(columns="unit_sales"), example.unit_sales)


def _warm():
    import cd4ml.models, cd4ml.metrics, cd4ml.features   # noqa: F401  (what a warm kernel has imported)


def plain(spec_path: str, overrides: list[str], processes: int) -> dict:
    "The step notebooks' library calls and the runner's MLflow logging; candidates in `processes` processes (1: this one)."
    import multiprocessing, tempfile as tf
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import mlflow, pandas as pd
    from cd4ml.core import hash_json, workspace, write_json
    from cd4ml.datasets import SALES
    from cd4ml.drift import validation_report
    from cd4ml.features import forecast_origins
    from cd4ml.imports import import_favorita
    from cd4ml.metrics import nwrmsle
    from cd4ml.models import BASELINES
    from cd4ml.scale import generate_partitioned, write_training_frames
    from cd4ml.simulate import generate
    from cd4ml.spec import apply_overrides, load_spec
    from cd4ml.stepcache import code_hashes, flatten
    from cd4ml.tracking import lineage_tags, log_dataset, setup

    spec = apply_overrides(load_spec(spec_path), overrides)
    p, out = spec.params, workspace("plain")
    pool = None
    if processes > 1:                                                       # started now, as the runner's kernels are
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        warming = [pool.submit(_warm) for _ in range(processes)]
    setup()
    hashes = code_hashes(spec)
    with mlflow.start_run(run_name="plain"):
        mlflow.set_tags(lineage_tags(spec.root, hashes["library"], hash_json(spec.to_dict())[:16]))
        mlflow.log_params({**flatten(p), "models": ",".join(spec.models)})
        sim = {k: p[k] for k in ("stores", "items", "days", "start", "seed")}
        if p["engine"] == "dask":                                             # step: data
            ds = generate_partitioned(**sim, part_rows=p["part_rows"], extra={"simulator": sim})
        else:
            with tf.TemporaryDirectory() as tmp:
                generate(f"{tmp}/favorita", **sim)
                ds, _ = import_favorita(f"{tmp}/favorita", source="simulator", extra={"simulator": sim})
        log_dataset(ds, SALES)
        write_json(out/"validation.json", validation_report(ds.version, by_part=p["engine"] == "dask"))  # step: validate
        origins = forecast_origins(ds, p["horizon"], p["n_train"], p["n_valid"])  # step: features
        write_training_frames(ds, origins, p["horizon"], out, p["engine"], p["training"])
        scores = {}                                                           # step: train, per candidate
        if pool is None:
            for name, params in spec.models.items():
                scores[name] = train_candidate(name, params, str(out))
                log_candidate(name, params, scores[name], out)
        else:
            for w in warming: w.result()
            futures = {pool.submit(train_candidate, name, params, str(out)): name for name, params in spec.models.items()}
            for f in as_completed(futures):
                name = futures[f]
                scores[name] = f.result()
                log_candidate(name, spec.models[name], scores[name], out)
            pool.shutdown()
        valid = pd.read_parquet(out/"valid.parquet")                          # step: evaluate
        best = min(scores, key=lambda m: scores[m]["nwrmsle"])
        mlflow.log_metrics({"best_nwrmsle": scores[best]["nwrmsle"],
                            "oracle_nwrmsle": nwrmsle(valid.unit_sales, valid.expected, valid.weight),
                            **{f"{b}_nwrmsle": scores[b]["nwrmsle"] for b in BASELINES if b in scores}})
    return {m: s["nwrmsle"] for m, s in scores.items()}


def training_spec(spec_path: str) -> Path:
    "A copy of the spec beside it without its `cache: false` steps (gate, register, release)."
    import yaml
    raw = yaml.safe_load(Path(spec_path).read_text())
    raw["steps"] = [s for s in raw["steps"] if s.get("cache", True)]
    out = Path(spec_path).parent/".bench-pipeline.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def timed(cmd, env) -> tuple[float, float, dict]:
    "Wall seconds and CPU seconds (its whole process tree: user + system) of `cmd`, and its JSON output."
    cpu = lambda: (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))
    start, cpu0 = time.time(), cpu()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0: sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.time() - start, cpu() - cpu0, json.loads(r.stdout)


def verdict(name: str, ratio: float, target: float, ok: bool = True) -> str:
    return f"{name:<38} = {ratio:6.3f}  target <= {target:<5}  {'met' if ratio <= target and ok else 'NOT MET'}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT/"pipeline.yaml"))
    ap.add_argument("-p", dest="params", action="append", default=[], help="parameter override, as for cd4ml run")
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("CD4ML_BENCH_ROUNDS", 2)),
                    help="interleaved rounds; the best wall time of each side counts (default CD4ML_BENCH_ROUNDS or 2)")
    ap.add_argument("--plain", type=int, metavar="PROCESSES", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        print(json.dumps(plain(args.spec, args.params, args.plain))); return
    overrides = [x for p in args.params for x in ("-p", p)]
    spec = training_spec(args.spec)
    print(f"comparing the steps of {spec.name}: " + ", ".join(s["name"] for s in __import__("yaml").safe_load(spec.read_text())["steps"]))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    t, cpu, runs = {}, {}, {}                    # (side, jobs) -> the best of the rounds: wall s, CPU s, JSON output
    def measure(key, cmd, home):
        wall, used, out = timed(cmd, {**env, "CD4ML_HOME": home})
        if key not in t or wall < t[key]: t[key], cpu[key], runs[key] = wall, used, out
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):         # interleaved, each in a fresh workspace: load on the machine hits both sides
                for jobs in (1, 2):
                    measure(("plain", jobs), [sys.executable, __file__, "--plain", str(jobs), "--spec", str(spec), *overrides],
                            f"{tmp}/plain-{jobs}-{r}")
                    measure(("run", jobs), [CD4ML, "run", str(spec), *overrides, "--force", "-j", str(jobs), "--json"],
                            f"{tmp}/run-{jobs}-{r}")
            measure("cached", [CD4ML, "run", str(spec), *overrides, "-j", "2", "--json"], f"{tmp}/run-2-{args.rounds - 1}")
    finally:
        spec.unlink()
    same = all(abs(runs["plain", j][c["model"]] - c["metrics"]["nwrmsle"]) < 1e-12 for j in (1, 2) for c in runs["run", j]["candidates"])
    all_cached = all(s["cached"] for s in runs["cached"]["steps"])
    steps = lambda r: ", ".join(f"{s['name']} {s['seconds']:.1f}" for s in r["steps"])
    print(f"wall and CPU seconds (whole process tree), the best of {args.rounds} round(s):")
    print(f"(1) plain, 1 process (candidates one after another)  {t['plain', 1]:7.1f} s  CPU {cpu['plain', 1]:6.1f} s")
    print(f"(2) cd4ml run --force -j 1 (one kernel)               {t['run', 1]:7.1f} s  CPU {cpu['run', 1]:6.1f} s   "
          f"steps: {steps(runs['run', 1])}")
    print(f"(3) plain, 2 processes (candidates two at a time)     {t['plain', 2]:7.1f} s  CPU {cpu['plain', 2]:6.1f} s")
    print(f"(4) cd4ml run --force -j 2 (two kernels)              {t['run', 2]:7.1f} s  CPU {cpu['run', 2]:6.1f} s   "
          f"steps: {steps(runs['run', 2])}")
    print(f"(5) cd4ml run -j 2, nothing changed                   {t['cached']:7.1f} s  CPU {cpu['cached']:6.1f} s   "
          f"all steps cached: {all_cached}")
    print(f"same nwrmsle in (1)-(4): {same}")
    print(verdict("overhead, sequential (2)/(1)", t["run", 1] / t["plain", 1], TARGETS["overhead"], same) +
          f"   (CPU {cpu['run', 1] / cpu['plain', 1]:.3f})")
    print(verdict("overhead, two at a time (4)/(3)", t["run", 2] / t["plain", 2], TARGETS["overhead"], same) +
          f"   (CPU {cpu['run', 2] / cpu['plain', 2]:.3f})")
    print(verdict("cache (5)/(4)", t["cached"] / t["run", 2], TARGETS["cache"], all_cached))

if __name__ == "__main__":
    main()

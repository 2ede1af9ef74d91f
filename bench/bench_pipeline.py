"""Benchmark: what does running the pipeline as papermill step notebooks cost?

Side by side, in one run, on the default data (pipeline.yaml):
  (1) plain   — one Python process making the same library calls as the step notebooks, with the same MLflow
                logging (parent run, lineage tags, dataset input, a nested run per candidate with its model);
                candidates trained one after another, no plots;
  (2) forced  — `cd4ml run --force` (every step executed by papermill in warm kernels, candidates in parallel);
  (3) cached  — `cd4ml run` again with nothing changed (every step reused from the cache).
Prints overhead = (2)/(1) (target <= 1.15) and cache = (3)/(2) (target <= 0.05), with pass/fail.
Steps marked `cache: false` (gate, register: they read and write the registry, which the plain process does not
mimic) are left out of all three, so the ratios compare the same work.

Usage: .venv/bin/python bench/bench_pipeline.py [--spec pipeline.yaml] [-p key=value ...]
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CD4ML = str(Path(sys.executable).parent/"cd4ml")


def plain(spec_path: str, overrides: list[str]) -> dict:
    "The step notebooks' library calls and the runner's MLflow logging, in this one process."
    import pickle, tempfile as tf
    import mlflow, pandas as pd
    from cd4ml.core import workspace, write_json
    from cd4ml.drift import validation_report
    from cd4ml.features import FEATURES, forecast_origins, training_frame
    from cd4ml.imports import import_favorita
    from cd4ml.metrics import nwrmsle, score
    from cd4ml.models import BASELINES, feature_importance, fit, make_model, predict
    from cd4ml.simulate import generate
    from cd4ml.spec import apply_overrides, load_spec
    from cd4ml.stepcache import code_hashes, flatten
    from cd4ml.tracking import lineage_tags, log_dataset, log_model, setup
    from cd4ml.core import hash_json

    spec = apply_overrides(load_spec(spec_path), overrides)
    p, out = spec.params, workspace("plain")
    setup()
    hashes = code_hashes(spec)
    with mlflow.start_run(run_name="plain"):
        mlflow.set_tags(lineage_tags(spec.root, hashes["library"], hash_json(spec.to_dict())[:16]))
        mlflow.log_params({**flatten(p), "models": ",".join(spec.models)})
        sim = {k: p[k] for k in ("stores", "items", "days", "start", "seed")}
        with tf.TemporaryDirectory() as tmp:                                  # step: data
            generate(f"{tmp}/favorita", **sim)
            ds, _ = import_favorita(f"{tmp}/favorita", source="simulator", extra={"simulator": sim})
        log_dataset(ds)
        report = validation_report(ds.version)                                # step: validate
        write_json(out/"validation.json", report)
        origins = forecast_origins(ds, p["horizon"], p["n_train"], p["n_valid"])  # step: features
        frames = {part: training_frame(ds, origins[part], p["horizon"]) for part in ("train", "valid")}
        for part, frame in frames.items(): frame.to_parquet(out/f"{part}.parquet", index=False)
        train, valid = (pd.read_parquet(out/f"{part}.parquet") for part in ("train", "valid"))
        scores = {}
        for name, params in spec.models.items():                              # step: train, per candidate
            with mlflow.start_run(run_name=f"train:{name}", nested=True):
                fitted = fit(make_model(name, params), train)
                pred = predict(fitted, valid)
                scores[name] = score(valid.unit_sales, pred, valid.weight)
                pickle.dump(fitted, open(out/f"{name}.pkl", "wb"))
                valid.assign(prediction=pred)[["origin", "date", "store_nbr", "item_nbr", "unit_sales", "weight", "prediction"]] \
                    .to_parquet(out/f"{name}-predictions.parquet", index=False)
                importance = feature_importance(fitted, valid)
                importance.to_csv(out/f"{name}-importance.csv", index=False)
                mlflow.log_params({"model": name, **params}); mlflow.log_metrics(scores[name])
                mlflow.log_artifact(str(out/f"{name}-importance.csv"))
                log_model(fitted, valid[FEATURES].head(100), valid.unit_sales.head(100))
        best = min(scores, key=lambda m: scores[m]["nwrmsle"])                  # step: evaluate
        oracle = nwrmsle(valid.unit_sales, valid.expected, valid.weight)
        mlflow.log_metrics({"best_nwrmsle": scores[best]["nwrmsle"], "oracle_nwrmsle": oracle,
                            **{f"{b}_nwrmsle": scores[b]["nwrmsle"] for b in BASELINES}})
    return {m: s["nwrmsle"] for m, s in scores.items()}


def training_spec(spec_path: str) -> Path:
    "A copy of the spec beside it without its `cache: false` steps (gate, register)."
    import yaml
    raw = yaml.safe_load(Path(spec_path).read_text())
    raw["steps"] = [s for s in raw["steps"] if s.get("cache", True)]
    out = Path(spec_path).parent/".bench-pipeline.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def timed(cmd, env) -> tuple[float, str]:
    start = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0: sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.time() - start, r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT/"pipeline.yaml"))
    ap.add_argument("-p", dest="params", action="append", default=[], help="parameter override, as for cd4ml run")
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        print(json.dumps(plain(args.spec, args.params))); return
    overrides = [x for p in args.params for x in ("-p", p)]
    spec = training_spec(args.spec)
    args.spec = str(spec)
    print(f"comparing the steps of {spec.name}: " + ", ".join(s["name"] for s in __import__("yaml").safe_load(spec.read_text())["steps"]))
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        t_plain, out = timed([sys.executable, __file__, "--plain", "--spec", args.spec, *overrides],
                             {**env, "CD4ML_HOME": f"{tmp}/plain"})
        plain_scores = json.loads(out)
        env["CD4ML_HOME"] = f"{tmp}/pipeline"
        t_forced, out = timed([CD4ML, "run", args.spec, *overrides, "--force", "--json"], env)
        forced = json.loads(out)
        t_cached, out = timed([CD4ML, "run", args.spec, *overrides, "--json"], env)
        cached = json.loads(out)
    spec.unlink()
    same = all(abs(plain_scores[c["model"]] - c["metrics"]["nwrmsle"]) < 1e-12 for c in forced["candidates"])
    all_cached = all(s["cached"] for s in cached["steps"])
    overhead, cache = t_forced / t_plain, t_cached / t_forced
    print(f"(1) plain python process      {t_plain:7.1f} s")
    print(f"(2) cd4ml run --force         {t_forced:7.1f} s   steps: " +
          ", ".join(f"{s['name']} {s['seconds']:.1f}" for s in forced["steps"]))
    print(f"(3) cd4ml run (no change)     {t_cached:7.1f} s   all steps cached: {all_cached}")
    print(f"same nwrmsle in (1) and (2): {same}")
    print(f"overhead (2)/(1) = {overhead:.3f}  target <= 1.15  {'PASS' if overhead <= 1.15 else 'FAIL'}")
    print(f"cache    (3)/(2) = {cache:.3f}  target <= 0.05  {'PASS' if cache <= 0.05 and all_cached else 'FAIL'}")


if __name__ == "__main__":
    main()

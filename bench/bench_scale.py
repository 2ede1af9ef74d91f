"""Scaling benchmark: the pandas and the dask engine at 1 M, 20 M and (opt-in) 125 M sales rows (`make bench-scale`).

The sizes are the simulator's Kaggle-shaped presets (54 stores, 1,688 days from 2013-01-01, Kaggle's sparsity):
`medium` (650 items, ~20 M rows), `favorita` (4,100 items, ~125 M rows) and `medium` cut to 35 items (~1 M rows),
so every size has Favorita's history length and only the number of items grows. For every size and engine:

  data      `cd4ml data generate --preset P --engine E` (pandas: the Kaggle CSVs, then imported; dask: Parquet parts)
  validate  the pipeline's validate step notebook
  features  the features step notebook (horizon 16, 8 training and 2 validation origins, as `make pipeline-favorita`)
  train     the train step notebook, one model (default ridge)

each in a fresh process (papermill and its kernel for the notebooks), one after another. A thread samples the
resident memory of the whole process tree every 0.1 s: the CLI or papermill, the kernel and, for dask, the local
cluster's worker processes. A step that passes CD4ML_BENCH_MAX_GB is killed and reported as such (the machine is
shared). Sizes from CD4ML_BENCH_SAMPLE_FROM rows on train on a 25 % sample of the series (training.mode=sample), 10 % at 125 M.

Prints a table of wall time and peak RSS per step, saves the numbers (JSON) and a plot (PNG) under
$CD4ML_HOME/bench/, and says where the curves cross (from which size dask is faster / uses less memory).
Wall times include a process start per step (~2-4 s), the same for both engines. Other work on the machine makes
times noisy: compare the engines side by side within one run.

Run `bench/bench_scale.py --report` to print the summary and redraw the plot of the last run's scale.json.

Environment:
  CD4ML_BENCH_SIZES         sizes to run, default "1M,20M"; 125M is opt-in: "1M,20M,125M" (about an hour per engine
                            on a 2-core machine, and pandas needs more memory than such a machine has)
  CD4ML_BENCH_ENGINES       default "pandas,dask"
  CD4ML_BENCH_MODEL         default "ridge"
  CD4ML_BENCH_SAMPLE_FROM   sizes from this many rows train on a 25 % sample of the series, default 2e7
  CD4ML_BENCH_MAX_GB        kill a step whose process tree passes this, default 14
  CD4ML_HOME                results go to $CD4ML_HOME/bench/ (default ./.cd4ml, as in the Makefile); datasets and step
                            outputs to a scratch workspace there, deleted at the end
"""
import json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/"scripts"))
from pipeline_preset import N_TRAIN   # noqa: E402  (the origins `make pipeline-favorita` trains on)
BIN = Path(sys.executable).parent
STEPS = ["data", "validate", "features", "train"]
SIZES = {   # name -> (simulator preset, options of `cd4ml data generate` on top of it)
    "1M": ("medium", ["--items", "35"]),
    "20M": ("medium", []),
    "125M": ("favorita", []),
}


def env_list(name: str, default: str) -> list[str]:
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


def tree_rss(proc: psutil.Process) -> int:
    "Resident bytes of `proc` and all its descendants."
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try: total += p.memory_info().rss
        except psutil.Error: pass
    return total


def run_measured(cmd: list[str], out: Path, env: dict, max_bytes: int) -> dict:
    "Run `cmd` in `out` (stdout to _stdout.txt, stderr to _log.txt); wall seconds, peak tree RSS, status."
    out.mkdir(parents=True, exist_ok=True)
    start, peak, status = time.time(), 0, "ok"
    with open(out/"_stdout.txt", "w") as stdout, open(out/"_log.txt", "w") as log:
        proc = psutil.Popen(cmd, stdout=stdout, stderr=log, env=env, cwd=out)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc))
            if peak > max_bytes:
                for p in [*proc.children(recursive=True), proc]:
                    try: p.kill()
                    except psutil.Error: pass
                status = f"killed > {max_bytes / 2**30:.0f} GB"
                break
            time.sleep(0.1)
        proc.wait()
    if status == "ok" and proc.returncode: status = f"failed (exit {proc.returncode}, see {out/'_log.txt'})"
    return {"seconds": round(time.time() - start, 1), "peak_gb": round(peak / 2**30, 2), "status": status}


def notebook(step: str, params: dict, out: Path) -> list[str]:
    "The papermill command running step notebook `step` with `params` into `out`."
    return [str(BIN/"papermill"), str(ROOT/"nbs"/"steps"/f"{step}.ipynb"), str(out/"_executed.ipynb"), "--cwd", str(out),
            "-y", yaml.safe_dump({**params, "output_dir": str(out)})]


def bench(size: str, engine: str, home: Path, model: str, sample_from: float, max_bytes: int) -> list[dict]:
    "data -> validate -> features -> train for one size and engine, in the workspace `home/engine`; one record per step."
    preset, options = SIZES[size]
    env = {**os.environ, "CD4ML_HOME": str(home/engine)}
    env.pop("DASK_SCHEDULER_ADDRESS", None)                      # the bench measures the local cluster's memory too
    work = home/engine/"bench"/size
    nominal = float(size.rstrip("M")) * 1e6
    fraction = 0.1 if nominal >= 1e8 else 0.25       # at 125 M rows a quarter of the series is 7 M training rows beside
    training = {"mode": "sample" if nominal >= sample_from else "full",   # 7 M validation rows: past 14 GB; a tenth, as
                "sample_fraction": fraction, "seed": 0}                   # `make pipeline-favorita` trains on
    commands = {
        "data": [str(BIN/"cd4ml"), "data", "generate", "--preset", preset, *options, "--engine", engine, "--json"],
        "validate": notebook("validate", {"engine": engine, "inputs": {"data": str(work/"data")}}, work/"validate"),
        "features": notebook("features", {"engine": engine, "training": training, "n_train": N_TRAIN,
                                          "inputs": {"data": str(work/"data")}}, work/"features"),
        "train": notebook("train", {"model": model, "inputs": {"features": str(work/"features")}}, work/"train")}
    records, rows = [], int(nominal)
    for step in STEPS:
        r = run_measured(commands[step], work/step, env, max_bytes)
        if step == "data" and r["status"] == "ok":                  # the other steps read the dataset it names
            ds = json.loads((work/"data"/"_stdout.txt").read_text())
            rows = ds["rows"]
            (work/"data"/"dataset.json").write_text(json.dumps({"version": ds["version"]}))
        records.append({"size": size, "rows": rows, "engine": engine, "step": step, "training": training["mode"], **r})
        print(f"{size:>5} {rows:>12,} {engine:>7} {step:>9} {r['seconds']:>9.1f} {r['peak_gb']:>8.2f}  {r['status']}", flush=True)
        if r["status"] != "ok": break
    for r in records: r["rows"] = rows
    shutil.rmtree(home/engine, ignore_errors=True)               # datasets are big: one size at a time
    return records


def crossing(results: list[dict], key: str, steps=STEPS) -> str:
    "Where dask's total over `steps` (time: sum; memory: max) drops below pandas', in words."
    import math
    agg = sum if key == "seconds" else max
    def total(engine, size):                                     # a number, "failed" or None (not run)
        rs = [r for r in results if r["engine"] == engine and r["size"] == size]
        if not rs: return None
        if any(r["status"] != "ok" for r in rs) or len(rs) < len(STEPS): return "failed"
        return agg(r[key] for r in rs if r["step"] in steps)
    points = []                                                  # (rows, dask/pandas or None, words)
    for size in sorted({r["size"] for r in results}, key=lambda s: float(s.rstrip("M"))):
        n = max(r["rows"] for r in results if r["size"] == size)
        p, d = total("pandas", size), total("dask", size)
        if p is None or d is None: continue
        if p == "failed" or d == "failed":
            q = 0.0 if d != "failed" else math.inf               # only pandas failed: dask wins there
            points.append((n, q, f"{size}: {'pandas' if p == 'failed' else 'dask'} did not complete")); continue
        points.append((n, d / p, f"{size}: dask/pandas {d / p:.2f}"))
    what = "faster" if key == "seconds" else "lighter (peak RSS)"
    label = f"{'time' if key == 'seconds' else 'memory'} of {'+'.join(steps)}"
    words = ", ".join(w for _, _, w in points)
    wins = [i for i, (_, q, _) in enumerate(points) if q < 1]
    if not wins: return f"{label}: dask is never {what} at the sizes measured ({words})"
    i = wins[0]
    if any(q >= 1 for _, q, _ in points[i:]): return f"{label}: no clean crossing ({words})"
    if i == 0: return f"{label}: dask is {what} at every size measured ({words})"
    (n0, q0, _), (n1, q1, _) = points[i - 1], points[i]
    if 0 < q1 < math.inf and q0 < math.inf:                     # ratio = 1, interpolated in log(rows)
        t = math.log(q0) / (math.log(q0) - math.log(q1))
        return f"{label}: dask becomes {what} at about {math.exp(math.log(n0) + t * math.log(n1 / n0))/1e6:.1f} M rows ({words})"
    return f"{label}: dask is {what} from {n1/1e6:g} M rows on ({words})"


def plot(results: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in [(axes[0], "seconds", "wall time (s)"), (axes[1], "peak_gb", "peak RSS (GB)")]:
        for engine, style in [("pandas", "-"), ("dask", "--")]:
            for step, colour in zip(STEPS, ["tab:blue", "tab:purple", "tab:orange", "tab:green"]):
                pts = sorted((r["rows"], r[key]) for r in results if r["engine"] == engine and r["step"] == step and r["status"] == "ok")
                if pts: ax.plot(*zip(*pts), style, marker="o", color=colour, label=f"{engine} {step}")
            killed = [(r["rows"], r[key]) for r in results if r["engine"] == engine and r["status"] != "ok"]
            if killed: ax.plot(*zip(*killed), "x", color="red", markersize=10, label=f"{engine}: killed/failed")
        ax.set_xscale("log"); ax.set_xlabel("sales rows"); ax.set_ylabel(label); ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("cd4ml engines: pandas (solid) vs dask (dashed), per step")
    fig.tight_layout(); fig.savefig(path, dpi=110)


HEADER = f"{'size':>5} {'rows':>12} {'engine':>7} {'step':>9} {'seconds':>9} {'peak GB':>8}  status"


def main() -> int:
    sizes = env_list("CD4ML_BENCH_SIZES", "1M,20M")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown: sys.exit(f"CD4ML_BENCH_SIZES: unknown size(s) {unknown}; known: {', '.join(SIZES)}")
    engines = env_list("CD4ML_BENCH_ENGINES", "pandas,dask")
    model = os.environ.get("CD4ML_BENCH_MODEL", "ridge")
    sample_from = float(os.environ.get("CD4ML_BENCH_SAMPLE_FROM", "2e7"))
    max_bytes = int(float(os.environ.get("CD4ML_BENCH_MAX_GB", "14")) * 2**30)
    home = Path(os.environ.get("CD4ML_HOME", ROOT/".cd4ml"))      # the Makefile's default workspace
    out = home/"bench"
    out.mkdir(parents=True, exist_ok=True)
    if "--report" in sys.argv:                                   # the summary of the last run's scale.json, nothing run
        results = json.loads((out/"scale.json").read_text())
        print(HEADER)
        for r in results:
            print(f"{r['size']:>5} {r['rows']:>12,} {r['engine']:>7} {r['step']:>9} {r['seconds']:>9.1f} {r['peak_gb']:>8.2f}  {r['status']}")
        return report(results, out)
    print(HEADER)
    results = []
    scratch = Path(tempfile.mkdtemp(prefix="scale-", dir=out))  # datasets and step outputs, deleted at the end
    try:
        for size in sorted(sizes, key=lambda s: float(s.rstrip("M"))):
            for engine in engines:
                results += bench(size, engine, scratch, model, sample_from, max_bytes)
                (out/"scale.json").write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report(results, out)


def report(results: list[dict], out: Path) -> int:
    "Totals, crossings and the plot of `results`."
    sizes = sorted({r["size"] for r in results}, key=lambda s: float(s.rstrip("M")))
    engines = list(dict.fromkeys(r["engine"] for r in results))
    print("\ntotal per size and engine (time: sum of steps; memory: the largest step)")
    for size in sizes:
        for engine in engines:
            rs = [r for r in results if r["size"] == size and r["engine"] == engine]
            if not rs: continue
            done = all(r["status"] == "ok" for r in rs) and len(rs) == len(STEPS)
            print(f"{size:>5} {rs[0]['rows']:>12,} {engine:>7} {sum(r['seconds'] for r in rs):>9.1f} s "
                  f"{max(r['peak_gb'] for r in rs):>6.2f} GB  {'training on ' + rs[0]['training'] if done else 'did not complete'}")
    if {"pandas", "dask"} <= set(engines):
        print()
        for steps in [STEPS, *([s] for s in STEPS)]:
            print(crossing(results, "seconds", steps) + "\n" + crossing(results, "peak_gb", steps))
    plot(results, out/"scale.png")
    print(f"\nresults: {out/'scale.json'}  plot: {out/'scale.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

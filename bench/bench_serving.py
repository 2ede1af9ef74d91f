"""Benchmark the forecast service: `cd4ml serve` vs `mlflow models serve`, same champion, same rows, loopback.

Both servers run side by side in one workspace (a temporary one with a small simulated champion, unless
CD4ML_BENCH_HOME names a workspace that already has a champion). Each gets the same single-row requests at
concurrency 1 and 16; we print requests/s, p50 and p99 latency, and cd4ml's throughput as a ratio of mlflow's.
mlflow's server cannot compute features, so it is sent the precomputed feature row (`dataframe_split` of
FEATURES) — less work than cd4ml, which computes the features from the history inside the service.
Targets: at concurrency 16, cd4ml >= 2x mlflow's requests/s and p99 <= 50 ms. Exit code 1 if missed.
Run: `.venv/bin/python bench/bench_serving.py` (called by `make bench`).
"""
import asyncio, os, signal, subprocess, sys, tempfile, time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/"tests"))
from _serving_helpers import as_json_rows, build_registry, free_port, request_rows, running_server  # noqa: E402

REQUESTS = {1: 200, 16: 800}          # concurrency -> requests sent (after a warm-up of 50)
TARGET_RATIO, TARGET_P99_MS = 2.0, 50.0

async def load(url: str, bodies: list[dict | None], concurrency: int) -> dict:
    "Send `bodies` as POSTs (GETs where None) with `concurrency` in flight; requests/s and latency percentiles (ms)."
    latencies, queue = [], list(bodies)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker():
            while queue:
                body = queue.pop()
                t = time.perf_counter()
                r = await (client.get(url) if body is None else client.post(url, json=body))
                latencies.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200: raise RuntimeError(f"{url}: HTTP {r.status_code} {r.text[:300]}")
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    lat = np.array(latencies)
    return {"rps": len(lat) / seconds, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}

@contextmanager
def mlflow_server(home: Path):
    "`mlflow models serve` of the champion, on a free loopback port, local env; yields its /invocations URL."
    port = free_port()
    cmd = [str(Path(sys.executable).parent/"mlflow"), "models", "serve", "-m", "models:/sales@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{home/'mlflow.db'}",                   # it execs `uvicorn`: find the venv's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # running_server waits for /readyz; mlflow's scoring server has /health instead, so poll that here
    log = open(home/"mlflow-serve.log", "w+")
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None: log.seek(0); sys.exit(f"mlflow models serve exited:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200: break
            except httpx.HTTPError: pass
            if time.time() > deadline: sys.exit("mlflow models serve not ready after 180 s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        try: os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError: pass
        try: proc.wait(15)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL)
        log.close()

def main() -> int:
    from cd4ml import features
    with ExitStack() as stack:
        home = Path(os.environ.get("CD4ML_BENCH_HOME") or stack.enter_context(tempfile.TemporaryDirectory())/Path("ws"))
        os.environ["CD4ML_HOME"] = str(home)
        from cd4ml.serving import load_forecaster, _forecasters
        try: fc = load_forecaster()
        except Exception:
            build_registry(home); _forecasters.clear(); fc = load_forecaster()
        rows = request_rows(fc.data, 1000, seed=11)
        cd4ml_bodies = [{"rows": r} for r in (as_json_rows(rows.iloc[[i]]) for i in range(len(rows)))]
        X = features.features_for(fc.data, rows, fc.origin)[features.FEATURES]
        mlflow_bodies = [{"dataframe_split": {"columns": features.FEATURES, "data": [X.iloc[i].tolist()]}} for i in range(len(rows))]
        base = stack.enter_context(running_server(home, timeout=240))
        mlflow_url = stack.enter_context(mlflow_server(home))
        results = {}
        for name, url, bodies in (("cd4ml", f"{base}/predict", cd4ml_bodies), ("mlflow", mlflow_url, mlflow_bodies)):
            asyncio.run(load(url, bodies[:50], 4))                                        # warm-up
            for c, n in REQUESTS.items():
                results[name, c] = asyncio.run(load(url, (bodies * 2)[:n], c))
        # the HTTP floor: each server's cheapest GET, same client, concurrency 16 (how much is the stack itself)
        floor = {"cd4ml /livez": asyncio.run(load(f"{base}/livez", [None] * 400, 16)),
                 "mlflow /ping": asyncio.run(load(mlflow_url.replace("/invocations", "/ping"), [None] * 400, 16))}
    print(f"{'server':>7} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}")
    for (name, c), r in results.items():
        print(f"{name:>7} {c:>4} {r['rps']:>8.1f} {r['p50']:>7.1f} {r['p99']:>7.1f}")
    for name, r in floor.items():
        print(f"HTTP floor, {name} at concurrency 16: {r['rps']:.0f} req/s, p99 {r['p99']:.1f} ms")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work skews both servers)")
    ok = True
    for c in REQUESTS:
        ratio = results["cd4ml", c]["rps"] / results["mlflow", c]["rps"]
        line = f"concurrency {c:>2}: cd4ml/mlflow throughput {ratio:.2f}x, cd4ml p99 {results['cd4ml', c]['p99']:.1f} ms"
        if c == 16:
            passed = ratio >= TARGET_RATIO and results["cd4ml", c]["p99"] <= TARGET_P99_MS
            line += f"  {'PASS' if passed else 'FAIL'} (>= {TARGET_RATIO:.0f}x and p99 <= {TARGET_P99_MS:.0f} ms)"
            ok &= passed
        print(line)
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the forecast service like for like: `cd4ml serve` and two `mlflow models serve` peers, same model, same rows.

For each catalog size (16,200 and 210,600 series by default: 54 stores x 300 and x 3,900 items, simulated over a short
history of 130 days, stored in parts as the dask engine stores them; CD4ML_BENCH_SERIES=16200 to run one), one
registered ridge model is served three ways on loopback, one process each:

- cd4ml            `cd4ml serve`: checks each row against the catalog, micro-batches concurrent requests, computes the
                   features of the rows its answer cache lacks from its series state (`cd4ml.state`), runs the model
                   compiled at load on them (`cd4ml.compiled`: numpy arithmetic on the feature array, the same answers
                   as the sklearn model's predict to 1e-9), logs every request to the prediction log.
- mlflow-rows      `mlflow models serve` of a pyfunc holding the same series state and model: computes the features of
                   the raw rows and calls the sklearn model's predict on a DataFrame of them, for every request. The
                   like-for-like peer: cd4ml's work minus the checks, the batching, the cache, the log and the compiling.
- mlflow-features  `mlflow models serve` of the same sklearn model, sent feature rows the bench computed beforehand
                   (`dataframe_split` of FEATURES): it calls the sklearn model's predict only; the features cost it
                   nothing here.

Three loads, each at concurrency 1 and 16: hot (one row, repeated), cold (single rows drawn uniformly over the whole
catalog: any store, item, forecastable day and promotion, fresh in every round, so no cache holds them), batch (1,000
such rows a request). Printed: requests/s, p50 and p99 latency, the server's CPU milliseconds per request (its whole
process group), ratios measured in this run, and each target met or not: cold p99 <= 50 ms at concurrency 16; cold
throughput >= 2x mlflow-rows' at concurrency 16; a batch of 1,000 rows answered in <= 200 ms (p99, concurrency 1);
at 210,600 series, cd4ml ready <= 60 s after start with RSS <= 4 GB. Exit code 1 if a target is missed.

The load generator is the same for every server and deliberately cheap: HTTP/1.1 keep-alive connections on raw asyncio
streams (one per concurrent client), each request's bytes encoded before the clock starts. (With httpx's AsyncClient,
cd4ml's /livez measured 238 req/s at concurrency 16; with this client, 860 req/s: the client was the floor.) Its own
floor is printed too: a trivial asyncio HTTP server in its own process, same client, concurrency 16.

CD4ML_BENCH_HOME: a folder to keep the generated workspaces in between runs (default: a temporary one).
CD4ML_BENCH_BASELINE: a checkout of another cd4ml commit, served beside as `cd4ml-base` (before/after, same rows).
Run: `.venv/bin/python bench/bench_serving.py` (called by `make bench`; ~10 min with both sizes on 2 cores).
"""
import asyncio, json, os, signal, socket, subprocess, sys, tempfile, time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx   # only to wait for the servers to be ready
import mlflow.pyfunc
import numpy as np
import pandas as pd

BIN = Path(sys.executable).parent
SERIES = [int(s) for s in os.environ.get("CD4ML_BENCH_SERIES", "16200,210600").split(",")]
STORES, DAYS, HORIZON = 54, 130, 16
REQUESTS = {"hot": {1: 200, 16: 800}, "cold": {1: 200, 16: 800}, "batch": {1: 10, 16: 32}}   # per round
BATCH_ROWS, ROUNDS = 1000, 2
TARGETS = {"cold_p99_ms": 50.0, "cold_vs_rows_peer": 2.0, "batch_p99_ms": 200.0, "start_s": 60.0, "rss_gb": 4.0}

# ------------------------------------------------------------------ the workspace: data, model, peers' models
class RowsModel(mlflow.pyfunc.PythonModel):
    "The like-for-like peer: cd4ml's series state and model, the features of each request's raw rows computed per request."
    def load_context(self, context):
        import json as _json, mlflow.sklearn
        from cd4ml.datasets import Dataset
        from cd4ml.state import series_state
        path = Path(context.model_config["dataset"])
        ds = Dataset(path.name, path, _json.loads((path/"meta.json").read_text()))
        self.state, self.model = series_state(ds, HORIZON), mlflow.sklearn.load_model(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        from cd4ml import features, models
        from cd4ml.state import state_features
        rows = model_input.assign(date=pd.to_datetime(model_input["date"]))
        return models.predict(self.model, pd.DataFrame(state_features(self.state, rows), columns=features.FEATURES))

def prepare(home: Path, items: int) -> dict:
    "A workspace in `home` with a simulated dataset, a ridge champion and the like-for-like pyfunc (made once)."
    os.environ["CD4ML_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    done = home/"bench.json"
    if done.exists(): return json.loads(done.read_text())
    import mlflow.sklearn
    from cd4ml import datasets, features, models
    from cd4ml.core import tracking_uri
    from cd4ml.scale import generate_partitioned
    t = time.perf_counter()
    ds = generate_partitioned(stores=STORES, items=items, days=DAYS, start="2017-01-01", seed=0)
    sample = {**datasets.tables_of(ds, ["items", "stores", "holidays", "oil", "transactions"]),
              "sales": ds.sales[ds.sales.store_nbr <= 6]}             # the model's quality is not measured here
    end = pd.Timestamp(ds.meta["end"])
    model = models.fit(models.make_model("ridge"), features.training_frame(sample, [end - pd.Timedelta(days=16)], 16))
    mlflow.set_tracking_uri(tracking_uri()); mlflow.set_registry_uri(tracking_uri())
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("bench", artifact_location=(home/"artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        mlflow.sklearn.log_model(model, name="model", registered_model_name="sales",
                                 pip_requirements=["scikit-learn", "numpy", "pandas"])
    for tag, value in (("dataset_version", ds.version), ("horizon", str(HORIZON)), ("freq", "D")):
        client.set_model_version_tag("sales", "1", tag, value)
    client.set_registered_model_alias("sales", "champion", "1")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.pyfunc.log_model(name="rows", python_model=RowsModel(), artifacts={"model": "models:/sales/1"},
                                model_config={"dataset": str(ds.path)}, pip_requirements=["cd4ml"])
    facts = {"dataset": ds.version, "rows": ds.meta["rows"], "series": STORES * items, "rows_model": f"runs:/{run.info.run_id}/rows",
             "prepared_s": round(time.perf_counter() - t, 1)}
    done.write_text(json.dumps(facts))
    return facts

# ------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def tree_pids(root: int) -> list[int]:
    "`root` and its descendants: a server and its workers (BentoML's start sessions of their own)."
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try: ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError): continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out

def cpu_seconds(root: int) -> float:
    "User + system CPU time so far of `root` and its living descendants."
    total = 0
    for pid in tree_pids(root):
        try: fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError: continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")

def rss_gb(root: int, field: str = "VmHWM") -> float:
    "Peak (VmHWM) or current (VmRSS) resident memory of `root` and its descendants, summed, GB."
    kb = 0
    for pid in tree_pids(root):
        try: kb += int(next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith(field)).split()[1])
        except (OSError, StopIteration): continue
    return kb / 1e6

@contextmanager
def server(name: str, argv: list[str], ready: str, home: Path, env: dict | None = None, cwd=None, timeout: float = 300):
    "Start `argv` in a process group of its own; yields (base URL, its pid, seconds until `ready` answered 200)."
    port = free_port()
    log = open(home/f"{name}.log", "w+")
    full = {**os.environ, "CD4ML_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home/'mlflow.db'}",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}   # mlflow execs `uvicorn`
    started = time.perf_counter()
    proc = subprocess.Popen([a.replace("{port}", str(port)) for a in argv], env=full, cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None: log.seek(0); sys.exit(f"{name} exited:\n{log.read()[-3000:]}")
            try:
                if httpx.get(base + ready, timeout=2).status_code == 200: break
            except httpx.HTTPError: pass
            if time.perf_counter() - started > timeout: sys.exit(f"{name} not ready after {timeout} s")
            time.sleep(0.25)
        yield base, proc.pid, time.perf_counter() - started
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try: os.killpg(proc.pid, sig)
            except ProcessLookupError: break
            try: proc.wait(wait); break
            except subprocess.TimeoutExpired: continue
        log.close()

def cd4ml_server(home: Path, checkout: str | None = None):
    "`cd4ml serve`, or the service of another checkout (its code first on the path)."
    if not checkout: return server("cd4ml", [str(BIN/"cd4ml"), "serve", "--port", "{port}"], "/readyz", home)
    argv = [sys.executable, "-m", "bentoml", "serve", "cd4ml.service:Forecast", "--port", "{port}"]
    return server("cd4ml-base", argv, "/readyz", home, {"PYTHONPATH": checkout, "BENTOML_HOME": str(home/"bentoml-base"),
                                                        "BENTOML_DO_NOT_TRACK": "true"}, cwd=checkout)

def mlflow_server(home: Path, name: str, model_uri: str):
    argv = [str(BIN/"mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "--host", "127.0.0.1",
            "-p", "{port}"]
    return server(name, argv, "/health", home)

TRIVIAL_SERVER = """
import asyncio, sys
async def handle(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    except (asyncio.IncompleteReadError, ConnectionError): writer.close()
async def main():
    async with await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1])) as server: await server.serve_forever()
asyncio.run(main())
"""

# ------------------------------------------------------------------ the client
def request_bytes(url: str, body: dict | None) -> bytes:
    "One HTTP/1.1 keep-alive request: a GET when `body` is None, else a JSON POST."
    u = urlsplit(url)
    if body is None: return f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode()
    payload = json.dumps(body).encode()
    return (f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload

async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    "Status and body of one response (Content-Length or chunked)."
    head = await reader.readuntil(b"\r\n\r\n")
    headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:-2])
    headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        return int(head[9:12]), body
    return int(head[9:12]), await reader.readexactly(int(headers.get(b"content-length", 0)))

async def load(url: str, requests: list[bytes], concurrency: int) -> tuple[list[float], float]:
    "Send `requests` over `concurrency` keep-alive connections; each latency (ms) and the wall time (s)."
    u, latencies = urlsplit(url), []
    async def client(mine: list[bytes]):
        reader, writer = await asyncio.open_connection(u.hostname, u.port, limit=1 << 24)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for request in mine:
                t = time.perf_counter()
                writer.write(request)
                status, body = await read_response(reader)
                latencies.append((time.perf_counter() - t) * 1000)
                if status != 200: raise RuntimeError(f"{url}: HTTP {status} {body[:300]!r}")
        finally: writer.close()
    start = time.perf_counter()
    await asyncio.gather(*(client(requests[i::concurrency]) for i in range(concurrency)))
    return latencies, time.perf_counter() - start

def measure(url: str, pid: int | None, requests: list[bytes], concurrency: int) -> dict:
    "Latencies, wall time and the CPU seconds of the server (process `pid` and its workers) for `requests`."
    before = cpu_seconds(pid) if pid else 0.0
    latencies, seconds = asyncio.run(load(url, requests, concurrency))
    return {"latencies": latencies, "seconds": seconds, "cpu": cpu_seconds(pid) - before if pid else float("nan")}

def summary(runs: list[dict]) -> dict:
    "Several runs as one: all their requests over all their time (no best-of)."
    lat = np.concatenate([r["latencies"] for r in runs])
    seconds, cpu = sum(r["seconds"] for r in runs), sum(r["cpu"] for r in runs)
    return {"rps": len(lat) / seconds, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "cpu_ms": cpu / len(lat) * 1000, "n": len(lat)}

# ------------------------------------------------------------------ rows and bodies
class Bodies:
    "The same rows as each server takes them: cd4ml rows, mlflow-rows raw rows, mlflow-features computed features."
    def __init__(self, state):
        self.state = state

    def __call__(self, rows: pd.DataFrame, per_request: int) -> dict[str, list[dict]]:
        from cd4ml.features import FEATURES
        from cd4ml.release import as_request
        from cd4ml.state import state_features
        X, raw = state_features(self.state, rows).tolist(), as_request(rows)
        chunks = range(0, len(rows), per_request)
        cols = ["date", "store_nbr", "item_nbr", "onpromotion"]
        return {"cd4ml": [{"rows": raw[a:a + per_request]} for a in chunks],
                "mlflow-rows": [{"dataframe_split": {"columns": cols, "data": [[r[c] for c in cols] for r in raw[a:a + per_request]]}}
                                for a in chunks],
                "mlflow-features": [{"dataframe_split": {"columns": FEATURES, "data": X[a:a + per_request]}} for a in chunks]}

def rows_for(ds, load: str, n: int, seed: int) -> pd.DataFrame:
    "The rows of `n` requests of `load`: one row repeated (hot), or uniform over the catalog (cold, batch)."
    from cd4ml.release import catalog_rows
    if load == "hot": return pd.concat([catalog_rows(ds, HORIZON, 1, seed)] * n, ignore_index=True)
    return catalog_rows(ds, HORIZON, n * (BATCH_ROWS if load == "batch" else 1), seed)

# ------------------------------------------------------------------ one catalog size
def bench_size(root: Path, series: int) -> dict:
    from cd4ml.datasets import load_dataset
    from cd4ml.state import series_state
    items = series // STORES
    home = root/f"series-{STORES * items}"
    facts = prepare(home, items)
    ds = load_dataset(facts["dataset"])
    bodies = Bodies(series_state(ds, HORIZON))
    out = {"facts": facts, "results": {}}
    with ExitStack() as stack:
        base, pid, startup = stack.enter_context(cd4ml_server(home))
        out["start_s"], out["rss_gb"] = startup, rss_gb(pid)
        servers = {"cd4ml": (f"{base}/predict", pid)}
        if os.environ.get("CD4ML_BENCH_BASELINE"):
            b, g, s = stack.enter_context(cd4ml_server(home, os.environ["CD4ML_BENCH_BASELINE"]))
            servers["cd4ml-base"] = (f"{b}/predict", g)
            out["base_start_s"], out["base_rss_gb"] = s, rss_gb(g)
        for name, uri in (("mlflow-rows", facts["rows_model"]), ("mlflow-features", "models:/sales@champion")):
            b, g, _ = stack.enter_context(mlflow_server(home, name, uri))
            servers[name] = (f"{b}/invocations", g)
        body_of = lambda name: "cd4ml" if name.startswith("cd4ml") else name
        warm = bodies(rows_for(ds, "cold", 20, seed=999), 1)
        for name, (url, _) in servers.items():
            asyncio.run(load(url, [request_bytes(url, b) for b in warm[body_of(name)]], 4))
        runs, seed = {}, 0
        for _ in range(ROUNDS):                       # the servers take turns: a burst of other work hits all alike
            for load_name, by_concurrency in REQUESTS.items():
                for c, n in by_concurrency.items():
                    seed += 1
                    turn = bodies(rows_for(ds, load_name, n, seed), BATCH_ROWS if load_name == "batch" else 1)
                    for name, (url, g) in servers.items():
                        requests = [request_bytes(url, b) for b in turn[body_of(name)]]
                        runs.setdefault((load_name, c, name), []).append(measure(url, g, requests, c))
        out["results"] = {key: summary(r) for key, r in runs.items()}
        out["rss_gb"] = max(out["rss_gb"], rss_gb(pid))
    return out

def floor() -> dict:
    "The client's own floor: a trivial asyncio server, concurrency 16."
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER, str(port)])
    try:
        for _ in range(100):
            try: socket.create_connection(("127.0.0.1", port), timeout=1).close(); break
            except OSError: time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/"
        return summary([measure(url, None, [request_bytes(url, None)] * 2000, 16)])
    finally: proc.kill(); proc.wait()

# ------------------------------------------------------------------ report
def report(series: int, out: dict) -> bool:
    "Print one size's table, ratios and targets; whether every target was met."
    f, r = out["facts"], out["results"]
    print(f"\n== {f['series']:,} series ({STORES} stores x {f['series'] // STORES:,} items, {f['rows'] / 1e6:.1f} M sales rows "
          f"over {DAYS} days, partitioned): cd4ml ready in {out['start_s']:.1f} s, peak RSS {out['rss_gb']:.2f} GB"
          + (f"; cd4ml-base ready in {out['base_start_s']:.1f} s, peak RSS {out['base_rss_gb']:.2f} GB" if "base_start_s" in out else ""))
    print(f"{'load':>6} {'conc':>4} {'server':>16} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms/req':>10}")
    for (load_name, c, name), s in r.items():
        print(f"{load_name:>6} {c:>4} {name:>16} {s['rps']:>8.1f} {s['p50']:>8.1f} {s['p99']:>8.1f} {s['cpu_ms']:>10.2f}")
    ratio = lambda load_name, c, a, b: r[load_name, c, a]["rps"] / r[load_name, c, b]["rps"]
    print("ratios, same run (req/s): " + "; ".join(
        f"{load_name} c{c} cd4ml/{peer} {ratio(load_name, c, 'cd4ml', peer):.2f}x"
        for load_name in REQUESTS for c in (1, 16) for peer in ("mlflow-rows", "mlflow-features")))
    if ("cold", 16, "cd4ml-base") in r:
        print("before/after, same rows: " + "; ".join(
            f"{load_name} c{c} cd4ml/cd4ml-base {ratio(load_name, c, 'cd4ml', 'cd4ml-base'):.2f}x req/s, p99 "
            f"{r[load_name, c, 'cd4ml']['p99']:.1f} vs {r[load_name, c, 'cd4ml-base']['p99']:.1f} ms"
            for load_name in REQUESTS for c in (1, 16)))
    cold_hot = r["cold", 16, "cd4ml"]["cpu_ms"] / r["hot", 16, "cd4ml"]["cpu_ms"]
    print(f"cd4ml, a cold request vs a hot one at concurrency 16: {cold_hot:.2f}x the server CPU, "
          f"p50 {r['cold', 16, 'cd4ml']['p50']:.1f} vs {r['hot', 16, 'cd4ml']['p50']:.1f} ms")
    checks = [(f"cold p99 at concurrency 16 <= {TARGETS['cold_p99_ms']:g} ms", r["cold", 16, "cd4ml"]["p99"] <= TARGETS["cold_p99_ms"],
               f"{r['cold', 16, 'cd4ml']['p99']:.1f} ms"),
              (f"cold req/s at concurrency 16 >= {TARGETS['cold_vs_rows_peer']:g}x mlflow-rows'",
               ratio("cold", 16, "cd4ml", "mlflow-rows") >= TARGETS["cold_vs_rows_peer"], f"{ratio('cold', 16, 'cd4ml', 'mlflow-rows'):.2f}x"),
              (f"a batch of {BATCH_ROWS:,} rows, p99 at concurrency 1 <= {TARGETS['batch_p99_ms']:g} ms",
               r["batch", 1, "cd4ml"]["p99"] <= TARGETS["batch_p99_ms"], f"{r['batch', 1, 'cd4ml']['p99']:.1f} ms")]
    if series >= 200_000:
        checks += [(f"ready <= {TARGETS['start_s']:g} s after start", out["start_s"] <= TARGETS["start_s"], f"{out['start_s']:.1f} s"),
                   (f"peak RSS <= {TARGETS['rss_gb']:g} GB", out["rss_gb"] <= TARGETS["rss_gb"], f"{out['rss_gb']:.2f} GB")]
    for what, met, value in checks: print(f"  target {what}: {value}  {'met' if met else 'NOT MET'}")
    return all(met for _, met, _ in checks)

def main() -> int:
    print("\n\n".join(__doc__.split("\n\n")[1:4]))   # the sizes, what each server does, the loads and targets
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(os.environ.get("CD4ML_BENCH_HOME") or tmp)
        outs = {series: bench_size(root, series) for series in SERIES}
    ok = all([report(series, out) for series, out in outs.items()])
    f = floor()
    print(f"\nthe client's floor (a trivial asyncio server, concurrency 16): {f['rps']:.0f} req/s, p99 {f['p99']:.1f} ms; "
          f"{ROUNDS} rounds per line, pooled; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(client and servers share them; other work skews latency, cpu ms/req much less)")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())

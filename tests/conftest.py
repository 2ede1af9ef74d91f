"""Shared fixtures of the integration and end-to-end tests (unit tests live in the notebooks, next to the code).

Ask for any of them by name:

- `cli`: the installed `cd4ml` entry point run as a subprocess, as a user runs it. `cli(env, "run", ...)` returns a `Ran`
  (exit code, stdout, stderr, `.json` parsed, `.message` = stderr on one line); `cli.json(env, ...)` adds `--json`,
  requires exit code 0 and returns the parsed output.
- `new_workspace(name)`: a fresh CD4ML_HOME in a temp folder (`.home`, `.env` for `cli`, `.uri` of its SQLite MLflow
  store, `.in_process()` to point this process at it too). `workspace`: the same for one test, this process on it.
- `tiny_project(dest)`: a copy of pipeline.yaml and the step notebooks, to edit or to run from another folder.
- `default_run`: the default pipeline run once, exactly as `make pipeline` runs it (session); its workspace is shared.
- `first_run`: a new user's first run: order lines imported, then the default pipeline on them, release on (session).
- `served_registry(home, env=...)`: a small registry (champion v1, challenger v2) and `cd4ml serve` on it;
  `running_server(home, ...)`: a server alone; `simulated_tables(...)`: hand-made data like the registry's.
- `postgres`: a throwaway PostgreSQL cluster; `postgres.database(name)` is a new empty database's URI (session).
- `browser`: a headless Chromium (Debian's, driven by playwright); `web_page(base)`: the service's page opened in it.
- `api_token`: the API token every test server accepts (`.name`, `.token`, `.headers` to send); `serving` configures it
  through CD4ML_API_TOKENS unless the test's `env` sets CD4ML_API_TOKENS (empty: none, as a new user has).
- `free_port()`, `system_binary(name)`.

Tests that need a system binary (Debian's chromium, PostgreSQL) ask for it through `system_binary`: when it is
missing they are skipped locally — and the end of the run says so in capitals — but in CI (`CI=true`, after
`make system-deps`) a missing binary is a failure, so CI can never go green by skipping them.
"""
import glob, json, os, secrets, shutil, signal, subprocess, sys, time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import distributions
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import _stores

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CD4ML = str(BIN/"cd4ml")

# ---------------------------------------------------------------------------------------------------------------------
# system binaries

SYSTEM_BINARIES = {
    "chromium": lambda: shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium"),
    "postgres": lambda: next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None),
}
_skipped_for_system = []

@pytest.fixture(scope="session")
def system_binary():
    "Return a function: `system_binary('chromium')` → path, or skip (fail in CI) when missing."
    def need(name):
        path = SYSTEM_BINARIES[name]()
        if path: return str(path)
        if os.environ.get("CI"): pytest.fail(f"{name} is missing in CI: `make system-deps` should have installed it")
        _skipped_for_system.append(name)
        pytest.skip(f"{name} not installed (run `make system-deps`)")
    return need

def pytest_terminal_summary(terminalreporter):
    if _skipped_for_system:
        names = ", ".join(sorted(set(_skipped_for_system)))
        terminalreporter.write_sep("!", f"SKIPPED {len(_skipped_for_system)} TEST(S): {names} NOT INSTALLED — run `make system-deps`",
                                   red=True, bold=True)

@pytest.fixture(scope="session")
def free_port():
    "`free_port()`: a TCP port free on 127.0.0.1 right now."
    return _stores.free_port

# ---------------------------------------------------------------------------------------------------------------------
# on two processes: `make pytest` runs `pytest -n 2 --dist loadfile` (pytest-xdist): each file whole on one worker,
# so its module fixtures are built once; a session fixture is built once in each worker that needs it, in that worker's
# own temporary folders (the default run: on both workers, side by side). `--dist loadgroup` would keep the files that
# share a run on one worker, but with pytest 9 it groups nothing (xdist 3.8 adds the group to the node ids too late).

if os.environ.get("PYTEST_XDIST_WORKER"):   # a worker starts with COLUMNS=80 LINES=24: rich's console (imported later)
    for k in ("COLUMNS", "LINES"): os.environ.pop(k, None)   # would keep 80 columns, whatever COLUMNS a test sets

LONGEST_FIRST = ["test_pipeline.py", "test_shared_tracking.py", "test_monitor.py", "test_secrets.py",   # measured:
                 "test_interactive.py", "test_weekly.py", "test_registry_steps.py", "test_service.py",  # the files
                 "test_dask_cluster.py", "test_release.py"]                                            # taking longest

def pytest_collection_modifyitems(config, items):
    """The files start longest first (`LONGEST_FIRST`), so that no worker is left alone with a long one at the end;
    the others, and the tests within each file, keep their order (`--no-loadscope-reorder`)."""
    files: dict[str, list] = {}
    for item in items: files.setdefault(item.path.name, []).append(item)
    rank = lambda name: LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items[:] = [t for name in sorted(files, key=rank) for t in files[name]]   # sorted() is stable

# ---------------------------------------------------------------------------------------------------------------------
# workspaces and the command line

@dataclass
class Workspace:
    "A CD4ML_HOME of its own: datasets, cache, runs, the Bento store and the default MLflow store (`mlflow.db`)."
    home: Path

    @property
    def env(self) -> dict:
        "This process's environment for a `cd4ml` subprocess on this workspace (its default store: no MLFLOW_TRACKING_URI)."
        return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "CD4ML_HOME": str(self.home)}

    @property
    def uri(self) -> str: return f"sqlite:///{self.home/'mlflow.db'}"

    def client(self):
        import mlflow
        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    @contextmanager
    def in_process(self):
        """This process on the workspace too: CD4ML_HOME (which the kernels papermill starts here inherit) and MLflow's
        tracking and registry URIs (for `mlflow.get_run`, ...). Restored after, to the workspace it was on before."""
        import mlflow
        saved = {k: os.environ.get(k) for k in ("CD4ML_HOME", "MLFLOW_TRACKING_URI")}
        os.environ.pop("MLFLOW_TRACKING_URI", None); os.environ["CD4ML_HOME"] = str(self.home)
        mlflow.set_tracking_uri(self.uri); mlflow.set_registry_uri(self.uri)
        _in_process.append(self)
        try: yield self
        finally:
            _in_process.pop()
            outer = _in_process[-1].uri if _in_process else ""
            mlflow.set_tracking_uri(outer); mlflow.set_registry_uri(outer)
            for k, v in saved.items():
                if v is None: os.environ.pop(k, None)
                else: os.environ[k] = v

_in_process: list[Workspace] = []       # the workspaces this process is on (`Workspace.in_process`), the innermost last

@pytest.fixture(scope="session")
def new_workspace(tmp_path_factory):
    "`new_workspace(name)`: a fresh `Workspace` in a new temp folder named after `name`."
    return lambda name: Workspace(tmp_path_factory.mktemp(name)/"cd4ml-home")

@pytest.fixture
def workspace(tmp_path, monkeypatch):
    "A fresh CD4ML_HOME for one test, this process on it, with the default SQLite MLflow store inside it; its path."
    home = tmp_path/"cd4ml-home"
    monkeypatch.setenv("CD4ML_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home

@dataclass
class Ran:
    "What a `cd4ml` command did."
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self):
        "The `--json` output, parsed (None when nothing was printed)."
        return json.loads(self.stdout) if self.stdout.strip() else None

    @property
    def message(self) -> str:
        "stderr on one line: the console wraps long messages at the terminal's width."
        return " ".join(self.stderr.split())

class Cli:
    """The installed `cd4ml` entry point in a subprocess, as a user runs it: in the workspace `env` names
    (`Workspace.env`), from the project folder (its pipeline.yaml and bentofile.yaml) unless `cwd` says otherwise."""
    def __call__(self, env: dict, *args, cwd: Path = ROOT, timeout: float = 900) -> Ran:
        r = subprocess.run([CD4ML, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return Ran(r.returncode, r.stdout, r.stderr)

    def json(self, env: dict, *args, **kw):
        "The command with `--json`; it must exit 0; its parsed output."
        r = self(env, *args, "--json", **kw)
        assert r.returncode == 0, r.stderr[-4000:]
        return r.json

@pytest.fixture(scope="session")
def cli():
    "`cli(env, *args)` → `Ran`; `cli.json(env, *args)` → the parsed `--json` output of a command that must succeed."
    return Cli()

def copy_project(dest: Path, registry_steps: bool) -> Path:
    (dest/"nbs").mkdir(parents=True)
    shutil.copytree(ROOT/"nbs"/"steps", dest/"nbs"/"steps")
    spec = yaml.safe_load((ROOT/"pipeline.yaml").read_text())
    if not registry_steps: spec["steps"] = [s for s in spec["steps"] if s.get("cache", True)]
    (dest/"pipeline.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest/"pipeline.yaml"

@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """`tiny_project(dest=None, registry_steps=False)`: a copy of the project's pipeline.yaml and step notebooks in folder
    `dest` (default: a new temp folder), to edit, or to run on tiny data; the spec's path. Same content, other folder:
    `cd4ml run` finds its steps cached. Without `registry_steps` the spec ends at evaluate: gate, register and release
    (`cache: false`) read and write the registry and would make every run depend on its state (they are tested with
    the project's own spec)."""
    def copy(dest: Path | None = None, registry_steps: bool = False) -> Path:
        return copy_project(dest or tmp_path_factory.mktemp("project"), registry_steps)
    return copy

# ---------------------------------------------------------------------------------------------------------------------
# shared pipeline runs

def installed() -> set[str]:
    "`name==version` of every installed distribution, installers included."
    return {f"{d.metadata['Name']}=={d.version}" for d in distributions()}

@pytest.fixture(scope="session")
def default_run(new_workspace, cli):
    """The default pipeline run once, exactly as `make pipeline` runs it: `cd4ml run --json` in the project folder
    with its pipeline.yaml and no overrides (full default data, five candidates, the release step building, serving,
    smoke-, parity- and load-testing the Bento and promoting it), in a fresh CD4ML_HOME. About 35-50 s.

    Returns `result` (the `--json` summary), `env` (for more CLI calls in that workspace), `home`, `client` (an
    MlflowClient on its store), and the installed distributions `installed_before` and `installed_after` it.
    The workspace is shared by every test that uses it (test_pipeline.py, test_release.py): later runs there may add
    cache entries, MLflow runs and registered versions that are not promoted, but must not change what the default
    pipeline computes, nor the champion."""
    ws = new_workspace("default-run")
    before = installed()
    result = cli.json(ws.env, "run", timeout=1200)
    return SimpleNamespace(result=result, env=ws.env, home=ws.home, client=ws.client(), installed_before=before,
                           installed_after=installed())

def order_lines(seed=0, shops=("north", "south", "east"), products=8, start="2016-01-04", weeks=78):
    "Order lines: each shop sells each product once every 2-4 weeks on a random weekday, now and then in two lines."
    import numpy as np, pandas as pd
    rng = np.random.default_rng(seed)
    rows = []
    for shop in shops:
        for p in range(products):
            every, level = 2 + p % 3, 1 + p % 3
            for week in range(int(rng.integers(every)), weeks, every):
                day = pd.Timestamp(start) + pd.Timedelta(days=7 * week + int(rng.integers(7)))
                promo = rng.random() < 0.3
                for _ in range(1 + int(rng.random() < 0.2)):
                    qty = rng.poisson(level * (2.0 if promo else 1.0)) + 1
                    rows.append((f"{day.date()} {rng.integers(8, 20):02d}:{rng.integers(60):02d}", shop, f"SKU-{p:02d}", qty, int(promo)))
    return pd.DataFrame(rows, columns=["when", "shop", "sku", "qty", "promo"])

ORDER_COLUMNS = ["--date-col", "when", "--store-col", "shop", "--item-col", "sku", "--sales-col", "qty", "--promo-col", "promo"]

@pytest.fixture(scope="session")
def first_run(new_workspace, cli):
    """A new user's first run: order lines of a few shops, where each product sells only every few weeks
    (`order_lines`), imported with `cd4ml data import` (the grid inferred: no `--freq`); then the default pipeline.yaml
    on them with the release step on, as `make pipeline` runs it, with `-p dataset=` (a version prefix) and two
    candidates. Shared by test_imported_orders.py (what the run did) and test_interactive.py (step notebooks bound to
    it, run by hand: they add runs and scratch outputs to the workspace, never registry changes).

    Returns `workspace`, `env`, `home`, `imported` (the import's `--json` output), `args` (the run's arguments after
    `run`, to rerun it) and `ran` (the run's `Ran`, `--json`)."""
    ws = new_workspace("first-run")
    csv = ws.home.parent/"orders.csv"
    order_lines().to_csv(csv, index=False)
    imported = cli.json(ws.env, "data", "import", csv, *ORDER_COLUMNS)
    args = ["-p", f"dataset={imported['version'][:9]}", "-p", "models=moving_average,ridge", "-p", "n_train=4", "-j", "1"]
    return SimpleNamespace(workspace=ws, env=ws.env, home=ws.home, imported=imported, args=args,
                           ran=cli(ws.env, "run", *args, "--json"))

# ---------------------------------------------------------------------------------------------------------------------
# serving: a small registry and `cd4ml serve` on it

def hand_made_tables(stores=4, items=30, days=120, seed=0) -> dict:
    "Hand-made sales with a weekly cycle, promotions and item levels; zero-sale rows absent, as in Favorita."
    import numpy as np, pandas as pd
    rng = np.random.default_rng(seed)
    dates = pd.date_range("2017-01-01", periods=days, freq="D")
    g = pd.MultiIndex.from_product([dates, range(1, stores + 1), range(100, 100 + items)],
                                   names=["date", "store_nbr", "item_nbr"]).to_frame(index=False)
    level = rng.gamma(2.0, 2.0, size=items)[g.item_nbr - 100] * (1 + 0.2 * (g.store_nbr % 3))
    g["onpromotion"] = rng.random(len(g)) < 0.1
    weekly = 1 + 0.3 * (g.date.dt.day_of_week >= 5)
    g["unit_sales"] = rng.poisson(level * weekly * np.where(g.onpromotion, 1.6, 1.0)).astype(float)
    families = ["GROCERY I", "DAIRY", "BREAD/BAKERY", "BEVERAGES", "PRODUCE"]
    return {"sales": g[g.unit_sales > 0],
            "items": pd.DataFrame({"item_nbr": range(100, 100 + items), "family": [families[i % 5] for i in range(items)],
                                   "class": [1000 + i % 7 for i in range(items)], "perishable": [i % 2 for i in range(items)]}),
            "stores": pd.DataFrame({"store_nbr": range(1, stores + 1), "city": ["Quito", "Guayaquil", "Cuenca", "Loja"][:stores],
                                    "state": ["Pichincha", "Guayas", "Azuay", "Loja"][:stores], "type": ["A", "B", "C", "D"][:stores],
                                    "cluster": range(1, stores + 1)}),
            "holidays": pd.DataFrame({"date": [dates[-20], dates[-3]], "type": ["Holiday", "Holiday"], "locale": ["National", "Local"],
                                      "locale_name": ["Ecuador", "Quito"], "description": ["a", "b"], "transferred": [False, False]}),
            "oil": pd.DataFrame({"date": dates, "dcoilwtico": 50 + rng.normal(0, 0.5, days)}),
            "transactions": g[g.unit_sales > 0].groupby(["date", "store_nbr"], as_index=False).unit_sales.sum()
                              .rename(columns={"unit_sales": "transactions"})}

@pytest.fixture(scope="session")
def simulated_tables():
    "`simulated_tables(stores=4, items=30, days=120, seed=0)`: hand-made tables like those `served_registry` trains on."
    return hand_made_tables

def build_registry(home: Path) -> dict:
    """Dataset + two ridge models (16 days ahead) registered as `sales` v1 (champion, with forecast intervals) and v2
    (challenger, without), in CD4ML_HOME=`home`
    (this process must be on it). Returns the dataset and both fitted models, for offline comparisons."""
    import mlflow, mlflow.sklearn, pandas as pd
    from cd4ml import features, models
    from cd4ml.datasets import save_dataset
    from cd4ml.intervals import INTERVALS_TAG, calibrate
    ds = save_dataset(hand_made_tables(), source="tests simulated")
    end = pd.Timestamp(ds.meta["end"])
    frame = features.training_frame(ds, [end - pd.Timedelta(days=d) for d in (16, 30, 44, 58)], 16)
    fitted = {}
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("serving-tests", artifact_location=(home/"artifacts").as_uri())  # not ./mlruns
    for version, alpha, alias in (("1", 1.0, "champion"), ("2", 300.0, "challenger")):
        model = models.fit(models.make_model("ridge", {"alpha": alpha}), frame)
        with mlflow.start_run(experiment_id=experiment):
            mlflow.set_tags({"dataset_version": ds.version, "git_sha": "test"})
            mlflow.sklearn.log_model(model, name="model", registered_model_name="sales",
                                     pip_requirements=["scikit-learn", "numpy", "pandas"])
        client.set_model_version_tag("sales", version, "dataset_version", ds.version)
        for tag, value in (("horizon", "16"), ("freq", "D")): client.set_model_version_tag("sales", version, tag, value)   # as trained
        if version == "1":   # v1 registered with forecast intervals (as the register step does), v2 without
            valid = features.training_frame(ds, [end - pd.Timedelta(days=16)], 16)
            client.set_model_version_tag("sales", version, INTERVALS_TAG,
                                         json.dumps(calibrate(valid.unit_sales, models.predict(model, valid))))
        client.set_registered_model_alias("sales", alias, version)
        fitted[version] = model
    return {"dataset": ds, "models": fitted}

API_TOKEN = SimpleNamespace(name="tests", token=secrets.token_urlsafe(32))
API_TOKEN.headers = {"Authorization": f"Bearer {API_TOKEN.token}"}

@pytest.fixture(scope="session")
def api_token():
    "The API token (`.name`, `.token`, `.headers`) of every server `serving` starts, unless its `env` says otherwise."
    return API_TOKEN

@contextmanager
def serving(home: Path, *args: str, env: dict | None = None, command=None, timeout: float = 120):
    """`cd4ml serve ARGS` (or `command(port)`) on a free loopback port, in workspace `home`; yields its base URL once
    /readyz answers 200; stops its whole process group."""
    port = _stores.free_port()
    log = open(home/f"server-{port}.log", "w+")
    full_env = {**Workspace(home).env, "CD4ML_API_TOKENS": f"{API_TOKEN.name}:{API_TOKEN.token}", **(env or {})}
    argv = command(port) if command else [CD4ML, "serve", "--port", str(port), *args]
    proc = subprocess.Popen(argv, env=full_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0); raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200: break
            except httpx.HTTPError: pass
            if time.time() > deadline:
                log.seek(0); raise RuntimeError(f"server not ready after {timeout}s:\n{log.read()[-3000:]}")
            time.sleep(0.3)
        yield base
    finally:
        try: os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError: pass
        try: proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(5)
        log.close()

@pytest.fixture(scope="session")
def running_server():
    "`with running_server(home, *serve_args, env=..., command=..., timeout=...) as base:` a forecast server (see `serving`)."
    return serving

@pytest.fixture(scope="session")
def served_registry(tmp_path_factory):
    """`with served_registry(home, env=..., prepare=..., args=...) as served:` a registry in `home` (see `build_registry`)
    and `cd4ml serve ARGS` on it with `env`; `served` holds `dataset`, `models`, `home`, `env` (for `cli`) and `base` (the
    server's URL). This process is on `home` meanwhile (CD4ML_HOME, MLflow). `prepare(facts)` may return more facts,
    before the server starts. The registry is built once per session and copied into each `home` (its store and
    datasets; the model files stay in the first, read-only): fitting and logging the models takes seconds."""
    built = {}
    @contextmanager
    def served(home: Path, env: dict | None = None, prepare=None, args: tuple = ()):
        from cd4ml.datasets import load_dataset
        if not built:
            first = tmp_path_factory.mktemp("registry")/"cd4ml-home"
            with Workspace(first).in_process(): built.update(build_registry(first), home=first)
        shutil.copytree(built["home"], home)
        with Workspace(home).in_process():
            facts = {"dataset": load_dataset(built["dataset"].version), "models": built["models"]}
            if prepare: facts.update(prepare(facts))
            with serving(home, *args, env=env) as base:
                yield {**facts, "home": home, "env": Workspace(home).env, "base": base}
    return served

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

@pytest.fixture(scope="module")
def browser(system_binary):
    "Debian's headless Chromium driven by playwright (never `playwright install`), one per test module."
    path = system_binary("chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()

@pytest.fixture
def web_page(browser):
    "`web_page(base)`: the service's page at `base` opened in `browser`; (page, the JavaScript errors it raises)."
    def open_page(base: str):
        page, errors = browser.new_page(), []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/")
        return page, errors
    return open_page

# ---------------------------------------------------------------------------------------------------------------------
# PostgreSQL

@pytest.fixture(scope="session")
def postgres(system_binary):
    """A throwaway PostgreSQL cluster (`_stores.pg_cluster`) for the whole session. `postgres.database(name)` creates
    an empty database and returns its SQLAlchemy URI (psycopg 3 driver)."""
    from sqlalchemy.engine import make_url
    with _stores.pg_cluster(system_binary("postgres")) as uri:
        def database(name: str) -> str:
            _stores.sql(uri, f"CREATE DATABASE {name}")
            return make_url(uri).set(database=name).render_as_string(hide_password=False)
        yield SimpleNamespace(database=database, port=make_url(uri).port)

"""Throwaway shared stores for the tests: a PostgreSQL cluster and `scripts/tracking-server` in front of it.

The cluster (Debian's package: initdb + postgres) lives in a temp dir on a free loopback port and is stopped by its
PID. PostgreSQL refuses to run as root, so as root (CI, our machines) it belongs to the `postgres` system user that the
Debian package creates (else `nobody`). With a superuser password every login needs a password (scram-sha-256), as in
a real deployment; without, the cluster trusts loopback connections.
"""
import os, pwd, shutil, signal, socket, subprocess, tempfile, time, urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_user() -> list[str]:
    "The command prefix that runs PostgreSQL's binaries as an unprivileged user when we are root."
    if os.getuid() != 0: return []
    for user in ("postgres", "nobody"):
        try: pwd.getpwnam(user)
        except KeyError: continue
        return ["runuser", "-u", user, "--"]
    pytest.fail("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL as")


def sql(uri: str, *statements: str) -> list[tuple]:
    "Run `statements` on the database at `uri` (autocommit) and return the last one's rows: PostgreSQL itself, not MLflow."
    import psycopg
    with psycopg.connect(uri.replace("+psycopg", ""), autocommit=True) as conn:
        for s in statements: cur = conn.execute(s)
        return cur.fetchall() if cur.description else []


@contextmanager
def pg_cluster(initdb: str,                # path of initdb (`system_binary('postgres')`)
               password: str | None = None # the superuser's password; None: trust loopback logins
              ):
    "A PostgreSQL cluster with an empty `mlflow` database; yields the superuser `cd4ml`'s URI of it (psycopg 3 driver)."
    import psycopg
    bindir = Path(initdb).parent
    root = Path(tempfile.mkdtemp(prefix="cd4ml-pg-"))         # not under pytest's tmp (mode 0700, owned by root)
    prefix = as_user()
    if prefix: shutil.chown(root, pwd.getpwnam(prefix[2]).pw_uid, pwd.getpwnam(prefix[2]).pw_gid)
    data, port = root/"data", free_port()
    auth = ["-A", "trust"]
    if password:
        (root/"pw").write_text(password)
        if prefix: shutil.chown(root/"pw", pwd.getpwnam(prefix[2]).pw_uid)
        auth = ["-A", "scram-sha-256", f"--pwfile={root/'pw'}"]
    subprocess.run([*prefix, bindir/"initdb", "-D", data, "-U", "cd4ml", *auth, "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)
    (root/"pw").unlink(missing_ok=True)
    log = open(root/"server.log", "w")
    server = subprocess.Popen([*prefix, bindir/"postgres", "-D", data, "-p", str(port), "-k", root,
                               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=100"],
                              stdout=log, stderr=subprocess.STDOUT)
    login = f"cd4ml:{password}@" if password else "cd4ml@"
    for _ in range(100):
        try:
            with psycopg.connect(f"postgresql://{login}127.0.0.1:{port}/postgres", autocommit=True) as conn:
                conn.execute("CREATE DATABASE mlflow")
            break
        except psycopg.OperationalError:
            if server.poll() is not None: pytest.fail(f"postgres exited: {(root/'server.log').read_text()}")
            time.sleep(0.1)
    else: pytest.fail(f"postgres did not accept connections: {(root/'server.log').read_text()}")
    try: yield f"postgresql+psycopg://{login}127.0.0.1:{port}/mlflow"
    finally:
        pid = int((data/"postmaster.pid").read_text().split()[0])   # the postmaster itself, not runuser
        os.kill(pid, signal.SIGINT)                                 # "fast" shutdown
        server.wait(timeout=60); log.close()
        shutil.rmtree(root)


@contextmanager
def tracking_server(env: dict, log: Path, *args: str):
    """`scripts/tracking-server` (make tracking-server) with `env` (+ PORT, a free one) and extra `mlflow server` args,
    its output in `log`; yields `(url, process)` once /health answers; its whole process group is stopped at the end."""
    port = free_port()
    with open(log, "w") as out:
        server = subprocess.Popen([ROOT/"scripts"/"tracking-server", *args], env={**env, "PORT": str(port)},
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(480):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200: break
            except OSError: time.sleep(0.25)
            assert server.poll() is None, Path(log).read_text()
        else: pytest.fail(f"the tracking server did not answer /health within 120 s: {Path(log).read_text()}")
        yield url, server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# Every secret of the accounts server, distinct and easy to grep for (test_secrets.py greps for each).
PASSWORDS = {"postgres": "pg-superuser-5b1e0f", "mlflow_server": "pg-store-90ad2c", "cd4ml_lock": "pg-lock-c3f7e1",
             "ci": "pg-direct-2d94b7", "admin": "admin-pw-71d2e8", "pipeline": "pipeline-pw-4a6c0b", "dashboard": "dashboard-pw-e85f13"}
CLIENT_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "CD4ML_LOCK_URI", "CD4ML_HOME")


def login(uri: str, user: str, database: str | None = None, driver: str = "postgresql+psycopg") -> str:
    "`uri` with `user` and its password from PASSWORDS (and `database`, `driver` if given)."
    from sqlalchemy.engine import make_url
    url = make_url(uri).set(drivername=driver, username=user, password=PASSWORDS[user], **({"database": database} if database else {}))
    return url.render_as_string(hide_password=False)


@contextmanager
def account(user: str | None):
    "MLflow calls in this process as `user` of the tracking server (None: no login); the environment is restored after."
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.pop("MLFLOW_TRACKING_USERNAME", None); os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
    if user: os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=PASSWORDS[user])
    try: yield
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v


@contextmanager
def accounts_server(initdb: str, tmp: Path):
    """The deployment deploy/README.md describes: a PostgreSQL cluster where every login needs a password, its `mlflow`
    database owned by role `mlflow_server`, a role `cd4ml_lock` that may only connect (CD4ML_LOCK_URI), and
    `CD4ML_AUTH=1 scripts/tracking-server` on it, where the admin has created the accounts `pipeline` and `dashboard`.
    Yields a namespace: url, superuser (URI), lock (URI), process, home (the server's CD4ML_HOME), log, artifacts."""
    from types import SimpleNamespace
    from mlflow.server import get_app_client
    with pg_cluster(initdb, PASSWORDS["postgres"]) as superuser:
        sql(superuser, f"CREATE ROLE mlflow_server LOGIN PASSWORD '{PASSWORDS['mlflow_server']}'",
            "ALTER DATABASE mlflow OWNER TO mlflow_server", f"CREATE ROLE cd4ml_lock LOGIN PASSWORD '{PASSWORDS['cd4ml_lock']}'")
        home, log, artifacts = tmp/"server-home", tmp/"server.log", tmp/"artifacts"
        env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS and not k.startswith("MLFLOW_")}
        env.update(CD4ML_HOME=str(home), CD4ML_DB_URI=login(superuser, "mlflow_server"), CD4ML_ARTIFACTS=str(artifacts),
                   CD4ML_AUTH="1", MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORDS["admin"])
        with tracking_server(env, log, "--workers", "2") as (url, process):
            with account("admin"):
                users = get_app_client("basic-auth", tracking_uri=url)
                for user in ("pipeline", "dashboard"): users.create_user(user, PASSWORDS[user])
            yield SimpleNamespace(url=url, superuser=superuser, lock=login(superuser, "cd4ml_lock", driver="postgresql"),
                                  process=process, home=home, log=log, artifacts=artifacts)


def client_env(server, home: Path, user: str | None, lock: bool = True) -> dict:
    "The environment of a `cd4ml` client of `server`: its own CD4ML_HOME, logged in as `user`, with CD4ML_LOCK_URI."
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    env.update(CD4ML_HOME=str(home), MLFLOW_TRACKING_URI=server.url)
    if user: env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=PASSWORDS[user])
    if lock: env["CD4ML_LOCK_URI"] = server.lock
    return env

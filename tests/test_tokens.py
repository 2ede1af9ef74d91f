"""API tokens as a new user meets them: `cd4ml serve --protect-predict` with no token configured creates a token file
in the workspace (0600), says where it is without showing the token, and then every read but the page, its files and
the probes needs that token too."""
import stat

import httpx
import pytest

from cd4ml.tokens import read_token_file

ROW = {"date": "2017-05-03", "store_nbr": 1, "item_nbr": 100, "onpromotion": False}

@pytest.fixture(scope="module")
def protected(served_registry, tmp_path_factory):
    home = tmp_path_factory.mktemp("tokens")/"cd4ml-home"
    with served_registry(home, env={"CD4ML_API_TOKENS": ""}, args=("--protect-predict",)) as served: yield served

def test_serve_creates_a_private_token_file_and_names_it(protected):
    path = protected["home"]/"api-tokens"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    [token] = read_token_file(path).values()
    [log] = protected["home"].glob("server-*.log")
    text = log.read_text()
    assert f"API tokens created in {path}" in text and token not in text

def test_protect_predict_puts_reads_behind_the_token(protected):
    base = protected["base"]
    token = read_token_file(protected["home"]/"api-tokens")["local"]
    auth = {"Authorization": f"Bearer {token}"}
    for method, path, body in (("POST", "/predict", {"rows": [ROW]}), ("GET", "/history?store_nbr=1&item_nbr=100", None),
                               ("GET", "/info", None), ("GET", "/catalog", None)):
        bare = httpx.request(method, f"{base}{path}", json=body, timeout=30)
        assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Bearer"), (path, bare.text)
        assert httpx.request(method, f"{base}{path}", json=body, headers={"Authorization": "Bearer " + "x" * 40}, timeout=30).status_code == 403
        assert httpx.request(method, f"{base}{path}", json=body, headers=auth, timeout=30).status_code == 200, path
    assert httpx.get(f"{base}/info", headers=auth, timeout=30).json()["config"]["protect_predict"] is True
    for path in ("/", "/static/app.js", "/livez", "/readyz", "/metrics", "/docs.json"):      # open: the page, probes, metrics
        assert httpx.get(f"{base}{path}", timeout=30).status_code == 200, path

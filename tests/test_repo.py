"""Repository contracts: workflows are valid GitHub Actions, the Makefile has the targets the README promises, float sums
are compared with a tolerance, modules stay small, each fact has one source, and the pipeline runner depends on
no domain module."""
import ast, json, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT/".github"/"workflows").glob("*.yml"))

def check_jsonschema(*args):
    exe = Path(sys.executable).parent/"check-jsonschema"
    return subprocess.run([str(exe), *args], capture_output=True, text=True)

def test_there_are_workflows():
    assert {"ci.yml", "pipeline.yml"} <= {p.name for p in WORKFLOWS}

@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_valid(workflow):
    r = check_jsonschema("--builtin-schema", "vendor.github-workflows", str(workflow))
    assert r.returncode == 0, r.stdout + r.stderr

def test_checker_rejects_a_broken_workflow(tmp_path):
    bad = tmp_path/"bad.yml"
    bad.write_text("name: x\non: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - uses: 12\n        bogus: true\n")
    assert check_jsonschema("--builtin-schema", "vendor.github-workflows", str(bad)).returncode != 0

def test_ci_runs_the_two_commands():
    ci = (ROOT/".ci"/"run").read_text()
    assert "make system-deps" in ci and "make test" in ci
    assert "bash .ci/run" in (ROOT/".github"/"workflows"/"ci.yml").read_text()

def test_readme_states_the_two_commands():
    readme = (ROOT/"README.md").read_text()
    head = readme[:1500]
    assert "make pipeline" in head and "make test" in head

def test_makefile_targets():
    targets = set(re.findall(r"^([a-z-]+):", (ROOT/"Makefile").read_text(), re.M))
    assert {"install", "system-deps", "pipeline", "test", "lab", "ui", "export", "clean-nbs", "bench"} <= targets

def test_make_test_prints_the_slowest_tests():
    recipes = subprocess.run(["make", "-n", "nbtest", "pytest"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    assert "nbdev_test" in recipes and "--timing" in recipes          # each notebook's time, slowest first
    assert re.search(r"pytest tests .*--durations=\d+", recipes)      # the slowest pytest tests

def test_make_test_runs_pytest_on_two_processes():
    recipe = subprocess.run(["make", "-n", "pytest"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert re.search(r"pytest tests -n 2 --dist loadfile ", recipe)       # each file whole on one worker
    assert "pytest-xdist" in (ROOT/"settings.ini").read_text()

class Collected:
    "What `pytest_collection_modifyitems` reads of a collected test: its file."
    def __init__(self, file, name): self.path, self.name = Path(file), name

def test_the_longest_files_start_first():
    from conftest import pytest_collection_modifyitems
    items = [Collected("test_a.py", "1"), Collected("test_secrets.py", "1"), Collected("test_a.py", "2"),
             Collected("test_pipeline.py", "1"), Collected("test_b.py", "1"), Collected("test_pipeline.py", "2")]
    pytest_collection_modifyitems(None, items)
    assert [(i.path.name, i.name) for i in items] == [("test_pipeline.py", "1"), ("test_pipeline.py", "2"),
        ("test_secrets.py", "1"), ("test_a.py", "1"), ("test_a.py", "2"), ("test_b.py", "1")]

FLOAT_REDUCTION = re.compile(r"\.(sum|mean)\(")

def eq_call_arguments(code: str):
    "The argument text of each `test_eq(...)` call in `code`, up to its matching parenthesis."
    for m in re.finditer(r"\btest_eq\(", code):
        depth, i = 1, m.end()
        while depth and i < len(code):
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        yield code[m.end():i - 1]

def float_sums_compared_exactly(code: str) -> list[str]:
    "`test_eq` calls comparing a sum or mean: float sums differ in the last bits between CPUs; use test_close."
    return [f"test_eq({args})" for args in eq_call_arguments(code) if FLOAT_REDUCTION.search(args)]

def test_the_float_lint_catches_a_sum_compared_exactly():
    assert float_sums_compared_exactly("x = 1\ntest_eq(np.nan_to_num(h.y[0]).sum(), h.y[0, cols].sum())  # note\n") \
        == ["test_eq(np.nan_to_num(h.y[0]).sum(), h.y[0, cols].sum())"]
    assert float_sums_compared_exactly("test_eq(len(f(a.mean())), 3); test_close(a.sum(), 1.0)") == ["test_eq(len(f(a.mean())), 3)"]
    assert float_sums_compared_exactly("test_eq(np.count_nonzero(a > 0), 4); test_close(a.mean(), 2.5)") == []

def code_of(path: Path) -> str:
    if path.suffix == ".py": return path.read_text()
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")

def test_no_float_sum_is_compared_exactly():
    sources = [*sorted((ROOT/"nbs").rglob("*.ipynb")), *sorted(p for p in (ROOT/"tests").glob("*.py") if p.name != Path(__file__).name)]
    found = {str(p.relative_to(ROOT)): hits for p in sources if (hits := float_sums_compared_exactly(code_of(p)))}
    assert not found, f"compare float sums with test_close(a, b, eps=...) or np.testing.assert_allclose, not test_eq: {found}"


# One concept per module: a module above this many lines holds several; split its notebook.
MAX_MODULE_LINES = 400

def module_lines() -> dict:
    "Line count of each module of the cd4ml package (without nbdev's generated index)."
    return {p.stem: len(p.read_text().splitlines()) for p in (ROOT/"cd4ml").glob("*.py") if p.name != "_modidx.py"}

def test_no_module_is_too_long():
    long = {m: n for m, n in module_lines().items() if n > MAX_MODULE_LINES}
    assert not long, f"modules above {MAX_MODULE_LINES} lines (split each notebook into its concepts): {long}"


# One source per fact: the sales table's name and the registered model's name are each defined once, as a named
# constant that every module uses; no module sets the forecast horizon: it is read from the registered version.
def grep_cd4ml(pattern: str) -> list[str]:
    "`grep -n` over the package's modules: lines `cd4ml/file.py:line:text`."
    out = subprocess.run(["grep", "-rn", "--include=*.py", "--exclude=_modidx.py", "-e", pattern, "cd4ml/"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    return out.stdout.splitlines()

def sales_definitions(lines: list[str]) -> tuple[dict, list]:
    "Constants defined as `\"sales\"` (name → lines), and the lines using the literal otherwise."
    defs, others = {}, []
    for line in lines:
        text = line.split(":", 2)[2]
        if m := re.fullmatch(r'([A-Z_]+) = "sales"(\s*#.*)?', text): defs.setdefault(m[1], []).append(line)
        elif "_rng(" not in text: others.append(line)   # generator keys name the draws, not the table or the model
    return defs, others

def horizon_settings(lines: list[str]) -> list[str]:
    "Lines giving `max_horizon` a number."
    return [l for l in lines if re.search(r"max_horizon\s*(:[^=#]*)?=\s*\d", l.split(":", 2)[2])]

def test_the_fact_checks_catch_a_second_source():
    defs, others = sales_definitions(['a.py:1:SALES = "sales"   # the table', 'b.py:2:MODEL_NAME = "sales"',
                                      'c.py:3:MODEL_NAME = "sales"', 'd.py:4:    t = tables["sales"]',
                                      'e.py:5:    rng = _rng(seed, "sales", 3)'])
    assert {k: len(v) for k, v in defs.items()} == {"SALES": 1, "MODEL_NAME": 2}
    assert others == ['d.py:4:    t = tables["sales"]']
    assert horizon_settings(["a.py:1:    max_horizon: int = 16,", "b.py:2:f(max_horizon=7)",
                             "c.py:3:    max_horizon: int | None = None", "d.py:4:if self.max_horizon < 1:"]) \
        == ["a.py:1:    max_horizon: int = 16,", "b.py:2:f(max_horizon=7)"]

def test_one_source_per_fact():
    defs, others = sales_definitions(grep_cd4ml('"sales"'))
    assert not others, f'name the table `datasets.SALES` and the model `registry.MODEL_NAME`, not "sales": {others}'
    assert {k: len(v) for k, v in defs.items()} == {"SALES": 1, "MODEL_NAME": 1}, defs
    assert not horizon_settings(grep_cd4ml("max_horizon")), "the horizon comes from the registered version"

# The runner (spec in, executed notebooks and cache entries out) knows nothing of the forecasting domain: the domain
# plugs in through hooks (cd4ml.runs) and named functions (cd4ml.spec.CONFIG_BLOCKS, PARAM_CHECKS).
RUNNER = ("pipeline", "stepcache", "kernels")
DOMAIN = {"gates", "release", "monitor", "scale", "datasets"}

def cd4ml_imports(code: str) -> set:
    "The cd4ml modules `code` imports, at the top or inside a function: `from cd4ml.x`, `from .x`, `from cd4ml import x`."
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import): names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cd4ml.")}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if not node.level and module.split(".")[0] != "cd4ml": continue
            base = module if node.level else module.partition(".")[2]
            names |= {base.split(".")[0]} if base else {a.name for a in node.names}
    return {n for n in names if (ROOT/"cd4ml"/f"{n}.py").exists()}

def reached(module: str) -> dict:
    "Every cd4ml module `module` imports directly or through others: module → the module importing it first."
    via, todo = {module: None}, [module]
    while todo:
        m = todo.pop()
        for n in sorted(cd4ml_imports((ROOT/"cd4ml"/f"{m}.py").read_text()) - set(via)):
            via[n] = m
            todo.append(n)
    return via

def test_imports_are_found():
    assert cd4ml_imports("import cd4ml.gates\nfrom .core import x\nfrom cd4ml import scale, nope\n"
                         "def f():\n    from cd4ml.release import y\nimport pandas\nfrom . import monitor") \
        == {"gates", "core", "scale", "release", "monitor"}

@pytest.mark.parametrize("module", RUNNER)
def test_the_runner_imports_no_domain_module(module):
    via = reached(module)
    bad = {m: via[m] for m in DOMAIN & set(via)}
    assert not bad, f"cd4ml.{module} reaches domain modules (module: imported by): {bad}"

def notebook_numbers() -> dict:
    "Module name → the number of the notebook it is exported from (`nbs/NN_name.ipynb`, `#| default_exp name`)."
    numbers = {}
    for nb in sorted((ROOT/"nbs").glob("[0-9][0-9]_*.ipynb")):
        exp = re.search(r"#\|\s*default_exp\s+([\w.]+)", nb.read_text())
        if exp: numbers[exp.group(1)] = int(nb.name[:2])
    return numbers

def imports_of_later(numbers: dict, imports: dict) -> list:
    "(module, imported) pairs where a module imports one from a notebook numbered after its own."
    return sorted((m, n) for m, names in imports.items() for n in names if numbers.get(n, -1) > numbers[m])

def test_the_numbering_check_catches_a_later_import():
    assert imports_of_later({"core": 0, "gates": 19, "runs": 25}, {"runs": {"gates", "core"}, "core": set()}) == []
    assert imports_of_later({"core": 0, "gates": 30, "runs": 25}, {"runs": {"gates"}}) == [("runs", "gates")]

def test_notebooks_are_numbered_by_dependency():
    numbers = notebook_numbers()
    imports = {m: cd4ml_imports((ROOT/"cd4ml"/f"{m}.py").read_text()) for m in numbers}
    assert imports_of_later(numbers, imports) == [], "a module imports one from a later notebook: renumber"

"Repository contracts: workflows are valid GitHub Actions, the Makefile has the targets the README promises."
import re, subprocess, sys
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

"""The Kubernetes manifests in deploy/k8s/, checked offline: every document against the Kubernetes JSON schemas that
`kubernetes-validate` ships (strict: unknown fields are errors), and against each other and the Bento (selectors,
ports, probes, scale target). Broken manifests must be rejected, so the validation itself is tested too.
Nothing here talks to a cluster."""
import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError, latest_version

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT/"deploy"/"k8s").glob("*.yaml"))
VERSIONS = ["1.30", latest_version()]          # an older cluster still in support, and the newest schemas we have


def all_documents() -> list[dict]:
    "Every YAML document in deploy/k8s/."
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


def documents() -> dict[str, dict]:
    "kind → manifest, over every YAML document in deploy/k8s/ but the Secrets (`secrets()`)."
    docs = [d for d in all_documents() if d["kind"] != "Secret"]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def secrets() -> dict[str, dict]:
    "name → Secret."
    return {d["metadata"]["name"]: d for d in all_documents() if d["kind"] == "Secret"}


def validate(doc: dict, version: str):
    return kubernetes_validate.validate(doc, version, strict=True)


def test_the_manifests_are_there():
    assert {p.name for p in MANIFESTS} >= {"deployment.yaml", "service.yaml", "hpa.yaml"}
    assert set(documents()) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert set(secrets()) == {"cd4ml-api-tokens", "cd4ml-serving-db"}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_matches_the_kubernetes_schema(version):
    for doc in all_documents():
        assert validate(doc, version) == ".".join(version.split(".")[:2]), doc["metadata"]["name"]


def container(deployment: dict) -> dict:
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_the_manifests_fit_together_and_fit_the_bento():
    docs = documents()
    dep, svc, hpa, pdb = (docs[k] for k in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"))
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for selector in (dep["spec"]["selector"]["matchLabels"], svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector and selector.items() <= pod_labels.items(), selector
    c = container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 3000}                                          # where `bentoml serve` listens
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    assert (c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]) == ("/readyz", "/livez")
    assert c["readinessProbe"]["httpGet"]["port"] == c["livenessProbe"]["httpGet"]["port"] == "http"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": dep["apiVersion"], "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu" and c["resources"]["requests"]["cpu"]   # Utilization needs a request
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]   # drains never block forever
    env = {e["name"]: e for e in c["env"]}
    for name in ("CD4ML_API_TOKENS", "CD4ML_DB_URI"):                          # the tokens and the database: Secrets
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets()[ref["name"]]["stringData"], name
    secret, ref = secrets()["cd4ml-api-tokens"], env["CD4ML_API_TOKENS"]["valueFrom"]["secretKeyRef"]
    from cd4ml.logstore import DbStore
    db_uri = secrets()["cd4ml-serving-db"]["stringData"]["CD4ML_DB_URI"]
    assert DbStore(db_uri, env["CD4ML_DB_SCHEMA"]["value"]).describe() == \
        "postgresql://cd4ml_serving:***@db.internal:5432/cd4ml (schema cd4ml_serving)"   # a URI the service takes
    from cd4ml.core import Cd4mlError
    from cd4ml.tokens import parse_tokens
    with pytest.raises(Cd4mlError, match="at least 16"):                        # the placeholder cannot serve
        parse_tokens(secret["stringData"][ref["key"]])
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    bento_env = {e["name"]: e["value"] for e in yaml.safe_load((ROOT/"bentofile.yaml").read_text())["envs"]}
    assert bento_env.items() <= env.items()                                 # the same settings the Bento image bakes in
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0  # a rollout never drops below the ready pods


def break_port(d): container(d)["ports"][0]["containerPort"] = "3000"          # a string, not an integer
def misspell_probe(d): container(d)["readinesProbe"] = container(d).pop("readinessProbe")
def drop_selector(d): del d["spec"]["selector"]                               # required in apps/v1
def v1_hpa_field(d): d["spec"]["targetCPUUtilizationPercentage"] = 70          # autoscaling/v1 spelling in a v2 object
def bad_hpa_metric(d): d["spec"]["metrics"][0]["resource"]["target"]["type"] = 70   # must be a string


@pytest.mark.parametrize("kind,breakage,message", [
    ("Deployment", break_port, "'3000' is not of type 'integer'"),
    ("Deployment", misspell_probe, "'readinesProbe' was unexpected"),
    ("Deployment", drop_selector, "'selector' is a required property"),
    ("HorizontalPodAutoscaler", v1_hpa_field, "'targetCPUUtilizationPercentage' was unexpected"),
    ("HorizontalPodAutoscaler", bad_hpa_metric, "70 is not of type 'string'"),
])
def test_a_broken_manifest_is_rejected(kind, breakage, message):
    doc = copy.deepcopy(documents()[kind])
    validate(doc, latest_version())                                          # intact, it passes
    breakage(doc)
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")): validate(doc, latest_version())

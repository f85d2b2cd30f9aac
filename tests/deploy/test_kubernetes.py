"""The Kubernetes example (docker/k8s/) is valid for its release (kubernetes-validate's
schemas, strict: no field the release does not know) and of the production shape: the API
ready on /readyz and alive on /healthz behind its Service; embeddings on a GPU; every queue
served; the migrations and the first zoo version as Jobs; settings from one ConfigMap and
one Secret; each pod's /data its own."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests.deploy.manifests import (
    KUBERNETES_VERSION,
    QUEUES,
    kubernetes_processes,
    manifests,
)

DOCS = manifests()


def _named(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name)


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_each_manifest_is_valid_for_the_release(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda c: c.update(replicas="two"), "'two' is not of type 'integer'"),
        (lambda c: c.update(replica=2), "'replica' was unexpected"),
        (
            lambda c: c["template"]["spec"]["containers"][0].update(commands=["x"]),
            "'commands' was unexpected",
        ),
    ],
)
def test_the_check_refuses_a_bad_manifest(change: Any, problem: str) -> None:
    bad = copy.deepcopy(_named("Deployment", "task2vec-api"))
    change(bad["spec"])
    with pytest.raises(kubernetes_validate.ValidationError, match=problem):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_the_api_is_probed_and_served() -> None:
    api = _named("Deployment", "task2vec-api")
    assert api["spec"]["replicas"] >= 2
    container = _container(api)
    port = container["ports"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert container["command"][-1] == str(port["containerPort"])
    service = _named("Service", "task2vec-api")
    assert service["spec"]["selector"] == api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    backend = _named("Ingress", "task2vec-api")["spec"]["rules"][0]["http"]["paths"][0]
    assert backend["backend"]["service"]["name"] == "task2vec-api"


def test_every_deployment_selects_its_own_pods() -> None:
    for doc in DOCS:
        if doc["kind"] == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()


def test_embeddings_run_on_a_gpu_and_every_queue_is_served() -> None:
    processes = {p.where: p for p in kubernetes_processes(DOCS)}
    served: set[str] = set()
    for doc in DOCS:
        if doc["kind"] != "Deployment":
            continue
        queues = processes[f"Deployment {doc['metadata']['name']}"].queues()
        served |= set(queues)
        gpus = _container(doc).get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        assert (gpus == 1) == ("embed" in queues), doc["metadata"]["name"]
        if "embed" in queues:
            assert queues == ["embed"]
    assert served == QUEUES


def test_the_one_shot_steps_are_jobs() -> None:
    for name, command in (
        ("task2vec-migrate", ["task2vec", "db", "upgrade"]),
        ("task2vec-zoo-init", ["task2vec", "zoo", "init"]),
    ):
        job = _named("Job", name)
        assert _container(job)["command"] == command
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_each_pod_has_its_own_data_directory_and_the_shared_settings() -> None:
    for doc in DOCS:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        spec = doc["spec"]["template"]["spec"]
        container = _container(doc)
        assert [m["mountPath"] for m in container["volumeMounts"]] == ["/data"]
        assert all("emptyDir" in v for v in spec["volumes"]), doc["metadata"]["name"]
        assert container["envFrom"] == [
            {"configMapRef": {"name": "task2vec"}},
            {"secretRef": {"name": "task2vec"}},
        ]
        assert spec["securityContext"]["runAsUser"] == 10001  # the image's user

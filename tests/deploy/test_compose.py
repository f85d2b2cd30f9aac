"""docker-compose.yml is a valid Compose file (the Compose Specification's schema, as
check-jsonschema ships it: no network) of the production shape: the database migrated and
the zoo imported once, before anything else; API replicas behind the proxy; embeddings on a
reserved GPU; every queue served; and no data volume shared between processes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from check_jsonschema import main as check_jsonschema  # type: ignore[import-untyped]
from click.testing import CliRunner

from tests.deploy.manifests import COMPOSE, QUEUES, ROOT, compose, compose_processes, is_app_image

SPEC = compose()
SERVICES: dict[str, Any] = SPEC["services"]
APP = {name for name, s in SERVICES.items() if is_app_image(s.get("image"))}
ONE_SHOT = {"migrate": ["task2vec", "db", "upgrade"], "zoo-init": ["task2vec", "zoo", "init"]}


def schema_errors(path: Path) -> str:
    """check-jsonschema's report on the file against the Compose Specification it vendors
    (empty when valid)."""
    done = CliRunner().invoke(
        check_jsonschema, ["--builtin-schema", "vendor.compose-spec", str(path)]
    )
    return "" if done.exit_code == 0 else done.output


def test_the_file_follows_the_compose_specification() -> None:
    assert schema_errors(COMPOSE) == ""


@pytest.mark.parametrize(
    ("fragment", "problem"),
    [
        ({"image": "x", "healthchek": {"test": ["CMD", "true"]}}, "'healthchek' was unexpected"),
        (
            {"image": "x", "depends_on": {"migrate": {"condition": "service_completed"}}},
            "'service_completed' is not one of",
        ),
        (
            {"image": "x", "deploy": {"resources": {"reservations": {"devices": [
                {"driver": "nvidia", "count": 1, "capabilities": "gpu"}
            ]}}}},
            "'gpu' is not of type 'array'",
        ),
    ],
)  # fmt: skip
def test_the_schema_check_refuses_a_bad_service(
    fragment: dict[str, Any], problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "compose.yml"
    path.write_text(yaml.safe_dump({"services": {"api": fragment}}))
    assert problem in schema_errors(path)


def _needs(name: str) -> dict[str, str]:
    """Every service ``name`` waits for, directly or through others, with its condition."""
    found: dict[str, str] = {}
    for dep, how in (SERVICES[name].get("depends_on") or {}).items():
        found[dep] = how["condition"]
        found.update({k: v for k, v in _needs(dep).items() if k not in found})
    return found


def test_every_process_waits_for_the_migrations_and_the_zoo() -> None:
    for name, command in ONE_SHOT.items():
        assert SERVICES[name]["command"] == command
        assert SERVICES[name]["restart"] == "no"
    assert _needs("zoo-init")["migrate"] == "service_completed_successfully"
    for name in APP - set(ONE_SHOT):
        needs = _needs(name)
        for one_shot in ONE_SHOT:
            assert needs.get(one_shot) == "service_completed_successfully", (name, needs)
    assert not any("build" in s for s in SERVICES["zoo-init"]["command"])  # imported, not built


def test_the_api_has_replicas_behind_the_proxy_and_a_health_check() -> None:
    api = SERVICES["api"]
    assert api["deploy"]["replicas"] >= 2
    assert "ports" not in api  # reached through the proxy only
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    proxy = SERVICES["proxy"]
    mounted = proxy["volumes"][0].split(":")
    config = (ROOT / mounted[0]).read_text()
    assert mounted[1] == "/etc/nginx/nginx.conf"
    assert re.search(r"^\s*server api:8000 resolve;", config, re.M)
    assert re.search(r"^\s*proxy_pass http://task2vec_api;", config, re.M)
    listen = re.search(r"^\s*listen (\d+);", config, re.M)
    assert listen is not None
    assert proxy["ports"] == [f"8000:{listen.group(1)}"]
    assert _needs("proxy")["api"] == "service_healthy"


def _gpus(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in reservations.get("devices", []) if "gpu" in d.get("capabilities", [])]


def test_embeddings_run_on_a_reserved_gpu_and_every_queue_is_served() -> None:
    workers = {p.where.split()[-1]: p.queues() for p in compose_processes(SPEC) if p.queues()}
    assert set().union(*map(set, workers.values())) == QUEUES
    for name, queues in workers.items():
        gpus = _gpus(SERVICES[name])
        if "embed" in queues:
            assert queues == ["embed"], (name, queues)
            assert gpus == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
        else:
            assert gpus == [], name


def test_processes_share_no_data_volume() -> None:
    """Each process's /data is its own cache (the image's anonymous volume); what processes
    share goes through the object store."""
    for name in APP:
        mounts = SERVICES[name].get("volumes", [])
        assert not mounts, f"{name} mounts {mounts}: share through the object store instead"
        assert SERVICES[name]["environment"]["T2V_STORAGE_URL"].startswith("s3://")
    shared = [n for n, s in SERVICES.items() if n not in APP for v in s.get("volumes", [])]
    assert sorted(shared) == ["postgres", "proxy", "store"]
    bucket = SERVICES["bucket"]
    assert "create-bucket --bucket task2vec" in bucket["command"][0]
    assert SPEC["x-settings"]["T2V_STORAGE_URL"].startswith("s3://task2vec/")
    assert _needs("zoo-init")["bucket"] == "service_completed_successfully"

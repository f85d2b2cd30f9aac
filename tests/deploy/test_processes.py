"""What docker-compose.yml and the Kubernetes example start is what the service has: every
command a real ``task2vec`` command with real options (parsed as the command line parses
them), every worker's queue a queue jobs are sent to, every ``T2V_`` variable a setting, and
every process's settings valid as the service reads them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.deploy.manifests import (
    QUEUES,
    Launch,
    RefusedCommandError,
    compose,
    compose_processes,
    kubernetes_processes,
    manifests,
    parse,
    settings_of,
    unknown_settings,
)

PROCESSES = [*compose_processes(compose()), *kubernetes_processes(manifests())]


def test_both_files_start_processes_of_the_image() -> None:
    places = {p.where.split()[0] for p in PROCESSES}
    assert places == {"compose", "Deployment", "Job"}, places
    assert len(PROCESSES) >= 12


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.where)
def test_each_command_is_a_command_of_task2vec(process: Launch) -> None:
    parse(process.command)
    unknown = sorted(set(process.queues()) - QUEUES)
    assert not unknown, f"{process.where} serves queues no job is sent to: {unknown}"


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        (["task2vec", "worker", "--queue", "embed"], "No such option"),
        (["task2vec", "zoo", "imprt"], "has no command 'imprt'"),
        (["task2vec", "serve", "--port", "http"], "Invalid value for '--port'"),
        (["task2vec", "zoo"], "needs a command"),
        (["celery", "worker"], "does not run task2vec"),
    ],
)
def test_the_check_refuses_a_command_task2vec_does_not_have(
    command: list[str], problem: str
) -> None:
    with pytest.raises(RefusedCommandError, match=problem):
        parse(command)


def test_the_check_finds_a_queue_no_job_is_sent_to() -> None:
    process = Launch("a worker", ["task2vec", "worker", "--queues", "embed,gpu"])
    assert sorted(set(process.queues()) - QUEUES) == ["gpu"]


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.where)
def test_each_variable_is_a_setting_and_each_value_valid(
    process: Launch, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not unknown_settings(process.env), f"{process.where}: no setting reads these"
    settings = settings_of(process.env, monkeypatch)
    # The production shape: state in PostgreSQL, jobs on Redis, files in the object store.
    assert settings.resolved_database_url().startswith("postgresql+psycopg://")
    assert settings.resolved_broker_url().startswith("redis://")
    assert settings.storage_url.startswith("s3://")
    assert settings.s3_endpoint_url.startswith("http")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(process.env)


def test_the_check_finds_an_unknown_variable_and_a_refused_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert unknown_settings({"T2V_ZOO": "starter", "T2V_STORAGE_BUCKET": "b", "HOME": "/"}) == [
        "T2V_STORAGE_BUCKET"
    ]
    with pytest.raises(ValidationError, match="device"):
        settings_of({"T2V_DEVICE": "gpu"}, monkeypatch)
    with pytest.raises(ValidationError, match="trusted_proxies"):
        settings_of({"T2V_TRUSTED_PROXIES": '["proxy.internal"]'}, monkeypatch)


def test_the_api_believes_only_its_proxy() -> None:
    spec = compose()
    proxy = spec["services"]["proxy"]["networks"]["default"]["ipv4_address"]
    api = next(p for p in compose_processes(spec) if p.where == "compose service api")
    assert api.env["T2V_TRUSTED_PROXIES"] == f'["{proxy}"]'
    subnet = spec["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert proxy.rsplit(".", 1)[0] == subnet.split("/")[0].rsplit(".", 1)[0]

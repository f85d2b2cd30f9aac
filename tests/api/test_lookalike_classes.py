"""Class names that look alike but are different text (a Cyrillic or Greek letter in place of
a Latin one, a full-width form) are two classes; the upload's answer warns about them, naming
the odd letters, and an upload without such names has no warning."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.task2vec.confusables import lookalike_warnings
from tests.helpers import png_bytes, random_images, write_zip


def _archive(path: Path, classes: list[str]) -> bytes:
    images = random_images(2 * len(classes), size=16, seed=5, channels=3)
    members = [(f"{classes[i % len(classes)]}/{i}.png", png_bytes(x)) for i, x in enumerate(images)]
    return write_zip(path, members).read_bytes()


def test_an_upload_with_lookalike_class_names_is_warned(
    client: TestClient, sent: list[str], tmp_path: Path
) -> None:
    body = _archive(tmp_path / "a.zip", ["cat", "\u0441at", "dog"])  # Cyrillic es
    answer = client.post("/v1/tasks", files={"file": ("a.zip", body)})
    assert answer.status_code == 202, answer.text
    warnings = answer.json()["warnings"]
    assert len(warnings) == 1
    assert "'cat'" in warnings[0]
    assert "'\u0441at'" in warnings[0]
    assert "CYRILLIC SMALL LETTER ES" in warnings[0]
    plain = client.post(
        "/v1/tasks", files={"file": ("b.zip", _archive(tmp_path / "b.zip", ["cat", "dog"]))}
    )
    assert plain.status_code == 202
    assert plain.json()["warnings"] == []


def test_lookalikes_across_scripts_and_forms() -> None:
    assert len(lookalike_warnings(("Paris", "\u0420aris", "\u03a1aris", "rome"))) == 1
    assert lookalike_warnings(("\uff43at", "cat"))  # full-width c, the same once NFKC
    assert lookalike_warnings(("o\u03bden", "oven"))  # Greek nu
    assert lookalike_warnings(("cat", "Cat", "кот", "gato")) == ()

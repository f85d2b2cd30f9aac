"""A strip of a served zoo task's images, on SQLite and the real PostgreSQL: a PNG of n
48-px images, drawn once and then read from the data directory."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.services import thumbnails
from app.settings import Settings
from app.zoo.presets import tiny
from app.zoo.zoo import Zoo


def _decoded(content: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(content))
    image.load()
    return image


@pytest.mark.parametrize("task", [0, 7], ids=["fashion-mnist", "digits-8x8"])
def test_a_strip_of_n_images(client: TestClient, task: int) -> None:
    name = tiny()[task].name
    answer = client.get(f"/v1/zoo/tasks/{name}/thumbnails")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["cache-control"] == "private, max-age=3600"
    image = _decoded(answer.content)
    assert (image.format, image.size) == ("PNG", (48 * 6, 48))
    pixels = np.asarray(image)
    # Six images, none of them blank.
    assert all(pixels[:, 48 * i : 48 * (i + 1)].std() > 0 for i in range(6))
    three = client.get(f"/v1/zoo/tasks/{name}/thumbnails", params={"n": 3})
    assert _decoded(three.content).size == (48 * 3, 48)


def test_the_second_request_reads_the_strip_drawn_first(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = tiny()[4].name
    first = client.get(f"/v1/zoo/tasks/{name}/thumbnails", params={"n": 4})
    assert first.status_code == 200, first.text
    version = client.get("/v1/zoo").json()["version"]
    kept = thumbnails.cached_at(settings, version, name, 4)
    assert kept.read_bytes() == first.content
    assert [p.name for p in kept.parent.iterdir()] == [kept.name]  # no temporary file left

    def no_images(self: Zoo, index: int, image_size: int = 224) -> None:
        raise AssertionError("the task's images were read again")

    monkeypatch.setattr(Zoo, "task_data", no_images)
    again = client.get(f"/v1/zoo/tasks/{name}/thumbnails", params={"n": 4})
    assert again.status_code == 200
    assert again.content == first.content


def test_an_unknown_task_or_count_is_refused(client: TestClient) -> None:
    missing = client.get("/v1/zoo/tasks/no-such-task/thumbnails")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["type"].endswith("/not-found")
    for n in (0, 13):
        refused = client.get(f"/v1/zoo/tasks/{tiny()[0].name}/thumbnails", params={"n": n})
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"

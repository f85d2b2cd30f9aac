"""Uploads are validated in fair shares per tenant: one tenant's large uploads hold at most its
share of the validation pool, so another tenant's small upload is decoded beside them instead of
queueing behind them; and each upload's decoding has a budget of its own.

The uploads are real archives of large PNGs, decoded for real. What is asserted is an order of
answers (the small upload answered while every large one is still being decoded), never how
long anything took: the noisy tenant's one thread may finish the upload it is decoding while
the small one is decoded beside it, but a first-come pool makes the small upload wait for two
of the large ones."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.api.main import create_app
from app.settings import Settings
from tests.helpers import (
    create_key,
    eventually,
    fresh_database,
    in_background,
    png_bytes,
    random_images,
    service_settings,
    write_zip,
)


@pytest.fixture
def keyed(tiny_zoo: Path, tmp_path: Path) -> Iterator[Settings]:
    with fresh_database("sqlite", tmp_path) as url:
        settings = service_settings(tiny_zoo, url, tmp_path)
        yield settings.model_copy(
            update={"api_keys": "required", "validation_threads": 2, "rate_limit_per_minute": 0}
        )


def _large_png(size: int = 2048) -> bytes:
    """A smooth picture with sparse noise: a few hundred kilobytes that decode to 12 MB."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    picture = np.repeat(((ramp[None, :] + ramp[:, None] / 2) % 256)[..., None], 3, axis=2)
    speckles = rng.integers(0, size, (2, size * size // 50))
    picture[speckles[0], speckles[1]] = rng.integers(0, 256, (speckles.shape[1], 3))
    buffer = io.BytesIO()
    Image.fromarray(picture.astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _archive(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    return write_zip(path, members).read_bytes()


def _auth(settings: Settings, tenant: str) -> dict[str, str]:
    _, token = create_key(settings, tenant, ["tasks:read", "tasks:write"])
    return {"Authorization": f"Bearer {token}"}


def test_one_tenants_large_uploads_do_not_hold_back_anothers_small_one(
    keyed: Settings, sent: list[str], tmp_path: Path
) -> None:
    picture = _large_png()
    large = [
        _archive(tmp_path / f"large{i}.zip", [(f"c{j % 2}/{j}.png", picture) for j in range(16)])
        for i in range(3)
    ]
    small_images = random_images(6, size=32, seed=1, channels=3)
    small = _archive(
        tmp_path / "small.zip",
        [(f"c{j % 2}/{j}.png", png_bytes(x)) for j, x in enumerate(small_images)],
    )
    answered: dict[str, float] = {}
    with TestClient(create_app(keyed)) as client, ExitStack() as uploading:
        noisy, quiet = _auth(keyed, "noisy"), _auth(keyed, "quiet")

        def send(name: str, body: bytes, headers: dict[str, str]) -> int:
            response = client.post(
                "/v1/tasks", headers=headers, files={"file": (f"{name}.zip", body)}
            )
            answered[name] = time.monotonic()
            return response.status_code

        floods = [
            uploading.enter_context(in_background(lambda i=i: send(f"large{i}", large[i], noisy)))
            for i in range(3)
        ]
        stored = keyed.data_dir / "uploads"
        # Every large upload is stored (and so on its way to validation) before the small one.
        eventually(lambda: len(list(stored.glob(".upload-*"))) == 3, "three large uploads stored")
        time.sleep(0.5)
        assert answered == {}, "a large upload was already answered: make them larger"
        assert send("small", small, quiet) == 202
        before = set(answered) - {"small"}
        assert len(before) <= 1, f"answered before the small upload: {answered}"
        assert [flood() for flood in floods] == [202] * 3


def test_an_upload_over_its_decode_budget_is_refused_naming_it(
    keyed: Settings, sent: list[str], tmp_path: Path
) -> None:
    picture = _large_png(1024)
    body = _archive(tmp_path / "slow.zip", [(f"c{j % 2}/{j}.png", picture) for j in range(6)])
    budgeted = keyed.model_copy(update={"max_decode_seconds": 0.001})
    with TestClient(create_app(budgeted)) as client:
        response = client.post(
            "/v1/tasks", headers=_auth(keyed, "acme"), files={"file": ("slow.zip", body)}
        )
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"].endswith("/decode-budget-exceeded")
    assert "0.001 s" in problem["detail"]
    assert sent == []

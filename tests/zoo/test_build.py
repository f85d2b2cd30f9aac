"""Building the tiny zoo: caching by content, persistence, and the one-probe rule."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from app.task2vec.embedding import Embedding
from app.task2vec.errors import EmbeddingFileError
from app.zoo.build import ZooBuilder, save_weights
from app.zoo.index import TaskIndex
from app.zoo.presets import recipe
from app.zoo.zoo import Zoo


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Zoo]:
    data_dir = tmp_path_factory.mktemp("data")
    return data_dir, ZooBuilder(recipe("tiny"), data_dir).build()


def test_tiny_zoo_has_every_part(built: tuple[Path, Zoo]) -> None:
    _, zoo = built
    assert len(zoo.tasks) == 8
    assert zoo.errors.shape == (8, len(zoo.experts))
    assert np.all((zoo.errors >= 0) & (zoo.errors <= 1))
    assert {e.meta["task"] for e in zoo.embeddings} == {t.name for t in zoo.tasks}
    assert len({e.dim for e in zoo.embeddings}) == 1
    trained = [e for e in zoo.experts if e.source_task is not None]
    assert trained
    assert all(Path(e.weights).is_file() for e in trained)  # copied into the zoo folder


def test_rebuild_reuses_the_cache_and_recomputes_what_changed(built: tuple[Path, Zoo]) -> None:
    data_dir, zoo = built
    cached_files = sorted(p.name for p in (data_dir / "cache").rglob("*") if p.is_file())
    again = ZooBuilder(recipe("tiny"), data_dir).build()
    assert np.array_equal(again.errors, zoo.errors)
    assert sorted(p.name for p in (data_dir / "cache").rglob("*") if p.is_file()) == cached_files

    changed = recipe("tiny")
    first = replace(changed.tasks[0], size=100)
    changed = replace(changed, tasks=[first, *changed.tasks[1:]])
    rebuilt = ZooBuilder(changed, data_dir).build()
    new_files = {p.name for p in (data_dir / "cache").rglob("*") if p.is_file()} - set(cached_files)
    # New embedding, matrix row and LogME row for the changed task, and a new expert
    # trained on it.
    assert len(new_files) == 4
    assert np.array_equal(rebuilt.errors[1:, 0], zoo.errors[1:, 0])


def test_zoo_refuses_embeddings_of_another_probe(built: tuple[Path, Zoo]) -> None:
    _, zoo = built
    foreign = Embedding(
        zoo.embeddings[0].hessian,
        zoo.embeddings[0].scale,
        {**zoo.embeddings[0].meta, "probe": "resnet34"},
    )
    with pytest.raises(EmbeddingFileError, match="probe='resnet34'"):
        zoo.check_compatible(foreign)
    other_size = {**zoo.embeddings[0].meta, "image_size": 224}
    with pytest.raises(EmbeddingFileError, match="image_size"):
        zoo.check_compatible(
            Embedding(zoo.embeddings[0].hessian, zoo.embeddings[0].scale, other_size)
        )
    zoo.check_compatible(zoo.embeddings[1])


def test_saved_zoo_round_trips(built: tuple[Path, Zoo], tmp_path: Path) -> None:
    _, zoo = built
    zoo.save(tmp_path / "copy")
    loaded = Zoo.load(tmp_path / "copy")
    assert loaded.tasks == zoo.tasks
    assert np.array_equal(loaded.errors, zoo.errors)
    assert loaded.embed_config == zoo.embed_config
    assert [e.name for e in loaded.experts] == [e.name for e in zoo.experts]
    with pytest.raises(EmbeddingFileError, match="not a readable zoo"):
        Zoo.load(tmp_path / "nowhere")


def test_index_is_saved_with_the_zoo_and_rebuilt_when_stale(
    built: tuple[Path, Zoo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, zoo = built
    zoo.save(tmp_path / "zoo")
    first = Zoo.load(tmp_path / "zoo").index()
    saved = tmp_path / "zoo" / "index.npz"
    assert saved.is_file()
    assert first.version.count == len(zoo.tasks)

    def no_build(*args: object) -> None:
        raise AssertionError("a current index must be loaded, not rebuilt")

    with monkeypatch.context() as patch:
        patch.setattr(TaskIndex, "build", no_build)
        assert Zoo.load(tmp_path / "zoo").index().version == first.version

    # An embedding changes under the saved index: the version no longer matches, so it is
    # rebuilt from the zoo's embeddings and saved again.
    stale = Zoo.load(tmp_path / "zoo")
    e = stale.embeddings[0]
    stale.embeddings[0] = Embedding(e.hessian * 2, e.scale, e.meta)
    rebuilt = stale.index()
    assert rebuilt.version != first.version
    assert TaskIndex.load(saved, rebuilt.version) is not None
    assert rebuilt.search(stale.embeddings[0], k=1)[0].id == 0

    saved.write_bytes(b"damaged")
    assert Zoo.load(tmp_path / "zoo").index().version == first.version


def test_the_same_weights_are_the_same_bytes_wherever_written(tmp_path: Path) -> None:
    """torch.save records a file's name in its archive: expert weights are saved through
    memory, so two builds of one zoo give the same files (and the same bundle)."""
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}
    save_weights(state, tmp_path / "one.pt")
    save_weights(state, tmp_path / "other-name.pt")
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "other-name.pt").read_bytes()
    torch.save(state, tmp_path / "plain.pt")  # the name is in the bytes otherwise
    torch.save(state, tmp_path / "plain-too.pt")
    assert (tmp_path / "plain.pt").read_bytes() != (tmp_path / "plain-too.pt").read_bytes()
    back = torch.load(tmp_path / "one.pt", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in state.items())

"""The data directory's layout (``app.services.layout``) is a contract, not a detail: every
API process and worker on every machine reads and writes the same shared directory, and the
rows in the database hold paths into it. So its sub-paths are pinned here, literally: moving
one would strand the files an older process wrote, and the check has to fail when one moves."""

from __future__ import annotations

from pathlib import Path

from app.services import bundles
from app.services.layout import DataLayout, content_sha, is_folder
from app.services.storage import UPLOAD_SUFFIX, WEIGHTS_SUFFIX, content_path
from app.settings import Settings

SHA = "ab" + "0" * 62


def test_the_sub_paths_are_the_documented_ones(tmp_path: Path) -> None:
    layout = DataLayout.of(Settings(data_dir=tmp_path / "shared"))
    root = tmp_path / "shared"
    assert layout.root == root
    assert layout.uploads == root / "uploads"
    assert layout.weights == root / "experts"
    assert layout.bundles == root / "bundles"
    assert layout.versions == root / "zoo" / "versions"
    assert layout.task_embedding("f00d") == root / "embeddings" / "f00d.npz"
    assert layout.zoo_embedding("k3y") == root / "zoo" / "embeddings" / "k3y.npz"
    assert layout.zoo("tiny") == root / "zoos" / "tiny"  # a preset: built under the root
    assert layout.zoo("starter") == root / "zoos" / "starter"


def test_files_by_content_go_under_the_first_two_hex_digits(tmp_path: Path) -> None:
    """``<sha[:2]>/<sha256><suffix>``, as the layout's docstrings say of uploads,
    weights and bundles."""
    layout = DataLayout(tmp_path)
    upload = content_path(layout.uploads, SHA, UPLOAD_SUFFIX)
    assert upload == tmp_path / "uploads" / "ab" / f"{SHA}.upload"
    weights = content_path(layout.weights, SHA, WEIGHTS_SUFFIX)
    assert weights == tmp_path / "experts" / "ab" / f"{SHA}.pt"
    bundle = bundles.stored_bundle(Settings(data_dir=tmp_path), SHA)
    assert bundle == tmp_path / "bundles" / "ab" / f"{SHA}.t2vzoo"


def test_a_zoo_that_is_no_preset_names_a_folder(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "shared")
    assert layout.zoo(str(tmp_path / "my-zoo")) == tmp_path / "my-zoo"
    assert layout.zoo("no-such-preset") == Path("no-such-preset")


def test_the_kinds_of_file_never_share_a_folder(tmp_path: Path) -> None:
    """Uploads, weights, bundles, embeddings and versions are pruned and listed by folder:
    none may lie inside another's."""
    layout = DataLayout(tmp_path)
    folders = [
        layout.uploads,
        layout.weights,
        layout.bundles,
        layout.versions,
        layout.task_embedding("t").parent,
        layout.zoo_embedding("k").parent,
        layout.zoo("tiny"),
    ]
    for folder in folders:
        assert folder.is_relative_to(tmp_path)
        others = [f for f in folders if f != folder]
        assert not any(folder.is_relative_to(o) or o.is_relative_to(folder) for o in others)


def test_a_built_preset_is_where_the_layout_looks_for_it(tiny_zoo: Path) -> None:
    """The zoo builder writes a preset where the layout finds it (``tiny_zoo`` was built
    under a data directory of its own)."""
    data_dir = tiny_zoo.parent.parent
    assert DataLayout(data_dir).zoo("tiny") == tiny_zoo
    assert (DataLayout(data_dir).zoo("tiny") / "zoo.json").is_file()


def test_a_recorded_path_has_the_same_key_under_any_data_directory(tmp_path: Path) -> None:
    """A row records its writer's path; the object store's key (and so every other process's
    copy) is found from the path's trailing parts, whatever directory it was under."""
    writer, reader = DataLayout(tmp_path / "writer"), DataLayout(tmp_path / "reader")
    paths = {
        content_path(writer.uploads, SHA, UPLOAD_SUFFIX): f"uploads/ab/{SHA}.upload",
        content_path(writer.weights, SHA, WEIGHTS_SUFFIX): f"experts/ab/{SHA}.pt",
        writer.task_embedding("f00d"): "embeddings/f00d.npz",
        writer.zoo_embedding("k3y"): "zoo/embeddings/k3y.npz",
        writer.versions / ("c0" * 16): f"zoo/versions/{'c0' * 16}",
    }
    for path, key in paths.items():
        assert writer.key(str(path)) == key
        assert reader.at(key) == reader.root / key
        assert writer.at(key) == path
    assert content_sha(f"uploads/ab/{SHA}.upload") == SHA
    assert content_sha("embeddings/f00d.npz") is None
    assert is_folder(f"zoo/versions/{'c0' * 16}")
    assert not is_folder("embeddings/f00d.npz")


def test_what_the_layout_does_not_share_has_no_key(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    for outside in (
        "imagenet",
        "random:3",
        "https://example.org/w.pt",
        str(tmp_path / "zoos" / "tiny" / "experts" / "e.pt"),  # inside a zoo folder
        str(tmp_path / "uploads" / "ab" / "notes.txt"),
        str(tmp_path / "embeddings" / ".hidden.npz"),
    ):
        assert layout.key(outside) is None, outside

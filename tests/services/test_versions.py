"""Published zoo versions (``app.services.versions``): zoos only grow, so of several
published versions the one with the most tasks and experts is current, whichever was
committed last (a publisher that finishes late must never roll the served zoo back); a version
is found by its content hash; a row reads back as the ``Version`` the API and the workers
serve. Rows are written directly (a publish takes seconds), on both databases; one real
publish of the tiny zoo checks that what ``publish`` writes reads back the same way."""

from __future__ import annotations

import json
from dataclasses import asdict

from app.db.models import IndexVersionRow
from app.db.session import session_scope
from app.services import versions
from app.services.layout import DataLayout
from app.services.publishing import ensure_published
from app.services.versions import Version
from app.settings import Settings
from app.task2vec.embedding import EmbedConfig
from app.zoo.matrix import EvaluationProtocol
from app.zoo.zoo import Zoo

EMBED = EmbedConfig(probe="cnn", image_size=32, max_samples=100)
PROTOCOL = EvaluationProtocol(holdout=0.25, image_split_seed=7)


def _publish_row(settings: Settings, content: str, tasks: int, experts: int) -> int:
    """A version row as ``publishing.publish`` writes it; its id."""
    with session_scope(settings.resolved_database_url()) as session:
        row = IndexVersionRow(
            zoo=str(settings.data_dir / "zoo" / "versions" / content),
            probe=EMBED.probe,
            dim=16,
            count=tasks,
            experts=experts,
            config={"embed_config": asdict(EMBED), "protocol": asdict(PROTOCOL)},
            content=content,
        )
        session.add(row)
        session.flush()
        return row.id


def _current(settings: Settings) -> Version | None:
    with session_scope(settings.resolved_database_url()) as session:
        return versions.current(session)


def _served(settings: Settings) -> Version:
    current = _current(settings)
    assert current is not None
    return current


def test_nothing_published_nothing_current(settings: Settings) -> None:
    assert _current(settings) is None
    with session_scope(settings.resolved_database_url()) as session:
        assert versions.by_content(session, "0" * 64) is None


def test_the_largest_version_is_current_whenever_it_was_published(settings: Settings) -> None:
    first = _publish_row(settings, "v1", tasks=3, experts=2)
    current = _served(settings)
    assert current.id == first
    grown = _publish_row(settings, "v3", tasks=4, experts=3)
    late = _publish_row(settings, "v2", tasks=4, experts=2)  # an older zoo, published late
    assert late > grown > first
    current = _served(settings)
    assert (current.id, current.content) == (grown, "v3")
    more_experts = _publish_row(settings, "v4", tasks=4, experts=4)
    current = _served(settings)
    assert current.id == more_experts


def test_of_two_versions_of_one_size_the_later_is_current(settings: Settings) -> None:
    """An expert and a task added at once to one zoo: two versions of one size, each with
    one of them (the next publish holds both); the one committed last is served."""
    _publish_row(settings, "base", tasks=3, experts=2)
    _publish_row(settings, "with-expert", tasks=3, experts=3)
    later_id = _publish_row(settings, "with-task", tasks=4, experts=2)
    current = _served(settings)
    assert current.id == later_id


def test_a_version_reads_back_whole_and_is_found_by_content(settings: Settings) -> None:
    version_id = _publish_row(settings, "c0ffee", tasks=5, experts=3)
    _publish_row(settings, "other", tasks=1, experts=1)
    with session_scope(settings.resolved_database_url()) as session:
        found = versions.by_content(session, "c0ffee")
        assert versions.by_content(session, "c0ffe") is None
    assert found == Version(
        id=version_id,
        folder=settings.data_dir / "zoo" / "versions" / "c0ffee",
        content="c0ffee",
        tasks=5,
        experts=3,
        embed_config=EMBED,
        protocol=PROTOCOL,
    )
    assert found == _current(settings)


def test_names_come_from_the_versions_folder(settings: Settings) -> None:
    _publish_row(settings, "named", tasks=2, experts=1)
    version = _served(settings)
    assert version.names("experts") == set()  # its folder is gone (pruned): no names
    version.folder.mkdir(parents=True)
    manifest = {"experts": [{"name": "cnn-a"}], "tasks": [{"name": "t1"}, {"name": "t2"}]}
    (version.folder / "zoo.json").write_text(json.dumps(manifest))
    assert version.names("experts") == {"cnn-a"}
    assert version.names("tasks") == {"t1", "t2"}
    (version.folder / "zoo.json").write_text("{not json")
    assert version.names("tasks") == set()


def test_a_published_zoo_reads_back_as_it_was_built(settings: Settings) -> None:
    folder = DataLayout.of(settings).zoo(settings.zoo)
    zoo = Zoo.load(folder)
    published = ensure_published(settings, folder)
    assert _current(settings) == published
    with session_scope(settings.resolved_database_url()) as session:
        assert versions.by_content(session, published.content) == published
    assert (published.tasks, published.experts) == (len(zoo.tasks), len(zoo.experts))
    assert (published.embed_config, published.protocol) == (zoo.embed_config, zoo.protocol)
    assert published.folder.is_relative_to(DataLayout.of(settings).versions)
    assert published.names("experts") == {e.name for e in zoo.experts}
    assert published.names("tasks") == {t.name for t in zoo.tasks}
    assert ensure_published(settings, folder) == published  # once

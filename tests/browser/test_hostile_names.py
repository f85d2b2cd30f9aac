"""Every name a user controls reaches the console as text: class names and the file name of an
upload, an expert's source task and a zoo task's domain, written as markup and script, very
long, and right to left. No script runs (no flag set, no dialog, no CSP violation) and each
name is shown as it was given."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import FilePayload

from tests.browser.conftest import Console, Tab, _service
from tests.helpers import cnn_weights, npz_upload

pytestmark = pytest.mark.slow

#: Each would run a script if it reached markup.
MARKUP = [
    '<img src=x onerror="window.__pwned=1;alert(1)">',
    "<script>window.__pwned=2</script>",
    '"><svg onload="window.__pwned=3">',
]
LONG = "W" * 200  # the longest class name an upload may have
RIGHT_TO_LEFT = "مجموعة الأحذية"  # right-to-left text, shown as given


@pytest.fixture(scope="module")
def hostile(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A service whose zoo holds an expert and a task with hostile free-text fields (names
    themselves are letters, digits, '.', '_' and '-'; a source task must be a zoo task)."""
    with _service(tiny_zoo, tmp_path_factory.mktemp("hostile")) as service, service.client() as api:
        expert = api.post(
            "/v1/experts",
            data={
                "name": "cnn-4x1-hostile",
                "architecture": "cnn-4x1",
                "input_size": "28",
                "tags": f"{MARKUP[1]},{RIGHT_TO_LEFT}",
            },
            files={"weights": ("w.pt", cnn_weights())},
        )
        assert expert.status_code == 202, expert.text
        task = api.post(
            "/v1/zoo/tasks",
            data={"name": "hostile-domain", "domain": MARKUP[2]},
            files={"file": ("t.npz", npz_upload(3))},
        )
        assert task.status_code == 202, task.text

        def grown() -> bool:
            zoo = api.get("/v1/zoo").json()
            return (zoo["tasks"], zoo["experts"]) == (9, 4)

        service.until(grown, "the zoo to serve the hostile expert and task")
        yield service


def _hostile_npz() -> bytes:
    data = np.load(io.BytesIO(npz_upload(1)))
    classes = [*MARKUP, LONG, RIGHT_TO_LEFT]
    labels = np.array(classes)[np.arange(len(data["y"])) % len(classes)]
    buffer = io.BytesIO()
    np.savez(buffer, x=data["x"], y=labels)
    return buffer.getvalue()


def test_no_name_a_user_gives_runs_as_script(
    hostile: Console, open_tab: Callable[[str], Tab]
) -> None:
    filename = f"{MARKUP[0]}\u202egnp.npz"  # a right-to-left override in a file name
    tab = open_tab(hostile.base)
    page = tab.page
    page.goto(hostile.base + "/")
    page.wait_for_selector("#zoo-version:has-text('9 tasks and 4 experts')")
    page.set_input_files(
        "#file-input",
        files=FilePayload(
            name=filename, mimeType="application/octet-stream", buffer=_hostile_npz()
        ),
    )
    page.wait_for_selector("#ranking-rows tr, #upload-error:not([hidden])")
    assert page.locator("#upload-error").is_hidden(), page.locator("#upload-error").text_content()
    task_id = page.evaluate("() => decodeURIComponent(location.hash.split('/')[2])")
    with hostile.client() as api:
        stored = api.get(f"/v1/tasks/{task_id}").json()["dataset"]["filename"]
    assert page.locator("#task-name").text_content() == stored  # the name the service kept
    page.click("#dataset-details summary")
    facts = page.locator("#dataset-facts").inner_text()
    for name in [*MARKUP, LONG]:
        assert name in facts
    assert RIGHT_TO_LEFT in facts
    tab.shot("console-hostile-ranking")

    page.goto(hostile.base + "/#/zoo")
    page.wait_for_selector("#map svg circle")
    assert MARKUP[2] in page.locator("#map-legend").inner_text()
    assert MARKUP[1] in page.locator("#expert-rows").inner_text()
    tab.shot("console-hostile-zoo")

    page.goto(hostile.base + "/#/mine")
    page.wait_for_selector("#task-rows tr")
    assert stored in page.locator("#task-rows").inner_text()

    assert page.evaluate("() => window.__pwned") is None
    assert page.locator("#view-mine img, #view-mine script, #view-mine svg").count() == 0

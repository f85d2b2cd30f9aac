"""A person's path through the console, keys off: drop a dataset, watch its job, weigh the
ranking with its evidence, switch the method, open the zoo map with the task placed on it,
and find the task again under My tasks."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.browser.conftest import Console, Tab
from tests.helpers import npz_upload

pytestmark = pytest.mark.slow

ACCURACY = re.compile(r"^\d{1,3}\.\d% \(\d{1,3}%–\d{1,3}%\)$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "shoes.npz"
    path.write_bytes(npz_upload(1))
    return path


def _uploaded(tab: Tab, service: Console, dataset: Path, *, drop: bool = False) -> str:
    """Chooses ``dataset`` in the page's file picker (or drops it on the drop zone, as a
    person drags a file from the desktop) and waits for its ranking; the task's id."""
    page = tab.page
    page.goto(service.base + "/")
    page.wait_for_selector("#zoo-version:has-text('8 tasks and 3 experts')")
    if drop:
        transfer = page.evaluate_handle(
            "([name, b64]) => { const t = new DataTransfer();"
            " const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));"
            " t.items.add(new File([bytes], name)); return t; }",
            [dataset.name, base64.b64encode(dataset.read_bytes()).decode()],
        )
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    else:
        page.set_input_files("#file-input", str(dataset))
    page.wait_for_selector("#ranking-rows tr")
    task_id = page.evaluate("() => decodeURIComponent(location.hash.split('/')[2].split('?')[0])")
    assert task_id, page.url
    return str(task_id)


def test_a_dropped_dataset_is_ranked_with_its_evidence(
    service: Console, open_tab: Callable[[str], Tab], dataset: Path
) -> None:
    tab = open_tab(service.base)
    page = tab.page
    task_id = _uploaded(tab, service, dataset)

    # The job's stages were drawn as the worker reported them, each with its time.
    assert page.locator("#job-stages li.done").count() >= 1
    assert (page.locator("#upload-figure").text_content() or "").endswith(" sent")

    assert page.locator("#task-name").text_content() == "shoes.npz"
    rows = page.locator("#ranking-rows tr")
    assert rows.count() == 3  # every expert of the tiny zoo
    served = service.client().get(f"/v1/tasks/{task_id}/recommendations?k=10").json()
    for i, item in enumerate(served["ranking"]):
        row = rows.nth(i)
        assert row.locator(".expert .name").text_content() == item["expert"]
        shown = row.locator(".acctext").text_content() or ""
        assert ACCURACY.match(shown), shown
        accuracy = 100 * (1 - item["evidence"]["predicted_error"])
        assert shown.startswith(f"{accuracy:.1f}%"), (shown, accuracy)
        assert row.locator("svg.accbar rect.interval").count() == 1

    # The evidence: the nearest zoo tasks, with images of each, and the accuracy there.
    nearest = served["ranking"][0]["evidence"]["nearest_tasks"]
    cards = page.locator("#nearest-cards li")
    assert cards.count() == len(nearest)
    assert cards.nth(0).locator(".name").text_content() == nearest[0]["task"]
    page.wait_for_function(
        "() => [...document.querySelectorAll('#nearest-cards img')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    first = rows.nth(0).locator("td.there").nth(0).text_content()
    expert = served["ranking"][0]["evidence"]["nearest_tasks"][0]
    assert first == f"{100 * (1 - expert['error']):.1f}%"

    # Whether the zoo knows data like this is said either way.
    banner = page.locator("#novelty")
    assert banner.is_visible()
    ood = served["novelty"]["out_of_distribution"]
    assert ("does not know" in (banner.text_content() or "")) is ood
    tab.shot("console-ranking")

    # Another method is one click away, and the table follows it.
    page.click("#methods a:has-text('learned')")
    page.wait_for_selector("th:has-text('Score (learned)')")
    learned = service.client().get(f"/v1/tasks/{task_id}/recommendations?k=10&method=learned")
    first_expert = learned.json()["ranking"][0]["expert"]
    assert page.locator("#ranking-rows tr").nth(0).locator(".expert .name").text_content() == (
        first_expert
    )


def test_the_zoo_map_places_the_task_among_the_zoo(
    service: Console, open_tab: Callable[[str], Tab], dataset: Path
) -> None:
    tab = open_tab(service.base)
    page = tab.page
    task_id = _uploaded(tab, service, dataset, drop=True)
    page.click("#task-on-map")
    page.wait_for_selector("#map svg circle")
    assert page.locator("#map svg circle").count() == 8
    assert page.locator("#map svg path.placed").count() == 1
    domains = service.client().get("/v1/zoo/map").json()["domains"]
    assert page.locator("#map-legend li").all_text_contents() == domains
    assert page.locator("#expert-rows tr").count() == 3
    page.hover("#map svg circle >> nth=0")
    assert " · " in (page.locator("#map-hover").text_content() or "")
    assert page.locator("#heat").is_visible()
    assert page.locator("#dist").is_visible()
    tab.shot("console-zoo")

    page.goto(f"{service.base}/#/mine")
    page.wait_for_selector(f"#task-rows a[href='#/tasks/{task_id}']")
    assert "shoes.npz" in page.locator("#task-rows").all_text_contents()[0]
    tab.shot("console-mine")

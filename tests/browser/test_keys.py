"""With keys required the console asks for one, keeps it for the tab only (session storage),
sends it as a Bearer header, and shows the key's tenant nothing of another tenant's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.browser.conftest import Console, Tab
from tests.helpers import create_key, npz_upload

pytestmark = pytest.mark.slow

WRITER = ["tasks:read", "tasks:write"]


def test_the_console_asks_for_a_key_and_shows_only_its_tenant(
    keyed_service: Console, open_tab: Callable[[str], Tab], tmp_path: Path
) -> None:
    _, ours = create_key(keyed_service.settings, "team-a", WRITER)
    _, theirs = create_key(keyed_service.settings, "team-b", WRITER)
    with keyed_service.client(theirs) as other:
        answer = other.post("/v1/tasks", files={"file": ("team-b-private.npz", npz_upload(2))})
        assert answer.status_code == 202, answer.text

    tab = open_tab(keyed_service.base)
    page = tab.page
    page.goto(keyed_service.base + "/")
    page.wait_for_selector("#key-panel:not([hidden])")
    assert page.locator("#view-upload").is_hidden()
    tab.shot("console-key")

    page.fill("#key-input", "t2v_not-a-key")
    page.click("#key-form button")
    page.wait_for_selector("#key-error:not([hidden])")
    assert page.locator("#key-panel").is_visible()

    page.fill("#key-input", ours)
    page.click("#key-form button")
    page.wait_for_selector("#zoo-version:has-text('8 tasks and 3 experts')")
    assert page.locator("#key-state").is_visible()
    assert page.evaluate("() => sessionStorage.getItem('t2v.key')") == ours
    assert page.evaluate("() => localStorage.length") == 0
    assert page.evaluate("() => document.cookie") == ""

    upload = tmp_path / "team-a-data.npz"
    upload.write_bytes(npz_upload(1))
    page.set_input_files("#file-input", str(upload))
    page.wait_for_selector("#ranking-rows tr")

    page.goto(keyed_service.base + "/#/mine")
    page.wait_for_selector("#task-rows tr")
    assert "team-a-data.npz" in page.locator("#task-rows").inner_text()
    assert "team-b-private" not in page.content()
    assert page.locator("#task-rows tr").count() == 1

    # Another tab holds no key until it is given one; forgetting it asks again.
    other_tab = open_tab(keyed_service.base)
    other_tab.page.goto(keyed_service.base + "/#/mine")
    other_tab.page.wait_for_selector("#key-panel:not([hidden])")
    page.click("#key-forget")
    assert page.evaluate("() => sessionStorage.getItem('t2v.key')") is None
    page.wait_for_selector("#key-panel:not([hidden])")

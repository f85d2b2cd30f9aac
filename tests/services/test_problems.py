"""Problems as the services raise and store them: the credentials of URLs never reach a stored
detail."""

from __future__ import annotations

from app.services.problems import redact


def test_redact_removes_the_userinfo_of_urls() -> None:
    text = "at https://bob:s3cret@10.0.0.5:8080/w.pt and redis://:pw@cache/0, not a@b.c"
    assert redact(text) == "at https://10.0.0.5:8080/w.pt and redis://cache/0, not a@b.c"

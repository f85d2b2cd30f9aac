"""Upload → dataset → task → job, below HTTP."""

from __future__ import annotations

from app.services.uploads import safe_filename


def test_safe_filename() -> None:
    assert safe_filename("a\x00b\x1b<script>.zip") == "abscript.zip"
    assert safe_filename("C:\\data\\shoes.zip") == "shoes.zip"
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename(None) == safe_filename(" .. ") == "upload"
    assert safe_filename("cafe\u0301.zip") == "caf\u00e9.zip"
    assert len(safe_filename("x" * 1000)) == 255

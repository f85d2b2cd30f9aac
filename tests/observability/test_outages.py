"""An outage in a few log lines: one warning as it starts, a reminder at most every
``every`` seconds while it lasts, one info line as it ends; never a traceback."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.exc import OperationalError

from app.observability.outages import Outage


def test_an_outage_is_a_warning_a_reminder_a_minute_and_an_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [0.0]
    outage = Outage(logging.getLogger("t2v.test"), "the database", every=60, clock=lambda: clock[0])
    error = OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
    with caplog.at_level(logging.INFO, logger="t2v.test"):
        outage.ok()  # nothing to say while it answers
        for second in range(0, 150, 2):  # a poll every 2 s for two and a half minutes
            clock[0] = float(second)
            outage.failed(error)
        assert outage.down
        outage.ok()
        outage.ok()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.WARNING] * 3 + [logging.INFO]
    assert lines[0][1].startswith("the database unavailable: OperationalError")
    assert "still unavailable after 60 s (31 failed tries)" in lines[1][1]
    assert "still unavailable after 120 s (61 failed tries)" in lines[2][1]
    assert lines[3][1] == "the database available again after 148 s (75 failed tries)"
    assert all(r.exc_info is None for r in caplog.records)
    assert not outage.down

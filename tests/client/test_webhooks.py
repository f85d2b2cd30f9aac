"""The client's ``verify`` against hostile signature headers: whatever a sender puts in
``X-T2V-Signature``, the answer is the library's ``WebhookVerificationError``, never another
exception a receiver did not expect (and so answered 500 to)."""

from __future__ import annotations

import pytest
from task2vec_client.webhooks import WebhookVerificationError, verify

from app.services import webhooks

BODY, SECRET, MOMENT = b'{"id":"j1","status":"succeeded"}', "whsec_test", 1_700_000_000


@pytest.mark.parametrize(
    "signature",
    [
        "\u00e9" * 64,  # non-ASCII, the length of a real one
        "caf\u00e9",
        "\u0661" * 64,  # Arabic-Indic digits
        "\x00" * 64,
        "0" * 63 + "\U0001f600",
    ],
)
def test_a_non_ascii_signature_is_refused_not_an_error(signature: str) -> None:
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify(BODY, f"t={MOMENT},v1={signature}", SECRET, now=MOMENT)
    # Beside a good one (a secret being rotated), the good one still counts.
    good = webhooks.sign(BODY, SECRET, MOMENT)
    verify(BODY, f"{good},v1={signature}", SECRET, now=MOMENT)


def test_a_timestamp_in_other_digits_or_too_long_is_refused() -> None:
    """``int`` reads Arabic-Indic digits, and refuses 5,000 of them with its own error; the
    service writes a few ASCII ones."""
    signed = webhooks.digest(BODY, SECRET, MOMENT)
    other = str(MOMENT).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    for timestamp in (other, "1" * 5000, "-1", "+1700000000"):
        with pytest.raises(WebhookVerificationError, match="not a number"):
            verify(BODY, f"t={timestamp},v1={signed}", SECRET, now=MOMENT)

"""``callback_url``: the query parameter of every route that starts a job. When the job ends
(succeeded or failed) its view is POSTed there, signed (``app.services.deliveries``).

A route takes it as a parameter, ``callback: CallbackUrl``, and hands the value (None when not
given) to the service that creates the job. The URL is checked before the route runs, by the
same guard as every URL the service reaches (``app.services.outbound``): a refused one is a
422 problem naming ``callback_url``, and no job is made.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query

from app.api.deps import SettingsDep
from app.services import deliveries
from app.services.outbound import OutboundError
from app.services.problems import ProblemError

DESCRIPTION = (
    "http(s) URL POSTed the job's view (as GET /v1/jobs/{id} shows it) when the job ends, "
    "signed with the tenant's webhook secret (X-T2V-Signature)"
)


def checked_callback_url(
    settings: SettingsDep,
    callback_url: Annotated[str | None, Query(max_length=2000, description=DESCRIPTION)] = None,
) -> str | None:
    """The request's callback URL, once the outbound guard allowed it (None: not given)."""
    if callback_url is None:
        return None
    try:
        deliveries.check_url(settings, callback_url)
    except OutboundError as exc:
        raise ProblemError(
            422,
            "invalid-callback-url",
            "The callback URL is not allowed",
            f"callback_url: {exc}",
            errors=[{"location": ["query", "callback_url"], "message": str(exc)}],
        ) from None
    return callback_url


#: A route's parameter: ``callback: CallbackUrl``.
CallbackUrl = Annotated[str | None, Depends(checked_callback_url)]

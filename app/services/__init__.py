"""The service layer: what the API, the workers and the command line share.

Data flow: an upload is stored (``storage``, under the ``layout`` of the data directory) and
registered as a dataset, a task and a job (``uploads``, ``jobs``); the job is sent on the
``queue``; a worker embeds the task and writes the embedding (``tasks``); the API ranks the zoo's
experts with the zoo version it serves (``serving``). Zoo administration (``zoo_admin``,
``weights``) adds experts and zoo tasks, whose matrix entries workers compute before a new zoo
version is published (``publishing``, ``versions``). ``api_keys`` and ``idempotency`` hold the
access records.

Functions that read or write rows take the caller's ``session`` (keyword-only) and do not
commit unless their docstring says so: the caller owns the unit of work (a request's session,
a worker step's). Errors a client can act on are ``problems.ProblemError``; nothing here knows
HTTP beyond the status code a problem carries.
"""

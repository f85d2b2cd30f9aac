"""Python client of the Task2Vec model recommendation service: ``Client`` and
``AsyncClient`` with typed answers (``models``) and one error type (``ProblemError``).

    from task2vec_client import Client

    with Client("http://127.0.0.1:8000") as t2v:           # key: argument or T2V_API_KEY
        answer = t2v.recommend("shoes.zip", k=3, wait=120)
        for expert in answer.ranking:
            print(expert.rank, expert.expert, expert.score)

Webhooks (``callback_url``) are checked with ``verify`` (``task2vec_client.webhooks``).
"""

from task2vec_client.client import AsyncClient, Client
from task2vec_client.errors import JobFailedError, ProblemError
from task2vec_client.models import (
    ExpertOut,
    ItemAccepted,
    JobAccepted,
    JobOut,
    Neighbours,
    Novelty,
    RankedExpert,
    Ranking,
    RankingMethod,
    TaskAccepted,
    TaskOut,
    UploadRanking,
    ZooOut,
)
from task2vec_client.webhooks import WebhookVerificationError, verify

__all__ = [
    "AsyncClient",
    "Client",
    "ExpertOut",
    "ItemAccepted",
    "JobAccepted",
    "JobFailedError",
    "JobOut",
    "Neighbours",
    "Novelty",
    "ProblemError",
    "RankedExpert",
    "Ranking",
    "RankingMethod",
    "TaskAccepted",
    "TaskOut",
    "UploadRanking",
    "WebhookVerificationError",
    "ZooOut",
    "verify",
]

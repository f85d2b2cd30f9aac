"""Recommenders: rank a zoo's experts for a new task, all behind one interface.

Each method takes the zoo, the query (its Task2Vec embedding, and its images for the methods
that need them) and returns every expert it can rank, best first, with a score (higher is
better) and the evidence behind it. A recommender sees only the zoo it is given: evaluation
holds tasks out by handing it a ``Zoo.subset`` without them and without their experts, so
nothing here needs to know which task a query came from.

Every method is registered by name in ``registry``; importing this package registers them
all, in the order the reports list them.
"""

from app.zoo.recommenders import (  # noqa: F401
    baselines,
    hybrid,
    learned,
    neighbours,
    transferability,
)
from app.zoo.recommenders.base import Query, Ranked, Recommender, ranked
from app.zoo.recommenders.baselines import global_best
from app.zoo.recommenders.learned import LearnedScorer, shuffled_embeddings, task_descriptors
from app.zoo.recommenders.neighbours import ASYM_TIE_TOLERANCE, Task2VecKNN, task2vec_asym
from app.zoo.recommenders.registry import REGISTRY, Method, build, evaluated, method, served
from app.zoo.recommenders.transferability import brute_force, logme, logme_recommender

__all__ = [
    "ASYM_TIE_TOLERANCE",
    "REGISTRY",
    "LearnedScorer",
    "Method",
    "Query",
    "Ranked",
    "Recommender",
    "Task2VecKNN",
    "brute_force",
    "build",
    "evaluated",
    "global_best",
    "logme",
    "logme_recommender",
    "method",
    "ranked",
    "served",
    "shuffled_embeddings",
    "task2vec_asym",
    "task_descriptors",
]

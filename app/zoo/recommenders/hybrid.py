"""The hybrid: the learned scorer shortlists, LogME re-ranks the shortlist from the images.

Stage one ranks every expert from the embedding alone (``LearnedScorer``, no expert runs);
stage two runs only the shortlisted experts over the uploaded images and scores them with
LogME; the two are combined by a rule (``Rule``: how many experts to shortlist, how much of
the combined score is LogME's) fitted on the zoo it is given, never on the query. A query the
zoo does not know (``novelty``) gets every expert shortlisted: there the embedding's
neighbours say least, and LogME most.

The rule is chosen by cross-validation inside the zoo: its tasks are split into groups that
share no image, each group in turn is predicted by a learned scorer fitted without it (and
without the experts trained on it), and the rule with the lowest mean regret over those
predictions wins. In the meta-evaluation that zoo is a fold's training zoo, so the choice is
nested: it never sees an evaluation query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.task2vec.errors import ConfigError
from app.zoo.features import extract_many
from app.zoo.folds import overlapping, scored, shared_images
from app.zoo.novelty import Novelty
from app.zoo.recommenders.base import Query, Ranked, Recommender, need_embedding
from app.zoo.recommenders.learned import LearnedScorer
from app.zoo.recommenders.registry import register
from app.zoo.recommenders.transferability import logme
from app.zoo.zoo import Zoo

#: Shortlist sizes the rule may choose from: at most a third of a 29-expert zoo's passes.
SHORTLISTS = (2, 3, 4, 6, 9)
#: LogME's share of the combined score within the shortlist.
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Groups of the cross-validation that fits the rule.
RULE_GROUPS = 5


@dataclass(frozen=True)
class Rule:
    shortlist: int
    weight: float


#: The rule of a zoo without a LogME matrix (a served zoo imported from a bundle) or too small
#: to fit one on: what ``fit_rule`` chooses on the demo zoo's 152 tasks (the nine experts the
#: learned scorer likes best, ordered by LogME alone).
DEFAULT_RULE = Rule(shortlist=9, weight=1.0)


def _z(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    z: np.ndarray = (values - values.mean()) / (spread if spread > 0 else 1.0)
    return z


def combine(
    predicted: np.ndarray, logme_of: np.ndarray, shortlist: list[int], weight: float
) -> np.ndarray:
    """Scores (higher is better) of every expert: the shortlisted ones by
    (1 − weight)·z(−predicted) + weight·z(LogME) over the shortlist, the rest below them in
    the learned order. ``logme_of`` is read at the shortlisted positions only."""
    n = len(predicted)
    short = np.array(shortlist, dtype=np.int64)
    scores = np.empty(n)
    scores[short] = (1 - weight) * _z(-predicted[short]) + weight * _z(logme_of[short])
    rest = np.setdiff1d(np.arange(n), short)
    if len(rest):
        z = _z(-predicted[rest])
        scores[rest] = scores[short].min() - 1.0 - (z.max() - z)
    return scores


def _components(shared: list[frozenset[int]]) -> list[list[int]]:
    """Groups of tasks linked by shared images (connected components), largest first."""
    seen: set[int] = set()
    groups = []
    for start in range(len(shared)):
        if start in seen:
            continue
        stack, group = [start], []
        seen.add(start)
        while stack:
            t = stack.pop()
            group.append(t)
            for u in shared[t] - seen:
                seen.add(u)
                stack.append(u)
        groups.append(sorted(group))
    return sorted(groups, key=len, reverse=True)


def _inner_predictions(zoo: Zoo, k: int) -> list[tuple[int, list[int], np.ndarray]]:
    """(task, candidate experts, learned predictions) for each scored task of ``zoo``,
    predicted by a scorer fitted on the groups that share no image with it."""
    folds: list[list[int]] = [[] for _ in range(RULE_GROUPS)]
    for group in _components(shared_images(zoo)):
        min(folds, key=len).extend(group)
    out = []
    for held in (f for f in folds if f):
        names = {zoo.tasks[t].name for t in held}
        experts = [e for e, x in enumerate(zoo.experts) if x.source_task not in names]
        visible = [t for t in range(len(zoo.tasks)) if t not in set(held)]
        if len(visible) < 3 or len(experts) < 2:
            continue
        inner = zoo.subset(visible, experts)
        scorer = LearnedScorer(inner, k)
        for t in held:
            if scored(zoo.tasks[t], zoo):
                predicted = scorer.model.predict(scorer.features(zoo.embeddings[t], []))
                out.append((t, experts, predicted))
    return out


def fit_rule(zoo: Zoo, k: int = 5) -> Rule:
    """The rule with the lowest mean regret over ``zoo``'s own tasks, each predicted without
    the tasks it shares images with (ties: the shorter shortlist, then less LogME)."""
    if zoo.logme is None:
        raise ConfigError("the hybrid's rule is fitted on the zoo's LogME scores; it has none")
    predictions = _inner_predictions(zoo, k)
    if not predictions:
        return DEFAULT_RULE
    best: tuple[float, Rule] | None = None
    for size in SHORTLISTS:
        for weight in WEIGHTS:
            regrets = []
            for t, experts, predicted in predictions:
                short = list(np.argsort(predicted, kind="stable")[:size])
                scores = combine(predicted, zoo.logme[t, experts], short, weight)
                errors = zoo.errors[t, experts]
                regrets.append(errors[int(np.argmax(scores))] - errors.min())
            mean = float(np.mean(regrets))
            if best is None or mean < best[0] - 1e-12:
                best = (mean, Rule(size, weight))
    assert best is not None
    return best[1]


class Hybrid:
    def __init__(self, zoo: Zoo, k: int = 5, rule: Rule | None = None) -> None:
        """``rule``: by default fitted on ``zoo`` (``fit_rule``) when it has its LogME
        matrix, else ``DEFAULT_RULE``."""
        self.scorer = LearnedScorer(zoo, k)
        if rule is None:
            rule = fit_rule(zoo, k) if zoo.logme is not None else DEFAULT_RULE
        self.rule = rule
        self.novelty = Novelty.fit(zoo, overlapping(zoo))

    def _logme(self, zoo: Zoo, query: Query, shortlist: list[int]) -> dict[int, float]:
        if query.logme is not None:
            return {e: query.logme[zoo.experts[e].name] for e in shortlist}
        if query.data is None:
            raise ConfigError("the hybrid needs the task's images for its shortlist's LogME")
        data = query.data
        models = [(zoo.experts[e], zoo.expert_model(e)) for e in shortlist]
        return {
            e: logme(f, data.labels)
            for e, f in zip(shortlist, extract_many(models, data), strict=True)
        }

    def __call__(self, zoo: Zoo, query: Query) -> list[Ranked]:
        embedding = need_embedding(query, "hybrid")
        predicted = self.scorer.model.predict(self.scorer.features(embedding, []))
        novelty = self.novelty.of(zoo, embedding)
        size = len(zoo.experts) if novelty["out_of_distribution"] else self.rule.shortlist
        shortlist = [int(e) for e in np.argsort(predicted, kind="stable")[:size]]
        known = self._logme(zoo, query, shortlist)
        values = np.zeros(len(zoo.experts))
        values[shortlist] = [known[e] for e in shortlist]
        scores = combine(predicted, values, shortlist, self.rule.weight)
        order = sorted(shortlist, key=lambda e: -known[e])
        logme_rank = {e: place + 1 for place, e in enumerate(order)}
        ranking = []
        for e in np.lexsort((np.arange(len(scores)), -scores)):
            evidence: dict[str, Any] = {"predicted_standardised_log_error": float(predicted[e])}
            if e in known:
                evidence.update(logme=known[e], logme_rank=logme_rank[e])
            ranking.append(Ranked(zoo.experts[e].name, float(scores[e]), evidence))
        return ranking


@register(
    "hybrid",
    summary="the learned scorer shortlists experts, LogME on their features of the images "
    "re-ranks them (every expert when the data is unlike the zoo's)",
    needs="images",
    runs="worker",
)
def _hybrid(zoo: Zoo, k: int) -> Recommender:
    return Hybrid(zoo, k)

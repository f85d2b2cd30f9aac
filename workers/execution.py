"""How this worker process's embeddings run on its CPU: the execution plan
(``app.task2vec.plans``), measured once per CPU model at warm-up and cached under the data
directory (``app.task2vec.calibration``); the default plan until then."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from app.services.serving import ZooState
from app.settings import Settings
from app.task2vec import plans
from app.task2vec.calibration import PlanCache, measured_plan, plan_key
from app.task2vec.datasets import LabelledImages
from app.task2vec.embedding import EmbedConfig, Embedding, embed
from app.task2vec.inputs import ProgressCallback
from app.task2vec.probes import ProbeNetwork
from app.zoo.tasks import materialize

log = logging.getLogger(__name__)

#: Measured plans, by CPU model, under the data directory.
PLAN_CACHE = Path("cache") / "execution-plans.json"
_PLAN: list[plans.ExecutionPlan] = [plans.DEFAULT]
#: The torch threads this process was given (0: never set).
_THREADS = [0]


def set_threads(threads: int) -> None:
    """The process's share of the cores for torch, kept to be asserted again per job."""
    _THREADS[0] = threads
    torch.set_num_threads(threads)


def embed_here(
    data: LabelledImages,
    config: EmbedConfig,
    probe: ProbeNetwork,
    progress: ProgressCallback | None = None,
) -> Embedding:
    """``embed`` with this process's plan and its share of the cores, set again first.

    The lanes take their count from the calling thread's OpenMP thread count, and FAISS
    shares torch's OpenMP runtime: its ``omp_set_num_threads`` (the index's searches, a
    zoo version loaded) writes the same per-thread count behind torch's back, while MKL keeps
    its own. With a count of one left behind, the Fisher ran in one lane with MKL's two-thread
    team spinning between its small products: on the starter zoo's configuration one lane
    took 120 s where two took 11.5 s (2 busy AMD EPYC cores)."""
    if _THREADS[0]:
        torch.set_num_threads(_THREADS[0])
    return embed(data, config, probe=probe, progress=progress, plan=plan())


def plan() -> plans.ExecutionPlan:
    """The plan this process's embeddings run with."""
    return _PLAN[0]


def measure(
    settings: Settings, state: ZooState, config: EmbedConfig, probe: ProbeNetwork
) -> plans.ExecutionPlan:
    """With ``T2V_EXECUTION_PLAN=measured``: the plan for the zoo's configuration on this CPU
    model, from the cache or timed now on the zoo's first task, and from now on this
    process's; otherwise the default plan, unmeasured. One that cannot be measured
    (a missing task, a plan the CPU's kernels refuse) leaves the default plan."""
    if settings.execution_plan == "default":
        return _PLAN[0]
    zoo, cache = state.zoo, PlanCache(settings.data_dir / PLAN_CACHE)
    try:
        cached = cache.get(plan_key(config.probe, config.image_size))
        if cached is None:
            split = zoo.protocol.split
            data = materialize(zoo.tasks[0], image_size=config.image_size, split=split)
            cached = measured_plan(cache, data, config, probe, references=zoo.embeddings)
        _PLAN[0] = cached
    except Exception:  # a plan is an optimisation: whatever fails, the default one runs
        log.warning("execution plan not measured; the default one is used", exc_info=True)
    return _PLAN[0]

"""Which execution plan (``plans.py``) is fastest on this CPU, measured once and remembered.

The plan the engine was tuned with (two lanes of one thread, channels-last) was measured on
one 2-core AMD EPYC; on a 2-core Xeon with AVX-512 and AMX the batch estimators ran slower
than the reference with it. So a worker, on its first start on a CPU model, times each
candidate plan on a short embedding of the configuration it serves (interleaved rounds, the
best of each plan's runs, so that a burst of load elsewhere hurts every plan alike) and
keeps the fastest in a small JSON file under the data directory, keyed by CPU model, torch
version, probe and image size. Later starts on the same model read it back; a file that does
not parse is ignored and written again.

bfloat16 autocast is tried only on CPUs that multiply bfloat16 natively (the ``avx512_bf16``
or ``amx_bf16`` flags) and kept only when it is faster and its embedding is the float32 one's:
a correlation of the log-embeddings of at least ``MIN_CORRELATION`` and the same order of the
reference tasks (the zoo's) by distance.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.task2vec.datasets import LabelledImages
from app.task2vec.distances import symmetric
from app.task2vec.embedding import EmbedConfig, Embedding, embed, resolve_device
from app.task2vec.errors import ConfigError
from app.task2vec.plans import CANDIDATES, DEFAULT, ExecutionPlan
from app.task2vec.probes import ProbeNetwork
from app.task2vec.sampling import stratified_subset

log = logging.getLogger(__name__)

#: Least correlation of the log-embeddings (bfloat16 against float32) for bfloat16 to be used.
MIN_CORRELATION = 0.99
#: Nearest reference tasks whose order bfloat16 must keep.
RANKED = 5
#: Images of the task a calibration embeds (a stratified subset).
CALIBRATION_IMAGES = 256
#: CPU flags under which bfloat16 products run natively.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CACHE_FORMAT = 1
#: A plan this many times slower than the best after a round is not timed again.
HOPELESS = 3.0

Trial = Callable[[ExecutionPlan], object]


def _cpuinfo(field_name: str) -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}\s*:\s*(.*)$", text, flags=re.MULTILINE)
    return found.group(1).strip() if found else None


def cpu_model() -> str:
    """The CPU's model name, as the kernel reports it (the plan cache's key and every
    benchmark figure's label)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    return frozenset((_cpuinfo("flags") or "").split())


def bf16_capable(flags: Iterable[str] | None = None) -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX)."""
    return bool(BF16_FLAGS & set(cpu_flags() if flags is None else flags))


def plan_key(probe: str, image_size: int, model: str | None = None) -> str:
    """What a measured plan holds for: the CPU model, torch, the probe at its input size."""
    return f"{model or cpu_model()} | torch {torch.__version__} | {probe} @ {image_size} px"


@dataclass(frozen=True)
class Calibration:
    """The plan chosen, each plan's best time and, when bfloat16 was tried, its fidelity."""

    plan: ExecutionPlan
    seconds: dict[str, float]
    fidelity: dict[str, Any] | None = None


class PlanCache:
    """Measured plans in one JSON file: ``{"format": 1, "plans": {key: {...}}}``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _entries(self) -> dict[str, Any]:
        try:
            stored = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("plan cache %s ignored: unreadable (%s)", self.path, exc)
            return {}
        if not isinstance(stored, dict) or stored.get("format") != CACHE_FORMAT:
            log.warning("plan cache %s ignored: not a plan cache", self.path)
            return {}
        plans = stored.get("plans")
        return plans if isinstance(plans, dict) else {}

    def get(self, key: str) -> ExecutionPlan | None:
        entry = self._entries().get(key)
        try:
            return ExecutionPlan.from_dict(entry.get("plan") if isinstance(entry, dict) else None)
        except ConfigError:
            if entry is not None:
                log.warning("plan cache %s: the entry for %r is ignored", self.path, key)
            return None

    def put(self, key: str, calibration: Calibration) -> None:
        """Store the calibration under ``key`` (atomically: a reader sees the old file or the
        new one)."""
        entries = self._entries()
        entries[key] = {
            "plan": calibration.plan.as_dict(),
            "seconds": calibration.seconds,
            "fidelity": calibration.fidelity,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": CACHE_FORMAT, "plans": entries}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)


def time_plans(
    candidates: Sequence[ExecutionPlan],
    trial: Trial,
    timer: Callable[[], float] = time.perf_counter,
    rounds: int = 2,
) -> dict[ExecutionPlan, float]:
    """Each plan's best time of ``trial`` over ``rounds`` interleaved rounds. A plan more
    than ``HOPELESS`` times slower than the best after a round is not run again (one lane
    of two threads took ten times two lanes' on busy cores)."""
    if not candidates or rounds < 1:
        raise ConfigError("a calibration needs at least one plan and one round")
    best = dict.fromkeys(candidates, math.inf)
    for _ in range(rounds):
        fastest = min(best.values())
        for plan in candidates:
            if best[plan] > HOPELESS * fastest:
                continue
            started = timer()
            trial(plan)
            best[plan] = min(best[plan], timer() - started)
    return best


@dataclass
class Fidelity:
    """How close a bfloat16 embedding is to the float32 one (see the module)."""

    correlation: float
    same_ranking: bool
    holds: bool = field(init=False)

    def __post_init__(self) -> None:
        self.holds = self.correlation >= MIN_CORRELATION and self.same_ranking


def fidelity(
    fp32: Embedding, bf16: Embedding, references: Sequence[Embedding], ranked: int = RANKED
) -> Fidelity:
    """Correlation of the log-embeddings, and whether the ``ranked`` nearest references
    (symmetric distance) come in the same order for both."""
    a, b = (np.log(np.maximum(e.hessian.astype(np.float64), 1e-30)) for e in (fp32, bf16))
    correlation = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    if not math.isfinite(correlation):
        correlation = 0.0

    def order(e: Embedding) -> list[int]:
        distances = [symmetric(r, e) for r in references]
        return sorted(range(len(references)), key=lambda i: (distances[i], i))[:ranked]

    return Fidelity(correlation, order(fp32) == order(bf16))


def calibrate(
    trial: Trial,
    check_bf16: Callable[[ExecutionPlan], Fidelity] | None = None,
    timer: Callable[[], float] = time.perf_counter,
    candidates: Sequence[ExecutionPlan] = CANDIDATES,
    rounds: int = 2,
) -> Calibration:
    """The fastest float32 plan; then, when ``check_bf16`` is given (the CPU has bfloat16),
    that plan with bfloat16 if it is faster and ``check_bf16(plan)`` finds it faithful."""
    seconds = time_plans(candidates, trial, timer, rounds)
    best = min(candidates, key=lambda p: (seconds[p], candidates.index(p)))
    report: dict[str, Any] | None = None
    if check_bf16 is not None:
        bf16 = replace(best, bf16=True)
        seconds.update(time_plans([bf16], trial, timer, rounds))
        found = check_bf16(bf16)
        report = {"correlation": round(found.correlation, 5), "same_ranking": found.same_ranking}
        if found.holds and seconds[bf16] < seconds[best]:
            best = bf16
    times = {plan.name: round(s, 4) for plan, s in seconds.items()}
    return Calibration(best, times, report)


def trial_config(config: EmbedConfig) -> EmbedConfig:
    """A short embedding of ``config`` for timing plans: a few batches of images and draws,
    one epoch of the head; the probe, image size and estimator are the configuration's."""
    batches = 4 * config.batch_size
    return replace(
        config,
        max_samples=max(min(config.max_samples, batches), config.batch_size),
        fisher_samples=max(min(config.fisher_samples, batches), config.batch_size),
        head_epochs=min(config.head_epochs, 1),
    )


def measured_plan(
    cache: PlanCache,
    data: LabelledImages,
    config: EmbedConfig,
    probe: ProbeNetwork,
    references: Sequence[Embedding] = (),
    timer: Callable[[], float] = time.perf_counter,
) -> ExecutionPlan:
    """The plan for ``config`` on this CPU: the cached one, or one calibrated now on ``data``
    (a few hundred images of a real task) and cached. bfloat16 is tried where the CPU has
    it and ``references`` (embeddings of the same configuration) are given."""
    if resolve_device(config.device).type != "cpu":
        return DEFAULT
    key = plan_key(config.probe, config.image_size)
    cached = cache.get(key)
    if cached is not None:
        return cached
    if len(data) > CALIBRATION_IMAGES:
        kept = stratified_subset(data.labels, CALIBRATION_IMAGES, torch.Generator().manual_seed(0))
        data = data.subset(kept)
    small = trial_config(config)

    def trial(plan: ExecutionPlan) -> object:
        return embed(data, small, probe=probe, plan=plan)

    def check_bf16(plan: ExecutionPlan) -> Fidelity:
        served = replace(config, max_samples=min(config.max_samples, len(data)))
        fp32 = embed(data, served, probe=probe, plan=replace(plan, bf16=False))
        return fidelity(fp32, embed(data, served, probe=probe, plan=plan), references)

    capable = bf16_capable() and len(references) > 1
    calibration = calibrate(trial, check_bf16 if capable else None, timer)
    cache.put(key, calibration)
    log.info(
        "execution plan for %s: %s (seconds %s, bfloat16 %s)",
        key,
        calibration.plan.name,
        calibration.seconds,
        calibration.fidelity if capable else "not available on this CPU",
    )
    return calibration.plan

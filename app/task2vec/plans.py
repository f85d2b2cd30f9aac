"""How the engine runs on a CPU: its execution plan.

A plan changes how the same arithmetic is laid out on the machine, never which embedding is
computed (bfloat16 excepted, which is admitted only where it keeps the embedding, see
``calibration.py``):

* ``lanes``: independent batches side by side, each on its share of torch's threads
  (``lanes.py``), or one batch at a time on all of them;
* ``channels_last``: the probe and its inputs in oneDNN's layout (NHWC), or torch's default;
* ``bf16``: forward and backward passes under CPU autocast to bfloat16, for CPUs that
  multiply bfloat16 natively (AVX-512 BF16, AMX).

Which plan is fastest depends on the CPU: two lanes of one thread beat one lane of two
threads on the 2-core AMD EPYC the defaults were tuned on, and lost on a 2-core Xeon. A worker
times the candidates once per CPU model (``calibration.py``); ``embed`` runs with the plan
it is given, or with the one set for the block by ``using``, or with ``DEFAULT``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any

import torch

from app.task2vec.errors import ConfigError


@dataclass(frozen=True)
class ExecutionPlan:
    """Lanes, memory layout and number format of the CPU's passes (see the module)."""

    lanes: int = 2
    channels_last: bool = True
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.lanes < 1:
            raise ConfigError(f"an execution plan needs at least one lane, not {self.lanes}")

    @property
    def name(self) -> str:
        layout = "channels-last" if self.channels_last else "contiguous"
        number = ", bf16" if self.bf16 else ""
        return f"{self.lanes} lane{'s' if self.lanes > 1 else ''}, {layout}{number}"

    def memory_format(self, device: torch.device) -> torch.memory_format:
        """The layout of the probe and its inputs on ``device`` (the plan is the CPU's)."""
        if device.type == "cpu" and self.channels_last:
            return torch.channels_last
        return torch.contiguous_format

    def autocast(self, device: torch.device) -> Any:
        """A context for one pass: bfloat16 autocast when the plan asks for it on a CPU."""
        if device.type == "cpu" and self.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> ExecutionPlan:
        """A plan from ``as_dict``'s output; ``ConfigError`` for anything else."""
        if not isinstance(values, dict) or set(values) != {"lanes", "channels_last", "bf16"}:
            raise ConfigError(f"not an execution plan: {values!r}")
        lanes, channels_last, bf16 = values["lanes"], values["channels_last"], values["bf16"]
        if type(lanes) is not int or type(channels_last) is not bool or type(bf16) is not bool:
            raise ConfigError(f"not an execution plan: {values!r}")
        return cls(lanes, channels_last, bf16)


#: The plan tuned on the 2-core AMD EPYC (docs/engine.md): two lanes, channels-last, float32.
DEFAULT = ExecutionPlan()
#: The float32 plans a calibration times.
CANDIDATES = (
    ExecutionPlan(2, True),
    ExecutionPlan(1, True),
    ExecutionPlan(2, False),
    ExecutionPlan(1, False),
)

_CURRENT: ContextVar[ExecutionPlan] = ContextVar("execution_plan", default=DEFAULT)


def current() -> ExecutionPlan:
    """The plan the engine runs with in this context."""
    return _CURRENT.get()


@contextmanager
def using(plan: ExecutionPlan) -> Iterator[ExecutionPlan]:
    """Run the block's embeddings with ``plan``."""
    token = _CURRENT.set(plan)
    try:
        yield plan
    finally:
        _CURRENT.reset(token)

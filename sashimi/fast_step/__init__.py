"""Everything that exists only for generation speed; the reference math (SaShiMi.step, prime,
initial_state) stays in model.py and every path here is tested against it
(tests/test_fast_step.py).

    fused.py       FusedStep: the whole per-sample step and its sampling as one numba routine,
                   the CPU's path (Generator.fused)
    torch_step.py  TorchStep: model.step for a batch of clips, guided; PeriodGraph, its CUDA graph;
                   step_settings, the CPU thread settings for small torch steps
"""

from .fused import FusedStep
from .torch_step import PeriodGraph, TorchStep, step_settings

__all__ = ["FusedStep", "PeriodGraph", "TorchStep", "step_settings"]

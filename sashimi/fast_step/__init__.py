"""Everything that exists only for generation speed; the reference math (SaShiMi.step, prime,
initial_state) stays in model.py and every path here is tested against it
(tests/test_fast_step.py).

    fused.py       FusedStep: the whole per-sample step and its sampling as one numba routine,
                   the CPU's path (Generator.fused); SplitFusedStep, the clips in two groups
                   stepped at once on two cores; fused_step, which of the two a batch gets
    torch_step.py  TorchStep: model.step for a batch of clips, guided; draw_and_step, one sample
                   drawn and stepped on; PeriodGraph, its CUDA graph; step_settings, the CPU
                   thread settings for small torch steps
"""

from .fused import FusedStep, SplitFusedStep, fused_step
from .torch_step import PeriodGraph, TorchStep, draw_and_step, step_settings

__all__ = [
    "FusedStep",
    "PeriodGraph",
    "SplitFusedStep",
    "TorchStep",
    "draw_and_step",
    "fused_step",
    "step_settings",
]

"""The torch step for generation: where the fused step does not run (CUDA, or Generator.fused off).

TorchStep is model.step for a batch of clips that owns its state and guides as FusedStep does. On
CUDA, PeriodGraph captures one period of the schedule (total_pool steps with their sampling) as a
CUDA graph and replays it: one launch per period instead of thousands of small kernels, the way
Mamba's generation replays a captured step. On the CPU, step_settings holds the thread settings
that measured fastest for one small step at a time.
"""

import contextlib
import logging
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from ..model import SaShiMi, SaShiMiState

log = logging.getLogger(__name__)


class TorchStep:
    """model.step for `batch` clips on a state of `batch` rows, or of 2 batch rows when guided:
    rows [0, batch) hold the clips' labels, rows [batch, 2 batch) every field unknown, and both
    halves read the clip's token. Calls return logits (batch, n_classes) to sample from and
    advance self.state."""

    def __init__(self, model: SaShiMi, state: SaShiMiState, batch: int, guidance: float = 1.0):
        self.model, self.state, self.batch, self.rows = model, state, batch, state.rows()
        self.guided = self.rows != batch
        # a tensor, so that a CUDA graph reads the weight set_guidance last wrote
        self.guidance = torch.tensor(guidance, device=model.head.weight.device)

    def set_guidance(self, weight: float) -> None:
        with torch.inference_mode():  # the tensor was made in inference mode, with the state
            self.guidance.fill_(weight)

    def combine(self, logits: Tensor) -> Tensor:
        """(rows, n_classes) -> (batch, n_classes): l_unknown + w (l_given - l_unknown). Keeps
        every row's logits, which score the class drawn next (log_prob)."""
        self.row_logits = logits
        if not self.guided:
            return logits
        return torch.lerp(logits[self.batch :], logits[: self.batch], self.guidance)

    def log_prob(self, token: Tensor) -> Tensor:
        """The log-probability of each clip's class token (batch,) in every state row, from the
        logits the last step left, float64 (rows,): under the clip's own labels, and when guided
        then under every field unknown."""
        log_probs = torch.log_softmax(self.row_logits.double(), dim=-1)
        return log_probs.gather(1, self._per_row(token)[:, None])[:, 0]

    def _per_row(self, token: Tensor) -> Tensor:
        """Each state row's class: its clip's, for both rows of a guided clip."""
        return token.repeat(2) if self.guided else token

    def __call__(self, token: Tensor) -> Tensor:
        logits, self.state = self.model.step(self._per_row(token), self.state)
        return self.combine(logits)


def draw_and_step(
    step: TorchStep, sampler, logits: Tensor, j: int, out: Tensor, log_probs: Tensor | None
) -> Tensor:
    """Sample j of every clip: its class drawn from logits into out[:, j] (and its
    log-probability in every state row into log_probs[:, j] when given), then the step on it; the
    next logits."""
    token = sampler(logits, j)
    out[:, j] = token
    if log_probs is not None:
        log_probs[:, j] = step.log_prob(token)
    return step(token)


def copy_state_(target: SaShiMiState, source: SaShiMiState) -> None:
    """Write the tensors that stepping changes (each S4 layer's x, each tier's upsampled outputs)
    from source into target's own, at a period boundary (no pending inputs in either)."""
    for to, from_ in zip(target.tiers, source.tiers, strict=True):
        assert not to.pending and not from_.pending, "copy at a period boundary only"
        to.upsampled.copy_(from_.upsampled)
    stacks_to = [tier.stack for tier in target.tiers] + [target.center]
    stacks_from = [tier.stack for tier in source.tiers] + [source.center]
    for to, from_ in zip(stacks_to, stacks_from, strict=True):
        for x_to, x_from in zip(to.x, from_.x, strict=True):
            x_to.copy_(x_from)


class PeriodGraph:
    """CUDA only: one period of the schedule (total_pool steps with their sampling), captured once
    as a CUDA graph and replayed.

    The first full period runs eagerly as a warm-up (it loads the kernels); the second is captured.
    A graph reads and writes fixed memory only, while model.step returns new tensors: so the
    captured period ends by copying its last state into the tensors of the state it started from
    (copy_state_), and step.state is that state again. Capture records the kernels without running
    them; the Python side runs, but a whole period leaves every tier at the phase it had.
    """

    def __init__(self, step: TorchStep, sampler, period: int, scoring: bool = False):
        self.step, self.sampler, self.period, self.scoring = step, sampler, period, scoring
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmed_up = self.failed = False

    def replay(self, logits: Tensor, out: Tensor, log_probs: Tensor | None) -> Tensor | None:
        """One period into out (batch, period), and when scoring each class's log-probability
        into log_probs (rows, period); the next logits, or None if the caller must step (while
        warming up, or after a failed capture)."""
        if self.failed:
            return None
        if self.graph is None:
            if not self.warmed_up:
                self.warmed_up = True
                return None
            self._capture(logits)
            if self.failed:
                return None
        self.logits.copy_(logits)
        self.graph.replay()
        out.copy_(self.tokens)
        if log_probs is not None:
            log_probs.copy_(self.log_probs)
        return self.logits

    def _capture(self, logits: Tensor) -> None:
        self.logits = logits.clone()
        self.tokens = torch.empty(
            logits.shape[0], self.period, dtype=torch.long, device=logits.device
        )
        self.log_probs = torch.zeros(
            self.step.rows, self.period, dtype=torch.float64, device=logits.device
        )
        start = self.step.state
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                next_logits = self.logits
                scores = self.log_probs if self.scoring else None
                for j in range(self.period):
                    next_logits = draw_and_step(
                        self.step, self.sampler, next_logits, j, self.tokens, scores
                    )
                self.logits.copy_(next_logits)
                copy_state_(start, self.step.state)
        except RuntimeError as error:  # keep generating step by step, and say why
            log.warning("CUDA graph capture failed; stepping without graphs: %s", error)
            self.failed = True
            return
        finally:
            self.step.state = start  # what the graph reads and writes, at the same phase
        self.graph = graph


class _CpuStepSettings:
    """One thread and no oneDNN while any generation runs on the CPU; the previous settings back
    when the last one ends. Both are process-wide, so concurrent generations (the web UI's
    --concurrency) share one switch: the first to start sets it, the last to finish restores it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: tuple[int, bool] = (1, True)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = (torch.get_num_threads(), torch.backends.mkldnn.enabled)
                torch.set_num_threads(1)
                torch.backends.mkldnn.enabled = False
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    torch.set_num_threads(self._saved[0])
                    torch.backends.mkldnn.enabled = self._saved[1]


_cpu_step_settings = _CpuStepSettings()


@contextlib.contextmanager
def step_settings(device: torch.device) -> Iterator[None]:
    """Inference mode, plus on the CPU the settings that measured fastest for the per-sample torch
    step (benchmarks/bench_generation.py, sc09, 2 cores): one thread, since two threads synchronise
    around every small op (1.5x fewer steps/s at batch 1, 7-25x fewer at batch 16), and no oneDNN,
    whose GELU on a few hundred floats costs 10-25 us against 3-4 us (1.2x the steps/s at batch 1
    without it)."""
    with torch.inference_mode():
        if device.type != "cpu":
            yield
            return
        with _cpu_step_settings():
            yield

"""The sampling engine: one code path for `python -m sashimi.render`, the web UI and training.

A model trained in convolution mode generates as an RNN, in constant time and memory per sample:

    logits, state = model.prime([start] + prompt)   # no prompt: step(start, initial_state(B))
    repeat:  token ~ softmax(logits / T) cut by top-k / top-p;   logits, state = model.step(token, state)

A labelled model can be guided (sashimi/guidance.py): each clip runs as two rows of one batch, one
with its labels and one with every field unknown, and sampling reads
logits_unknown + w (logits_given - logits_unknown), w changing where the Guidance says.

The step runs the outer tier every sample and tier i every prod(pool[:i]) samples, from discrete
parameters computed once in the state; it is sashimi/fast_step's: on the CPU one compiled routine
per sample (FusedStep), elsewhere model.step (TorchStep), on CUDA replayed as a graph.

Sampling is Gumbel-max: argmax(logits / T + g), with g = -log(-log U) for U uniform on (0, 1), is a
draw from softmax(logits / T). The noise is drawn ahead in blocks, clip r of a batch from its own
torch.Generator seeded `seed + r`: the same seed gives the same clip whatever the batch around it
(up to float round-off, which can differ between batch sizes), and no generator call sits in the
per-sample loop, so a CUDA graph can replay it.
"""

import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .audio import decode, encode
from .checkpoint import DEFAULT_CHECKPOINT, is_checkpoint, load_checkpoint
from .fast_step import (
    FusedStep,
    PeriodGraph,
    SplitFusedStep,
    TorchStep,
    draw_and_step,
    fused_step,
    step_settings,
)
from .guidance import Guidance
from .labels import UNKNOWN, Labels, check_labels, label_tensor
from .model import SaShiMi

log = logging.getLogger(__name__)

CHUNK_SECONDS = 0.25  # default length of the pieces `stream` yields
# At or below this temperature sampling is the argmax (T = 0 asks for it; 1/T would be inf). Just
# above, it already is in effect: float32 Gumbel noise spans ~19 (from -2.8 to 16.6), so at
# T = 1e-4 only logits within 0.002 of the best could still win.
GREEDY_TEMPERATURE = 1e-4


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device to run on: "auto" is CUDA when present, else the CPU. The only place that
    picks a device; a CUDA device asked for on a machine without one is a ValueError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} asked for, but torch sees no CUDA GPU; use cpu or auto"
        )
    return device


def per_clip(value, batch_size: int, name: str) -> list:
    """`value` for each of batch_size clips: one value for all, or a sequence of one per clip."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        return [value] * batch_size
    if len(value) != batch_size:
        raise ValueError(f"{name} has {len(value)} values for {batch_size} clips")
    return list(value)


def clip_seeds(seed: int | Sequence[int], batch_size: int) -> list[int]:
    """The seed of each clip: seed + r for clip r of a batch, or one given per clip."""
    if isinstance(seed, Sequence):
        return per_clip(seed, batch_size, "seed")
    return [seed + r for r in range(batch_size)]


def check_sampling(
    num_samples: int,
    *,
    batch_size: int = 1,
    temperature: float | Sequence[float] = 1.0,
    top_p: float | Sequence[float] = 1.0,
    top_k: int = 0,
    chunk_size: int | None = None,
    guidance: float | Guidance = 1.0,
) -> None:
    """Raise ValueError, naming the value and the accepted range, for unusable arguments.
    temperature and top_p: one value for all clips, or one per clip."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be 0 or more, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for t in per_clip(temperature, batch_size, "temperature"):
        if not t >= 0 or math.isinf(t):  # also rejects NaN
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t}")
    for p in per_clip(top_p, batch_size, "top_p"):
        if not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p}")
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (off) or a positive number of classes, got {top_k}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 sample, got {chunk_size}")
    Guidance.of(guidance).check()


class Sampler:
    """Draws the next class of each clip: temperature, top-k, top-p (nucleus), then a draw.

    Noise comes in blocks from `draw_noise(k)`, one torch.Generator per clip; __call__(logits, j)
    uses block column j. Greedy (temperature <= GREEDY_TEMPERATURE) takes the argmax and no noise.

    seed, temperature and top_p are one value for the batch or one per clip (the web UI samples
    requests that arrive together as one batch). One value is kept as a Python float; values
    that differ are a column (batch, 1) that broadcasts over the classes.
    """

    def __init__(
        self,
        batch: int,
        n_classes: int,
        block: int,
        device: torch.device,
        seed: int | Sequence[int],
        temperature: float | Sequence[float] = 1.0,
        top_k: int = 0,
        top_p: float | Sequence[float] = 1.0,
    ):
        temperatures = per_clip(temperature, batch, "temperature")
        top_ps = per_clip(top_p, batch, "top_p")
        greedy = [t <= GREEDY_TEMPERATURE for t in temperatures]
        self.greedy = all(greedy)
        # greedy clips in a batch that samples the others take the argmax, row by row
        self.greedy_rows = (
            torch.tensor(greedy, device=device) if any(greedy) != self.greedy else None
        )
        inverse = [1.0 / max(t, GREEDY_TEMPERATURE) for t in temperatures]
        self.inverse_temperature = _float_or_column(inverse, device)
        self.top_k = top_k if 0 < top_k < n_classes else 0  # k >= n_classes keeps every class
        self.nucleus = min(top_ps) < 1
        # top_p = 1 as inf: the mass before a class, 1 give or take round-off, never reaches it
        self.top_p = _float_or_column([p if p < 1 else math.inf for p in top_ps], device)
        self.generators = [torch.Generator(device).manual_seed(s) for s in clip_seeds(seed, batch)]
        self.noise = torch.empty(batch, block, n_classes, device=device)  # Gumbel noise g

    def draw_noise(self, k: int) -> None:
        """Fill columns [0, k) of the noise block: per clip, k x n_classes uniforms -> Gumbel."""
        if self.greedy:
            return
        for row, generator in zip(self.noise, self.generators, strict=True):
            torch.rand(row[:k].shape, generator=generator, out=row[:k])
        g = self.noise[:, :k]
        g.log_().neg_().log_().neg_()  # g = -log(-log U); U = 0 gives -inf: never drawn

    def __call__(self, logits: Tensor, j: int) -> Tensor:
        """logits (batch, n_classes) -> classes (batch,) long, using noise column j."""
        if self.greedy:
            return logits.argmax(-1)
        if self.top_k:
            kth_largest = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth_largest, -math.inf)
        if self.nucleus:
            logits = self._nucleus(logits)
        if isinstance(self.inverse_temperature, float):
            # g + logits / T in one op: the scale is a Python float, so no tensor is made for it
            drawn = torch.add(self.noise[:, j], logits, alpha=self.inverse_temperature)
        else:
            drawn = torch.addcmul(self.noise[:, j], logits, self.inverse_temperature)
        if self.greedy_rows is None:
            return drawn.argmax(-1)
        return torch.where(self.greedy_rows, logits.argmax(-1), drawn.argmax(-1))

    def _nucleus(self, logits: Tensor) -> Tensor:
        """Keep the most likely classes until their probability reaches top_p (the first always)."""
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(ordered * self.inverse_temperature, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        ordered = ordered.masked_fill(mass_before >= self.top_p, -math.inf)
        return torch.empty_like(logits).scatter_(-1, order, ordered)


def _float_or_column(values: list[float], device: torch.device) -> float | Tensor:
    """One value for every clip as a float, else a column (batch, 1) on the device."""
    if len(set(values)) == 1:
        return values[0]
    return torch.tensor(values, device=device)[:, None]


class Generator:
    """Samples audio from a SaShiMi model: batched, seeded, primed from a prompt, streamed.

    The model is moved to `device` and put in eval mode (in place, as nn.Module.to does).
    """

    def __init__(
        self, model: SaShiMi, device: str | torch.device = "auto", metadata: dict | None = None
    ):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.sample_rate = self.config.sample_rate
        self.metadata = metadata if metadata is not None else {}
        # The one choice of how to step: on the CPU the fused step (sashimi/fast_step, one
        # compiled routine per sample with its sampling), elsewhere torch's step, which a CUDA
        # graph replays. Set fused = False to generate with torch's step on the CPU too.
        self.fused = self.device.type == "cpu"
        log.info(
            "generation steps with %s",
            "the fused CPU step (sashimi/fast_step/fused.py)"
            if self.fused
            else f"torch's step: the fused step is CPU code and this is {self.device.type}",
        )

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path = DEFAULT_CHECKPOINT, device: str | torch.device = "auto"
    ) -> "Generator":
        directory = Path(directory)
        if directory == DEFAULT_CHECKPOINT and not is_checkpoint(directory):
            raise FileNotFoundError(
                f"no checkpoint at the default place {directory}; pass a checkpoint folder, "
                "e.g. one written by `python -m train` (runs/NAME/best)"
            )
        device = resolve_device(device)
        model, metadata = load_checkpoint(directory, device=device)
        return cls(model, device, metadata)

    # --- priming ---------------------------------------------------------------------------------

    def prompt_tokens(self, prompt: np.ndarray) -> Tensor:
        """Mono float audio at the model's rate -> its classes (T,) on the device."""
        prompt = np.asarray(prompt)
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError(
                f"prompt must be mono audio with shape (samples,), got shape {prompt.shape}"
            )
        if not np.isfinite(prompt).all():
            raise ValueError("prompt holds non-finite samples (NaN or inf)")
        audio = torch.as_tensor(prompt, dtype=torch.float32, device=self.device)
        return encode(audio, self.config.quantization, self.config.n_classes)

    def label_rows(self, labels: Labels | list[Labels] | None, batch_size: int) -> Tensor | None:
        """The label indices (batch_size, n_fields) of the clips, on the device; None for none.

        labels: one dict for every clip, or a list of one dict per clip ({} leaves every field
        unknown). An unknown field or value is a ValueError naming the known ones.
        """
        if labels is None:
            return None
        per_clip = [labels] * batch_size if isinstance(labels, dict) else list(labels)
        if len(per_clip) != batch_size:
            raise ValueError(f"labels has {len(per_clip)} entries for {batch_size} clips")
        for clip in per_clip:
            check_labels(self.config.labels, clip)
        if not self.config.labels:
            return None
        return label_tensor(self.config.labels, per_clip).to(self.device)

    def start(
        self,
        batch_size: int,
        prompt: np.ndarray | None = None,
        labels: Tensor | None = None,
        guidance: float | Guidance = 1.0,
    ) -> tuple[Tensor, "TorchStep | FusedStep | SplitFusedStep"]:
        """The logits for the first new sample (batch, n_classes) and the step that goes on from
        there, holding the state (two rows per clip when guided): a fused step when self.fused
        (fast_step.fused_step), else a TorchStep.

        No prompt: one step on the start token. A prompt: one parallel pass over [start] + prompt
        (model.prime), once for an unlabelled model and its state then copied to each clip, or
        for every row with its labels; the first new sample is the one right after the prompt's
        last. labels (batch, n_fields) from label_rows, or None. The step guides at the weight of
        the first new sample (the caller changes it where the Guidance says).
        """
        guidance = Guidance.of(guidance)
        weight = guidance.first_weight(self.sample_rate)
        if labels is not None and guidance.guided:
            labels = torch.cat([labels, torch.full_like(labels, UNKNOWN)])
        rows = batch_size if labels is None else labels.shape[0]
        stepper = fused_step if self.fused else TorchStep
        with step_settings(self.device):
            if prompt is None:
                step = stepper(
                    self.model, self.model.initial_state(rows, labels), batch_size, weight
                )
                start = torch.full((batch_size,), self.model.start_token, device=self.device)
                return step(start), step
            start = torch.tensor([self.model.start_token], device=self.device)
            tokens = torch.cat([start, self.prompt_tokens(prompt)])[None]
            if labels is None:
                logits, state = self.model.prime(tokens)
                state = state.for_batch(rows)
                logits = logits[:, -1].expand(rows, -1)
            else:
                logits, state = self.model.prime(tokens.expand(rows, -1), labels)
                logits = logits[:, -1]
            step = stepper(self.model, state, batch_size, weight)
            return step.combine(logits), step

    # --- generation ------------------------------------------------------------------------------

    def stream(
        self,
        num_samples: int,
        *,
        batch_size: int = 1,
        temperature: float | Sequence[float] = 1.0,
        top_p: float | Sequence[float] = 1.0,
        top_k: int = 0,
        seed: int | Sequence[int] = 0,
        prompt: np.ndarray | None = None,
        chunk_size: int | None = None,
        show_progress: bool = True,
        progress: Callable[[int, int], None] | None = None,
        labels: Labels | list[Labels] | None = None,
        guidance: float | Guidance = 1.0,
        log_probs: bool = False,
    ) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield new audio, float32 (batch_size, n) in [-1, 1], chunk by chunk, num_samples in all.

        chunk_size defaults to CHUNK_SECONDS of audio. A prompt (mono float audio at the model's
        rate) is read first and not repeated in the output. progress(done, total) is called after
        each chunk. Memory stays constant however many samples are asked for. labels: for a
        labelled checkpoint, one dict for all clips or one per clip, e.g. {"digit": "7"}; fields
        left out are unknown. guidance: the weight w of classifier-free guidance (1 = none), or a
        Guidance whose weight changes after its first seconds (DEFAULT_GUIDANCE).
        seed (clip r: seed + r), temperature and top_p: one value for all, or one per clip.
        log_probs: yield (audio, log-probabilities) instead, float64 (batch_size, n), or when
        guided (2 batch_size, n): each sample's natural log-probability under the clip's own
        labels, as log_likelihood scores it (the model unguided), and when guided then under
        every field unknown (row batch_size + r for clip r), scored while sampling instead of in
        a second pass.
        """
        check_sampling(
            num_samples,
            batch_size=batch_size,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            chunk_size=chunk_size,
            guidance=guidance,
        )
        chunk_size = chunk_size or max(1, round(CHUNK_SECONDS * self.sample_rate))
        period = self.config.total_pool  # the multi-rate schedule repeats every `period` samples
        rows = self.label_rows(labels, batch_size)
        guidance = Guidance.of(guidance)
        logits, step = self.start(batch_size, prompt, rows, guidance)
        sampler = Sampler(
            batch_size, self.config.n_classes, period, self.device, seed, temperature, top_k, top_p
        )
        position = 1 if prompt is None else 1 + len(prompt)  # tokens read: start (+ prompt)
        switch = guidance.switch_sample(self.sample_rate) if rows is not None else None
        run = _Sampling(logits, step, sampler, position, period, self.device, log_probs)
        run.switch_guidance(switch, guidance.after)
        done = 0
        with tqdm(
            total=num_samples, unit="sample", disable=not show_progress, file=sys.stderr
        ) as bar:
            while done < num_samples:
                with step_settings(self.device):
                    tokens, scores = run.sample(min(chunk_size, num_samples - done))
                    audio = decode(tokens, self.config.quantization, self.config.n_classes)
                done += tokens.shape[1]
                bar.update(tokens.shape[1])
                if progress is not None:
                    progress(done, num_samples)
                audio = audio.float().cpu().numpy()
                yield (audio, scores.cpu().numpy()) if log_probs else audio

    def generate(self, num_samples: int, **kwargs) -> np.ndarray:
        """All of `stream` at once: float32 (batch_size, num_samples)."""
        chunks = list(self.stream(num_samples, **kwargs))
        if not chunks:
            return np.zeros((kwargs.get("batch_size", 1), 0), dtype=np.float32)
        return np.concatenate(chunks, axis=1)

    # --- scoring ---------------------------------------------------------------------------------

    def log_likelihood(
        self, audio: np.ndarray, labels: Labels | list[Labels] | None = None
    ) -> np.ndarray:
        """Bits per sample of each clip under the model, (batch,): SaShiMi.sequence_bits over the
        clips' classes.

        audio: float (samples,) or (batch, samples) in [-1, 1] at the model's rate; labels as in
        stream (None: every field unknown).
        """
        audio = np.atleast_2d(np.asarray(audio, dtype=np.float32))
        if audio.ndim != 2 or audio.shape[1] == 0:
            raise ValueError(
                f"audio must have shape (samples,) or (batch, samples), got {audio.shape}"
            )
        targets = encode(  # a copy: the audio may be a read-only view (np.broadcast_to)
            torch.tensor(audio, device=self.device), self.config.quantization, self.config.n_classes
        )
        rows = self.label_rows(labels, audio.shape[0])
        with torch.inference_mode():
            bits = self.model.sequence_bits(list(targets), rows)
        return (bits / audio.shape[1]).cpu().numpy()


class _Sampling:
    """A generation under way: the logits for the next sample, the step that holds the state, the
    sampler, and how many samples the model has read (the phase of its multi-rate schedule)."""

    def __init__(
        self,
        logits: Tensor,
        step: "TorchStep | FusedStep | SplitFusedStep",
        sampler: Sampler,
        position: int,
        period: int,
        device: torch.device,
        scoring: bool = False,
    ):
        self.logits, self.step, self.sampler = logits, step, sampler
        self.position, self.period, self.device = position, period, device
        self.scoring = scoring
        cuda = device.type == "cuda"
        self.graph = PeriodGraph(step, sampler, period, scoring) if cuda else None
        self.switch: tuple[int, float] | None = None  # (position, guidance weight from there on)

    def switch_guidance(self, sample: int | None, weight: float) -> None:
        """Draw new sample `sample` (0: the first one this sampling draws) and the ones after it
        from logits guided at `weight`; None: never. The logits of sample i come from the step on
        sample i - 1, so the step's weight changes once i - 1 samples are drawn."""
        if sample:  # sample 0 was guided by Generator.start
            self.switch = (self.position + sample - 1, weight)
            self._maybe_switch()

    def _maybe_switch(self) -> None:
        if self.switch is not None and self.position == self.switch[0]:
            self.step.set_guidance(self.switch[1])
            self.switch = None

    def sample(self, n: int) -> tuple[Tensor, Tensor | None]:
        """The next n classes of every clip (batch, n), and when scoring their log-probabilities
        in every state row (rows, n) float64 (see Generator.stream), in runs that end where the schedule
        restarts, so that a full one can be a CUDA graph replay, and where guidance changes."""
        batch = self.sampler.noise.shape[0]
        tokens = torch.empty(batch, n, dtype=torch.long, device=self.device)
        log_probs = None
        if self.scoring:
            log_probs = torch.empty(self.step.rows, n, dtype=torch.float64, device=self.device)
        j = 0
        while j < n:
            k = min(self.period - self.position % self.period, n - j)
            if self.switch is not None:
                k = min(k, self.switch[0] - self.position)
            self.sampler.draw_noise(k)
            scores = None if log_probs is None else log_probs[:, j : j + k]
            self.logits = self._steps(k, tokens[:, j : j + k], scores)
            j, self.position = j + k, self.position + k
            self._maybe_switch()
        if not torch.isfinite(self.logits).all():  # argmax of NaN would go on, as noise
            raise FloatingPointError(
                f"logits are not finite after {self.position} samples (prompt included); "
                "the checkpoint's weights or the state have NaN or inf"
            )
        return tokens, log_probs

    def _steps(self, k: int, out: Tensor, log_probs: Tensor | None) -> Tensor:
        """k steps: draw a class per clip into out[:, j] (its log-probability in every state row
        into log_probs[:, j] when given), step on it. Returns the next logits."""
        if not isinstance(self.step, TorchStep):  # the draws and steps in one compiled call
            return self.step.run(k, self.logits, self.sampler, out, log_probs=log_probs)
        if self.graph is not None and k == self.period:
            next_logits = self.graph.replay(self.logits, out, log_probs)
            if next_logits is not None:
                return next_logits
        logits = self.logits
        for j in range(k):
            logits = draw_and_step(self.step, self.sampler, logits, j, out, log_probs)
        return logits

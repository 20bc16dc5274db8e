"""SaShiMi (Goel, Gu, Donahue & Ré 2022): a multi-scale U-Net of S4 layers over quantised raw audio.

Tier i runs at 1/prod(pool[:i]) of the sample rate with width d_model * expand**i:

    tokens -> embedding ─┬─> DownPool ─┬─> DownPool ─> centre: x + S4/FF stack ─┐
                         │ (skip)      │ (skip)                                 │
    logits <- head <─ x + stack(x) <─ UpPool + skip <─ x + stack(x) <─ UpPool + skip

Pooling folds p consecutive steps into channels; UpPool shifts its output one pooled step later, so the
samples of group g only see the inner tier's output for groups < g and nothing leaks from the future.
The same network runs in convolution mode (`forward`, `prime`) and recurrently (`initial_state`,
`step`): the outer tier steps every sample, tier i only every prod(pool[:i]) samples.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .audio import silence_token
from .config import SaShiMiConfig
from .labels import UNKNOWN
from .s4 import S4, DiagonalStep, DPLRStep

IGNORE_INDEX = -100  # target value of padding: scored by nothing (F.cross_entropy's ignore_index)


def is_label_parameter(name: str) -> bool:
    """Whether a state_dict name belongs to the label embeddings or their projections."""
    return name.startswith("label_embeddings.") or ".label_projections." in name


# --- teacher forcing and the metric ------------------------------------------------------------


def shift_inputs(targets: Tensor, start_token: int) -> Tensor:
    """Model inputs for next-sample prediction: the start token, then targets[:, :-1].

    Ignored (padding) targets become the start token, which is the quantised silence.
    """
    targets = targets.masked_fill(targets == IGNORE_INDEX, start_token)
    start = torch.full_like(targets[:, :1], start_token)
    return torch.cat([start, targets[:, :-1]], dim=1)


def pad_batch(tokens: list[Tensor], length: int, start_token: int) -> tuple[Tensor, Tensor]:
    """Stack token sequences into teacher-forcing pairs of `length`: targets are the tokens with
    IGNORE_INDEX after their end (the loss skips them); inputs are shift_inputs(targets)."""
    targets = torch.full(
        (len(tokens), length), IGNORE_INDEX, dtype=torch.long, device=tokens[0].device
    )
    for row, t in enumerate(tokens):
        targets[row, : len(t)] = t
    return shift_inputs(targets, start_token), targets


def nll_bits(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood in bits per sample (the SaShiMi paper's metric), skipping IGNORE_INDEX.

    logits (B, L, n_classes), targets (B, L). "mean" -> scalar over scored samples; "none" -> (B, L).
    """
    nats = F.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction=reduction
    )
    return nats / math.log(2)


# --- building blocks -----------------------------------------------------------------------------


class FeedForward(nn.Module):
    """Pointwise MLP: H -> ff H -> H with GELU."""

    def __init__(self, H: int, ff: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(H, ff * H), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff * H, H)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Residual(nn.Module):
    """Pre-norm residual block: x + dropout(layer(LayerNorm(x) + c)), c a label bias or 0."""

    def __init__(self, H: int, layer: nn.Module, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.layer = layer
        self.dropout = nn.Dropout(dropout)

    def layer_input(self, x: Tensor, label_bias: Tensor | None = None) -> Tensor:
        """LayerNorm(x) + c: x (batch, L, H) with c (batch, 1, H), or x (batch, H) with c (batch, H)."""
        u = self.norm(x)
        return u if label_bias is None else u + label_bias

    def forward(self, x: Tensor, label_bias: Tensor | None = None) -> Tensor:
        return x + self.dropout(self.layer(self.layer_input(x, label_bias)))


def _block_pair(
    s4_block: Residual, ff_block: Residual, x: Tensor, label_bias: Tensor | None
) -> Tensor:
    return ff_block(s4_block(x, label_bias))


@dataclass(frozen=True)
class StackState:
    """Recurrent state of one Stack: each S4 layer's x, and, fixed for a run, each layer's
    discrete parameters (computed once from the weights) and its label bias c_k."""

    x: tuple[Tensor, ...]  # per S4 layer: (batch, H, N/2) complex
    ssm: tuple[DiagonalStep | DPLRStep, ...]  # per S4 layer: A_bar, B_bar, C, D, ...
    label_bias: tuple[Tensor, ...] | None = None  # per S4 layer: (batch, H); None: no labels

    def select(self, rows: Tensor) -> "StackState":
        label_bias = self.label_bias
        if label_bias is not None:
            label_bias = tuple(c[rows] for c in label_bias)
        return StackState(tuple(x[rows] for x in self.x), self.ssm, label_bias)

    def biases(self) -> tuple[Tensor | None, ...]:
        return _per_layer(self.label_bias, len(self.x))


def _per_layer(label_bias: tuple[Tensor, ...] | None, n_layers: int) -> tuple[Tensor | None, ...]:
    """c_k of each S4 layer; a None for each when the model has no labels."""
    return label_bias if label_bias is not None else (None,) * n_layers


class Stack(nn.Module):
    """n_layers x [Residual(S4), Residual(FeedForward)] at width H: (batch, L, H) -> (batch, L, H)."""

    def __init__(self, H: int, cfg: SaShiMiConfig):
        super().__init__()
        s4 = dict(
            N=cfg.d_state,
            kernel=cfg.kernel,
            init=cfg.init,
            disc=cfg.disc,
            dt_min=cfg.dt_min,
            dt_max=cfg.dt_max,
            dropout=cfg.dropout,
        )
        self.s4_blocks = nn.ModuleList(
            Residual(H, S4(H, **s4), cfg.dropout) for _ in range(cfg.n_layers)
        )
        self.ff_blocks = nn.ModuleList(
            Residual(H, FeedForward(H, cfg.ff, cfg.dropout), cfg.dropout)
            for _ in range(cfg.n_layers)
        )
        # Labels enter every S4 block: c_k = W_k e is added to the block's input after its norm,
        # as WaveNet adds its global condition in every layer (the README's "Labels" section has
        # the measurement behind this choice). W_k starts at zero: a new labelled model, or one
        # started from an unlabelled checkpoint, begins as the unconditional model.
        self.label_projections = None
        if cfg.labels:
            self.label_projections = nn.ModuleList(
                nn.Linear(cfg.d_model, H, bias=False) for _ in range(cfg.n_layers)
            )
            for projection in self.label_projections:
                nn.init.zeros_(projection.weight)
        self.recompute = False  # see SaShiMi.recompute_activations

    def label_biases(self, e: Tensor | None) -> tuple[Tensor, ...] | None:
        """c_k = W_k e (batch, H) for each S4 block, from the label embedding e (batch, d_model)."""
        if self.label_projections is None:
            return None
        return tuple(projection(e) for projection in self.label_projections)

    def forward(self, x: Tensor, e: Tensor | None = None) -> Tensor:
        biases = _per_layer(self.label_biases(e), len(self.s4_blocks))
        for s4_block, ff_block, c in zip(self.s4_blocks, self.ff_blocks, biases, strict=True):
            c = None if c is None else c[:, None]  # (batch, 1, H): the same at every step
            if self.recompute and torch.is_grad_enabled():
                x = checkpoint(_block_pair, s4_block, ff_block, x, c, use_reentrant=False)
            else:
                x = _block_pair(s4_block, ff_block, x, c)
        return x

    def forward_with_state(self, x: Tensor, e: Tensor | None = None) -> tuple[Tensor, StackState]:
        """forward, plus the state that stepping through x would leave (for priming generation)."""
        label_bias = self.label_biases(e)
        states = []
        for s4_block, ff_block, c in zip(
            self.s4_blocks, self.ff_blocks, _per_layer(label_bias, len(self.s4_blocks)), strict=True
        ):
            c = None if c is None else c[:, None]
            states.append(s4_block.layer.final_state(s4_block.layer_input(x, c)))
            x = ff_block(s4_block(x, c))
        return x, StackState(tuple(states), self._ssm_steps(), label_bias)

    def _ssm_steps(self) -> tuple[DiagonalStep | DPLRStep, ...]:
        return tuple(block.layer.step_parameters() for block in self.s4_blocks)

    def initial_state(self, batch: int, e: Tensor | None = None) -> StackState:
        return StackState(
            tuple(b.layer.initial_state(batch) for b in self.s4_blocks),
            self._ssm_steps(),
            self.label_biases(e),
        )

    def step(self, x: Tensor, state: StackState) -> tuple[Tensor, StackState]:
        """One step: x (batch, H) -> (batch, H)."""
        new_x = []
        for s4_block, ff_block, ssm_x, ssm, c in zip(
            self.s4_blocks, self.ff_blocks, state.x, state.ssm, state.biases(), strict=True
        ):
            y, ssm_x = s4_block.layer.step(s4_block.layer_input(x, c), ssm_x, ssm)
            x = ff_block(x + s4_block.dropout(y))
            new_x.append(ssm_x)
        return x, StackState(tuple(new_x), state.ssm, state.label_bias)


class DownPool(nn.Module):
    """Fold p consecutive steps into channels, then a pointwise linear p H -> expand H.

    Pooled step g reads steps [g p, g p + p): causal, since the tier above only uses it after them.
    """

    def __init__(self, H: int, p: int, expand: int):
        super().__init__()
        self.p = p
        self.linear = nn.Linear(p * H, expand * H)

    def forward(self, x: Tensor) -> Tensor:
        batch, L, H = x.shape
        return self.linear(x.reshape(batch, L // self.p, self.p * H))  # (batch, L/p, expand H)


class UpPool(nn.Module):
    """Pointwise linear expand H -> p H, unfolded to p steps, shifted one pooled step later.

    The shift (a zero group first, the last group dropped) makes samples of group g depend only on
    inner steps < g, that is on outer samples < g p.
    """

    def __init__(self, H: int, p: int, expand: int):
        super().__init__()
        self.p = p
        self.linear = nn.Linear(expand * H, p * H)

    def project(self, x: Tensor) -> Tensor:
        """Inner steps (batch, ..., expand H) -> the p outer steps they feed (batch, ..., p, H)."""
        return self.linear(x).unflatten(-1, (self.p, -1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(x)  # (batch, L/p, p, H)
        y = F.pad(y[:, :-1], (0, 0, 0, 0, 1, 0))  # shift by one pooled step
        return y.flatten(1, 2)  # (batch, L, H)


@dataclass(frozen=True)
class TierState:
    """Recurrent state of one pooled tier (all but the centre).

    The tier has read `position` steps. Its current group's inputs wait in `pending` until p of them
    are there; then they are pooled and the inner tier steps once, and its projection becomes
    `upsampled`, the p outputs the next group reads (zeros for the first group: the UpPool shift).
    """

    position: int
    pending: tuple[Tensor, ...]  # up to p-1 inputs (batch, H) of the current group
    upsampled: Tensor  # (batch, p, H)
    stack: StackState

    def select(self, rows: Tensor) -> "TierState":
        pending = tuple(x[rows] for x in self.pending)
        return TierState(self.position, pending, self.upsampled[rows], self.stack.select(rows))


@dataclass(frozen=True)
class SaShiMiState:
    """Everything `SaShiMi.step` needs: one TierState per pooling factor, outermost first, and the centre."""

    tiers: tuple[TierState, ...]
    center: StackState

    def rows(self) -> int:
        """How many sequences this state steps at once (the batch of model.step)."""
        return self.center.x[0].shape[0]

    def select(self, rows: Tensor) -> "SaShiMiState":
        """The state of the given rows (an index tensor, repeats allowed), as copies of their own."""
        return SaShiMiState(tuple(t.select(rows) for t in self.tiers), self.center.select(rows))

    def for_batch(self, batch: int) -> "SaShiMiState":
        """This state of one clip as the state of `batch` identical clips (e.g. one prompt read
        once by prime, then continued in several ways)."""
        return self.select(torch.zeros(batch, dtype=torch.long, device=self.center.x[0].device))


# --- the network ---------------------------------------------------------------------------------


class SaShiMi(nn.Module):
    def __init__(self, config: SaShiMiConfig):
        super().__init__()
        self.config = cfg = config
        widths = [cfg.d_model * cfg.expand**i for i in range(len(cfg.pool) + 1)]  # H of each tier
        self.embedding = nn.Embedding(cfg.n_classes, widths[0])
        # One embedding per label field, entry UNKNOWN (0) for "not given"; e is their sum.
        self.label_embeddings = nn.ModuleList(
            nn.Embedding(len(values) + 1, cfg.d_model) for values in cfg.labels.values()
        )
        self.down_pools = nn.ModuleList(
            DownPool(H, p, cfg.expand) for H, p in zip(widths, cfg.pool, strict=False)
        )
        self.center = Stack(widths[-1], cfg)
        self.up_pools = nn.ModuleList(
            UpPool(H, p, cfg.expand) for H, p in zip(widths, cfg.pool, strict=False)
        )
        self.up_stacks = nn.ModuleList(Stack(H, cfg) for H in widths[:-1])
        self.norm = nn.LayerNorm(widths[0])
        self.head = nn.Linear(widths[0], cfg.n_classes)

    @property
    def start_token(self) -> int:
        """First input of every sequence: the class of a zero sample."""
        return silence_token(self.config.quantization, self.config.n_classes)

    def recompute_activations(self, on: bool = True) -> "SaShiMi":
        """Training memory for time: keep only each S4 + feed-forward pair's input for backward
        and run the pair again when backward needs it (dropout masks are replayed, so gradients
        are unchanged). See benchmarks/bench_train.py for what it saves and costs."""
        for stack in (self.center, *self.up_stacks):
            stack.recompute = on
        return self

    def ssm_parameters(self) -> list[nn.Parameter]:
        """dt, A, B (and P): trained with a smaller learning rate and no weight decay, as in S4."""
        return [
            p
            for module in self.modules()
            if isinstance(module, S4)
            for p in module.ssm_parameters()
        ]

    def label_embedding(self, labels: Tensor | None, batch: int) -> Tensor | None:
        """e = sum over fields f of E_f[labels[:, f]]: (batch, d_model), None without labels.

        labels: (batch, n_fields) indices from labels.label_tensor; None means all unknown.
        """
        if not self.config.labels:
            if labels is not None and labels.numel():
                raise ValueError("labels given to a model trained without labels")
            return None
        n_fields = len(self.label_embeddings)
        if labels is None:
            labels = torch.full((batch, n_fields), UNKNOWN, device=self.head.weight.device)
        if labels.shape != (batch, n_fields):
            raise ValueError(
                f"labels must have shape (batch, fields) = ({batch}, {n_fields}), "
                f"got {tuple(labels.shape)}"
            )
        return sum(E(labels[:, f]) for f, E in enumerate(self.label_embeddings))

    def forward(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """tokens (batch, L) -> logits (batch, L, n_classes); logits[:, t] predicts sample t+1.

        labels (batch, n_fields): the clips' label indices (labels.py); None: all unknown.
        """
        self.config.check_length(tokens.shape[1])
        return self._unet(tokens, labels, with_state=False)[0]

    def sequence_bits(self, tokens: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """-log2 p(sequence) of each token sequence (n,): teacher forcing from the start token, in
        one convolution-mode pass over the batch padded with ignored targets to a multiple of the
        total pooling. labels (n, n_fields) as in forward. Divide by the lengths for bits per
        sample."""
        q = self.config.total_pool
        length = -(-max(len(t) for t in tokens) // q) * q  # round up to a multiple of q
        inputs, targets = pad_batch(tokens, length, self.start_token)
        device = self.head.weight.device
        logits = self(inputs.to(device), None if labels is None else labels.to(device))
        return nll_bits(logits.float(), targets.to(device), reduction="none").sum(1)

    def _unet(
        self, tokens: Tensor, labels: Tensor | None, with_state: bool
    ) -> tuple[Tensor, SaShiMiState | None]:
        """The convolution-mode pass. with_state: also return the recurrent state after the last
        token (L is a multiple of the total pooling, so every tier ends on a group boundary)."""
        e = self.label_embedding(labels, tokens.shape[0])

        def run(stack: Stack, x: Tensor) -> tuple[Tensor, StackState | None]:
            return stack.forward_with_state(x, e) if with_state else (stack(x, e), None)

        x = self.embedding(tokens)
        skips = []
        for down in self.down_pools:
            skips.append(x)
            x = down(x)
        y, center = run(self.center, x)
        x = x + y
        tiers = []
        for up, stack, skip in zip(
            self.up_pools[::-1], self.up_stacks[::-1], skips[::-1], strict=True
        ):
            upsampled = up.project(x[:, -1])  # what the group after the last one reads
            x = up(x) + skip
            y, stack_state = run(stack, x)
            x = x + y
            tiers.insert(0, TierState(x.shape[1], (), upsampled, stack_state))
        state = SaShiMiState(tuple(tiers), center) if with_state else None
        return self.head(self.norm(x)), state

    # --- recurrent mode --------------------------------------------------------------------------

    @torch.no_grad()
    def initial_state(self, batch: int, labels: Tensor | None = None) -> SaShiMiState:
        """The state before the first sample, with each S4 layer's discrete parameters and label
        bias precomputed. labels (batch, n_fields) as in forward."""
        e = self.label_embedding(labels, batch)
        tiers = []
        for up, stack in zip(self.up_pools, self.up_stacks, strict=True):
            H = up.linear.out_features // up.p
            zeros = torch.zeros(
                batch, up.p, H, device=self.head.weight.device, dtype=self.head.weight.dtype
            )
            tiers.append(TierState(0, (), zeros, stack.initial_state(batch, e)))
        return SaShiMiState(tuple(tiers), self.center.initial_state(batch, e))

    def step(self, token: Tensor, state: SaShiMiState) -> tuple[Tensor, SaShiMiState]:
        """One sample: token (batch,) -> logits (batch, n_classes) for the next sample, new state."""
        x, tiers, center = self._step_tier(0, self.embedding(token), state.tiers, state.center)
        return self.head(self.norm(x)), SaShiMiState(tiers, center)

    def _step_tier(
        self, i: int, x: Tensor, tiers: tuple[TierState, ...], center: StackState
    ) -> tuple[Tensor, tuple[TierState, ...], StackState]:
        """Tier i reads one step x (batch, H_i); inner tiers step only when a group of p is complete."""
        if i == len(tiers):
            y, center = self.center.step(x, center)
            return x + y, tiers, center
        tier = tiers[i]
        p = self.config.pool[i]
        h = tier.upsampled[:, tier.position % p] + x  # UpPool output + U-Net skip
        y, stack = self.up_stacks[i].step(h, tier.stack)
        pending, upsampled = tier.pending + (x,), tier.upsampled
        if len(pending) == p:  # group complete: pool it and step the inner tier once
            inner = self.down_pools[i].linear(torch.cat(pending, dim=-1))
            inner, tiers, center = self._step_tier(i + 1, inner, tiers, center)
            upsampled, pending = self.up_pools[i].project(inner), ()
        tier = TierState(tier.position + 1, pending, upsampled, stack)
        return h + y, tiers[:i] + (tier,) + tiers[i + 1 :], center

    @torch.no_grad()
    def prime(self, tokens: Tensor, labels: Tensor | None = None) -> tuple[Tensor, SaShiMiState]:
        """Read a whole prompt in convolution mode: logits (batch, T, n_classes) and the state that
        stepping through all T tokens would leave. The longest prefix that is a multiple of the total
        pooling goes through the parallel pass; the few tokens after it are stepped."""
        batch, T = tokens.shape
        T0 = T // self.config.total_pool * self.config.total_pool
        logits = []
        if T0:
            prefix_logits, state = self._unet(tokens[:, :T0], labels, with_state=True)
            logits.append(prefix_logits)
        else:
            state = self.initial_state(batch, labels)
        for t in range(T0, T):
            step_logits, state = self.step(tokens[:, t], state)
            logits.append(step_logits[:, None])
        return torch.cat(logits, dim=1), state

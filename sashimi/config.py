"""SaShiMiConfig: everything needed to rebuild a model, saved as config.json beside its weights,
its named presets, and the strict reading of config dataclasses back from JSON (also used for the
trainer's TrainConfig)."""

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass

from .audio import N_CLASSES, QUANTIZATIONS
from .labels import Vocabulary
from .s4 import DISCRETIZATIONS

# Each kernel and the discretisation it takes unless told: the DPLR kernel is the bilinear
# transform's (Cauchy sums at its FFT nodes), so it has no other; S4D's default is ZOH.
KERNEL_DISCRETIZATION = {"diagonal": "zoh", "dplr": "bilinear"}
KERNELS = tuple(KERNEL_DISCRETIZATION)
INITS = ("legs", "lin")


def _fits(value, kind) -> bool:
    """Whether a value read from JSON fits a config field's type: int, float (an int will do),
    str, bool, tuples as lists or tuples, and unions such as `str | None`."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_fits(value, k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if not isinstance(value, list | tuple):
            return False
        if items[-1:] == (Ellipsis,):  # tuple[int, ...]
            items = items[:1] * len(value)
        return len(items) == len(value) and all(map(_fits, value, items))
    if kind is type(None):
        return value is None
    if isinstance(value, bool):  # JSON's true is no number, though Python's bool is an int
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, typing.get_origin(kind) or kind)


def config_from_dict(cls: type, d: dict, what: str):
    """cls(**d) for a config dataclass read back from JSON: a key cls does not have is an error
    naming the known ones (a typo must not pass silently), a value of another type than the
    field's is an error naming both, and JSON's lists become tuples."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known keys: {sorted(known)}")
    kinds = typing.get_type_hints(cls)
    for key, value in d.items():
        if not _fits(value, kinds[key]):
            kind = kinds[key].__name__ if isinstance(kinds[key], type) else kinds[key]
            raise ValueError(f"{key} must be {kind}, got {value!r}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class SaShiMiConfig:
    """Everything needed to rebuild a model; saved as config.json next to its weights."""

    n_classes: int = N_CLASSES  # quantisation levels of input and output (8-bit)
    quantization: str = "mu-law"  # "mu-law" or "linear": how samples map to classes
    sample_rate: int = 16_000  # Hz the model was trained at; generation writes at this rate
    d_model: int = 64  # H of the outer tier; tier i has H * expand**i
    n_layers: int = 8  # residual [S4, feed-forward] pairs per tier
    pool: tuple[int, ...] = (4, 4)  # pooling factor of each tier, outermost first
    expand: int = 2  # width multiplier from one tier to the next
    ff: int = 2  # hidden width of the feed-forward blocks, as a multiple of H
    d_state: int = 64  # N, the SSM state size (N/2 complex modes stored)
    kernel: str = "diagonal"  # "diagonal" (S4D, Vandermonde) or "dplr" (S4, Cauchy + Woodbury)
    init: str = "legs"  # diagonal A: "legs" (S4D-LegS) or "lin" (S4D-Lin); dplr is always LegS
    disc: str | None = None  # "zoh" or "bilinear"; None: the kernel's (KERNEL_DISCRETIZATION)
    dt_min: float = 1e-3  # dt is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 1e-1
    dropout: float = 0.0
    # Label fields the model is conditioned on: field -> {value: training files}, values sorted
    # (sashimi/labels.py). Empty: an unconditional model, as every checkpoint before labels.
    labels: Vocabulary = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "pool", tuple(self.pool))
        object.__setattr__(self, "labels", _checked_vocabulary(self.labels))
        if self.disc is None and self.kernel in KERNEL_DISCRETIZATION:
            object.__setattr__(self, "disc", KERNEL_DISCRETIZATION[self.kernel])
        choices = {
            "quantization": QUANTIZATIONS,
            "kernel": KERNELS,
            "init": INITS,
            "disc": tuple(DISCRETIZATIONS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.kernel == "dplr" and self.disc != "bilinear":
            raise ValueError(
                'kernel="dplr" needs disc="bilinear" (its kernel is the bilinear transform)'
            )
        if self.kernel == "dplr" and self.init != "legs":
            raise ValueError(
                f'kernel="dplr" is always HiPPO-LegS; init={self.init!r} is for the diagonal kernel'
            )
        positive = ("n_classes", "sample_rate", "d_model", "n_layers", "expand", "ff", "d_state")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_state % 2:
            raise ValueError(f"d_state must be even (conjugate pairs), got {self.d_state}")
        if any(p < 1 for p in self.pool):
            raise ValueError(f"pool factors must be at least 1, got {self.pool}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def total_pool(self) -> int:
        """Training lengths must be multiples of this: every tier sees whole pooled steps."""
        return math.prod(self.pool)

    def check_length(self, L: int, name: str = "length") -> None:
        """A ValueError naming the nearest lengths that are multiples of total_pool."""
        q = self.total_pool
        if L % q:
            fits = " or ".join(map(str, sorted({max(q, L // q * q), (L // q + 1) * q})))
            raise ValueError(
                f"{name} {L} is not a multiple of the total pooling {q} (pool={self.pool}); "
                f"crop or pad to {fits}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "SaShiMiConfig":
        return config_from_dict(cls, d, "config keys")

    @classmethod
    def preset(cls, name: str) -> "SaShiMiConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls(**PRESETS[name])


def _checked_vocabulary(labels) -> Vocabulary:
    """labels as plain dicts {field: {value: count}}, or a ValueError saying what is wrong."""
    if not isinstance(labels, dict):
        raise ValueError(f"labels must map each field to its values, got {labels!r}")
    for field, values in labels.items():
        if not isinstance(values, dict) or not values:
            raise ValueError(
                f"labels[{field!r}] must map each value to its count of files, got {values!r}"
            )
    return {str(f): {str(v): int(n) for v, n in values.items()} for f, values in labels.items()}


PRESETS = {
    # The SaShiMi paper's SC09 model: 3 tiers of width 64/128/256, 8 layers each (~4.7 M parameters).
    "sc09": {},
    # For tests and quick CPU experiments: 100 k parameters, mostly the embedding and head.
    "tiny": {"d_model": 16, "n_layers": 2, "d_state": 16, "sample_rate": 8000},
}

"""TrainConfig: everything about a training run except the model (that is SaShiMiConfig).

`python -m train` builds it from preset < --config file < flags (train/__main__.py); a run saves
it in last/trainer_state.json, and --resume reads it back from there.
"""

import dataclasses
from dataclasses import dataclass

from sashimi.config import config_from_dict


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the model (that is SaShiMiConfig)."""

    data: str  # folder of audio, searched recursively
    out: str  # run directory
    valid_data: str | None = None  # validation folder; None: a hash split of `data`
    valid_fraction: float = 0.1  # share of `data` files held out when valid_data is None
    exclude: tuple[str, ...] = ()  # globs on paths under the data folders, e.g. "*_yweweler_*"
    seq_len: int = 8192  # samples per training window, a multiple of the model's total pooling
    min_seconds: float = 0.1  # shorter files are skipped; shorter windows are padded to seq_len
    gain_db: float = 0.0  # training windows scaled by a random gain in [-gain_db, gain_db] dB
    labels: str | None = None  # "folder" or a regex with named groups (sashimi/labels.py)
    label_dropout: float = 0.15  # each field of each window is made unknown with this probability
    score_padding: bool = False  # score the silence after a clip's end: the model learns to stop
    init: str | None = None  # checkpoint to start from (same architecture; labels by value)
    recompute_activations: bool = False  # SaShiMi.recompute_activations: less memory, more time
    steps: int = 20_000
    batch_size: int = 16  # windows per step and process
    lr: float = 2e-3  # peak learning rate (the SSM parameters use min(lr, loop.SSM_MAX_LR))
    weight_decay: float = 0.01  # AdamW, on every parameter but the SSM ones
    warmup: int = 500  # steps of linear warmup before the cosine decay to 0
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    log_every: int = 20  # steps per row of metrics.csv
    valid_every: int = 500
    save_every: int = 500
    num_samples: int = 2  # clips generated at each validation
    sample_seconds: float = 1.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "exclude", tuple(self.exclude))
        at_least_one = ("seq_len", "steps", "batch_size", "log_every", "valid_every", "save_every")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        at_least_zero = (
            "min_seconds",
            "gain_db",
            "weight_decay",
            "warmup",
            "grad_clip",
            "num_samples",
            "sample_seconds",
        )
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout}")
        for name in at_least_zero:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d, "training settings")

"""The data of a training run: the audio of --data (and --valid-data) scanned, decoded, split into
training and validation files, labelled (--labels), and cut into windows, once, into memory.
"""

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sashimi.config import SaShiMiConfig
from sashimi.data import AudioFolder, Clip, Window, cut_windows, encode_windows, split_by_file
from sashimi.labels import (
    LabelSpec,
    Vocabulary,
    build_vocabulary,
    describe,
    label_tensor,
    read_labels,
)

from .config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunData:
    """What a run trains and validates on, decoded once into memory."""

    config: SaShiMiConfig  # the model's settings, at the rate and with the labels of the data
    train_clips: list[Clip]
    valid_clips: list[Clip]
    windows: list[Window]  # the training windows, each at most seq_len samples
    train_labels: list  # the labels of each training clip; [] without --labels
    valid_tokens: list[torch.Tensor]  # the validation windows as tokens
    valid_label_rows: torch.Tensor | None  # their labels (label_tensor), None without --labels


def load_data(
    config: SaShiMiConfig, cfg: TrainConfig, *, rate_from_data: bool, resume: bool, master: bool
) -> RunData:
    """Scan, decode and split the audio of cfg.data (and cfg.valid_data), read its labels and
    cut it into windows. Rank 0 also writes the manifests and logs the settings."""
    run_dir = Path(cfg.out)
    folder = AudioFolder.scan(cfg.data, cfg.exclude, run_dir / "manifest.json", ignore=(run_dir,))
    if rate_from_data:
        config = dataclasses.replace(config, sample_rate=folder.common_rate())
    sample_rate = config.sample_rate
    min_samples = max(1, round(cfg.min_seconds * sample_rate))
    clips = folder.load(sample_rate, min_samples)
    if cfg.valid_data is None:
        train_clips, valid_clips = split_by_file(clips, cfg.valid_fraction)
    else:
        valid_folder = AudioFolder.scan(
            cfg.valid_data, cfg.exclude, run_dir / "manifest_valid.json", ignore=(run_dir,)
        )
        train_clips, valid_clips = clips, valid_folder.load(sample_rate)
    vocabulary, train_labels, valid_labels = read_run_labels(cfg, train_clips, valid_clips)
    if resume and vocabulary != config.labels:
        raise ValueError(
            f"the labels of {cfg.data} differ from those {run_dir}/last was trained with; "
            "resume with the same data, or start a new --out"
        )
    config = dataclasses.replace(config, labels=vocabulary)
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        folder.save_manifest(run_dir / "manifest.json")
        if cfg.valid_data is not None:
            valid_folder.save_manifest(run_dir / "manifest_valid.json")
        log.info(json.dumps({"model": config.to_dict(), "train": cfg.to_dict()}, indent=2))
    config.check_length(cfg.seq_len, "seq_len")
    valid_windows = cut_windows(valid_clips, cfg.seq_len)
    valid_label_rows = None
    if vocabulary:
        valid_label_rows = label_tensor(vocabulary, [valid_labels[w.clip] for w in valid_windows])
    if not valid_clips:
        log.warning(
            "no validation files (one usable file, or valid_fraction 0): best/ is not written"
        )
    return RunData(
        config=config,
        train_clips=train_clips,
        valid_clips=valid_clips,
        windows=cut_windows(train_clips, cfg.seq_len, min_samples),
        train_labels=train_labels,
        valid_tokens=encode_windows(
            valid_clips, valid_windows, config.quantization, config.n_classes
        ),
        valid_label_rows=valid_label_rows,
    )


def read_run_labels(
    cfg: TrainConfig, train_clips: list, valid_clips: list
) -> tuple[Vocabulary, list, list]:
    """(vocabulary, labels of each training clip, of each validation clip) for cfg.labels;
    ({}, [], []) without labels. Logs the vocabulary once."""
    if cfg.labels is None:
        return {}, [], []
    spec = LabelSpec.parse(cfg.labels)
    train_labels = read_labels(spec, [c.path for c in train_clips], "training")
    vocabulary = build_vocabulary(spec.fields, train_labels)
    empty = [field for field, values in vocabulary.items() if not values]
    if empty:
        raise ValueError(
            f"--labels {cfg.labels!r} gives no training file a value for {', '.join(empty)}; "
            f"paths look like {train_clips[0].path!r}"
        )
    valid_labels = read_labels(spec, [c.path for c in valid_clips], "validation", vocabulary)
    log.info(f"labels:\n{describe(vocabulary)}")
    return vocabulary, train_labels, valid_labels

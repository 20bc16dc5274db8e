"""What a training run tells people: metrics.json and card.md of each save, metrics.csv and its
plot metrics.png, and the clips in samples/ (the run folder is described in train/loop.py).

Only rank 0 calls these. The checkpoint folders themselves are written by sashimi.checkpoint;
this module composes what goes in them.
"""

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from sashimi.audio import write_wav
from sashimi.checkpoint import TrainerState, atomic_write, reporting_full_disk
from sashimi.cli import format_duration
from sashimi.config import SaShiMiConfig
from sashimi.generate import Generator
from sashimi.guidance import DEFAULT_GUIDANCE
from sashimi.labels import Vocabulary, describe, labels_slug
from sashimi.model import SaShiMi
from sashimi.plots import save_figure_png

METRICS_COLUMNS = ("step", "train_bits", "valid_bits", "lr", "samples_per_s", "elapsed_s")


# --- metrics.json and card.md of a save ----------------------------------------------------------


@dataclass(frozen=True)
class RunFacts:
    """What every save of a run says about it that does not change while it trains."""

    train_data: str  # --data
    valid_data: str  # --valid-data, or e.g. "10% of <train_data>"
    n_train_files: int
    n_valid_files: int
    train_audio_hours: float
    seq_len: int
    batch_size: int  # per process
    world_size: int
    device: str  # the GPU's name, or "cpu (N threads)"
    num_parameters: int
    labels: str | None  # --labels of a labelled model, else None
    label_dropout: float


def metadata(state: TrainerState, facts: RunFacts, wall_time_s: float) -> dict:
    """metrics.json of a save (and what python -m train prints at the end)."""
    labelled = {}
    if facts.labels is not None:
        labelled = {
            "valid_bits_per_sample_unlabelled": state.valid_bits_unlabelled,
            "labels": facts.labels,
            "label_dropout": facts.label_dropout,
        }
    return {
        "step": state.step,
        "valid_bits_per_sample": state.valid_bits,
        "train_bits_per_sample": state.train_bits,
        **labelled,
        "train_data": facts.train_data,
        "valid_data": facts.valid_data,
        "n_train_files": facts.n_train_files,
        "n_valid_files": facts.n_valid_files,
        "train_audio_hours": facts.train_audio_hours,
        "seq_len": facts.seq_len,
        "batch_size": facts.batch_size,
        "world_size": facts.world_size,
        "wall_time_s": wall_time_s,
        "device": facts.device,
        "num_parameters": facts.num_parameters,
        "command": "\n".join(state.commands),
    }


def card_text(config: SaShiMiConfig, metadata: dict) -> str:
    """card.md: what a person needs to know about this checkpoint, from what the trainer knows."""
    audio = format_duration(metadata["train_audio_hours"] * 3600)
    processes = f"{metadata['world_size']} process" + ("es" if metadata["world_size"] > 1 else "")
    bits = metadata["valid_bits_per_sample"]
    valid = (
        "no validation set"
        if bits is None
        else (
            f"{bits:.3f} bits per sample on {metadata['n_valid_files']:,} files "
            f"({metadata['valid_data']})"
        )
    )
    labels = ""
    if config.labels:
        unlabelled = metadata["valid_bits_per_sample_unlabelled"]
        labels = (
            f"| labels | `--labels {metadata['labels']}`, label dropout "
            f"{metadata['label_dropout']}; validation with every field unknown: "
            + ("-" if unlabelled is None else f"{unlabelled:.3f} bits per sample")
            + " |\n"
        )
    return f"""# SaShiMi model trained on `{metadata["train_data"]}`

| | |
|---|---|
| data | {metadata["n_train_files"]:,} files in `{metadata["train_data"]}` \
({audio} of audio) |
| sample rate | {config.sample_rate:,} Hz, mono |
| quantisation | {config.quantization}, {config.n_classes} classes |
| architecture | SaShiMi: d_model {config.d_model}, {config.n_layers} layers per tier, \
pool {list(config.pool)}, expand {config.expand}, S4 kernel {config.kernel} (N = {config.d_state}) |
| parameters | {metadata["num_parameters"]:,} |
| training | {metadata["step"]:,} steps of {metadata["batch_size"]} x {metadata["seq_len"]:,} \
samples per process, {processes}, {format_duration(metadata["wall_time_s"])} on {metadata["device"]} |
| validation | {valid} |
{labels}
Reproduce:

```
{metadata["command"]}
```

{_vocabulary_section(config)}## Known limitations

- To be written by the person who listened to its samples.
"""


def _vocabulary_section(config: SaShiMiConfig) -> str:
    if not config.labels:
        return ""
    lines = "\n".join(f"- {line}" for line in describe(config.labels).splitlines())
    return f"## Labels (values with their number of training files)\n\n{lines}\n\n"


# --- metrics.csv and metrics.png -----------------------------------------------------------------


def append_metrics(run_dir: Path, row: dict) -> None:
    """One more row in metrics.csv; a write that fails (a full disk) leaves the rows before."""
    path = run_dir / "metrics.csv"
    new = not path.exists()
    text = io.StringIO()
    writer = csv.DictWriter(text, METRICS_COLUMNS)
    if new:
        writer.writeheader()
    writer.writerow(row)
    size = 0 if new else path.stat().st_size
    with reporting_full_disk(path, needed=len(text.getvalue())):
        try:
            with open(path, "a", newline="") as f:
                f.write(text.getvalue())
        except OSError:
            os.truncate(path, size)  # no torn row: the file ends with its last whole one
            raise


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the rows after `step`: a resumed run writes them again."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, METRICS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def plot_metrics(run_dir: Path) -> None:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for column, label in (("train_bits", "train"), ("valid_bits", "validation")):
        points = [(int(r["step"]), float(r[column])) for r in rows if r[column]]
        if points:
            ax.plot(
                *zip(*points, strict=True),
                marker="o" if column == "valid_bits" else None,
                label=label,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("bits per sample")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write(run_dir / "metrics.png", lambda tmp: save_figure_png(fig, tmp))


# --- samples/ ------------------------------------------------------------------------------------


def sample_labels(vocabulary: Vocabulary, count: int) -> list[dict[str, str]]:
    """Labels for `count` sample clips: clip k takes value k (cycling) of every field."""
    return [
        {field: list(values)[k % len(values)] for field, values in vocabulary.items()}
        for k in range(count)
    ]


def write_samples(
    model: SaShiMi, run_dir: Path, step: int, count: int, seconds: float, seed: int
) -> None:
    """`count` clips of `seconds` generated with the recurrent API, always from `seed`, so the
    clips of successive validations are comparable. A labelled model's clips take sample_labels,
    guided, and carry them in their names."""
    num_samples = round(seconds * model.config.sample_rate)
    if count == 0 or num_samples == 0:
        return
    generator = Generator(model, device=next(model.parameters()).device)
    labels = sample_labels(model.config.labels, count)
    clips = generator.generate(
        num_samples,
        batch_size=count,
        seed=seed,
        show_progress=False,
        labels=labels if model.config.labels else None,
        guidance=DEFAULT_GUIDANCE if model.config.labels else 1.0,
    )
    needed = len(clips) * (2 * num_samples + 44)  # 16-bit samples and a 44-byte WAV header
    with reporting_full_disk(run_dir / "samples", needed):
        for k, clip in enumerate(clips):
            slug = labels_slug(labels[k])
            name = f"step_{step:06d}_{k}" + (f"_{slug}" if slug else "") + ".wav"
            write_wav(run_dir / "samples" / name, clip, model.config.sample_rate)

"""The training loop: a folder of audio in; checkpoints, samples and metrics out.

It reads top to bottom, as nanoGPT's train.py does: processes and device, data, model and optimiser
(or the state of an interrupted run), then the loop (forward, backward, clip, step; every so often
validate, write samples, save), then a last validation and save. The run directory:

    RUN_DIR/last/           checkpoint + trainer state (resume from here), every save_every steps
    RUN_DIR/best/           checkpoint with the lowest validation bits per sample so far
    RUN_DIR/samples/        step_XXXXXX_k.wav, generated at each validation
    RUN_DIR/metrics.csv     step, train and validation bits per sample, lr, samples/s, elapsed s
    RUN_DIR/metrics.png     the curves of metrics.csv
    RUN_DIR/manifest.json   the scanned files of --data (manifest_valid.json for --valid-data)

Under torchrun every process trains on its own share of each batch (DistributedDataParallel);
only rank 0 validates and writes files.
"""

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sashimi.audio import write_wav
from sashimi.checkpoint import (
    atomic_write,
    load_checkpoint,
    read_config,
    recover_folder,
    replace_folder,
    reporting_full_disk,
    resolve_save,
    save_checkpoint,
    tensor_bytes,
)
from sashimi.cli import format_duration
from sashimi.data import (
    AudioFolder,
    cut_windows,
    encode_windows,
    make_batch,
    split_by_file,
    take_windows,
)
from sashimi.evaluate import evaluate_bits
from sashimi.generate import DEFAULT_GUIDANCE, Generator, resolve_device
from sashimi.labels import (
    LabelSpec,
    Vocabulary,
    build_vocabulary,
    describe,
    drop_labels,
    label_tensor,
    labels_slug,
    read_labels,
)
from sashimi.model import (
    IGNORE_INDEX,
    SaShiMi,
    SaShiMiConfig,
    config_from_dict,
    is_label_parameter,
    nll_bits,
)
from sashimi.plots import save_figure_png

log = logging.getLogger(__name__)

SSM_MAX_LR = 1e-3  # S4's dt, A, B (and P) train at most this fast, without weight decay (S4 paper)
MAX_NONFINITE_STEPS = 5  # consecutive steps with a non-finite loss or gradient before giving up
TRAINER_STATE = "trainer_state"  # .safetensors (tensors) + .json (scalars), only in last/
TRAINER_STATE_KEYS = ("step", "epoch", "index", "elapsed_s", "train_bits", "valid_bits")
TRAINER_STATE_KEYS += ("best_valid_bits", "world_size", "optimizer_param_groups")
TRAINER_STATE_TENSORS = ("rng.gain", "rng.torch_cpu")
METRICS_COLUMNS = ("step", "train_bits", "valid_bits", "lr", "samples_per_s", "elapsed_s")


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
    init: str | None = None  # checkpoint to start from (same architecture; new label weights at 0)
    recompute_activations: bool = False  # SaShiMi.recompute_activations: less memory, more time
    steps: int = 20_000
    batch_size: int = 16  # windows per step and process
    lr: float = 2e-3  # peak learning rate (the SSM parameters use min(lr, SSM_MAX_LR))
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


# --- schedule and optimiser ----------------------------------------------------------------------


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup, then cosine decay to 0."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: SaShiMi, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the S4 parameter groups: dt, A, B (and P) at a smaller lr and no weight decay,
    since decaying them towards 0 would move the poles of the system, not regularise it."""
    ssm = {id(p) for p in model.ssm_parameters()}
    groups = [
        {
            "params": [p for p in model.parameters() if id(p) in ssm],
            "peak_lr": min(cfg.lr, SSM_MAX_LR),
            "weight_decay": 0.0,
        },
        {
            "params": [p for p in model.parameters() if id(p) not in ssm],
            "peak_lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
        },
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


# --- processes -----------------------------------------------------------------------------------


def setup_processes(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL with one GPU per process on CUDA, gloo on the CPU."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def gather(t: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Every process's copy of `t`, stacked on the CPU: (world, *t.shape)."""
    if world == 1:
        return t[None]
    parts = [torch.empty_like(t, device=device) for _ in range(world)]
    dist.all_gather(parts, t.to(device))
    return torch.stack(parts).cpu()


def weights_sha1(model: SaShiMi) -> str:
    """sha1 of the bytes of every weight, in state_dict order: equal hashes, equal models."""
    digest = hashlib.sha1()
    for t in model.state_dict().values():
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- the run directory ---------------------------------------------------------------------------


def trainer_state(
    optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor], scalars: dict
) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimiser and RNG states as (tensors, JSON): tensors "optimizer.<param>.<name>" and
    "rng.<name>"; the JSON holds the parameter groups and `scalars` (step, data position ...)."""
    opt = optimizer.state_dict()
    tensors = {f"rng.{name}": t.contiguous() for name, t in rng.items()}
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
    return tensors, {**scalars, "optimizer_param_groups": opt["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, state: dict) -> None:
    """Inverse of trainer_state for the optimiser."""
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        kind, *rest = key.split(".")
        if kind == "optimizer":
            index, name = rest
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})


def read_trainer_state(last: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON of the trainer state in `last`; a missing or damaged file is an
    error naming it and saying how to go on."""
    json_path = last / f"{TRAINER_STATE}.json"
    tensors_path = last / f"{TRAINER_STATE}.safetensors"
    if not json_path.is_file():
        raise FileNotFoundError(
            f"{last} has no {TRAINER_STATE}.json; --resume needs the last/ folder of a run that "
            "saved at least once"
        )
    go_on = (
        "the run cannot continue exactly; start a new one from its weights with "
        f"--init {last} and another --out"
    )
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{tensors_path} is damaged ({error}); {go_on}") from error
    try:
        state = json.loads(json_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{json_path} is damaged (not valid JSON: {error}); {go_on}") from error
    if not isinstance(state, dict) or not isinstance(state.get("train_config"), dict):
        raise ValueError(f"{json_path} is damaged (no training settings in it); {go_on}")
    for path, keys, held in (
        (json_path, TRAINER_STATE_KEYS, state),
        (tensors_path, TRAINER_STATE_TENSORS, tensors),
    ):
        missing = [key for key in keys if key not in held]
        if missing:
            raise ValueError(f"{path} is damaged (no {', '.join(missing)} in it); {go_on}")
    return tensors, state


def resume_configs(out: str | Path) -> tuple[SaShiMiConfig, TrainConfig]:
    """The model and training settings of the run saved in out/last (what --resume continues).
    Only reads: under torchrun every process calls this before rank 0 may recover_folder(last)."""
    last = resolve_save(Path(out) / "last")  # last.old/ after a kill between a save's renames
    _, state = read_trainer_state(last)
    try:
        settings = TrainConfig.from_dict(state["train_config"])
    except ValueError as error:
        raise ValueError(f"{last / TRAINER_STATE}.json: {error}") from error
    return read_config(last), settings


def write_card(directory: Path, config: SaShiMiConfig, metadata: dict) -> None:
    """card.md: what a person needs to know about this checkpoint, from what the trainer knows.
    `directory` is a folder being written by replace_folder, so plain writes are safe."""
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
    text = f"""# SaShiMi model trained on `{metadata["train_data"]}`

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
    (directory / "card.md").write_text(text)


def _vocabulary_section(config: SaShiMiConfig) -> str:
    if not config.labels:
        return ""
    lines = "\n".join(f"- {line}" for line in describe(config.labels).splitlines())
    return f"## Labels (values with their number of training files)\n\n{lines}\n\n"


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


def sample_labels(vocabulary: Vocabulary, count: int) -> list[dict[str, str]]:
    """Labels for `count` sample clips: clip k takes value k (cycling) of every field."""
    return [
        {field: list(values)[k % len(values)] for field, values in vocabulary.items()}
        for k in range(count)
    ]


def write_samples(model: SaShiMi, run_dir: Path, step: int, cfg: TrainConfig) -> None:
    """A few clips generated with the recurrent API, always from the same seed, so the clips of
    successive validations are comparable. A labelled model's clips take sample_labels, guided,
    and carry them in their names."""
    num_samples = round(cfg.sample_seconds * model.config.sample_rate)
    if cfg.num_samples == 0 or num_samples == 0:
        return
    generator = Generator(model, device=next(model.parameters()).device)
    labels = sample_labels(model.config.labels, cfg.num_samples)
    clips = generator.generate(
        num_samples,
        batch_size=cfg.num_samples,
        seed=cfg.seed,
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


def start_from(model: SaShiMi, directory: str) -> None:
    """Copy the weights of the checkpoint in `directory` into `model` (--init). The architecture
    must be the same; label weights are copied only when the vocabularies are the same, and
    otherwise keep their initial values (the projections start at zero)."""
    source, _ = load_checkpoint(directory)
    same_labels = source.config.labels == model.config.labels
    weights = {
        name: tensor
        for name, tensor in source.state_dict().items()
        if same_labels or not is_label_parameter(name)
    }
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:
        raise ValueError(
            f"--init {directory}: its weights do not fit this model: {error}"
        ) from None
    missing = [name for name in missing if not is_label_parameter(name)]
    if missing or unexpected:
        raise ValueError(
            f"--init {directory} is another architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
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


# --- the run -------------------------------------------------------------------------------------


def train(
    config: SaShiMiConfig,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    rate_from_data: bool = False,
    command: str = "",
) -> dict:
    """Train, writing into cfg.out; returns the metadata of the last save (metrics.json).

    rate_from_data: train at the most common sample rate of the files instead of config's.
    resume: continue the run saved in cfg.out/last exactly where it stopped.
    """
    rank, world, device = setup_processes(cfg.device)
    master = rank == 0
    run_dir = Path(cfg.out)
    started = time.perf_counter()
    # last.old/ alone is a run too: a save killed between its two renames (resolve_save)
    saved = [
        p for p in (resolve_save(run_dir / "last"), resolve_save(run_dir / "best")) if p.exists()
    ]
    if not resume and saved:
        raise ValueError(
            f"{run_dir} already holds a run ({saved[0].name}/); pass --resume to continue it, "
            "or another --out"
        )

    # --- data: every file decoded once into memory --------------------------------------------
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
    windows = cut_windows(train_clips, cfg.seq_len, min_samples)
    valid_windows = cut_windows(valid_clips, cfg.seq_len)
    valid_tokens = encode_windows(valid_clips, valid_windows, config.quantization, config.n_classes)
    valid_label_rows = None
    if vocabulary:
        valid_label_rows = label_tensor(vocabulary, [valid_labels[w.clip] for w in valid_windows])
    if not valid_clips:
        log.warning(
            "no validation files (one usable file, or valid_fraction 0): best/ is not written"
        )
    if master:
        log.info(
            f"{len(train_clips):,} training files ({len(windows):,} windows of up to "
            f"{cfg.seq_len:,} samples), {len(valid_clips):,} validation files; {world} process(es) "
            f"on {device}"
        )

    # --- model, optimiser, and where we are ----------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = SaShiMi(config).recompute_activations(cfg.recompute_activations).to(device)
    if cfg.init is not None and not resume:
        start_from(model, cfg.init)
    optimizer = make_optimizer(model, cfg)
    gain_rng = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout: its own stream in each process
    step, epoch, index, elapsed, best_bits = 0, 0, 0, 0.0, math.inf
    commands = [command]  # how to reproduce: the first command, then each resume's
    train_bits, valid_bits = None, None  # means of the last logged interval, the last validation
    valid_bits_unlabelled = None  # a labelled model's last validation with every field unknown
    if resume:
        last = run_dir / "last"
        if master:
            recover_folder(last)
        if world > 1:
            dist.barrier()  # the others read last/ once rank 0 has put it back together
        tensors, state = read_trainer_state(last)
        model.load_state_dict(load_checkpoint(last)[0].state_dict())
        restore_optimizer(optimizer, tensors, state)
        step, epoch, index = state["step"], state["epoch"], state["index"]
        train_bits, valid_bits = state["train_bits"], state["valid_bits"]
        valid_bits_unlabelled = state.get("valid_bits_unlabelled")
        elapsed, best_bits = state["elapsed_s"], state["best_valid_bits"] or math.inf
        commands = state.get("commands", []) + commands
        gain_rng.set_state(tensors["rng.gain"])
        if state["world_size"] == world:
            torch.set_rng_state(tensors["rng.torch_cpu"][rank])
            if device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng.torch_cuda"][rank], device)
        else:
            log.warning(
                f"resumed with {world} processes instead of {state['world_size']}: "
                "dropout draws other random numbers than the first run"
            )
        log.info(f"resumed {last} at step {step:,}")
    if master:
        truncate_metrics(run_dir, step)  # rows a killed run wrote after its last save
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    num_parameters = sum(p.numel() for p in model.parameters())

    def metadata() -> dict:
        return {
            "step": step,
            "valid_bits_per_sample": valid_bits,
            "train_bits_per_sample": train_bits,
            **(
                {
                    "valid_bits_per_sample_unlabelled": valid_bits_unlabelled,
                    "labels": cfg.labels,
                    "label_dropout": cfg.label_dropout,
                }
                if vocabulary
                else {}
            ),
            "train_data": cfg.data,
            "valid_data": cfg.valid_data or f"{cfg.valid_fraction:.0%} of {cfg.data}",
            "n_train_files": len(train_clips),
            "n_valid_files": len(valid_clips),
            "train_audio_hours": sum(len(c.audio) for c in train_clips) / sample_rate / 3600,
            "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size,
            "world_size": world,
            "wall_time_s": round(elapsed + time.perf_counter() - started, 1),
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)",
            "num_parameters": num_parameters,
            "command": "\n".join(commands),
        }

    def save_last() -> None:
        rng = {
            "gain": gain_rng.get_state(),
            "torch_cpu": gather(torch.get_rng_state(), world, device),
        }
        if device.type == "cuda":
            rng["torch_cuda"] = gather(torch.cuda.get_rng_state(device), world, device)
        if not master:
            return
        meta = metadata()
        scalars = {
            "step": step,
            "epoch": epoch,
            "index": index,
            "elapsed_s": meta["wall_time_s"],
            "train_bits": train_bits,
            "valid_bits": valid_bits,
            "valid_bits_unlabelled": valid_bits_unlabelled,
            "best_valid_bits": None if best_bits == math.inf else best_bits,
            "world_size": world,
            "train_config": cfg.to_dict(),
            "commands": commands,
        }
        tensors, state = trainer_state(optimizer, rng, scalars)

        def write(tmp: Path) -> None:
            save_checkpoint(tmp, model, meta)
            save_file(tensors, str(tmp / f"{TRAINER_STATE}.safetensors"))
            (tmp / f"{TRAINER_STATE}.json").write_text(json.dumps(state, indent=2) + "\n")
            write_card(tmp, config, meta)

        weights = tensor_bytes(model.state_dict().values())
        replace_folder(run_dir / "last", write, needed=weights + tensor_bytes(tensors.values()))

    def save_best() -> None:
        meta = metadata()

        def write(tmp: Path) -> None:
            save_checkpoint(tmp, model, meta)
            write_card(tmp, config, meta)

        replace_folder(run_dir / "best", write, needed=tensor_bytes(model.state_dict().values()))

    # --- the loop -------------------------------------------------------------------------------
    # a context, so that the bar ends its line before an error is printed below it
    with tqdm(
        total=cfg.steps, initial=step, unit="step", file=sys.stderr, disable=not master
    ) as bar:
        interval_bits, interval_start, interval_steps, nonfinite = [], time.perf_counter(), 0, 0
        model.train()
        while step < cfg.steps:
            lr_scale = lr_factor(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lr_scale
            # One global batch of batch_size windows per process; this process takes its share.
            order, epoch, index = take_windows(
                len(windows), cfg.seed, epoch, index, world * cfg.batch_size
            )
            gains = None
            if cfg.gain_db > 0:
                gains = (torch.rand(len(order), generator=gain_rng) * 2 - 1) * cfg.gain_db
                gains = gains[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            mine = [windows[i] for i in order[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]]
            inputs, targets = make_batch(
                train_clips, mine, cfg.seq_len, config.quantization, config.n_classes, gains
            )
            # the padding after a clip's end is silence the model must predict
            if cfg.score_padding:
                targets = targets.masked_fill(targets == IGNORE_INDEX, model.start_token)
            labels = None
            if vocabulary:  # a function of (seed, step, rank): a resumed run drops the same fields
                labels = drop_labels(
                    label_tensor(vocabulary, [train_labels[w.clip] for w in mine]),
                    cfg.label_dropout,
                    torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * world + rank),
                ).to(device)
            with autocast:
                logits = net(inputs.to(device), labels)
                loss = nll_bits(logits.float(), targets.to(device))  # bits per sample
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip or math.inf
            )
            loss_all = loss.detach().clone()
            if world > 1:  # a NaN on any process makes the sum NaN on all: they skip together
                dist.all_reduce(loss_all)
                loss_all /= world
            bits = loss_all.item()
            if math.isfinite(bits) and torch.isfinite(grad_norm):
                optimizer.step()
                interval_bits.append(bits)
                nonfinite = 0
            else:
                nonfinite += 1
                log.warning(
                    f"step {step + 1}: non-finite loss {bits} or gradient norm "
                    f"{grad_norm.item()}; step skipped"
                )
                if nonfinite == MAX_NONFINITE_STEPS:
                    raise FloatingPointError(
                        f"{MAX_NONFINITE_STEPS} steps in a row had a non-finite loss or gradient "
                        f"(last at step {step + 1}); lower --lr or --grad-clip, or look for bad audio"
                    )
            step += 1
            interval_steps += 1
            bar.update(1)
            bar.set_postfix(bits=f"{bits:.3f}", lr=f"{cfg.lr * lr_scale:.2e}")

            validate = step % cfg.valid_every == 0 or step == cfg.steps
            if master and (step % cfg.log_every == 0 or validate):
                now = time.perf_counter()
                if interval_bits:
                    train_bits = sum(interval_bits) / len(interval_bits)
                samples_per_s = (
                    interval_steps * world * cfg.batch_size * cfg.seq_len / (now - interval_start)
                )
                if validate and valid_tokens:
                    valid_bits = evaluate_bits(
                        model, valid_tokens, cfg.batch_size, valid_label_rows
                    )
                    if vocabulary:
                        valid_bits_unlabelled = evaluate_bits(model, valid_tokens, cfg.batch_size)
                    if valid_bits < best_bits:
                        best_bits = valid_bits
                        save_best()
                if validate:
                    write_samples(model, run_dir, step, cfg)
                    model.train()
                append_metrics(
                    run_dir,
                    {
                        "step": step,
                        "train_bits": "" if train_bits is None else train_bits,
                        "valid_bits": valid_bits if validate else "",
                        "lr": cfg.lr * lr_scale,
                        "samples_per_s": round(samples_per_s, 1),
                        "elapsed_s": round(elapsed + now - started, 1),
                    },
                )
                if validate:
                    plot_metrics(run_dir)
                    known = {
                        "train": train_bits,
                        "valid": valid_bits,
                        "valid without labels": valid_bits_unlabelled,
                    }
                    summary = ", ".join(f"{k} {v:.3f}" for k, v in known.items() if v is not None)
                    bar.write(f"step {step:,}: {summary} bits/sample", file=sys.stderr)
                interval_bits, interval_start, interval_steps = [], time.perf_counter(), 0
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_last()

    if world > 1:  # every process must hold the same weights, or DDP went wrong
        sha1 = weights_sha1(model)
        digests = gather(torch.tensor(list(bytes.fromhex(sha1)), dtype=torch.uint8), world, device)
        if not all(torch.equal(d, digests[0]) for d in digests):
            raise RuntimeError(f"the {world} processes ended with different weights")
        if master:
            log.info(f"all {world} processes hold equal weights (sha1 {sha1})")
        dist.destroy_process_group()
    return metadata()

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

The settings are a TrainConfig (train/config.py); the audio is read once by train/data.py.
sashimi/checkpoint.py writes the folders and reads them back (TrainerState: where the run stands);
train/report.py composes their metrics.json and card.md and writes metrics.csv, metrics.png and
the samples. Under torchrun every process trains on its own share of each batch
(DistributedDataParallel, train/distributed.py); only rank 0 validates and writes files.
"""

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sashimi.audio import silence_token
from sashimi.checkpoint import (
    TRAINER_STATE,
    TrainerState,
    load_checkpoint,
    read_config,
    recover_folder,
    replace_checkpoint,
    resolve_save,
)
from sashimi.config import SaShiMiConfig
from sashimi.data import make_batch, take_windows
from sashimi.evaluate import evaluate_bits
from sashimi.labels import UNKNOWN, drop_labels, label_indices, label_tensor
from sashimi.model import IGNORE_INDEX, SaShiMi, is_label_parameter, nll_bits

from .config import TrainConfig
from .data import RunData, load_data
from .distributed import (
    barrier,
    finish,
    mean_over_processes,
    random_states,
    setup_processes,
    wrap,
)
from .report import (
    RunFacts,
    append_metrics,
    card_text,
    metadata,
    plot_metrics,
    truncate_metrics,
    write_samples,
)

log = logging.getLogger(__name__)

SSM_MAX_LR = 1e-3  # S4's dt, A, B (and P) train at most this fast, without weight decay (S4 paper)
MAX_NONFINITE_STEPS = 5  # consecutive steps with a non-finite loss or gradient before giving up


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


# --- where the run starts and stands -------------------------------------------------------------


def start_from(model: SaShiMi, directory: str) -> None:
    """Copy the weights of the checkpoint in `directory` into `model` (--init). The architecture
    must be the same; label weights carry over as carried_label_weights says."""
    source, _ = load_checkpoint(directory)
    weights = {
        name: tensor for name, tensor in source.state_dict().items() if not is_label_parameter(name)
    }
    weights |= carried_label_weights(source, model, directory)
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


def carried_label_weights(source: SaShiMi, model: SaShiMi, directory: str) -> dict:
    """The label weights of `source` for `model`, by value, not by count: with the same fields,
    the projections and the embedding row of "unknown" and of every value both vocabularies hold
    (a value new to `model` keeps its fresh row, and is reported). With other fields, none: the
    labels start over (projections at zero), and that is reported too."""
    old, new = source.config.labels, model.config.labels
    if list(old) != list(new):
        if old and new:
            log.warning(
                "--init %s was trained on the label fields %s, this run has %s: its label "
                "weights are not used, the labels are learnt from the start",
                directory,
                list(old),
                list(new),
            )
        return {}
    weights = {
        name: tensor
        for name, tensor in source.state_dict().items()
        if is_label_parameter(name) and not name.startswith("label_embeddings.")
    }
    for f, (field_name, values) in enumerate(new.items()):
        rows = model.label_embeddings[f].weight.detach().clone()
        old_rows = source.label_embeddings[f].weight.detach()
        rows[UNKNOWN] = old_rows[UNKNOWN]
        for value in values.keys() & old[field_name].keys():
            i, j = (label_indices(labels, {field_name: value})[f] for labels in (new, old))
            rows[i] = old_rows[j]
        weights[f"label_embeddings.{f}.weight"] = rows
        fresh = [value for value in values if value not in old[field_name]]
        if fresh:
            log.warning(
                "--init %s never heard %s=%s: %s learnt from the start",
                directory,
                field_name,
                ", ".join(fresh[:5]) + (", ..." if len(fresh) > 5 else ""),
                "it is" if len(fresh) == 1 else f"these {len(fresh)} values are",
            )
    return weights


@dataclass(frozen=True)
class Run:
    """What stays fixed while a run trains, for the helpers of train()."""

    cfg: TrainConfig
    data: RunData
    facts: RunFacts  # what its saves say about it
    rank: int  # this process, of `world` (train/distributed.py)
    world: int
    device: torch.device
    started: float  # time.perf_counter() when this session of the run started

    @property
    def dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def wall_time(self, state: TrainerState, now: float | None = None) -> float:
        """Seconds the run has trained, in this session and the ones before it, to 0.1 s."""
        return round(
            state.elapsed_s + (time.perf_counter() if now is None else now) - self.started, 1
        )


def run_facts(
    cfg: TrainConfig, data: RunData, world: int, device: torch.device, model: SaShiMi
) -> RunFacts:
    """What the saves of this run say about its data, batches, processes and model."""
    config = data.config
    return RunFacts(
        train_data=cfg.data,
        valid_data=cfg.valid_data or f"{cfg.valid_fraction:.0%} of {cfg.data}",
        n_train_files=len(data.train_clips),
        n_valid_files=len(data.valid_clips),
        train_audio_hours=sum(len(c.audio) for c in data.train_clips) / config.sample_rate / 3600,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        world_size=world,
        device=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        num_parameters=sum(p.numel() for p in model.parameters()),
        labels=cfg.labels if config.labels else None,
        label_dropout=cfg.label_dropout,
    )


def refuse_another_run(run_dir: Path, resume: bool) -> None:
    """A new run must not mix its files with those of a run already in `run_dir`."""
    # last.old/ alone is a run too: a save killed between its two renames (resolve_save)
    saved = [
        p for p in (resolve_save(run_dir / "last"), resolve_save(run_dir / "best")) if p.exists()
    ]
    if not resume and saved:
        raise ValueError(
            f"{run_dir} already holds a run ({saved[0].name}/); pass --resume to continue it, "
            "or another --out"
        )


def resume_configs(out: str | Path) -> tuple[SaShiMiConfig, TrainConfig]:
    """The model and training settings of the run saved in out/last (what --resume continues).
    Only reads: under torchrun every process calls this before rank 0 may recover_folder(last)."""
    last = resolve_save(Path(out) / "last")  # last.old/ after a kill between a save's renames
    state = TrainerState.load(last)
    try:
        settings = TrainConfig.from_dict(state.train_config)
    except ValueError as error:
        raise ValueError(f"{last / TRAINER_STATE}.json: {error}") from error
    return read_config(last), settings


def resume_from(
    run: Run,
    model: SaShiMi,
    optimizer: torch.optim.Optimizer,
    gain_rng: torch.Generator,
    command: str,
) -> TrainerState:
    """Put the model, the optimiser and the random generators back as run.dir/last saved them;
    returns the state to continue from, with this session's settings and `command`."""
    last = run.dir / "last"
    if run.master:
        recover_folder(last)
    barrier(run.world)  # the others read last/ once rank 0 has put it back together
    saved = TrainerState.load(last)
    model.load_state_dict(load_checkpoint(last)[0].state_dict())
    optimizer.load_state_dict(saved.optimizer)
    gain_rng.set_state(saved.rng["gain"])
    if saved.world_size == run.world:
        torch.set_rng_state(saved.rng["torch_cpu"][run.rank])
        if run.device.type == "cuda":
            torch.cuda.set_rng_state(saved.rng["torch_cuda"][run.rank], run.device)
    else:
        log.warning(
            f"resumed with {run.world} processes instead of {saved.world_size}: "
            "dropout draws other random numbers than the first run"
        )
    log.info(f"resumed {last} at step {saved.step:,}")
    return dataclasses.replace(
        saved,
        world_size=run.world,
        train_config=run.cfg.to_dict(),
        commands=[*saved.commands, command],
        optimizer={},  # the optimiser holds them now; a save takes them from it
        rng={},
    )


def save_last(
    run: Run,
    model: SaShiMi,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    rng: dict[str, torch.Tensor],
) -> None:
    """last/: the checkpoint and all it takes to resume, with the random states `rng` of every
    process (random_states)."""
    meta = metadata(state, run.facts, run.wall_time(state))
    saved = dataclasses.replace(
        state, elapsed_s=meta["wall_time_s"], optimizer=optimizer.state_dict(), rng=rng
    )
    replace_checkpoint(run.dir / "last", model, meta, card_text(model.config, meta), saved)


def save_best(run: Run, model: SaShiMi, state: TrainerState) -> None:
    """best/: the checkpoint of the lowest validation bits per sample so far."""
    meta = metadata(state, run.facts, run.wall_time(state))
    replace_checkpoint(run.dir / "best", model, meta, card_text(model.config, meta))


# --- one step, and what is done every so often ---------------------------------------------------


def get_batch(
    run: Run, order: list[int], step: int, gain_rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This process's batch_size windows of `order`, the global batch of world x batch_size:
    (inputs, targets), each (batch_size, seq_len), and their labels with fields dropped (None
    without --labels), on this process's device."""
    cfg, data, config = run.cfg, run.data, run.data.config
    mine = slice(run.rank * cfg.batch_size, (run.rank + 1) * cfg.batch_size)
    gains = None
    if cfg.gain_db > 0:  # drawn for the whole batch, so every process draws the same numbers
        gains = ((torch.rand(len(order), generator=gain_rng) * 2 - 1) * cfg.gain_db)[mine]
    windows = [data.windows[i] for i in order[mine]]
    inputs, targets = make_batch(
        data.train_clips, windows, cfg.seq_len, config.quantization, config.n_classes, gains
    )
    if cfg.score_padding:  # the padding after a clip's end is silence the model must predict
        silence = silence_token(config.quantization, config.n_classes)
        targets = targets.masked_fill(targets == IGNORE_INDEX, silence)
    labels = None
    if config.labels:  # a function of (seed, step, rank): a resumed run drops the same fields
        labels = drop_labels(
            label_tensor(config.labels, [data.train_labels[w.clip] for w in windows]),
            cfg.label_dropout,
            torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * run.world + run.rank),
        ).to(run.device)
    return inputs.to(run.device), targets.to(run.device), labels


def report_nonfinite(in_a_row: int, step: int, bits: float, grad_norm: torch.Tensor) -> None:
    """Warn of a step skipped for a non-finite loss or gradient; give up at the
    MAX_NONFINITE_STEPS-th in a row."""
    log.warning(
        f"step {step + 1}: non-finite loss {bits} or gradient norm {grad_norm.item()}; step skipped"
    )
    if in_a_row == MAX_NONFINITE_STEPS:
        raise FloatingPointError(
            f"{MAX_NONFINITE_STEPS} steps in a row had a non-finite loss or gradient "
            f"(last at step {step + 1}); lower --lr or --grad-clip, or look for bad audio"
        )


@dataclass
class Interval:
    """The steps since the last row of metrics.csv."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    bits: list[float] = field(default_factory=list)  # of each step that was not skipped


def score_validation(run: Run, model: SaShiMi, state: TrainerState) -> bool:
    """Validation bits per sample into `state`; True when they are the lowest so far."""
    data, batch_size = run.data, run.cfg.batch_size
    if not data.valid_tokens:
        return False
    state.valid_bits = evaluate_bits(model, data.valid_tokens, batch_size, data.valid_label_rows)
    if data.config.labels:
        state.valid_bits_unlabelled = evaluate_bits(model, data.valid_tokens, batch_size)
    lowest = state.valid_bits < state.best_valid_bits  # False for NaN
    if lowest:
        state.best_valid_bits = state.valid_bits
    return lowest


def log_interval(
    run: Run,
    model: SaShiMi,
    state: TrainerState,
    interval: Interval,
    lr: float,
    validate: bool,
    bar: tqdm,
) -> None:
    """Rank 0, every log_every steps: a row of metrics.csv. At a validation also best/ (when
    it is the best so far), the samples, metrics.png and a line under the progress bar."""
    cfg = run.cfg
    now = time.perf_counter()
    if interval.bits:
        state.train_bits = sum(interval.bits) / len(interval.bits)
    samples = interval.steps * run.world * cfg.batch_size * cfg.seq_len
    if validate:
        if score_validation(run, model, state):
            save_best(run, model, state)
        write_samples(model, run.dir, state.step, cfg.num_samples, cfg.sample_seconds, cfg.seed)
        model.train()
    append_metrics(
        run.dir,
        {
            "step": state.step,
            "train_bits": "" if state.train_bits is None else state.train_bits,
            "valid_bits": state.valid_bits if validate else "",
            "lr": lr,
            "samples_per_s": round(samples / (now - interval.start), 1),
            "elapsed_s": run.wall_time(state, now),
        },
    )
    if validate:
        plot_metrics(run.dir)
        known = {
            "train": state.train_bits,
            "valid": state.valid_bits,
            "valid without labels": state.valid_bits_unlabelled,
        }
        summary = ", ".join(f"{k} {v:.3f}" for k, v in known.items() if v is not None)
        bar.write(f"step {state.step:,}: {summary} bits/sample", file=sys.stderr)


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
    started = time.perf_counter()
    refuse_another_run(Path(cfg.out), resume)

    # --- data: every file decoded once into memory --------------------------------------------
    data = load_data(config, cfg, rate_from_data=rate_from_data, resume=resume, master=rank == 0)
    if rank == 0:
        log.info(
            f"{len(data.train_clips):,} training files ({len(data.windows):,} windows of up to "
            f"{cfg.seq_len:,} samples), {len(data.valid_clips):,} validation files; {world} "
            f"process(es) on {device}"
        )

    # --- model, optimiser, and where we are ----------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = SaShiMi(data.config).recompute_activations(cfg.recompute_activations).to(device)
    if cfg.init is not None and not resume:
        start_from(model, cfg.init)
    optimizer = make_optimizer(model, cfg)
    gain_rng = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout: its own stream in each process
    run = Run(cfg, data, run_facts(cfg, data, world, device, model), rank, world, device, started)
    state = TrainerState(world_size=world, train_config=cfg.to_dict(), commands=[command])
    if resume:
        state = resume_from(run, model, optimizer, gain_rng, command)
    if run.master:
        truncate_metrics(run.dir, state.step)  # rows a killed run wrote after its last save

    run_loop(run, model, optimizer, gain_rng, state)
    finish(model, rank, world, device)
    return metadata(state, run.facts, run.wall_time(state))


# --- the loop ------------------------------------------------------------------------------------


def run_loop(
    run: Run,
    model: SaShiMi,
    optimizer: torch.optim.Optimizer,
    gain_rng: torch.Generator,
    state: TrainerState,
) -> None:
    """The loop, from state.step to cfg.steps: forward, backward, clip, step; every log_every
    steps a row of metrics.csv, every valid_every a validation, every save_every a save."""
    cfg, data, world = run.cfg, run.data, run.world
    net = wrap(model, world, run.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda")
    # a context, so that the bar ends its line before an error is printed below it
    with tqdm(
        total=cfg.steps, initial=state.step, unit="step", file=sys.stderr, disable=not run.master
    ) as bar:
        interval, nonfinite = Interval(), 0
        model.train()
        while state.step < cfg.steps:
            lr_scale = lr_factor(state.step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lr_scale
            # one global batch of batch_size windows per process; this process takes its share
            order, state.epoch, state.index = take_windows(
                len(data.windows), cfg.seed, state.epoch, state.index, world * cfg.batch_size
            )
            inputs, targets, labels = get_batch(run, order, state.step, gain_rng)
            with autocast:
                logits = net(inputs, labels)
                loss = nll_bits(logits.float(), targets)  # bits per sample
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip or math.inf
            )
            bits = mean_over_processes(loss, world)
            if math.isfinite(bits) and torch.isfinite(grad_norm):
                optimizer.step()
                interval.bits.append(bits)
                nonfinite = 0
            else:
                nonfinite += 1
                report_nonfinite(nonfinite, state.step, bits, grad_norm)
            state.step += 1
            interval.steps += 1
            bar.update(1)
            bar.set_postfix(bits=f"{bits:.3f}", lr=f"{cfg.lr * lr_scale:.2e}")

            validate = state.step % cfg.valid_every == 0 or state.step == cfg.steps
            if run.master and (state.step % cfg.log_every == 0 or validate):
                log_interval(run, model, state, interval, cfg.lr * lr_scale, validate, bar)
                interval = Interval()
            if state.step % cfg.save_every == 0 or state.step == cfg.steps:
                rng = random_states(gain_rng, world, run.device)  # every process hands in its own
                if run.master:
                    save_last(run, model, optimizer, state, rng)

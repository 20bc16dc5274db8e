"""The only code that reads or writes a checkpoint folder.

A checkpoint is a folder holding
    config.json          SaShiMiConfig.to_dict(): rebuilds the model, with its sample rate and quantisation
    model.safetensors    the weights (safetensors: loading runs no code, unlike a pickle)
    metrics.json         optional facts for people: steps, validation bits per sample, data, wall time
    card.md              optional, what a person should know about the model (training composes it)
The last/ folder of a training run holds the trainer's state as well (TrainerState), so that
`python -m train --resume` continues exactly where the run stopped:
    trainer_state.json          step, data position, bits per sample, settings, optimiser groups
    trainer_state.safetensors   the optimiser's moments and the random generators' states
Each file is written to a temporary name and renamed into place, so a process killed mid-save
leaves either the previous file or the new one, never a torn one; a whole folder is swapped in the
same way (replace_folder, replace_checkpoint). A write that finds the disk full removes what it
wrote and raises DiskFullError, saying how much the save needed and how much was free.
"""

import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import SaShiMiConfig
from .model import SaShiMi

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CARD_FILE = "card.md"
TRAINER_STATE = "trainer_state"  # .safetensors (tensors) + .json (the rest), only in last/
CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS_DIR / "fsdd"  # the shipped model, trained on spoken digits
SHOWN_TENSORS = 3  # tensors named in an error about many of them


# --- writing without tearing, and a full disk -----------------------------------------------------


def _bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as df -H and file managers show them)."""
    power = min(len(str(n)) - 1, 9) // 3  # 0: B, 1: kB, 2: MB, 3: GB
    return f"{n} B" if power == 0 else f"{n / 1000**power:.1f} {('kB', 'MB', 'GB')[power - 1]}"


def free_bytes(path: Path) -> int:
    """Bytes free for this user on the disk that holds `path` (or would, once created)."""
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    raise FileNotFoundError(f"no folder of {path} exists")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """What tensors take in a safetensors file, less its small JSON header."""
    return sum(t.numel() * t.element_size() for t in tensors)


class DiskFullError(OSError):
    """A write that did not fit on its disk. What it had written is removed again, so the files
    it would have replaced are untouched."""

    def __init__(self, target: Path, needed: str, free: int):
        super().__init__(
            errno.ENOSPC,
            f"no space left to save {target}: it needs {needed}, and {_bytes(free)} is free "
            "on that disk",
        )

    def __str__(self) -> str:
        return self.strerror


def _is_disk_full(error: Exception) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors reports it as text: "I/O error: No space left on device (os error 28)"
    return any(os.strerror(code) in str(error) for code in (errno.ENOSPC, errno.EDQUOT))


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


@contextmanager
def reporting_full_disk(
    target: Path, needed: int | None = None, written: Path | None = None
) -> Iterator[None]:
    """Run a block that writes `target` (`needed` bytes, when known): refuse before it starts when
    fewer bytes are free, and turn a disk-full error inside it into DiskFullError. `written` is
    the temporary file or folder the block writes into; its size at the failure is reported when
    `needed` is unknown. The block's own cleanup must leave nothing behind."""
    if needed is not None and needed > (free := free_bytes(target)):
        raise DiskFullError(target, f"about {_bytes(needed)}", free)  # before writing a byte
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        if not _is_disk_full(error):
            raise
        unfinished = _size_on_disk(written) if written is not None else 0
        if needed is None:
            needed_text = f"more than the {_bytes(unfinished)} it had written"
        else:
            needed_text = f"about {_bytes(needed)}"
        # the caller removes `written` next: count its bytes as free
        raise DiskFullError(target, needed_text, free_bytes(target) + unfinished) from error


def atomic_write(path: Path, write: Callable[[Path], None], needed: int | None = None) -> None:
    """Call write(tmp_path), fsync, then rename onto `path`: readers never see a partial file.
    A full disk (`needed` bytes, when known) is a DiskFullError, with no temporary file left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with reporting_full_disk(path, needed, Path(tmp)):
            write(Path(tmp))
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the files from other users of the run
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text), needed=len(text.encode()))


def save_checkpoint(directory: str | Path, model: SaShiMi, metadata: dict | None = None) -> Path:
    """Write config.json, model.safetensors and (if given) metrics.json into `directory`."""
    directory = Path(directory)
    # safetensors refuses tensors that share memory or are not contiguous: store plain copies.
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    atomic_write(
        directory / WEIGHTS_FILE,
        lambda tmp: save_file(weights, str(tmp)),
        needed=tensor_bytes(weights.values()),
    )
    if metadata is not None:
        atomic_write_json(directory / METRICS_FILE, metadata)
    # config.json last: a folder counts as a checkpoint only once its weights are in place.
    atomic_write_json(directory / CONFIG_FILE, model.config.to_dict())
    return directory


def _tmp_and_old(target: Path) -> tuple[Path, Path]:
    return target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")


def replace_folder(target: Path, write: Callable[[Path], None], needed: int | None = None) -> None:
    """Write a complete new folder with write(tmp), then swap it in for `target`.

    kill -9 at any moment: while tmp is written, `target` is the previous save. Between the two
    renames `target` is missing for two system calls, and `target.old` holds the previous save:
    resolve_save() finds it there, and recover_folder() puts it back at the next start. After
    both, `target` is the new save. A full disk (`needed` bytes, when known) is a DiskFullError
    with `target` untouched and no tmp left.
    """
    recover_folder(target)
    tmp, old = _tmp_and_old(target)
    try:
        with reporting_full_disk(target, needed, written=tmp):
            write(tmp)
    except BaseException:  # an error, or ctrl-C: leave only the previous save
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(target: Path) -> None:
    """Undo a save that was killed halfway (see replace_folder): keep whichever copy is complete."""
    tmp, old = _tmp_and_old(target)
    if not target.exists() and old.exists():
        os.replace(old, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def resolve_save(target: str | Path) -> Path:
    """`target`, or `target.old` where a save into `target` was killed between the two renames
    of replace_folder: the previous save waits there, complete, until recover_folder runs."""
    target = Path(target)
    old = _tmp_and_old(target)[1]
    return old if not target.exists() and old.is_dir() else target


# --- a training run's saves: whole folders, with the trainer's state in last/ --------------------


@dataclass
class TrainerState:
    """Where a training run stands: what `python -m train --resume` needs besides the weights to
    continue exactly. The loop keeps its scalars here as it goes; `optimizer` and `rng` are filled
    in for a save and by load(). On disk (save, load): trainer_state.json holds the scalars and the
    optimiser's parameter groups, trainer_state.safetensors the tensors "rng.<name>" and
    "optimizer.<parameter index>.<name>"."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # position in the shuffled stream of windows (sashimi.data.take_windows)
    index: int = 0
    elapsed_s: float = 0.0  # wall time of the run up to this state
    train_bits: float | None = None  # mean bits per sample of the last logged interval
    valid_bits: float | None = None  # of the last validation
    valid_bits_unlabelled: float | None = None  # a labelled model's, with every field unknown
    best_valid_bits: float = math.inf  # the validation that best/ holds; saved as null until one
    world_size: int = 1  # processes, each with its own row in the torch random states
    train_config: dict = field(default_factory=dict)  # train.config.TrainConfig.to_dict()
    commands: list[str] = field(default_factory=list)  # the first command, then each resume's
    optimizer: dict = field(default_factory=dict)  # torch.optim.Optimizer.state_dict()
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # random generator states by name

    def save(self, directory: Path) -> None:
        """Write both files into `directory`, a folder that replace_folder is filling."""
        scalars = {name: getattr(self, name) for name in _TRAINER_SCALARS}
        if self.best_valid_bits == math.inf:
            scalars["best_valid_bits"] = None  # JSON has no infinity
        scalars["optimizer_param_groups"] = self.optimizer["param_groups"]
        tensors = {f"rng.{name}": t.contiguous() for name, t in self.rng.items()}
        for index, state in self.optimizer["state"].items():
            for name, value in state.items():
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
        save_file(tensors, str(directory / f"{TRAINER_STATE}.safetensors"))
        (directory / f"{TRAINER_STATE}.json").write_text(json.dumps(scalars, indent=2) + "\n")

    def nbytes(self) -> int:
        """What trainer_state.safetensors takes, less its header."""
        moments = [t for state in self.optimizer["state"].values() for t in state.values()]
        return tensor_bytes([*self.rng.values(), *moments])

    @classmethod
    def load(cls, directory: str | Path) -> "TrainerState":
        """The state saved in `directory` (a run's last/); a missing or damaged file is an error
        naming it and saying how to go on."""
        tensors, saved = _read_trainer_state(Path(directory))
        scalars = {name: saved[name] for name in _TRAINER_SCALARS if name in saved}
        if scalars["best_valid_bits"] is None:
            scalars["best_valid_bits"] = math.inf
        rng, moments = {}, {}
        for key, value in tensors.items():
            kind, name = key.split(".", 1)
            if kind == "rng":
                rng[name] = value
            elif kind == "optimizer":
                index, name = name.split(".")
                moments.setdefault(int(index), {})[name] = value
        optimizer = {"state": moments, "param_groups": saved["optimizer_param_groups"]}
        return cls(**scalars, optimizer=optimizer, rng=rng)


# trainer_state.json: every field of TrainerState but the tensors' two, in the order of the fields
_TRAINER_SCALARS = tuple(f.name for f in dataclasses.fields(TrainerState))[:-2]
# what a trainer state cannot do without (valid_bits_unlabelled and commands came later)
_TRAINER_JSON_KEYS = ("step", "epoch", "index", "elapsed_s", "train_bits", "valid_bits")
_TRAINER_JSON_KEYS += ("best_valid_bits", "world_size", "optimizer_param_groups")
_TRAINER_TENSORS = ("rng.gain", "rng.torch_cpu")


def _read_trainer_state(last: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON of the trainer state in `last`, checked for what load needs."""
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
        saved = json.loads(json_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{json_path} is damaged (not valid JSON: {error}); {go_on}") from error
    if not isinstance(saved, dict) or not isinstance(saved.get("train_config"), dict):
        raise ValueError(f"{json_path} is damaged (no training settings in it); {go_on}")
    for path, keys, held in (
        (json_path, _TRAINER_JSON_KEYS, saved),
        (tensors_path, _TRAINER_TENSORS, tensors),
    ):
        missing = [key for key in keys if key not in held]
        if missing:
            raise ValueError(f"{path} is damaged (no {', '.join(missing)} in it); {go_on}")
    return tensors, saved


def replace_checkpoint(
    target: Path,
    model: SaShiMi,
    metadata: dict,
    card: str,
    trainer_state: TrainerState | None = None,
) -> None:
    """Swap in a complete checkpoint folder at `target` (replace_folder): the checkpoint with its
    metrics.json, card.md (`card`, the text), and with `trainer_state`, its two files."""

    def write(tmp: Path) -> None:
        save_checkpoint(tmp, model, metadata)
        if trainer_state is not None:
            trainer_state.save(tmp)
        (tmp / CARD_FILE).write_text(card)

    needed = tensor_bytes(model.state_dict().values())
    if trainer_state is not None:
        needed += trainer_state.nbytes()
    replace_folder(target, write, needed=needed)


def is_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


_JSON_TYPES = {
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def _read_json_object(path: Path, holds: str) -> dict:
    """The JSON object in `path`; ValueError naming the file when it is unreadable or not one."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    except PermissionError as error:
        raise ValueError(f"{path}: not readable (permission denied)") from error
    if not isinstance(data, dict):
        got = "null" if data is None else _JSON_TYPES[type(data)]
        raise ValueError(f"{path} must hold a JSON object of {holds}, got {got}")
    return data


def read_config(directory: str | Path) -> SaShiMiConfig:
    """The model settings in a checkpoint's config.json; a bad one is a ValueError naming it."""
    path = Path(directory) / CONFIG_FILE
    settings = _read_json_object(path, 'model settings, e.g. {"d_model": 64, ...}')
    try:
        return SaShiMiConfig.from_dict(settings)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def read_metadata(directory: str | Path) -> dict:
    """metrics.json of a checkpoint as a dict ({} when there is none)."""
    path = Path(directory) / METRICS_FILE
    return _read_json_object(path, "facts about the run") if path.is_file() else {}


def _first(items: list[str], sep: str = ", ") -> str:
    """The first few items, joined: an error names examples, not a 169-line list."""
    return sep.join(items[:SHOWN_TENSORS]) + (f"{sep}..." if len(items) > SHOWN_TENSORS else "")


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _check_weights(path: Path, weights: dict[str, torch.Tensor], model: SaShiMi) -> None:
    """ValueError naming the file and its first bad tensors: NaN or inf, or other names or shapes
    than the model built from config.json has (which load_state_dict would list in full)."""
    nonfinite = [
        name
        for name, t in weights.items()
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all()
    ]
    if nonfinite:
        raise ValueError(
            f"{path} holds NaN or inf in {len(nonfinite)} of {len(weights)} tensors "
            f"({_first(nonfinite)}): training diverged before this save; load an earlier one, "
            "e.g. its run's best/"
        )
    expected = model.state_dict()
    reshaped = [
        f"{name}: {_shape(weights[name])} in the file, {_shape(t)} from {CONFIG_FILE}"
        for name, t in expected.items()
        if name in weights and weights[name].shape != t.shape
    ]
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    problems = [
        f"{len(names)} tensors {how} ({_first(names, sep)})"
        for names, how, sep in (
            (reshaped, "of another shape", "; "),
            (missing, "missing", ", "),
            (unexpected, "not in the model", ", "),
        )
        if names
    ]
    if problems:
        raise ValueError(f"{path} does not match {CONFIG_FILE}: {'; '.join(problems)}")


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[SaShiMi, dict]:
    """Rebuild the model from a checkpoint folder; returns (model in eval mode, metadata).

    Every way a folder can be unusable is a FileNotFoundError or a ValueError naming the file.
    """
    directory = Path(directory)
    if resolve_save(directory) != directory:
        log.warning(
            f"{directory} is missing: a save into it was interrupted, loading the previous save "
            f"from {resolve_save(directory)} (resuming the run puts it back)"
        )
        directory = resolve_save(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {directory} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory} has no {name}; pass a folder written by a save, e.g. runs/NAME/best"
            )
    model = SaShiMi(read_config(directory))
    path = directory / WEIGHTS_FILE
    try:
        weights = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    _check_weights(path, weights, model)
    model.load_state_dict(weights)
    return model.to(device).eval(), read_metadata(directory)


def list_checkpoints(root: str | Path = CHECKPOINTS_DIR) -> list[Path]:
    """Every checkpoint folder under `root` (recursively), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.rglob(CONFIG_FILE) if is_checkpoint(p.parent))

"""The only code that reads or writes a checkpoint folder.

A checkpoint is a folder holding
    config.json          SaShiMiConfig.to_dict(): rebuilds the model, with its sample rate and quantisation
    model.safetensors    the weights (safetensors: loading runs no code, unlike a pickle)
    metrics.json         optional facts for people: steps, validation bits per sample, data, wall time
Each file is written to a temporary name and renamed into place, so a process killed mid-save
leaves either the previous file or the new one, never a torn one.
"""

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import SaShiMi, SaShiMiConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS_DIR / "fsdd"  # the shipped model, trained on spoken digits


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync, then rename onto `path`: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the files from other users of the run
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def save_checkpoint(directory: str | Path, model: SaShiMi, metadata: dict | None = None) -> Path:
    """Write config.json, model.safetensors and (if given) metrics.json into `directory`."""
    directory = Path(directory)
    # safetensors refuses tensors that share memory or are not contiguous: store plain copies.
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp)))
    if metadata is not None:
        atomic_write_json(directory / METRICS_FILE, metadata)
    # config.json last: a folder counts as a checkpoint only once its weights are in place.
    atomic_write_json(directory / CONFIG_FILE, model.config.to_dict())
    return directory


def is_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


def read_metadata(directory: str | Path) -> dict:
    """metrics.json of a checkpoint as a dict ({} when there is none)."""
    path = Path(directory) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[SaShiMi, dict]:
    """Rebuild the model from a checkpoint folder; returns (model in eval mode, metadata)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {directory} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory} has no {name}; pass a folder written by a save, e.g. runs/NAME/best"
            )
    try:
        config = SaShiMiConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{directory / CONFIG_FILE} is not valid JSON: {error}") from error
    model = SaShiMi(config)
    try:
        weights = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    except SafetensorError as error:
        raise ValueError(
            f"{directory / WEIGHTS_FILE} is not a safetensors file: {error}"
        ) from error
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # same names, other shapes: config.json is not these weights
        raise ValueError(
            f"{directory / WEIGHTS_FILE} does not match {CONFIG_FILE}: {error}"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_FILE} does not match {CONFIG_FILE}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval(), read_metadata(directory)


def list_checkpoints(root: str | Path = CHECKPOINTS_DIR) -> list[Path]:
    """Every checkpoint folder under `root` (recursively), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.rglob(CONFIG_FILE) if is_checkpoint(p.parent))

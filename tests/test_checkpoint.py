"""Checkpoint folders: save and load, the errors for broken ones, and the shipped default model."""

import json
import shutil

import numpy as np
import pytest
import torch

from sashimi import SaShiMi
from sashimi.checkpoint import (
    CHECKPOINTS_DIR,
    DEFAULT_CHECKPOINT,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sashimi.generate import Generator

MARKOV_BITS_ON_FSDD_VALID = 5.20  # benchmarks/bench_baselines.py: first-order Markov chain


def test_save_then_load_gives_the_same_weights_config_and_metrics(tiny_config, tmp_path):
    torch.manual_seed(1)
    model = SaShiMi(tiny_config)
    save_checkpoint(tmp_path / "ckpt", model, {"step": 7, "valid_bits_per_sample": 6.5})
    loaded, metadata = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == tiny_config and not loaded.training
    assert metadata == {"step": 7, "valid_bits_per_sample": 6.5}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    for file in (tmp_path / "ckpt").iterdir():  # readable by the other users of a shared run
        assert file.stat().st_mode & 0o777 == 0o644, file


def test_broken_folders_are_clear_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", no_weights)
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_checkpoint(no_weights)

    bad_json = shutil.copytree(tiny_checkpoint, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_checkpoint(bad_json)

    pickle_like = shutil.copytree(tiny_checkpoint, tmp_path / "pickle_like")
    (pickle_like / "model.safetensors").write_bytes(b"\x80\x04\x95 not safetensors")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_checkpoint(pickle_like)

    wider = shutil.copytree(tiny_checkpoint, tmp_path / "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "d_model": 2 * config["d_model"]}))
    with pytest.raises(ValueError, match="model.safetensors does not match config.json"):
        load_checkpoint(wider)


def test_list_checkpoints_finds_complete_folders_at_any_depth(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path / "a")
    shutil.copytree(tiny_checkpoint, tmp_path / "runs" / "b" / "best")
    (tmp_path / "half").mkdir()  # a save in progress: config.json is written last
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path / "half")
    assert list_checkpoints(tmp_path) == [tmp_path / "a", tmp_path / "runs" / "b" / "best"]
    assert list_checkpoints(tmp_path / "missing") == []


# --- the shipped default model -------------------------------------------------------------------


def test_the_default_checkpoint_ships_small_and_complete():
    assert DEFAULT_CHECKPOINT in list_checkpoints(CHECKPOINTS_DIR)
    files = {p.name: p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir()}
    assert set(files) == {"config.json", "model.safetensors", "card.md", "metrics.json"}
    assert sum(files.values()) < 25 * 2**20  # and no trainer state: only resuming needs it

    model, metrics = load_checkpoint(DEFAULT_CHECKPOINT)
    assert model.config.sample_rate == 8000 and model.config.quantization == "mu-law"
    assert metrics["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert metrics["valid_bits_per_sample"] < MARKOV_BITS_ON_FSDD_VALID
    card = (DEFAULT_CHECKPOINT / "card.md").read_text()
    for fact in ("CC BY-SA 4.0", "python -m train", f"{metrics['num_parameters']:,}", "lucas"):
        assert fact in card, fact


def test_the_default_checkpoint_generates_speech_like_audio():
    generator = Generator.from_checkpoint(device="cpu")  # no path: the default
    clips = generator.generate(800, batch_size=2, seed=0, show_progress=False)
    assert clips.shape == (2, 800) and np.isfinite(clips).all()
    assert not np.array_equal(clips[0], clips[1])  # two seeds, two clips
    # A trained model on speech scores speech-like audio far better than white noise.
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, size=(1, 800)).astype(np.float32)
    assert generator.log_likelihood(clips).mean() < generator.log_likelihood(noise).mean() - 1.0

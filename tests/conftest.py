"""Shared fixtures: a tiny model configuration and a checkpoint of it written to disk."""

import dataclasses
import os

import pytest
import torch

from sashimi import SaShiMi, SaShiMiConfig
from sashimi.checkpoint import save_checkpoint

# One intra-op thread per process, here and in every subprocess a test starts (app, torchrun,
# CLIs): on 2 cores, OpenMP threads that spin-wait for busy cores made a forward pass 19x slower
# (0.25 s -> 4.8 s for sc09 at L = 1024 with other processes running).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture
def tiny_config() -> SaShiMiConfig:
    return SaShiMiConfig.preset("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised `tiny` model at 8 kHz saved as a checkpoint folder (read-only use)."""
    torch.manual_seed(0)
    config = dataclasses.replace(SaShiMiConfig.preset("tiny"), sample_rate=8000)
    directory = tmp_path_factory.mktemp("checkpoints") / "tiny"
    save_checkpoint(directory, SaShiMi(config).eval(), {"step": 0, "train_data": "random init"})
    return directory


@pytest.fixture
def audio_folder(tmp_path):
    """A small folder of real audio, as a user might have: tones, noise and a chirp at 8, 16, 22.05
    and 44.1 kHz, mono and stereo, WAV, FLAC and Ogg, in subfolders; plus three files to skip: a
    .wav of random bytes, a text file and a WAV with no frames. 5 usable files of 8."""
    import numpy as np
    import soundfile as sf

    root = tmp_path / "audio"
    (root / "voice").mkdir(parents=True)

    def t(rate, seconds):
        return np.arange(round(rate * seconds)) / rate

    rng = np.random.default_rng(0)
    sf.write(root / "tone_8k.wav", 0.5 * np.sin(2 * np.pi * 440 * t(8000, 1.0)), 8000)
    stereo_tone = 0.4 * np.sin(2 * np.pi * 220 * t(8000, 2.0))
    sf.write(root / "long_tone_8k_stereo.wav", np.stack([stereo_tone, stereo_tone], 1), 8000)
    sf.write(root / "voice" / "noise_16k_stereo.wav", 0.1 * rng.standard_normal((8000, 2)), 16000)
    sf.write(root / "voice" / "tone_44k.flac", 0.3 * np.sin(2 * np.pi * 330 * t(44100, 0.4)), 44100)
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 800 * t(22050, 0.5)) * t(22050, 0.5))
    sf.write(root / "chirp_22k.ogg", chirp, 22050, format="OGG", subtype="VORBIS")
    (root / "corrupt.wav").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (root / "notes.txt").write_text("recorded on a Tuesday\n")
    sf.write(root / "empty.wav", np.zeros(0), 8000)
    return root

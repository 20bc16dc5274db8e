"""Shared fixtures: a tiny model configuration and a checkpoint of it written to disk; folders of
real audio; file permissions that hold even for root."""

import dataclasses
import os
import pwd
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from sashimi import SaShiMi, SaShiMiConfig
from sashimi.checkpoint import save_checkpoint
from sashimi.model import is_label_parameter

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


@pytest.fixture(scope="session")
def tiny_labelled_checkpoint(tmp_path_factory):
    """A `tiny` model at 8 kHz labelled with digit (0, 1, 7) and speaker (ann, bob), its label
    weights random (trained ones start at zero, which would hide a wrong label path)."""
    torch.manual_seed(1)
    labels = {"digit": {"0": 3, "1": 2, "7": 1}, "speaker": {"ann": 4, "bob": 2}}
    config = dataclasses.replace(SaShiMiConfig.preset("tiny"), sample_rate=8000, labels=labels)
    model = SaShiMi(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if is_label_parameter(name):
                parameter.normal_(0, 0.5)
    directory = tmp_path_factory.mktemp("checkpoints") / "tiny_labelled"
    save_checkpoint(directory, model, {"step": 0, "train_data": "random init"})
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


@contextmanager
def _as_nobody():
    """As root, run the block with the effective user and group `nobody`; as anyone else, as is."""
    if os.geteuid() != 0:
        yield
        return
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("needs the user nobody to drop root's right to read any file")
    os.setegid(nobody.pw_gid)
    os.seteuid(nobody.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def unprivileged():
    """A context manager under which a chmod 000 file cannot be read: root reads any file whatever
    its mode, so as root the block runs as the user nobody. Files it reads must be in
    `public_tmp_path`."""
    return _as_nobody


@pytest.fixture
def public_tmp_path():
    """A temporary folder every user may enter (pytest's tmp_path sits in a folder only its owner
    may enter), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="sashimi-test-"))
    folder.chmod(0o755)
    yield folder
    for parent, folders, _ in os.walk(
        folder
    ):  # top-down: each folder is opened before it is entered
        for name in folders:
            if not os.path.islink(os.path.join(parent, name)):
                os.chmod(os.path.join(parent, name), 0o755)
    shutil.rmtree(folder)


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> an empty folder on a tmpfs of `size` ("2m"), unmounted afterwards: a disk
    that really fills. Mounting needs root (CI runs as root); elsewhere the test is skipped."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
        folder = tmp_path / f"disk_{len(mounted)}"
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)

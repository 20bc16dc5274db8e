"""Checkpoint folders: save and load, the errors for broken ones, saves on a full disk or killed
halfway, and the shipped default model."""

import json
import logging
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sashimi import SaShiMi
from sashimi.checkpoint import (
    CHECKPOINTS_DIR,
    DEFAULT_CHECKPOINT,
    DiskFullError,
    TrainerState,
    atomic_write,
    list_checkpoints,
    load_checkpoint,
    replace_checkpoint,
    replace_folder,
    resolve_save,
    save_checkpoint,
)
from sashimi.generate import Generator


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
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_checkpoint(pickle_like)

    wider = shutil.copytree(tiny_checkpoint, tmp_path / "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "d_model": 2 * config["d_model"]}))
    with pytest.raises(ValueError, match="model.safetensors does not match config.json"):
        load_checkpoint(wider)


def edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


def poison_weights(folder):
    weights = load_file(folder / "model.safetensors")
    for name in ("embedding.weight", "head.bias"):
        weights[name][0] = float("nan")
    save_file(weights, folder / "model.safetensors")


DAMAGES = {  # what was done to a good checkpoint -> the error, after the file's path
    "config is a list": (
        lambda folder: (folder / "config.json").write_text("[]"),
        r"config.json must hold a JSON object of model settings, e\.g\. .*, got a list",
    ),
    "config is null": (
        lambda folder: (folder / "config.json").write_text("null"),
        r"config.json must hold a JSON object of model settings, .*, got null",
    ),
    "unknown key": (
        edit_config(widht=3),
        r"config.json: unknown config keys \['widht'\]; known keys: \[.*\]",
    ),
    "bad value": (edit_config(kernel="fast"), r"config.json: kernel must be one of .*, got 'fast'"),
    "a word for a width": (
        edit_config(d_model="wide"),
        r"config.json: d_model must be int, got 'wide'",
    ),
    "a word among the pooling factors": (
        edit_config(pool=[4, "4"]),
        r"config.json: pool must be tuple\[int, \.\.\.\], got \[4, '4'\]",
    ),
    "true for a number": (
        edit_config(dropout=True),
        r"config.json: dropout must be float, got True",
    ),
    "weights hold NaN": (
        poison_weights,
        r"model.safetensors holds NaN or inf in 2 of \d+ tensors \(embedding.weight, head.bias\): "
        r"training diverged before this save; load an earlier one, e\.g\. its run's best/",
    ),
    "weights of a wider model": (
        edit_config(d_model=32),
        r"model.safetensors does not match config.json: \d+ tensors of another shape "
        r"\(embedding.weight: 256x16 in the file, 256x32 from config.json; .*; \.\.\.\)",
    ),
    "weights cut short": (
        lambda folder: (folder / "model.safetensors").write_bytes(b"\x10\x00"),
        r"model.safetensors is not a readable safetensors file \(.*\)",
    ),
    "metrics is a list": (
        lambda folder: (folder / "metrics.json").write_text("[1]"),
        r"metrics.json must hold a JSON object of facts about the run, got a list",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_one_line_naming_its_file(damage, tiny_checkpoint, tmp_path):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "damaged")
    change, expected = DAMAGES[damage]
    change(folder)
    with pytest.raises(ValueError) as error:
        load_checkpoint(folder)
    message = str(error.value)
    assert re.fullmatch(f"{re.escape(str(folder))}/{expected}", message), message
    assert "\n" not in message and len(message) < 600  # not PyTorch's list of every tensor


# --- saves on a full disk, and saves killed halfway ---------------------------------------------


def test_a_save_bigger_than_the_free_space_is_refused_before_writing(tiny_config, small_disk):
    disk = small_disk("256k")  # the tiny model's weights take about 420 kB
    with pytest.raises(DiskFullError) as error:
        save_checkpoint(disk / "ckpt", SaShiMi(tiny_config))
    assert re.fullmatch(
        rf"no space left to save {disk}/ckpt/model.safetensors: it needs about 4\d\d\.\d kB, "
        r"and 2\d\d\.\d kB is free on that disk",
        str(error.value),
    ), error.value
    assert list((disk / "ckpt").iterdir()) == []


def test_a_write_that_fills_the_disk_leaves_the_previous_file_and_nothing_else(small_disk):
    disk = small_disk("2m")
    (disk / "metrics.csv").write_text("step\n1\n")
    with pytest.raises(DiskFullError) as error:  # the size is not given: nothing to check first
        atomic_write(disk / "metrics.csv", lambda tmp: tmp.write_bytes(bytes(3_000_000)))
    assert re.fullmatch(
        rf"no space left to save {disk}/metrics.csv: it needs more than the 2\.\d MB it had "
        r"written, and 2\.\d MB is free on that disk",
        str(error.value),
    ), error.value
    assert [p.name for p in disk.iterdir()] == ["metrics.csv"]
    assert (disk / "metrics.csv").read_text() == "step\n1\n"


def test_a_folder_save_that_does_not_fit_keeps_the_previous_one(tiny_config, small_disk):
    disk = small_disk("700k")  # one tiny checkpoint fits, two at once do not
    model = SaShiMi(tiny_config)
    needed = sum(t.nbytes for t in model.state_dict().values())
    replace_folder(disk / "last", lambda tmp: save_checkpoint(tmp, model, {"step": 1}), needed)
    with pytest.raises(DiskFullError, match=f"no space left to save {disk}/last: it needs about"):
        replace_folder(disk / "last", lambda tmp: save_checkpoint(tmp, model, {"step": 2}), needed)
    with pytest.raises(DiskFullError, match=f"no space left to save {disk}/last: it needs more"):
        replace_folder(disk / "last", lambda tmp: save_checkpoint(tmp, model, {"step": 3}))
    assert [p.name for p in disk.iterdir()] == ["last"]
    assert load_checkpoint(disk / "last")[1] == {"step": 1}


def test_a_save_killed_between_its_renames_still_loads(tiny_checkpoint, tmp_path, caplog):
    """The state kill -9 leaves between replace_folder's two renames: last/ moved to last.old/,
    the new save complete in last.tmp/, last/ absent. Readers find the previous save."""
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run / "last.old")
    shutil.copytree(tiny_checkpoint, run / "last.tmp")
    assert resolve_save(run / "last") == run / "last.old"
    with caplog.at_level(logging.WARNING, logger="sashimi.checkpoint"):
        _, metadata = load_checkpoint(run / "last")
    assert metadata == {"step": 0, "train_data": "random init"}
    assert caplog.records[-1].getMessage() == (
        f"{run / 'last'} is missing: a save into it was interrupted, loading the previous save "
        f"from {run / 'last.old'} (resuming the run puts it back)"
    )
    os.replace(run / "last.old", run / "last")  # once back in place, last/ is itself
    assert resolve_save(run / "last") == run / "last"


def test_list_checkpoints_finds_complete_folders_at_any_depth(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path / "a")
    shutil.copytree(tiny_checkpoint, tmp_path / "runs" / "b" / "best")
    (tmp_path / "half").mkdir()  # a save in progress: config.json is written last
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path / "half")
    assert list_checkpoints(tmp_path) == [tmp_path / "a", tmp_path / "runs" / "b" / "best"]
    assert list_checkpoints(tmp_path / "missing") == []


# --- a training run's saves --------------------------------------------------------------------


def adam_after_one_step() -> torch.optim.AdamW:
    """An optimiser with state to save: AdamW's step count and both moments per parameter."""
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.ones(4, 3)).square().sum().backward()
    optimizer.step()
    return optimizer


def test_trainer_state_reads_back_what_was_saved(tmp_path):
    optimizer = adam_after_one_step()
    rng = {"gain": torch.Generator().manual_seed(5).get_state(), "torch_cpu": torch.get_rng_state()}
    state = TrainerState(
        step=7,
        epoch=1,
        index=3,
        elapsed_s=12.5,
        train_bits=6.25,
        world_size=1,
        train_config={"data": "d", "out": "o"},
        commands=["python -m train --data d --out o"],
        optimizer=optimizer.state_dict(),
        rng=rng,
    )
    state.save(tmp_path)
    scalars = json.loads((tmp_path / "trainer_state.json").read_text())
    assert scalars["best_valid_bits"] is None  # no validation yet: JSON has no infinity
    assert list(scalars)[:4] == ["step", "epoch", "index", "elapsed_s"]
    loaded = TrainerState.load(tmp_path)
    assert loaded.best_valid_bits == math.inf and loaded.valid_bits is None
    for name in ("step", "epoch", "index", "elapsed_s", "train_bits", "train_config", "commands"):
        assert getattr(loaded, name) == getattr(state, name), name
    assert loaded.rng.keys() == rng.keys()
    assert all(torch.equal(loaded.rng[k], rng[k]) for k in rng)
    saved_moments = optimizer.state_dict()["state"]
    groups = optimizer.state_dict()["param_groups"]
    assert loaded.optimizer["param_groups"] == json.loads(json.dumps(groups))  # betas: a list
    assert loaded.optimizer["state"].keys() == saved_moments.keys()
    for index, moments in saved_moments.items():
        for name, value in moments.items():
            assert torch.equal(loaded.optimizer["state"][index][name], value), (index, name)
    again = tmp_path / "again"
    again.mkdir()
    loaded.save(again)  # what load reads, save writes byte for byte: one format
    for file in ("trainer_state.json", "trainer_state.safetensors"):
        assert (again / file).read_bytes() == (tmp_path / file).read_bytes(), file


def test_a_trainer_state_without_what_resume_needs_names_it(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3, "train_config": {}}))
    save_file({"rng.gain": torch.zeros(2)}, str(tmp_path / "trainer_state.safetensors"))
    with pytest.raises(ValueError) as error:
        TrainerState.load(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / 'trainer_state.json'} is damaged (no epoch, index, elapsed_s, train_bits, "
        "valid_bits, best_valid_bits, world_size, optimizer_param_groups in it); the run cannot "
        f"continue exactly; start a new one from its weights with --init {tmp_path} and another "
        "--out"
    )
    with pytest.raises(FileNotFoundError, match="has no trainer_state.json; --resume needs"):
        TrainerState.load(tmp_path / "missing")


def test_replace_checkpoint_swaps_in_the_whole_folder(tiny_config, tmp_path):
    model = SaShiMi(tiny_config)
    rng = {"gain": torch.Generator().get_state(), "torch_cpu": torch.get_rng_state()}
    state = TrainerState(step=2, optimizer=adam_after_one_step().state_dict(), rng=rng)
    replace_checkpoint(tmp_path / "best", model, {"step": 1}, "# card\n")
    replace_checkpoint(tmp_path / "last", model, {"step": 2}, "# card\n", state)
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [
        "card.md",
        "config.json",
        "metrics.json",
        "model.safetensors",
    ]
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == [
        "card.md",
        "config.json",
        "metrics.json",
        "model.safetensors",
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    assert (tmp_path / "last" / "card.md").read_text() == "# card\n"
    assert load_checkpoint(tmp_path / "last")[1] == {"step": 2}
    assert TrainerState.load(tmp_path / "last").step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "last"]  # no .tmp or .old left


# --- the shipped default model -------------------------------------------------------------------


def test_the_default_checkpoint_ships_small_and_complete():
    assert DEFAULT_CHECKPOINT in list_checkpoints(CHECKPOINTS_DIR)
    files = {p.name: p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir()}
    assert set(files) == {"config.json", "model.safetensors", "card.md", "metrics.json"}
    assert sum(files.values()) < 25 * 2**20  # and no trainer state: only resuming needs it

    model, metrics = load_checkpoint(DEFAULT_CHECKPOINT)
    assert model.config.sample_rate == 8000 and model.config.quantization == "mu-law"
    assert metrics["num_parameters"] == sum(p.numel() for p in model.parameters())
    labels = model.config.labels
    assert list(labels) == ["digit", "speaker"]
    assert list(labels["digit"]) == [str(d) for d in range(10)]
    assert sum(labels["digit"].values()) == metrics["n_train_files"]
    card = (DEFAULT_CHECKPOINT / "card.md").read_text()
    for fact in ("CC BY-SA 4.0", "python -m train", f"{metrics['num_parameters']:,}", "--labels"):
        assert fact in card, fact
    assert all(speaker in card for speaker in labels["speaker"])


@pytest.fixture(scope="module")
def asked_digits():
    """Eight 1-second clips of the shipped model, asked for eight digits, unguided (w = 1)."""
    generator = Generator.from_checkpoint(device="cpu")  # no path: the default
    digits = [str(d) for d in range(8)]
    clips = generator.generate(
        generator.sample_rate,
        batch_size=8,
        seed=0,
        labels=[{"digit": d} for d in digits],
        show_progress=False,
    )
    return generator, digits, clips


def frame_levels_db(clip: np.ndarray, frame: int) -> np.ndarray:
    frames = clip[: len(clip) // frame * frame].reshape(-1, frame)
    return 20 * np.log10(np.sqrt((frames**2).mean(1)) + 1e-6)


def test_the_default_checkpoint_says_a_word_then_stops(asked_digits):
    """As FSDD's clips do: a voiced word (energy mostly below 1 kHz), then silence. An untrained
    or unconditional-babble model fails both: it never falls to digital silence."""
    generator, _, clips = asked_digits
    assert clips.shape == (8, 8000) and np.isfinite(clips).all()
    rate = generator.sample_rate
    ended = 0
    for clip in clips:
        levels = frame_levels_db(clip, rate // 50)  # 20 ms frames
        assert levels.max() > -35  # a word, not a whisper
        spectrum = np.abs(np.fft.rfft(clip)) ** 2
        assert spectrum[: len(spectrum) * 1000 // (rate // 2)].sum() > 0.5 * spectrum.sum()
        ended += levels[-10:].max() < -50  # the last 0.2 s silent
    assert ended >= 5, ended  # most clips; seen: 7 of 8


def test_the_default_checkpoint_hears_the_digit_it_was_asked_for(asked_digits):
    """Recomputed, not read from metrics.json: each clip is likelier under the digit it was made
    for than under the nine others, on average over the clips."""
    generator, digits, clips = asked_digits
    own = generator.log_likelihood(clips, [{"digit": d} for d in digits])
    others = np.mean(
        [
            generator.log_likelihood(clips, [{"digit": str((int(d) + k) % 10)} for d in digits])
            for k in range(1, 10)
        ],
        axis=0,
    )
    unknown = generator.log_likelihood(clips)
    assert own.mean() < others.mean() and own.mean() < unknown.mean()

"""What the command lines share (sashimi/cli.py): a user error is the one line `PROG: error: ...`
on stderr and exit status 2, here for checkpoints damaged in each way a load can find, runs that
--resume cannot continue and runs a fresh start would overwrite."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
from safetensors.torch import load_file, save_file

from sashimi import evaluate, render
from sashimi.checkpoint import load_checkpoint
from sashimi.cli import format_duration
from train.__main__ import main as train_main

# The tiny preset on 256-sample windows, validating and saving every 2 steps.
TRAIN = "--preset tiny --seq-len 256 --batch-size 2 --warmup 2 --device cpu --num-samples 1"
TRAIN += " --sample-seconds 0.02 --valid-every 2 --save-every 2 --log-every 2"


def config_is_a_list(folder):
    (folder / "config.json").write_text("[]")


def weights_hold_nan(folder):
    weights = load_file(folder / "model.safetensors")
    weights["embedding.weight"][0] = float("nan")
    save_file(weights, folder / "model.safetensors")


def weights_of_another_width(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_model": 2 * config["d_model"]}))


COMMANDS = {  # prog -> (main, the arguments besides --checkpoint)
    "python -m sashimi.render": (render.main, ["--out", "{tmp}/out", "--seconds", "0.01"]),
    "python -m sashimi.evaluate": (evaluate.main, ["--data", "{data}", "--seq-len", "512"]),
}


@pytest.mark.parametrize("damage", [config_is_a_list, weights_hold_nan, weights_of_another_width])
@pytest.mark.parametrize("prog", COMMANDS)
def test_a_damaged_checkpoint_is_one_line_and_exit_2(
    prog, damage, tiny_checkpoint, audio_folder, tmp_path, capsys
):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "damaged")
    damage(folder)
    main, args = COMMANDS[prog]
    args = [a.format(tmp=tmp_path, data=audio_folder) for a in args]
    with pytest.raises(SystemExit) as exit:
        main(["--checkpoint", str(folder), *args, "--device", "cpu"])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: {folder}/"), captured.err
    assert captured.out == ""


# --- python -m train: runs that exist in any state, and damaged trainer state --------------------


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    """Four 1 s tones at 8 kHz."""
    folder = tmp_path_factory.mktemp("tones")
    t = np.arange(8000) / 8000
    for k, hz in enumerate((220, 330, 440, 550)):
        sf.write(folder / f"tone_{k}.wav", 0.4 * np.sin(2 * np.pi * hz * t), 8000)
    return folder


@pytest.fixture(scope="module")
def two_step_run(tones, tmp_path_factory):
    """A run of 2 steps: last/ and best/ saved once (read-only use: copy it to change it)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert (
        train_main(["--data", str(tones), "--out", str(out), *TRAIN.split(), "--steps", "2"]) == 0
    )
    return out


def error_line(capsys) -> str:
    """The one line a user error leaves on stderr, after the logs."""
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1, errors
    return errors[0]


def test_a_run_killed_between_the_renames_of_a_save_is_refused_then_resumed(
    two_step_run, tones, tmp_path, capsys
):
    """kill -9 between replace_folder's renames leaves last.old/ and no last/: a fresh start must
    still see the run, and --resume must continue it from last.old/."""
    out = shutil.copytree(two_step_run, tmp_path / "run")
    os.replace(out / "last", out / "last.old")
    (out / "last.tmp").mkdir()  # the new save, complete or not, is dropped
    args = ["--data", str(tones), "--out", str(out), *TRAIN.split(), "--steps", "4"]
    with pytest.raises(SystemExit) as exit:
        train_main(args)
    assert exit.value.code == 2
    assert error_line(capsys) == (
        f"python -m train: error: {out} already holds a run (last.old/); pass --resume to "
        "continue it, or another --out"
    )
    shutil.rmtree(out / "last.old")  # best/ alone is a run as well
    with pytest.raises(SystemExit):
        train_main(args)
    assert f"{out} already holds a run (best/)" in error_line(capsys)

    out = shutil.copytree(two_step_run, tmp_path / "resumed")
    os.replace(out / "last", out / "last.old")
    assert train_main(["--out", str(out), "--resume", "--steps", "4"]) == 0
    assert load_checkpoint(out / "last")[1]["step"] == 4
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["best", "last", "samples"]


RESUME_DAMAGES = {  # file in last/ -> (its new bytes, the error after the file's path)
    "trainer_state.safetensors": (b"\x10\x00", "is damaged (Error while deserializing header"),
    "trainer_state.json": (b"{step", "is damaged (not valid JSON: Expecting property name"),
    "config.json": (b"[]", "must hold a JSON object of model settings"),
}


@pytest.mark.parametrize("file", RESUME_DAMAGES)
def test_resume_from_a_damaged_last_folder_is_one_line_naming_the_file(
    file, two_step_run, tmp_path, capsys
):
    out = shutil.copytree(two_step_run, tmp_path / "run")
    content, expected = RESUME_DAMAGES[file]
    (out / "last" / file).write_bytes(content)
    with pytest.raises(SystemExit) as exit:
        train_main(["--out", str(out), "--resume", "--steps", "4"])
    assert exit.value.code == 2
    line = error_line(capsys)
    assert line.startswith(f"python -m train: error: {out / 'last' / file} {expected}"), line
    if file.startswith("trainer_state"):
        go_on = f"start a new one from its weights with --init {out / 'last'} and another --out"
        assert line.endswith(go_on), line


@pytest.mark.parametrize("size", ["2m", "1m"])
def test_training_on_a_full_disk_stops_with_one_line_and_leaves_no_half_save(
    size, tones, small_disk, capsys
):
    """On 2 MB the first saves fit and a later one does not; on 1 MB the first save of last/
    does not. Either way: exit 1, one line naming the save, its size and the free space, the
    saves before intact and nothing half-written (no last.tmp/, no torn file)."""
    out = small_disk(size) / "run"
    args = ["--data", str(tones), "--out", str(out), *TRAIN.split(), "--steps", "20"]
    assert train_main(args) == 1
    line = error_line(capsys)
    assert re.fullmatch(
        rf"python -m train: error: no space left to save {out}/(last|best|samples|metrics\.\w+): "
        r"it needs (about|more than the) [\d.]+ [kM]?B.*, and [\d.]+ [kM]?B is free on that disk; "
        r"free some space, then (continue the run with --resume|start again with another --out)",
        line,
    ), line
    left = [p.name for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert left == []
    for save in ("last", "best"):
        if (out / save).exists():
            load_checkpoint(out / save)
    if (out / "last").exists():
        assert "--resume" in line
        assert train_main(["--out", str(out), "--resume", "--steps", "20"]) == 1  # still full


@pytest.mark.parametrize(
    "seconds, shown", [(0, "0.0 min"), (750, "12.5 min"), (3599, "60.0 min"), (6912, "1.92 h")]
)
def test_durations_read_in_minutes_under_an_hour_and_hours_from_there(seconds, shown):
    assert format_duration(seconds) == shown


def test_a_window_that_the_pooling_does_not_divide_names_the_lengths_that_work(
    audio_folder, tmp_path, capsys
):
    """tiny pools by 4 twice: 250 samples would leave a tier a partial step."""
    args = f"--data {audio_folder} --out {tmp_path / 'run'} {TRAIN} --steps 2".split()
    args[args.index("--seq-len") + 1] = "250"
    with pytest.raises(SystemExit) as exit_:
        train_main(args)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "python -m train: error: seq_len 250 is not a multiple of the total pooling 16 "
        "(pool=(4, 4)); crop or pad to 240 or 256"
    )
    assert not (tmp_path / "run" / "last").exists()

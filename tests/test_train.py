"""python -m train: the loop, its run folder, exact resume, kill -9 during saves, and torchrun."""

import csv
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch

from sashimi import SaShiMi, SaShiMiConfig
from sashimi.checkpoint import (
    DiskFullError,
    TrainerState,
    load_checkpoint,
    recover_folder,
    replace_folder,
    save_checkpoint,
)
from sashimi.labels import UNKNOWN
from train.__main__ import build_parser, main, resolve
from train.config import TrainConfig
from train.distributed import weights_sha1
from train.loop import lr_factor, make_optimizer
from train.report import append_metrics

REPO = Path(__file__).resolve().parent.parent
# Fast settings for the tiny preset: 256-sample windows (a multiple of its total pooling 16).
TINY = "--preset tiny --seq-len 256 --batch-size 2 --warmup 2 --device cpu".split()


def state_dict(directory: Path) -> dict:
    return load_checkpoint(directory)[0].state_dict()


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_lowers_the_loss_and_writes_the_run_folder(audio_folder, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    args = ["--data", str(audio_folder), "--out", str(run), *TINY]
    args += "--steps 40 --lr 1e-2 --log-every 10 --valid-every 20".split()
    args += "--num-samples 2 --sample-seconds 0.02".split()
    with caplog.at_level(logging.WARNING, logger="sashimi.data"):
        assert main(args) == 0

    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped 3 of 8 files:")
    assert "corrupt.wav: not readable as audio" in skipped[0]
    assert "notes.txt: not an audio file" in skipped[0]

    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]
    first, last = float(rows[0]["train_bits"]), float(rows[-1]["train_bits"])
    assert last < first - 1.0, (first, last)  # tones are easy: well over a bit gained in 40 steps
    assert rows[0]["valid_bits"] == "" and float(rows[1]["valid_bits"]) > 0

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 40 and summary["run"] == str(run)
    model, metadata = load_checkpoint(run / "last")
    assert isinstance(model, SaShiMi) and model.config.sample_rate == 8000  # the files' usual rate
    assert metadata["step"] == 40 and metadata["seq_len"] == 256
    assert metadata["n_train_files"] + metadata["n_valid_files"] == 5
    assert metadata["command"] == "python -m train " + " ".join(args)
    best = json.loads((run / "best" / "metrics.json").read_text())
    assert best["valid_bits_per_sample"] == min(
        float(r["valid_bits"]) for r in rows if r["valid_bits"]
    )
    card = (run / "last" / "card.md").read_text()
    assert str(audio_folder) in card and metadata["command"] in card
    assert "## Known limitations" in card
    samples = sorted(p.name for p in (run / "samples").iterdir())
    assert samples == [
        "step_000020_0.wav",
        "step_000020_1.wav",
        "step_000040_0.wav",
        "step_000040_1.wav",
    ]
    info = sf.info(run / "samples" / samples[0])
    assert (info.samplerate, info.frames) == (8000, 160)
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["files"]) == 8

    with pytest.raises(SystemExit) as exit_:  # a second run would mix its files with this one's
        main(args)
    assert exit_.value.code == 2
    assert f"{run} already holds a run (last/); pass --resume" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast training needs CUDA")
def test_cuda_training_in_bf16_autocast_lowers_the_loss(audio_folder, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(audio_folder), "--out", str(run), *TINY]
    args[args.index("--device") + 1] = "cuda"
    args += "--steps 40 --lr 1e-2 --log-every 10 --valid-every 40 --num-samples 1".split()
    args += ["--sample-seconds", "0.02"]
    assert main(args) == 0
    rows = read_metrics(run)
    first, last = float(rows[0]["train_bits"]), float(rows[-1]["train_bits"])
    assert last < first - 1.0, (first, last)  # as in float32 on the CPU (the test above)
    assert math.isfinite(float(rows[-1]["valid_bits"]))
    assert load_checkpoint(run / "last")[0].head.weight.dtype == torch.float32  # weights stay fp32


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), *TINY])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m train: error: no audio files in {tmp_path / 'empty'} "
        "(searched recursively for .wav .flac .ogg .mp3)"
    )


def test_a_diverging_run_stops_with_a_clear_error(audio_folder, tmp_path, capsys, caplog):
    # lr 1e30 makes the weights ~1e31 after one step; squares overflow and every step after is NaN.
    args = ["--data", str(audio_folder), "--out", str(tmp_path / "run"), *TINY]
    args += "--lr 1e30 --warmup 0 --steps 20 --num-samples 0".split()
    with caplog.at_level(logging.WARNING, logger="train.loop"):
        assert main(args) == 1
    assert sum("step skipped" in r.getMessage() for r in caplog.records) == 5
    assert "5 steps in a row had a non-finite loss or gradient" in capsys.readouterr().err


def test_settings_follow_preset_then_config_file_then_flags(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(
        json.dumps({"model": {"d_model": 8, "n_layers": 1}, "train": {"steps": 7, "lr": 0.5}})
    )
    flags = "--data d --out o --preset tiny --n-layers 3 --lr 0.1".split()
    args = build_parser().parse_args([*flags, "--config", str(config_file)])
    config, cfg, rate_from_data = resolve(args)
    tiny = SaShiMiConfig.preset("tiny")
    assert (config.d_model, config.n_layers, config.d_state) == (8, 3, tiny.d_state)
    assert (cfg.steps, cfg.lr, cfg.batch_size) == (7, 0.1, TrainConfig.batch_size)
    assert rate_from_data
    args = build_parser().parse_args("--data d --out o --sample-rate 16000".split())
    config, _, rate_from_data = resolve(args)
    assert config == SaShiMiConfig.preset("sc09") and not rate_from_data


def test_resume_refuses_to_change_the_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path), "--resume", "--d-model", "8"])
    assert exit_.value.code == 2
    assert "the model of a resumed run is fixed; drop d_model" in capsys.readouterr().err


def test_lr_warms_up_linearly_then_decays_to_zero():
    cfg = TrainConfig(data="d", out="o", steps=110, warmup=10)
    assert [lr_factor(s, cfg) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    decay = [lr_factor(s, cfg) for s in range(10, 110)]
    assert decay[0] == 1.0 and all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_factor(60, cfg) == pytest.approx(0.5)  # half way through the cosine
    assert decay[-1] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("kernel", ["diagonal", "dplr"])
def test_ssm_parameters_get_a_small_lr_and_no_weight_decay(kernel):
    disc = "bilinear" if kernel == "dplr" else "zoh"
    model = SaShiMi(SaShiMiConfig(d_model=8, n_layers=1, d_state=8, kernel=kernel, disc=disc))
    optimizer = make_optimizer(model, TrainConfig(data="d", out="o", lr=4e-3, weight_decay=0.1))
    ssm, rest = optimizer.param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    ssm_names = {names[id(p)].rsplit(".", 1)[1] for p in ssm["params"]}
    expected = {"log_dt", "log_neg_Lambda_real", "Lambda_imag", "B"} | (
        {"P"} if kernel == "dplr" else set()
    )
    assert ssm_names == expected
    assert (ssm["peak_lr"], ssm["weight_decay"]) == (1e-3, 0.0)
    assert (rest["peak_lr"], rest["weight_decay"]) == (4e-3, 0.1)
    assert len(ssm["params"]) + len(rest["params"]) == len(names)


def test_kill_during_saves_leaves_a_loadable_last_and_resume_matches_a_straight_run(
    audio_folder, tmp_path
):
    """A run saving at every step is killed with SIGKILL; its last/ must load, and resuming it must
    end with exactly the weights of a run that was never interrupted. Dropout and gain
    augmentation are on, so the restored random states matter. conftest.py gives this process and
    the subprocess one thread each, so both sum in the same order."""
    args = ["--data", str(audio_folder), *TINY, "--steps", "20"]
    args += "--dropout 0.1 --gain-augment 6 --valid-every 10 --log-every 5 --num-samples 0".split()
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    process = subprocess.Popen(
        [sys.executable, "-m", "train", *args, "--out", str(killed), "--save-every", "1"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state_file = killed / "last" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(state_file.read_text())["step"] >= 5:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.005)
    time.sleep(0.05)  # well inside the saves, which run at every step
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"

    model, metadata = load_checkpoint(killed / "last")
    assert 5 <= TrainerState.load(killed / "last").step == metadata["step"] < 20
    assert main(["--out", str(killed), "--resume"]) == 0
    assert main([*args, "--out", str(straight), "--save-every", "20"]) == 0
    resumed, uninterrupted = state_dict(killed / "last"), state_dict(straight / "last")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    # metrics.csv of the resumed run has each step once, as the uninterrupted one
    assert [r["step"] for r in read_metrics(killed)] == [r["step"] for r in read_metrics(straight)]


def test_a_save_killed_between_its_two_renames_is_recovered(tmp_path):
    """replace_folder's one window without `last`: the previous save waits in last.old."""
    last = tmp_path / "last"
    replace_folder(last, lambda tmp: (tmp.mkdir(), (tmp / "step").write_text("1")))
    os.replace(last, tmp_path / "last.old")  # the state a kill between the renames leaves
    (tmp_path / "last.tmp").mkdir()
    (tmp_path / "last.tmp" / "step").write_text("2")
    recover_folder(last)
    assert (last / "step").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    replace_folder(last, lambda tmp: (tmp.mkdir(), (tmp / "step").write_text("3")))
    assert (last / "step").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_metrics_row_that_does_not_fit_leaves_the_rows_before(tmp_path, small_disk):
    run = small_disk("1m")
    row = {"step": 10, "train_bits": 7.5, "valid_bits": "", "lr": 1e-3, "samples_per_s": 1.0}
    append_metrics(run, {**row, "elapsed_s": 1.0})
    before = (run / "metrics.csv").read_bytes()
    with open(run / "filler", "wb", buffering=0) as filler, pytest.raises(OSError):
        while True:  # until the disk is full
            filler.write(bytes(4096))
    with pytest.raises(DiskFullError, match=f"no space left to save {run}/metrics.csv: it needs"):
        append_metrics(run, {**row, "step": 20, "elapsed_s": 2.0})
    assert (run / "metrics.csv").read_bytes() == before


def test_torchrun_two_processes_hold_equal_weights(audio_folder, tmp_path):
    """2 gloo processes with 1 window each train like 1 process with 2 (all windows are full, so
    averaging the two processes' mean losses is the mean over the batch), and end with the
    same weights, which rank 0 checks and logs with their sha1."""
    args = ["--data", str(audio_folder), *TINY, "--steps", "4", "--num-samples", "0"]
    two = tmp_path / "two"
    result = subprocess.run(
        [
            sys.executable,
            *"-m torch.distributed.run --standalone --nproc_per_node=2".split(),
            "-m",
            "train",
            *args,
            "--batch-size",
            "1",
            "--out",
            str(two),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"all 2 processes hold equal weights \(sha1 ([0-9a-f]{40})\)", result.stderr)
    assert match, result.stderr[-3000:]
    model, metadata = load_checkpoint(two / "last")
    assert weights_sha1(model) == match.group(1)
    assert metadata["world_size"] == 2
    assert metadata["command"].startswith("torchrun --nproc_per_node=2 -m train ")

    one = tmp_path / "one"
    assert main([*args, "--batch-size", "2", "--out", str(one)]) == 0
    single = state_dict(one / "last")
    for name, value in model.state_dict().items():
        # float32 sums in another order (the all-reduce); Adam divides by sqrt(v), which magnifies
        # round-off in small gradients: 2e-6 at most measured over 4 steps
        assert torch.allclose(value, single[name], rtol=0, atol=1e-5), name
    assert not math.isnan(metadata["valid_bits_per_sample"])


def test_recompute_activations_trains_to_the_same_weights(audio_folder, tmp_path, capsys):
    """--recompute-activations trades memory for time only: with dropout on, the weights after a
    few steps equal those of a run that kept every activation."""
    common = ["--data", str(audio_folder), *TINY, "--dropout", "0.1", "--steps", "3"]
    common += "--num-samples 0 --valid-every 3".split()
    assert main([*common, "--out", str(tmp_path / "kept")]) == 0
    assert main([*common, "--out", str(tmp_path / "recomputed"), "--recompute-activations"]) == 0
    capsys.readouterr()
    kept, recomputed = (
        state_dict(tmp_path / "kept" / "last"),
        state_dict(tmp_path / "recomputed" / "last"),
    )
    for name, tensor in kept.items():
        torch.testing.assert_close(recomputed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    config = load_checkpoint(tmp_path / "kept" / "last")[0].config
    torch.manual_seed(0)  # the default --seed: the weights both runs started from
    assert not torch.equal(SaShiMi(config).state_dict()["head.weight"], kept["head.weight"])


# --- labels ----------------------------------------------------------------------------------------


@pytest.fixture
def labelled_folder(tmp_path) -> Path:
    """A sample library: low/ and high/ tones of 0.1-0.3 s at 8 kHz, and one file in no folder."""
    import numpy as np

    root = tmp_path / "library"
    for folder, hz in (("low", 200), ("high", 1500)):
        (root / folder).mkdir(parents=True)
        for k in range(4):
            t = np.arange(800 + 400 * k) / 8000
            sf.write(root / folder / f"{k}.wav", 0.5 * np.sin(2 * np.pi * hz * t), 8000)
    sf.write(root / "loose.wav", 0.3 * np.sin(2 * np.pi * 500 * np.arange(1600) / 8000), 8000)
    return root


def test_labelled_training_stores_the_vocabulary_and_reports_unlabelled_files(
    labelled_folder, tmp_path, capsys, caplog
):
    run = tmp_path / "run"
    args = ["--data", str(labelled_folder), "--out", str(run), *TINY, "--labels", "folder"]
    args += "--steps 20 --lr 1e-2 --valid-every 10 --valid-fraction 0.3".split()
    args += "--num-samples 2 --sample-seconds 0.02 --score-padding".split()
    with caplog.at_level(logging.WARNING, logger="sashimi.labels"):
        assert main(args) == 0
    unmatched = [r.getMessage() for r in caplog.records if "match no label" in r.getMessage()]
    assert len(unmatched) == 1 and "loose.wav" in unmatched[0]  # once, and trained on
    config = json.loads((run / "last" / "config.json").read_text())
    n_train = json.loads((run / "last" / "metrics.json").read_text())["n_train_files"]
    assert set(config["labels"]) == {"class"} and set(config["labels"]["class"]) == {"high", "low"}
    assert sum(config["labels"]["class"].values()) == n_train - 1  # all but loose.wav
    model, metadata = load_checkpoint(run / "last")
    assert metadata["valid_bits_per_sample_unlabelled"] > 0 and metadata["label_dropout"] == 0.15
    projections = [p for n, p in model.named_parameters() if ".label_projections." in n]
    assert projections and all(p.abs().max() > 0 for p in projections)  # trained from zero
    card = (run / "last" / "card.md").read_text()
    assert "## Labels" in card and "class (2 values)" in card and "every field unknown" in card
    samples = sorted(p.name for p in (run / "samples").iterdir())
    assert samples[:2] == ["step_000010_0_class-high.wav", "step_000010_1_class-low.wav"]
    capsys.readouterr()


def test_labelled_run_resumes_exactly(labelled_folder, tmp_path, capsys):
    """Label dropout draws from (seed, step): a run stopped and resumed drops the same fields."""
    common = ["--data", str(labelled_folder), *TINY, "--labels", "folder"]
    common += "--num-samples 0 --valid-every 100 --save-every 2 --label-dropout 0.5".split()
    assert main([*common, "--out", str(tmp_path / "straight"), "--steps", "4"]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "--steps", "2"]) == 0
    assert main(["--out", str(tmp_path / "split"), "--resume", "--steps", "4"]) == 0
    capsys.readouterr()
    straight, split = (
        state_dict(tmp_path / "straight" / "last"),
        state_dict(tmp_path / "split" / "last"),
    )
    for name, tensor in straight.items():
        assert torch.equal(split[name], tensor), name
    commands = load_checkpoint(tmp_path / "split" / "last")[1]["command"].splitlines()
    assert len(commands) == 2 and commands[1].endswith("--resume --steps 4")  # both, in order


def test_init_starts_from_a_checkpoint_and_keeps_its_architecture(
    labelled_folder, tiny_checkpoint, tmp_path, capsys
):
    run = tmp_path / "run"
    args = ["--data", str(labelled_folder), "--out", str(run), "--init", str(tiny_checkpoint)]
    args += "--labels folder --seq-len 256 --batch-size 2 --steps 1 --lr 1e-12 --device cpu".split()
    assert main([*args, "--num-samples", "0"]) == 0
    started, trained = state_dict(tiny_checkpoint), state_dict(run / "last")
    for name, tensor in started.items():  # lr 1e-12: one step moves nothing visibly
        torch.testing.assert_close(trained[name], tensor, rtol=0, atol=1e-9, msg=name)
    assert any(".label_projections." in name for name in trained)
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--d-model", "8"])
    assert exit_.value.code == 2
    assert "--init takes the model from" in capsys.readouterr().err


def test_init_carries_label_weights_by_value_not_by_count(
    labelled_folder, tmp_path, capsys, caplog
):
    """Starting from a labelled checkpoint whose vocabulary counts other files (more of one value,
    a value this folder lacks) keeps what it learnt of every value both hold; a value it never
    heard starts fresh and is named. (Counts once decided it: the labels silently started over.)"""
    import dataclasses

    torch.manual_seed(3)
    labels = {"class": {"high": 40, "mid": 2}}  # this folder: high 4, low 4
    config = dataclasses.replace(SaShiMiConfig.preset("tiny"), sample_rate=8000, labels=labels)
    source = SaShiMi(config)
    with torch.no_grad():
        for projection in source.center.label_projections:
            projection.weight.normal_(0, 0.5)
    save_checkpoint(tmp_path / "source", source, {"step": 0})
    run = tmp_path / "run"
    args = ["--data", str(labelled_folder), "--out", str(run), "--init", str(tmp_path / "source")]
    args += "--labels folder --seq-len 256 --batch-size 2 --steps 1 --lr 1e-12 --device cpu".split()
    with caplog.at_level(logging.WARNING, logger="train.loop"):
        assert main([*args, "--num-samples", "0"]) == 0
    capsys.readouterr()
    trained, _ = load_checkpoint(run / "last")
    assert list(trained.config.labels["class"]) == ["high", "low"]
    old_rows, rows = source.label_embeddings[0].weight, trained.label_embeddings[0].weight
    close = dict(rtol=0, atol=1e-9)
    torch.testing.assert_close(rows[UNKNOWN], old_rows[UNKNOWN], **close)
    torch.testing.assert_close(rows[1], old_rows[1], **close)  # high is 1 in both
    assert not torch.allclose(rows[2], old_rows[2])  # low (2 here) is not mid (2 there)
    for new, old in zip(
        trained.center.label_projections, source.center.label_projections, strict=True
    ):
        torch.testing.assert_close(new.weight, old.weight, **close)
    fresh = [r.getMessage() for r in caplog.records if "never heard" in r.getMessage()]
    assert len(fresh) == 1 and "class=low" in fresh[0]


def test_score_padding_scores_the_silence_after_each_file(labelled_folder, tmp_path, capsys):
    """Windows of 4,096 samples over 0.1-0.3 s files are mostly padding. Scored, that silence is
    learnt within a few steps, and the mean bits per sample fall far below those of the files."""
    common = ["--data", str(labelled_folder), "--preset", "tiny", "--seq-len", "4096"]
    common += "--batch-size 2 --steps 30 --lr 1e-2 --warmup 2 --log-every 10".split()
    common += "--num-samples 0 --device cpu".split()
    assert main([*common, "--out", str(tmp_path / "ignored")]) == 0
    assert main([*common, "--out", str(tmp_path / "scored"), "--score-padding"]) == 0
    capsys.readouterr()
    ignored = float(read_metrics(tmp_path / "ignored")[-1]["train_bits"])
    scored = float(read_metrics(tmp_path / "scored")[-1]["train_bits"])
    assert scored < 0.75 * ignored, (scored, ignored)  # seen: 1.29 against 2.52


def test_kernel_flag_takes_its_own_discretisation(tmp_path):
    args = build_parser().parse_args("--data d --out o --preset tiny --kernel dplr".split())
    config, _, _ = resolve(args)
    assert (config.kernel, config.disc) == ("dplr", "bilinear")

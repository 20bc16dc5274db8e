"""sashimi.evaluate: bits per sample over a folder, measured as training's validation does."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sashimi import SaShiMi, SaShiMiConfig
from sashimi.audio import encode
from sashimi.checkpoint import load_checkpoint
from sashimi.data import AudioFolder
from sashimi.evaluate import evaluate_bits, main
from train.__main__ import main as train_main

REPO = Path(__file__).resolve().parent.parent


def naive_bits(model: SaShiMi, sequences: list[torch.Tensor]) -> float:
    """Oracle: each sequence alone, padded to the pooling, cross-entropy over its own length."""
    q = model.config.total_pool
    nats, count = 0.0, 0
    for tokens in sequences:
        L = len(tokens)
        inputs = torch.cat([torch.tensor([model.start_token]), tokens[:-1]])
        inputs = F.pad(inputs, (0, -L % q), value=model.start_token)
        logits = model(inputs[None])[0, :L]
        nats += F.cross_entropy(logits, tokens, reduction="sum").item()
        count += L
    return nats / count / math.log(2)


@torch.no_grad()
def test_evaluate_bits_scores_every_sample_whatever_the_batching():
    torch.manual_seed(0)
    model = SaShiMi(SaShiMiConfig.preset("tiny")).eval()
    sequences = [encode(torch.rand(n) * 2 - 1) for n in (5, 16, 40, 100, 33)]
    expected = naive_bits(model, sequences)
    for batch_size in (1, 2, 16):
        # float32 logits summed over 194 samples in other orders
        assert evaluate_bits(model, sequences, batch_size) == pytest.approx(expected, rel=1e-5)


def test_cli_prints_one_json_line(tiny_checkpoint, audio_folder, capsys):
    args = ["--checkpoint", str(tiny_checkpoint), "--data", str(audio_folder)]
    assert main([*args, "--seq-len", "4096", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert (result["files"], result["skipped"], result["samples"]) == (5, 3, 35200)
    assert result["audio_seconds"] == 4.4
    model, _ = load_checkpoint(tiny_checkpoint)
    clips = AudioFolder.scan(audio_folder).load(8000)
    pieces = [encode(c.audio[i : i + 4096]) for c in clips for i in range(0, len(c.audio), 4096)]
    with torch.no_grad():
        assert result["bits_per_sample"] == pytest.approx(naive_bits(model, pieces), abs=1e-4)


def test_cli_errors_are_one_clear_line(tiny_checkpoint, audio_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # a random-init checkpoint knows no window length
        main(["--checkpoint", str(tiny_checkpoint), "--data", str(audio_folder)])
    assert exit_.value.code == 2
    assert "does not say the training window length; pass --seq-len L" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path / "none"), "--data", str(audio_folder)])
    assert exit_.value.code == 2
    assert f"checkpoint folder {tmp_path / 'none'} does not exist" in capsys.readouterr().err


def test_evaluate_agrees_with_the_validation_of_training(audio_folder, tmp_path, capsys):
    """Training validates on --valid-data with evaluate_bits; the CLI on that folder and the saved
    checkpoint (whose metrics.json holds seq_len) must give the same number."""
    run, voice = tmp_path / "run", audio_folder / "voice"
    args = ["--data", str(audio_folder), "--valid-data", str(voice), "--out", str(run)]
    args += "--preset tiny --seq-len 256 --batch-size 2 --steps 3 --num-samples 0".split()
    assert train_main([*args, "--device", "cpu"]) == 0
    capsys.readouterr()
    valid_bits = json.loads((run / "last" / "metrics.json").read_text())["valid_bits_per_sample"]
    evaluate_args = ["--checkpoint", str(run / "last"), "--data", str(voice), "--batch-size", "2"]
    assert main(evaluate_args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["files"] == 2 and result["seq_len"] == 256
    assert result["bits_per_sample"] == pytest.approx(valid_bits, abs=1e-5)  # JSON keeps 5 decimals


def test_runs_as_a_module(tiny_checkpoint, audio_folder):
    args = ["--checkpoint", str(tiny_checkpoint), "--data", str(audio_folder / "voice")]
    result = subprocess.run(
        [sys.executable, "-m", "sashimi.evaluate", *args, *"--seq-len 2048 --device cpu".split()],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files"] == 2


def test_include_scores_only_the_matching_files(tiny_checkpoint, audio_folder, capsys):
    """--include 'voice/*' on the whole folder scores what --data voice/ scores."""
    common = ["--checkpoint", str(tiny_checkpoint), "--seq-len", "2048", "--device", "cpu"]
    assert main([*common, "--data", str(audio_folder / "voice")]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main([*common, "--data", str(audio_folder), "--include", "voice/*"]) == 0
    included = json.loads(capsys.readouterr().out)
    assert included["files"] == alone["files"] == 2
    assert included["bits_per_sample"] == alone["bits_per_sample"]


def test_a_labelled_checkpoint_is_scored_with_and_without_its_labels(
    tiny_labelled_checkpoint, tiny_checkpoint, tmp_path, capsys
):
    import numpy as np
    import soundfile as sf

    data = tmp_path / "digits"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in ("7_ann_0.wav", "0_bob_1.wav", "1_zed_2.wav", "notes.wav"):
        sf.write(data / name, 0.2 * rng.standard_normal(600), 8000)
    common = ["--checkpoint", str(tiny_labelled_checkpoint), "--data", str(data)]
    common += ["--seq-len", "512", "--device", "cpu"]
    assert main([*common, "--labels", r"(?P<digit>\d)_(?P<speaker>[a-z]+)_"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert main(common) == 0  # no spec given, none stored with the checkpoint: unlabelled only
    alone = json.loads(capsys.readouterr().out)
    assert set(alone) & {"bits_per_sample_unlabelled", "labels"} == set()
    assert both["bits_per_sample_unlabelled"] == alone["bits_per_sample"]
    assert abs(both["bits_per_sample"] - both["bits_per_sample_unlabelled"]) > 1e-3
    with pytest.raises(SystemExit) as exit_:
        main([*common[:1], str(tiny_checkpoint), *common[2:], "--labels", "folder"])
    assert exit_.value.code == 2
    assert "was trained without labels" in capsys.readouterr().err

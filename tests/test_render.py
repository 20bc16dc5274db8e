"""`python -m sashimi.render` end to end: real WAV and PNG files read back, errors as one line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sashimi.audio import load_audio
from sashimi.generate import Generator
from sashimi.guidance import Guidance
from sashimi.render import main

REPO = Path(__file__).resolve().parent.parent


def render(capsys, *args: str) -> dict:
    assert main([*map(str, args)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # stdout is exactly one JSON line
    return json.loads(out[0])


def test_writes_n_wavs_at_the_model_rate_with_pictures(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "samples"
    summary = render(
        capsys,
        "--checkpoint",
        tiny_checkpoint,
        "--out",
        out,
        "--num",
        3,
        "--batch-size",
        2,
        "--seconds",
        0.05,
        "--seed",
        5,
        "--device",
        "cpu",
    )
    names = [f"sample_{i:03d}_seed{5 + i}" for i in range(3)]
    assert summary["files"] == [str(out / f"{n}.wav") for n in names]
    assert summary["spectrograms"] == [str(out / f"{n}.png") for n in names]
    assert summary["clips"] == 3 and summary["sample_rate"] == 8000 and summary["device"] == "cpu"
    assert summary["audio_seconds"] == pytest.approx(0.15)
    assert summary["real_time_factor"] > 0 and summary["checkpoint"] == str(tiny_checkpoint)
    assert 0 < summary["generation_seconds"] <= summary["wall_seconds"]
    clips = []
    for name in names:
        info = sf.info(out / f"{name}.wav")
        assert (info.samplerate, info.frames, info.channels, info.subtype) == (
            8000,
            400,
            1,
            "PCM_16",
        )
        clips.append(sf.read(out / f"{name}.wav")[0])
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(np.abs(c).max() > 0 for c in clips) and not np.array_equal(clips[0], clips[1])
    # scored while sampled (two batches): the likelihood of each clip, and the files likeliest first
    bits = Generator.from_checkpoint(tiny_checkpoint, device="cpu").log_likelihood(
        np.array(clips, dtype=np.float32)
    )
    np.testing.assert_allclose(summary["bits_per_sample"], bits, atol=1e-3)  # 16-bit files
    assert summary["label_evidence"] is None
    assert summary["best_first"] == [summary["files"][i] for i in np.argsort(bits)]


def test_a_clip_is_drawn_again_from_the_seed_in_its_name(tiny_checkpoint, tmp_path, capsys):
    common = [
        "--checkpoint",
        tiny_checkpoint,
        "--seconds",
        0.02,
        "--batch-size",
        1,
        "--device",
        "cpu",
    ]
    render(capsys, *common, "--num", 2, "--seed", 10, "--out", tmp_path / "a")
    render(capsys, *common, "--num", 1, "--seed", 11, "--out", tmp_path / "b")
    again, _ = sf.read(tmp_path / "b" / "sample_000_seed11.wav")
    np.testing.assert_array_equal(sf.read(tmp_path / "a" / "sample_001_seed11.wav")[0], again)


def test_prompt_is_followed_by_its_continuation(tiny_checkpoint, tmp_path, capsys):
    prompt = tmp_path / "prompt.flac"  # another format and rate: it is resampled to 8 kHz
    t = np.arange(3200) / 16000
    sf.write(prompt, 0.5 * np.sin(2 * np.pi * 300 * t), 16000)
    summary = render(
        capsys,
        "--checkpoint",
        tiny_checkpoint,
        "--out",
        tmp_path / "cont",
        "--num",
        1,
        "--seconds",
        0.1,
        "--prompt",
        prompt,
        "--device",
        "cpu",
    )
    audio, rate = sf.read(summary["files"][0], dtype="float32")
    assert rate == 8000 and len(audio) == 1600 + 800
    assert summary["prompt_seconds"] == pytest.approx(0.2)
    # the file starts with the prompt as the model heard it (16-bit rounding aside)
    np.testing.assert_allclose(audio[:1600], load_audio(prompt, 8000), atol=2 / 2**15)


def test_labels_are_asked_for_and_carried_in_the_file_names(
    tiny_labelled_checkpoint, tmp_path, capsys
):
    common = ["--checkpoint", tiny_labelled_checkpoint, "--seconds", 0.05, "--device", "cpu"]
    summary = render(
        capsys,
        *common,
        "--num",
        2,
        "--label",
        "digit=7",
        "--label",
        "speaker=bob",
        "--guidance",
        3,
        "--guidance-seconds",
        0.02,  # 160 of the 400 samples
        "--out",
        tmp_path / "sevens",
    )
    names = [Path(f).name for f in summary["files"]]
    assert names == [
        "sample_000_seed0_digit-7_speaker-bob.wav",
        "sample_001_seed1_digit-7_speaker-bob.wav",
    ]
    assert summary["labels"] == {"digit": "7", "speaker": "bob"}
    assert summary["guidance"] == {"weight": 3, "seconds": 0.02, "after": 1.5}  # the default after
    generator = Generator.from_checkpoint(tiny_labelled_checkpoint, device="cpu")
    expected = generator.generate(
        400,
        batch_size=2,
        labels={"digit": "7", "speaker": "bob"},
        guidance=Guidance(3, 0.02, 1.5),
        show_progress=False,
    )
    for name, clip in zip(summary["files"], expected, strict=True):
        np.testing.assert_allclose(sf.read(name)[0], clip, atol=1 / 2**15)  # 16-bit rounding
    # guided: ranked by what the asked labels explain, as the web UI ranks
    asked = generator.log_likelihood(expected, {"digit": "7", "speaker": "bob"})
    evidence = generator.log_likelihood(expected) - asked
    np.testing.assert_allclose(summary["bits_per_sample"], asked, atol=1e-4)  # 4 decimals
    np.testing.assert_allclose(summary["label_evidence"], evidence, atol=1e-4)
    assert summary["best_first"] == [summary["files"][i] for i in np.argsort(-evidence)]
    unlabelled = render(capsys, *common, "--num", 1, "--out", tmp_path / "any")
    assert unlabelled["guidance"] == {"weight": 1.0} and unlabelled["labels"] == {}
    assert unlabelled["label_evidence"] is None and len(unlabelled["bits_per_sample"]) == 1


@pytest.mark.parametrize(
    "label, message",
    [
        ("digit=9", "unknown digit '9'; known values: 0, 1, 7"),
        ("voice=ann", r"unknown label field 'voice'; this checkpoint has \['digit', 'speaker'\]"),
        ("digit", "--label takes FIELD=VALUE"),
    ],
)
def test_unknown_labels_exit_2_naming_the_known_ones(
    tiny_labelled_checkpoint, tmp_path, capsys, label, message
):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--checkpoint",
                str(tiny_labelled_checkpoint),
                "--out",
                str(tmp_path / "o"),
                "--label",
                label,
                "--device",
                "cpu",
            ]
        )
    assert exit_info.value.code == 2
    assert re.search(message, one_error_line(capsys))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("python -m sashimi.render: error: ")
    return err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seconds", "-1"], "--seconds must be positive, got -1.0"),
        (["--num", "0"], "--num must be at least 1"),
        (["--top-p", "0"], r"top_p must be in \(0, 1\]"),
        (["--seconds", "abc"], "argument --seconds: invalid float value: 'abc'"),
        (["--checkpoint", "{tmp}/missing"], "missing does not exist"),
        (["--prompt", "{tmp}/notes.wav"], "notes.wav: not readable as audio"),
        (["--prompt", "{tmp}/absent.wav"], "absent.wav: no such audio file"),
        (["--out", "{tmp}/notes.wav"], "notes.wav is a file; pass a folder"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tiny_checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "notes.wav").write_text("not audio\n")
    args = [a.format(tmp=tmp_path) for a in args]
    usual = ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        main([*usual, *args])  # a flag given again overrides the usual value
    assert exit_info.value.code == 2
    assert re.search(message, one_error_line(capsys))
    assert not (tmp_path / "o").exists()


def test_command_line_in_a_subprocess(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sashimi.render",
            "--checkpoint",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"python -m sashimi.render: error: checkpoint folder {tmp_path / 'none'} does not exist"
    ]

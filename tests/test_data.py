"""sashimi.data: scanning a folder, reporting bad files, splits, windows and batches."""

import json
import logging
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from sashimi.audio import encode, silence_token
from sashimi.data import (
    AudioFolder,
    Clip,
    Window,
    cut_windows,
    encode_windows,
    epoch_order,
    make_batch,
    split_by_file,
    take_windows,
)
from sashimi.model import IGNORE_INDEX

GOOD = [
    "chirp_22k.ogg",
    "long_tone_8k_stereo.wav",
    "tone_8k.wav",
    "voice/noise_16k_stereo.wav",
    "voice/tone_44k.flac",
]


def test_load_decodes_every_format_and_reports_bad_files_once(audio_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="sashimi.data"):
        clips = AudioFolder.scan(audio_folder).load(sample_rate=8000)
    assert sorted(c.path for c in clips) == GOOD
    lengths = {c.path: len(c.audio) for c in clips}
    # resampled to 8 kHz: durations are kept (the resampler keeps ceil(n * 8000 / rate) samples)
    assert lengths == {
        "chirp_22k.ogg": 4000,
        "long_tone_8k_stereo.wav": 16000,
        "tone_8k.wav": 8000,
        "voice/noise_16k_stereo.wav": 4000,
        "voice/tone_44k.flac": 3200,
    }
    assert all(c.audio.dtype == torch.float32 and c.audio.ndim == 1 for c in clips)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    lines = warnings[0].splitlines()
    assert lines[0] == "skipped 3 of 8 files:"
    assert lines[1] == (
        f"  {audio_folder / 'corrupt.wav'}: not readable as audio (soundfile: Format not recognised)"
    )
    assert lines[2] == f"  {audio_folder / 'empty.wav'}: holds no audio samples"
    assert lines[3].startswith(f"  {audio_folder / 'notes.txt'}: not an audio file")


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError) as error:
        AudioFolder.scan(tmp_path).load(8000)
    assert str(error.value) == (
        f"no audio files in {tmp_path} (searched recursively for .wav .flac .ogg .mp3)"
    )


def test_folder_of_only_bad_files_is_a_clear_error(audio_folder):
    folder = AudioFolder.scan(audio_folder, exclude=tuple(f"*{name}" for name in GOOD))
    with pytest.raises(ValueError, match=r"no usable audio in .*all 3 files were skipped"):
        folder.load(8000)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder .*nope does not exist"):
        AudioFolder.scan(tmp_path / "nope")


def test_exclude_globs_and_ignored_folders_leave_files_out(audio_folder):
    run_dir = audio_folder / "runs" / "x"  # a run folder inside the data: its samples are not data
    run_dir.mkdir(parents=True)
    sf.write(run_dir / "step_000010_0.wav", np.zeros(800), 8000)
    folder = AudioFolder.scan(audio_folder, exclude=("voice/*", "*.txt"), ignore=(run_dir,))
    assert [e.path for e in folder.entries] == [
        "chirp_22k.ogg",
        "corrupt.wav",
        "empty.wav",
        "long_tone_8k_stereo.wav",
        "tone_8k.wav",
    ]
    only = AudioFolder.scan(audio_folder, exclude=("*.ogg",), include=("*tone*", "chirp*"))
    assert [e.path for e in only.entries] == [
        "long_tone_8k_stereo.wav",
        "tone_8k.wav",
        "voice/tone_44k.flac",
    ]


def test_places_that_cannot_be_searched_are_named_in_the_skipped_list(
    public_tmp_path, unprivileged, caplog
):
    """A folder this user may not list, a file it may not read, symlinks that loop or lead
    nowhere, and a symlink back up the tree are each named with the reason; a symlink to a folder
    elsewhere is followed."""
    root = public_tmp_path / "data"
    root.mkdir()
    sf.write(root / "tone.wav", np.zeros(800), 8000)
    elsewhere = public_tmp_path / "elsewhere"
    elsewhere.mkdir()
    sf.write(elsewhere / "far.wav", np.zeros(800), 8000)
    (root / "far").symlink_to(elsewhere)
    (root / "closed").mkdir()
    sf.write(root / "closed" / "hidden.wav", np.zeros(800), 8000)
    (root / "closed").chmod(0o000)
    sf.write(root / "locked.wav", np.zeros(800), 8000)
    (root / "locked.wav").chmod(0o000)
    (root / "self.wav").symlink_to(root / "self.wav")
    (root / "ping.wav").symlink_to(root / "pong.wav")
    (root / "pong.wav").symlink_to(root / "ping.wav")
    (root / "gone.wav").symlink_to(root / "deleted.wav")
    (root / "up").symlink_to(root)
    with unprivileged(), caplog.at_level(logging.WARNING, logger="sashimi.data"):
        folder = AudioFolder.scan(root)
        clips = folder.load(8000)
    assert [c.path for c in clips] == ["far/far.wav", "tone.wav"]
    assert caplog.records[-1].getMessage().splitlines() == [
        "skipped 7 of 9 files:",
        f"  {root}/closed: folder cannot be listed (permission denied)",
        f"  {root}/gone.wav: broken symlink (to {root}/deleted.wav)",
        f"  {root}/locked.wav: permission denied",
        f"  {root}/ping.wav: symlink loop",
        f"  {root}/pong.wav: symlink loop",
        f"  {root}/self.wav: symlink loop",
        f"  {root}/up: symlink to the top folder, searched already: left out",
    ]
    # Made readable, the file is probed again: chmod changes neither its size nor its mtime.
    folder.save_manifest(public_tmp_path / "manifest.json")
    (root / "locked.wav").chmod(0o644)
    with unprivileged():
        again = AudioFolder.scan(root, manifest=public_tmp_path / "manifest.json")
    assert {e.path: e.skipped for e in again.entries}["locked.wav"] is None


def test_excluded_and_ignored_places_are_not_reported(tmp_path):
    root = tmp_path / "data"
    (root / "old").mkdir(parents=True)
    sf.write(root / "tone.wav", np.zeros(800), 8000)
    (root / "old" / "gone.wav").symlink_to(root / "old" / "deleted.wav")
    (root / "run").mkdir()
    (root / "run" / "loop.wav").symlink_to(root / "run" / "loop.wav")
    folder = AudioFolder.scan(root, exclude=("old/*",), ignore=(root / "run",))
    assert [(e.path, e.skipped) for e in folder.entries] == [("tone.wav", None)]
    every = AudioFolder.scan(root)
    assert [(e.path, e.skipped) for e in every.entries] == [
        ("old/gone.wav", f"broken symlink (to {root}/old/deleted.wav)"),
        ("run/loop.wav", "symlink loop"),
        ("tone.wav", None),
    ]


def test_a_data_folder_that_cannot_be_listed_is_a_clear_error(public_tmp_path, unprivileged):
    (public_tmp_path / "data").mkdir(mode=0o000)
    with unprivileged(), pytest.raises(ValueError) as error:
        AudioFolder.scan(public_tmp_path / "data")
    assert str(error.value) == (
        f"data folder {public_tmp_path / 'data'} cannot be listed (permission denied)"
    )


def test_short_files_are_skipped_below_the_minimum(audio_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="sashimi.data"):
        clips = AudioFolder.scan(audio_folder).load(8000, min_samples=4001)
    assert sorted(c.path for c in clips) == ["long_tone_8k_stereo.wav", "tone_8k.wav"]
    message = caplog.records[-1].getMessage()
    assert message.startswith("skipped 6 of 8 files:")
    assert "tone_44k.flac: 0.400 s is shorter than the minimum 0.500 s" in message


def test_common_rate_is_the_most_frequent_rate(audio_folder):
    assert AudioFolder.scan(audio_folder).common_rate() == 8000  # 2 files at 8 kHz, 1 at each other


def test_manifest_is_reused_for_unchanged_files_only(audio_folder, tmp_path):
    manifest = tmp_path / "manifest.json"
    AudioFolder.scan(audio_folder, manifest=manifest).save_manifest(manifest)
    saved = json.loads(manifest.read_text())
    assert saved["files"]["voice/tone_44k.flac"]["sample_rate"] == 44100
    assert saved["files"]["corrupt.wav"]["skipped"].startswith("not readable as audio")
    # Mark two entries in the cache; only the file that did not change keeps the mark.
    saved["files"]["tone_8k.wav"]["frames"] = 12345
    saved["files"]["voice/tone_44k.flac"]["frames"] = 12345
    manifest.write_text(json.dumps(saved))
    changed = audio_folder / "voice" / "tone_44k.flac"
    sf.write(changed, np.zeros(441), 44100)
    os.utime(changed, ns=(0, 1_000_000_000))
    entries = {e.path: e for e in AudioFolder.scan(audio_folder, manifest=manifest).entries}
    assert entries["tone_8k.wav"].frames == 12345
    assert entries["voice/tone_44k.flac"].frames == 441


def test_decode_failures_are_recorded_in_the_manifest(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    sf.write(root / "good.wav", np.zeros(800), 8000)
    # A valid header with its data cut short: soundfile reads the header but not the samples.
    sf.write(root / "cut.flac", np.random.default_rng(0).uniform(-1, 1, 80_000), 8000)
    data = (root / "cut.flac").read_bytes()
    (root / "cut.flac").write_bytes(data[: len(data) // 3])
    folder = AudioFolder.scan(root)
    assert folder.entries[0].skipped is None  # the header alone looks fine
    clips = folder.load(8000)
    assert [c.path for c in clips] == ["good.wav"]
    folder.save_manifest(tmp_path / "manifest.json")
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["files"]["cut.flac"]["skipped"].startswith("not readable as audio")


def _clips(names):
    return [Clip(name, torch.zeros(10)) for name in names]


def test_split_is_by_file_and_stable_when_files_are_added():
    names = [f"speaker_{i}.wav" for i in range(1000)]
    train, valid = split_by_file(_clips(names), 0.1)
    assert 70 < len(valid) < 130  # a hash split: about 10 % of 1000 files
    assert {c.path for c in train} | {c.path for c in valid} == set(names)
    more = names + [f"new_{i}.wav" for i in range(500)]
    _, valid_more = split_by_file(_clips(more), 0.1)
    assert {c.path for c in valid} == {c.path for c in valid_more} & set(names)


def test_split_of_a_few_files_still_validates_on_one():
    train, valid = split_by_file(_clips(["a.wav", "b.wav", "c.wav"]), 0.01)
    assert len(valid) == 1 and len(train) == 2
    assert split_by_file(_clips(["only.wav"]), 0.1)[1] == []


def test_windows_cut_long_clips_and_keep_tails_above_the_minimum():
    clips = [Clip("a", torch.zeros(1000)), Clip("b", torch.zeros(100))]
    assert cut_windows(clips, 256, min_samples=200) == [
        Window(0, 0, 256),
        Window(0, 256, 256),
        Window(0, 512, 256),
        Window(0, 768, 232),
    ]
    assert cut_windows(clips, 256)[-2:] == [Window(0, 768, 232), Window(1, 0, 100)]


def test_batches_pad_targets_with_ignore_and_inputs_with_silence():
    audio = torch.linspace(-0.9, 0.9, 300)
    clips = [Clip("a", audio)]
    windows = [Window(0, 0, 256), Window(0, 256, 44)]
    inputs, targets = make_batch(clips, windows, 256, "mu-law")
    start = silence_token("mu-law")
    assert torch.equal(targets[0], encode(audio[:256]))
    assert torch.equal(targets[1, :44], encode(audio[256:]))
    assert (targets[1, 44:] == IGNORE_INDEX).all()
    assert (inputs[:, 0] == start).all()
    assert torch.equal(inputs[1, 1:45], targets[1, :44])
    assert (inputs[1, 45:] == start).all()


def test_gain_scales_audio_before_quantisation():
    audio = torch.linspace(-0.4, 0.4, 64)
    clips = [Clip("a", audio)]
    windows = [Window(0, 0, 64), Window(0, 0, 64)]
    tokens = encode_windows(
        clips, windows, "linear", gains_db=torch.tensor([20 * np.log10(2), 0.0])
    )
    assert torch.equal(tokens[0], encode(audio * 2, "linear"))
    assert torch.equal(tokens[1], encode(audio, "linear"))


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert torch.equal(epoch_order(50, seed=1, epoch=3), epoch_order(50, seed=1, epoch=3))
    assert not torch.equal(epoch_order(50, seed=1, epoch=3), epoch_order(50, seed=1, epoch=4))
    assert not torch.equal(epoch_order(50, seed=1, epoch=3), epoch_order(50, seed=2, epoch=3))


def test_take_windows_visits_every_window_once_per_epoch_and_resumes_exactly():
    first, epoch, index = take_windows(10, seed=0, epoch=0, index=0, count=7)
    second, epoch, index = take_windows(10, seed=0, epoch=epoch, index=index, count=7)
    assert (epoch, index) == (1, 4)
    assert sorted(first + second[:3]) == list(range(10))
    assert second[3:] == epoch_order(10, 0, 1)[:4].tolist()
    at_once, *_ = take_windows(10, seed=0, epoch=0, index=0, count=14)
    assert at_once == first + second

"""sashimi.audio, reading and writing files: every failure is one line naming the file and why."""

import errno
import os
import re

import numpy as np
import pytest
import soundfile as sf

from sashimi.audio import audio_info, load_audio, write_wav


def tone(seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    return 0.3 * np.sin(2 * np.pi * 440 * np.arange(round(rate * seconds)) / rate)


def test_a_damaged_mp3_gives_the_decoders_reason_and_nothing_on_stderr(tmp_path, capfd):
    """mpg123 (libsndfile's MP3 decoder) writes notes to the process's stderr, and libsndfile then
    reports "File does not exist or is not a regular file (possibly a pipe?)"."""
    good = tmp_path / "good.mp3"
    sf.write(good, tone(), 16000, format="MP3")
    data = good.read_bytes()
    damaged = tmp_path / "damaged.mp3"
    damaged.write_bytes(data[:200] + bytes(1000) + data[1200:])  # frames after the first zeroed
    capfd.readouterr()
    for read in (audio_info, lambda path: load_audio(path, 16000)):
        with pytest.raises(ValueError) as error:
            read(damaged)
        assert re.fullmatch(
            f"{re.escape(str(damaged))}: not readable as audio "
            r"\(MP3 decoder: Illegal Audio-MPEG-Header 0x00000000 at offset \d+\)",
            str(error.value),
        ), error.value
    assert capfd.readouterr().err == ""
    assert audio_info(good).frames == 16000  # the same file undamaged decodes


def test_random_bytes_named_mp3_are_not_audio(tmp_path, capfd):
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    capfd.readouterr()
    with pytest.raises(ValueError) as error:
        load_audio(garbage, 16000)
    assert (
        str(error.value) == f"{garbage}: not readable as audio (soundfile: Format not recognised)"
    )
    assert capfd.readouterr().err == ""


def test_a_file_this_user_may_not_read_says_permission_denied(public_tmp_path, unprivileged):
    readable, locked = public_tmp_path / "readable.wav", public_tmp_path / "locked.wav"
    for path in (readable, locked):
        sf.write(path, tone(0.1), 16000)
    locked.chmod(0o000)
    with unprivileged():
        assert len(load_audio(readable, 16000)) == 1600  # the folder is open to this user
        for read in (audio_info, lambda path: load_audio(path, 16000)):
            with pytest.raises(ValueError) as error:
                read(locked)
            assert str(error.value) == f"{locked}: permission denied"


def test_what_is_not_a_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.wav: no such audio file$"):
        load_audio(tmp_path / "absent.wav", 16000)
    (tmp_path / "folder.wav").mkdir()
    with pytest.raises(ValueError, match=r"folder\.wav: a folder, not an audio file$"):
        load_audio(tmp_path / "folder.wav", 16000)
    os.mkfifo(tmp_path / "pipe.wav")  # opening it would wait for a writer forever
    with pytest.raises(ValueError, match=r"pipe\.wav: not a regular file, not an audio file$"):
        audio_info(tmp_path / "pipe.wav")
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    with pytest.raises(ValueError, match=r"loop\.wav: too many levels of symbolic links$"):
        audio_info(tmp_path / "loop.wav")


def test_write_wav_round_trips_at_16_bit_precision(tmp_path):
    audio = tone(0.5, 8000).astype(np.float32)
    path = write_wav(tmp_path / "sub" / "clip.wav", audio, 8000)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
    assert np.allclose(load_audio(path, 8000), audio, atol=1 / 2**15)  # one 16-bit step


def test_write_wav_on_a_full_disk_raises_and_leaves_no_partial_file(small_disk):
    disk = small_disk("1m")
    long = tone(60, 16000).astype(np.float32)  # 1.9 MB as 16-bit PCM
    with pytest.raises(OSError) as error:
        write_wav(disk / "long.wav", long, 16000)
    assert error.value.errno == errno.ENOSPC
    assert list(disk.iterdir()) == []

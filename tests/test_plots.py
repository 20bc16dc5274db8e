"""Pictures of audio: the spectrogram against the closed form of a windowed tone, and real figures
written as PNG files and read back pixel by pixel."""

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from sashimi.audio import write_wav
from sashimi.plots import (
    FLOOR_DB,
    HOP,
    N_FFT,
    log_spectrogram,
    save_figure_png,
    waveform_spectrogram_figure,
    write_clip_picture,
)

RATE = 8000
WIDTH, HEIGHT = 1000, 500  # the figure's 10 x 5 inches at the 100 dpi save_figure_png writes


def tone(frequency: float, seconds: float, amplitude: float = 1.0) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * frequency * np.arange(round(seconds * RATE)) / RATE)


def pixels(path, colour: str, tolerance: float = 0.05) -> int:
    """How many pixels of the PNG at `path` have (nearly) the RGB of a matplotlib colour."""
    image = imread(path)[..., :3]
    return int((np.abs(image - to_rgb(colour)).max(axis=-1) < tolerance).sum())


def test_tone_peaks_at_its_bin_with_the_hann_windows_gain():
    """A sine of amplitude a centred on bin k has |STFT| = a * sum(hann) / 2 = a * N_FFT / 4 there
    (the periodic Hann window sums to N_FFT / 2; the other half of the energy is at bin -k)."""
    k = 64  # 64 * 8000 / 512 = 1000 Hz, exactly on a bin: no leakage into its neighbours
    spec = log_spectrogram(tone(k * RATE / N_FFT, 0.5, amplitude=0.5))
    frames = spec[:, 2:-2]  # away from the reflected padding at both ends
    assert spec.shape == (N_FFT // 2 + 1, 1 + round(0.5 * RATE) // HOP)
    assert (frames.argmax(axis=0) == k).all()
    expected_db = 20 * np.log10(0.5 * N_FFT / 4)
    np.testing.assert_allclose(frames[k], expected_db, atol=1e-3)  # float32 STFT round-off
    # A tone on a bin leaks into its two neighbours only: the periodic Hann window's DFT is zero
    # beyond them, so a bin further away holds round-off alone.
    assert frames[k + 8].max() < expected_db - 60


def test_silence_is_drawn_at_the_floor_and_a_short_clip_gets_a_frame():
    spec = log_spectrogram(np.zeros(100))  # shorter than one window: zero-padded to N_FFT
    assert spec.shape == (N_FFT // 2 + 1, 1 + N_FFT // HOP)
    np.testing.assert_array_equal(spec, FLOOR_DB)


def test_loud_clip_covers_more_of_the_waveform_than_silence(tmp_path):
    noise = np.random.default_rng(0).uniform(-0.9, 0.9, round(0.25 * RATE))
    loud = save_figure_png(waveform_spectrogram_figure(noise, RATE), tmp_path / "loud.png")
    silence = waveform_spectrogram_figure(np.zeros_like(noise), RATE)
    silent = save_figure_png(silence, tmp_path / "silent.png")
    # Silence is one flat line across the panel (under a pixel thick, so antialiased, lighter
    # than the line colour); noise fills the panel from -0.9 to 0.9 with it.
    assert pixels(silent, "tab:blue", tolerance=0.2) < WIDTH
    assert pixels(loud, "tab:blue", tolerance=0.2) > 20 * WIDTH


def test_clip_picture_is_a_png_beside_its_wav_with_the_prompts_end_marked(tmp_path):
    audio = tone(300, 0.5, 0.5)
    wav = write_wav(tmp_path / "sample_000_seed5.wav", audio, RATE)
    marked = write_clip_picture(wav, audio, RATE, marker_seconds=0.25, title="continued")
    assert marked == tmp_path / "sample_000_seed5.png"
    assert marked.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = write_clip_picture(tmp_path / "new" / "plain.wav", audio, RATE, title="continued")
    assert plain == tmp_path / "new" / "plain.png"  # its folder created
    marked_rgb, plain_rgb = imread(marked)[..., :3], imread(plain)[..., :3]
    assert marked_rgb.shape == plain_rgb.shape == (HEIGHT, WIDTH, 3)
    # The marker is all that differs: a dashed cyan line, 1.2 px wide, down both panels,
    # halfway along the time axis.
    changed = np.abs(marked_rgb - plain_rgb).max(axis=-1) > 0.1
    columns = np.flatnonzero(changed.any(axis=0))
    rows = np.flatnonzero(changed.any(axis=1))
    assert len(columns) <= 3 and np.ptp(columns) <= 2, columns
    assert WIDTH * 0.4 < columns.mean() < WIDTH * 0.6
    assert np.ptp(rows) > 0.75 * HEIGHT  # through the waveform and the spectrogram
    assert pixels(plain, "tab:cyan") == 0 < pixels(marked, "tab:cyan", tolerance=0.3)


@pytest.mark.parametrize(
    "audio, rate, message",
    [
        (np.zeros((100, 2)), RATE, r"audio must be mono with shape \(L,\), got shape \(100, 2\)"),
        (np.zeros(100), 0, "sample_rate must be positive, got 0"),
    ],
)
def test_stereo_audio_or_a_bad_rate_is_refused(audio, rate, message):
    with pytest.raises(ValueError, match=message):
        waveform_spectrogram_figure(audio, rate)

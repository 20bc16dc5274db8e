"""Pictures of generated audio: the waveform above its log-magnitude spectrogram.

Each clip that `python -m sashimi.render` or the web UI writes gets one, as a PNG beside its WAV
(write_clip_picture); training draws its metrics with save_figure_png. Matplotlib runs on the Agg
backend (no display needed), and figures are built with the object API so that no global pyplot
state is touched.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: render and the web UI run on servers without a display

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

N_FFT = 512  # 64 ms at 8 kHz, 32 ms at 16 kHz: resolves the harmonics of a speaking voice
HOP = N_FFT // 4
FLOOR_DB = -100.0  # magnitudes below this are drawn as the floor (log of zero is -inf)


def log_spectrogram(audio: np.ndarray) -> np.ndarray:
    """Magnitude of the short-time Fourier transform in dB, (N_FFT // 2 + 1, frames).

    S_dB = 20 log10 |STFT(audio)|,  Hann window of N_FFT samples, hop N_FFT / 4
    """
    x = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    if x.numel() < N_FFT:  # a clip shorter than one window still gets one (zero-padded) frame
        x = torch.nn.functional.pad(x, (0, N_FFT - x.numel()))
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    return (20 * torch.log10(spec.abs().clamp_min(10 ** (FLOOR_DB / 20)))).numpy()


def waveform_spectrogram_figure(
    audio: np.ndarray, sample_rate: int, marker_seconds: float | None = None, title: str = ""
) -> Figure:
    """Waveform (top) and log-magnitude spectrogram (bottom) of mono audio, sharing a time axis.

    Args:
        audio: (L,) float samples in [-1, 1].
        sample_rate: Hz, for the time and frequency axes.
        marker_seconds: where to draw a vertical line on both panels (the end of a prompt), or None.
        title: shown above the waveform.
    Returns: a matplotlib Figure (not shown; pass it to save_figure_png or to a UI).
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono with shape (L,), got shape {audio.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    duration = max(len(audio), 1) / sample_rate

    fig = Figure(figsize=(10, 5), layout="constrained")
    wave_ax, spec_ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, 2))
    wave_ax.plot(np.arange(len(audio)) / sample_rate, audio, linewidth=0.5)
    wave_ax.set(ylim=(-1.05, 1.05), ylabel="amplitude", title=title, xlim=(0, duration))

    spec_db = log_spectrogram(audio)
    image = spec_ax.imshow(
        spec_db,
        origin="lower",
        aspect="auto",
        cmap="magma",
        extent=(0, duration, 0, sample_rate / 2),
        vmin=max(FLOOR_DB, spec_db.max() - 80),  # 80 dB of dynamic range, as librosa's specshow
    )
    spec_ax.set(xlabel="time (s)", ylabel="frequency (Hz)")
    fig.colorbar(image, ax=spec_ax, label="dB")

    if marker_seconds is not None:
        for ax in (wave_ax, spec_ax):
            ax.axvline(marker_seconds, color="tab:cyan", linestyle="--", linewidth=1.2)
    return fig


def save_figure_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG (creating parent folders) and release its memory; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    fig.clear()  # a Figure built without pyplot is freed once unreferenced; clear drops its artists
    return path


def write_clip_picture(
    wav: str | Path,
    audio: np.ndarray,
    sample_rate: int,
    marker_seconds: float | None = None,
    title: str = "",
) -> Path:
    """The picture of a clip written as `wav`: its waveform and spectrogram (see
    waveform_spectrogram_figure) as a PNG beside it, with the same name; returns the PNG's path."""
    figure = waveform_spectrogram_figure(audio, sample_rate, marker_seconds, title)
    return save_figure_png(figure, Path(wav).with_suffix(".png"))

"""Audio samples <-> class tokens: mu-law and linear quantisation.

SaShiMi models raw audio as a sequence of classes (256 by default) and predicts a categorical
distribution over the next one. Mu-law (ITU-T G.711 companding) spends the classes evenly on a
logarithmic amplitude scale, which suits speech and music better than linear steps:

    F(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu),   mu = n_classes - 1,   x in [-1, 1]
"""

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor
from torchaudio import functional as AF

MU_LAW_CLASSES = 256  # 8-bit mu-law, as in the SaShiMi paper
QUANTIZATIONS = ("mu-law", "linear")


def mu_law_encode(x: Tensor, n_classes: int = MU_LAW_CLASSES) -> Tensor:
    """Float audio in [-1, 1] -> mu-law classes in [0, n_classes). Values outside are clipped."""
    return AF.mu_law_encoding(x.clamp(-1.0, 1.0), n_classes).long()


def mu_law_decode(tokens: Tensor, n_classes: int = MU_LAW_CLASSES) -> Tensor:
    """Mu-law classes -> float audio in [-1, 1] (the inverse of F at each class centre)."""
    return AF.mu_law_decoding(tokens, n_classes)


def linear_encode(x: Tensor, n_classes: int = MU_LAW_CLASSES) -> Tensor:
    """Float audio in [-1, 1] -> n_classes equal-width bins; 0.0 falls in class n_classes // 2."""
    scaled = (x.clamp(-1.0, 1.0) + 1) / 2 * (n_classes - 1)
    return (scaled + 0.5).floor().long()


def linear_decode(tokens: Tensor, n_classes: int = MU_LAW_CLASSES) -> Tensor:
    """Linear classes -> float audio in [-1, 1]."""
    return tokens.to(torch.get_default_dtype()) / (n_classes - 1) * 2 - 1


_ENCODERS = {"mu-law": mu_law_encode, "linear": linear_encode}
_DECODERS = {"mu-law": mu_law_decode, "linear": linear_decode}


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


def encode(x: Tensor, quantization: str = "mu-law", n_classes: int = MU_LAW_CLASSES) -> Tensor:
    """Float audio in [-1, 1] -> class tokens (LongTensor of the same shape)."""
    _check_quantization(quantization)
    return _ENCODERS[quantization](x, n_classes)


def decode(tokens: Tensor, quantization: str = "mu-law", n_classes: int = MU_LAW_CLASSES) -> Tensor:
    """Class tokens -> float audio in [-1, 1]."""
    _check_quantization(quantization)
    return _DECODERS[quantization](tokens, n_classes)


def silence_token(quantization: str = "mu-law", n_classes: int = MU_LAW_CLASSES) -> int:
    """The class of a zero sample: the first input of every sequence (the 'start token')."""
    return int(encode(torch.zeros(()), quantization, n_classes))


# --- files: read any common format as mono float at the model's rate, write 16-bit WAV ---------
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read an audio file as mono float32 in [-1, 1] at `sample_rate` Hz.

    Channels are averaged (a stereo file becomes their mid signal); any other rate is resampled
    with a windowed-sinc filter (torchaudio). Raises ValueError naming the file when it is not
    readable as audio or holds no samples, FileNotFoundError when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        samples, file_rate = sf.read(path, dtype="float32", always_2d=True)  # (frames, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise ValueError(f"{path}: not readable as audio (soundfile: {error})") from error
    if samples.size == 0:
        raise ValueError(f"{path}: holds no audio samples")
    mono = torch.from_numpy(samples.mean(axis=1))
    if file_rate != sample_rate:
        mono = AF.resample(mono, file_rate, sample_rate)
    if not torch.isfinite(mono).all():
        raise ValueError(f"{path}: holds non-finite samples (NaN or inf)")
    return mono.clamp(-1.0, 1.0).numpy()


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write mono float audio in [-1, 1] as a 16-bit PCM WAV file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(
        path, np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16"
    )
    return path

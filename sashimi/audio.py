"""Audio samples <-> class tokens: mu-law and linear quantisation.

SaShiMi models raw audio as a sequence of classes (256 by default) and predicts a categorical
distribution over the next one. Mu-law (ITU-T G.711 companding) spends the classes evenly on a
logarithmic amplitude scale, which suits speech and music better than linear steps:

    F(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu),   mu = n_classes - 1,   x in [-1, 1]
"""

import io
import os
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import soundfile as sf
import torch
from torch import Tensor
from torchaudio import functional as AF

N_CLASSES = 256  # 8-bit classes, as in the SaShiMi paper: the default of either quantisation
QUANTIZATIONS = ("mu-law", "linear")


def mu_law_encode(x: Tensor, n_classes: int = N_CLASSES) -> Tensor:
    """Float audio in [-1, 1] -> mu-law classes in [0, n_classes). Values outside are clipped."""
    return AF.mu_law_encoding(x.clamp(-1.0, 1.0), n_classes).long()


def mu_law_decode(tokens: Tensor, n_classes: int = N_CLASSES) -> Tensor:
    """Mu-law classes -> float audio in [-1, 1] (the inverse of F at each class centre)."""
    return AF.mu_law_decoding(tokens, n_classes)


def linear_encode(x: Tensor, n_classes: int = N_CLASSES) -> Tensor:
    """Float audio in [-1, 1] -> n_classes equal-width bins; 0.0 falls in class n_classes // 2."""
    scaled = (x.clamp(-1.0, 1.0) + 1) / 2 * (n_classes - 1)
    return (scaled + 0.5).floor().long()


def linear_decode(tokens: Tensor, n_classes: int = N_CLASSES) -> Tensor:
    """Linear classes -> float audio in [-1, 1]."""
    return tokens.to(torch.get_default_dtype()) / (n_classes - 1) * 2 - 1


_ENCODERS = {"mu-law": mu_law_encode, "linear": linear_encode}
_DECODERS = {"mu-law": mu_law_decode, "linear": linear_decode}


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


def encode(x: Tensor, quantization: str = "mu-law", n_classes: int = N_CLASSES) -> Tensor:
    """Float audio in [-1, 1] -> class tokens (LongTensor of the same shape)."""
    _check_quantization(quantization)
    return _ENCODERS[quantization](x, n_classes)


def decode(tokens: Tensor, quantization: str = "mu-law", n_classes: int = N_CLASSES) -> Tensor:
    """Class tokens -> float audio in [-1, 1]."""
    _check_quantization(quantization)
    return _DECODERS[quantization](tokens, n_classes)


def silence_token(quantization: str = "mu-law", n_classes: int = N_CLASSES) -> int:
    """The class of a zero sample: the first input of every sequence (the 'start token')."""
    return int(encode(torch.zeros(()), quantization, n_classes))


# --- files: read any common format as mono float at the model's rate, write 16-bit WAV ---------
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# mpg123, libsndfile's MP3 decoder, writes notes on bad frames ("Note: Illegal Audio-MPEG-Header
# 0x00000000 at offset 2996.") straight to the process's stderr; we catch them for the message.
CHATTY_DECODERS = (".mp3",)
# libsndfile's text when its MP3 decoder rejects a file: it names the wrong cause, since we have
# the file open by then.
MISLEADING = "File does not exist or is not a regular file (possibly a pipe?)."

_stderr_lock = threading.Lock()  # one redirect at a time: two would restore each other's stderr
T = TypeVar("T")


@dataclass(frozen=True)
class AudioInfo:
    """What an audio file's header says."""

    frames: int
    sample_rate: int
    channels: int


@contextmanager
def _captured_stderr(capture: bool) -> Iterator[list[str]]:
    """Send file descriptor 2, where C libraries write, to a temporary file while the block runs;
    the list yielded holds the lines written there once the block is done."""
    lines: list[str] = []
    if not capture:
        yield lines
        return
    with _stderr_lock, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += sink.read().decode(errors="replace").splitlines()


def _decode(path: Path, read: Callable[[BinaryIO], T]) -> T:
    """read(file) on an open audio file, every failure a one-line error naming the file: a file
    that is missing (FileNotFoundError), cannot be read by this user, or does not decode
    (ValueError, with the decoder's own complaint rather than stray lines on stderr)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: no such audio file") from error
    except OSError as error:  # a symlink loop, a folder on the way we may not enter
        raise ValueError(f"{path}: {error.strerror.lower()}") from error
    if not stat.S_ISREG(mode):  # opening a named pipe would wait for a writer forever
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ValueError(f"{path}: {kind}, not an audio file")
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as error:  # "permission denied"
        raise ValueError(f"{path}: {error.strerror.lower()}") from error
    failure = None
    with file, _captured_stderr(path.suffix.lower() in CHATTY_DECODERS) as notes:
        try:
            return read(file)
        except (sf.LibsndfileError, RuntimeError, TypeError) as error:
            failure = error
    said = failure.error_string if isinstance(failure, sf.LibsndfileError) else str(failure)
    if said == MISLEADING:  # the MP3 decoder said no; its first note says why
        notes = [line.removeprefix("Note: ") for line in notes if line.strip()]
        reason = f"MP3 decoder: {notes[0]}" if notes else "the MP3 decoder rejects it"
    else:
        reason = f"soundfile: {said}"
    raise ValueError(f"{path}: not readable as audio ({reason.rstrip('.')})") from failure


def audio_info(path: str | Path) -> AudioInfo:
    """Frames, sample rate and channels from an audio file's header; errors as load_audio's."""
    info = _decode(Path(path), sf.info)
    return AudioInfo(info.frames, info.samplerate, info.channels)


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read an audio file as mono float32 in [-1, 1] at `sample_rate` Hz.

    Channels are averaged (a stereo file becomes their mid signal); any other rate is resampled
    with a windowed-sinc filter (torchaudio). Raises ValueError naming the file when it cannot be
    read (permission denied), does not decode as audio or holds no samples; FileNotFoundError
    when it does not exist.
    """
    path = Path(path)
    samples, file_rate = _decode(  # (frames, channels)
        path, lambda file: sf.read(file, dtype="float32", always_2d=True)
    )
    if samples.size == 0:
        raise ValueError(f"{path}: holds no audio samples")
    mono = torch.from_numpy(samples.mean(axis=1))
    if file_rate != sample_rate:
        mono = AF.resample(mono, file_rate, sample_rate)
    if not torch.isfinite(mono).all():
        raise ValueError(f"{path}: holds non-finite samples (NaN or inf)")
    return mono.clamp(-1.0, 1.0).numpy()


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write mono float audio in [-1, 1] as a 16-bit PCM WAV file; returns the path.

    The file is encoded in memory first: a write that fails (a full disk) raises the OSError
    and leaves no truncated file, where libsndfile would say only "System error".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = io.BytesIO()
    clipped = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    sf.write(wav, clipped, sample_rate, format="WAV", subtype="PCM_16")
    try:
        path.write_bytes(wav.getvalue())
    except OSError:
        path.unlink(missing_ok=True)
        raise
    return path

"""Training data from a folder of audio: find files, skip and report bad ones, split, cut windows.

    folder = AudioFolder.scan("data/")             # every file under data/, probed with soundfile
    clips = folder.load(sample_rate=8000)          # decoded, mono, resampled; bad files named once
    train, valid = split_by_file(clips, 0.1)       # by a hash of each path: stable as files come
    windows = cut_windows(train, seq_len, min_samples)          # fixed-length pieces of the clips
    inputs, targets = make_batch(train, windows[:8], seq_len, "mu-law")   # teacher forcing pairs

All audio is decoded once and kept in memory as float32: fine for folders of minutes to a few hours
(FSDD, 15 minutes at 8 kHz, is 29 MB). Float rather than tokens, so gain augmentation can scale a
window before it is quantised.
"""

import dataclasses
import errno
import fnmatch
import hashlib
import json
import logging
import os
import stat
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .audio import (
    AUDIO_EXTENSIONS,
    N_CLASSES,
    audio_info,
    encode,
    load_audio,
    silence_token,
)
from .checkpoint import atomic_write_json
from .model import pad_batch

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
SEARCHED = " ".join(AUDIO_EXTENSIONS)


@dataclass(frozen=True)
class FileEntry:
    """One file found under the folder: what soundfile says about it, or why it is skipped."""

    path: str  # relative to the folder, with "/" separators
    size: int
    mtime_ns: int
    frames: int | None = None
    sample_rate: int | None = None
    channels: int | None = None
    skipped: str | None = None  # the reason, e.g. "not readable as audio (soundfile: ...)"


@dataclass(frozen=True, eq=False)
class Clip:
    """One decoded file: mono float32 audio in [-1, 1] at the model's sample rate."""

    path: str  # relative to its folder
    audio: Tensor  # (samples,)


def _probe(path: Path, entry: FileEntry) -> FileEntry:
    """Fill in frames, rate and channels from the file header, or the reason it cannot be used."""
    if path.suffix.lower() not in AUDIO_EXTENSIONS:
        return dataclasses.replace(entry, skipped=f"not an audio file (searched for {SEARCHED})")
    try:
        info = audio_info(path)
    except ValueError as error:
        return dataclasses.replace(entry, skipped=str(error).removeprefix(f"{path}: "))
    if info.frames == 0:
        return dataclasses.replace(entry, skipped="holds no audio samples")
    return dataclasses.replace(
        entry, frames=info.frames, sample_rate=info.sample_rate, channels=info.channels
    )


def _walk(root: Path) -> tuple[list[Path], dict[Path, str]]:
    """Every file under `root`, following symlinks, sorted; and the paths that could not be
    searched, with why: folders that cannot be listed, symlinks that loop or lead nowhere, and
    symlinks to a folder searched already (its files would count twice). Real folders are
    searched before symlinked ones, so a file keeps its path without symlinks where it has one."""
    files, unsearched = [], {}
    searched: dict[tuple[int, int], Path] = {}  # (device, inode) of each folder -> its path
    real, linked = deque([root]), deque()
    while real or linked:
        folder = real.popleft() if real else linked.popleft()
        info = folder.stat()
        first = searched.setdefault((info.st_dev, info.st_ino), folder)
        if first != folder:
            shown = "the top folder" if first == root else first.relative_to(root).as_posix()
            unsearched[folder] = f"symlink to {shown}, searched already: left out"
            continue
        try:
            children = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            why = f"cannot be listed ({error.strerror.lower()})"
            if folder == root:
                raise ValueError(f"data folder {root} {why}") from error
            unsearched[folder] = f"folder {why}"
            continue
        for child in children:
            path = Path(child.path)
            try:
                mode = path.stat().st_mode  # follows symlinks
            except OSError as error:
                if error.errno == errno.ELOOP:
                    unsearched[path] = "symlink loop"
                elif child.is_symlink():
                    unsearched[path] = f"broken symlink (to {os.readlink(path)})"
                else:
                    unsearched[path] = error.strerror.lower()
                continue
            if stat.S_ISDIR(mode):
                (linked if child.is_symlink() else real).append(path)
            elif stat.S_ISREG(mode):
                files.append(path)
    return sorted(files), unsearched


@dataclass
class AudioFolder:
    """The files under `root` (recursively) and what is known about each: the scanned manifest."""

    root: Path
    entries: list[FileEntry]

    @classmethod
    def scan(
        cls,
        root: str | Path,
        exclude: tuple[str, ...] = (),
        manifest: Path | None = None,
        ignore: tuple[Path, ...] = (),
        include: tuple[str, ...] = (),
    ) -> "AudioFolder":
        """Find every file under `root`, except those whose relative path matches an `exclude` glob
        (e.g. "*_yweweler_*"), or matches no `include` glob when there are some, and those inside an
        `ignore` folder (the run directory, whose samples would otherwise become training data).
        Headers are probed with soundfile; entries of an earlier scan saved at `manifest` are
        reused when a file's size and mtime are unchanged.
        """
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist")
        ignore = tuple(p.resolve() for p in ignore)
        cached = _read_manifest(manifest, root) if manifest else {}
        files, unsearched = _walk(root)

        def left_out(relative: str, location: Path) -> bool:
            return (
                any(fnmatch.fnmatch(relative, pattern) for pattern in exclude)
                or (include and not any(fnmatch.fnmatch(relative, p) for p in include))
                or any(location.is_relative_to(folder) for folder in ignore)
            )

        entries = []
        for path, why in unsearched.items():  # a loop has no resolved path: its folder's is used
            relative = path.relative_to(root).as_posix()
            if not left_out(relative, path.parent.resolve() / path.name):
                entries.append(FileEntry(relative, 0, 0, skipped=why))
        for path in files:
            relative = path.relative_to(root).as_posix()
            if left_out(relative, path.resolve()):
                continue
            info = path.stat()
            entry = FileEntry(relative, info.st_size, info.st_mtime_ns)
            old = cached.get(relative)
            unchanged = old is not None and (old.size, old.mtime_ns) == (entry.size, entry.mtime_ns)
            # a skipped file is probed again: making it readable changes neither size nor mtime
            entries.append(old if unchanged and old.skipped is None else _probe(path, entry))
        entries.sort(key=lambda e: Path(e.path))
        return cls(root, entries)

    def common_rate(self) -> int:
        """The most common sample rate among the usable files (the higher one on a tie)."""
        rates = Counter(e.sample_rate for e in self.entries if e.skipped is None)
        if not rates:
            raise self._no_audio_error()
        return max(rates, key=lambda rate: (rates[rate], rate))

    def load(self, sample_rate: int, min_samples: int = 1) -> list[Clip]:
        """Decode every usable file as mono at `sample_rate`. Files that fail to decode, or are
        shorter than `min_samples` after resampling, are skipped; all skipped files are named in
        one warning. Raises ValueError when no file is left."""
        clips, too_short = [], {}
        for i, entry in enumerate(self.entries):
            if entry.skipped is not None:
                continue
            path = self.root / entry.path
            try:
                audio = torch.from_numpy(load_audio(path, sample_rate))
            except ValueError as error:
                reason = str(error).removeprefix(f"{path}: ")
                self.entries[i] = dataclasses.replace(entry, skipped=reason)
                continue
            if len(audio) < min_samples:
                # Not stored in the manifest: the minimum is a training setting, not a file fact.
                too_short[entry.path] = (
                    f"{len(audio) / sample_rate:.3f} s is shorter than the minimum "
                    f"{min_samples / sample_rate:.3f} s"
                )
                continue
            clips.append(Clip(entry.path, audio))
        skipped = {e.path: e.skipped for e in self.entries if e.skipped is not None} | too_short
        if skipped:
            lines = "".join(
                f"\n  {self.root / path}: {why}" for path, why in sorted(skipped.items())
            )
            log.warning(f"skipped {len(skipped):,} of {len(self.entries):,} files:{lines}")
        if not clips:
            raise self._no_audio_error()
        return clips

    def _no_audio_error(self) -> ValueError:
        if not self.entries:
            return ValueError(
                f"no audio files in {self.root} (searched recursively for {SEARCHED})"
            )
        return ValueError(
            f"no usable audio in {self.root}: all {len(self.entries):,} files were skipped "
            "(see the warning above)"
        )

    def save_manifest(self, path: Path) -> None:
        files = {e.path: dataclasses.asdict(e) for e in self.entries}
        for entry in files.values():
            del entry["path"]
        atomic_write_json(
            path, {"version": MANIFEST_VERSION, "root": str(self.root.resolve()), "files": files}
        )


def _read_manifest(path: Path, root: Path) -> dict[str, FileEntry]:
    """Entries of a manifest saved for the same folder; {} when there is none or it is unusable."""
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning(f"{path} is not valid JSON; scanning every file again")
        return {}
    if saved.get("version") != MANIFEST_VERSION or saved.get("root") != str(root.resolve()):
        return {}
    return {name: FileEntry(name, **fields) for name, fields in saved["files"].items()}


# --- train / validation split ------------------------------------------------------------------


def _hash_fraction(path: str) -> float:
    """A number in [0, 1) that depends only on the path: sha1 of it, first 32 bits."""
    return int(hashlib.sha1(path.encode()).hexdigest()[:8], 16) / 2**32


def split_by_file(clips: list[Clip], valid_fraction: float) -> tuple[list[Clip], list[Clip]]:
    """Validation gets the files whose path hashes below `valid_fraction`: a file never changes
    side when others are added. If the hash gives no file to validation, the lowest-hashing one
    goes there (folders of a handful of files); a single file gives no validation set."""
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    fractions = [_hash_fraction(c.path) for c in clips]
    is_valid = [f < valid_fraction for f in fractions]
    if not any(is_valid) and valid_fraction > 0 and len(clips) > 1:
        is_valid[fractions.index(min(fractions))] = True
    train = [c for c, v in zip(clips, is_valid, strict=True) if not v]
    valid = [c for c, v in zip(clips, is_valid, strict=True) if v]
    return train, valid


# --- windows and batches -----------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    clip: int  # index into the clip list
    start: int  # first sample
    length: int  # at most seq_len; shorter ones are padded in the batch


def cut_windows(clips: list[Clip], seq_len: int, min_samples: int = 1) -> list[Window]:
    """Cut each clip into consecutive windows of seq_len samples. The last, shorter window of a clip
    is kept (and padded later) when it holds at least `min_samples`; a full window always is."""
    windows = []
    for i, clip in enumerate(clips):
        for start in range(0, len(clip.audio), seq_len):
            length = min(seq_len, len(clip.audio) - start)
            if length >= min(min_samples, seq_len):
                windows.append(Window(i, start, length))
    return windows


def encode_windows(
    clips: list[Clip],
    windows: list[Window],
    quantization: str = "mu-law",
    n_classes: int = N_CLASSES,
    gains_db: Tensor | None = None,
) -> list[Tensor]:
    """The class tokens of each window; with `gains_db` (one per window) the audio is scaled by
    10^(gain/20) first (and clipped to [-1, 1] by the quantiser)."""
    tokens = []
    for k, w in enumerate(windows):
        audio = clips[w.clip].audio[w.start : w.start + w.length]
        if gains_db is not None:
            audio = audio * 10 ** (gains_db[k] / 20)
        tokens.append(encode(audio, quantization, n_classes))
    return tokens


def make_batch(
    clips: list[Clip],
    windows: list[Window],
    seq_len: int,
    quantization: str = "mu-law",
    n_classes: int = N_CLASSES,
    gains_db: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (len(windows), seq_len) LongTensor, for the given windows."""
    tokens = encode_windows(clips, windows, quantization, n_classes, gains_db)
    return pad_batch(tokens, seq_len, silence_token(quantization, n_classes))


def epoch_order(n_windows: int, seed: int, epoch: int) -> Tensor:
    """The shuffled window order of one epoch: a function of (seed, epoch) only, so a resumed run
    replays it exactly. Any map from (seed, epoch) to a seed works; this one keeps them distinct."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_windows, generator=generator)


def take_windows(n_windows: int, seed: int, epoch: int, index: int, count: int):
    """The next `count` window indices from position (epoch, index) of the shuffled stream, running
    on into the next epochs; returns (indices, epoch, index) with the position after them."""
    taken = []
    while len(taken) < count:
        chunk = epoch_order(n_windows, seed, epoch)[index : index + count - len(taken)].tolist()
        taken += chunk
        index += len(chunk)
        if index == n_windows:
            epoch, index = epoch + 1, 0
    return taken, epoch, index

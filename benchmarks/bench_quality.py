"""Sample quality as the SaShiMi paper scores SC09: a digit classifier's view of generated clips.

A small CNN on log-mel spectrograms of 1 s at 8 kHz is trained on FSDD train/ only (cached as
safetensors under benchmarks/.cache/, keyed by a hash of the recipe), then scores sets of clips:

    IS   = exp(E_x KL(p(y|x) || p(y)))              Inception Score (Salimans et al. 2016); max 10
    mIS  = exp(E_{x,x'} KL(p(y|x) || p(y|x')))      modified IS (Gurumurthy et al. 2017)
    AM   = KL(p*(y) || p(y)) + E_x H(p(y|x))        AM score (Zhou et al. 2018), p* = train/ digits
    FID  = |mu - mu_r|^2 + tr(S + S_r - 2 (S S_r)^(1/2))   on penultimate-layer embeddings, against
                                                    the real valid/ clips (Heusel et al. 2017)

with p(y) = E_x p(y|x) over the set (mIS: over all its ordered pairs). Also: the digit histogram,
the share classified with confidence above 0.9, for conditional generation the accuracy against
the digit asked for, and a "one word, then silence" measure: energy bursts per clip (20 ms frames
within 30 dB of the clip's loudest, bursts apart by >= 150 ms of quieter frames) and the silent
share of the last 0.3 s. The real valid/ clips, scored the same way, are the ceiling (their FID is
that of --num random train/ clips against valid/, since valid/ against itself is 0). --prune adds
the paper's likelihood pruning (drop the 40% least likely and the 5% most likely clips) beside
the unpruned figures. --first-of K scores what the web UI shows first when a listener asks for
K clips of a digit: the clips asked the same digit in groups of K, and of each group the first
by seed (unranked), the likeliest, and the one with the most label evidence (log2 p(x | digit) -
log2 p(x | unknown), scored while sampling; guided rows only). A checkpoint with digit labels is
asked for each digit in turn (any speaker), one row per --guidance (a weight W, or W:S:A for W
over the first S seconds, then A; `default` for sashimi.guidance.DEFAULT_GUIDANCE); one without
labels generates unconditionally, at guidance 1 only.
Prints one JSON object.

    python benchmarks/bench_quality.py --checkpoint checkpoints/fsdd --num 200
    python benchmarks/bench_quality.py --checkpoint runs/old/best --checkpoint runs/new/best \
        --guidance 1 3 4:0.4:1.5 --prune
"""

import argparse
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torchaudio import functional as AF  # noqa: E402
from torchaudio.transforms import MelSpectrogram  # noqa: E402

from sashimi.audio import decode, encode, load_audio, write_wav  # noqa: E402
from sashimi.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from sashimi.cli import Parser, add_device_argument  # noqa: E402
from sashimi.generate import Generator, resolve_device  # noqa: E402
from sashimi.guidance import DEFAULT_GUIDANCE, Guidance  # noqa: E402
from sashimi.ranking import bits_and_evidence  # noqa: E402

FSDD = REPO.parent / "shared" / "data" / "fsdd"
CACHE = REPO / "benchmarks" / ".cache"
SAMPLE_RATE = 8000  # FSDD's rate; the classifier's input
CLIP_SAMPLES = SAMPLE_RATE  # the classifier hears 1 s, as SC09's does
DIGITS = 10

# The classifier's recipe. Its hash names the cached weights: change a value and it retrains.
RECIPE = {
    "version": 1,
    "n_fft": 256,  # 32 ms windows
    "hop": 80,  # 10 ms: 101 frames per second
    "n_mels": 40,
    "floor_db": 80.0,  # log-mel in dB below the clip's loudest bin, floored here: gain-invariant
    "channels": (16, 32, 64, 64),  # conv blocks (3x3, BatchNorm, ReLU, 2x2 max-pool)
    "dropout": 0.3,
    "epochs": 20,
    "batch_size": 32,
    "lr": 3e-3,
    "weight_decay": 1e-2,
    "gain_db": 12.0,  # augmentation: gain uniform in +-12 dB
    "noise_share": 0.5,  # augmentation: share of clips with white noise added,
    "noise_db": (-60.0, -30.0),  # this far below their peak
    "mu_law_share": 0.5,  # augmentation: share of clips through an 8-bit mu-law round trip
    "seed": 0,
}

# "One word, then silence"
FRAME = SAMPLE_RATE // 50  # 20 ms frames
BURST_DB = 30.0  # a frame is loud when its RMS is within 30 dB of the clip's loudest frame
SILENCE_DBFS = -60.0  # and above -60 dBFS whatever the peak (a silent clip has no burst)
BURST_GAP_FRAMES = math.ceil(0.150 * SAMPLE_RATE / FRAME)  # 150 ms of quiet frames part bursts
TAIL_FRAMES = round(0.3 * SAMPLE_RATE / FRAME)  # the last 0.3 s

CONFIDENT = 0.9
PRUNE_LEAST_LIKELY, PRUNE_MOST_LIKELY = 0.40, 0.05  # SaShiMi paper, SC09 samples


# --- data ------------------------------------------------------------------------------------


def load_fsdd(folder: Path) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Every {digit}_{speaker}_{index}.wav in `folder` at 8 kHz: clips, digits (n,), names."""
    paths = sorted(folder.glob("*.wav"))
    if not paths:
        raise FileNotFoundError(
            f"no .wav files in {folder}; pass --fsdd DIR, the folder holding FSDD's train/ "
            "and valid/ (files named {digit}_{speaker}_{index}.wav)"
        )
    clips = [load_audio(path, SAMPLE_RATE) for path in paths]
    digits = np.array([int(path.name.split("_")[0]) for path in paths])
    return clips, digits, [path.name for path in paths]


def fit_length(clip: np.ndarray, samples: int, offset: int = 0) -> np.ndarray:
    """Zero-pad or crop to `samples`: placed from `offset` if shorter, cut from `offset` if longer."""
    out = np.zeros(samples, dtype=np.float32)
    if len(clip) <= samples:
        out[offset : offset + len(clip)] = clip
    else:
        out[:] = clip[offset : offset + samples]
    return out


def augment(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 1 s training view of a clip: random onset (or crop), gain, noise and mu-law round trip,
    so the classifier does not lean on the real clips' onset at 0 or on 16-bit silence."""
    x = fit_length(clip, CLIP_SAMPLES, int(rng.integers(0, abs(CLIP_SAMPLES - len(clip)) + 1)))
    x = x * 10 ** (rng.uniform(-RECIPE["gain_db"], RECIPE["gain_db"]) / 20)
    if rng.random() < RECIPE["noise_share"]:
        level = np.abs(x).max() * 10 ** (rng.uniform(*RECIPE["noise_db"]) / 20)
        x = x + level * rng.standard_normal(CLIP_SAMPLES).astype(np.float32)
    x = np.clip(x, -1.0, 1.0)
    if rng.random() < RECIPE["mu_law_share"]:
        x = decode(encode(torch.from_numpy(x))).numpy()
    return x.astype(np.float32)


# --- the classifier --------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """1 s of 8 kHz audio (batch, 8000) -> digit logits (batch, 10) through log-mel and a CNN."""

    def __init__(self):
        super().__init__()
        self.mel = MelSpectrogram(
            SAMPLE_RATE, n_fft=RECIPE["n_fft"], hop_length=RECIPE["hop"], n_mels=RECIPE["n_mels"]
        )
        layers, c_in = [], 1
        for c in RECIPE["channels"]:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout(RECIPE["dropout"])
        self.head = nn.Linear(c_in, DIGITS)

    def log_mel(self, audio: Tensor) -> Tensor:
        """(batch, samples) -> dB below each clip's loudest bin, scaled to [-1, 1]: (batch, 1, n_mels, T)."""
        db = 10 * torch.log10(self.mel(audio) + 1e-10)
        db = db - db.amax(dim=(1, 2), keepdim=True)
        return (db.clamp(min=-RECIPE["floor_db"]) / (RECIPE["floor_db"] / 2) + 1)[:, None]

    def embed(self, audio: Tensor) -> Tensor:
        """The penultimate layer: conv features averaged over frequency and time, (batch, C)."""
        return self.convs(self.log_mel(audio)).mean(dim=(2, 3))

    def forward(self, audio: Tensor) -> Tensor:
        return self.head(self.dropout(self.embed(audio)))


def recipe_hash(train_names: list[str]) -> str:
    text = json.dumps({"recipe": RECIPE, "train": train_names}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def train_classifier(clips: list[np.ndarray], digits: np.ndarray) -> DigitClassifier:
    """AdamW with a one-cycle schedule on augmented 1 s views of every clip, each epoch."""
    torch.manual_seed(RECIPE["seed"])
    rng = np.random.default_rng(RECIPE["seed"])
    model = DigitClassifier()
    batch = RECIPE["batch_size"]
    steps = RECIPE["epochs"] * math.ceil(len(clips) / batch)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"]
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, RECIPE["lr"], total_steps=steps)
    model.train()
    for epoch in range(RECIPE["epochs"]):
        order, total, right = rng.permutation(len(clips)), 0.0, 0
        for first in range(0, len(clips), batch):
            idx = order[first : first + batch]
            audio = torch.from_numpy(np.stack([augment(clips[i], rng) for i in idx]))
            target = torch.from_numpy(digits[idx])
            logits = model(audio)
            loss = nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
            right += (logits.argmax(1) == target).sum().item()
        print(
            f"classifier epoch {epoch + 1}/{RECIPE['epochs']}: loss {total / len(clips):.3f}, "
            f"augmented train accuracy {right / len(clips):.3f}",
            file=sys.stderr,
        )
    return model.eval()


def load_or_train(
    clips: list[np.ndarray], digits: np.ndarray, names: list[str], retrain: bool
) -> tuple[DigitClassifier, dict]:
    """The classifier for these train/ clips: from the cache, or trained now and cached."""
    path = CACHE / f"digit_classifier-{recipe_hash(names)}.safetensors"
    info = {"cache": str(path.relative_to(REPO)), "train_clips": len(clips)}
    model = DigitClassifier()
    if path.exists() and not retrain:
        model.load_state_dict(load_file(path))
        return model.eval(), info | {"trained_now": False}
    start = time.perf_counter()
    model = train_classifier(clips, digits)
    info |= {"trained_now": True, "train_seconds": round(time.perf_counter() - start, 1)}
    CACHE.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(path), metadata={"recipe": json.dumps(RECIPE)})
    return model, info


@torch.inference_mode()
def classify(model: DigitClassifier, audio: np.ndarray, batch: int = 100) -> tuple[Tensor, Tensor]:
    """Clips (n, samples) at 8 kHz, cut or padded to 1 s -> log p(y|x) (n, 10) float64 and
    embeddings (n, C) float64."""
    audio = torch.from_numpy(np.stack([fit_length(clip, CLIP_SAMPLES) for clip in audio]))
    log_probs, embeddings = [], []
    for first in range(0, len(audio), batch):
        e = model.embed(audio[first : first + batch])
        embeddings.append(e.double())
        log_probs.append(torch.log_softmax(model.head(e).double(), dim=1))
    return torch.cat(log_probs), torch.cat(embeddings)


# --- metrics ---------------------------------------------------------------------------------


def accuracy(model: DigitClassifier, clips: list[np.ndarray], digits: np.ndarray) -> float:
    return round(float((classify(model, clips)[0].argmax(1).numpy() == digits).mean()), 4)


def gaussian(embeddings: Tensor) -> tuple[np.ndarray, np.ndarray]:
    e = embeddings.numpy()
    return e.mean(0), np.cov(e, rowvar=False)


def frechet_distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with tr (S_a S_b)^(1/2) computed as
    the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric
    (so no complex round-off from a general matrix square root)."""
    (mu_a, S_a), (mu_b, S_b) = a, b
    w, V = np.linalg.eigh(S_a)
    root_a = (V * np.sqrt(w.clip(min=0))) @ V.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ S_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(S_a) + np.trace(S_b) - 2 * cross)


def bursts_and_tail(clip: np.ndarray) -> tuple[int, float]:
    """Energy bursts in a clip at 8 kHz, and the silent share of its last 0.3 s (see BURST_DB)."""
    frames = clip[: len(clip) // FRAME * FRAME].reshape(-1, FRAME).astype(np.float64)
    db = 10 * np.log10((frames**2).mean(1) + 1e-12)
    loud = (db > db.max() - BURST_DB) & (db > SILENCE_DBFS)
    bursts, quiet_run = 0, BURST_GAP_FRAMES  # a loud frame after >= the gap starts a burst
    for is_loud in loud:
        if is_loud:
            bursts += quiet_run >= BURST_GAP_FRAMES
            quiet_run = 0
        else:
            quiet_run += 1
    return int(bursts), float(1 - loud[-TAIL_FRAMES:].mean())


def score(
    log_probs: Tensor,
    embeddings: Tensor,
    audio: np.ndarray,
    real: tuple[np.ndarray, np.ndarray],
    p_star: Tensor,
    asked: np.ndarray | None = None,
) -> dict:
    """Every metric of one set of clips: log p(y|x) (n, 10), embeddings (n, C), audio (n, samples)
    at 8 kHz, the real clips' Gaussian, the train/ digit distribution p* (10,), the digits asked."""
    p = log_probs.exp()
    log_marginal = p.mean(0).log()  # log p(y)
    kl_to_marginal = (p * (log_probs - log_marginal)).sum(1)  # KL(p(y|x) || p(y)), (n,)
    # KL(p(y|x) || p(y|x')) for every ordered pair: sum_y p(y|x) (log p(y|x) - log p(y|x'))
    kl_pairs = (p * log_probs).sum(1, keepdim=True) - p @ log_probs.T  # (n, n)
    entropy = -(p * log_probs).sum(1)
    kl_star = (torch.special.xlogy(p_star, p_star) - p_star * log_marginal).sum()  # KL(p* || p(y))
    predicted = log_probs.argmax(1).numpy()
    bursts, tails = zip(*(bursts_and_tail(clip) for clip in audio), strict=True)
    row = {
        "clips": len(p),
        "inception_score": round(kl_to_marginal.mean().exp().item(), 3),
        "modified_inception_score": round(kl_pairs.mean().exp().item(), 2),
        "am_score": round((kl_star + entropy.mean()).item(), 3),
        "fid": round(frechet_distance(gaussian(embeddings), real), 3),
        "digit_histogram": np.bincount(predicted, minlength=DIGITS).tolist(),
        "confident_share": round((p.max(1).values > CONFIDENT).double().mean().item(), 3),
        "median_bursts": float(np.median(bursts)),
        "single_burst_share": round(float(np.mean(np.array(bursts) == 1)), 3),
        "burst_histogram": {
            str(k): int(v) for k, v in zip(*np.unique(bursts, return_counts=True), strict=True)
        },
        "tail_silent_share": round(float(np.mean(tails)), 3),
    }
    if asked is not None:
        right = predicted == asked
        row["accuracy_asked"] = round(float(right.mean()), 3)
        row["accuracy_asked_per_digit"] = {
            str(d): round(float(right[asked == d].mean()), 3)
            for d in range(DIGITS)
            if (asked == d).any()
        }
        # heard_as[d][h]: clips asked for digit d that the classifier heard as h
        row["heard_as"] = {
            str(d): np.bincount(predicted[asked == d], minlength=DIGITS).tolist()
            for d in range(DIGITS)
            if (asked == d).any()
        }
    return row


# --- generation ------------------------------------------------------------------------------


def digit_labels(generator: Generator) -> list[str] | None:
    """The checkpoint's digit label values, or None for a model trained without labels."""
    if "digit" not in generator.config.labels:  # {} for a model trained without labels
        return None
    values = sorted(generator.config.labels["digit"])
    if not all(str(v).isdigit() and int(v) < DIGITS for v in values):
        raise ValueError(f"the checkpoint's digit labels should be 0-9, got {values}")
    return values


def generate(
    generator: Generator, args, labels: list[dict] | None, guidance: Guidance
) -> tuple[np.ndarray, np.ndarray]:
    """args.num clips (num, samples) at the generator's rate; clip r is seeded args.seed + r, so a
    set does not depend on the batch size. And each clip's log-probability summed while sampling,
    natural log, (1, num) under its labels, or when guided (2, num), the second row under every
    field unknown (Generator.stream's log_probs)."""
    samples = round(args.seconds * generator.sample_rate)
    out, log_probs = [], []
    for first in range(0, args.num, args.batch_size):
        batch = min(args.batch_size, args.num - first)
        conditioning = {}
        if labels is not None:
            conditioning = {"labels": labels[first : first + batch], "guidance": guidance}
        start = time.perf_counter()
        chunks = generator.stream(
            samples,
            batch_size=batch,
            seed=args.seed + first,
            temperature=args.temperature,
            top_p=args.top_p,
            show_progress=False,
            log_probs=True,
            **conditioning,
        )
        audio, scores = zip(*chunks, strict=True)
        out.append(np.concatenate(audio, axis=1))
        log_probs.append(sum(chunk.sum(1) for chunk in scores).reshape(-1, batch))
        print(
            f"  clips {first + batch}/{args.num}: {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    return np.concatenate(out), np.concatenate(log_probs, axis=1)


def first_of(
    k: int, asked: np.ndarray, heard: np.ndarray, bits: np.ndarray, evidence: np.ndarray
) -> dict:
    """What a listener who asks for k clips of a digit hears first: the clips asked each digit,
    in seed order, in groups of k, and the share of groups whose first clip is heard as asked,
    first by seed, by likelihood, and by label evidence (sashimi/ranking.py's figures)."""
    rankings = {
        "unranked": np.zeros(len(asked)),
        "likeliest": -bits,
        "most_label_evidence": evidence,
    }
    groups = []
    for digit in np.unique(asked):
        clips = np.flatnonzero(asked == digit)
        groups += [clips[g : g + k] for g in range(0, len(clips) - k + 1, k)]
    right = heard == asked
    row = {"k": k, "groups": len(groups)}
    for name, score in rankings.items():
        firsts = [group[np.argmax(score[group])] for group in groups]  # argmax: the first of ties
        row[name] = round(float(right[firsts].mean()), 3)
    return row


def likelihood_pruned(bits: np.ndarray) -> np.ndarray:
    """The indices kept by the paper's pruning of clips with these bits per sample: the 40% least
    likely and the 5% most likely dropped."""
    order = np.argsort(bits)  # most likely (fewest bits) first
    n = len(bits)
    return order[math.floor(PRUNE_MOST_LIKELY * n) : n - math.floor(PRUNE_LEAST_LIKELY * n)]


def to_classifier_rate(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == SAMPLE_RATE:
        return audio
    return AF.resample(torch.from_numpy(audio), sample_rate, SAMPLE_RATE).numpy()


# --- the command line ------------------------------------------------------------------------


def guidance_spec(text: str) -> Guidance:
    """`3` (a constant weight), `4:0.4:1.5` (4 for 0.4 s, then 1.5) or `default`."""
    if text == "default":
        return DEFAULT_GUIDANCE
    parts = text.split(":")
    if len(parts) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: want W or W:S:A")
    try:
        guidance = Guidance(*(float(part) for part in parts))
        guidance.check()
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: want W or W:S:A ({error})") from None
    return guidance


def build_parser() -> Parser:
    parser = Parser(
        prog="python benchmarks/bench_quality.py",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n"
        "  python benchmarks/bench_quality.py --checkpoint checkpoints/fsdd --num 200\n"
        "  python benchmarks/bench_quality.py --checkpoint runs/a/best --checkpoint runs/b/best "
        "--guidance 1 3 4:0.4:1.5 --prune",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        type=Path,
        action="append",
        default=[],
        help=f"checkpoint to generate from (repeatable; default {DEFAULT_CHECKPOINT.relative_to(REPO)})",
    )
    parser.add_argument("--num", metavar="N", type=int, default=200, help="clips per row")
    parser.add_argument("--seconds", metavar="S", type=float, default=1.0, help="length of a clip")
    parser.add_argument(
        "--guidance",
        metavar="W[:S:A]",
        type=guidance_spec,
        nargs="+",
        default=[Guidance(1.0)],
        help="classifier-free guidance, one row each: a weight (1 = none), or W:S:A for W over "
        "the first S seconds then A, or `default`; unlabelled checkpoints get guidance 1 only",
    )
    parser.add_argument(
        "--batch-size", metavar="B", type=int, default=100, help="clips generated at once"
    )
    parser.add_argument("--seed", type=int, default=0, help="clip r of a row is seeded SEED + r")
    parser.add_argument(
        "--temperature", metavar="T", type=float, default=1.0, help="softmax temperature"
    )
    parser.add_argument(
        "--top-p", metavar="P", type=float, default=1.0, help="nucleus sampling mass (1 = off)"
    )
    parser.add_argument(
        "--prune",
        action="store_true",
        help="also score the clips left after likelihood pruning (drop the 40%% least likely, "
        "5%% most likely)",
    )
    parser.add_argument(
        "--first-of",
        metavar="K",
        type=int,
        default=0,
        help="also score the first of every K clips asked the same digit, unranked, likeliest "
        "and by label evidence, as the web UI ranks them (guided rows; 0 = off)",
    )
    parser.add_argument(
        "--fsdd", metavar="DIR", type=Path, default=FSDD, help="FSDD with train/ and valid/"
    )
    parser.add_argument(
        "--retrain", action="store_true", help="train the classifier even if cached"
    )
    parser.add_argument(
        "--save-clips", metavar="DIR", type=Path, help="write each row's clips as WAV here"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    add_device_argument(parser, default="auto")
    return parser


def real_row(classifier: DigitClassifier, fsdd: dict, real: tuple, p_star: Tensor, args) -> dict:
    """The ceiling: the valid/ clips scored like generated ones. Their FID against themselves
    would be 0, so the row's FID is that of args.num random train/ clips: what real speech
    reaches at this set size."""
    clips, digits, _ = fsdd["valid"]
    log_probs, embeddings = classify(classifier, clips)
    audio = np.stack([fit_length(clip, round(args.seconds * SAMPLE_RATE)) for clip in clips])
    row = {"name": "real", "source": str(args.fsdd / "valid")}
    row |= score(log_probs, embeddings, audio, real, p_star, digits)
    train = fsdd["train"][0]
    draw = np.random.default_rng(0).choice(len(train), min(args.num, len(train)), replace=False)
    train_embeddings = classify(classifier, [train[i] for i in draw])[1]
    row["fid"] = round(frechet_distance(gaussian(train_embeddings), real), 3)
    row["fid_of"] = f"{len(draw)} random train/ clips against valid/"
    return row


def checkpoint_rows(
    directory: Path,
    generator: Generator,
    classifier: DigitClassifier,
    real: tuple,
    p_star: Tensor,
    args,
) -> list[dict]:
    """One row per guidance weight: generate args.num clips, score them (and the pruned set)."""
    values = digit_labels(generator)
    asked = labels = None
    guidances = [Guidance(1.0)]
    if values is not None:  # the digits round-robin, so each is asked for num/10 times; any speaker
        labels = [{"digit": values[r % len(values)]} for r in range(args.num)]
        asked = np.array([int(label["digit"]) for label in labels])
        guidances = args.guidance
    rows = []
    for guidance in guidances:
        name = f"{directory} @ guidance {guidance}"
        print(f"{name}: generating {args.num} clips", file=sys.stderr)
        start = time.perf_counter()
        audio, sampled_log_probs = generate(generator, args, labels, guidance)
        row = {
            "name": name,
            "checkpoint": str(directory),
            "guidance": guidance.as_dict(),
            "conditional": labels is not None,
            "generate_seconds": round(time.perf_counter() - start, 1),
        }
        if labels is None:
            row["note"] = "no digit labels in the checkpoint: unconditional, guidance 1 only"
        if args.save_clips:
            slug = re.sub(r"[^\w.-]+", "_", str(directory)).strip("_")  # runs/a/best: runs_a_best
            folder = args.save_clips / f"{slug}_{guidance.slug}"
            for r, clip in enumerate(audio):
                tag = "" if asked is None else f"_asked{asked[r]}"
                write_wav(folder / f"{r:04d}{tag}.wav", clip, generator.sample_rate)
        clips = to_classifier_rate(audio, generator.sample_rate)
        log_probs, embeddings = classify(classifier, clips)
        row |= score(log_probs, embeddings, clips, real, p_star, asked)
        # scored while sampling: the bits log_likelihood would give, without a second pass
        bits, evidence = bits_and_evidence(sampled_log_probs, audio.shape[1])
        if args.first_of and asked is not None and evidence is not None:
            heard = log_probs.argmax(1).numpy()
            row["first_of"] = first_of(args.first_of, asked, heard, bits, evidence)
        if args.prune:
            kept = likelihood_pruned(bits)
            row["bits_per_sample_mean"] = round(float(bits.mean()), 3)
            row["pruned"] = {
                "kept_bits_per_sample": [
                    round(float(bits[kept].min()), 3),
                    round(float(bits[kept].max()), 3),
                ]
            }
            row["pruned"] |= score(
                log_probs[kept],
                embeddings[kept],
                clips[kept],
                real,
                p_star,
                None if asked is None else asked[kept],
            )
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num < 2:
        parser.error(f"--num must be at least 2 (the metrics need a set of clips), got {args.num}")
    if args.seconds <= 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    if args.first_of < 0:
        parser.error(f"--first-of must be 0 (off) or a number of clips, got {args.first_of}")
    try:  # every checkpoint loads before minutes go into the classifier
        device = resolve_device(args.device)
        generators = {
            directory: Generator.from_checkpoint(directory, device)
            for directory in args.checkpoint or [DEFAULT_CHECKPOINT.relative_to(REPO)]
        }
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    report = {
        "benchmark": "quality",
        "torch": torch.__version__,
        "device": str(device),  # generation and likelihood; the classifier runs on the CPU
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "settings": {
            k: getattr(args, k)
            for k in (
                "num",
                "seconds",
                "batch_size",
                "seed",
                "temperature",
                "top_p",
                "prune",
                "first_of",
            )
        },
    }
    try:
        fsdd = {split: load_fsdd(args.fsdd / split) for split in ("train", "valid")}
    except FileNotFoundError as error:
        parser.error(str(error))
    classifier, info = load_or_train(*fsdd["train"], args.retrain)
    train_digits = fsdd["train"][1]
    p_star = torch.from_numpy(np.bincount(train_digits, minlength=DIGITS) / len(train_digits))

    valid_clips, valid_digits, _ = fsdd["valid"]
    rng = np.random.default_rng(1)
    augmented = [augment(clip, rng) for clip in valid_clips]  # random onset, gain, noise, mu-law
    report["classifier"] = info | {
        "parameters": sum(p.numel() for p in classifier.parameters()),
        "valid_clips": len(valid_clips),
        "valid_accuracy": accuracy(classifier, valid_clips, valid_digits),
        "valid_accuracy_augmented": accuracy(classifier, augmented, valid_digits),
    }
    print(json.dumps(report["classifier"]), file=sys.stderr)
    real = gaussian(classify(classifier, valid_clips)[1])
    rows = [real_row(classifier, fsdd, real, p_star, args)]
    print(json.dumps(rows[0]), file=sys.stderr)
    for directory, generator in generators.items():
        rows += checkpoint_rows(directory, generator, classifier, real, p_star, args)
    report["rows"] = rows
    report["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    report["wall_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

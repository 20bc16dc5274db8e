"""Trivial baselines for scale: NLL in bits per sample of models that need no training loop.

    uniform   every class equally likely: log2(n_classes) bits
    unigram   the class frequencies of the training data
    markov    first-order Markov chain: p(s_t | s_{t-1}) from training bigram counts

Counts get add-one (Laplace) smoothing; each clip is scored in full from the start token, with the
same decoding and quantisation as training. Prints one JSON object; --speakers adds one row per
FSDD speaker (file names {digit}_{speaker}_{take}.wav).

    python benchmarks/bench_baselines.py --train ../shared/data/fsdd/train --valid ../shared/data/fsdd/valid \
        --sample-rate 8000 --speakers jackson,lucas,nicolas,yweweler
"""

import argparse
import fnmatch
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sashimi.audio import N_CLASSES, encode, silence_token  # noqa: E402
from sashimi.data import AudioFolder  # noqa: E402


def tokens_of(
    folder: str, sample_rate: int, exclude: tuple[str, ...] = ()
) -> list[tuple[str, torch.Tensor]]:
    clips = AudioFolder.scan(folder, exclude).load(sample_rate)
    return [(clip.path, encode(clip.audio, "mu-law", N_CLASSES)) for clip in clips]


def with_start(tokens: torch.Tensor, start: int) -> torch.Tensor:
    return torch.cat([torch.tensor([start]), tokens])


def fit(train: list[torch.Tensor], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log2 probabilities: unigram (C,) and first-order Markov (C, C) [previous, next]."""
    C = N_CLASSES
    unigram = torch.ones(C, dtype=torch.float64)
    bigram = torch.ones(C, C, dtype=torch.float64)
    for tokens in train:
        unigram += torch.bincount(tokens, minlength=C)
        seq = with_start(tokens, start)
        bigram += torch.bincount(seq[:-1] * C + seq[1:], minlength=C * C).view(C, C).double()
    return torch.log2(unigram / unigram.sum()), torch.log2(bigram / bigram.sum(1, keepdim=True))


def score(
    valid: list[torch.Tensor], unigram: torch.Tensor, markov: torch.Tensor, start: int
) -> dict:
    n = sum(len(t) for t in valid)
    uni = -sum(unigram[t].sum().item() for t in valid) / n
    mark = 0.0
    for tokens in valid:
        seq = with_start(tokens, start)
        mark -= markov[seq[:-1], seq[1:]].sum().item()
    return {
        "uniform": math.log2(N_CLASSES),
        "unigram": round(uni, 3),
        "markov": round(mark / n, 3),
        "files": len(valid),
        "samples": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--sample-rate", type=int, default=8000)
    parser.add_argument("--exclude", action="append", default=[], help="glob left out of --train")
    parser.add_argument(
        "--speakers", default="", help="comma-separated FSDD speakers for per-speaker rows"
    )
    args = parser.parse_args()
    start = silence_token("mu-law", N_CLASSES)
    train = [t for _, t in tokens_of(args.train, args.sample_rate, tuple(args.exclude))]
    valid = tokens_of(args.valid, args.sample_rate)
    unigram, markov = fit(train, start)
    report = {
        "train": args.train,
        "exclude": args.exclude,
        "valid": args.valid,
        "all": score([t for _, t in valid], unigram, markov, start),
    }
    for speaker in filter(None, args.speakers.split(",")):
        mine = [t for path, t in valid if fnmatch.fnmatch(path, f"*_{speaker}_*")]
        report[speaker] = score(mine, unigram, markov, start)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""`python -m sashimi.evaluate`: a model's negative log-likelihood in bits per sample over a folder.

Bits per sample is the SaShiMi paper's metric: 8 for a uniform guess over 256 classes, lower is
better. Files go through the training pipeline (sashimi.data): decoded at the model's rate, cut into
pieces of the training window length, each piece scored in full from the start token. Training's
validation calls `evaluate_bits` too, so the two numbers are the same measurement. A labelled
checkpoint is scored twice: with each file's labels (read from its path with --labels, by default
the spec it was trained with) and with every field unknown.
stdout gets one JSON line; warnings about skipped files go to stderr.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import load_checkpoint
from .cli import Parser, add_device_argument
from .data import AudioFolder, cut_windows, encode_windows
from .generate import resolve_device
from .labels import LabelSpec, label_tensor, read_labels
from .model import SaShiMi


@torch.no_grad()
def evaluate_bits(
    model: SaShiMi, tokens: list[Tensor], batch_size: int = 16, labels: Tensor | None = None
) -> float:
    """Mean NLL in bits per sample over every sample of every sequence in `tokens`.

    Each sequence (1-D LongTensor) is one row of SaShiMi.sequence_bits. labels (len(tokens), n_fields)
    are the label indices of each sequence (None: all unknown). The model runs in eval mode on its
    own device; its training mode is restored afterwards.
    """
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))  # like lengths: less padding
    was_training = model.training
    model.eval()
    total_bits = 0.0
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        batch_labels = None if labels is None else labels[rows]
        total_bits += model.sequence_bits([tokens[i] for i in rows], batch_labels).sum().item()
    model.train(was_training)
    return total_bits / sum(len(t) for t in tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m sashimi.evaluate",
        description="Score a trained model on a folder of audio: negative log-likelihood in bits "
        "per sample (lower is better; 8 is a uniform guess over 256 classes).",
        epilog="examples:\n"
        "  python -m sashimi.evaluate --checkpoint runs/fsdd/best --data data/fsdd/valid\n"
        "  python -m sashimi.evaluate --checkpoint checkpoints/fsdd --data my_sounds/ --device cpu",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        type=Path,
        required=True,
        help="checkpoint folder (config.json + model.safetensors)",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        required=True,
        help="folder of audio files, searched recursively",
    )
    parser.add_argument(
        "--include",
        metavar="GLOB",
        action="append",
        default=[],
        help="only files whose path under --data matches, e.g. '*_lucas_*' for one speaker "
        "(repeatable)",
    )
    parser.add_argument(
        "--exclude",
        metavar="GLOB",
        action="append",
        default=[],
        help="leave out files whose path under --data matches (repeatable)",
    )
    parser.add_argument(
        "--seq-len",
        metavar="L",
        type=int,
        default=None,
        help="cut files into pieces of L samples, each scored from the start "
        "token (default: the window length the checkpoint was trained with)",
    )
    parser.add_argument(
        "--batch-size", metavar="B", type=int, default=16, help="pieces scored at once"
    )
    parser.add_argument(
        "--labels",
        metavar="SPEC",
        default=None,
        help="for a labelled checkpoint: how labels are read from paths under --data, as in "
        "training ('folder' or a regex with named groups; default: the checkpoint's own)",
    )
    add_device_argument(parser, default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; prints one JSON line; exits 2 with a message on a user error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stderr)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    started = time.perf_counter()
    try:
        model, metadata = load_checkpoint(args.checkpoint, resolve_device(args.device))
        seq_len = args.seq_len or metadata.get("seq_len")
        if seq_len is None:
            raise ValueError(
                f"{args.checkpoint}/metrics.json does not say the training window length; "
                "pass --seq-len L"
            )
        if seq_len < 1:
            raise ValueError(f"--seq-len must be at least 1, got {seq_len}")
        cfg = model.config
        spec = args.labels or metadata.get("labels")
        if spec is not None and not cfg.labels:
            raise ValueError(f"--labels given, but {args.checkpoint} was trained without labels")
        folder = AudioFolder.scan(args.data, tuple(args.exclude), include=tuple(args.include))
        clips = folder.load(cfg.sample_rate)
        windows = cut_windows(clips, seq_len)
        labels = None
        if cfg.labels and spec is not None:
            clip_labels = read_labels(
                LabelSpec.parse(spec), [c.path for c in clips], "", cfg.labels
            )
            labels = label_tensor(cfg.labels, [clip_labels[w.clip] for w in windows])
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    tokens = encode_windows(clips, windows, cfg.quantization, cfg.n_classes)
    bits = evaluate_bits(model, tokens, args.batch_size, labels)
    samples = sum(len(t) for t in tokens)
    scores = {"bits_per_sample": round(bits, 5)}
    if labels is not None:
        unlabelled = evaluate_bits(model, tokens, args.batch_size)
        scores = {**scores, "bits_per_sample_unlabelled": round(unlabelled, 5), "labels": spec}
    summary = {
        **scores,
        "files": len(clips),
        "skipped": len(folder.entries) - len(clips),
        "samples": samples,
        "audio_seconds": round(samples / cfg.sample_rate, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "seq_len": seq_len,
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

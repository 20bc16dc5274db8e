"""Where labels enter the U-Net, and how much label dropout: validation NLL at equal steps.

Trains small labelled models side by side on FSDD (digit and speaker from the file names), the
same data order, seed and steps for each variant, and scores the validation clips with their
labels and with every field unknown:
  every_block   the model as shipped: c_k = W_k e added to the input of every S4 block
  input_only    one W e added to the token embedding, nothing inside the U-Net
  no_labels     the unconditional model (the baseline both must beat)
each at the label dropout given (--dropouts: every_block also at the others). Prints one JSON
object.

    python benchmarks/bench_conditioning.py --steps 300
"""

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from sashimi import SaShiMi, SaShiMiConfig  # noqa: E402
from sashimi.data import AudioFolder, cut_windows, encode_windows, make_batch, take_windows  # noqa: E402
from sashimi.evaluate import evaluate_bits  # noqa: E402
from sashimi.labels import LabelSpec, build_vocabulary, drop_labels, label_tensor  # noqa: E402
from sashimi.model import IGNORE_INDEX, nll_bits  # noqa: E402

FSDD = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "fsdd"
SPEC = r"(?P<digit>\d)_(?P<speaker>[a-z]+)_"


class _Shifted(nn.Module):
    """An embedding plus a per-clip shift (batch, 1, H): InputOnly's way into _unet."""

    def __init__(self, embedding: nn.Embedding, shift: Tensor):
        super().__init__()
        self.inner, self.shift = embedding, shift

    def forward(self, tokens: Tensor) -> Tensor:
        return self.inner(tokens) + self.shift


class InputOnly(SaShiMi):
    """The alternative: labels enter once, W e added to the token embedding of the outer tier."""

    def __init__(self, config: SaShiMiConfig):
        super().__init__(config)
        for stack in (self.center, *self.up_stacks):
            stack.label_projections = None  # no bias inside the U-Net
        self.label_projection = nn.Linear(config.d_model, config.d_model, bias=False)
        nn.init.zeros_(self.label_projection.weight)

    def forward(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        shift = self.label_projection(self.label_embedding(labels, tokens.shape[0]))[:, None]
        embedding = self.embedding
        self.embedding = _Shifted(embedding, shift)
        try:
            return self._unet(tokens, labels, with_state=False)[0]
        finally:
            self.embedding = embedding


def train_variant(model, dropout, clips, labels, vocabulary, valid, args) -> dict:
    """args.steps AdamW steps on FSDD train (padding scored), then the validation NLL."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    windows = cut_windows(clips, args.seq_len)
    epoch = index = 0
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50)
        order, epoch, index = take_windows(len(windows), args.seed, epoch, index, args.batch_size)
        batch = [windows[i] for i in order]
        inputs, targets = make_batch(clips, batch, args.seq_len)
        targets = targets.masked_fill(targets == IGNORE_INDEX, model.start_token)
        rows = None
        if vocabulary:
            rows = drop_labels(
                label_tensor(vocabulary, [labels[w.clip] for w in batch]),
                dropout,
                torch.Generator().manual_seed(args.seed * 1_000_003 + step),
            )
        loss = nll_bits(model(inputs, rows), targets)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    valid_tokens, valid_rows = valid
    result = {"train_seconds": round(time.perf_counter() - started, 1)}
    result["valid_bits_unlabelled"] = round(evaluate_bits(model, valid_tokens, 16), 4)
    if vocabulary:
        result["valid_bits_labelled"] = round(evaluate_bits(model, valid_tokens, 16, valid_rows), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--dropout", type=float, default=0.15)
    parser.add_argument("--dropouts", type=float, nargs="*", default=[0.0, 0.3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=FSDD)
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these variants (e.g. input_only)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = dataclasses.replace(
        SaShiMiConfig.preset("tiny"), d_model=32, n_layers=2, d_state=32, sample_rate=8000
    )
    spec = LabelSpec.parse(SPEC)
    clips = AudioFolder.scan(args.data / "train").load(8000)
    valid_clips = AudioFolder.scan(args.data / "valid").load(8000)
    labels = [spec.read(c.path) for c in clips]
    vocabulary = build_vocabulary(spec.fields, labels)
    valid_windows = cut_windows(valid_clips, args.seq_len)
    valid_tokens = encode_windows(valid_clips, valid_windows)
    valid_labels = [spec.read(c.path) for c in valid_clips]
    valid_rows = label_tensor(vocabulary, [valid_labels[w.clip] for w in valid_windows])
    labelled = dataclasses.replace(config, labels=vocabulary)

    variants = [  # (name, model, label dropout)
        ("every_block", lambda: SaShiMi(labelled), args.dropout),
        ("input_only", lambda: InputOnly(labelled), args.dropout),
        ("no_labels", lambda: SaShiMi(config), None),
        *(("every_block", lambda: SaShiMi(labelled), p) for p in args.dropouts),
    ]
    results = {}
    for name, build, dropout in variants:
        if args.only is not None and name not in args.only:
            continue
        torch.manual_seed(args.seed)  # the same initial weights and data order for every variant
        vocab = vocabulary if dropout is not None else {}
        key = name if dropout is None else f"{name}, label dropout {dropout}"
        results[key] = train_variant(
            build(), dropout, clips, labels, vocab, (valid_tokens, valid_rows), args
        )
        print(key, results[key], file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "what": "valid NLL (bits/sample) of FSDD valid at equal steps, by label path",
                "steps": args.steps,
                "batch": f"{args.batch_size} x {args.seq_len}, padding scored",
                "model": {k: v for k, v in config.to_dict().items() if k != "labels"},
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

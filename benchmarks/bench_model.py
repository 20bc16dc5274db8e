"""Benchmark the SaShiMi core: parameters, training step speed and peak memory, recurrent step speed.

Each measurement runs in a fresh subprocess so that its peak memory (max RSS) is its own.
Both parameterisations are measured in the same run, side by side.

    python benchmarks/bench_model.py                     # sc09, CPU, both kernels
    python benchmarks/bench_model.py --preset tiny --train-length 4096
"""

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sashimi import SaShiMi, SaShiMiConfig  # noqa: E402
from sashimi.model import nll_bits, shift_inputs  # noqa: E402

KERNELS = {
    "diagonal": {"kernel": "diagonal", "disc": "zoh"},
    "dplr": {"kernel": "dplr", "disc": "bilinear"},
}


def build(preset: str, kernel: str) -> SaShiMi:
    torch.manual_seed(0)
    return SaShiMi(dataclasses.replace(SaShiMiConfig.preset(preset), **KERNELS[kernel]))


def measure_training(preset: str, kernel: str, length: int, batch: int, repeats: int) -> dict:
    model = build(preset, kernel).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    targets = torch.randint(0, model.config.n_classes, (batch, length))
    inputs = shift_inputs(targets, model.start_token)
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        loss = nll_bits(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"step_s": median, "samples_per_s": batch * length / median}


@torch.inference_mode()
def measure_generation(preset: str, kernel: str, batch: int, steps: int, repeats: int) -> dict:
    model = build(preset, kernel).eval()
    generator = torch.Generator().manual_seed(0)
    rates = []
    for i in range(repeats + 1):
        state = model.initial_state(batch)
        token = torch.full((batch,), model.start_token)
        start = time.perf_counter()
        for _ in range(steps):
            logits, state = model.step(token, state)
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
        if i:
            rates.append(steps / (time.perf_counter() - start))
    return {"steps_per_s": statistics.median(rates)}


def child(args) -> None:
    if args.measure == "train":
        result = measure_training(
            args.preset, args.kernel, args.train_length, args.train_batch, args.repeats
        )
    else:
        result = measure_generation(args.preset, args.kernel, args.batch, args.steps, args.repeats)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))


def run_child(args, **overrides) -> dict:
    argv = [
        sys.executable,
        __file__,
        "--child",
        "--preset",
        args.preset,
        "--repeats",
        str(args.repeats),
        "--train-length",
        str(args.train_length),
        "--train-batch",
        str(args.train_batch),
        "--steps",
        str(args.steps),
    ]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="sc09")
    parser.add_argument("--kernels", default="diagonal,dplr")
    parser.add_argument("--train-length", type=int, default=16_000)
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--batches", default="1,16", help="generation batch sizes")
    parser.add_argument("--steps", type=int, default=512, help="recurrent steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="train", help=argparse.SUPPRESS)
    parser.add_argument("--kernel", default="diagonal", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    report = {
        "preset": args.preset,
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "kernels": {},
    }
    for kernel in args.kernels.split(","):
        entry = {"parameters": sum(p.numel() for p in build(args.preset, kernel).parameters())}
        entry["train"] = {
            "batch": args.train_batch,
            "length": args.train_length,
            **run_child(args, measure="train", kernel=kernel),
        }
        entry["generate"] = {
            b: run_child(args, measure="generate", kernel=kernel, batch=b)
            for b in args.batches.split(",")
        }
        report["kernels"][kernel] = entry
    report["reference_2core_cpu"] = {
        "train_samples_per_s": {"dplr": 255, "diagonal": 638},
        "train_peak_gib": {"dplr": 10.6, "diagonal": 6.0},
        "generate_steps_per_s": {"exact b1": 181, "exact b16": 74, "fast-inexact b1": 298},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

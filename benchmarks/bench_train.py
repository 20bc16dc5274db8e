"""Training throughput (audio samples per second) and peak memory of one training step on the CPU.

A step is what train/loop.py does: forward, NLL in bits, backward, gradient clipping, AdamW with
the S4 parameter groups. Each configuration runs in a fresh subprocess, so its peak resident memory
(ru_maxrss) is its own. The sc09 model at batch 1 x 16,000 is the figure to set beside the official
SaShiMi implementation (github.com/state-spaces/s4, `sashimi/` standalone, run the same way on the
same machine; the README quotes it); batch 1 x 4,000 in the same run is the baseline.

    python benchmarks/bench_train.py                   # prints one JSON object
    python benchmarks/bench_train.py --steps 5 --configs sc09:diagonal:1:16000
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

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sashimi import SaShiMi, SaShiMiConfig  # noqa: E402
from sashimi.model import nll_bits  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.loop import make_optimizer  # noqa: E402

DEFAULT_CONFIGS = [
    "sc09:diagonal:1:16000",
    "sc09:diagonal:1:16000:recompute",
    "sc09:dplr:1:16000",
    "sc09:diagonal:1:4000",
]
BASELINE = "sc09:diagonal:1:4000"


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def worker(spec: str, steps: int, warmup: int) -> dict:
    """Time `steps` training steps after `warmup` ones for one configuration, in this process."""
    preset, kernel, batch, L, *options = spec.split(":")  # options: "recompute"
    batch, L = int(batch), int(L)
    config = dataclasses.replace(SaShiMiConfig.preset(preset), kernel=kernel, disc=None)
    torch.manual_seed(0)
    model = SaShiMi(config).recompute_activations("recompute" in options)
    optimizer = make_optimizer(model, TrainConfig(data="-", out="-"))
    tokens = torch.randint(0, config.n_classes, (batch, L + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    rss_before = max_rss_gib()
    times = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        loss = nll_bits(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times[warmup:])
    return {
        "config": spec,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_s_median": round(step_s, 3),
        "step_s_min": round(min(times[warmup:]), 3),  # least disturbed by other processes
        "step_s_all": [round(t, 3) for t in times],
        "samples_per_s": round(batch * L / step_s, 1),
        "peak_rss_gib": round(max_rss_gib(), 3),
        "rss_before_steps_gib": round(rss_before, 3),  # interpreter, torch and the model
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=DEFAULT_CONFIGS,
        metavar="PRESET:KERNEL:BATCH:L",
        help="configurations to measure",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup)))
        return
    results = []
    for spec in dict.fromkeys([*args.configs, BASELINE]):  # the baseline once, last
        command = [
            sys.executable,
            __file__,
            "--worker",
            spec,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout))
        print(f"{spec}: {results[-1]['samples_per_s']} samples/s", file=sys.stderr)
    print(
        json.dumps(
            {
                "measured": "training step (forward, bits, backward, clip, AdamW), random tokens",
                "device": "cpu",
                "torch": torch.__version__,
                "threads": args.threads,
                "warmup_steps": args.warmup,
                "timed_steps": args.steps,
                "results": results,
                "baseline": BASELINE,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

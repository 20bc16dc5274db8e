"""Soak test: stream 10^6 steps from a `tiny` model and watch memory and finiteness as it goes.

Every --report-every steps it records the resident memory (VmRSS: a leak of even 100 bytes a step
would add 95 MiB over the run), the speed, and the amplitude of the last chunk. The stream itself
raises FloatingPointError if its logits stop being finite. Prints one JSON object at the end (and
one line per report on stderr while it runs).

    nohup python benchmarks/soak_generation.py > soak.json 2> soak.log &
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sashimi import SaShiMi, SaShiMiConfig  # noqa: E402
from sashimi.generate import Generator  # noqa: E402


def rss_mib() -> float:
    """Resident set size now (not the peak), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--report-every", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = Generator(SaShiMi(SaShiMiConfig.preset("tiny")), device="auto")
    reports = []
    started = last_time = time.perf_counter()
    done = last_done = 0
    stream = generator.stream(
        args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        chunk_size=args.report_every // 10,
        show_progress=False,
    )
    error = None
    try:
        for chunk in stream:
            done += chunk.shape[1]
            if not np.isfinite(chunk).all():
                raise FloatingPointError(f"non-finite audio after {done} steps")
            if done % args.report_every == 0 or done == args.steps:
                now = time.perf_counter()
                reports.append(
                    {
                        "steps": done,
                        "rss_mib": round(rss_mib(), 1),
                        "steps_per_s": round((done - last_done) / (now - last_time), 1),
                        "chunk_rms": round(float(np.sqrt(np.mean(chunk**2))), 4),
                        "chunk_distinct_values": int(len(np.unique(chunk))),
                    }
                )
                last_time, last_done = now, done
                print(json.dumps(reports[-1]), file=sys.stderr, flush=True)
    except FloatingPointError as failure:
        error = str(failure)
    rss = [r["rss_mib"] for r in reports]
    summary = {
        "soak": "generation",
        "preset": "tiny",
        "device": str(generator.device),
        "batch": args.batch_size,
        "steps_done": done,
        "finite": error is None,
        "error": error,
        "wall_s": round(time.perf_counter() - started, 1),
        "rss_mib_first_last_max": [rss[0], rss[-1], max(rss)] if rss else None,
        "reports": reports,
    }
    print(json.dumps(summary))
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark generation: steps/s and real-time factor of the engine, beside baselines in one run.

Measured, per device (CPU, and CUDA when present) and batch size:
  engine        Generator.generate: SaShiMi.step_ plus sampling, the path the CLI and the UI use;
  functional    the functional SaShiMi.step (new state every sample), same settings, no sampling;
  naive         recompute the convolution-mode forward over the whole context for every new
                sample (what a model without a recurrent mode does), at a short length;
and on the CPU, up to batch 16, the settings behind generate.fast_step_settings (threads, oneDNN)
for step_ alone, taking turns.
One step makes one sample of every clip in the batch, so audio samples/s = steps/s x batch, and
real_time_factor = steps/s / sample_rate (>= 1: each clip is made faster than it plays).
Medians over repeats after a warm-up. Each rate is given twice: per second of wall time, and per
second of this process's CPU time (all its threads), which other processes sharing the cores
slow down much less; the load average before and after is recorded. Prints one JSON object.

    python benchmarks/bench_generation.py                       # sc09, batch 1, 16, 64
    python benchmarks/bench_generation.py --preset tiny --batch-sizes 1 --profile
"""

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sashimi import SaShiMi, SaShiMiConfig  # noqa: E402
from sashimi.generate import Generator, fast_step_settings  # noqa: E402

# The reference SaShiMi on a 2-core CPU like ours (/work/shared/REFERENCE_NOTES.md), steps/s.
REFERENCE_CPU = {"fast_inexact": {"1": 298, "16": 107}, "exact": {"1": 181, "16": 74}}
TARGET_CPU = {"1": 1500, "16": 1000}


def median_rates(runs: dict, steps: int, repeats: int) -> dict:
    """Steps/s of each run() in `runs` (each makes `steps` steps), medians over repeats after one
    warm-up each: {name: {"wall": per wall-clock second, "cpu": per second of process CPU time}}.
    The runs take turns within every repeat, so a change in machine load hits all of them alike."""
    for run in runs.values():
        run()
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "wall": round(steps / statistics.median(wall[name]), 1),
            "cpu": round(steps / statistics.median(cpu[name]), 1),
        }
        for name in runs
    }


def median_rate(run, steps: int, repeats: int) -> dict:
    return median_rates({"run": run}, steps, repeats)["run"]


def engine_rate(generator: Generator, batch: int, steps: int, repeats: int) -> dict:
    return median_rate(
        lambda: generator.generate(steps, batch_size=batch, show_progress=False), steps, repeats
    )


def step_loop(model: SaShiMi, batch: int, steps: int, in_place: bool, settings):
    """A run of `steps` model.step_ (in place) or model.step (functional) calls, no sampling."""
    device = model.head.weight.device
    token = torch.full((batch,), model.start_token, device=device)

    def run():
        with settings():
            state = model.initial_state(batch)
            for _ in range(steps):
                if in_place:
                    model.step_(token, state)
                else:
                    _, state = model.step(token, state)
            if device.type == "cuda":
                torch.cuda.synchronize()

    return run


def naive_rate(model: SaShiMi, batch: int, length: int, repeats: int, settings) -> dict:
    """Steps/s of greedy decoding by rerunning model(tokens) over the growing context, for `length`
    samples (each forward padded to a multiple of total_pool)."""
    q = model.config.total_pool
    device = model.head.weight.device

    def run():
        with settings():
            tokens = torch.full((batch, 1), model.start_token, device=device)
            for _ in range(length):
                L = tokens.shape[1]
                padded = torch.nn.functional.pad(tokens, (0, -L % q), value=model.start_token)
                tokens = torch.cat([tokens, model(padded)[:, L - 1].argmax(-1, keepdim=True)], 1)

    return median_rate(run, length, repeats)


@contextlib.contextmanager
def cpu_settings(threads: int, onednn: bool):
    """Inference mode with a chosen thread count and oneDNN switch (restored on exit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with (
            torch.inference_mode(),
            torch.backends.mkldnn.flags(
                enabled=onednn, deterministic=None, allow_tf32=None, fp32_precision=None
            ),
        ):
            yield
    finally:
        torch.set_num_threads(before)


def profile_step(model: SaShiMi, batch: int, steps: int) -> dict:
    """Where a step_ spends its time: aten ops by self CPU time, and the share left to Python."""
    from torch.profiler import ProfilerActivity, profile

    token = torch.full((batch,), model.start_token)
    with fast_step_settings(torch.device("cpu")):
        state = model.initial_state(batch)
        for _ in range(steps):  # warm-up
            model.step_(token, state)
        start = time.perf_counter()
        for _ in range(steps):
            model.step_(token, state)
        plain_us = (time.perf_counter() - start) / steps * 1e6
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                model.step_(token, state)
    events = prof.key_averages()
    self_us = sum(e.self_cpu_time_total for e in events) / steps
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "batch": batch,
        "us_per_step_unprofiled": round(plain_us, 1),
        "aten_calls_per_step": round(sum(e.count for e in events) / steps, 1),
        "aten_self_us_per_step": round(self_us, 1),
        "top_ops": [
            {
                "op": e.key,
                "calls_per_step": round(e.count / steps, 2),
                "self_us_per_step": round(e.self_cpu_time_total / steps, 1),
            }
            for e in top
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--preset", default="sc09", help="SaShiMiConfig preset (random weights)")
    parser.add_argument("--batch-sizes", metavar="B", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--seconds",
        metavar="S",
        type=float,
        default=2.0,
        help="target time per measurement; sets how many steps each repeat makes",
    )
    parser.add_argument("--repeats", metavar="R", type=int, default=3)
    parser.add_argument(
        "--naive-length",
        metavar="L",
        type=int,
        default=64,
        help="samples the naive baseline decodes (its cost grows with L squared)",
    )
    parser.add_argument(
        "--devices",
        nargs="+",
        default=None,
        help="devices to measure (default: cpu, plus cuda when present)",
    )
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown")
    args = parser.parse_args(argv)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    torch.manual_seed(0)
    config = SaShiMiConfig.preset(args.preset)
    report = {
        "benchmark": "generation",
        "preset": args.preset,
        "sample_rate": config.sample_rate,
        "torch": torch.__version__,
        "threads_available": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "reference_cpu_steps_per_s": REFERENCE_CPU,
        "target_cpu_steps_per_s": TARGET_CPU,
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "results": [],
    }
    for device in devices:
        generator = Generator(SaShiMi(config), device=device)
        model = generator.model
        settings = functools.partial(fast_step_settings, generator.device)
        for batch in args.batch_sizes:
            # size a repeat from a quick probe so that each measurement takes about --seconds
            probe = engine_rate(generator, batch, 2 * config.total_pool, 1)["wall"]
            periods = max(1, round(probe * args.seconds / config.total_pool))
            steps = periods * config.total_pool
            engine = engine_rate(generator, batch, steps, args.repeats)
            naive = naive_rate(model, batch, args.naive_length, args.repeats, settings)
            row = {
                "device": device,
                "batch": batch,
                "steps_per_repeat": steps,
                "engine_steps_per_s": engine,
                "real_time_factor": {
                    k: round(v / config.sample_rate, 4) for k, v in engine.items()
                },
                "audio_samples_per_s": {k: round(v * batch) for k, v in engine.items()},
                "functional_step_steps_per_s": median_rate(
                    step_loop(model, batch, steps // 4, False, settings), steps // 4, args.repeats
                ),
                "naive_steps_per_s": naive,
                "engine_over_naive": {k: round(engine[k] / naive[k], 1) for k in engine},
            }
            if device == "cpu" and batch <= 16:  # two threads crawl at batch 64 (1-2 steps/s)
                settings_runs = {
                    f"threads={threads},onednn={onednn}": step_loop(
                        model,
                        batch,
                        steps // 4,
                        True,
                        functools.partial(cpu_settings, threads, onednn),
                    )
                    for threads, onednn in [(1, False), (2, False), (1, True)]
                }
                row["step_only_steps_per_s"] = median_rates(
                    settings_runs, steps // 4, 2 * args.repeats
                )
            report["results"].append(row)
            print(json.dumps(row), file=sys.stderr)  # progress while the rest runs
        if device == "cpu" and args.profile:
            report["profile_cpu"] = [profile_step(model, batch, 200) for batch in args.batch_sizes]
    report["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark generation: steps/s and real-time factor of the engine, beside baselines in one run.

Measured, per device (CPU, and CUDA when present) and batch size:
  engine        Generator.generate, the path the CLI and the UI use: on the CPU the fused step
                (sashimi/fast_step/fused.py: the whole step and its sampling in one compiled
                routine);
  torch_engine  the same with Generator.fused = False: TorchStep (SaShiMi.step) plus Sampler,
                the engine on CUDA (there with its CUDA graph);
  functional    SaShiMi.step alone (a new state every sample), same settings, no sampling;
  fused split   on the CPU from batch 2: one FusedStep against SplitFusedStep (two groups of
                clips stepped at once on two threads), the choice behind fast_step.SPLIT_MIN_CLIPS;
  naive         recompute the convolution-mode forward over the whole context for every new
                sample (what a model without a recurrent mode does), at a short length;
and on the CPU, up to batch 16, the settings behind fast_step.step_settings (threads, oneDNN)
for SaShiMi.step alone, taking turns. Next to the rates: the arithmetic of one step (multiply-adds per
clip, weight and state bytes it touches, as averages over the multi-rate schedule) and the rate
of multiply-adds the engine reaches; with --compile, what the fused step's numba compile costs
the first time (empty cache) and after (cache on disk), each in a fresh process.
One step makes one sample of every clip in the batch, so audio samples/s = steps/s x batch, and
real_time_factor = steps/s / sample_rate (>= 1: each clip is made faster than it plays).
Medians over repeats after a warm-up. Each rate is given twice: per second of wall time, and per
second of this process's CPU time (all its threads), which other processes sharing the cores
slow down much less; the load average before and after is recorded. Prints one JSON object.

    python benchmarks/bench_generation.py                       # sc09, batch 1, 16, 64
    python benchmarks/bench_generation.py --checkpoint checkpoints/fsdd --batch-sizes 1 16 --compile
    python benchmarks/bench_generation.py --preset tiny --batch-sizes 1 --profile
"""

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sashimi import SaShiMi, SaShiMiConfig  # noqa: E402
from sashimi.checkpoint import load_checkpoint  # noqa: E402
from sashimi.fast_step import FusedStep, SplitFusedStep, step_settings  # noqa: E402
from sashimi.generate import Generator, Sampler  # noqa: E402
from sashimi.model import Stack  # noqa: E402

TARGET_CPU = {"1": 1500, "16": 1000}
# Issue 11, one core: the shipped model (checkpoints/fsdd) at batch 1, sc09 at batch 1 and 16.
TARGET_FUSED_CPU = {"checkpoints/fsdd": {"1": 24_000}, "sc09": {"1": 4_000, "16": 1_000}}


def median_rates(runs: dict, repeats: int) -> dict:
    """Steps/s of each run in `runs`, {name: (run, steps it makes)}, medians over repeats after one
    warm-up each: {name: {"wall": per wall-clock second, "cpu": per second of process CPU time}}.
    The runs take turns within every repeat, so a change in machine load hits all of them alike."""
    for run, _ in runs.values():
        run()
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run, _) in runs.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "wall": round(steps / statistics.median(wall[name]), 1),
            "cpu": round(steps / statistics.median(cpu[name]), 1),
        }
        for name, (_, steps) in runs.items()
    }


def median_rate(run, steps: int, repeats: int) -> dict:
    return median_rates({"run": (run, steps)}, repeats)["run"]


def engine_run(generator: Generator, batch: int, steps: int):
    return lambda: generator.generate(steps, batch_size=batch, show_progress=False)


def steps_for(generator: Generator, batch: int, seconds: float, min_audio: float) -> int:
    """Steps (whole periods of the schedule) that take the engine about `seconds` of CPU time,
    from a probe, and make at least `min_audio` seconds of audio, so that the fixed cost of a
    call (the state; for the fused step, packing the weights) weighs as it does in a clip."""
    period = generator.config.total_pool
    probe = median_rate(engine_run(generator, batch, 2 * period), 2 * period, 1)["cpu"]
    steps = max(probe * seconds, min_audio * generator.config.sample_rate)
    return max(1, round(steps / period)) * period


# Multiply-adds per mode and channel of one SSM step (real arithmetic on the stored half):
# diagonal  A_bar x 4, B_bar u 2, Re(C x) 2;
# DPLR      P^H x 2, Lambda x 4, P (P^H x) 2, dt B u 2, dt/2 (...) 2, E v 4, P^H E v 2,
#           EP_scaled (P^H E v) 2, Re(C x) 2.
SSM_MULTIPLY_ADDS = {"diagonal": 8, "dplr": 22}
SSM_PLANES = {"diagonal": 6, "dplr": 10}  # (N/2, H) float planes the fused step keeps per layer


def arithmetic(model: SaShiMi) -> dict:
    """The work of one step of one clip, averaged over the schedule (tier i steps once every
    prod(pool[:i]) samples): multiply-adds of the linears and SSM recurrences (norms, GELU and
    GLU are a few per channel more), the float32 weight bytes the fused step reads, and the
    bytes of SSM state it reads and writes back."""
    cfg = model.config
    half_N = cfg.d_state // 2
    macs = weight_floats = state_floats = 0.0

    def linear(module: torch.nn.Linear, every: int) -> None:
        nonlocal macs, weight_floats
        macs += module.in_features * module.out_features / every
        weight_floats += (module.in_features + 1) * module.out_features / every

    def stack(s: Stack, H: int, every: int) -> None:
        nonlocal macs, weight_floats, state_floats
        for s4_block, ff_block in zip(s.s4_blocks, s.ff_blocks, strict=True):
            for module in (
                s4_block.layer.output_linear,
                ff_block.layer.net[0],
                ff_block.layer.net[-1],
            ):
                linear(module, every)
            macs += SSM_MULTIPLY_ADDS[cfg.kernel] * H * half_N / every
            weight_floats += (SSM_PLANES[cfg.kernel] * half_N + 5) * H / every  # + D, two norms
            state_floats += 2 * 2 * H * half_N / every  # x as real and imaginary planes, in and out

    every = 1
    for i, (down, up, s) in enumerate(
        zip(model.down_pools, model.up_pools, model.up_stacks, strict=True)
    ):
        stack(s, s.s4_blocks[0].norm.normalized_shape[0], every)
        every *= cfg.pool[i]
        linear(down.linear, every)
        linear(up.linear, every)
    stack(model.center, model.center.s4_blocks[0].norm.normalized_shape[0], every)
    linear(model.head, 1)
    return {
        "multiply_adds_per_clip": round(macs),
        "weight_bytes_per_step": round(4 * weight_floats),
        "state_bytes_per_clip": round(4 * state_floats),
    }


COMPILE_SCRIPT = """
import json, time
import torch
from sashimi import SaShiMi, SaShiMiConfig
from sashimi.fast_step import FusedStep
from sashimi.generate import Sampler
model = SaShiMi(SaShiMiConfig.preset("tiny")).eval()
start_wall, start_cpu = time.perf_counter(), time.process_time()
with torch.no_grad():
    step = FusedStep(model, model.initial_state(1), 1)
    logits = step(torch.tensor([model.start_token]))
    sampler = Sampler(1, model.config.n_classes, 16, torch.device("cpu"), 0)
    sampler.draw_noise(16)
    step.run(16, logits, sampler, torch.empty(1, 16, dtype=torch.long))
print(json.dumps({"wall": time.perf_counter() - start_wall, "cpu": time.process_time() - start_cpu}))
"""


def compile_cost() -> dict:
    """Seconds a fresh process takes from a built model to its first fused steps (one plain, one
    period with sampling): with an empty numba cache (the first use on a machine), then with the
    cache that run left (every later use). One compile serves every model (fast_step/fused.py)."""
    cost = {}
    with tempfile.TemporaryDirectory() as cache:
        for name in ("first_use_s", "cached_s"):
            result = subprocess.run(
                [sys.executable, "-c", COMPILE_SCRIPT],
                env={**os.environ, "NUMBA_CACHE_DIR": cache},
                cwd=Path(__file__).resolve().parent.parent,
                capture_output=True,
                text=True,
                check=True,
            )
            cost[name] = {k: round(v, 2) for k, v in json.loads(result.stdout).items()}
    return cost


def step_loop(model: SaShiMi, batch: int, steps: int, settings):
    """A run of `steps` model.step calls, no sampling."""
    device = model.head.weight.device
    token = torch.full((batch,), model.start_token, device=device)

    def run():
        with settings():
            state = model.initial_state(batch)
            for _ in range(steps):
                _, state = model.step(token, state)
            if device.type == "cuda":
                torch.cuda.synchronize()

    return run


def fused_loop(model: SaShiMi, batch: int, steps: int, split: bool):
    """`steps` (whole periods) of one FusedStep over the batch, or of SplitFusedStep's two groups
    stepped at once, with sampling, from the start token: what fast_step.fused_step picks between."""
    period = model.config.total_pool

    def run():
        with torch.inference_mode():
            step = (SplitFusedStep if split else FusedStep)(
                model, model.initial_state(batch), batch
            )
            sampler = Sampler(batch, model.config.n_classes, period, torch.device("cpu"), 0)
            logits = step(torch.full((batch,), model.start_token))
            out = torch.empty(batch, period, dtype=torch.long)
            for _ in range(steps // period):
                sampler.draw_noise(period)
                logits = step.run(period, logits, sampler, out)

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
    """Where a torch step spends its time: aten ops by self CPU time, and the share left to Python."""
    from torch.profiler import ProfilerActivity, profile

    token = torch.full((batch,), model.start_token)
    with step_settings(torch.device("cpu")):
        state = model.initial_state(batch)
        for _ in range(steps):  # warm-up
            _, state = model.step(token, state)
        start = time.perf_counter()
        for _ in range(steps):
            _, state = model.step(token, state)
        plain_us = (time.perf_counter() - start) / steps * 1e6
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                _, state = model.step(token, state)
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
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        default=None,
        help="measure this checkpoint (e.g. checkpoints/fsdd, the shipped model) instead",
    )
    parser.add_argument("--batch-sizes", metavar="B", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--seconds",
        metavar="S",
        type=float,
        default=2.0,
        help="target CPU time per measurement; sets how many steps each repeat makes",
    )
    parser.add_argument(
        "--min-audio",
        metavar="S",
        type=float,
        default=0.5,
        help="seconds of audio each engine run makes at least",
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
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add the fused step's compile cost: first use (empty cache) and cached, in new processes",
    )
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown")
    args = parser.parse_args(argv)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
        name = args.checkpoint
    else:
        torch.manual_seed(0)
        model = SaShiMi(SaShiMiConfig.preset(args.preset))
        name = args.preset
    config = model.config
    work = arithmetic(model)
    report = {
        "benchmark": "generation",
        "model": name,
        "kernel": config.kernel,
        "d_model": config.d_model,
        "n_layers": config.n_layers,
        "pool": config.pool,
        "d_state": config.d_state,
        "sample_rate": config.sample_rate,
        "torch": torch.__version__,
        "threads_available": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "arithmetic_per_step": work,
        "target_cpu_steps_per_s": TARGET_FUSED_CPU.get(name, TARGET_CPU),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "results": [],
    }
    if args.compile:
        report["fused_compile"] = compile_cost()
    for device in devices:
        engine = Generator(model, device=device)
        torch_engine = Generator(model, device=device)
        torch_engine.fused = False
        settings = functools.partial(step_settings, engine.device)
        for batch in args.batch_sizes:
            # size each repeat from a quick probe so that each measurement takes about --seconds
            steps = {"engine": steps_for(engine, batch, args.seconds, args.min_audio)}
            runs = {"engine": (engine_run(engine, batch, steps["engine"]), steps["engine"])}
            if engine.fused:
                steps["torch_engine"] = steps_for(torch_engine, batch, args.seconds, args.min_audio)
                runs["torch_engine"] = (
                    engine_run(torch_engine, batch, steps["torch_engine"]),
                    steps["torch_engine"],
                )
            steps["functional"] = max(1, steps.get("torch_engine", steps["engine"]) // 4)
            runs["functional"] = (
                step_loop(model, batch, steps["functional"], settings),
                steps["functional"],
            )
            rates = median_rates(runs, args.repeats)
            engine_rate = rates["engine"]
            naive = naive_rate(model, batch, args.naive_length, args.repeats, settings)

            def over(baseline: dict, rate=engine_rate) -> dict:
                return {k: round(rate[k] / baseline[k], 1) for k in rate}

            row = {
                "device": device,
                "batch": batch,
                "engine_step": "fused" if engine.fused else "torch",
                "steps_per_repeat": steps,
                "engine_steps_per_s": engine_rate,
                "real_time_factor": {
                    k: round(v / config.sample_rate, 4) for k, v in engine_rate.items()
                },
                "audio_samples_per_s": {k: round(v * batch) for k, v in engine_rate.items()},
                "engine_multiply_adds_per_s": {
                    k: f"{v * batch * work['multiply_adds_per_clip'] / 1e9:.2f} G"
                    for k, v in engine_rate.items()
                },
            }
            if engine.fused:
                row["torch_engine_steps_per_s"] = rates["torch_engine"]
                row["engine_over_torch_engine"] = over(rates["torch_engine"])
            row |= {
                "functional_step_steps_per_s": rates["functional"],
                "engine_over_functional_step": over(rates["functional"]),
                "naive_steps_per_s": naive,
                "engine_over_naive": over(naive),
            }
            if engine.fused and batch > 1:
                n = steps["engine"]
                split = median_rates(
                    {
                        "one_group": (fused_loop(model, batch, n, False), n),
                        "split": (fused_loop(model, batch, n, True), n),
                    },
                    args.repeats,
                )
                row["fused_one_group_steps_per_s"] = split["one_group"]
                row["fused_split_steps_per_s"] = split["split"]
                row["split_over_one_group"] = over(split["one_group"], split["split"])
            if device == "cpu" and batch <= 16:  # two threads crawl at batch 64 (1-2 steps/s)
                n = steps["functional"]
                settings_runs = {
                    f"threads={threads},onednn={onednn}": (
                        step_loop(
                            model, batch, n, functools.partial(cpu_settings, threads, onednn)
                        ),
                        n,
                    )
                    for threads, onednn in [(1, False), (2, False), (1, True)]
                }
                row["step_only_steps_per_s"] = median_rates(settings_runs, 2 * args.repeats)
            report["results"].append(row)
            print(json.dumps(row), file=sys.stderr)  # progress while the rest runs
        if device == "cpu" and args.profile:
            report["profile_cpu"] = [
                profile_step(engine.model, batch, 200) for batch in args.batch_sizes
            ]
    report["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m sashimi.render`: generate clips with a trained model, write them as WAV + PNG files.

Each clip i is written as sample_{i:03d}_seed{seed + i}.wav (16-bit PCM at the model's sample rate;
with --label, the labels follow: sample_000_seed0_digit-7.wav) with a waveform-and-spectrogram
picture beside it. Clip i draws its randomness from seed + i, so
`--seed 1237 --num 1` draws clip 3 of a `--seed 1234` run again. With --prompt, each file holds the
prompt followed by its continuation, and the picture marks where the prompt ends.
stdout gets one JSON line summarising the run: the files, each clip's bits per sample and, when
guided, label evidence, and the files best first as the web UI ranks them (sashimi/ranking.py);
progress goes to stderr.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .audio import load_audio, write_wav
from .checkpoint import DEFAULT_CHECKPOINT
from .cli import Parser, add_device_argument
from .generate import Generator, check_sampling
from .guidance import DEFAULT_GUIDANCE, Guidance
from .labels import Labels, labels_slug, parse_assignments
from .plots import write_clip_picture
from .ranking import best_first, bits_and_evidence

EXAMPLES = """examples:
  python -m sashimi.render --num 4 --seconds 2 --out samples/
  python -m sashimi.render --label digit=7 --label speaker=nicolas --out sevens/
  python -m sashimi.render --label digit=7 --guidance 3 --guidance-seconds inf --out sevens/
  python -m sashimi.render --checkpoint runs/piano/best --prompt intro.wav --seconds 10 --out cont/
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m sashimi.render",
        description="Generate audio clips with a trained SaShiMi model and write them as 16-bit "
        "WAV files, each with a waveform and spectrogram PNG.",
        epilog=EXAMPLES,
    )
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        type=Path,
        default=DEFAULT_CHECKPOINT,
        help="checkpoint folder (config.json + model.safetensors)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        required=True,
        help="folder for the WAV and PNG files (created if missing)",
    )
    parser.add_argument("--num", metavar="N", type=int, default=4, help="number of clips")
    parser.add_argument(
        "--seconds",
        metavar="S",
        type=float,
        default=2.0,
        help="length of each generated clip in seconds (after the prompt, if any)",
    )
    parser.add_argument(
        "--batch-size",
        metavar="B",
        type=int,
        default=4,
        help="clips generated at once; larger is faster per clip, up to memory",
    )
    parser.add_argument(
        "--temperature",
        metavar="T",
        type=float,
        default=1.0,
        help="softmax temperature; below 1 is more conservative, 0 is greedy",
    )
    parser.add_argument(
        "--top-p",
        metavar="P",
        type=float,
        default=1.0,
        help="nucleus sampling: draw only from the most likely classes holding "
        "this much probability (1 = off)",
    )
    parser.add_argument(
        "--top-k",
        metavar="K",
        type=int,
        default=0,
        help="draw only from the K most likely classes (0 = off)",
    )
    parser.add_argument(
        "--seed",
        metavar="SEED",
        type=int,
        default=0,
        help="random seed of the first clip; clip i uses seed + i",
    )
    parser.add_argument(
        "--prompt",
        metavar="FILE",
        type=Path,
        default=None,
        help="audio file to continue (any format soundfile reads; resampled to "
        "the model's rate and mixed to mono)",
    )
    parser.add_argument(
        "--label",
        metavar="FIELD=VALUE",
        action="append",
        default=[],
        help="ask a labelled checkpoint for this label, e.g. digit=7 (repeatable; fields left "
        "out are left open)",
    )
    parser.add_argument(
        "--guidance",
        metavar="W",
        type=float,
        default=None,
        help="classifier-free guidance weight at the start of each clip: 1 = none, larger = "
        f"closer to the labels (default: {DEFAULT_GUIDANCE.weight:g} with --label, else 1)",
    )
    parser.add_argument(
        "--guidance-seconds",
        metavar="S",
        type=float,
        default=None,
        help="seconds of new audio that --guidance holds for; inf: all along "
        f"(default: {DEFAULT_GUIDANCE.seconds:g})",
    )
    parser.add_argument(
        "--guidance-after",
        metavar="W",
        type=float,
        default=None,
        help=f"guidance weight after those seconds (default: {DEFAULT_GUIDANCE.after:g}, or "
        "--guidance where that is lower)",
    )
    add_device_argument(parser, default="auto")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject values argparse's types let through, with the fix in the message."""
    if not args.seconds > 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    if args.num < 1:
        parser.error(f"--num must be at least 1, got {args.num}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; pass a folder (it is created if missing)")


def sampling_request(
    args: argparse.Namespace, generator: Generator
) -> tuple[np.ndarray | None, int, Labels, dict]:
    """The prompt (at the model's rate), samples per clip, labels and sampling settings the flags
    ask for, checked: a bad value raises ValueError or FileNotFoundError saying which."""
    sample_rate = generator.sample_rate
    prompt = None if args.prompt is None else load_audio(args.prompt, sample_rate)
    num_samples = round(args.seconds * sample_rate)
    if num_samples < 1:
        raise ValueError(f"--seconds {args.seconds} is less than one sample at {sample_rate} Hz")
    labels = parse_assignments(args.label)
    generator.label_rows(labels, 1)  # an unknown field or value: the error names the known
    weight = args.guidance
    if weight is None:
        weight = DEFAULT_GUIDANCE.weight if labels else 1.0
    guidance = Guidance.easing(weight, args.guidance_seconds, args.guidance_after)
    sampling = dict(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, guidance=guidance
    )
    check_sampling(num_samples, batch_size=args.batch_size, **sampling)
    return prompt, num_samples, labels, sampling


def write_clip(
    folder: Path,
    stem: str,
    audio: np.ndarray,
    sample_rate: int,
    prompt_end: float | None,
    title: str,
) -> tuple[Path, Path]:
    """stem.wav (16-bit PCM) and stem.png (waveform and spectrogram) in folder."""
    wav = write_wav(folder / f"{stem}.wav", audio, sample_rate)
    return wav, write_clip_picture(wav, audio, sample_rate, prompt_end, title)


def render_clips(
    args: argparse.Namespace,
    generator: Generator,
    prompt: np.ndarray | None,
    num_samples: int,
    labels: Labels,
    sampling: dict,
) -> tuple[list[str], list[str], float, np.ndarray]:
    """Sample args.num clips, args.batch_size at a time, and write each as WAV + PNG in args.out.

    Returns (the WAV files, the PNG files, seconds spent sampling without the file writing, each
    clip's log-probabilities summed while sampling (1 or 2, clips), as sashimi/ranking.py takes
    them).
    """
    sample_rate = generator.sample_rate
    prompt_end = None if prompt is None else len(prompt) / sample_rate  # seconds
    files, pictures, log_probs = [], [], []
    generating = 0.0
    with tqdm(total=args.num * num_samples, unit="sample", unit_scale=True, file=sys.stderr) as bar:
        for first in range(0, args.num, args.batch_size):
            batch = min(args.batch_size, args.num - first)
            chunks, batch_started = [], time.perf_counter()
            sums = 0.0
            for chunk, scores in generator.stream(
                num_samples,
                batch_size=batch,
                seed=args.seed + first,
                prompt=prompt,
                show_progress=False,
                labels=labels or None,
                log_probs=True,
                **sampling,
            ):
                chunks.append(chunk)
                sums = sums + scores.sum(1)  # (batch) or guided (2 batch)
                bar.update(chunk.size)
            generating += time.perf_counter() - batch_started
            log_probs.append(sums.reshape(-1, batch))
            for index, clip in enumerate(np.concatenate(chunks, axis=1), start=first):
                audio = clip if prompt is None else np.concatenate([prompt, clip])
                stem = f"sample_{index:03d}_seed{args.seed + index}"
                stem += f"_{labels_slug(labels)}" if labels else ""
                title = f"{stem} ({args.checkpoint.name})"
                wav, png = write_clip(args.out, stem, audio, sample_rate, prompt_end, title)
                files.append(str(wav))
                pictures.append(str(png))
    return files, pictures, generating, np.concatenate(log_probs, axis=1)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns 0 on success, exits 2 with one line on a user error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    try:
        generator = Generator.from_checkpoint(args.checkpoint, device=args.device)
        prompt, num_samples, labels, sampling = sampling_request(args, generator)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))

    started = time.perf_counter()
    files, pictures, generating, log_probs = render_clips(
        args, generator, prompt, num_samples, labels, sampling
    )
    bits, evidence = bits_and_evidence(log_probs, num_samples, asked=bool(labels))
    sample_rate = generator.sample_rate
    generated = args.num * num_samples / sample_rate  # seconds of new audio, all clips
    summary = {
        "files": files,
        "spectrograms": pictures,
        "clips": args.num,
        "seconds_per_clip": num_samples / sample_rate,
        "prompt_seconds": 0.0 if prompt is None else len(prompt) / sample_rate,
        "audio_seconds": generated,
        "sample_rate": sample_rate,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "generation_seconds": round(generating, 3),
        "real_time_factor": round(generated / generating, 4),  # > 1: faster than real time
        "device": str(generator.device),
        "checkpoint": str(args.checkpoint),
        "labels": labels,
        "guidance": sampling["guidance"].as_dict(),
        # per file, of the new samples (given the prompt); ranked as the web UI ranks them
        "bits_per_sample": [round(float(b), 4) for b in bits],
        "label_evidence": None if evidence is None else [round(float(e), 4) for e in evidence],
        "best_first": [files[i] for i in best_first(bits, evidence)],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

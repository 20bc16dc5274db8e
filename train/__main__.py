"""`python -m train`: train a SaShiMi model on a folder of audio (train/loop.py: the run folder).

Settings come from, in increasing precedence: the --preset, a --config JSON file shaped like the
configuration printed at the start of every run ({"model": {...}, "train": {...}}), then flags.
stdout gets one JSON line at the end; progress and logs go to stderr.
"""

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from sashimi.audio import QUANTIZATIONS
from sashimi.checkpoint import DiskFullError, load_checkpoint, resolve_save
from sashimi.cli import Parser, add_device_argument
from sashimi.config import KERNELS, PRESETS, SaShiMiConfig

from .config import TrainConfig
from .loop import resume_configs, train

FIELDS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
EXAMPLES = """examples:
  python -m train --data data/fsdd/train --valid-data data/fsdd/valid --out runs/fsdd
  python -m train --data my_sounds/ --out runs/mine --preset tiny --steps 2000 --device cpu
  torchrun --nproc_per_node=4 -m train --data my_sounds/ --out runs/big --batch-size 8
  python -m train --out runs/fsdd --resume --steps 40000
"""

# flags that set a SaShiMiConfig field; flags left out keep the lower-precedence value
MODEL_FLAGS = ("sample_rate", "quantization", "d_model", "n_layers", "d_state", "kernel", "dropout")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m train",
        description="Train a SaShiMi raw-audio model on a folder of sound files (wav, flac, ogg, "
        "mp3; any rate and channel count). Writes checkpoints, samples and metrics into --out.",
        epilog=EXAMPLES,
        argument_default=argparse.SUPPRESS,  # absent flags stay absent: see the precedence above
    )
    add_data_flags(parser.add_argument_group("data"))
    add_model_flags(parser.add_argument_group("model"))
    add_training_flags(parser.add_argument_group("training"))
    return parser


def add(group, flag: str, metavar: str, kind: type, help: str, **kwargs) -> None:
    """A flag with a value; a TrainConfig field's default is shown in its help."""
    default = FIELDS.get(kwargs.get("dest", flag.removeprefix("--").replace("-", "_")))
    if default not in (None, dataclasses.MISSING):
        help = f"{help} (default: {default})"
    group.add_argument(flag, metavar=metavar, type=kind, help=help, **kwargs)


def add_data_flags(data) -> None:
    """Where the audio is and how it becomes windows and labels. Past 60 lines, but a flat list
    of declarations, one flag each: nothing in it needs following."""
    add(data, "--data", "DIR", str, "folder of training audio, searched recursively")
    add(data, "--out", "DIR", str, "run folder for checkpoints, samples and metrics", required=True)
    add(
        data,
        "--valid-data",
        "DIR",
        str,
        "folder of validation audio; without it, a share of --data",
    )
    add(
        data,
        "--valid-fraction",
        "F",
        float,
        "share of --data files held out for validation, chosen "
        "by a hash of each path (stable when files are added)",
    )
    data.add_argument(
        "--exclude",
        metavar="GLOB",
        action="append",
        help="leave out files whose path under the data folders matches, e.g. "
        "'*_yweweler_*' (repeatable)",
    )
    add(
        data,
        "--seq-len",
        "L",
        int,
        "samples per training window (a multiple of the model's total "
        "pooling); longer files are cut, shorter ones padded",
    )
    add(
        data,
        "--min-seconds",
        "S",
        float,
        "skip files shorter than this; set it to the window length "
        "to skip rather than pad short files",
    )
    add(
        data,
        "--gain-augment",
        "DB",
        float,
        "scale each training window by a random gain within +-DB decibels",
        dest="gain_db",
    )
    add(
        data,
        "--labels",
        "SPEC",
        str,
        "condition on labels read from each file's path under --data: 'folder' (its first "
        "folder is field 'class'), or a regex whose named groups are fields, e.g. "
        r"'(?P<digit>\d)_(?P<speaker>[a-z]+)_'",
    )
    add(
        data,
        "--label-dropout",
        "P",
        float,
        "probability that a field of a window is made unknown, so the model also learns "
        "without it (and can be guided)",
    )
    data.add_argument(
        "--score-padding",
        action="store_true",
        default=argparse.SUPPRESS,
        help="score the silence padded after each file's end, so the model learns where "
        "sounds stop (for short clips such as spoken words)",
    )


def add_model_flags(model) -> None:
    """The preset, a --config file, and the SaShiMiConfig fields a flag may set (MODEL_FLAGS)."""
    model.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="model size to start from (default: sc09, the paper's 4.7 M parameters)",
    )
    model.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help='JSON file {"model": {...}, "train": {...}} overriding the preset',
    )
    add(
        model,
        "--sample-rate",
        "HZ",
        int,
        "rate to train at (default: the most common rate of the files)",
    )
    model.add_argument(
        "--quantization", choices=QUANTIZATIONS, help="how samples become classes (default: mu-law)"
    )
    add(model, "--d-model", "H", int, "width of the outer tier (default: from the preset)")
    add(
        model, "--n-layers", "N", int, "S4 + feed-forward pairs per tier (default: from the preset)"
    )
    add(model, "--d-state", "N", int, "S4 state size (default: from the preset)")
    model.add_argument(
        "--kernel",
        choices=KERNELS,
        help="S4 kernel: diagonal (S4D) or dplr (S4; uses bilinear discretisation)",
    )
    add(model, "--dropout", "P", float, "dropout probability (default: from the preset)")


def add_training_flags(loop) -> None:
    """The TrainConfig fields of the loop, --init and --resume."""
    add(loop, "--steps", "N", int, "optimiser steps in all (a resumed run counts from its start)")
    add(loop, "--batch-size", "B", int, "windows per step and process")
    add(loop, "--lr", "LR", float, "peak learning rate; S4's dt, A, B use at most 1e-3")
    add(loop, "--weight-decay", "WD", float, "AdamW weight decay (not on dt, A, B)")
    add(loop, "--warmup", "N", int, "steps of linear warmup before the cosine decay")
    add(loop, "--grad-clip", "NORM", float, "clip the gradient norm to this (0: off)")
    add(loop, "--log-every", "N", int, "steps per row of metrics.csv")
    add(loop, "--valid-every", "N", int, "steps between validations (and samples)")
    add(loop, "--save-every", "N", int, "steps between saves of last/")
    add(loop, "--num-samples", "K", int, "clips generated at each validation (0: none)")
    add(loop, "--sample-seconds", "S", float, "length of each generated clip")
    add(loop, "--seed", "K", int, "seed of weights, data order, augmentation and dropout")
    add(
        loop,
        "--init",
        "DIR",
        str,
        "start from the weights of this checkpoint (its architecture); label weights carry "
        "over for the values both vocabularies hold, new fields start at zero",
    )
    add_device_argument(
        loop, help="where to run: auto picks CUDA when present, else the CPU (default: auto)"
    )
    loop.add_argument(
        "--recompute-activations",
        action="store_true",
        default=argparse.SUPPRESS,
        help="keep less for backward and recompute it: less memory for long windows, "
        "slower steps, same gradients",
    )
    loop.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run in --out from its last/ checkpoint, exactly",
    )


def resolve(args: argparse.Namespace) -> tuple[SaShiMiConfig, TrainConfig, bool]:
    """(model config, training config, rate_from_data) from preset < --config file < flags."""
    given = vars(args)
    model_flags = {k: v for k, v in given.items() if k in MODEL_FLAGS}
    train_flags = {k: v for k, v in given.items() if k in FIELDS}
    if "exclude" in train_flags:
        train_flags["exclude"] = tuple(train_flags["exclude"])
    if args.resume:
        fixed = sorted({"preset", "config"} & set(given) | set(model_flags))
        if fixed:
            raise ValueError(f"the model of a resumed run is fixed; drop {', '.join(fixed)}")
        config, saved = resume_configs(args.out)
        return config, dataclasses.replace(saved, **train_flags), False

    if "init" in given:
        fixed = sorted({"preset", "config"} & set(given) | set(model_flags) - {"dropout"})
        if fixed:
            raise ValueError(f"--init takes the model from {args.init}; drop {', '.join(fixed)}")
        if "data" not in train_flags:
            raise ValueError("--data DIR is required (a folder of audio files)")
        initial = load_checkpoint(args.init)[0].config
        config = dataclasses.replace(initial, labels={}, **model_flags)
        return config, TrainConfig.from_dict(train_flags), False

    file = {}
    if "config" in given:
        try:
            file = json.loads(args.config.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{args.config} is not valid JSON: {error}") from error
        if not isinstance(file, dict) or set(file) - {"model", "train"}:
            raise ValueError(f'{args.config} must hold {{"model": {{...}}, "train": {{...}}}}')
    preset = given.get("preset", "sc09")
    SaShiMiConfig.preset(preset)  # an unknown name: the error lists the known ones
    model = dict(PRESETS[preset])  # only what the preset sets: disc follows the kernel unless set
    model.update(file.get("model", {}))
    model.update(model_flags)
    if "data" not in train_flags and "data" not in file.get("train", {}):
        raise ValueError("--data DIR is required (a folder of audio files)")
    config = SaShiMiConfig.from_dict(model)
    cfg = TrainConfig.from_dict({**file.get("train", {}), **train_flags})
    rate_from_data = "sample_rate" not in model_flags and "sample_rate" not in file.get("model", {})
    return config, cfg, rate_from_data


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns 0 when training finished, 1 when it failed."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # Only rank 0 talks: the other processes would repeat every message.
    logging.basicConfig(
        format="%(message)s", stream=sys.stderr, level=logging.INFO if rank == 0 else logging.ERROR
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    command = f"{launcher} -m train {shlex.join(argv)}"
    try:
        config, cfg, rate_from_data = resolve(args)
        result = train(
            config, cfg, resume=args.resume, rate_from_data=rate_from_data, command=command
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    except FloatingPointError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except DiskFullError as error:  # the saves before are intact, and nothing half-written is left
        saved = resolve_save(Path(args.out) / "last").exists()
        then = "continue the run with --resume" if saved else "start again with another --out"
        print(f"{parser.prog}: error: {error}; free some space, then {then}", file=sys.stderr)
        return 1
    if rank == 0:
        print(json.dumps({"run": cfg.out, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

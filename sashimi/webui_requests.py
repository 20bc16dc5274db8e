"""What one request to the web UI may ask, checked against the server's limits.

Every value a client can send (from the page or from gradio_client) passes through here before it
reaches the sampler: lengths, clip counts and seeds against `Limits` (app.py's --max-* flags), the
checkpoint as the picker names it, and the `labels` of a labelled checkpoint, drawn per clip from
its seed. A bad value is refused with a gr.Error naming it, the bound and the flag that sets it,
shown in the page and logged as one line, never as a traceback.
"""

import json
import logging
import math
import random
import secrets
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .checkpoint import CHECKPOINTS_DIR, read_config
from .generate import Generator, check_sampling
from .guidance import Guidance
from .labels import Labels, Vocabulary

log = logging.getLogger(__name__)

REPO_ROOT = CHECKPOINTS_DIR.parent  # the picker names the repository's checkpoints relative to it
# Seeds run from 0 to MAX_SEED - max_clips, as clip i of a request uses seed + i. The bound is a
# choice, not a limit of the code that takes the seed: it keeps a random seed to 10 digits in file
# names and the seed box, and in the signed 32-bit range every common tool accepts. The hard limits
# are wider: torch.Generator.manual_seed takes up to 2**64 - 1, random.Random any int, and the
# page's numbers (JavaScript doubles) hold whole numbers exactly up to 2**53 - 1.
MAX_SEED = 2**31 - 1
ANY, RANDOM = "any", "random"  # label values besides a field's own: left unknown, drawn per clip


def refused(message: str) -> gr.Error:
    """The error for a request we turn down: shown in the page (or returned to the API client)
    and logged as one line, not as a crash."""
    log.info("refused a request: %s", message)
    return gr.Error(message, print_exception=False)


def check_number(name: str, value, minimum: float | None, maximum: float | None) -> None:
    """Refuse a value that is not a finite number in [minimum, maximum] (None: no bound)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise refused(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise refused(f"{name} must be at least {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise refused(f"{name} must be at most {maximum:g}, got {value:g}")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server (app.py's --max-* and --concurrency flags), and
    the checks that hold a request to them; each refusal names the flag that sets the limit."""

    max_seconds: float = 10.0  # per clip, generated (and, for Continue, kept from the prompt)
    max_clips: int = 4  # clips sampled together in one batch
    max_upload_mb: float = 20.0  # prompt file size
    concurrency: int = 8  # requests sampled at once, as one batch; the rest wait in the queue

    def __post_init__(self):
        for name in ("max_seconds", "max_clips", "max_upload_mb", "concurrency"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def check_seconds(self, name: str, seconds: float | None) -> float:
        """A length in seconds, more than 0 and at most max_seconds."""
        if seconds is None or not seconds > 0:
            raise refused(f"{name} must be more than 0 s, got {seconds}")
        if seconds > self.max_seconds:
            raise refused(
                f"{name} = {seconds:g} s is over this server's limit of "
                f"{self.max_seconds:g} s (app.py --max-seconds)"
            )
        return float(seconds)

    def check_clips(self, clips: float | None) -> int:
        """A whole number of clips from 1 to max_clips."""
        if clips is None or clips != int(clips) or not 1 <= clips <= self.max_clips:
            raise refused(
                f"clips must be a whole number from 1 to {self.max_clips} "
                f"(app.py --max-clips), got {clips}"
            )
        return int(clips)

    def pick_seed(self, seed: float | None, random_seed: bool) -> int:
        """The seed of a request's first clip: drawn when `random_seed`, else `seed`, checked."""
        highest = MAX_SEED - self.max_clips  # clip i of a batch uses seed + i
        if random_seed:
            return secrets.randbelow(highest + 1)
        if seed is None or seed != int(seed) or not 0 <= seed <= highest:
            raise refused(f"seed must be a whole number from 0 to {highest}, got {seed}")
        return int(seed)


def check_sampling_request(
    sampling: dict, guidance: tuple, labels: list[Labels], num_samples: int
) -> dict:
    """A request's temperature and top_p, and its guidance (weight, seconds, weight after) as a
    Guidance, checked for sampling len(labels) clips of num_samples each; guidance is 1 where no
    clip has labels (nothing to guide towards: one stream instead of two equal ones)."""
    if not any(labels):
        guidance = (1.0,)
    names = ("guidance", "guidance_seconds", "guidance_after")
    for name, value in zip(names, guidance, strict=False):
        if value is None:
            raise refused(f"{name} must be a number, got None")
    sampling = dict(sampling, guidance=Guidance(*guidance))
    try:
        check_sampling(num_samples, batch_size=len(labels), **sampling)
    except ValueError as error:
        raise refused(str(error)) from error
    return sampling


def display_path(path: Path) -> str:
    """`path` relative to the repository if inside it (checkpoints/fsdd), else absolute: the name
    of a checkpoint in the picker and in a request."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def checkpoint_vocabulary(checkpoint: str | None) -> Vocabulary:
    """The labels in a checkpoint's config.json, field -> {value: count}: {} for an unlabelled
    checkpoint, or one that cannot be read (its card says why)."""
    if not checkpoint:
        return {}
    try:
        return read_config(REPO_ROOT / checkpoint).labels
    except (OSError, ValueError):
        return {}


def parse_labels(labels: dict | str | None) -> dict[str, str]:
    """The API's `labels`, a dict or its JSON text, as field -> a value, ANY or RANDOM."""
    if labels is None or labels == "":
        return {}
    example = 'a JSON object such as {"digit": "7"}'
    if isinstance(labels, str):
        try:
            labels = json.loads(labels)
        except json.JSONDecodeError as error:
            raise refused(f"labels must be {example}, got {labels!r} ({error})") from error
    if not isinstance(labels, dict) or not all(
        isinstance(v, str | int) and not isinstance(v, bool) for v in labels.values()
    ):
        raise refused(f"labels must be {example}, got {json.dumps(labels)}")
    return {str(field): str(value) for field, value in labels.items()}


def clip_labels(generator: Generator, labels: dict | str | None, seeds: range) -> list[Labels]:
    """The labels of the clips seeded `seeds` (see draw_labels) from the API's `labels`; an
    unknown field or value is refused, naming the known ones."""
    asked = parse_labels(labels)
    vocabulary = generator.config.labels
    given = {f: v for f, v in asked.items() if not (f in vocabulary and v in (ANY, RANDOM))}
    try:
        generator.label_rows(given, 1)  # checks the fields and values; the rows are not kept
    except ValueError as error:
        raise refused(str(error)) from error
    return draw_labels(vocabulary, asked, seeds)


def draw_labels(vocabulary: Vocabulary, asked: dict[str, str], seeds: range) -> list[Labels]:
    """Each clip's labels: the values asked for, ANY fields left out, and each RANDOM field drawn
    uniformly from its values by random.Random(the clip's seed), so that the seed alone
    reproduces a clip, as it does its audio. `asked` is checked: its RANDOM fields exist."""
    clips = []
    for seed in seeds:
        rng = random.Random(seed)
        labels = {}
        for field, values in vocabulary.items():  # the checkpoint's order, not the request's
            value = asked.get(field, ANY)
            if value != ANY:
                labels[field] = rng.choice(list(values)) if value == RANDOM else value
        clips.append(labels)
    return clips


def describe_labels(labels: Labels) -> str:
    """A clip's labels in words, e.g. "digit 7, speaker bob" ("" for none)."""
    return ", ".join(f"{field} {value}" for field, value in labels.items())

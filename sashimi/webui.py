"""The web UI: pick a checkpoint, generate or continue audio, and listen while it is being sampled.

A Gradio 6 page over `sashimi.generate.Generator` (it never reaches into the model's layers):
  - a model picker over every checkpoint under checkpoints/ and any given with --checkpoint, with
    its card (data, sample rate, parameters, steps, validation bits per sample, device);
  - sampling settings shared by both tabs: clips, temperature, top-p, a seed or "random";
  - for a labelled checkpoint, a menu per label field (a value, "any" = left unknown, or "random"
    = drawn per clip from its seed) and the classifier-free guidance weight;
  - Generate (seconds per clip) and Continue (a prompt to upload or record, the seconds of it to
    keep and the seconds to add);
  - the results: a live player fed chunk by chunk by the recurrent sampler while it runs (SaShiMi's
    recurrent mode makes one sample at a time, so the start of a clip exists long before its end),
    then every clip as a player with download and its waveform + spectrogram, ranked by the
    model's own likelihood of it (bits per sample, lower = more likely), as the reference's
    generate script ranks a batch.
Requests that arrive together are sampled as one batch (sashimi/batching.py), each with its own
seeds, settings, labels and length: a batch costs little more than one clip.
Both buttons are named API endpoints, /generate and /continue, callable with gradio_client; their
optional `labels` ({"digit": "7"}, or its JSON text) and `guidance` take the menus' place.
Every request is checked against `Limits` (set from app.py's flags) and answered with a gr.Error
message in the page, never a traceback.
"""

import io
import json
import logging
import math
import random
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import soundfile as sf
import torch

from .audio import load_audio, write_wav
from .batching import Batcher, Request
from .checkpoint import CHECKPOINTS_DIR, DEFAULT_CHECKPOINT, list_checkpoints, read_config
from .cli import format_duration
from .generate import DEFAULT_GUIDANCE, Generator, check_sampling
from .labels import Labels, Vocabulary, labels_slug
from .plots import save_figure_png, waveform_spectrogram_figure

log = logging.getLogger(__name__)

REPO_ROOT = CHECKPOINTS_DIR.parent
MAX_SEED = 2**31 - 1  # seeds stay exact as JavaScript numbers in the page
RANKING_HEADERS = ["rank", "seed", "bits per sample"]  # then "labels" for a labelled checkpoint
ANY, RANDOM = "any", "random"  # menu entries besides a field's values: left unknown, drawn per clip
# Gradio builds the page once, so it holds this many label menus, shown, named and filled for the
# chosen checkpoint's fields and hidden otherwise; fields beyond them stay unknown on the page
# (the API's `labels` reaches every field).
MAX_LABEL_FIELDS = 4
GUIDANCE_SLIDER = (0.0, 10.0, 0.5)  # min, max, step; the API checks its values against it too


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server (app.py's --max-* and --concurrency flags)."""

    max_seconds: float = 10.0  # per clip, generated (and, for Continue, kept from the prompt)
    max_clips: int = 4  # clips sampled together in one batch
    max_upload_mb: float = 20.0  # prompt file size
    concurrency: int = 8  # requests sampled at once, as one batch; the rest wait in the queue

    def __post_init__(self):
        for name in ("max_seconds", "max_clips", "max_upload_mb", "concurrency"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


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


def refuse_bad_values(component: gr.Number | gr.Slider | gr.Dropdown) -> None:
    """Make an input refuse its bad values by name: Gradio's own checks answer an
    API client sending NaN for a whole number with no message, and a value out of range with a
    25-line traceback in the server log.

    The check is set on the instance: a subclass would make Gradio write a .pyi file beside this
    module. Gradio rebuilds a component from its class when an event updates its properties, so
    no event updates these (the guidance slider is hidden through its column).
    """
    gradio_preprocess = component.preprocess

    def preprocess(payload):
        empty_number = isinstance(component, gr.Number) and payload is None  # the handler says
        if isinstance(component, gr.Number | gr.Slider) and not empty_number:
            check_number(component.label, payload, component.minimum, component.maximum)
        try:
            return gradio_preprocess(payload)
        except gr.Error as error:  # a Dropdown's value that is not one of its choices
            raise refused(f"{component.label}: {error.message}") from None

    component.preprocess = preprocess


def display_path(path: Path) -> str:
    """`path` relative to the repository if inside it (checkpoints/fsdd), else absolute."""
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


def missing_checkpoint_message() -> str:
    return (
        f"No checkpoint to load: the default model {display_path(DEFAULT_CHECKPOINT)} is not there "
        "and checkpoints/ holds no other. Train one with `python -m train --data DIR --out "
        "runs/NAME`, then start `python app.py --checkpoint DIR` with the checkpoint folder it "
        "wrote (config.json + model.safetensors), or copy that folder under checkpoints/."
    )


def find_checkpoints(extra: list[Path]) -> list[Path]:
    """Every checkpoint under checkpoints/, then those given on the command line, without repeats.

    A given folder is listed even when it is not a checkpoint, so that picking it says why.
    """
    found = list(list_checkpoints(CHECKPOINTS_DIR)) + [Path(p) for p in extra]
    return list(dict.fromkeys(p.resolve() for p in found))


class Models:
    """Generators loaded on first use and kept, one per checkpoint folder, each with the Batcher
    that samples the requests for it (those that arrive together as one batch)."""

    def __init__(self, device: str | torch.device = "auto"):
        self.device = device
        self._generators: dict[str, Generator] = {}
        self._batchers: dict[str, Batcher] = {}
        self._lock = threading.Lock()  # two first requests for a model load its weights once

    def get(self, checkpoint: str | None) -> Generator:
        if not checkpoint:
            raise refused(missing_checkpoint_message().replace("`", ""))
        with self._lock:
            if checkpoint not in self._generators:
                try:
                    # the picker names the repository's checkpoints relative to it
                    self._generators[checkpoint] = Generator.from_checkpoint(
                        REPO_ROOT / checkpoint, device=self.device
                    )
                except (FileNotFoundError, ValueError) as error:
                    raise refused(str(error)) from error
                self._batchers[checkpoint] = Batcher(self._generators[checkpoint])
            return self._generators[checkpoint]

    def batcher(self, checkpoint: str | None) -> Batcher:
        self.get(checkpoint)
        return self._batchers[checkpoint]

    def card(self, checkpoint: str | None) -> str:
        """Markdown facts about a checkpoint, or why it cannot be loaded."""
        if not checkpoint:
            return f"#### No model\n{missing_checkpoint_message()}"
        try:
            generator = self.get(checkpoint)
        except gr.Error as error:
            return f"#### Cannot load {display_path(Path(checkpoint))}\n{error.message}"
        meta, config = generator.metadata, generator.config
        parameters = meta.get("num_parameters") or sum(
            p.numel() for p in generator.model.parameters()
        )
        rows = [
            ("trained on", meta.get("train_data")),
            ("training files", meta.get("n_train_files")),
            ("sample rate", f"{generator.sample_rate:,} Hz"),
            ("quantisation", f"{config.quantization}, {config.n_classes} classes"),
            ("parameters", f"{parameters:,}"),
            ("training steps", meta.get("step")),
            ("validation NLL", _bits(meta.get("valid_bits_per_sample"))),
            (
                "training time",
                format_duration(meta["wall_time_s"]) if "wall_time_s" in meta else None,
            ),
            ("trained on device", meta.get("device")),
            ("device in use", str(generator.device)),
        ]
        facts = "\n".join(f"- {name}: **{value}**" for name, value in rows if value is not None)
        return f"#### {display_path(Path(checkpoint))}\n{facts}"


def _bits(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f} bits per sample"


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio as the bytes of a 16-bit WAV file: one chunk for the live player.

    Bytes, not a (rate, array) pair: Gradio rescales arrays to their own peak, which would change
    the loudness from one chunk to the next.
    """
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


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


def label_menus(vocabulary: Vocabulary) -> list[dict]:
    """The settings of the page's MAX_LABEL_FIELDS menus for a checkpoint's fields: the first
    field RANDOM (a random digit), the others ANY; menus past the fields hidden."""
    fields = list(vocabulary)[:MAX_LABEL_FIELDS]
    menus = [
        dict(
            choices=[RANDOM, ANY, *vocabulary[field]],
            value=RANDOM if i == 0 else ANY,
            label=field,
            visible=True,
        )
        for i, field in enumerate(fields)
    ]
    hidden = dict(choices=[], value=None, label="label", visible=False)
    return menus + [hidden] * (MAX_LABEL_FIELDS - len(fields))


def clip_figure(clip: dict) -> str:
    """The waveform and spectrogram of a result as a PNG beside its WAV, drawn when the page shows
    it: a figure costs 1.2 s of CPU for a 0.5 s clip on the project's 2-core VM (two thirds of
    sampling it), and API clients, answered without it, never ask for one."""
    wav = Path(clip["wav"])
    audio, rate = sf.read(wav, dtype="float32")
    title = f"#{clip['rank']}  {wav.stem}"
    figure = waveform_spectrogram_figure(audio, rate, marker_seconds=clip["marker"], title=title)
    return str(save_figure_png(figure, wav.with_suffix(".png")))


class WebUI:
    """The page's event handlers, over a set of checkpoints, a model cache and the limits."""

    def __init__(
        self, extra_checkpoints: list[Path], limits: Limits, device: str | torch.device = "auto"
    ):
        """Offer every checkpoint under checkpoints/ plus `extra_checkpoints` (app.py --checkpoint).

        The page opens on the first extra one, else the shipped default, else the first found.
        """
        self.checkpoints = find_checkpoints(extra_checkpoints)
        preferred = [Path(p).resolve() for p in extra_checkpoints] + [DEFAULT_CHECKPOINT]
        self.selected = next(  # as the picker names it: checkpoints/fsdd, or an absolute path
            (display_path(p) for p in preferred if p in self.checkpoints),
            display_path(self.checkpoints[0]) if self.checkpoints else None,
        )
        self.limits = limits
        self.models = Models(device)
        # Gradio encodes the live stream with FFmpeg; without it a streamed chunk fails the request.
        self.live_playback = shutil.which("ffmpeg") is not None
        if not self.live_playback:
            log.warning(
                "ffmpeg is not on PATH: the live player stays silent and clips appear when "
                "finished; install FFmpeg (e.g. apt-get install ffmpeg) for live playback"
            )
        self._outputs = tempfile.TemporaryDirectory(prefix="sashimi-webui-")  # removed at exit

    # --- checks: every value a client can send, with the limit and the flag that sets it ---------
    def _check_seconds(self, name: str, seconds: float) -> float:
        if seconds is None or not seconds > 0:
            raise refused(f"{name} must be more than 0 s, got {seconds}")
        if seconds > self.limits.max_seconds:
            raise refused(
                f"{name} = {seconds:g} s is over this server's limit of "
                f"{self.limits.max_seconds:g} s (app.py --max-seconds)"
            )
        return float(seconds)

    def _check_clips(self, clips: float) -> int:
        if clips is None or clips != int(clips) or not 1 <= clips <= self.limits.max_clips:
            raise refused(
                f"clips must be a whole number from 1 to {self.limits.max_clips} "
                f"(app.py --max-clips), got {clips}"
            )
        return int(clips)

    def _pick_seed(self, seed: float | None, random_seed: bool) -> int:
        highest = MAX_SEED - self.limits.max_clips  # clip i of a batch uses seed + i
        if random_seed:
            return secrets.randbelow(highest + 1)
        if seed is None or seed != int(seed) or not 0 <= seed <= highest:
            raise refused(f"seed must be a whole number from 0 to {highest}, got {seed}")
        return int(seed)

    def _clip_labels(
        self, generator: Generator, labels: dict | str | None, seed: int, clips: int
    ) -> list[Labels]:
        """The labels of the clips seeded seed, seed + 1, ... (see draw_labels); an unknown field
        or value is refused, naming the known ones."""
        asked = parse_labels(labels)
        vocabulary = generator.config.labels
        given = {f: v for f, v in asked.items() if not (f in vocabulary and v in (ANY, RANDOM))}
        try:
            generator.label_rows(given, 1)  # checks the fields and values; the rows are not kept
        except ValueError as error:
            raise refused(str(error)) from error
        return draw_labels(vocabulary, asked, range(seed, seed + clips))

    # --- the label menus -----------------------------------------------------------------------
    @staticmethod
    def label_controls(checkpoint: str | None) -> list[dict]:
        """Updates of the label menus and the guidance slider's column for the picked checkpoint."""
        vocabulary = checkpoint_vocabulary(checkpoint)
        menus = [gr.update(**menu) for menu in label_menus(vocabulary)]
        return [*menus, gr.update(visible=bool(vocabulary))]

    @staticmethod
    def menu_labels(checkpoint: str | None, *values: str | None) -> dict[str, str]:
        """What the menus ask for, as the endpoints' `labels`: {field: value or RANDOM}."""
        fields = checkpoint_vocabulary(checkpoint)
        return {f: v for f, v in zip(fields, values, strict=False) if v not in (None, ANY)}

    # --- the two endpoints ---------------------------------------------------------------------
    def generate(
        self,
        checkpoint: str | None,
        clips: float,
        seconds: float,
        temperature: float,
        top_p: float,
        seed: float | None,
        random_seed: bool,
        labels: dict | str | None = None,
        guidance: float = DEFAULT_GUIDANCE,
    ):
        """Sample `clips` new clips of `seconds` each; streams the first while sampling.

        labels (a labelled checkpoint): field -> a value, "any" or "random", as a dict or its JSON
        text, e.g. {"digit": "7"}; guidance: the classifier-free guidance weight, 1 = none.
        """
        generator = self.models.get(checkpoint)
        seconds = self._check_seconds("seconds", seconds)
        clips = self._check_clips(clips)
        seed = self._pick_seed(seed, random_seed)
        yield from self._sample(
            self.models.batcher(checkpoint),
            seconds,
            seed,
            self._clip_labels(generator, labels, seed, clips),
            dict(temperature=temperature, top_p=top_p, guidance=guidance),
            prompt=None,
            what=f"generate_{seconds:g}s",
        )

    def continue_(
        self,
        checkpoint: str | None,
        prompt: str | None,
        keep_seconds: float,
        add_seconds: float,
        clips: float,
        temperature: float,
        top_p: float,
        seed: float | None,
        random_seed: bool,
        labels: dict | str | None = None,
        guidance: float = DEFAULT_GUIDANCE,
    ):
        """Keep the first `keep_seconds` of the prompt and sample `add_seconds` after it; labels
        and guidance as for generate."""
        generator = self.models.get(checkpoint)
        if prompt is None:
            raise refused("upload or record a prompt first (any of .wav .flac .ogg .mp3)")
        keep_seconds = self._check_seconds("seconds to keep", keep_seconds)
        add_seconds = self._check_seconds("seconds to add", add_seconds)
        clips = self._check_clips(clips)
        seed = self._pick_seed(seed, random_seed)
        clip_labels = self._clip_labels(generator, labels, seed, clips)
        try:
            audio = load_audio(prompt, generator.sample_rate)
        except (FileNotFoundError, ValueError) as error:
            # Name the file as the user knows it, not by the server's upload path.
            raise refused(str(error).replace(str(prompt), Path(prompt).name)) from error
        audio = audio[: max(1, round(keep_seconds * generator.sample_rate))]
        yield from self._sample(
            self.models.batcher(checkpoint),
            add_seconds,
            seed,
            clip_labels,
            dict(temperature=temperature, top_p=top_p, guidance=guidance),
            prompt=audio,
            what=f"continue_keep{len(audio) / generator.sample_rate:g}s_add{add_seconds:g}s",
        )

    def _sample(self, batcher, seconds, seed, labels, sampling, prompt, what):
        """Sample one clip per entry of `labels` (clip i seeded seed + i), with the requests that
        arrive at the same time (see sashimi/batching.py), yielding live audio of clip 1, then
        the ranked clips. Files are named after `what` and the sampling settings.

        Yields tuples for the outputs (files, ranking, seed, status, live player, results).
        """
        generator = batcher.generator
        rate, clips = generator.sample_rate, len(labels)
        num_samples = round(seconds * rate)
        if not any(labels):  # nothing to guide towards: one stream instead of two equal ones
            sampling["guidance"] = 1.0
        if sampling["guidance"] is None:
            raise refused("guidance must be a number (1 = none), got None")
        try:
            check_sampling(num_samples, batch_size=clips, **sampling)
        except ValueError as error:
            raise refused(str(error)) from error
        settings = f"_t{sampling['temperature']:g}_p{sampling['top_p']:g}"
        settings += f"_g{sampling['guidance']:g}" if any(labels) else ""
        # Show the seed in use and clear the last results before the first sample exists.
        live = gr.skip() if prompt is None or not self.live_playback else wav_bytes(prompt, rate)
        yield None, None, seed, "<progress></progress> starting the sampler…", live, []

        chunks, done, first_audio = [], 0, None
        started = time.perf_counter()
        seeds = list(range(seed, seed + clips))
        ticket = batcher.submit(
            Request(num_samples, seeds, labels=labels, prompt=prompt, **sampling)
        )
        try:
            for chunk in ticket:
                chunks.append(chunk)  # (clips, n)
                done += chunk.shape[1]
                first_audio = first_audio or time.perf_counter() - started
                speed = done / rate / (time.perf_counter() - started)
                status = (
                    f'<progress value="{done}" max="{num_samples}"></progress> sampled '
                    f"{done / rate:.2f} of {seconds:g} s of audio, {speed:.2f}× real time"
                )
                live = wav_bytes(chunk[0], rate) if self.live_playback else gr.skip()
                yield gr.skip(), gr.skip(), gr.skip(), status, live, gr.skip()
        finally:  # done, or Stop: the batch samples no more for this request
            ticket.cancel()
        wall = time.perf_counter() - started

        audio = np.concatenate(chunks, axis=1)
        if prompt is not None:
            audio = np.concatenate([np.broadcast_to(prompt, (clips, len(prompt))), audio], axis=1)
        bits = ticket.bits  # (clips,), each under its own labels, scored with its batch
        files, ranking, results = self._save_ranked(
            audio, bits, rate, seed, labels, prompt, what + settings, bool(generator.config.labels)
        )
        speed = clips * seconds / wall
        guided = f" · guidance {sampling['guidance']:g}" if any(labels) else ""
        others = ticket.requests - 1
        shared = f" · batched with {others} other request{'s' * (others > 1)}" if others else ""
        status = (
            f"{clips} clip{'s' * (clips > 1)} × {seconds:g} s sampled in {wall:.1f} s "
            f"({speed:.2f}× real time, first audio after {first_audio:.2f} s) · seed {seed}"
            f"{guided}{shared} · {generator.device}"
        )
        yield files, ranking, seed, status, gr.skip(), results

    def _save_ranked(self, audio, bits, rate, seed, labels, prompt, name, labelled):
        """Write each clip's WAV, best first, named by its seed and labels; returns (files,
        ranking table, results). The table has a labels column for a labelled model."""
        folder = Path(tempfile.mkdtemp(dir=self._outputs.name))  # one per request: no clashes
        marker = None if prompt is None else len(prompt) / rate
        files, rows, results = [], [], []
        for rank, row in enumerate(np.argsort(bits), start=1):
            clip_seed = seed + int(row)  # the engine seeds clip i of a batch with seed + i
            slug = labels_slug(labels[row])
            stem = f"sashimi_seed{clip_seed}{'_' * bool(slug)}{slug}_{name}"
            wav = write_wav(folder / f"{stem}.wav", audio[row], rate)
            files.append(str(wav))
            described = describe_labels(labels[row])
            rows.append(
                [rank, clip_seed, round(float(bits[row]), 4)] + [described or ANY] * labelled
            )
            parts = [f"#{rank}", f"seed {clip_seed}", described, f"{bits[row]:.3f} bits per sample"]
            caption = " · ".join(part for part in parts if part)
            results.append({"wav": str(wav), "label": caption, "marker": marker, "rank": rank})
        headers = RANKING_HEADERS + ["labels"] * labelled
        return files, {"headers": headers, "data": rows}, results

    # --- the page ------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        limits = self.limits
        names = [display_path(p) for p in self.checkpoints]
        vocabulary = checkpoint_vocabulary(self.selected)
        with gr.Blocks(title="SaShiMi", analytics_enabled=False) as demo:
            gr.Markdown(
                "# SaShiMi\nRaw audio sampled one value at a time by a state-space U-Net "
                "(S4 layers, run as a recurrence). Pick a model, generate or continue a sound, "
                "and listen while it is being made."
            )
            with gr.Row():
                picker = gr.Dropdown(names, value=self.selected, label="model", scale=1)
                card = gr.Markdown(self.models.card(None) if not names else "loading…")
            with gr.Row():
                clips = gr.Number(
                    1,
                    label="clips",
                    precision=0,
                    minimum=1,
                    info=f"sampled together, up to {limits.max_clips}",
                )
                temperature = gr.Slider(
                    0.0,
                    2.0,
                    1.0,
                    step=0.05,
                    label="temperature",
                    info="below 1 is more conservative, 0 is greedy",
                )
                top_p = gr.Slider(
                    0.05,
                    1.0,
                    1.0,
                    step=0.05,
                    label="top-p",
                    info="sample only from the likeliest classes holding this "
                    "much probability (1 = off)",
                )
                seed = gr.Number(
                    0,
                    label="seed",
                    precision=0,
                    minimum=0,
                    info="shows the seed used; clip i uses seed + i",
                )
                random_seed = gr.Checkbox(True, label="random seed")
            with gr.Row():  # a labelled checkpoint's fields (see MAX_LABEL_FIELDS), and guidance
                menus = [
                    gr.Dropdown(
                        **menu,
                        info=f"{RANDOM}: each clip draws one (from its seed); {ANY}: left open",
                    )
                    for menu in label_menus(vocabulary)
                ]
                with gr.Column(visible=bool(vocabulary), elem_id="guidance") as guidance_column:
                    guidance = gr.Slider(
                        *GUIDANCE_SLIDER[:2],
                        DEFAULT_GUIDANCE,
                        step=GUIDANCE_SLIDER[2],
                        label="guidance",
                        info="classifier-free guidance: 1 = none, higher = closer to the labels",
                    )
            # The endpoints' `labels` parameter: written from the menus when a button is clicked,
            # so that API clients send one dict however many menus the page shows.
            labels = gr.JSON(None, label="labels", visible=False)
            with gr.Tabs():
                with gr.Tab("Generate"):
                    seconds = gr.Number(
                        1.0,
                        label="seconds per clip",
                        minimum=0,
                        info=f"up to {limits.max_seconds:g} s",
                    )
                    generate_button = gr.Button("Generate", variant="primary")
                with gr.Tab("Continue"):
                    prompt = gr.Audio(
                        sources=["upload", "microphone"],
                        type="filepath",
                        label="prompt (.wav .flac .ogg .mp3, or record)",
                    )
                    with gr.Row():
                        keep_seconds = gr.Number(
                            1.0,
                            label="seconds of the prompt to keep",
                            minimum=0,
                            info="from its start",
                        )
                        add_seconds = gr.Number(
                            1.0,
                            label="seconds to add",
                            minimum=0,
                            info=f"up to {limits.max_seconds:g} s",
                        )
                    continue_button = gr.Button("Continue", variant="primary")
            stop_button = gr.Button("Stop", variant="stop")
            live = gr.Audio(
                label="live: clip 1 while it is being sampled"
                if self.live_playback
                else "live playback needs FFmpeg on the server (apt-get install ffmpeg)",
                streaming=True,
                autoplay=True,
                interactive=False,
                buttons=[],
            )
            status = gr.Markdown(label="status")
            with gr.Row():
                files = gr.File(label="WAV files, best first", file_count="multiple", scale=2)
                ranking = gr.Dataframe(
                    headers=RANKING_HEADERS,
                    label="ranking: fewer bits per sample = likelier to the model",
                    interactive=False,
                    scale=1,
                )
            results = gr.State([])

            @gr.render(inputs=results)
            def show_clips(results: list[dict]):
                for clip in results:
                    with gr.Row(equal_height=True):
                        gr.Audio(
                            clip["wav"],
                            label=clip["label"],
                            type="filepath",
                            interactive=False,
                            buttons=["download"],
                            scale=1,
                        )
                        gr.Image(clip_figure(clip), show_label=False, type="filepath", scale=2)

            for component in (picker, clips, temperature, top_p, seed, guidance, seconds):
                refuse_bad_values(component)
            refuse_bad_values(keep_seconds)
            refuse_bad_values(add_seconds)
            outputs = [files, ranking, seed, status, live, results]
            sampling = [temperature, top_p, seed, random_seed]
            guiding = [labels, guidance]
            read_menus = dict(
                fn=self.menu_labels,
                inputs=[picker, *menus],
                outputs=labels,
                queue=False,  # a dict from the menus: no reason to wait behind sampling
                show_progress="hidden",
                api_visibility="private",
            )
            events = dict(
                outputs=outputs,
                show_progress_on=[status],  # the status line also holds the progress bar
                concurrency_limit=limits.concurrency,
                concurrency_id="sampling",  # both endpoints share the limit
            )
            generate_event = generate_button.click(**read_menus).then(
                self.generate,
                [picker, clips, seconds, *sampling, *guiding],
                api_name="generate",
                **events,
            )
            continue_event = continue_button.click(**read_menus).then(
                self.continue_,
                [picker, prompt, keep_seconds, add_seconds, clips, *sampling, *guiding],
                api_name="continue",
                **events,
            )
            stop_button.click(
                lambda: "stopped",
                None,
                status,
                cancels=[generate_event, continue_event],
                api_visibility="private",
            )
            picker.change(self.models.card, picker, card, api_visibility="private")
            picker.change(
                self.label_controls, picker, [*menus, guidance_column], api_visibility="private"
            )
            demo.load(self.models.card, picker, card, api_visibility="private")
        return demo

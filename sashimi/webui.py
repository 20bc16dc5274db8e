"""The web UI: pick a checkpoint, generate or continue audio, and listen while it is being sampled.

A Gradio 6 page over `sashimi.generate.Generator` (it never reaches into the model's layers):
  - a model picker over every checkpoint under checkpoints/ and any given with --checkpoint, with
    its card (data, sample rate, parameters, steps, validation bits per sample, device);
  - sampling settings shared by both tabs: clips, temperature, top-p, a seed or "random";
  - for a labelled checkpoint, a menu per label field (a value, "any" = left unknown, or "random"
    = drawn per clip from its seed) and the classifier-free guidance: a weight for the first
    seconds of each clip, then another (sashimi/guidance.py);
  - Generate (seconds per clip) and Continue (a prompt to upload or record, the seconds of it to
    keep and the seconds to add);
  - the results: a live player fed chunk by chunk by the recurrent sampler while it runs (SaShiMi's
    recurrent mode makes one sample at a time, so the start of a clip exists long before its end),
    then every clip as a player with download and its waveform + spectrogram, ranked: when
    labels were asked for with guidance, by how much the labels explain the clip (its label
    evidence, see write_ranked), otherwise by the model's own likelihood of it (bits per sample,
    lower = more likely), as the reference's generate script ranks a batch.
Requests that arrive together are sampled as one batch (sashimi/batching.py), each with its own
seeds, settings, labels and length: a batch costs little more than one clip.
Both buttons are named API endpoints, /generate and /continue, callable with gradio_client; their
optional `labels` ({"digit": "7"}, or its JSON text) take the menus' place, and `guidance`,
`guidance_seconds` and `guidance_after` the sliders'.
Every request is checked against `Limits` (set from app.py's flags) and answered with a gr.Error
message in the page, never a traceback.

This file holds what serves a request: the models (loaded once, each with its batcher), the two
endpoints' handlers and the files they write. The page's layout is in sashimi/webui_page.py, the
checks of a request and the limits they enforce in sashimi/webui_requests.py.
"""

import io
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import soundfile as sf
import torch

from .audio import load_audio, write_wav
from .batching import Batcher, Request
from .checkpoint import CHECKPOINTS_DIR, DEFAULT_CHECKPOINT, list_checkpoints
from .cli import format_duration
from .generate import Generator
from .guidance import DEFAULT_GUIDANCE
from .labels import Labels, labels_slug
from .ranking import best_first
from .webui_page import NO_EVIDENCE, RANKING_HEADERS, build_page
from .webui_requests import (
    ANY,
    REPO_ROOT,
    Limits,
    check_sampling_request,
    clip_labels,
    describe_labels,
    display_path,
    refused,
)

log = logging.getLogger(__name__)


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


def write_ranked(
    folder: Path,
    audio: np.ndarray,
    bits: np.ndarray,
    sample_rate: int,
    seed: int,
    labels: list[Labels],
    prompt_end: float | None,
    name: str,
    labelled: bool,
    evidence: np.ndarray | None = None,
) -> tuple[list[str], dict, list[dict]]:
    """Write each clip's WAV into `folder`, best first (sashimi/ranking.py: the most label
    evidence when there is some, else the fewest bits per sample), named by its seed, its labels
    and `name`.

    Args:
        audio: (clips, L) float samples; clip i was seeded seed + i and asked for labels[i].
        bits: (clips,) bits per sample of each clip under its own labels.
        prompt_end: seconds of prompt at the start of each clip, or None.
        labelled: whether the model has labels: the table then has label evidence and labels
            columns.
        evidence: (clips,) label evidence, bits per new sample: log2 p(x | labels) - log2 p(x |
            every field unknown) (Ticket.evidence), or None (not guided, or nothing asked).
    Returns: the files, the ranking table {"headers", "data"}, and one result per clip for the
        page ({"wav", "label", "marker", "rank"}), all best first.
    """
    files, rows, results = [], [], []
    for rank, row in enumerate(best_first(bits, evidence), start=1):
        clip_seed = seed + int(row)  # the engine seeds clip i of a batch with seed + i
        slug = labels_slug(labels[row])
        stem = f"sashimi_seed{clip_seed}{'_' * bool(slug)}{slug}_{name}"
        wav = write_wav(folder / f"{stem}.wav", audio[row], sample_rate)
        files.append(str(wav))
        described = describe_labels(labels[row])
        shown = NO_EVIDENCE if evidence is None else round(float(evidence[row]), 4)
        rows.append(
            [rank, clip_seed, round(float(bits[row]), 4)] + [shown, described or ANY] * labelled
        )
        parts = [f"#{rank}", f"seed {clip_seed}", described, f"{bits[row]:.3f} bits per sample"]
        if evidence is not None:
            parts.append(f"label evidence {evidence[row]:.3f}")
        caption = " · ".join(part for part in parts if part)
        results.append({"wav": str(wav), "label": caption, "marker": prompt_end, "rank": rank})
    headers = RANKING_HEADERS + ["label evidence", "labels"] * labelled
    return files, {"headers": headers, "data": rows}, results


class WebUI:
    """The page's sampling endpoints, over a set of checkpoints, a model cache and the limits."""

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

    def build(self) -> gr.Blocks:
        """The page (sashimi/webui_page.py) over these checkpoints, limits and endpoints."""
        return build_page(self)

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
        guidance: float = DEFAULT_GUIDANCE.weight,
        guidance_seconds: float = DEFAULT_GUIDANCE.seconds,
        guidance_after: float = DEFAULT_GUIDANCE.after,
    ):
        """Sample `clips` new clips of `seconds` each; streams the first while sampling.

        labels (a labelled checkpoint): field -> a value, "any" or "random", as a dict or its JSON
        text, e.g. {"digit": "7"}; guidance: the classifier-free guidance weight for the first
        guidance_seconds of each clip (1 = none), then guidance_after.
        """
        generator = self.models.get(checkpoint)
        seconds = self.limits.check_seconds("seconds", seconds)
        clips = self.limits.check_clips(clips)
        seed = self.limits.pick_seed(seed, random_seed)
        yield from self._sample(
            self.models.batcher(checkpoint),
            seconds,
            seed,
            clip_labels(generator, labels, range(seed, seed + clips)),
            dict(temperature=temperature, top_p=top_p),
            (guidance, guidance_seconds, guidance_after),
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
        guidance: float = DEFAULT_GUIDANCE.weight,
        guidance_seconds: float = DEFAULT_GUIDANCE.seconds,
        guidance_after: float = DEFAULT_GUIDANCE.after,
    ):
        """Keep the first `keep_seconds` of the prompt and sample `add_seconds` after it; labels
        and guidance as for generate (its seconds count from the prompt's end)."""
        generator = self.models.get(checkpoint)
        if prompt is None:
            raise refused("upload or record a prompt first (any of .wav .flac .ogg .mp3)")
        keep_seconds = self.limits.check_seconds("seconds to keep", keep_seconds)
        add_seconds = self.limits.check_seconds("seconds to add", add_seconds)
        clips = self.limits.check_clips(clips)
        seed = self.limits.pick_seed(seed, random_seed)
        labels = clip_labels(generator, labels, range(seed, seed + clips))
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
            labels,
            dict(temperature=temperature, top_p=top_p),
            (guidance, guidance_seconds, guidance_after),
            prompt=audio,
            what=f"continue_keep{len(audio) / generator.sample_rate:g}s_add{add_seconds:g}s",
        )

    def _sample(self, batcher, seconds, seed, labels, sampling, guidance, prompt, what):
        """Sample one clip per entry of `labels` (clip i seeded seed + i), with the requests that
        arrive at the same time (see sashimi/batching.py), yielding live audio of clip 1, then
        the ranked clips. guidance: (weight, seconds, weight after) as the request sent them.
        Files are named after `what` and the sampling settings.

        Yields tuples for the outputs (files, ranking, seed, status, live player, results).
        """
        generator = batcher.generator
        rate, clips = generator.sample_rate, len(labels)
        num_samples = round(seconds * rate)
        sampling = check_sampling_request(sampling, guidance, labels, num_samples)
        settings = f"_t{sampling['temperature']:g}_p{sampling['top_p']:g}"
        settings += f"_{sampling['guidance'].slug}" if any(labels) else ""
        # Show the seed in use and clear the last results before the first sample exists.
        live = gr.skip() if prompt is None or not self.live_playback else wav_bytes(prompt, rate)
        yield None, None, seed, "<progress></progress> starting the sampler…", live, []

        started = time.perf_counter()
        seeds = list(range(seed, seed + clips))
        ticket = batcher.submit(
            Request(num_samples, seeds, labels=labels, prompt=prompt, **sampling)
        )
        chunks, first_audio = yield from self._stream(ticket, seconds, rate, started)
        wall = time.perf_counter() - started

        audio = np.concatenate(chunks, axis=1)
        if prompt is not None:
            audio = np.concatenate([np.broadcast_to(prompt, (clips, len(prompt))), audio], axis=1)
        files, ranking, results = write_ranked(
            Path(tempfile.mkdtemp(dir=self._outputs.name)),  # one per request: no clashes
            audio,
            ticket.bits,  # (clips,), each under its own labels, scored with its batch
            rate,
            seed,
            labels,
            None if prompt is None else len(prompt) / rate,
            what + settings,
            bool(generator.config.labels),
            ticket.evidence,
        )
        speed = clips * seconds / wall
        guided = f" · guidance {sampling['guidance']}" if any(labels) else ""
        others = ticket.requests - 1
        shared = f" · batched with {others} other request{'s' * (others > 1)}" if others else ""
        status = (
            f"{clips} clip{'s' * (clips > 1)} × {seconds:g} s sampled in {wall:.1f} s "
            f"({speed:.2f}× real time, first audio after {first_audio:.2f} s) · seed {seed}"
            f"{guided}{shared} · {generator.device}"
        )
        yield files, ranking, seed, status, gr.skip(), results

    def _stream(self, ticket, seconds: float, rate: int, started: float):
        """Follow a submitted request chunk by chunk, yielding progress and clip 1's audio for the
        live player; returns (the chunks, each (clips, n), seconds until the first audio)."""
        chunks, done, first_audio = [], 0, None
        num_samples = round(seconds * rate)
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
        return chunks, first_audio

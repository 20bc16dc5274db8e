"""The web UI's page: its Gradio layout, and the events that connect it to the handlers.

`build_page(ui)` lays the page out top to bottom (model picker and card, sampling settings, label
menus and guidance, the Generate and Continue tabs, the live player and the results) and connects
each button to a handler of `ui` (sashimi/webui.py), the code that checks and samples a request.
The two sampling events are the API: /generate and /continue, with the parameters in the order the
handlers take them; every other event is private to the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
import soundfile as sf

from .guidance import DEFAULT_GUIDANCE
from .labels import Vocabulary
from .plots import write_clip_picture
from .webui_requests import (
    ANY,
    RANDOM,
    check_number,
    checkpoint_vocabulary,
    display_path,
    refused,
)

if TYPE_CHECKING:
    from .webui import WebUI

INTRO = (
    "# SaShiMi\nRaw audio sampled one value at a time by a state-space U-Net "
    "(S4 layers, run as a recurrence). Pick a model, generate or continue a sound, "
    "and listen while it is being made."
)
# then "label evidence" and "labels" for a labelled checkpoint
RANKING_HEADERS = ["rank", "seed", "bits per sample"]
NO_EVIDENCE = "-"  # the label evidence of a clip sampled without guidance or asked for nothing
# Gradio builds the page once, so it holds this many label menus, shown, named and filled for the
# chosen checkpoint's fields and hidden otherwise; fields beyond them stay unknown on the page
# (the API's `labels` reaches every field).
MAX_LABEL_FIELDS = 4
# min, max, step; the API checks its values against them too
GUIDANCE_SLIDER = (0.0, 10.0, 0.5)  # the weight, at the start and after
GUIDANCE_SECONDS_SLIDER = (0.0, 5.0, 0.1)  # how long the first weight holds


# --- the label menus -------------------------------------------------------------------------
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


def label_controls(checkpoint: str | None) -> list[dict]:
    """Updates of the label menus and the guidance slider's column for the picked checkpoint."""
    vocabulary = checkpoint_vocabulary(checkpoint)
    menus = [gr.update(**menu) for menu in label_menus(vocabulary)]
    return [*menus, gr.update(visible=bool(vocabulary))]


def menu_labels(checkpoint: str | None, *values: str | None) -> dict[str, str]:
    """What the menus ask for, as the endpoints' `labels`: {field: value or RANDOM}."""
    fields = checkpoint_vocabulary(checkpoint)
    return {f: v for f, v in zip(fields, values, strict=False) if v not in (None, ANY)}


# --- inputs that refuse bad values, and the pictures of the results ----------------------------
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


def clip_figure(clip: dict) -> str:
    """The waveform and spectrogram of a result as a PNG beside its WAV, drawn when the page shows
    it: a figure costs 1.2 s of CPU for a 0.5 s clip on the project's 2-core VM (two thirds of
    sampling it), and API clients, answered without it, never ask for one."""
    wav = Path(clip["wav"])
    audio, rate = sf.read(wav, dtype="float32")
    title = f"#{clip['rank']}  {wav.stem}"
    return str(write_clip_picture(wav, audio, rate, marker_seconds=clip["marker"], title=title))


# --- the layout, top to bottom ---------------------------------------------------------------
@dataclass
class Page:
    """The components that events read or write, in the order the page shows them."""

    picker: gr.Dropdown
    card: gr.Markdown
    clips: gr.Number
    temperature: gr.Slider
    top_p: gr.Slider
    seed: gr.Number
    random_seed: gr.Checkbox
    menus: list[gr.Dropdown]
    guidance_column: gr.Row
    guidance: gr.Slider
    guidance_seconds: gr.Slider
    guidance_after: gr.Slider
    labels: gr.JSON
    seconds: gr.Number
    generate_button: gr.Button
    prompt: gr.Audio
    keep_seconds: gr.Number
    add_seconds: gr.Number
    continue_button: gr.Button
    stop_button: gr.Button
    live: gr.Audio
    status: gr.Markdown
    files: gr.File
    ranking: gr.Dataframe
    results: gr.State


def build_page(ui: WebUI) -> gr.Blocks:
    """The page over `ui`'s checkpoints, limits and handlers."""
    with gr.Blocks(title="SaShiMi", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        names = [display_path(p) for p in ui.checkpoints]
        with gr.Row():
            picker = gr.Dropdown(names, value=ui.selected, label="model", scale=1)
            card = gr.Markdown(ui.models.card(None) if not names else "loading…")
        page = Page(  # each section returns its components in the order Page names them
            picker,
            card,
            *sampling_inputs(ui.limits.max_clips),
            *label_inputs(checkpoint_vocabulary(ui.selected)),
            *request_tabs(ui.limits.max_seconds),
            *result_outputs(ui.live_playback),
        )
        connect(ui, page)
        demo.load(ui.models.card, picker, card, api_visibility="private")
    return demo


def sampling_inputs(
    max_clips: int,
) -> tuple[gr.Number, gr.Slider, gr.Slider, gr.Number, gr.Checkbox]:
    """The settings both tabs share: clips, temperature, top-p, the seed or a random one."""
    with gr.Row():
        clips = gr.Number(
            1, label="clips", precision=0, minimum=1, info=f"sampled together, up to {max_clips}"
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
            info="sample only from the likeliest classes holding this much probability (1 = off)",
        )
        seed = gr.Number(
            0,
            label="seed",
            precision=0,
            minimum=0,
            info="shows the seed used; clip i uses seed + i",
        )
        random_seed = gr.Checkbox(True, label="random seed")
    return clips, temperature, top_p, seed, random_seed


def label_inputs(
    vocabulary: Vocabulary,
) -> tuple[list[gr.Dropdown], gr.Column, gr.Slider, gr.Slider, gr.Slider, gr.JSON]:
    """A labelled checkpoint's menus (see MAX_LABEL_FIELDS) and guidance (sashimi/guidance.py:
    a weight for the first seconds of new audio, then another), and the endpoints' `labels`
    parameter, hidden: written from the menus when a button is clicked, so that API clients send
    one dict however many menus the page shows."""
    with gr.Row():
        info = f"{RANDOM}: each clip draws one (from its seed); {ANY}: left open"
        menus = [gr.Dropdown(**menu, info=info) for menu in label_menus(vocabulary)]
    with gr.Row(visible=bool(vocabulary), elem_id="guidance") as guidance_column:
        guidance = gr.Slider(
            *GUIDANCE_SLIDER[:2],
            DEFAULT_GUIDANCE.weight,
            step=GUIDANCE_SLIDER[2],
            label="guidance",
            info="classifier-free guidance: 1 = none, higher = closer to the labels",
        )
        seconds = gr.Slider(
            *GUIDANCE_SECONDS_SLIDER[:2],
            DEFAULT_GUIDANCE.seconds,
            step=GUIDANCE_SECONDS_SLIDER[2],
            label="guidance seconds",
            info="how long that weight holds: a word is decided in its first few tenths",
        )
        after = gr.Slider(
            *GUIDANCE_SLIDER[:2],
            DEFAULT_GUIDANCE.after,
            step=GUIDANCE_SLIDER[2],
            label="guidance after",
            info="the weight after those seconds: lower keeps the silence after a word clean",
        )
    labels = gr.JSON(None, label="labels", visible=False)
    return menus, guidance_column, guidance, seconds, after, labels


def request_tabs(
    max_seconds: float,
) -> tuple[gr.Number, gr.Button, gr.Audio, gr.Number, gr.Number, gr.Button, gr.Button]:
    """The Generate tab (seconds per clip), the Continue tab (a prompt, the seconds of it to keep
    and the seconds to add), and the Stop button under both."""
    up_to = f"up to {max_seconds:g} s"
    with gr.Tabs():
        with gr.Tab("Generate"):
            seconds = gr.Number(1.0, label="seconds per clip", minimum=0, info=up_to)
            generate_button = gr.Button("Generate", variant="primary")
        with gr.Tab("Continue"):
            prompt = gr.Audio(
                sources=["upload", "microphone"],
                type="filepath",
                label="prompt (.wav .flac .ogg .mp3, or record)",
            )
            with gr.Row():
                keep_seconds = gr.Number(
                    1.0, label="seconds of the prompt to keep", minimum=0, info="from its start"
                )
                add_seconds = gr.Number(1.0, label="seconds to add", minimum=0, info=up_to)
            continue_button = gr.Button("Continue", variant="primary")
    stop_button = gr.Button("Stop", variant="stop")
    return seconds, generate_button, prompt, keep_seconds, add_seconds, continue_button, stop_button


def result_outputs(
    live_playback: bool,
) -> tuple[gr.Audio, gr.Markdown, gr.File, gr.Dataframe, gr.State]:
    """The live player, the status line, the files and their ranking, and every clip as a player
    with its picture."""
    live = gr.Audio(
        label="live: clip 1 while it is being sampled"
        if live_playback
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
            label="ranking: most label evidence first (bits per sample the asked labels "
            "explain), else fewest bits per sample (likeliest to the model)",
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

    return live, status, files, ranking, results


def connect(ui: WebUI, page: Page) -> None:
    """The events: each button reads the menus into `labels`, then calls its endpoint (the API:
    /generate and /continue); Stop cancels both; picking a model shows its card and menus."""
    guidance = [page.guidance, page.guidance_seconds, page.guidance_after]
    settings = [page.picker, page.clips, page.temperature, page.top_p, page.seed, *guidance]
    for component in [*settings, page.seconds, page.keep_seconds, page.add_seconds]:
        refuse_bad_values(component)
    sampling = [page.temperature, page.top_p, page.seed, page.random_seed]
    guiding = [page.labels, *guidance]
    read_menus = dict(
        fn=menu_labels,
        inputs=[page.picker, *page.menus],
        outputs=page.labels,
        queue=False,  # a dict from the menus: no reason to wait behind sampling
        show_progress="hidden",
        api_visibility="private",
    )
    events = dict(
        outputs=[page.files, page.ranking, page.seed, page.status, page.live, page.results],
        show_progress_on=[page.status],  # the status line also holds the progress bar
        concurrency_limit=ui.limits.concurrency,
        concurrency_id="sampling",  # both endpoints share the limit
    )
    generate_event = page.generate_button.click(**read_menus).then(
        ui.generate,
        [page.picker, page.clips, page.seconds, *sampling, *guiding],
        api_name="generate",
        **events,
    )
    continue_event = page.continue_button.click(**read_menus).then(
        ui.continue_,
        [
            page.picker,
            page.prompt,
            page.keep_seconds,
            page.add_seconds,
            page.clips,
            *sampling,
            *guiding,
        ],
        api_name="continue",
        **events,
    )
    page.stop_button.click(
        lambda: "stopped",
        None,
        page.status,
        cancels=[generate_event, continue_event],
        api_visibility="private",
    )
    page.picker.change(ui.models.card, page.picker, page.card, api_visibility="private")
    page.picker.change(
        label_controls, page.picker, [*page.menus, page.guidance_column], api_visibility="private"
    )

"""The web UI apart from its page: the checks every request passes (sashimi/webui_requests.py), the
models it serves and the files it writes (sashimi/webui.py), on real checkpoints and real WAV files.
The page and its endpoints, driven as users drive them, are in tests/test_app.py."""

import json
import logging
from io import BytesIO
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import soundfile as sf

from sashimi.checkpoint import DEFAULT_CHECKPOINT
from sashimi.generate import Generator
from sashimi.guidance import Guidance
from sashimi.webui import Models, find_checkpoints, wav_bytes, write_ranked
from sashimi.webui_page import NO_EVIDENCE
from sashimi.webui_requests import (
    ANY,
    MAX_SEED,
    RANDOM,
    REPO_ROOT,
    Limits,
    check_number,
    check_sampling_request,
    checkpoint_vocabulary,
    clip_labels,
    display_path,
    draw_labels,
    parse_labels,
)

RATE = 8000  # the tiny checkpoints' sample rate
PCM16 = 1 / 32768  # one step of a 16-bit WAV file
VOCABULARY = {
    "digit": {"0": 3, "1": 2, "7": 1},
    "speaker": {"ann": 4, "bob": 2},
}  # the labelled one
LIMITS = Limits(max_seconds=2.0, max_clips=3)


# --- limits and the checks that hold a request to them ---------------------------------------
@pytest.mark.parametrize("field", ["max_seconds", "max_clips", "max_upload_mb", "concurrency"])
def test_limits_must_be_positive(field):
    with pytest.raises(ValueError, match=f"{field} must be positive, got 0"):
        Limits(**{field: 0})


def test_seconds_are_refused_outside_zero_to_the_limit_naming_the_flag():
    assert (
        LIMITS.check_seconds("seconds", 2) == 2.0 and LIMITS.check_seconds("seconds", 0.01) == 0.01
    )
    for seconds in (0, -1.0, None):
        with pytest.raises(gr.Error, match=f"seconds to add must be more than 0 s, got {seconds}"):
            LIMITS.check_seconds("seconds to add", seconds)
    with pytest.raises(gr.Error) as refusal:
        LIMITS.check_seconds("seconds", 2.5)
    assert refusal.value.message == (
        "seconds = 2.5 s is over this server's limit of 2 s (app.py --max-seconds)"
    )


def test_clips_are_a_whole_number_up_to_the_limit():
    assert LIMITS.check_clips(3.0) == 3 and isinstance(LIMITS.check_clips(3.0), int)
    for clips in (0, 4, 1.5, None):
        with pytest.raises(gr.Error, match=rf"from 1 to 3 \(app.py --max-clips\), got {clips}"):
            LIMITS.check_clips(clips)


def test_a_given_seed_leaves_room_for_every_clips_seed():
    highest = MAX_SEED - LIMITS.max_clips  # the last clip of a full batch seeds MAX_SEED
    assert LIMITS.pick_seed(highest, random_seed=False) == highest
    assert LIMITS.pick_seed(7.0, random_seed=False) == 7
    for seed in (highest + 1, -1, 2.5, None):
        with pytest.raises(gr.Error, match=f"seed must be a whole number from 0 to {highest}"):
            LIMITS.pick_seed(seed, random_seed=False)


def test_random_seeds_are_whole_numbers_in_range_and_ignore_the_given_one():
    seeds = {LIMITS.pick_seed(None, random_seed=True) for _ in range(100)}
    assert all(isinstance(s, int) and 0 <= s <= MAX_SEED - LIMITS.max_clips for s in seeds)
    assert (
        len(seeds) > 95
    )  # from 2**31 values, even one repeat in 100 draws has odds of 1 in 430,000


def test_a_refusal_is_logged_as_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="sashimi.webui_requests"):
        with pytest.raises(gr.Error):
            LIMITS.check_clips(9)
    assert caplog.messages == [
        "refused a request: clips must be a whole number from 1 to 3 (app.py --max-clips), got 9"
    ]


@pytest.mark.parametrize(
    "value, message",
    [
        (float("nan"), "top-p must be a finite number, got nan"),
        (float("inf"), "top-p must be a finite number, got inf"),
        (True, "top-p must be a finite number, got True"),
        ("0.5", "top-p must be a finite number, got '0.5'"),
        (0.01, "top-p must be at least 0.05, got 0.01"),
        (1.5, "top-p must be at most 1, got 1.5"),
    ],
)
def test_numbers_outside_a_components_range_are_refused_by_name(value, message):
    check_number("top-p", 0.05, 0.05, 1.0)  # the bounds themselves pass
    check_number("top-p", 1, 0.05, 1.0)
    with pytest.raises(gr.Error) as refusal:
        check_number("top-p", value, 0.05, 1.0)
    assert refusal.value.message == message


def test_sampling_settings_are_checked_and_unguided_without_labels():
    settings = dict(temperature=0.7, top_p=0.9)
    guidance = (4.0, 0.4, 1.5)
    checked = check_sampling_request(settings, guidance, [{"digit": "7"}, {}], 100)
    assert checked == dict(settings, guidance=Guidance(4.0, 0.4, 1.5))
    nothing_to_guide = check_sampling_request(settings, guidance, [{}, {}], 100)["guidance"]
    assert nothing_to_guide == Guidance(1.0) and not nothing_to_guide.guided
    assert check_sampling_request(settings, (None, None, None), [{}], 100)["guidance"] == Guidance()
    for i, name in enumerate(["guidance", "guidance_seconds", "guidance_after"]):
        sent = tuple(None if j == i else value for j, value in enumerate(guidance))
        with pytest.raises(gr.Error, match=f"{name} must be a number, got None"):
            check_sampling_request(settings, sent, [{"digit": "7"}], 100)
    with pytest.raises(gr.Error, match=r"guidance seconds must be 0 or more"):
        check_sampling_request(settings, (4.0, -0.1, 1.5), [{"digit": "7"}], 100)
    with pytest.raises(gr.Error, match=r"guidance after must be in \[0, 20\]"):
        check_sampling_request(settings, (4.0, 0.4, 21.0), [{"digit": "7"}], 100)
    with pytest.raises(gr.Error, match="temperature"):
        check_sampling_request(dict(settings, temperature=-1.0), guidance, [{}], 100)


# --- labels ----------------------------------------------------------------------------------
def test_labels_come_as_a_dict_or_its_json_text():
    assert parse_labels(None) == parse_labels("") == {}
    assert parse_labels({"digit": 7}) == {"digit": "7"}
    assert parse_labels('{"digit": "random", "speaker": "bob"}') == {
        "digit": RANDOM,
        "speaker": "bob",
    }
    for bad in ("digit=7", '["7"]', {"digit": True}, {"digit": ["7"]}):
        with pytest.raises(
            gr.Error, match=r'labels must be a JSON object such as \{"digit": "7"\}'
        ):
            parse_labels(bad)


def test_a_random_label_is_drawn_from_the_clips_seed_alone():
    asked = {"digit": RANDOM, "speaker": "bob"}
    batch = draw_labels(VOCABULARY, asked, range(20, 30))
    alone = [draw_labels(VOCABULARY, asked, range(seed, seed + 1))[0] for seed in range(20, 30)]
    assert batch == alone  # the same digit for a seed, whatever the batch around it
    assert all(list(labels) == ["digit", "speaker"] for labels in batch)  # the checkpoint's order
    assert all(labels["speaker"] == "bob" for labels in batch)
    assert {labels["digit"] for labels in batch} == {"0", "1", "7"}  # uniform: all of them in 10


def test_fields_left_any_or_unasked_stay_unknown():
    asked = {"speaker": ANY, "digit": "7"}  # the request's order is not the checkpoint's
    assert draw_labels(VOCABULARY, asked, range(3)) == [{"digit": "7"}] * 3
    assert draw_labels(VOCABULARY, {}, range(2)) == [{}, {}]


def test_clip_labels_refuse_unknown_fields_and_values_naming_the_known(tiny_labelled_checkpoint):
    generator = Generator.from_checkpoint(tiny_labelled_checkpoint, device="cpu")
    drawn = clip_labels(generator, {"digit": RANDOM, "speaker": "ann"}, range(5, 7))
    assert drawn == draw_labels(VOCABULARY, {"digit": RANDOM, "speaker": "ann"}, range(5, 7))
    with pytest.raises(gr.Error, match=r"unknown digit '5'; known values: 0, 1, 7"):
        clip_labels(generator, {"digit": "5"}, range(1))
    with pytest.raises(gr.Error, match=r"unknown label field 'colour'"):
        clip_labels(generator, json.dumps({"colour": RANDOM}), range(1))


def test_a_checkpoints_vocabulary_is_empty_when_unlabelled_or_unreadable(
    tiny_checkpoint, tiny_labelled_checkpoint, tmp_path
):
    assert checkpoint_vocabulary(str(tiny_labelled_checkpoint)) == VOCABULARY
    assert checkpoint_vocabulary(str(tiny_checkpoint)) == {}
    assert checkpoint_vocabulary(str(tmp_path / "nothing here")) == {}
    assert checkpoint_vocabulary(None) == {}


# --- checkpoints and models ------------------------------------------------------------------
def test_checkpoints_are_named_relative_to_the_repository_when_inside_it(tmp_path):
    assert display_path(REPO_ROOT / "checkpoints" / "fsdd") == "checkpoints/fsdd"
    assert display_path(tmp_path / "run") == str((tmp_path / "run").resolve())


def test_checkpoints_are_listed_once_and_a_given_folder_even_if_not_one(tiny_checkpoint, tmp_path):
    not_one = tmp_path / "not a checkpoint"
    found = find_checkpoints([tiny_checkpoint, not_one, tiny_checkpoint])
    assert found[-2:] == [tiny_checkpoint.resolve(), not_one.resolve()]
    assert len(found) == len(set(found))
    if DEFAULT_CHECKPOINT.exists():
        assert found[0] == DEFAULT_CHECKPOINT.resolve()  # checkpoints/ first


def test_a_model_is_loaded_once_and_its_card_tells_its_facts(tiny_checkpoint):
    models = Models(device="cpu")
    checkpoint = str(tiny_checkpoint)
    assert models.get(checkpoint) is models.get(checkpoint)
    assert models.batcher(checkpoint).generator is models.get(checkpoint)
    card = models.card(checkpoint)
    assert card.startswith(f"#### {tiny_checkpoint.resolve()}\n")
    assert "- sample rate: **8,000 Hz**" in card and "- training steps: **0**" in card
    assert "- device in use: **cpu**" in card and "- trained on: **random init**" in card
    assert "validation NLL" not in card  # the metadata has none: no row rather than "None"


def test_a_missing_model_is_refused_and_its_card_says_why(tmp_path):
    models = Models(device="cpu")
    missing = str(tmp_path / "gone")
    with pytest.raises(gr.Error, match="gone does not exist"):
        models.get(missing)
    assert models.card(missing).startswith(f"#### Cannot load {missing}\n")
    assert "python -m train" in models.card(None)
    with pytest.raises(gr.Error, match="No checkpoint to load"):
        models.get(None)


# --- the files a request writes --------------------------------------------------------------
def test_clips_are_written_best_first_named_by_seed_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.5, 0.5, (3, 400)).astype(np.float32)
    bits = np.array([2.5, 1.25, 3.0])  # clip 1 is the likeliest, then clip 0, then clip 2
    labels = [{"digit": "7"}, {"digit": "0", "speaker": "bob"}, {}]
    files, ranking, results = write_ranked(
        tmp_path,
        audio,
        bits,
        RATE,
        seed=40,
        labels=labels,
        prompt_end=0.02,
        name="gen_t1",
        labelled=True,
    )
    assert [Path(f).name for f in files] == [
        "sashimi_seed41_digit-0_speaker-bob_gen_t1.wav",
        "sashimi_seed40_digit-7_gen_t1.wav",
        "sashimi_seed42_gen_t1.wav",
    ]
    for path, row in zip(files, (1, 0, 2), strict=True):
        written, rate = sf.read(path, dtype="float32")
        assert rate == RATE and sf.info(path).subtype == "PCM_16"
        np.testing.assert_allclose(written, audio[row], atol=PCM16)  # one 16-bit rounding step
    assert ranking == {
        "headers": ["rank", "seed", "bits per sample", "label evidence", "labels"],
        "data": [
            [1, 41, 1.25, NO_EVIDENCE, "digit 0, speaker bob"],
            [2, 40, 2.5, NO_EVIDENCE, "digit 7"],
            [3, 42, 3.0, NO_EVIDENCE, ANY],
        ],
    }
    assert [r["label"] for r in results] == [
        "#1 · seed 41 · digit 0, speaker bob · 1.250 bits per sample",
        "#2 · seed 40 · digit 7 · 2.500 bits per sample",
        "#3 · seed 42 · 3.000 bits per sample",
    ]
    assert [(r["wav"], r["rank"], r["marker"]) for r in results] == [
        (f, rank, 0.02) for rank, f in enumerate(files, start=1)
    ]


def test_clips_with_label_evidence_are_ranked_by_it_then_by_bits(tmp_path):
    """The clip the asked labels explain best comes first, however likely; ties go to the
    likelier clip."""
    bits = np.array([2.0, 1.0, 3.0, 1.5])
    evidence = np.array([0.05, 0.01, 0.05, 0.2])
    labels = [{"digit": "7"}] * 4
    files, ranking, results = write_ranked(
        tmp_path, np.zeros((4, 80)), bits, RATE, 10, labels, None, "x", True, evidence
    )
    assert ranking["data"] == [
        [1, 13, 1.5, 0.2, "digit 7"],
        [2, 10, 2.0, 0.05, "digit 7"],
        [3, 12, 3.0, 0.05, "digit 7"],
        [4, 11, 1.0, 0.01, "digit 7"],
    ]
    assert [Path(f).name for f in files][0] == "sashimi_seed13_digit-7_x.wav"
    assert (
        results[0]["label"]
        == "#1 · seed 13 · digit 7 · 1.500 bits per sample · label evidence 0.200"
    )


def test_an_unlabelled_models_table_has_no_labels_column(tmp_path):
    files, ranking, results = write_ranked(
        tmp_path, np.zeros((1, 80)), np.array([4.0]), RATE, 0, [{}], None, "x", labelled=False
    )
    assert ranking == {"headers": ["rank", "seed", "bits per sample"], "data": [[1, 0, 4.0]]}
    assert results[0]["marker"] is None and Path(files[0]).name == "sashimi_seed0_x.wav"


def test_a_live_chunk_is_a_16_bit_wav_clipped_to_full_scale():
    chunk = np.array([0.0, 0.5, -0.25, 1.5, -2.0], dtype=np.float32)
    audio, rate = sf.read(BytesIO(wav_bytes(chunk, RATE)), dtype="float32")
    assert rate == RATE and sf.info(BytesIO(wav_bytes(chunk, RATE))).subtype == "PCM_16"
    np.testing.assert_allclose(audio, [0.0, 0.5, -0.25, 1.0, -1.0], atol=PCM16)

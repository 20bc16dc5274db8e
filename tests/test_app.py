"""The web UI as its users meet it: app.py started in a subprocess on a free local port with the
tiny checkpoints (one unlabelled, one labelled), driven through gradio_client's named endpoints and,
once, in headless Chromium."""

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app import main
from sashimi.audio import load_audio
from sashimi.generate import CHUNK_SECONDS, Generator
from sashimi.guidance import Guidance
from sashimi.webui import Limits, WebUI
from sashimi.webui_page import MAX_LABEL_FIELDS

APP = Path(__file__).resolve().parent.parent / "app.py"
CHROMIUM = Path("/usr/bin/chromium")
FFMPEG = shutil.which("ffmpeg")
RATE = 8000  # the tiny_checkpoint's sample rate
PCM16 = 1 / 32768  # one step of a 16-bit WAV file
MAX_SECONDS, MAX_CLIPS = 1.0, 2
SAMPLING = dict(temperature=1.0, top_p=0.95)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def missing_checkpoint(tmp_path_factory) -> Path:
    return (tmp_path_factory.mktemp("nothing") / "no_such_checkpoint").resolve()


@pytest.fixture(scope="module")
def app_server(tiny_checkpoint, tiny_labelled_checkpoint, missing_checkpoint, tmp_path_factory):
    """(URL, log file) of a running `python app.py` offering the tiny checkpoint (the page opens
    on it), the labelled one and a missing one."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "app.log"
    command = [
        sys.executable,
        str(APP),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--checkpoint",
        str(tiny_checkpoint),
        "--checkpoint",
        str(tiny_labelled_checkpoint),
        "--checkpoint",
        str(missing_checkpoint),
        "--max-seconds",
        str(MAX_SECONDS),
        "--max-clips",
        str(MAX_CLIPS),
        "--max-upload-mb",
        "1",
        "--concurrency",
        "4",
    ]
    with open(log, "w") as out:
        # started elsewhere than the repository: nothing may depend on the working directory
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180  # importing torch and Gradio on 2 busy cores
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"app.py did not start serving {url}:\n{log.read_text()}")
        time.sleep(0.5)
    yield url, log
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(app_server) -> str:
    return app_server[0]


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server, verbose=False)


def read_clips(files: list[str]) -> list[np.ndarray]:
    clips = []
    for path in files:
        audio, rate = sf.read(path, dtype="float32")
        assert rate == RATE, f"{path} is at {rate} Hz"
        clips.append(audio)
    return clips


def generate(client, checkpoint, clips=1, seconds=0.25, seed=0, random_seed=False):
    return client.predict(
        checkpoint and str(checkpoint),
        clips,
        seconds,
        SAMPLING["temperature"],
        SAMPLING["top_p"],
        seed,
        random_seed,
        api_name="/generate",
    )


def test_generate_returns_ranked_wavs_of_the_requested_length(client, tiny_checkpoint):
    files, ranking, seed, status, _live = generate(client, tiny_checkpoint, clips=2, seed=7)
    assert seed == 7
    clips = read_clips(files)
    assert [len(c) for c in clips] == [round(0.25 * RATE)] * 2
    assert not np.array_equal(clips[0], clips[1])  # two draws, not one copied
    rows = ranking["data"]  # [rank, seed, bits per sample], in the order of `files`
    assert [row[0] for row in rows] == [1, 2]
    assert sorted(row[1] for row in rows) == [7, 8]  # clip i of a batch uses seed + i
    assert rows[0][2] <= rows[1][2]  # best (fewest bits per sample) first
    # The bits shown are the model's own likelihood of each file, scored here independently.
    # 16-bit files hold the decoded mu-law values to 1/32768, far inside each class: same tokens.
    bits = Generator.from_checkpoint(tiny_checkpoint, device="cpu").log_likelihood(np.stack(clips))
    np.testing.assert_allclose([row[2] for row in rows], bits, atol=1e-4)  # shown to 4 decimals
    for path, row in zip(files, rows, strict=True):
        assert Path(path).name == f"sashimi_seed{row[1]}_generate_0.25s_t1_p0.95.wav"
    assert "2 clips" in status and "real time" in status


@pytest.mark.skipif(FFMPEG is None, reason="needs ffmpeg: Gradio encodes the live stream with it")
def test_generate_streams_each_chunk_before_the_clip_is_done(client, tiny_checkpoint):
    job = client.submit(
        str(tiny_checkpoint), 1, 0.5, *SAMPLING.values(), 0, False, api_name="/generate"
    )
    updates = list(job)  # every update the page would get, in order
    live = [i for i, update in enumerate(updates) if isinstance(update[4], str)]
    assert len(live) == math.ceil(0.5 / CHUNK_SECONDS)  # one live update per sampled chunk
    assert all(updates[i][4].endswith(".m3u8") for i in live)  # an HLS playlist that grows
    assert "sampled 0.50 of 0.5 s of audio" in updates[live[-1]][3]  # progress in audio seconds
    assert live[-1] < len(updates) - 1 and updates[-1][0]  # all of them before the files


def test_the_shipped_model_is_named_as_the_picker_shows_it(client):
    """checkpoints/fsdd, relative to the repository, whatever the server's working directory."""
    files, ranking, *_ = generate(client, "checkpoints/fsdd", clips=1, seconds=0.1)
    audio, rate = sf.read(files[0])
    assert rate == 8000 and len(audio) == 800 and len(ranking["data"]) == 1


def test_random_seed_is_reported_and_reproduces_the_clip(client, tiny_checkpoint):
    files, _, seed, _, _ = generate(client, tiny_checkpoint, random_seed=True)
    assert isinstance(seed, int) and f"seed{seed}_" in Path(files[0]).name
    replay = generate(client, tiny_checkpoint, seed=seed)[0]
    np.testing.assert_array_equal(read_clips(replay)[0], read_clips(files)[0])


def test_continue_returns_the_prompt_then_the_continuation(client, tiny_checkpoint, tmp_path):
    # A stereo 16 kHz prompt: the app must mix it to mono and resample it to the model's 8 kHz.
    t = np.arange(16_000) / 16_000
    tone = 0.5 * np.sin(2 * np.pi * 220 * t)
    prompt = tmp_path / "prompt.wav"
    sf.write(prompt, np.stack([tone, 0.5 * tone], axis=1), 16_000, subtype="PCM_16")
    files, _, _, status, _ = client.predict(
        str(tiny_checkpoint),
        handle_file(str(prompt)),
        0.25,
        0.5,
        1,
        SAMPLING["temperature"],
        SAMPLING["top_p"],
        3,
        False,
        api_name="/continue",
    )
    (clip,) = read_clips(files)
    kept = round(0.25 * RATE)
    assert len(clip) == kept + round(0.5 * RATE)
    expected = load_audio(prompt, RATE)[:kept]
    np.testing.assert_allclose(clip[:kept], expected, atol=PCM16)  # one 16-bit rounding step
    assert np.abs(clip[kept:]).max() > 0  # something was added after the prompt
    assert "_continue_keep0.25s_add0.5s_" in Path(files[0]).name and "1 clip " in status


def test_too_long_or_too_many_requests_are_refused_with_the_limit(client, tiny_checkpoint):
    with pytest.raises(AppError, match=r"over this server's limit of 1 s \(app.py --max-seconds\)"):
        generate(client, tiny_checkpoint, seconds=5.0)
    with pytest.raises(AppError, match=r"clips must be a whole number from 1 to 2"):
        generate(client, tiny_checkpoint, clips=3)


def test_corrupt_upload_is_refused_with_its_name(client, tiny_checkpoint, tmp_path):
    corrupt = tmp_path / "broken.wav"
    corrupt.write_bytes(b"RIFF but not really a wave file" * 10)
    with pytest.raises(AppError, match=r"broken\.wav: not readable as audio"):
        client.predict(
            str(tiny_checkpoint),
            handle_file(str(corrupt)),
            0.25,
            0.25,
            1,
            SAMPLING["temperature"],
            SAMPLING["top_p"],
            0,
            False,
            api_name="/continue",
        )


def test_upload_over_the_size_limit_is_refused_by_the_server(server):
    oversized = b"\0" * (2**20 + 1)  # --max-upload-mb 1, plus one byte
    response = httpx.post(f"{server}gradio_api/upload", files={"files": ("big.wav", oversized)})
    assert response.status_code == 413, response.text


def test_missing_checkpoint_is_reported(client, missing_checkpoint):
    with pytest.raises(AppError, match=r"no_such_checkpoint does not exist"):
        generate(client, missing_checkpoint)
    with pytest.raises(AppError, match=r"No checkpoint to load: .* python -m train"):
        generate(client, None)


def test_simultaneous_requests_each_keep_their_own_settings(client, tiny_labelled_checkpoint):
    """Requests that arrive together are sampled as one batch (when they reach the server within
    its window): each still gets the clip its own seed, temperature, top-p, length and labels
    give alone."""
    asked = [  # seed, temperature, top_p, seconds, labels
        (1, 1.0, 0.95, 0.05, {"digit": "7"}),
        (2, 0.7, 1.0, 0.1, {"digit": "0", "speaker": "bob"}),
        (3, 0.0, 1.0, 0.075, {}),
    ]
    jobs = [
        client.submit(
            str(tiny_labelled_checkpoint),
            1,
            seconds,
            temperature,
            top_p,
            seed,
            False,
            labels=labels,
            guidance=2.0,
            api_name="/generate",
        )
        for seed, temperature, top_p, seconds, labels in asked
    ]
    results = [job.result(timeout=300) for job in jobs]
    generator = Generator.from_checkpoint(tiny_labelled_checkpoint, device="cpu")
    for (seed, temperature, top_p, seconds, labels), result in zip(asked, results, strict=True):
        (clip,) = read_clips(result[0])
        expected = generator.generate(
            round(seconds * RATE),
            seed=seed,
            temperature=temperature,
            top_p=top_p,
            labels=labels,
            guidance=2.0,
            show_progress=False,
        )[0]
        np.testing.assert_allclose(clip, expected, atol=PCM16)
        assert result[2] == seed


# --- labels and guidance (the labelled checkpoint: digit 0, 1, 7 and speaker ann, bob) --------------
LABELLED_SECONDS = 0.05


def generate_labelled(client, checkpoint, labels, guidance, clips=1, seed=0, **guidance_over_time):
    return client.predict(
        str(checkpoint),
        clips,
        LABELLED_SECONDS,
        *SAMPLING.values(),
        seed,
        False,
        labels=labels,
        guidance=guidance,
        **guidance_over_time,
        api_name="/generate",
    )


def test_asked_digit_with_guidance_is_the_librarys_clip(client, tiny_labelled_checkpoint):
    """Guidance 3 for the first 0.02 s (160 of the 400 samples), then 1.0, as the API sends it."""
    files, ranking, *_ = generate_labelled(
        client,
        tiny_labelled_checkpoint,
        {"digit": "7"},
        3.0,
        seed=11,
        guidance_seconds=0.02,
        guidance_after=1.0,
    )
    (clip,) = read_clips(files)
    generator = Generator.from_checkpoint(tiny_labelled_checkpoint, device="cpu")
    expected = generator.generate(
        round(LABELLED_SECONDS * RATE),
        seed=11,
        labels={"digit": "7"},
        guidance=Guidance(3.0, 0.02, 1.0),
        **SAMPLING,
    )[0]
    np.testing.assert_allclose(clip, expected, atol=PCM16)  # one 16-bit rounding step
    assert Path(files[0]).name == "sashimi_seed11_digit-7_generate_0.05s_t1_p0.95_g3-0.02s-1.wav"
    assert ranking["headers"] == ["rank", "seed", "bits per sample", "label evidence", "labels"]
    (row,) = ranking["data"]
    assert row[1] == 11 and row[4] == "digit 7"
    # the likelihood of the clip under its own labels, not with every field unknown
    bits = generator.log_likelihood(clip, {"digit": "7"})
    np.testing.assert_allclose(row[2], bits, atol=1e-4)  # shown to 4 decimals
    unknown = generator.log_likelihood(clip)
    assert abs(row[2] - unknown[0]) > 1e-3
    # and the bits per sample the asked digit saves, which ranks guided clips
    np.testing.assert_allclose(row[3], unknown - bits, atol=1e-4)


def test_random_label_is_drawn_per_clip_from_its_seed(client, tiny_labelled_checkpoint):
    """ "random" gives each clip a value, named in its file; the clip's seed alone redraws it."""
    labels = json.dumps({"digit": "random", "speaker": "bob"})  # JSON text works as well as a dict
    files, ranking, *_ = generate_labelled(
        client, tiny_labelled_checkpoint, labels, 2.0, clips=2, seed=20
    )
    drawn = {row[1]: row[4] for row in ranking["data"]}  # seed -> "digit X, speaker bob"
    assert sorted(drawn) == [20, 21]
    digits = {
        seed: text.removeprefix("digit ").removesuffix(", speaker bob")
        for seed, text in drawn.items()
    }
    assert set(digits.values()) <= {"0", "1", "7"}
    for path, row in zip(files, ranking["data"], strict=True):
        assert f"seed{row[1]}_digit-{digits[row[1]]}_speaker-bob_generate_" in Path(path).name
    generator = Generator.from_checkpoint(tiny_labelled_checkpoint, device="cpu")
    expected = generator.generate(
        round(LABELLED_SECONDS * RATE),
        batch_size=2,
        seed=20,
        labels=[{"digit": digits[seed], "speaker": "bob"} for seed in (20, 21)],
        guidance=2.0,
        **SAMPLING,
    )
    by_seed = {row[1]: clip for row, clip in zip(ranking["data"], read_clips(files), strict=True)}
    np.testing.assert_allclose([by_seed[20], by_seed[21]], expected, atol=PCM16)
    # alone, with seed 21, the clip draws the digit it drew as the second clip of a batch
    alone, *_ = generate_labelled(client, tiny_labelled_checkpoint, labels, 2.0, seed=21)
    assert f"_digit-{digits[21]}_speaker-bob_" in Path(alone[0]).name


def test_continue_takes_labels_and_guidance(client, tiny_labelled_checkpoint, tmp_path):
    prompt = tmp_path / "prompt.wav"
    t = np.arange(800) / RATE
    sf.write(prompt, 0.5 * np.sin(2 * np.pi * 300 * t), RATE, subtype="PCM_16")
    files, ranking, *_ = client.predict(
        str(tiny_labelled_checkpoint),
        handle_file(str(prompt)),
        0.05,
        LABELLED_SECONDS,
        1,
        *SAMPLING.values(),
        4,
        False,
        labels={"speaker": "ann"},
        guidance=1.5,
        api_name="/continue",
    )
    (clip,) = read_clips(files)
    kept = load_audio(prompt, RATE)[:400]
    generator = Generator.from_checkpoint(tiny_labelled_checkpoint, device="cpu")
    added = generator.generate(
        round(LABELLED_SECONDS * RATE),
        seed=4,
        prompt=kept,
        labels={"speaker": "ann"},
        guidance=1.5,
        **SAMPLING,
    )[0]
    np.testing.assert_allclose(clip, np.concatenate([kept, added]), atol=PCM16)
    assert "seed4_speaker-ann_continue_keep0.05s_add0.05s_t1_p0.95_g1.5.wav" in files[0]


def test_unknown_labels_are_refused_naming_the_known_ones(
    client, tiny_checkpoint, tiny_labelled_checkpoint
):
    with pytest.raises(AppError, match=r"unknown digit '5'; known values: 0, 1, 7"):
        generate_labelled(client, tiny_labelled_checkpoint, {"digit": "5"}, 2.0)
    with pytest.raises(AppError, match=r"unknown label field 'colour'; .*\['digit', 'speaker'\]"):
        generate_labelled(client, tiny_labelled_checkpoint, {"colour": "random"}, 2.0)
    with pytest.raises(AppError, match=r"trained without labels"):
        generate_labelled(client, tiny_checkpoint, {"digit": "7"}, 2.0)
    with pytest.raises(AppError, match=r'labels must be a JSON object such as \{"digit": "7"\}'):
        generate_labelled(client, tiny_labelled_checkpoint, "digit=7", 2.0)
    with pytest.raises(AppError, match=r"guidance must be at most 10, got 25"):  # the slider's
        generate_labelled(client, tiny_labelled_checkpoint, {"digit": "7"}, 25.0)
    with pytest.raises(AppError, match=r"guidance seconds must be at least 0, got -1"):
        generate_labelled(
            client, tiny_labelled_checkpoint, {"digit": "7"}, 2.0, guidance_seconds=-1
        )
    with pytest.raises(AppError, match=r"guidance after must be at most 10, got 11"):
        generate_labelled(client, tiny_labelled_checkpoint, {"digit": "7"}, 2.0, guidance_after=11)


def test_unlabelled_checkpoint_shows_no_label_controls(server):
    """The page opens on the unlabelled tiny checkpoint: every label menu and the guidance
    slider are hidden (the browser test shows them for the labelled one)."""
    config = httpx.get(f"{server}config").json()
    dropdowns = [c["props"] for c in config["components"] if c["type"] == "dropdown"]
    menus = [props for props in dropdowns if props["label"] != "model"]
    assert len(menus) == MAX_LABEL_FIELDS and not any(props["visible"] for props in menus)
    (column,) = [
        c["props"] for c in config["components"] if c["props"].get("elem_id") == "guidance"
    ]
    assert column["visible"] is False  # the guidance slider's


def call_over_http(server: str, endpoint: str, body: str) -> str:
    """The last line of a raw HTTP call to `endpoint` with the JSON text `body`, as curl sees it."""
    post = httpx.post(
        f"{server}gradio_api/call/{endpoint}",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    event_id = post.json()["event_id"]
    answer = httpx.get(f"{server}gradio_api/call/{endpoint}/{event_id}", timeout=120)
    return answer.text.strip().splitlines()[-1]


def test_too_few_values_over_raw_http_get_a_message(server, tiny_checkpoint):
    """A raw client that sends fewer values than the endpoint takes (say, from before the guidance
    sliders) is told so: Gradio refuses it before our handler runs."""
    data = [str(tiny_checkpoint), 1, 0.25, 1.0, 1.0, 0, False, None, 2.0]  # 9 of the 11
    last = call_over_http(server, "generate", json.dumps({"data": data}))
    error = json.loads(last.removeprefix("data: "))["error"]
    assert "didn't receive enough input values (needed: 11, got: 9)" in error


def test_nan_over_raw_http_is_refused_with_a_message(server, tiny_checkpoint):
    """JSON allows no NaN, but Python's parser takes it; Gradio's own check said nothing."""
    for position, name in ((1, "clips"), (5, "seed")):
        data = [str(tiny_checkpoint), 1, 0.25, 1.0, 1.0, 0, False, None, 2.0, 0.4, 1.5]
        text = json.dumps({"data": data[:position] + ["NAN"] + data[position + 1 :]})
        last = call_over_http(server, "generate", text.replace('"NAN"', "NaN"))
        assert json.loads(last.removeprefix("data: ")) == {
            "error": f"{name} must be a finite number, got nan",
            "duration": 10,
            "visible": True,
            "title": "Error",
        }


def test_a_refused_request_is_one_line_in_the_server_log(app_server, client, tiny_checkpoint):
    server, log = app_server
    before = log.read_text()
    with pytest.raises(AppError, match=r"temperature must be at most 2, got 5"):
        client.predict(str(tiny_checkpoint), 1, 0.25, 5.0, 1.0, 0, False, api_name="/generate")
    new_lines = log.read_text()[len(before) :].splitlines()
    assert len(new_lines) == 1, new_lines  # not Gradio's 25-line traceback
    assert new_lines[0].endswith("refused a request: temperature must be at most 2, got 5")


def test_bad_limits_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--max-seconds", "0"])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line == "python app.py: error: --max-seconds must be positive, got 0.0"


def test_without_ffmpeg_clips_still_arrive_with_a_silent_live_player(
    tiny_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no ffmpeg to find
    ui = WebUI([tiny_checkpoint], Limits(), device="cpu")
    assert not ui.live_playback
    assert "live playback needs FFmpeg on the server" in str(ui.build().config)
    checkpoint = str(tiny_checkpoint.resolve())
    updates = list(ui.generate(checkpoint, 1, 0.25, 1.0, 1.0, 5, False))
    assert all(update[4] == gr.skip() for update in updates)  # nothing sent to the live player
    files, _, seed, *_ = updates[-1]
    assert seed == 5 and len(sf.read(files[0])[0]) == round(0.25 * RATE)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_page_generates_in_headless_chromium(server, tiny_labelled_checkpoint, tmp_path):
    """The page opens on the unlabelled checkpoint with no label menus; picking the labelled one
    shows its menus (digit random, speaker any), and the digit picked there names the clip."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(server)
        expect(page.get_by_text("device in use")).to_be_visible(timeout=30_000)
        expect(page.get_by_label("guidance").first).to_be_hidden()
        page.get_by_role("combobox", name="model").click()
        page.get_by_role("option", name=str(tiny_labelled_checkpoint.resolve())).click()
        digit = page.get_by_role("combobox", name="digit")
        speaker = page.get_by_role("combobox", name="speaker")
        expect(digit).to_be_visible(timeout=30_000)
        expect(digit).to_have_value("random")
        expect(speaker).to_have_value("any")
        expect(page.get_by_label("guidance").first).to_be_visible()
        digit.click()
        page.get_by_role("option", name="7", exact=True).click()
        page.get_by_label("seconds per clip").fill("0.25")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_text(re.compile(r"#1 · seed \d+ · digit 7 · "))).to_be_visible(
            timeout=60_000
        )
        expect(page.get_by_text("sampled in")).to_be_visible()
        page.screenshot(path=tmp_path / "page.png", full_page=True)
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000

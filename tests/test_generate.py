"""The sampling engine against oracles outside it: the model's convolution mode, its functional
step, a plain softmax, and the Python objects that hold torch memory."""

import dataclasses
import gc
import math

import numpy as np
import pytest
import torch

from sashimi import SaShiMi, SaShiMiConfig
from sashimi.audio import decode, encode
from sashimi.fast_step import TorchStep, step_settings
from sashimi.generate import Generator, Sampler, check_sampling, resolve_device
from sashimi.guidance import Guidance
from sashimi.model import IGNORE_INDEX, is_label_parameter, nll_bits, shift_inputs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def generator() -> Generator:
    torch.manual_seed(0)
    return Generator(SaShiMi(SaShiMiConfig.preset("tiny")), device="cpu")


def prompt_audio(samples: int = 200) -> np.ndarray:
    t = np.arange(samples) / 8000
    return (0.5 * np.sin(2 * np.pi * 440 * t) * np.exp(-3 * t)).astype(np.float32)


def greedy_decode_by_convolution(model: SaShiMi, tokens: torch.Tensor, steps: int) -> torch.Tensor:
    """The naive oracle: rerun model(tokens) over the whole growing sequence for every new sample,
    padding it with silence to a multiple of total_pool (causal, so the padding changes nothing)."""
    q = model.config.total_pool
    with step_settings(CPU):  # one thread: this loop is 25 ms/forward instead of ~90 ms
        for _ in range(steps):
            L = tokens.shape[1]
            padded = torch.nn.functional.pad(tokens, (0, -L % q), value=model.start_token)
            next_token = model(padded)[:, L - 1].argmax(-1)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return tokens


def classes(generator: Generator, audio: np.ndarray) -> torch.Tensor:
    return encode(
        torch.from_numpy(audio), generator.config.quantization, generator.config.n_classes
    )


def test_greedy_samples_equal_a_greedy_decode_in_convolution_mode(generator):
    steps = 200
    engine = generator.generate(steps, temperature=0, show_progress=False)
    start = torch.full((1, 1), generator.model.start_token)
    oracle = greedy_decode_by_convolution(generator.model, start, steps)[:, 1:]
    expected = decode(oracle, generator.config.quantization, generator.config.n_classes).numpy()
    assert len(np.unique(engine)) > 20  # the decode wanders: a constant run would prove little
    np.testing.assert_array_equal(engine, expected)


def test_same_seed_same_audio_and_different_seeds_differ(generator):
    kwargs = dict(temperature=0.9, top_p=0.95, top_k=100, show_progress=False)
    first = generator.generate(400, batch_size=2, seed=7, **kwargs)
    again = generator.generate(400, batch_size=2, seed=7, **kwargs)
    other = generator.generate(400, batch_size=2, seed=8, **kwargs)
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.5
    assert (first[0] != first[1]).mean() > 0.5  # the clips of a batch draw different noise
    # clip r of a batch uses seed + r: clip 1 of seed 7 is clip 0 of seed 8
    np.testing.assert_array_equal(first[1], other[0])


def test_each_clip_keeps_its_own_seed_temperature_and_top_p(generator):
    """Requests the web UI samples together: clip r of a batch with its own settings is the clip
    those settings give alone (a greedy clip among sampled ones included)."""
    seeds, temperatures, top_ps = [11, 5, 30], [1.0, 0.0, 0.7], [0.9, 1.0, 1.0]
    together = generator.generate(
        300, batch_size=3, seed=seeds, temperature=temperatures, top_p=top_ps, show_progress=False
    )
    for r, settings in enumerate(zip(seeds, temperatures, top_ps, strict=True)):
        seed, temperature, top_p = settings
        alone = generator.generate(
            300, seed=seed, temperature=temperature, top_p=top_p, show_progress=False
        )
        np.testing.assert_array_equal(together[r], alone[0])
    assert len({together[r].tobytes() for r in range(3)}) == 3
    with pytest.raises(ValueError, match="seed has 2 values for 3 clips"):
        generator.generate(10, batch_size=3, seed=[1, 2], show_progress=False)


def test_chunking_does_not_change_the_audio(generator):
    whole = generator.generate(300, seed=3, show_progress=False)
    chunks = list(generator.stream(300, seed=3, chunk_size=7, show_progress=False))
    assert [c.shape for c in chunks] == [(1, 7)] * 42 + [(1, 6)]
    assert all(c.dtype == np.float32 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole)


def test_progress_callback_and_bar(generator, capsys):
    calls = []
    list(
        generator.stream(
            100, chunk_size=40, progress=lambda done, total: calls.append((done, total))
        )
    )
    assert calls == [(40, 100), (80, 100), (100, 100)]
    bar = capsys.readouterr().err
    assert "100/100" in bar and "sample" in bar


def test_primed_state_equals_the_stepped_state_and_continues_right_after_the_prompt(generator):
    model, prompt = (
        generator.model,
        prompt_audio(203),
    )  # 204 tokens with the start: not whole groups
    tokens = torch.cat(
        [torch.tensor([[model.start_token]]), classes(generator, prompt)[None]], dim=1
    )
    torch_steps = Generator(model, device="cpu")
    torch_steps.fused = False  # a TorchStep, whose state can be read
    logits, step = torch_steps.start(2, prompt)  # read once, then copied to both clips
    primed = step.state
    with torch.inference_mode():
        stepped = model.initial_state(1)
        for t in range(tokens.shape[1]):
            stepped_logits, stepped = model.step(tokens[:, t], stepped)

    def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:  # want: one clip, for both
        # prime's FFT against 204 float32 steps: round-off ~1e-6 (tests/test_model.py), 1e-4 margin
        torch.testing.assert_close(got, want.expand_as(got), atol=1e-4, rtol=0)

    assert_close(logits, stepped_logits)
    for got, want in zip(primed.tiers, stepped.tiers, strict=True):
        assert got.position == want.position and len(got.pending) == len(want.pending)
        for got_x, want_x in zip(
            (got.upsampled, *got.pending, *got.stack.x),
            (want.upsampled, *want.pending, *want.stack.x),
            strict=True,
        ):
            assert_close(got_x, want_x)
    for got_x, want_x in zip(primed.center.x, stepped.center.x, strict=True):
        assert_close(got_x, want_x)

    # the first new sample is predicted by the convolution-mode logits at the prompt's last sample
    q = model.config.total_pool
    L = tokens.shape[1]
    with torch.inference_mode():
        conv_logits = model(torch.nn.functional.pad(tokens, (0, -L % q), value=model.start_token))
    assert_close(logits, conv_logits[:, L - 1])

    both = generator.generate(50, batch_size=2, prompt=prompt, temperature=0, show_progress=False)
    oracle = greedy_decode_by_convolution(model, tokens, 50)[:, L:]
    expected = decode(oracle, generator.config.quantization, generator.config.n_classes).numpy()
    np.testing.assert_array_equal(both, np.concatenate([expected, expected]))


def live_tensor_bytes() -> int:
    """Bytes of every torch storage reachable from a live Python tensor, each storage once.

    tracemalloc and RSS do not see torch's CPU allocations precisely (RSS moves in pages and keeps
    freed memory), but every tensor the engine keeps alive is a gc-tracked Python object, so
    walking gc.get_objects() counts exactly the tensor memory that is held at that moment.
    """
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":  # type(): no proxies
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_memory_does_not_grow_with_length(generator):
    """Generating 4x longer must not hold more tensor memory: the peak over the yielded chunks of
    what the engine keeps alive (beyond what existed before) stays within 10%. A history kept per
    step, e.g. the logits, would grow 4x."""

    def peak_held(num_samples: int) -> int:
        gc.collect()
        before = live_tensor_bytes()
        peak = 0
        for _ in generator.stream(num_samples, batch_size=2, chunk_size=250, show_progress=False):
            peak = max(peak, live_tensor_bytes() - before)
        return peak

    short, long = peak_held(500), peak_held(2000)
    assert 0 < short and long <= 1.1 * short


def test_a_long_run_stays_finite(generator):
    """20,000 steps: the stream checks its logits after every chunk and raises if not finite."""
    audio = generator.generate(20_000, chunk_size=4000, seed=1, show_progress=False)
    assert audio.shape == (1, 20_000) and np.isfinite(audio).all()
    assert np.abs(audio).max() > 0.01  # still making sound at the end, not stuck at silence
    assert len(np.unique(audio[0, -2000:])) > 10


def test_non_finite_logits_stop_the_stream():
    torch.manual_seed(0)
    model = SaShiMi(SaShiMiConfig.preset("tiny"))
    with torch.no_grad():
        model.head.bias[3] = math.nan
    with pytest.raises(FloatingPointError, match="not finite"):
        Generator(model, "cpu").generate(100, show_progress=False)


def test_sampler_follows_the_tempered_and_truncated_softmax():
    """Class frequencies of Gumbel-max draws against softmax(logits / T), restricted."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    draws = 4000

    def frequencies(**kwargs) -> torch.Tensor:
        sampler = Sampler(1, 4, draws, CPU, seed=0, **kwargs)
        sampler.draw_noise(draws)
        drawn = torch.cat([sampler(logits, j) for j in range(draws)])
        return torch.bincount(drawn, minlength=4) / draws

    def tempered(T: float, keep: int = 4) -> torch.Tensor:
        p = probs[:keep] ** (1 / T)
        return torch.cat([p / p.sum(), torch.zeros(4 - keep)])

    # 4000 draws: binomial standard error <= 0.008, so 0.035 is over 4 standard errors
    atol = 0.035
    torch.testing.assert_close(frequencies(), probs, atol=atol, rtol=0)
    torch.testing.assert_close(frequencies(temperature=0.5), tempered(0.5), atol=atol, rtol=0)
    torch.testing.assert_close(frequencies(top_k=2), tempered(1.0, keep=2), atol=atol, rtol=0)
    # top_p = 0.7: class 0 (0.5) is not enough, with class 1 the mass is 0.8 >= 0.7; stop there
    torch.testing.assert_close(frequencies(top_p=0.7), tempered(1.0, keep=2), atol=atol, rtol=0)
    assert frequencies(top_p=0.4)[0] == 1 and frequencies(top_k=1)[0] == 1
    assert frequencies(temperature=0)[0] == 1


def test_log_likelihood_matches_stepping(generator):
    """Bits per sample in convolution mode (padded: 100 is not a multiple of 16) against the sum
    of -log2 p(sample) over the functional recurrent step."""
    model = generator.model
    audio = np.stack([prompt_audio(100), -prompt_audio(100)])
    bits = generator.log_likelihood(audio)
    targets = classes(generator, audio)
    expected = torch.zeros(2)
    with torch.no_grad():
        state = model.initial_state(2)
        token = torch.full((2,), model.start_token)
        for t in range(100):
            logits, state = model.step(token, state)
            expected -= torch.log_softmax(logits, -1)[torch.arange(2), targets[:, t]] / math.log(2)
            token = targets[:, t]
    assert bits.shape == (2,) and bits.dtype == np.float32
    np.testing.assert_allclose(bits, expected.numpy() / 100, atol=1e-4)
    assert generator.log_likelihood(audio[0]).shape == (1,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_samples=-1), "num_samples must be 0 or more"),
        (dict(batch_size=0), "batch_size must be at least 1"),
        (dict(temperature=-0.5), "temperature must be"),
        (dict(temperature=math.nan), "temperature must be"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-3), "top_k must be 0"),
        (dict(chunk_size=0), "chunk_size must be at least 1"),
        (dict(guidance=-1.0), r"guidance must be in \[0, 20\]"),
        (dict(guidance=math.nan), r"guidance must be in \[0, 20\]"),
        (dict(batch_size=2, temperature=[1.0, math.nan]), "temperature must be"),
        (dict(batch_size=2, top_p=[0.9, 1.0, 1.0]), "top_p has 3 values for 2 clips"),
    ],
)
def test_bad_sampling_arguments_are_refused(generator, kwargs, message):
    kwargs = {"num_samples": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        check_sampling(**kwargs)
    with pytest.raises(ValueError, match=message):
        next(generator.stream(show_progress=False, **kwargs))


@pytest.mark.parametrize(
    "prompt, message",
    [
        (np.zeros((2, 100), np.float32), r"mono audio with shape \(samples,\)"),
        (np.zeros(0, np.float32), r"mono audio with shape \(samples,\)"),
        (np.full(10, np.nan, np.float32), "non-finite"),
    ],
)
def test_bad_prompts_are_refused(generator, prompt, message):
    with pytest.raises(ValueError, match=message):
        generator.generate(10, prompt=prompt, show_progress=False)


def test_zero_samples_give_an_empty_batch(generator):
    assert generator.generate(0, batch_size=3, show_progress=False).shape == (3, 0)


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU; use cpu or auto"):
            resolve_device("cuda")


def test_from_checkpoint(tiny_checkpoint, tmp_path):
    generator = Generator.from_checkpoint(tiny_checkpoint, device="cpu")
    assert generator.sample_rate == 8000 and generator.device == CPU
    assert generator.metadata == {"step": 0, "train_data": "random init"}
    assert not generator.model.training
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Generator.from_checkpoint(tmp_path / "nowhere", device="cpu")


# --- labels and guidance ---------------------------------------------------------------------------

VOCABULARY = {"digit": {"0": 3, "1": 2, "7": 1}, "speaker": {"ann": 4, "bob": 2}}


@pytest.fixture(scope="module")
def labelled() -> Generator:
    """A tiny labelled model with random label weights (trained ones are not at hand; the
    projections' zero start would make every label path look right)."""
    torch.manual_seed(2)
    model = SaShiMi(dataclasses.replace(SaShiMiConfig.preset("tiny"), labels=VOCABULARY))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if is_label_parameter(name):
                parameter.normal_(0, 0.5)
    return Generator(model, device="cpu")


def guided_greedy_oracle(
    model: SaShiMi,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    guidance: float | list[float],
    steps: int,
) -> torch.Tensor:
    """Classifier-free guidance the slow way: both forwards over the whole sequence per sample.
    guidance: one weight, or one per new sample."""
    q = model.config.total_pool
    unknown = torch.zeros_like(labels)
    weights = guidance if isinstance(guidance, list) else [guidance] * steps
    with step_settings(CPU):
        for w in weights:
            L = tokens.shape[1]
            padded = torch.nn.functional.pad(tokens, (0, -L % q), value=model.start_token)
            given, free = model(padded, labels)[:, L - 1], model(padded, unknown)[:, L - 1]
            next_token = (free + w * (given - free)).argmax(-1)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return tokens


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_guided_greedy_samples_equal_the_guided_convolution_oracle(labelled, guidance):
    model, prompt = labelled.model, prompt_audio(37)  # 38 tokens with the start: not whole groups
    asked = [{"digit": "7", "speaker": "ann"}, {"digit": "0"}]
    engine = labelled.generate(
        50,
        batch_size=2,
        temperature=0,
        prompt=prompt,
        labels=asked,
        guidance=guidance,
        show_progress=False,
    )
    start = torch.full((1, 1), model.start_token)
    context = torch.cat([start, classes(labelled, prompt)[None]], dim=1).expand(2, -1)
    labels = torch.tensor([[3, 1], [1, 0]])
    oracle = guided_greedy_oracle(model, context, labels, guidance, 50)[:, context.shape[1] :]
    expected = decode(oracle, labelled.config.quantization, labelled.config.n_classes).numpy()
    np.testing.assert_array_equal(engine, expected)
    unguided = guided_greedy_oracle(model, context, torch.zeros_like(labels), 1.0, 50)
    assert (oracle != unguided[:, context.shape[1] :]).any()  # the labels changed the clips


@pytest.mark.parametrize("switch", [0, 1, 21])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("with_prompt", [True, False])
def test_guidance_that_changes_draws_each_sample_at_its_weight(
    labelled, switch, fused, with_prompt
):
    """Guidance(3, S seconds, 0.5): new samples [0, S * rate) are drawn at weight 3, the rest at
    0.5, as the oracle draws them, with and without a prompt, fused or torch's step."""
    model, prompt = labelled.model, prompt_audio(37) if with_prompt else None
    steps, rate = 40, labelled.sample_rate
    guidance = Guidance(3.0, switch / rate, 0.5)
    labelled.fused = fused
    try:
        engine = labelled.generate(
            steps,
            batch_size=2,
            temperature=0,
            prompt=prompt,
            labels=[{"digit": "7", "speaker": "ann"}, {"digit": "0"}],
            guidance=guidance,
            chunk_size=16,  # chunks that end before, at and after the switch
            show_progress=False,
        )
    finally:
        labelled.fused = True
    context = torch.full((1, 1), model.start_token)
    if with_prompt:
        context = torch.cat([context, classes(labelled, prompt)[None]], dim=1)
    context = context.expand(2, -1)
    labels = torch.tensor([[3, 1], [1, 0]])
    weights = [3.0] * switch + [0.5] * (steps - switch)
    oracle = guided_greedy_oracle(model, context, labels, weights, steps)[:, context.shape[1] :]
    expected = decode(oracle, labelled.config.quantization, labelled.config.n_classes).numpy()
    np.testing.assert_array_equal(engine, expected)
    held = guided_greedy_oracle(model, context, labels, 3.0, steps)[:, context.shape[1] :]
    assert (oracle[:, :switch] == held[:, :switch]).all() and (oracle != held).any()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("clips, guidance, with_prompt", [(3, 1.0, False), (9, 2.5, True)])
def test_log_probs_drawn_while_sampling_are_the_likelihood(
    labelled, fused, clips, guidance, with_prompt
):
    """stream(log_probs=True) scores each sample as it is drawn, unguided: under the clip's own
    labels and, when guided, under every field unknown; summed, what log_likelihood's convolution
    pass gives (9 clips: split in two groups)."""
    asked = [{"digit": "7"}, {}, {"digit": "0", "speaker": "bob"}] * (clips // 3)
    prompt = prompt_audio(37) if with_prompt else None
    labelled.fused = fused
    try:
        pairs = list(
            labelled.stream(
                100,
                batch_size=clips,
                seed=3,
                labels=asked,
                guidance=guidance,
                prompt=prompt,
                chunk_size=30,
                log_probs=True,
                show_progress=False,
            )
        )
    finally:
        labelled.fused = True
    audio = np.concatenate([chunk for chunk, _ in pairs], axis=1)
    log_probs = np.concatenate([scores for _, scores in pairs], axis=1)
    streams = [asked] if guidance == 1 else [asked, None]  # None: every field unknown
    assert log_probs.shape == (clips * len(streams), 100) and log_probs.dtype == np.float64
    assert (log_probs <= 0).all()
    bits = -log_probs.sum(1) / np.log(2)
    expected = []
    for labels in streams:
        if with_prompt:  # the samples' bits given the prompt: the whole clip's less the prompt's
            prompts = np.broadcast_to(prompt, (clips, len(prompt)))
            whole = np.concatenate([prompts, audio], axis=1)
            given = labelled.log_likelihood(whole, labels) * whole.shape[1]
            expected.append(given - labelled.log_likelihood(prompts, labels) * len(prompt))
        else:
            expected.append(labelled.log_likelihood(audio, labels) * 100)
    expected = np.concatenate(expected)
    np.testing.assert_allclose(bits / 100, expected / 100, atol=1e-5)  # float32 logits, 2 modes
    if guidance != 1:  # the clips asked for nothing read alike in both rows
        unasked = [r for r in range(clips) if not asked[r]]
        np.testing.assert_allclose(bits[unasked], bits[clips:][unasked], atol=1e-9)


def test_guidance_one_runs_one_row_per_clip_and_more_runs_two(labelled):
    rows = labelled.label_rows({"digit": "1"}, 3)
    assert rows.tolist() == [[2, 0]] * 3
    for fused in (True, False):
        labelled.fused = fused
        try:
            logits, step = labelled.start(3, labels=rows, guidance=1.0)
            assert not step.guided and logits.shape == (3, labelled.config.n_classes)
            logits, step = labelled.start(3, labels=rows, guidance=2.5)
            assert step.guided and logits.shape == (3, labelled.config.n_classes)
        finally:
            labelled.fused = True
    assert TorchStep(labelled.model, labelled.model.initial_state(6), 3).guided


def test_unknown_labels_are_refused_with_the_known_ones(labelled, generator):
    with pytest.raises(ValueError, match="unknown digit '9'; known values: 0, 1, 7"):
        labelled.generate(10, labels={"digit": "9"}, show_progress=False)
    with pytest.raises(ValueError, match=r"unknown label field 'voice'"):
        labelled.generate(10, labels={"voice": "ann"}, show_progress=False)
    with pytest.raises(ValueError, match="2 entries for 3 clips"):
        labelled.generate(10, batch_size=3, labels=[{}, {}], show_progress=False)
    with pytest.raises(ValueError, match="trained without labels"):
        generator.generate(10, labels={"digit": "1"}, show_progress=False)


def test_log_likelihood_with_labels_is_the_labelled_forward(labelled):
    audio = np.stack([prompt_audio(100), -prompt_audio(100)])
    asked = [{"digit": "7"}, {"speaker": "bob"}]
    bits = labelled.log_likelihood(audio, asked)
    targets = torch.nn.functional.pad(classes(labelled, audio), (0, 12), value=IGNORE_INDEX)
    model = labelled.model
    with torch.no_grad():
        logits = model(shift_inputs(targets, model.start_token), torch.tensor([[3, 0], [0, 2]]))
    expected = nll_bits(logits, targets, reduction="none").sum(1) / 100
    np.testing.assert_allclose(bits, expected.numpy(), atol=1e-5)  # the same ops: round-off only
    assert np.abs(bits - labelled.log_likelihood(audio)).max() > 1e-3

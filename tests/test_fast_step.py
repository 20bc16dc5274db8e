"""The fast paths (sashimi/fast_step/) against the reference: the fused CPU step against the
functional SaShiMi.step, generate's Sampler and TorchStep, over long runs, both kernels, several
tiers and batches; the CUDA graph against eager stepping where CUDA is; the CPU step settings."""

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sashimi import SaShiMi, SaShiMiConfig
from sashimi.fast_step import FusedStep, PeriodGraph, TorchStep, step_settings
from sashimi.fast_step.fused import SPLIT_MIN_CLIPS, SplitFusedStep, usable_cores
from sashimi.generate import Generator, Sampler
from sashimi.labels import UNKNOWN

CPU = torch.device("cpu")
DPLR = {"kernel": "dplr", "disc": "bilinear"}
STEPS = 4096


def small_model(seed: int = 0, **changes) -> SaShiMi:
    """The tiny preset made smaller still (the reference steps 4,096 times in each test)."""
    torch.manual_seed(seed)
    config = SaShiMiConfig.preset("tiny")
    config = dataclasses.replace(config, d_model=8, n_layers=1, d_state=8, **changes)
    return SaShiMi(config).eval()


def labelled_model(seed: int = 0, **changes) -> SaShiMi:
    """A small model with two label fields, its label projections random (they start at zero)."""
    labels = {"digit": {"0": 5, "1": 4, "2": 3}, "speaker": {"ann": 6, "bob": 6}}
    model = small_model(seed, labels=labels, **changes)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "label_projections" in name:
                parameter.normal_(0, 0.5)
    return model


def primed(model: SaShiMi, batch: int, prompt: int = 37, labels: torch.Tensor | None = None):
    """The state after a prompt read by model.prime. 37 is not a multiple of any tier's pooling,
    so pooling groups are part full and the tiers are out of phase."""
    torch.manual_seed(1)
    tokens = torch.randint(0, model.config.n_classes, (1, prompt))
    if labels is None:
        return model.prime(tokens)[1].for_batch(batch)
    return model.prime(tokens.expand(labels.shape[0], -1), labels)[1]


CASES = {  # kernel, pooling (tiers = pools + 1), batch
    "diagonal-3-tiers-batch-1": ({}, (4, 4), 1),
    "diagonal-4-tiers-batch-3": ({}, (2, 3, 2), 3),
    "dplr-3-tiers-batch-3": (DPLR, (4, 4), 3),
    "dplr-2-tiers-batch-1": (DPLR, (3,), 1),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_step_matches_the_functional_step(case):
    kernel, pool, batch = CASES[case]
    model = small_model(pool=pool, **kernel)
    tokens = torch.randint(0, model.config.n_classes, (batch, STEPS))
    worst = 0.0
    with torch.no_grad():
        state = primed(model, batch)
        fused = FusedStep(model, state, batch)
        for t in range(STEPS):
            expected, state = model.step(tokens[:, t], state)
            worst = max(worst, (fused(tokens[:, t]) - expected).abs().max().item())
    # float32 arithmetic summed in another order (and erf by a 2e-6 approximation) in both
    # paths; the SSM state forgets old round-off (|A_bar| < 1), so the gap does not grow with t
    assert worst <= 1e-4


@pytest.mark.parametrize("fused_step", [FusedStep, SplitFusedStep])
def test_fused_step_carries_label_biases_and_guides_as_generate_does(fused_step):
    model = labelled_model(pool=(2, 2))
    batch, guidance = 2, 3.0
    given = torch.tensor([[1, 2], [3, UNKNOWN]])
    rows = torch.cat([given, torch.full_like(given, UNKNOWN)])  # given, then all unknown
    tokens = torch.randint(0, model.config.n_classes, (batch, 1024))
    worst = 0.0
    with torch.no_grad():
        state = primed(model, batch, labels=rows)
        reference = TorchStep(model, state, batch, guidance)
        fused = fused_step(model, state, batch, guidance)
        assert fused.guided
        for t in range(tokens.shape[1]):
            expected = reference(tokens[:, t])
            worst = max(worst, (fused(tokens[:, t]) - expected).abs().max().item())
    # the tolerance of the functional-step test, times the guidance weight that scales the gap
    assert worst <= 1e-4 * guidance


def test_label_biases_change_the_fused_logits():
    """The agreement above is no accident of zero biases: other labels give other logits."""
    model = labelled_model()
    token = torch.tensor([3])
    with torch.no_grad():
        logits = [
            FusedStep(model, model.initial_state(1, torch.tensor([labels])), 1)(token)
            for labels in ([1, 1], [2, 1])
        ]
    assert (logits[0] - logits[1]).abs().max() > 1e-3


SAMPLING = {
    "plain": dict(temperature=1.0),
    "tempered-top-k": dict(temperature=0.8, top_k=20),
    "top-p": dict(temperature=1.2, top_p=0.9),
    "greedy": dict(temperature=0.0),
    # one setting per clip, as the web UI batches requests; the first clip greedy
    "per-clip": dict(temperature=[0.0, 0.9, 1.3], top_p=[1.0, 0.8, 0.95], top_k=50),
}


def sample_with_torch(model, state, batch, sampler, start, periods, period, guidance=1.0):
    """Generator's loop with its torch step: a step on the start token, then draw, step, repeat."""
    step = TorchStep(model, state, batch, guidance)
    logits = step(start)
    out = torch.empty(batch, periods * period, dtype=torch.long, device=start.device)
    for p in range(periods):
        sampler.draw_noise(period)
        for j in range(period):
            token = sampler(logits, j)
            out[:, p * period + j] = token
            logits = step(token)
    return out


@pytest.mark.parametrize("fused_step", [FusedStep, SplitFusedStep])
@pytest.mark.parametrize("sampling", SAMPLING)
def test_fused_sampling_draws_the_engines_tokens_for_the_same_seed(sampling, fused_step):
    """SplitFusedStep: clips 0 and 1-2 in two groups, each with its own settings and noise."""
    model = small_model(pool=(4, 4))
    batch, period, periods = 3, model.config.total_pool, 64
    kwargs = SAMPLING[sampling]

    def sampler():
        return Sampler(batch, model.config.n_classes, period, CPU, seed=5, **kwargs)

    with torch.no_grad():
        state = primed(model, batch)
        fused = fused_step(model, state, batch)  # a copy of the state, before torch steps it
        start = torch.full((batch,), model.start_token)
        expected = sample_with_torch(model, state, batch, sampler(), start, periods, period)
        logits = fused(start)
        draws, got = sampler(), torch.empty(batch, periods * period, dtype=torch.long)
        for p in range(periods):
            draws.draw_noise(period)
            logits = fused.run(period, logits, draws, got[:, p * period : (p + 1) * period])
    if not draws.greedy:
        assert len(got[-1].unique()) > 20  # a real draw, not a constant run
    # Identical: the logits agree to ~1e-6, far inside the gaps between Gumbel-max scores at
    # this length; round-off could flip a near-tie, which these seeds do not have.
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA device")
@pytest.mark.parametrize("labelled", [False, True], ids=["unlabelled", "guided"])
def test_cuda_graph_replays_draw_the_tokens_of_eager_steps(labelled):
    cuda = torch.device("cuda")
    model = (labelled_model(pool=(2, 2)) if labelled else small_model(pool=(2, 2))).to(cuda)
    batch, period, periods = 2, model.config.total_pool, 6
    labels = torch.tensor([[1, 2], [3, UNKNOWN]] * 2, device=cuda) if labelled else None
    guidance = 2.0 if labelled else 1.0
    start = torch.full((batch,), model.start_token, device=cuda)

    def sampler():
        return Sampler(batch, model.config.n_classes, period, cuda, seed=7, temperature=0.9)

    with step_settings(cuda):
        state = model.initial_state(len(labels) if labelled else batch, labels)
        expected = sample_with_torch(
            model, state, batch, sampler(), start, periods, period, guidance
        )
        step = TorchStep(model, state, batch, guidance)
        graph = PeriodGraph(step, sampler(), period, scoring=True)
        draws = graph.sampler
        logits = step(start)
        got = torch.empty(batch, periods * period, dtype=torch.long, device=cuda)
        log_probs = torch.empty(step.rows, periods * period, dtype=torch.float64, device=cuda)
        for p in range(periods):
            draws.draw_noise(period)
            chunk = got[:, p * period : (p + 1) * period]
            scores = log_probs[:, p * period : (p + 1) * period]
            replayed = graph.replay(logits, chunk, scores)
            if replayed is None:  # the warm-up period runs eagerly
                for j in range(period):
                    chunk[:, j] = token = draws(logits, j)
                    scores[:, j] = step.log_prob(token)
                    logits = step(token)
            else:
                logits = replayed
        # the log-probabilities scored while drawing: the clips' likelihood, by convolution,
        # in every state row (guided: the second half reads the clips under its own labels)
        bits = model.sequence_bits(list(got) * (step.rows // batch), labels)
    assert graph.graph is not None and not graph.failed  # periods 2.. were replays
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(-log_probs.sum(1) / math.log(2), bits.double(), rtol=0, atol=1e-3)


def test_compiles_without_a_writable_cache(tmp_path):
    """Where numba has no folder to cache in, functions still compile (in-process), with a
    warning. As root a read-only folder is still writable, so the cache paths are made to run
    through a file, which no one can create folders in."""
    module = tmp_path / "module"
    module.mkdir()
    (module / "__pycache__").write_text("a file where numba wants a folder")
    (module / "uncached.py").write_text(
        textwrap.dedent(
            """
            from sashimi.fast_step.fused import _compiled

            @_compiled
            def twice(x):
                return 2 * x
            """
        )
    )
    script = "import uncached; print(uncached.twice(21))"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(module), str(Path(__file__).parents[1])]),
        "XDG_CACHE_HOME": "/dev/null",  # numba's user-wide cache: ~/.cache or this
        "HOME": "/dev/null",
    }
    env.pop("NUMBA_CACHE_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "42"
    assert "numba cannot cache" in result.stderr


@pytest.mark.parametrize("labelled", [False, True], ids=["unlabelled", "guided"])
def test_generator_steps_fused_on_the_cpu_with_the_audio_of_torchs_step(labelled, caplog):
    model = labelled_model(pool=(2, 2)) if labelled else small_model(pool=(2, 2))
    with caplog.at_level("INFO", logger="sashimi.generate"):
        generator = Generator(model, device="cpu")
    assert generator.fused
    assert "the fused CPU step" in caplog.text
    prompt = 0.3 * np.sin(np.arange(45) / 3).astype(np.float32)  # primes part-full groups
    kwargs = dict(batch_size=2, seed=[3, 9], temperature=[0.9, 1.1], top_p=0.95, prompt=prompt)
    if labelled:
        kwargs.update(labels=[{"digit": "1"}, {"speaker": "bob"}], guidance=2.5)
    # chunks of 7 samples: runs that stop inside the schedule's period
    fused = generator.generate(300, chunk_size=7, show_progress=False, **kwargs)
    generator.fused = False
    reference = generator.generate(300, chunk_size=7, show_progress=False, **kwargs)
    assert len(np.unique(fused)) > 20
    # the same classes, so the same decoded samples exactly (see the sampling test above)
    np.testing.assert_array_equal(fused, reference)


def test_cpu_step_settings_hold_until_the_last_overlapping_generation_ends():
    """Two generations in flight on two threads (the UI's --concurrency 2): the first to finish
    must not give the second its threads and oneDNN back mid-run; the last restores them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    first_in, second_in, first_out, checked = (threading.Event() for _ in range(4))
    seen = {}

    def first():
        with step_settings(CPU):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with step_settings(CPU):
            second_in.set()
            first_out.wait(10)
            seen["after_first"] = (torch.get_num_threads(), torch.backends.mkldnn.enabled)
        checked.set()

    try:
        workers = [threading.Thread(target=first), threading.Thread(target=second)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(20)
        assert checked.is_set()
        assert seen["after_first"] == (1, False)  # still the generation settings
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (2, True)
    finally:
        torch.set_num_threads(threads)


def test_generator_splits_a_large_batch_over_two_groups_with_the_audio_of_torchs_step():
    model = labelled_model(pool=(2, 2))
    generator = Generator(model, device="cpu")
    batch = SPLIT_MIN_CLIPS + 1  # groups of 4 and 5 clips where two cores are
    kwargs = dict(
        batch_size=batch,
        seed=list(range(batch)),
        labels=[{"digit": str(r % 3)} for r in range(batch)],
        guidance=2.0,
        chunk_size=7,
        show_progress=False,
    )
    with torch.inference_mode():
        step = generator.start(batch, labels=generator.label_rows(kwargs["labels"], batch))[1]
    if usable_cores() > 1:
        assert isinstance(step, SplitFusedStep) and len(step.steps) == 2
    fused = generator.generate(200, **kwargs)
    generator.fused = False
    np.testing.assert_array_equal(fused, generator.generate(200, **kwargs))

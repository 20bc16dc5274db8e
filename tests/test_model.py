"""The SaShiMi network: convolution mode == recurrent mode, causality, labels, parameter count."""

import dataclasses

import pytest
import torch

from sashimi import SaShiMi, SaShiMiConfig
from sashimi.model import IGNORE_INDEX, is_label_parameter, nll_bits, shift_inputs

KERNELS = {
    "diagonal": {"kernel": "diagonal", "disc": "zoh"},
    "dplr": {"kernel": "dplr", "disc": "bilinear"},
}


def build(preset: str, kernel: str, seed: int = 0) -> SaShiMi:
    torch.manual_seed(seed)
    return SaShiMi(dataclasses.replace(SaShiMiConfig.preset(preset), **KERNELS[kernel]))


def train_on_random_data(model: SaShiMi, steps: int = 20, L: int = 64) -> None:
    """Move the weights away from their initialisation (a larger lr than usual, so they really move).
    Short sequences keep this cheap; the step-vs-forward check then runs at L = 1024."""
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        targets = torch.randint(0, model.config.n_classes, (1, L))
        loss = nll_bits(model(shift_inputs(targets, model.start_token)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def step_through(model: SaShiMi, tokens: torch.Tensor) -> torch.Tensor:
    state = model.initial_state(tokens.shape[0])
    logits = []
    for t in range(tokens.shape[1]):
        logits_t, state = model.step(tokens[:, t], state)
        logits.append(logits_t)
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("kernel", ["diagonal", "dplr"])
@pytest.mark.parametrize("preset", ["tiny", "sc09"])
@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
def test_step_matches_forward(preset, kernel, trained):
    model = build(preset, kernel)
    if trained:
        train_on_random_data(model)
    tokens = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conv = model(tokens)
        rec = step_through(model, tokens)
    # float32 round-off only: measured 1e-6 to 3e-6 for tiny and 7e-6 to 1.5e-5 for sc09 (24
    # layers), logits of size ~3, eps 1.2e-7. The SSM forgets old round-off (|A_bar| < 1), so it
    # does not grow with L; 1e-4 leaves 7x margin, and a step that is off by one sample is ~1e-1.
    assert (conv - rec).abs().max() <= 1e-4


@pytest.mark.parametrize("kernel", ["diagonal", "dplr"])
def test_future_tokens_do_not_change_past_logits(kernel):
    model = build("tiny", kernel).eval()
    tokens = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(2))
    for t in (1, 5, 16, 100, 255):
        perturbed = tokens.clone()
        perturbed[:, t] = (perturbed[:, t] + 77) % 256
        with torch.no_grad():
            before, after = model(tokens), model(perturbed)
        # exact causality up to FFT round-off (the circular convolution is zero-padded to 2L)
        assert (before[:, :t] - after[:, :t]).abs().max() <= 1e-5
        assert (before[:, t] - after[:, t]).abs().max() > 1e-3  # and token t itself does matter


@pytest.mark.parametrize("kernel", ["diagonal", "dplr"])
@pytest.mark.parametrize("T", [1, 15, 16, 203])
def test_prime_leaves_the_state_stepping_leaves(kernel, T):
    model = build("tiny", kernel).eval()
    tokens = torch.randint(0, 256, (2, T + 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        primed_logits, state = model.prime(tokens[:, :T])
        stepped = step_through(model, tokens)
        continued = []
        for t in range(T, T + 40):
            logits_t, state = model.step(tokens[:, t], state)
            continued.append(logits_t)
    assert (primed_logits - stepped[:, :T]).abs().max() <= 1e-4
    assert (torch.stack(continued, 1) - stepped[:, T:]).abs().max() <= 1e-4


def test_length_must_be_a_multiple_of_the_total_pooling():
    model = build("tiny", "diagonal")
    with pytest.raises(ValueError, match="not a multiple of the total pooling 16.*992 or 1008"):
        model(torch.zeros(1, 1000, dtype=torch.long))


@pytest.mark.parametrize("kernel", ["diagonal", "dplr"])
def test_sc09_has_the_papers_parameter_count(kernel):
    n = sum(p.numel() for p in build("sc09", kernel).parameters())
    assert abs(n - 4_764_160) / 4_764_160 < 0.05  # the reference SaShiMi's sc09 model


def test_shift_inputs_and_nll_bits():
    targets = torch.tensor([[5, 6, 7, IGNORE_INDEX]])
    assert shift_inputs(targets, 128).tolist() == [[128, 5, 6, 7]]
    uniform = torch.zeros(1, 4, 256)
    assert nll_bits(uniform, targets).item() == pytest.approx(8.0)  # log2(256), padding not counted
    assert nll_bits(uniform, targets, reduction="none")[0, 3].item() == 0.0


def test_recompute_activations_gives_the_same_gradients_with_dropout():
    config = dataclasses.replace(SaShiMiConfig.preset("tiny"), dropout=0.2)
    torch.manual_seed(0)
    model = SaShiMi(config).train()
    tokens = torch.randint(0, config.n_classes, (2, 257))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks for both passes
        nll_bits(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    kept = gradients()
    model.recompute_activations()
    recomputed = gradients()
    for name, grad in kept.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# --- labels ----------------------------------------------------------------------------------------

VOCABULARY = {"digit": {"0": 3, "1": 2, "7": 1}, "speaker": {"ann": 4, "bob": 2}}


def build_labelled(kernel: str) -> SaShiMi:
    """A tiny labelled model whose label weights are random: their projections start at zero (an
    unconditional start), which would hide a label path that is wrong."""
    torch.manual_seed(4)
    config = dataclasses.replace(SaShiMiConfig.preset("tiny"), labels=VOCABULARY, **KERNELS[kernel])
    model = SaShiMi(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if is_label_parameter(name):
                parameter.normal_(0, 0.5)
    return model.eval()


LABELS = torch.tensor([[1, 2], [3, 0], [0, 0]])  # (digit 0, bob), (digit 7, unknown), all unknown


@pytest.mark.parametrize("kernel", KERNELS)
def test_step_matches_forward_with_labels(kernel):
    model = build_labelled(kernel)
    tokens = torch.randint(0, 256, (3, 512), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        conv = model(tokens, LABELS)
        unlabelled = model(tokens)
        state = model.initial_state(3, LABELS)
        rec = []
        for t in range(tokens.shape[1]):
            logits_t, state = model.step(tokens[:, t], state)
            rec.append(logits_t)
    # float32 round-off of FFT against recurrence over 512 steps is ~1e-6; 1e-4 leaves margin
    assert (conv - torch.stack(rec, 1)).abs().max() <= 1e-4
    # the labels change the logits, and the all-unknown row is what no labels give
    assert (conv[:2] - unlabelled[:2]).abs().amax(dim=(1, 2)).min() > 1e-2
    torch.testing.assert_close(conv[2], unlabelled[2])


@pytest.mark.parametrize("kernel", KERNELS)
def test_prime_and_step_carry_the_labels(kernel):
    model = build_labelled(kernel)
    tokens = torch.randint(0, 256, (3, 96), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        conv = model(tokens, LABELS)
        primed_logits, state = model.prime(tokens[:, :40], LABELS)  # 40: not whole groups
        logits = [primed_logits[:, -1]]  # predicts sample 40
        for t in range(40, 96):
            step_logits, state = model.step(tokens[:, t], state)
            logits.append(step_logits)
    # round-off only, as in test_step_matches_forward_with_labels
    assert (primed_logits - conv[:, :40]).abs().max() <= 1e-4
    assert (torch.stack(logits, 1) - conv[:, 39:]).abs().max() <= 1e-4


def test_labels_must_fit_the_model():
    model = build_labelled("diagonal")
    tokens = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \(batch, fields\) = \(2, 2\), got \(2, 3\)"):
        model(tokens, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="model trained without labels"):
        build("tiny", "diagonal")(tokens, torch.zeros(2, 1, dtype=torch.long))


def test_new_label_weights_start_unconditional():
    torch.manual_seed(0)
    config = dataclasses.replace(SaShiMiConfig.preset("tiny"), labels=VOCABULARY)
    model = SaShiMi(config).eval()
    tokens = torch.randint(0, 256, (3, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, LABELS), model(tokens), rtol=0, atol=0)

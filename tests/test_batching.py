"""Requests sampled together: each gets what it would have got alone, however it was batched."""

import dataclasses

import numpy as np
import pytest
import torch

from sashimi import SaShiMi, SaShiMiConfig
from sashimi.batching import Batcher, Request
from sashimi.generate import Generator
from sashimi.guidance import Guidance

WAIT_S = 1.0  # far longer than submitting a few requests takes: they are one batch


@pytest.fixture(scope="module")
def generator(tiny_labelled_checkpoint) -> Generator:
    return Generator.from_checkpoint(tiny_labelled_checkpoint, device="cpu")


def scored_alone(generator: Generator, request: Request, clips: np.ndarray) -> np.ndarray:
    """Bits per sample of the request's clips scored by themselves, prompt included."""
    if request.prompt is not None:
        prompt = np.broadcast_to(request.prompt, (request.clips, len(request.prompt)))
        clips = np.concatenate([prompt, clips], axis=1)
    return generator.log_likelihood(clips, request.labels)


def evidence_alone(generator: Generator, request: Request, clips: np.ndarray) -> np.ndarray:
    """The bits per new sample that the request's labels save, scored by convolution: the new
    samples' bits with every field unknown less those under the labels (a prompt read first)."""
    new_bits = []
    for labels in (None, request.labels):
        bits = scored_alone(generator, dataclasses.replace(request, labels=labels), clips)
        length = request.num_samples
        if request.prompt is not None:
            length += len(request.prompt)
            prompts = np.broadcast_to(request.prompt, (request.clips, len(request.prompt)))
            bits = bits * length - generator.log_likelihood(prompts, labels) * len(request.prompt)
            bits /= request.num_samples
        new_bits.append(bits)
    return new_bits[0] - new_bits[1]


def check_evidence(generator: Generator, request: Request, clips: np.ndarray, ticket) -> None:
    """A guided request that asks for labels has its clips' label evidence; others have none."""
    if Guidance.of(request.guidance).guided and any(request.labels or []):
        expected = evidence_alone(generator, request, clips)
        np.testing.assert_allclose(ticket.evidence, expected, atol=1e-5)  # float32 logits
    else:
        assert ticket.evidence is None


def alone(generator: Generator, request: Request) -> np.ndarray:
    """The request sampled by itself, as Generator.generate does it."""
    return generator.generate(
        request.num_samples,
        batch_size=request.clips,
        seed=request.seeds,
        temperature=request.temperature,
        top_p=request.top_p,
        labels=request.labels,
        guidance=request.guidance,
        prompt=request.prompt,
        show_progress=False,
    )


def received(ticket) -> np.ndarray:
    return np.concatenate(list(ticket), axis=1)


def test_requests_that_arrive_together_are_one_batch_each_with_its_own_settings(generator):
    requests = [
        Request(300, [3, 4], 1.0, 0.9, [{"digit": "7"}, {"digit": "0"}], guidance=2.0),
        Request(150, [9], 0.0, 1.0, [{}], guidance=2.0),  # greedy and shorter
        Request(250, [3], 0.8, 1.0, [{"speaker": "bob"}], guidance=2.0),  # a seed used above
    ]
    batcher = Batcher(generator, gap_s=WAIT_S, window_s=WAIT_S)
    tickets = [batcher.submit(request) for request in requests]
    audio = [received(ticket) for ticket in tickets]
    assert [(t.requests, t.clips) for t in tickets] == [(3, 4)] * 3
    for request, clips, ticket in zip(requests, audio, tickets, strict=True):
        assert clips.shape == (request.clips, request.num_samples)
        np.testing.assert_array_equal(clips, alone(generator, request))
        bits = scored_alone(generator, request, clips)
        np.testing.assert_allclose(ticket.bits, bits, rtol=1e-5)  # float32, another batch size
        check_evidence(generator, request, clips, ticket)
    assert [t.evidence is None for t in tickets] == [False, True, False]  # [{}] asks nothing
    assert not np.array_equal(audio[0][0, :250], audio[2][0])  # seed 3 twice, other settings


def test_another_guidance_or_a_prompt_is_sampled_in_its_own_batch(generator):
    prompt = 0.3 * np.sin(np.arange(200) / 5).astype(np.float32)
    requests = [
        Request(200, [1], labels=[{"digit": "1"}], guidance=2.0),
        Request(200, [2], labels=[{"digit": "1"}], guidance=3.0),
        Request(200, [3], labels=[{"digit": "1"}], guidance=2.0, prompt=prompt),
        Request(200, [4], labels=[{"digit": "0"}], guidance=2.0),
    ]
    batcher = Batcher(generator, gap_s=WAIT_S, window_s=WAIT_S)
    tickets = [batcher.submit(request) for request in requests]
    audio = [received(ticket) for ticket in tickets]
    assert [t.requests for t in tickets] == [2, 1, 1, 2]  # the first and the last together
    for request, clips, ticket in zip(requests, audio, tickets, strict=True):
        np.testing.assert_array_equal(clips, alone(generator, request))
        bits = scored_alone(generator, request, clips)
        np.testing.assert_allclose(ticket.bits, bits, rtol=1e-5)  # float32, another batch size
        check_evidence(generator, request, clips, ticket)


def test_a_cancelled_request_stops_its_batch(generator):
    ten_minutes = 10 * 60 * generator.sample_rate  # hours of work on a busy CPU, if not stopped
    batcher = Batcher(generator, gap_s=0.0, window_s=0.0)
    ticket = batcher.submit(Request(ten_minutes, [0]))
    first = next(iter(ticket))
    ticket.cancel()
    # the batch ends after the chunk it is sampling, so the next request is answered
    after = batcher.submit(Request(100, [1]))
    chunk = after._items.get(timeout=120)
    assert first.shape[0] == 1 and chunk.shape == (1, 100)


def test_a_failing_batch_raises_in_every_request():
    torch.manual_seed(0)
    model = SaShiMi(SaShiMiConfig.preset("tiny"))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    batcher = Batcher(Generator(model, device="cpu"), gap_s=WAIT_S, window_s=WAIT_S)
    tickets = [batcher.submit(Request(100, [seed])) for seed in (0, 1)]
    for ticket in tickets:
        with pytest.raises(FloatingPointError, match="logits are not finite"):
            received(ticket)

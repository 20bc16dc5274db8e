"""Which clip first: each clip's bits per sample and label evidence, from the log-probabilities
summed while it was sampled (Generator.stream(log_probs=True)), and the order they rank clips in.

Bits per sample, -log2 p(x | labels) / n, say how likely the model finds a clip. Label evidence,
(log2 p(x | labels) - log2 p(x | every field unknown)) / n, says how much of the clip the asked
labels explain: its pointwise mutual information with the ask, there when the clip was guided
(both streams sampled). The likeliest clip is not the clearest: silence is cheap in bits, so among
clips asked for a digit the likeliest is often the one with the least speech, while the one with
the most evidence is the one that says it (README, "Labels and guidance": the first of 4 clips was
heard as asked 84% of the time ranked by likelihood, 92% by evidence, 88% unranked).
"""

import math

import numpy as np


def bits_and_evidence(
    log_probs: np.ndarray, num_samples: int, asked: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """log_probs (1 or 2, clips): each clip's natural log-probabilities summed over its
    num_samples new samples, under its labels and, when guided, under every field unknown.
    Returns its bits per sample (clips,) and, when guided and labels were `asked` for, its label
    evidence (clips,) in bits per sample, else None (a clip that asks for nothing is read alike
    by both streams, sampled together with guided ones: nothing asked, nothing explained)."""
    bits = -log_probs[0] / math.log(2) / num_samples
    if len(log_probs) == 1 or not asked:
        return bits, None
    return bits, (log_probs[0] - log_probs[1]) / math.log(2) / num_samples


def best_first(bits: np.ndarray, evidence: np.ndarray | None = None) -> np.ndarray:
    """Clip indices, best first: the most label evidence (ties: fewer bits), or without evidence
    the fewest bits per sample."""
    order = np.argsort(bits, kind="stable")
    if evidence is None:
        return order
    return order[np.argsort(-evidence[order], kind="stable")]

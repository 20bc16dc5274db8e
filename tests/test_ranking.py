"""sashimi.ranking: bits and label evidence from summed log-probabilities, and the order."""

import math

import numpy as np

from sashimi.ranking import best_first, bits_and_evidence


def test_bits_and_evidence_are_per_sample_in_bits():
    log_probs = np.array([[-2.0, -8.0], [-6.0, -8.0]]) * math.log(2)  # labels; every field unknown
    bits, evidence = bits_and_evidence(log_probs, num_samples=4)
    np.testing.assert_allclose(bits, [0.5, 2.0])
    np.testing.assert_allclose(evidence, [1.0, 0.0])  # clip 1: the labels explain nothing
    bits, evidence = bits_and_evidence(log_probs[:1], num_samples=2)  # not guided
    np.testing.assert_allclose(bits, [1.0, 4.0])
    assert evidence is None
    assert bits_and_evidence(log_probs, num_samples=4, asked=False)[1] is None  # nothing asked


def test_the_most_evidence_first_ties_to_the_likelier_and_else_the_fewest_bits():
    bits = np.array([2.0, 1.0, 3.0, 1.5])
    assert best_first(bits).tolist() == [1, 3, 0, 2]
    evidence = np.array([0.05, 0.01, 0.05, 0.2])
    assert best_first(bits, evidence).tolist() == [3, 0, 2, 1]

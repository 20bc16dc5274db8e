"""Guidance as a value: its weight over a clip, its checks and how it is named (the sampling it
drives is tested against the guided oracle in test_generate.py)."""

import math

import pytest

from sashimi.guidance import DEFAULT_GUIDANCE, MAX_GUIDANCE, Guidance


def test_a_number_is_a_constant_weight():
    constant = Guidance.of(3)
    assert constant == Guidance(3.0) and Guidance.of(constant) is constant
    assert not constant.changes and constant.switch_sample(8000) is None
    assert constant.first_weight(8000) == 3.0 and constant.guided
    assert str(constant) == "3" and constant.slug == "g3" and constant.as_dict() == {"weight": 3}
    assert not Guidance(1.0).guided  # w = 1 is the model as trained: no second stream


def test_a_weight_that_changes_switches_at_its_sample():
    guidance = Guidance(4.0, 0.4, 1.5)
    assert guidance.changes and guidance.guided
    assert guidance.switch_sample(8000) == 3200 and guidance.switch_sample(16000) == 6400
    assert guidance.first_weight(8000) == 4.0
    assert str(guidance) == "4 for 0.4 s, then 1.5" and guidance.slug == "g4-0.4s-1.5"
    assert guidance.as_dict() == {"weight": 4.0, "seconds": 0.4, "after": 1.5}
    assert Guidance(4.0, 0.0, 1.5).first_weight(8000) == 1.5  # no seconds at 4
    assert not Guidance(2.0, 0.4, 2.0).changes  # the same weight after: nothing changes
    assert Guidance(1.0, 0.4, 2.0).guided  # unguided at first, guided after


def test_easing_starts_from_the_default_and_keeps_one_as_none():
    assert Guidance.easing(DEFAULT_GUIDANCE.weight) == DEFAULT_GUIDANCE
    assert Guidance.easing(3.0) == Guidance(3.0, DEFAULT_GUIDANCE.seconds, DEFAULT_GUIDANCE.after)
    assert not Guidance.easing(1.0).guided  # 1 then min(1, 1.5): no guidance at all
    assert Guidance.easing(1.2) == Guidance(1.2, DEFAULT_GUIDANCE.seconds, 1.2)
    assert Guidance.easing(5.0, math.inf).switch_sample(8000) is None
    assert Guidance.easing(5.0, 0.2, 2.0) == Guidance(5.0, 0.2, 2.0)


@pytest.mark.parametrize(
    "guidance, message",
    [
        (Guidance(-1.0), r"guidance must be in \[0, 20\]"),
        (Guidance(math.nan), r"guidance must be in \[0, 20\] .* got nan"),
        (Guidance(MAX_GUIDANCE + 1), r"guidance must be in \[0, 20\]"),
        (Guidance(4.0, 0.4, 25.0), r"guidance after must be in \[0, 20\]"),
        (Guidance(4.0, -0.4, 1.5), r"guidance seconds must be 0 or more \(inf: all along\)"),
        (Guidance(4.0, math.nan, 1.5), r"guidance seconds must be 0 or more"),
    ],
)
def test_bad_values_name_themselves(guidance, message):
    with pytest.raises(ValueError, match=message):
        guidance.check()
    Guidance(0.0, math.inf, MAX_GUIDANCE).check()  # the bounds themselves pass

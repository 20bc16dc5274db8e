"""Labels from paths: the folder and regex specs, vocabularies, indices, errors, label dropout."""

import logging

import pytest
import torch

from sashimi.labels import (
    UNKNOWN,
    LabelSpec,
    build_vocabulary,
    check_labels,
    drop_labels,
    label_indices,
    label_tensor,
    labels_slug,
    parse_assignments,
    read_labels,
)

FSDD = r"(?P<digit>\d)_(?P<speaker>[a-z]+)_"


def test_folder_spec_labels_a_file_by_its_first_folder():
    spec = LabelSpec.parse("folder")
    assert spec.fields == ("class",)
    assert spec.read("drums/kick/a.wav") == {"class": "drums"}
    assert spec.read("loose.wav") is None  # not in a folder: unlabelled


def test_regex_spec_reads_named_groups_in_order():
    spec = LabelSpec.parse(FSDD)
    assert spec.fields == ("digit", "speaker")
    assert spec.read("train/7_nicolas_12.wav") == {"digit": "7", "speaker": "nicolas"}
    assert spec.read("notes/readme.wav") is None
    optional = LabelSpec.parse(r"(?P<digit>\d)(_(?P<speaker>[a-z]+))?")
    assert optional.read("3.wav") == {"digit": "3"}  # a group that took no part: unknown


def test_bad_specs_say_what_to_write():
    with pytest.raises(ValueError, match="has no named group"):
        LabelSpec.parse(r"\d_[a-z]+")
    with pytest.raises(ValueError, match="is not a regular expression"):
        LabelSpec.parse("(?P<digit>")


def test_vocabulary_counts_sorted_values_and_indices_start_after_unknown():
    spec = LabelSpec.parse(FSDD)
    paths = ["1_ann_0.wav", "0_bob_1.wav", "1_bob_2.wav", "x.wav"]
    vocabulary = build_vocabulary(spec.fields, [spec.read(p) for p in paths])
    assert vocabulary == {"digit": {"0": 1, "1": 2}, "speaker": {"ann": 1, "bob": 2}}
    assert list(vocabulary["speaker"]) == ["ann", "bob"]
    assert label_indices(vocabulary, {"digit": "1", "speaker": "ann"}) == [2, 1]
    assert label_indices(vocabulary, {"speaker": "bob"}) == [UNKNOWN, 2]
    assert label_indices(vocabulary, {"digit": "9"}) == [UNKNOWN, UNKNOWN]  # never seen: unknown
    assert label_tensor(vocabulary, [None, {"digit": "0"}]).tolist() == [[0, 0], [1, 0]]
    assert label_tensor(vocabulary, []).shape == (0, 2)


def test_unmatched_files_and_unseen_values_are_reported_once(caplog):
    spec = LabelSpec.parse(FSDD)
    vocabulary = {"digit": {"1": 1}, "speaker": {"ann": 1}}
    paths = ["1_ann_0.wav", "1_zed_0.wav", "1_zed_1.wav", "a.wav", "b.wav"]
    with caplog.at_level(logging.WARNING):
        labels = read_labels(spec, paths, "validation", vocabulary)
    assert labels[3] is None and labels[1] == {"digit": "1", "speaker": "zed"}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "2 of 5 validation files match no label" in messages[0] and "a.wav" in messages[0]
    assert "speaker=zed (2 files)" in messages[1]


def test_check_labels_names_the_known_fields_and_values():
    vocabulary = {"digit": {"0": 1, "1": 1}}
    check_labels(vocabulary, {"digit": "1"})
    check_labels(vocabulary, {})
    with pytest.raises(
        ValueError, match=r"unknown label field 'voice'; this checkpoint has \['digit'\]"
    ):
        check_labels(vocabulary, {"voice": "ann"})
    with pytest.raises(ValueError, match="unknown digit '7'; known values: 0, 1"):
        check_labels(vocabulary, {"digit": "7"})
    with pytest.raises(ValueError, match="trained without labels"):
        check_labels({}, {"digit": "7"})


def test_label_dropout_drops_at_its_rate_and_only_to_unknown():
    labels = torch.ones(20_000, 2, dtype=torch.long)
    dropped = drop_labels(labels, 0.15, torch.Generator().manual_seed(0))
    rate = (dropped == UNKNOWN).float().mean().item()
    assert abs(rate - 0.15) < 0.01  # 40,000 draws: the standard error is 0.0018
    assert set(dropped.unique().tolist()) == {UNKNOWN, 1}
    assert torch.equal(drop_labels(labels, 0.0, torch.Generator()), labels)


def test_command_line_assignments_and_file_names():
    assert parse_assignments(["digit=7", "speaker=nicolas"]) == {"digit": "7", "speaker": "nicolas"}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_assignments(["digit"])
    assert labels_slug({"digit": "7", "class": "hi hat/open"}) == "digit-7_class-hi-hat-open"
    assert labels_slug({}) == ""

"""SaShiMiConfig (sashimi/config.py): presets, JSON round trips, and bad values refused with the
fix in the message."""

import dataclasses
import json

import pytest

from sashimi import SaShiMiConfig
from sashimi.config import PRESETS, config_from_dict


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_json(name):
    config = SaShiMiConfig.preset(name)
    assert SaShiMiConfig.from_dict(json.loads(config.to_json())) == config


def test_config_rejects_bad_values_with_the_fix_in_the_message():
    with pytest.raises(ValueError, match="unknown config keys \\['width'\\]; known keys"):
        SaShiMiConfig.from_dict({"width": 3})
    with pytest.raises(
        ValueError, match="unknown preset 'big'; known presets: \\['sc09', 'tiny'\\]"
    ):
        SaShiMiConfig.preset("big")
    with pytest.raises(ValueError, match="kernel must be one of"):
        SaShiMiConfig(kernel="fft")
    with pytest.raises(ValueError, match='needs disc="bilinear"'):
        SaShiMiConfig(kernel="dplr", disc="zoh")
    with pytest.raises(ValueError, match='kernel="dplr" is always HiPPO-LegS; init=.lin'):
        SaShiMiConfig(kernel="dplr", init="lin")
    assert SaShiMiConfig(kernel="dplr").disc == "bilinear"  # each kernel's own unless told
    assert SaShiMiConfig().disc == "zoh"


def test_labelled_config_round_trips_through_json():
    config = dataclasses.replace(SaShiMiConfig.preset("tiny"), labels={"digit": {"0": 3, "7": 1}})
    assert SaShiMiConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="labels\\['digit'\\] must map each value"):
        SaShiMiConfig(labels={"digit": []})


def test_json_values_of_the_wrong_type_are_named_with_the_field():
    with pytest.raises(ValueError, match="d_model must be int, got 'wide'"):
        SaShiMiConfig.from_dict({"d_model": "wide"})
    with pytest.raises(ValueError, match="pool must be"):
        SaShiMiConfig.from_dict({"pool": 4})
    assert config_from_dict(SaShiMiConfig, {"pool": [2, 2]}, "config keys").pool == (2, 2)


def test_length_check_names_the_lengths_that_fit():
    config = SaShiMiConfig(pool=(4, 4))
    config.check_length(1024)
    with pytest.raises(ValueError, match="seq_len 8 is not a multiple.*crop or pad to 16$"):
        config.check_length(8, "seq_len")

"""Shared fixtures: a tiny model configuration and a checkpoint of it written to disk."""

import dataclasses

import pytest
import torch

from sashimi import SaShiMi, SaShiMiConfig
from sashimi.checkpoint import save_checkpoint


@pytest.fixture
def tiny_config() -> SaShiMiConfig:
    return SaShiMiConfig.preset("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised `tiny` model at 8 kHz saved as a checkpoint folder (read-only use)."""
    torch.manual_seed(0)
    config = dataclasses.replace(SaShiMiConfig.preset("tiny"), sample_rate=8000)
    directory = tmp_path_factory.mktemp("checkpoints") / "tiny"
    save_checkpoint(directory, SaShiMi(config).eval(), {"step": 0, "train_data": "random init"})
    return directory

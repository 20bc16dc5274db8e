"""sashimi: train SaShiMi raw-audio models on a folder of sounds, and generate from them.

from sashimi import SaShiMi, SaShiMiConfig
model = SaShiMi(SaShiMiConfig.preset("sc09")).eval()
logits = model(tokens)                      # convolution mode, (batch, L) -> (batch, L, classes)
state = model.initial_state(batch)          # recurrent mode
logits_t, state = model.step(tokens[:, t], state)
"""

from .config import SaShiMiConfig
from .model import SaShiMi

__all__ = ["SaShiMi", "SaShiMiConfig"]

"""``nn.Module`` wrappers of the fused ops, for the models."""
from .adaln import AdaLNZero, LayerNormZero

__all__ = ["AdaLNZero", "LayerNormZero"]

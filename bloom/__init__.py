"""BLOOM in plain PyTorch: hand-written modules, a loader for the published checkpoints, the tokenizer."""

from bloom.config import BloomConfig
from bloom.loader import load_pretrained
from bloom.model import Bloom
from bloom.tokenizer import load_tokenizer

__all__ = ["BloomConfig", "Bloom", "load_pretrained", "load_tokenizer"]

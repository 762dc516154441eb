"""BLOOM in plain PyTorch: hand-written modules, a loader for the published checkpoints, the tokenizer,
and a KV-cached sampler."""

from bloom.config import BloomConfig
from bloom.generate import generate
from bloom.loader import load_pretrained
from bloom.model import Bloom
from bloom.streaming import stream
from bloom.tokenizer import load_tokenizer

__all__ = ["BloomConfig", "Bloom", "generate", "load_pretrained", "load_tokenizer", "stream"]

"""BLOOM in plain PyTorch: hand-written modules, a loader for the published checkpoints, the tokenizer,
a KV-cached sampler, and tools to look inside.

The modules form layers, each importing only from those above it (README, "Read the code in this order";
tests/test_layers.py): core (config, model, kv_cache, memory), scale (quantize, parallel), checkpoints
(loader, hub, tokenizer), generation (decoder, generate, streaming), research tools (probe, lens, weights,
attribution, patching, activations, perplexity, evaluation, viz, page), command line (cli, arguments, bench).
"""

from bloom.config import BloomConfig
from bloom.generate import generate
from bloom.loader import load_pretrained
from bloom.model import Bloom
from bloom.streaming import stream
from bloom.tokenizer import load_tokenizer

__all__ = ["BloomConfig", "Bloom", "generate", "load_pretrained", "load_tokenizer", "stream"]

"""BLOOM in plain PyTorch: hand-written modules, a loader for the published checkpoints, the tokenizer,
a KV-cached sampler, and tools to look inside.

The layout follows the layers, each importing only from those above it (README, "Read the code in this order";
tests/test_layers.py): the core at the top (config, matvec, model, kv_cache, memory), then one subpackage per
layer: scale (quantize, parallel), checkpoints (loader, hub, tokenizer), generation (decode_step, decoder,
generate, streaming), research (probe, lens, weights, attribution, patching, head_scores, activations, perplexity,
evaluation, viz, page) and command_line (cli, arguments, bench). The names below are re-exported here, so that
`from bloom import record` works without knowing where a tool lives.
"""

from bloom.checkpoints.loader import load_pretrained
from bloom.checkpoints.tokenizer import load_tokenizer
from bloom.config import BloomConfig
from bloom.generation.decoder import Decoder
from bloom.generation.generate import generate, generate_steps
from bloom.generation.streaming import TextStream, stream
from bloom.model import Bloom
from bloom.research.attribution import direct_logit_attribution, residual_components
from bloom.research.head_scores import head_scores
from bloom.research.lens import logit_lens, logit_lens_log_probs
from bloom.research.patching import activation_patching, attribution_patching
from bloom.research.perplexity import perplexity
from bloom.research.probe import patch, record, zero_head
from bloom.research.weights import head_weights, ov_circuit, qk_circuit
from bloom.scale.quantize import quantize_int8

__all__ = [
    "Bloom",
    "BloomConfig",
    "Decoder",
    "TextStream",
    "activation_patching",
    "attribution_patching",
    "direct_logit_attribution",
    "generate",
    "generate_steps",
    "head_scores",
    "head_weights",
    "load_pretrained",
    "load_tokenizer",
    "logit_lens",
    "logit_lens_log_probs",
    "ov_circuit",
    "patch",
    "perplexity",
    "qk_circuit",
    "quantize_int8",
    "record",
    "residual_components",
    "stream",
    "zero_head",
]

"""BLOOM's architecture hyper-parameters, named as in the published config.json files."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BloomConfig:
    hidden_size: int  # C, the width of the residual stream
    n_layer: int  # number of decoder blocks
    n_head: int  # nh, attention heads per block
    vocab_size: int = 250880  # rows of the embedding: the tokenizer's 250680 ids padded to a multiple of 512
    layer_norm_epsilon: float = 1e-5  # for every LayerNorm
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 3

    def __post_init__(self) -> None:
        for name in ("hidden_size", "n_layer", "n_head", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BloomConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.n_head:
            raise ValueError(
                f"BloomConfig: hidden_size {self.hidden_size} does not divide by n_head {self.n_head}; "
                "each head needs hidden_size / n_head channels"
            )

    @property
    def head_dim(self) -> int:  # hd
        return self.hidden_size // self.n_head

    @classmethod
    def from_name(cls, name: str) -> "BloomConfig":
        """The preset of a published checkpoint, e.g. "bloom-560m" or "bigscience/bloomz-7b1"."""
        key = name.removeprefix("bigscience/")
        if key not in PRESETS:
            raise KeyError(f"unknown BLOOM preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[key]

    @classmethod
    def from_json(cls, path: str | Path) -> "BloomConfig":
        """Read a published config.json."""
        path = Path(path)
        try:
            hf_config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(hf_config, dict):
            raise ValueError(f"{path}: expected a JSON object of settings, found a {type(hf_config).__name__}")
        try:
            return cls.from_hf_config(hf_config)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> "BloomConfig":
        """Build from the dict of a published config.json.

        Accepts the old spellings `n_embed` (hidden_size) and `num_attention_heads`/`num_hidden_layers`.
        Keys that change nothing at inference (dropout rates, Megatron fusion flags, `offset_alibi`, ...) are
        accepted and dropped. Flags that would change the forward pass and that no published checkpoint sets
        are rejected, so that a config is never silently misread.
        """
        if hf_config.get("model_type", "bloom") != "bloom":
            raise ValueError(f"model_type is {hf_config['model_type']!r}, expected 'bloom'")
        if hf_config.get("apply_residual_connection_post_layernorm", False):
            raise ValueError(
                "apply_residual_connection_post_layernorm=true is not supported: no published BLOOM checkpoint sets it"
            )
        if hf_config.get("slow_but_exact", False) and hf_config.get("pretraining_tp", 1) > 1:
            raise ValueError(
                "slow_but_exact=true with pretraining_tp > 1 is not supported: it emulates tensor-parallel matmul "
                "slices (and drops two biases in transformers); no published BLOOM checkpoint sets it"
            )
        if not hf_config.get("tie_word_embeddings", True):
            raise ValueError("tie_word_embeddings=false is not supported: BLOOM's LM head is the word embedding")
        if "quantization_config" in hf_config:
            raise ValueError("quantized checkpoints (quantization_config) are not supported")

        def pick(*names: str, default: Any = None) -> Any:
            for name in names:
                if name in hf_config:
                    return hf_config[name]
            if default is None:
                raise ValueError(f"config has no {' / '.join(names)}")
            return default

        return cls(
            hidden_size=pick("hidden_size", "n_embed"),
            n_layer=pick("n_layer", "num_hidden_layers"),
            n_head=pick("n_head", "num_attention_heads"),
            vocab_size=pick("vocab_size", default=cls.vocab_size),
            layer_norm_epsilon=pick("layer_norm_epsilon", default=cls.layer_norm_epsilon),
            bos_token_id=hf_config.get("bos_token_id", cls.bos_token_id),
            eos_token_id=hf_config.get("eos_token_id", cls.eos_token_id),
            pad_token_id=hf_config.get("pad_token_id", cls.pad_token_id),
        )


def _preset(hidden_size: int, n_layer: int, n_head: int) -> BloomConfig:
    return BloomConfig(hidden_size=hidden_size, n_layer=n_layer, n_head=n_head)


# One entry per published checkpoint; configs/<name>.json holds each published config.json
# (https://huggingface.co/bigscience/<name>/blob/main/config.json), and a test checks that they agree.
# The bloomz models are bloom models fine-tuned on xP3: same shapes.
PRESETS: dict[str, BloomConfig] = {
    "bloom-560m": _preset(1024, 24, 16),
    "bloom-1b1": _preset(1536, 24, 16),
    "bloom-1b7": _preset(2048, 24, 16),
    "bloom-3b": _preset(2560, 30, 32),
    "bloom-7b1": _preset(4096, 30, 32),
    "bloom": _preset(14336, 70, 112),  # the 176B model
}
PRESETS |= {name.replace("bloom", "bloomz", 1): config for name, config in PRESETS.items()}

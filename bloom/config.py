"""BLOOM's architecture hyper-parameters, named as in the published config.json files."""

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    eos_token_id: int | tuple[int, ...] | None = 2  # or several (a list in config.json)
    pad_token_id: int | None = 3

    def __post_init__(self) -> None:
        for name in ("hidden_size", "n_layer", "n_head", "vocab_size", "layer_norm_epsilon"):
            _check_size(f"BloomConfig.{name}", getattr(self, name), integer=name != "layer_norm_epsilon")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            _check_token_id(f"BloomConfig.{name}", getattr(self, name), self.vocab_size)
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
        hf_config = read_json(path)
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
            raise ValueError(f"model_type is {hf_config['model_type']!r:.60}, expected 'bloom'")
        flags = {name: hf_config.get(name, default) for name, default in _FLAGS.items()}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{name} should be true or false, got {value!r:.60}")
        if flags["apply_residual_connection_post_layernorm"]:
            raise ValueError(
                "apply_residual_connection_post_layernorm=true is not supported: no published BLOOM checkpoint sets it"
            )
        pretraining_tp = hf_config.get("pretraining_tp", 1)
        _check_size("pretraining_tp", pretraining_tp, integer=True)
        if flags["slow_but_exact"] and pretraining_tp > 1:
            raise ValueError(
                "slow_but_exact=true with pretraining_tp > 1 is not supported: it emulates tensor-parallel matmul "
                "slices (and drops two biases in transformers); no published BLOOM checkpoint sets it"
            )
        if not flags["tie_word_embeddings"]:
            raise ValueError("tie_word_embeddings=false is not supported: BLOOM's LM head is the word embedding")
        if "quantization_config" in hf_config:
            raise ValueError("quantized checkpoints (quantization_config) are not supported")

        def pick(*names: str, default: Any = None) -> tuple[str, Any]:
            """(the key the file uses, its value); two spellings that disagree are refused, since the weights'
            shapes cannot tell which one is meant (transformers would take the other)."""
            given = [(name, hf_config[name]) for name in names if name in hf_config]
            values = [(name, value) for name, value in given if value is not None]  # null: as absent, as transformers
            if len({repr(value) for _, value in values}) > 1:
                spelled = " and ".join(f"{name} = {value!r:.20}" for name, value in values)
                raise ValueError(f"config gives {spelled}: two spellings of one size that disagree")
            if given:
                return (values or given)[0]  # all null: refused by name below
            if default is None:
                raise ValueError(f"config has no {' / '.join(names)}")
            return names[0], default

        sizes = {
            "hidden_size": pick("hidden_size", "n_embed"),
            "n_layer": pick("n_layer", "num_hidden_layers"),
            "n_head": pick("n_head", "num_attention_heads"),
            "vocab_size": pick("vocab_size", default=cls.vocab_size),
            "layer_norm_epsilon": pick("layer_norm_epsilon", default=cls.layer_norm_epsilon),
        }
        for field, (key, value) in sizes.items():
            _check_size(key, value, integer=field != "layer_norm_epsilon")
        ids = {}
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = hf_config.get(field, getattr(cls, field))
            _check_token_id(field, value, sizes["vocab_size"][1])
            ids[field] = tuple(value) if isinstance(value, list) else value
        return cls(**{field: value for field, (_, value) in sizes.items()}, **ids)


# Boolean flags of config.json that are checked, with the value transformers assumes when one is absent.
_FLAGS = {"apply_residual_connection_post_layernorm": False, "slow_but_exact": False, "tie_word_embeddings": True}


def is_integer(value: object) -> bool:
    """An int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_size(key: str, value: Any, *, integer: bool) -> None:
    """A size must be a positive integer (not a bool, not 2.0); a rate a positive finite number."""
    if integer and (not is_integer(value) or value < 1):
        raise ValueError(f"{key} should be a positive integer, got {value!r:.60}")
    if not integer and (type(value) not in (int, float) or not 0 < value < math.inf):
        raise ValueError(f"{key} should be a positive finite number, got {value!r:.60}")


def _check_token_id(key: str, value: Any, vocab_size: int) -> None:
    """A special token id is absent (None), an id in [0, vocab_size), or (EOS, as transformers allows) a non-empty
    list or tuple of such ids."""

    def is_id(one: Any) -> bool:
        return is_integer(one) and 0 <= one < vocab_size

    if value is None or is_id(value):
        return
    if key.endswith("eos_token_id") and isinstance(value, list | tuple) and value and all(map(is_id, value)):
        return
    raise ValueError(f"{key} should be a token id in [0, vocab_size {vocab_size}) or null, got {value!r:.60}")


def read_json(path: Path) -> Any:
    """The parsed contents of a JSON file, or a ValueError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError raised inside that names no file (a write to a full disk) raised again naming `path`."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        if error.errno is None:  # a message of its own (PIL's "encoder error"): kept, the file put before it
            raise OSError(f"{path}: {error}") from None
        raise OSError(error.errno, error.strerror, str(path)) from None


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file whole or not at all: `write(partial)` writes it beside `path`, which it then replaces. On any
    error (a full disk, Ctrl-C) the partial file is removed and an earlier `path` is left as it was; an OSError names
    `path` (or the partial file, where the OS named that one: a missing folder)."""
    partial = path.with_name(path.name + ".partial")
    try:
        with naming(path):
            write(partial)
            os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


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

"""Presets, published config.json files and the flags that must be refused."""

from pathlib import Path

import pytest
import torch

from bloom import Bloom, BloomConfig
from bloom.config import PRESETS

CONFIGS = Path(__file__).parent.parent / "configs"

# Parameter counts of the published checkpoints (the tied LM head is not counted twice).
PUBLISHED_PARAMS = {
    "bloom-560m": 559_214_592,
    "bloom-1b1": 1_065_314_304,
    "bloom-1b7": 1_722_408_960,
    "bloom-3b": 3_002_557_440,
    "bloom-7b1": 7_069_016_064,
    "bloom": 176_247_271_424,
}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_on_meta_with_the_published_parameter_count(name):
    with torch.device("meta"):
        model = Bloom(BloomConfig.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name.replace("bloomz", "bloom")]


@pytest.mark.parametrize("name", PRESETS)
def test_published_config_files_agree_with_the_presets(name):
    assert BloomConfig.from_json(CONFIGS / f"{name}.json") == PRESETS[name]


def test_from_name_accepts_the_repo_id_and_lists_names_on_error():
    assert BloomConfig.from_name("bigscience/bloomz-7b1") == PRESETS["bloom-7b1"]
    with pytest.raises(KeyError, match="bloom-560m"):
        BloomConfig.from_name("bloom-13b")


def test_old_spellings_and_unused_keys_are_accepted():
    config = BloomConfig.from_hf_config(
        {
            "n_embed": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "offset_alibi": 100,
            "masked_softmax_fusion": True, "seq_length": 2048, "n_inner": None, "vocab_size": 99,
            "pad_token_id": 3, "hidden_dropout": 0.0,
        }
    )  # fmt: skip
    assert (config.hidden_size, config.n_head, config.n_layer, config.vocab_size, config.head_dim) == (64, 4, 2, 99, 16)


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
        ({"slow_but_exact": True, "pretraining_tp": 4}, "slow_but_exact"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"model_type": "gpt2"}, "model_type"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ],
)
def test_flags_that_change_the_forward_pass_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        BloomConfig.from_hf_config({"hidden_size": 64, "n_head": 4, "n_layer": 2} | flags)


def test_slow_but_exact_without_tensor_parallel_slices_changes_nothing_and_is_accepted():
    # transformers' own tests set slow_but_exact=True with pretraining_tp=1: the emulation is then a no-op
    assert (
        BloomConfig.from_hf_config({"hidden_size": 64, "n_head": 4, "n_layer": 2, "slow_but_exact": True}).n_head == 4
    )


def test_bad_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hidden_size 64 does not divide by n_head 6"):
        BloomConfig(hidden_size=64, n_layer=2, n_head=6)
    with pytest.raises(ValueError, match="n_layer"):
        BloomConfig(hidden_size=64, n_layer=0, n_head=4)
    with pytest.raises(ValueError, match="config has no n_layer / num_hidden_layers"):
        BloomConfig.from_hf_config({"hidden_size": 64, "n_head": 4})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        BloomConfig.from_json(tmp_path / "config.json")

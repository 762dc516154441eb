"""Presets, published config.json files and the flags that must be refused."""

import json
import re
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
    "sizes", [{"n_head": 4, "num_attention_heads": 8}, {"hidden_size": 64, "n_embed": 128}], ids=["heads", "hidden"]
)
def test_two_spellings_of_a_size_that_disagree_are_refused(tmp_path, sizes):
    """The weights' shapes cannot tell 4 heads from 8: transformers would take the other spelling, a different model."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GOOD | sizes))
    (first, a), (second, b) = sizes.items()
    with pytest.raises(ValueError, match=rf"config.json: config gives {first} = {a} and {second} = {b}: two spellings"):
        BloomConfig.from_json(path)
    agreeing = GOOD | {first: a, second: a}
    assert BloomConfig.from_hf_config(agreeing) == BloomConfig.from_hf_config(GOOD | {first: a})
    null = GOOD | {first: a, second: None}  # as absent, as transformers reads it
    assert BloomConfig.from_hf_config(null) == BloomConfig.from_hf_config(GOOD | {first: a})


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


GOOD = {"hidden_size": 64, "n_head": 4, "n_layer": 2, "vocab_size": 100}


@pytest.mark.parametrize(
    "key,value",
    [
        ("n_layer", True), ("n_layer", "2"), ("n_layer", 2.0), ("n_layer", -1), ("n_layer", None),
        ("n_embed", 0), ("hidden_size", [64]), ("num_attention_heads", False), ("n_head", 1e400),
        ("vocab_size", 0), ("vocab_size", -5), ("vocab_size", 100.5),
        ("layer_norm_epsilon", -1e-5), ("layer_norm_epsilon", 0), ("layer_norm_epsilon", float("nan")),
        ("layer_norm_epsilon", float("inf")), ("layer_norm_epsilon", "1e-5"), ("layer_norm_epsilon", True),
        ("pad_token_id", 100), ("pad_token_id", -1), ("eos_token_id", "2"), ("eos_token_id", [2, 100]),
        ("eos_token_id", []), ("eos_token_id", [2, None]), ("pad_token_id", [3]), ("bos_token_id", 1.0),
        ("eos_token_id", True),
        ("apply_residual_connection_post_layernorm", "false"), ("tie_word_embeddings", 1),
        ("slow_but_exact", None), ("pretraining_tp", "4"), ("pretraining_tp", 0),
    ],
)  # fmt: skip
def test_values_of_the_wrong_type_or_range_are_refused_naming_file_and_key(tmp_path, key, value):
    path = tmp_path / "config.json"
    replaced = {"n_embed": "hidden_size", "num_attention_heads": "n_head"}.get(key)  # the old spellings
    path.write_text(json.dumps({k: v for k, v in GOOD.items() if k != replaced} | {key: value}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {key} should be"):
        BloomConfig.from_json(path)


def test_a_list_of_eos_ids_is_kept_as_transformers_keeps_it():
    config = BloomConfig.from_hf_config(GOOD | {"eos_token_id": [2, 7], "pad_token_id": None, "layer_norm_epsilon": 1})
    assert (config.eos_token_id, config.pad_token_id, config.layer_norm_epsilon) == ((2, 7), None, 1)


def test_direct_construction_names_the_field():
    with pytest.raises(ValueError, match=r"BloomConfig.n_layer should be a positive integer, got True"):
        BloomConfig(hidden_size=64, n_layer=True, n_head=4)


@pytest.mark.parametrize("contents", [b"\xff\xfe{}", b"[" * 100_000])
def test_unreadable_json_names_the_file(tmp_path, contents):
    (tmp_path / "config.json").write_bytes(contents)
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        BloomConfig.from_json(tmp_path / "config.json")

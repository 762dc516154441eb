"""Tiny BLOOM checkpoints in the published layouts, built at test time with transformers' own BLOOM.

Two layouts:
- `save_transformers`: what `BloomForCausalLM.save_pretrained` writes (keys prefixed `transformer.`,
  safetensors, optionally sharded with model.safetensors.index.json).
- `save_bigscience`: what the bigscience repos hold: keys with no prefix, no lm_head, fp16 (bf16 for the
  176B model), shards listed in an index, shard names taken from the index (the 176B spelling by default).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BloomConfig as HFBloomConfig
from transformers import BloomForCausalLM


def random_hf_bloom(seed: int = 0, **config) -> BloomForCausalLM:
    """A transformers BLOOM with every parameter random.

    transformers initialises biases to 0 and LayerNorms to identity, and its 0.02 std makes attention nearly
    uniform; both would hide bugs, so every tensor is redrawn here with scales that keep the logits lively.
    The projections are drawn at twice unit gain and the embedding LayerNorm scaled down to a quarter, so
    that the blocks, not just the current token's embedding, decide the next token: greedy generation then
    varies instead of repeating one token. (Larger gains amplify float32 rounding past 1e-5.)
    """
    config = {"vocab_size": 320, "hidden_size": 48, "n_layer": 2, "n_head": 6, "pad_token_id": 3} | config
    torch.manual_seed(seed)
    model = BloomForCausalLM(HFBloomConfig(**config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(param))
                if name.startswith("transformer.word_embeddings_layernorm"):
                    param.mul_(0.25)
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif "word_embeddings" in name:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
            else:
                param.copy_(2 * torch.randn_like(param) / param.shape[-1] ** 0.5)
    return model


def left_padded(lengths: list[int], vocab_size: int = 320, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (never a special token), left-padded with `pad` to the longest length, and their mask."""
    T = max(lengths)
    ids = torch.randint(4, vocab_size, (len(lengths), T))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : T - length] = pad
        mask[row, T - length :] = 1
    return ids, mask


def save_transformers(model: BloomForCausalLM, folder: Path, max_shard_size: str | None = None) -> Path:
    """transformers' own save_pretrained, in safetensors."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    return folder


def bigscience_state(model: BloomForCausalLM, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The model's tensors as the bigscience repos name them: no `transformer.` prefix, no lm_head."""
    return {
        name.removeprefix("transformer."): tensor.to(dtype).contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }


def save_bigscience(
    model: BloomForCausalLM,
    folder: Path,
    dtype: torch.dtype = torch.float16,
    n_shards: int = 3,
    shard_name: str = "model_{i:05d}-of-{n:05d}.safetensors",
) -> Path:
    """Save in the bigscience layout: the embedding in the first shard, blocks spread over the others."""
    folder.mkdir(parents=True, exist_ok=True)
    state = bigscience_state(model, dtype)
    n_layer = model.config.n_layer

    def shard_of(key: str) -> int:
        if key.startswith("h."):
            return 1 + int(key.split(".")[1]) * (n_shards - 1) // n_layer if n_shards > 1 else 0
        return n_shards - 1 if key.startswith("ln_f") else 0

    names = [shard_name.format(i=i + 1, n=n_shards) for i in range(n_shards)]
    weight_map = {key: names[shard_of(key)] for key in state}
    for name in names:
        save_file({k: v for k, v in state.items() if weight_map[k] == name}, folder / name, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_published_config(model.config, folder, dtype)
    return folder


def write_published_config(hf_config: HFBloomConfig, folder: Path, dtype: torch.dtype) -> None:
    """A config.json in the style of the original bigscience files (old key spellings, unused Megatron keys)."""
    config = {
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["BloomForCausalLM"],
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_dropout": 0.0,
        "initializer_range": 0.02,
        "layer_norm_epsilon": hf_config.layer_norm_epsilon,
        "masked_softmax_fusion": True,
        "model_type": "bloom",
        "n_embed": hf_config.hidden_size,
        "n_inner": None,
        "n_layer": hf_config.n_layer,
        "num_attention_heads": hf_config.n_head,
        "offset_alibi": 100,
        "pad_token_id": 3,
        "pretraining_tp": 4,
        "seq_length": 2048,
        "skip_bias_add": True,
        "skip_bias_add_qkv": False,
        "slow_but_exact": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.20.0",
        "unk_token_id": 0,
        "use_cache": True,
        "vocab_size": hf_config.vocab_size,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))

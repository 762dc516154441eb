"""One layer's attention weights, per head, as views of the checkpoint's own tensors.

The fused `query_key_value` weight (3C, C) lays its output features out per head as [head][q | k | v][hd]
(bloom.model.Attention), and `dense` (C, C) reads the heads' outputs concatenated, head h at input features
h·hd .. (h+1)·hd. `head_weights` de-interleaves both into the per-head matrices of the usual notation, without
copying, so that for x = input_layernorm(residual) (B, T, C) and every head h:

    q_h = x @ W_Q[h] + b_Q[h]          (B, T, hd), equal to record(..., "h.{i}.self_attention.q")[:, h]
    k_h, v_h likewise with W_K, b_K and W_V, b_V
    head h's output in the residual stream = context[:, h] @ W_O[h]     (B, T, C); dense adds b_O once

The circuits of a head are products of two of these ((C, C) each: computed, not views):
    qk_circuit: x_t @ W_QK @ x_sᵀ is q_t·k_s without the biases (the scores then divide by √hd and add ALiBi)
    ov_circuit: x_s @ W_OV is what attending fully to position s writes into the stream, without b_V
"""

import torch

from bloom.config import is_integer
from bloom.model import Attention, Bloom
from bloom.research.probe import refuse_int8
from bloom.scale.quantize import Int8Linear


def head_weights(model: Bloom, layer: int) -> dict[str, torch.Tensor]:
    """The attention weights of block `layer`, per head (nh = the heads of this process):

    W_Q, W_K, W_V (nh, C, hd); b_Q, b_K, b_V (nh, hd); W_O (nh, hd, C); b_O (C,). Views: editing them in
    place edits the model.
    """
    if not 0 <= layer < len(model.h):
        raise ValueError(f"head_weights: layer {layer} does not exist; the model has layers 0..{len(model.h) - 1}")
    refuse_int8(model, "head_weights")
    attention = model.h[layer].self_attention
    nh, hd = attention.n_head, attention.head_dim
    qkv_weight = attention.query_key_value.weight.view(nh, 3, hd, -1)  # (nh, q|k|v, hd, C)
    qkv_bias = attention.query_key_value.bias.view(nh, 3, hd)  # (nh, q|k|v, hd)
    weights = {f"W_{n}": qkv_weight[:, i].transpose(1, 2) for i, n in enumerate("QKV")}  # (nh, C, hd) each
    weights |= {f"b_{n}": qkv_bias[:, i] for i, n in enumerate("QKV")}  # (nh, hd) each
    weights["W_O"] = output_weights(attention)
    weights["b_O"] = attention.dense.bias  # (C,)
    return weights


def output_weights(attention: Attention) -> torch.Tensor:
    """W_O (nh, hd, C): each head's slice of `dense`, a view of its weight; with int8 weights (quantize="int8")
    the dequantized q · scale that the layer multiplies by, a copy."""
    weight = attention.dense.weight  # (C, nh·hd)
    if isinstance(attention.dense, Int8Linear):
        weight = weight.to(attention.dense.scale.dtype) * attention.dense.scale[:, None]
    return weight.view(-1, attention.n_head, attention.head_dim).permute(1, 2, 0)  # (C, nh, hd) -> (nh, hd, C)


def qk_circuit(weights: dict[str, torch.Tensor], head: int) -> torch.Tensor:
    """W_QK = W_Q[h] @ W_K[h]ᵀ, (C, C): the bilinear form of query and key positions' (normed) residuals."""
    _check_head("qk_circuit", weights, head)
    return weights["W_Q"][head] @ weights["W_K"][head].T


def ov_circuit(weights: dict[str, torch.Tensor], head: int) -> torch.Tensor:
    """W_OV = W_V[h] @ W_O[h], (C, C): from a key position's (normed) residual to what the head writes."""
    _check_head("ov_circuit", weights, head)
    return weights["W_V"][head] @ weights["W_O"][head]


def _check_head(what: str, weights: dict[str, torch.Tensor], head: int) -> None:
    n_head = weights["W_Q"].shape[0]
    if not (is_integer(head) and 0 <= head < n_head):
        raise ValueError(f"{what}: head {head!r} does not exist; the layer has heads 0..{n_head - 1}")

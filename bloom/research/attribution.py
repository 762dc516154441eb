"""Where the logits come from: the residual stream split into the pieces that write into it.

The residual stream entering ln_f is a sum, exactly (up to float rounding): the embedding, then for each
block each head's output through its own slice of `dense`, `dense`'s bias, and the MLP's output:

    h.{L-1} = embed + Σ_i (Σ_h head_{i,h} + attn_bias_i + mlp_i)

ln_f is not linear, so a component's share of a logit needs a choice: here ln_f's scale is frozen at the
full residual's. ln_f(x) = γ ⊙ (x − mean x) / std(x) + β is linear in x once std(x) is fixed, so with
std taken from the whole residual each component c contributes γ ⊙ (c − mean c) / std · u to the logit
u·ln_f(x) (u the token's unembedding row), and these plus β·u sum to the logit. The attribution is exact as a
decomposition of this run's logit; what it is not is the effect of removing a component, which would also
change std (use bloom.research.patching for effects).

A model with int8 weights (quantize="int8") is decomposed through each head's slice of q · scale, the weight its
`dense` multiplies by, so a large model loaded in int8 can be studied as it runs.
"""

import torch

from bloom.model import Bloom
from bloom.research.lens import check_tokens_like
from bloom.research.probe import record
from bloom.research.weights import output_weights


def residual_components(
    model: Bloom, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[list[str], torch.Tensor]:
    """The residual stream entering ln_f, split into K parts: (labels, parts (K, B, T, C)), parts.sum(0) = h.{L-1}.

    Labels, in this order: "embed" (the output of word_embeddings_layernorm); then for each layer i,
    "h.{i}.head.{h}" for every head h (its output through its slice of `dense`, without the bias),
    "h.{i}.attn_bias" (dense's bias) and "h.{i}.mlp" (the MLP's output, its bias included).
    K = 1 + n_layer · (nh + 2). input_ids, attention_mask (B, T) as for the model.
    """
    labels, parts, _ = _components(model, input_ids, attention_mask)
    return labels, parts


@torch.no_grad()
def direct_logit_attribution(
    model: Bloom, input_ids: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[list[str], torch.Tensor]:
    """Each component's share of the logit of `tokens` (B, T) at each position: (labels, attrib (K + 1, B, T)).

    Labels are those of `residual_components`, plus "ln_f_bias" last (β · u). Component c gives
    (γ ⊙ (c − mean c) / std) · u, where std = sqrt(var(x) + eps) is that of the whole residual x entering
    ln_f (frozen) and u = the token's row of the unembedding. attrib.sum(0) is the logit, the model's own
    logits[b, t, tokens[b, t]]. Computed in float32.
    """
    check_tokens_like(tokens, input_ids, model.config.vocab_size)
    labels, parts, residual = _components(model, input_ids, attention_mask)
    ln_f = model.ln_f
    residual = residual.float()
    std = torch.sqrt(residual.var(dim=-1, unbiased=False, keepdim=True) + ln_f.eps)  # (B, T, 1), as ln_f computes it
    unembed = model.word_embeddings(tokens).float()  # (B, T, C): the LM head's rows of the tokens (tied)
    direction = ln_f.weight.float() * unembed / std  # (B, T, C)
    parts = parts.float()
    centred = parts - parts.mean(dim=-1, keepdim=True)  # (K, B, T, C)
    attrib = (centred * direction).sum(dim=-1)  # (K, B, T)
    bias = (ln_f.bias.float() * unembed).sum(dim=-1)  # (B, T)
    return labels + ["ln_f_bias"], torch.cat([attrib, bias[None]])


@torch.no_grad()
def _components(
    model: Bloom, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """labels, parts (K, B, T, C), and the residual entering ln_f as the model computed it (B, T, C)."""
    last = f"h.{len(model.h) - 1}"
    with record(model, "word_embeddings_layernorm", "h.*.self_attention.context", "h.*.mlp", last) as seen:
        model.hidden(input_ids, attention_mask)
    embed = seen["word_embeddings_layernorm"]  # (B, T, C)
    labels, parts = ["embed"], [embed[None]]
    for i in range(len(model.h)):
        attention = model.h[i].self_attention
        context = seen[f"h.{i}.self_attention.context"]  # (B, nh, T, hd)
        heads = torch.einsum("bhtd,hdc->hbtc", context, output_weights(attention))  # (nh, B, T, C)
        labels += [f"h.{i}.head.{h}" for h in range(heads.shape[0])] + [f"h.{i}.attn_bias", f"h.{i}.mlp"]
        parts += [heads, attention.dense.bias.expand_as(embed)[None], seen[f"h.{i}.mlp"][None]]
    return labels, torch.cat(parts), seen[last]

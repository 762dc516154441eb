"""The logit lens: read the residual stream after every block as if it were the last one."""

import torch

from bloom.model import Bloom
from bloom.research.probe import record


@torch.inference_mode()
def logit_lens(
    model: Bloom, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, k: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k next-token probabilities of each layer's residual stream through ln_f and the LM head.

    Returns (probs, token_ids), each (n_layer + 1, B, T, k): row 0 reads the stream entering block 0 (the
    embedding after its LayerNorm), row i >= 1 the stream after block i - 1 (`h.{i-1}`); the last row is the model's
    own output.
    """
    with record(model, "word_embeddings_layernorm", "h.*") as seen:
        model.hidden(input_ids, attention_mask)  # the blocks only: the LM head runs below, once per layer
    streams = [seen["word_embeddings_layernorm"]] + [seen[f"h.{i}"] for i in range(len(model.h))]
    top = []
    for x in streams:  # one layer at a time: (B, T, V) logits per layer, not (n_layer + 1, B, T, V)
        logits = model.word_embeddings.unembed(model.ln_f(x))  # (B, T, V)
        top.append(torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1))
    return torch.stack([t.values for t in top]), torch.stack([t.indices for t in top])

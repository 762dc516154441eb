"""The logit lens: read the residual stream after every block as if it were the last one."""

from collections.abc import Iterator

import torch

from bloom.model import Bloom, refuse_non_tokens
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
    layers = _read(model, input_ids, attention_mask)
    top = [torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1) for logits in layers]
    return torch.stack([t.values for t in top]), torch.stack([t.indices for t in top])


@torch.inference_mode()
def logit_lens_log_probs(
    model: Bloom, input_ids: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The log-probability each layer's residual stream gives `tokens` (B, T), one per position (the next tokens,
    or an answer repeated): (n_layer + 1, B, T) float32, its rows the layers of `logit_lens`; the last row is the
    model's own log_softmax(logits) at the tokens."""
    check_tokens_like(tokens, input_ids, model.config.vocab_size)
    layers = _read(model, input_ids, attention_mask)
    index = tokens[..., None].to(input_ids.device)  # (B, T, 1)
    return torch.stack([torch.log_softmax(logits.float(), dim=-1).gather(-1, index)[..., 0] for logits in layers])


def check_tokens_like(tokens: torch.Tensor, input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse `tokens` unless they are token ids shaped as input_ids, one per position."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids is {type(input_ids).__name__}, expected a (batch, tokens) tensor")
    if not isinstance(tokens, torch.Tensor) or tokens.shape != input_ids.shape:
        found = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens is {found}: one token per position, a tensor like input_ids {tuple(input_ids.shape)}")
    refuse_non_tokens(tokens, vocab_size, "tokens")


def _read(model: Bloom, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Iterator[torch.Tensor]:
    """Each layer's residual stream through ln_f and the LM head, (B, T, V) logits, one layer at a time (not
    (n_layer + 1, B, T, V) at once)."""
    with record(model, "word_embeddings_layernorm", "h.*") as seen:
        model.hidden(input_ids, attention_mask)  # the blocks only: the LM head runs below, once per layer
    streams = [seen["word_embeddings_layernorm"]] + [seen[f"h.{i}"] for i in range(len(model.h))]
    for x in streams:
        yield model.word_embeddings.unembed(model.ln_f(x))  # (B, T, V)

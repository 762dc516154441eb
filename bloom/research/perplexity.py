"""Perplexity of a long text, scored with sliding windows.

A text longer than the context is cut into windows of `context` tokens that start every `stride` tokens.
A window scores only the tokens that the previous window did not reach, each from the tokens before it in
the window, so with stride < context every token after the first window sees at least context - stride
tokens of context. A token with nothing before it in its window is not scored: the first token of the
text, and with stride = context (windows that do not overlap) the first token of every window. This is
the procedure of transformers' "perplexity of fixed-length models" guide, so the numbers are comparable.
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub.utils import tqdm

from bloom.checkpoints.tokenizer import left_pad
from bloom.memory import check_attention_fits
from bloom.model import Bloom, refuse_non_tokens

LOGITS_CHUNK = 256  # positions whose (chunk, V) logits are materialised at once


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window
    end: int  # one past the last token
    first_scored: int  # tokens [first_scored, end) are scored


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    n_scored: int
    n_windows: int


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    if context < 2:  # a window's first token is never scored: one token alone scores nothing
        raise ValueError(f"context must be 2 or more (a window of one token scores nothing), got {context}")
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    windows, scored_up_to = [], 1  # token 0 is never scored
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        windows.append(Window(begin, end, max(scored_up_to, begin + 1)))
        scored_up_to = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def perplexity(
    model: Bloom,
    token_ids: list[int] | torch.Tensor,
    *,
    context: int,
    stride: int,
    batch_size: int = 4,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of `token_ids` (a list, or a tensor (T,)) under the model, windows batched `batch_size` at a time
    (left-padded)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
    device = model.word_embeddings.weight.device
    if isinstance(token_ids, str):
        raise ValueError("token_ids is a str: perplexity scores token ids, e.g. tokenizer.encode(text)")
    tokens = torch.as_tensor(token_ids, device=device)
    if tokens.ndim != 1:
        raise ValueError(f"token_ids must be one sequence of ids, (T,), got {tuple(tokens.shape)}")
    windows = sliding_windows(len(tokens), context, stride)  # first: an empty list is a float32 tensor
    refuse_non_tokens(tokens, model.config.vocab_size, "token_ids")
    check_attention_fits(model, min(batch_size, len(windows)), max(w.end - w.begin for w in windows))
    nll, n_scored = 0.0, 0
    with tqdm(total=len(windows), desc="Scoring", unit="window", disable=not progress) as bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            ids, mask = left_pad([tokens[w.begin : w.end].tolist() for w in batch], model.config.pad_token_id or 0)
            T = ids.shape[1]
            hidden = model.hidden(ids.to(device), mask.to(device))  # (B, T, C)
            for row, w in enumerate(batch):
                offset = T - w.end  # column of token i is i + offset
                predictors = hidden[row, w.first_scored - 1 + offset : w.end - 1 + offset]  # (n, C)
                nll += _nll_sum(model, predictors, tokens[w.first_scored : w.end])
                n_scored += w.end - w.first_scored
            bar.update(len(batch))
    mean = nll / n_scored
    return Perplexity(math.exp(mean), mean, n_scored, len(windows))


def _nll_sum(model: Bloom, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed -log p(target) for (n, C) hidden states, in float32 logits, a chunk of positions at a time."""
    chunks = float_logits(model, hidden)
    return sum(F.cross_entropy(logits, targets[at], reduction="sum").item() for at, logits in chunks)


def float_logits(model: Bloom, hidden: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """(n, C) hidden states -> their logits in float32, LOGITS_CHUNK positions at a time: (positions, (chunk, V))."""
    for i in range(0, len(hidden), LOGITS_CHUNK):
        yield slice(i, i + LOGITS_CHUNK), model.word_embeddings.unembed(hidden[i : i + LOGITS_CHUNK]).float()

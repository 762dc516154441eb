"""Text generation with a KV cache: one prefill over the prompt, then one-token decode steps.

Arguments follow transformers' `generate()` in name and meaning, with one difference: transformers
samples with top_k=50 unless told otherwise; here nothing is filtered unless asked (top_k=None).
The logits of each step go through, in transformers' order: repetition penalty, temperature, top-k,
top-p; then argmax (greedy) or a draw (sampling). No step waits on the host: whether every row has
finished is checked every `EOS_CHECK_EVERY` steps (every step when streaming), and the columns generated
after the last row finished are dropped at the end.
"""

import math
from collections.abc import Callable, Iterator

import torch

from bloom.decoder import Decoder
from bloom.model import Bloom

EOS_CHECK_EVERY = 16


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B, V) logits, (B, V) bool: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th), -inf elsewhere."""
    kth_largest = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose probabilities add up to at least p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop_sorted = mass_before >= p  # the most likely token always stays (mass_before = 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of (B, V) probabilities -> (B,).

    argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i, and unlike torch.multinomial it
    never synchronises with the host.
    """
    exponential = torch.empty_like(probs).exponential_(generator=generator)
    return torch.argmax(probs / exponential, dim=-1)


def generate(
    model: Bloom,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    decoder: Decoder | None = None,
) -> torch.Tensor:
    """Continue each prompt of a left-padded batch; returns the prompt plus the new tokens, (B, T + new).

    input_ids, attention_mask: (B, T); the mask is 1 on real tokens, 0 on the left padding. Without a
        mask, positions equal to pad_token_id are taken as padding (as transformers does) when the pad id
        differs from the EOS id.
    max_new_tokens: at most this many new tokens; fewer when every row has produced EOS.
    do_sample: draw from the distribution; otherwise take the most likely token (greedy).
    temperature, top_k, top_p: reshape the distribution before drawing (sampling only). No top-k is
        applied unless given (transformers would default to 50).
    repetition_penalty: > 1 makes tokens already in the row (prompt or generated) less likely.
    eos_token_id, pad_token_id: default to the model config's. A row that produced EOS gets pad after it.
    seed: makes sampling reproducible; otherwise torch's global generator is used.
    streamer: called with each step's new tokens, (B,), as soon as they are chosen. With a streamer, EOS is
        checked at every step; under tensor parallelism give every process one, or none, so that all stop together.
    decoder: the decode step and KV cache to use (batch size B, at least T + max_new_tokens slots): pass a
        `Decoder(model, B, max_len, compile=True)` to decode with a compiled step, and reuse it across calls.
        An eager one of exactly T + max_new_tokens slots is made otherwise.
    """
    steps = generate_steps(
        model, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, decoder=decoder,
    )  # fmt: skip
    columns, alive = [], []  # (B,) per step; whether any row was still going at that step
    for step, (tokens, finished_before) in enumerate(steps):
        columns.append(tokens)
        alive.append(~finished_before.all())
        if streamer is not None:
            streamer(tokens)
        if (streamer is not None or (step + 1) % EOS_CHECK_EVERY == 0) and bool(finished_before.all()):
            break
    if not columns:
        return input_ids
    n_used = int(torch.stack(alive).nonzero().max()) + 1  # the one host sync: drop all-finished columns
    return torch.cat([input_ids, torch.stack(columns[:n_used], dim=1)], dim=1)


@torch.inference_mode()
def generate_steps(
    model: Bloom,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    eos_token_id: int | None,
    pad_token_id: int | None,
    seed: int | None,
    decoder: Decoder | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield, for each new position, the chosen tokens (B,) and whether each row had finished before it.

    Arguments as in `generate`. Rows that finished get pad_token_id. Stops after max_new_tokens; the
    caller decides when to stop earlier (a host sync).
    """
    check_sampling(do_sample, temperature, top_k, top_p, repetition_penalty, max_new_tokens)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    device = input_ids.device
    eos_token_id = model.config.eos_token_id if eos_token_id is None else eos_token_id
    pad_token_id = model.config.pad_token_id if pad_token_id is None else pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_token_id
    if attention_mask is None:
        infer = pad_token_id is not None and pad_token_id != eos_token_id
        attention_mask = (input_ids != pad_token_id).long() if infer else torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if not attention_mask[:, -1].all():  # one host sync per call
        row = int((attention_mask[:, -1] == 0).nonzero()[0])
        raise ValueError(
            f"row {row} of the batch ends in padding: pad prompts on the left, and give each at least one token"
        )
    if max_new_tokens == 0:
        return
    if decoder is None:
        decoder = Decoder(model, B, T + max_new_tokens)
    elif decoder.model is not model:
        raise ValueError("this decoder was made for another model")
    elif decoder.batch_size != B or decoder.max_len < T + max_new_tokens:
        raise ValueError(
            f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) need a cache of batch {B} and at "
            f"least {T + max_new_tokens} slots; this decoder has batch {decoder.batch_size} and {decoder.max_len}"
        )
    decoder.check()
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)

    # Every slot after the prompt will hold a real token; causality hides the ones not yet written.
    mask = torch.ones(B, decoder.max_len, dtype=torch.long, device=device)  # (B, S_max)
    mask[:, :T] = attention_mask
    seen = None  # (B, V): the tokens in each row, kept only for a repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.int32, device=device)
        seen = seen.scatter_add_(1, input_ids, attention_mask.to(torch.int32)) > 0
    rows = torch.arange(B, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    logits = model(input_ids, attention_mask, decoder.cache, last_only=True)  # prefill: (B, 1, V)
    slot = torch.tensor([T], device=device)  # where the next token goes; advanced in place
    for step in range(max_new_tokens):
        scores = logits[:, -1].float()  # (B, V)
        if seen is not None:
            scores = apply_repetition_penalty(scores, seen, repetition_penalty)
        if do_sample:
            scores = scores / temperature
            if top_k is not None:
                scores = top_k_filter(scores, top_k)
            if top_p is not None and top_p < 1.0:
                scores = top_p_filter(scores, top_p)
            tokens = sample(torch.softmax(scores, dim=-1), generator)
        else:
            tokens = torch.argmax(scores, dim=-1)
        tokens = torch.where(finished, pad_token_id, tokens)  # (B,)
        yield tokens, finished.clone()
        if eos_token_id is not None:
            finished |= tokens == eos_token_id
        if seen is not None:
            seen[rows, tokens] = True
        if step + 1 < max_new_tokens:
            logits = decoder.step(tokens, mask, slot)  # (B, 1, V)
            slot += 1


def check_sampling(
    do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, penalty: float, max_new_tokens: int
) -> None:
    """Raise ValueError on sampling arguments that `generate` cannot honour."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not 0 < penalty < math.inf:
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {penalty}")
    if not do_sample:
        if temperature != 1.0 or top_k is not None or top_p is not None:
            raise ValueError("temperature, top_k and top_p only apply when sampling: pass do_sample=True")
        return
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature} (greedy: do_sample=False)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

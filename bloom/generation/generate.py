"""Text generation with a KV cache: one prefill over the prompt, then one-token decode steps.

Arguments follow transformers' `generate()` in name and meaning, with one difference: transformers
samples with top_k=50 unless told otherwise; here nothing is filtered unless asked (top_k=None).
The logits of each step go through, in transformers' order: repetition penalty, temperature, top-k,
top-p; then argmax (greedy) or a draw (sampling). The penalty is applied in float64, and the temperature in
float64 after subtracting each row's maximum, so that no setting overflows: a temperature near 0 gives the
greedy choice (ties shared evenly), never a float32 infinity. No step waits on the host: the arguments, the
prompt and its logits (no NaN or inf) are checked once per call, whether every row has finished is checked every
`EOS_CHECK_EVERY` steps (every step when streaming), and the columns generated after the last row finished are
dropped at the end.

Memory follows the tokens generated, not `max_new_tokens` (bloom.generation.decoder.Decoder grows the KV cache by
doubling), so a large `max_new_tokens` costs nothing until it is used. Prompts longer than BLOOM's 2,048
training positions run: ALiBi has no position table to run out of and extrapolates, but whether the text stays
good that far is the user's question. The prefill's attention takes memory linear in the prompt length
beyond bloom.model.SCORES_BUDGET (queries in chunks); `bloom.memory.check_attention_fits` refuses a prompt
whose attention tensors cannot fit before they are allocated.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing

import torch

from bloom import matvec
from bloom.config import is_integer
from bloom.generation.decoder import Decoder
from bloom.memory import check_attention_fits
from bloom.model import Bloom, refuse_non_tokens

EOS_CHECK_EVERY = 16
PENALTY_RANGE = (1e-100, 1e100)  # float64 holds every float32 logit penalized by these, with no overflow or underflow


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(B, V) logits, (B, V) bool: divide positive logits of seen tokens by `penalty`, multiply negative ones.

    Computed in float64, which holds the result for every float32 logit and a penalty in PENALTY_RANGE.
    """
    logits = logits.double()
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, V) logits -> (logits - row maximum) / temperature, in float32, for any temperature > 0.

    Subtracting the maximum first (softmax does not change) leaves values <= 0 that cannot overflow: the
    most likely token stays at 0 and the others may only underflow to -inf (probability 0), so a temperature
    near 0 gives the greedy choice, ties shared evenly.
    """
    logits = logits.double()
    return ((logits - logits.max(dim=-1, keepdim=True).values) / temperature).float()


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
    eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    decoder: Decoder | None = None,
) -> torch.Tensor:
    """Continue each prompt of a left-padded batch; returns the prompt plus the new tokens, (B, T + new).

    input_ids, attention_mask: (B, T) token ids of the model's vocabulary; the mask is 1 on real tokens, 0 on
        the left padding. Without a mask, positions equal to pad_token_id are taken as padding (as transformers
        does) when the pad id is not an EOS id.
    max_new_tokens: at most this many new tokens; fewer when every row has produced EOS. Memory and time
        follow the tokens generated, so a bound far above what EOS leaves costs nothing.
    do_sample: draw from the distribution; otherwise take the most likely token (greedy).
    temperature, top_k, top_p: reshape the distribution before drawing (sampling only). No top-k is
        applied unless given (transformers would default to 50). Any temperature > 0 works; near 0 it is greedy.
    repetition_penalty: > 1 makes tokens already in the row (prompt or generated) less likely; within PENALTY_RANGE.
    eos_token_id: an id, or several (a list, tuple or 1-D tensor: a row stops at any of them, as in
        transformers); an empty list never stops. pad_token_id: an id. Both default to the model config's;
        pad then defaults to the (first) EOS id. A row that produced EOS gets pad after it.
    seed: makes sampling reproducible; otherwise torch's global generator is used.
    streamer: called with each step's new tokens, (B,), as soon as they are chosen (inference tensors, read-only:
        clone them to edit), in the caller's autograd mode. With a streamer, EOS is checked at every step; under
        tensor parallelism give every process one, or none, so that all stop together.
    decoder: the decode step and KV cache to use (batch size B): pass a `Decoder(model, B, compile=True)` to
        decode with a compiled step, and reuse it across calls (one call at a time). An eager one is made otherwise.

    Bad arguments raise ValueError naming the argument, before any work. Logits holding NaN or inf after the prompt
    raise ValueError too, naming the weight that holds them (a damaged checkpoint) or else the dtype the activations
    overflowed (fp16). A MemoryError says what could not fit (the prompt's attention, or the KV cache as it grows)
    and how much memory is available. Its `sequences` attribute holds the prompt and every token chosen until then,
    (B, T + n), as does a KeyboardInterrupt's (Ctrl-C) raised during the steps.
    """
    # every step's tokens, and whether any row was still going then, written in place into columns made at the first
    # step and doubled when full (memory follows the tokens generated, not max_new_tokens): tensors kept per step,
    # small as they are, sat in the C heap among the steps' freed logits and kept it from reusing them (a batch of 8
    # of a small model grew by ~6 MB a step, 2-3 GB over 500 steps, until the generation ended)
    columns = alive = None  # (B, capacity), (capacity,)
    n = 0  # steps taken
    steps = generate_steps(
        model, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, decoder=decoder,
    )  # fmt: skip
    try:
        with closing(steps):  # hands the decoder back at once, even after a break
            for step, (tokens, finished_before) in enumerate(steps):
                if streamer is not None and bool(finished_before.all()):
                    break  # every row had finished: a column of padding, not streamed
                if n == 0:
                    columns, alive = tokens.new_zeros(len(tokens), 64), finished_before.new_zeros(64)
                elif n == len(alive):
                    columns, alive = (torch.cat([t, torch.zeros_like(t)], dim=-1) for t in (columns, alive))
                columns[:, n] = tokens
                alive[n] = ~finished_before.all()
                n += 1
                if streamer is not None:
                    streamer(tokens)
                elif (step + 1) % EOS_CHECK_EVERY == 0 and bool(finished_before.all()):
                    break
    except (MemoryError, KeyboardInterrupt) as error:
        error.sequences = join_columns(input_ids, columns, alive, n)
        raise
    return join_columns(input_ids, columns, alive, n)


def join_columns(
    input_ids: torch.Tensor, columns: torch.Tensor | None, alive: torch.Tensor | None, n: int
) -> torch.Tensor:
    """The prompt (B, T) and the first n new columns (B, n), without those after every row had finished (alive:
    whether any row was still going at each step): (B, T + n')."""
    if n == 0:
        return input_ids
    n_used = int(alive[:n].nonzero().max()) + 1  # the one host sync: drop all-finished columns
    return torch.cat([input_ids, columns[:, :n_used]], dim=1)


def generate_steps(
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
    eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    decoder: Decoder | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield, for each new position, the chosen tokens (B,) and whether each row had finished before it.

    Arguments as in `generate`. Rows that finished get pad_token_id. Stops after max_new_tokens; the
    caller decides when to stop earlier (a host sync). Holds the decoder until it ends or is closed. Each step runs
    under inference_mode, the caller's code between steps in its own mode; the yielded tensors are inference
    tensors (clone them to edit).
    """
    check_sampling(do_sample, temperature, top_k, top_p, repetition_penalty, max_new_tokens)
    if seed is not None and (not is_integer(seed) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if seed is not None and not do_sample:  # as temperature, top_k and top_p: a greedy run would ignore it
        raise ValueError("seed only applies when sampling: pass do_sample=True")
    vocab_size = model.config.vocab_size
    eos_ids = resolve_eos_ids(model, eos_token_id)
    if pad_token_id is not None:
        check_token_id("pad_token_id", pad_token_id, vocab_size)
    elif model.config.pad_token_id is not None:
        pad_token_id = model.config.pad_token_id
        check_token_id("the model config's pad_token_id", pad_token_id, vocab_size)
    elif eos_ids:
        pad_token_id = eos_ids[0]
    if attention_mask is None and isinstance(input_ids, torch.Tensor):
        infer = pad_token_id is not None and pad_token_id not in eos_ids
        attention_mask = (input_ids != pad_token_id).long() if infer else torch.ones_like(input_ids)
    check_prompt(input_ids, attention_mask, vocab_size)
    if max_new_tokens == 0:
        return
    B, T = input_ids.shape
    device = input_ids.device
    check_attention_fits(model, B, T)
    if decoder is None:
        decoder = Decoder(model, B, T + max_new_tokens)
    elif not isinstance(decoder, Decoder):
        raise ValueError(f"decoder must be a bloom.Decoder, got {type(decoder).__name__}")
    elif decoder.model is not model:
        raise ValueError("this decoder was made for another model")
    elif decoder.batch_size != B or (decoder.max_len is not None and decoder.max_len < T + max_new_tokens):
        raise ValueError(
            f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) need a decoder of batch {B} and at "
            f"least {T + max_new_tokens} slots; this one has batch {decoder.batch_size} and max_len {decoder.max_len}"
        )
    decoder.check()
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)  # (n_eos,)
    seen = None  # (B, V): the tokens in each row, kept only for a repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, vocab_size, dtype=torch.int32, device=device)
        seen = seen.scatter_add_(1, input_ids.long(), attention_mask.to(torch.int32)) > 0
    rows = torch.arange(B, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    # inference_mode around each step's work, never across a yield, so that the caller's code between steps runs in
    # its own mode; and not torch's decorator, whose wrapper, closing a generator still alive when Python exits,
    # fails on torch's torn-down globals ("Exception ignored in ...")
    with decoder.claimed():
        with torch.inference_mode():
            logits = decoder.prefill(input_ids, attention_mask.long())  # (B, 1, V)
            if not bool(torch.isfinite(logits[:, -1]).all()):  # one host sync, after the prompt only
                raise ValueError(why_not_finite(model, logits[:, -1]))
            # plain greedy choices straight from the logits, without their float32 copy (bloom.matvec.argmax)
            plain_greedy = not (do_sample or seen is not None)
            argmax_kernel = plain_greedy and decoder.matvec_kernels and matvec.argmax_applies(logits[:, -1])
        for step in range(max_new_tokens):
            with torch.inference_mode():
                if argmax_kernel:
                    tokens = matvec.argmax(logits[:, -1])
                else:
                    scores = logits[:, -1].float()  # (B, V)
                    if seen is not None:
                        scores = apply_repetition_penalty(scores, seen, repetition_penalty)  # float64
                    if do_sample:
                        scores = apply_temperature(scores, temperature)
                        if top_k is not None:
                            scores = top_k_filter(scores, top_k)
                        if top_p is not None and top_p < 1.0:
                            scores = top_p_filter(scores, top_p)
                        tokens = sample(torch.softmax(scores, dim=-1), generator)
                    else:
                        tokens = torch.argmax(scores, dim=-1)
                if eos_ids:  # (otherwise no row ever finishes)
                    tokens = torch.where(finished, pad_token_id, tokens)  # (B,)
                finished_before = finished.clone()
            yield tokens, finished_before
            with torch.inference_mode():
                if eos_ids:
                    finished |= torch.isin(tokens, eos)
                if seen is not None:
                    seen[rows, tokens] = True
                if step + 1 < max_new_tokens:
                    logits = decoder.step(tokens)  # (B, 1, V)


def why_not_finite(model: Bloom, logits: torch.Tensor) -> str:
    """Why logits (B, V) after the prompt hold NaN or inf: the first weight that does (a damaged checkpoint, found
    only now, as reading every weight at load would undo the loader's lazy mapping), or else activations that left
    the model's dtype's range. A greedy choice would otherwise be the first NaN's id, as torch.argmax picks it.
    Under tensor parallelism each process looks in its own shards only."""
    rows = [i for i, finite in enumerate(torch.isfinite(logits).all(dim=-1).tolist()) if not finite]
    what = f"the logits after the prompt hold NaN or inf (row{'s' * (len(rows) > 1)} {', '.join(map(str, rows))})"
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        pieces = tensor.detach().flatten().split(1 << 24)  # a bool copy of a piece at a time, not of the whole
        if tensor.is_floating_point() and not all(bool(torch.isfinite(piece).all()) for piece in pieces):
            return f"{what}: the model's {name} holds NaN or inf, so its checkpoint is damaged"
    sharded = torch.distributed.is_available() and torch.distributed.is_initialized()
    none = "no weight of this process's shards does" if sharded else "no weight does"
    hint = "; load the model in bf16, which has fp32's range" if logits.dtype == torch.float16 else ""
    return f"{what}, while {none}: the activations overflowed {str(logits.dtype).removeprefix('torch.')}{hint}"


def check_token_id(name: str, value: object, vocab_size: int) -> None:
    """Raise unless `value` is an int token id of a vocabulary of `vocab_size` rows."""
    if not is_integer(value):
        raise ValueError(f"{name} must be an integer token id, got {value!r} ({type(value).__name__})")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name} {value} is not a token id: the model's vocabulary has ids 0..{vocab_size - 1}")


def resolve_eos_ids(model: Bloom, eos_token_id: int | Sequence[int] | torch.Tensor | None) -> tuple[int, ...]:
    """The ids a generation stops at: eos_token_id's, or the model config's when it is None; checked."""
    if eos_token_id is None:
        return check_eos_ids("the model config's eos_token_id", model.config.eos_token_id, model.config.vocab_size)
    return check_eos_ids("eos_token_id", eos_token_id, model.config.vocab_size)


def check_eos_ids(name: str, eos_token_id: object, vocab_size: int) -> tuple[int, ...]:
    """eos_token_id as given (None, an id, a list, tuple or 1-D tensor of ids) -> a tuple of ids, checked."""
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, torch.Tensor):
        if eos_token_id.ndim > 1 or eos_token_id.is_floating_point() or eos_token_id.dtype == torch.bool:
            raise ValueError(f"{name} as a tensor must hold integer ids in at most 1 dimension, got {eos_token_id}")
        eos_token_id = eos_token_id.tolist()
    if not isinstance(eos_token_id, list | tuple):
        check_token_id(name, eos_token_id, vocab_size)
        return (eos_token_id,)
    for i, value in enumerate(eos_token_id):
        check_token_id(f"{name}[{i}]", value, vocab_size)
    return tuple(eos_token_id)


def check_prompt(input_ids: object, attention_mask: object, vocab_size: int) -> None:
    """Raise, naming the argument and the row, on input_ids or a mask that generate cannot take.

    Two host syncs: the ids in the vocabulary (bloom.model.refuse_non_tokens), then the mask of 0 and 1 and no row
    ending in padding.
    """
    for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if input_ids.ndim != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}")
    refuse_non_tokens(input_ids, vocab_size)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
    not_binary = (attention_mask != 0) & (attention_mask != 1)  # (B, T)
    n_not_binary, n_ending_in_pad = torch.stack([not_binary.sum(), (attention_mask[:, -1] == 0).sum()]).tolist()
    if n_not_binary:
        row, column = (int(i) for i in not_binary.nonzero()[0])
        raise ValueError(
            f"attention_mask must hold only 0 (padding) and 1 (tokens); attention_mask[{row}, {column}] = "
            f"{attention_mask[row, column].item()}"
        )
    if n_ending_in_pad:
        row = int((attention_mask[:, -1] == 0).nonzero()[0])
        raise ValueError(
            f"row {row} of the batch ends in padding: pad prompts on the left, and give each at least one token"
        )


def check_sampling(
    do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, penalty: float, max_new_tokens: int
) -> None:
    """Raise ValueError, naming the argument, on sampling arguments that `generate` cannot honour."""
    if not is_integer(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    for name, value in (("repetition_penalty", penalty), ("temperature", temperature), ("top_p", top_p)):
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if top_k is not None and not is_integer(top_k):
        raise ValueError(f"top_k must be an integer, got {top_k!r}")
    low, high = PENALTY_RANGE
    if not low <= penalty <= high:
        raise ValueError(f"repetition_penalty must be a finite number > 0, within [{low:g}, {high:g}], got {penalty}")
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

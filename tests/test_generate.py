"""The KV-cached sampler: greedy parity with transformers, cache correctness, sampling definitions, EOS,
memory that follows the tokens generated, arguments checked and named, one generation per decoder."""

import copy
import threading

import pytest
import torch
from tiny_checkpoint import left_padded, random_hf_bloom, save_transformers

import bloom.memory
from bloom import load_pretrained
from bloom.generation.decoder import MIN_CAPACITY, Decoder
from bloom.generation.generate import (
    apply_repetition_penalty,
    generate,
    generate_steps,
    sample,
    top_k_filter,
    top_p_filter,
)
from bloom.kv_cache import KVCache

PAD = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = random_hf_bloom(hidden_size=48, n_head=6, n_layer=3)
    return hf, save_transformers(hf, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def models(checkpoint):
    hf, folder = checkpoint
    return hf, load_pretrained(folder)


def hf_generate(hf, ids, mask, **kwargs):
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("lengths", [[11], [13, 5, 9, 1]])
def test_greedy_tokens_equal_transformers(models, lengths):
    hf, ours = models
    ids, mask = left_padded(lengths)
    expected = hf_generate(hf, ids, mask, max_new_tokens=24, eos_token_id=None)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert len(set(got[0, -24:].tolist())) > 3  # the tiny model does not just repeat one token
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [[11], [13, 5, 9, 1]])
def test_half_precision_greedy_tokens_equal_transformers_in_that_dtype(checkpoint, dtype, lengths):
    """The half-precision decode path (the kernels' products, the GeLU table, fp16 attention in float32, argmax in
    the model's dtype) against transformers' BLOOM loaded in the same dtype."""
    hf, folder = checkpoint
    hf_half = copy.deepcopy(hf).to(dtype)
    ids, mask = left_padded(lengths)
    expected = hf_generate(hf_half, ids, mask, max_new_tokens=24, eos_token_id=None)
    got = generate(load_pretrained(folder, dtype=dtype), ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    assert len(set(got[0, -24:].tolist())) > 3
    assert torch.equal(got, expected)


def test_greedy_with_repetition_penalty_equals_transformers(models):
    hf, ours = models
    ids, _ = left_padded([10, 10])  # no padding: transformers would also penalise the pad token
    expected = hf_generate(hf, ids, None, max_new_tokens=20, eos_token_id=None, repetition_penalty=1.8)
    got = generate(ours, ids, max_new_tokens=20, eos_token_id=[], repetition_penalty=1.8)
    assert torch.equal(got, expected)


def test_eos_stops_rows_and_pads_the_rest_like_transformers(models):
    hf, ours = models
    ids, mask = left_padded([7, 12, 4])
    free_run = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    eos = int(free_run[1, 12 + 3])  # the 4th token of row 1 plays EOS
    expected = hf_generate(hf, ids, mask, max_new_tokens=20, eos_token_id=eos)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(got, expected)
    for row in got[:, 12:]:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[int(hits[0]) + 1 :] == PAD).all()


def test_generation_stops_once_every_row_has_finished(models):
    _, ours = models
    ids = torch.randint(4, 320, (1, 6))
    first = int(generate(ours, ids, max_new_tokens=1, eos_token_id=[])[0, -1])
    assert generate(ours, ids, max_new_tokens=50, eos_token_id=first).shape == (1, 7)


def test_cached_decode_logits_equal_a_full_forward_at_every_step(models):
    _, ours = models
    ids, mask = left_padded([9, 4, 6])
    B, T = ids.shape
    new = 12
    cache = KVCache(ours.config, B, T + new, torch.float32, "cpu")
    full_mask = torch.cat([mask, torch.ones(B, new, dtype=torch.long)], dim=1)
    cache_mask = torch.ones(B, T + new, dtype=torch.long)
    cache_mask[:, :T] = mask
    with torch.no_grad():
        step_logits = ours(ids, cache_mask, cache, torch.arange(T))
        sequence = ids
        for step in range(new):
            full = ours(sequence, full_mask[:, : T + step])
            real = mask.bool()[:, :, None].expand_as(step_logits) if step == 0 else slice(None)
            torch.testing.assert_close(step_logits[real], full[:, -step_logits.shape[1] :][real], rtol=0, atol=1e-5)
            token = full[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], dim=1)
            step_logits = ours(token, cache_mask, cache, torch.tensor([T + step]))


def test_padded_batch_rows_equal_each_prompt_alone(models):
    _, ours = models
    ids, mask = left_padded([12, 3, 8])
    batch = generate(ours, ids, attention_mask=mask, max_new_tokens=15, eos_token_id=[])
    for row in range(3):
        alone = generate(ours, ids[row : row + 1, mask[row].bool()], max_new_tokens=15, eos_token_id=[])
        assert torch.equal(batch[row, -15:], alone[0, -15:])


def test_mask_is_inferred_from_the_pad_token_like_transformers(models):
    _, ours = models
    ids, mask = left_padded([10, 4])
    explicit = generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(generate(ours, ids, max_new_tokens=8, eos_token_id=[], pad_token_id=PAD), explicit)


def test_same_seed_same_samples_other_seed_other_samples(models):
    _, ours = models
    ids, mask = left_padded([8, 5])
    kwargs = dict(attention_mask=mask, max_new_tokens=30, eos_token_id=[], do_sample=True, temperature=1.5)
    first = generate(ours, ids, seed=1, **kwargs)
    assert torch.equal(first, generate(ours, ids, seed=1, **kwargs))
    assert not torch.equal(first, generate(ours, ids, seed=2, **kwargs))


def test_a_decoder_is_reused_across_calls(models):
    _, ours = models
    ids, mask = left_padded([6, 3])
    decoder = Decoder(ours, 2, 40)
    fresh = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    for _ in range(2):
        reused = generate(ours, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], decoder=decoder)
        assert torch.equal(reused, fresh)


def test_compiled_decoder_gives_the_eager_tokens(models):
    """The fast path: one compiled graph (fullgraph: no graph breaks), reused across prompts and lengths."""
    _, ours = models
    decoder = Decoder(ours, 3, 48, compile=True)
    for lengths, new in (([9, 4, 6], 20), ([12, 12, 2], 30)):
        ids, mask = left_padded(lengths)
        eager = generate(ours, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
        compiled = generate(ours, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], decoder=decoder)
        assert torch.equal(compiled, eager)


def test_many_compiled_decoders(models):
    """New decoders reuse the compiled step: more of them than dynamo's recompile limit, of several shapes."""
    _, ours = models
    shapes = [(3, 48)] * (torch._dynamo.config.recompile_limit + 1) + [(2, 40), (1, 36), (2, 44)]
    for batch, max_len in shapes:
        ids, mask = left_padded([7, 3, 5][:batch])
        eager = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
        decoder = Decoder(ours, batch, max_len, compile=True)
        compiled = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], decoder=decoder)
        assert torch.equal(compiled, eager)


def test_compiled_decoder_follows_weight_edits_and_refuses_hooks(tmp_path):
    """Freezing copies the weights into the compiled step: after an in-place edit it must not compute the old model."""
    from bloom.research.probe import record

    model = load_pretrained(save_transformers(random_hf_bloom(), tmp_path))
    decoder = Decoder(model, 2, 30, compile=True)
    ids, mask = left_padded([7, 4])
    eager = []
    for _ in range(2):
        eager.append(generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[]))
        compiled = generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], decoder=decoder)
        assert torch.equal(compiled, eager[-1])
        with torch.no_grad():
            model.h[0].mlp.dense_4h_to_h.weight.mul_(-3)
    assert not torch.equal(eager[0], eager[1])  # the edit changed the greedy tokens
    with record(model, "h.1") as seen, pytest.raises(ValueError, match="forward hooks on h.1: a compiled decode step"):
        generate(model, ids, attention_mask=mask, max_new_tokens=4, decoder=decoder)
    assert not seen
    with torch.inference_mode():  # weights made here keep no version count; the check must still let them through
        model = load_pretrained(tmp_path)
    eager = generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    compiled = generate(
        model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], decoder=Decoder(model, 2, 30, compile=True)
    )
    assert torch.equal(compiled, eager)


def test_streamer_sees_every_new_column(models):
    _, ours = models
    ids, mask = left_padded([5, 7])
    columns = []
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=9, eos_token_id=[], streamer=columns.append)
    assert torch.equal(torch.stack(columns, dim=1), out[:, 7:])
    # rows ending at EOS: the streamer gets the columns generate returns, not the padding after the last EOS
    first_tokens = out[:, 7].tolist()
    columns = []
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=9, eos_token_id=first_tokens, pad_token_id=0,
                   streamer=columns.append)  # fmt: skip
    assert out.shape[1] == 8 and torch.equal(torch.stack(columns, dim=1), out[:, 7:])


# Memory and time follow the tokens generated, not max_new_tokens.


def test_a_huge_max_new_tokens_costs_nothing_when_eos_comes_early(models):
    """10**9 new tokens would need a 1 TB cache if it were allocated up front (for this tiny model)."""
    _, ours = models
    ids = torch.randint(4, 320, (2, 6))
    first = generate(ours, ids, max_new_tokens=1, eos_token_id=[])[:, -1].tolist()
    out = generate(ours, ids, max_new_tokens=10**9, eos_token_id=first)
    assert out.shape == (2, 7)


def test_the_cache_grows_with_the_sequence_and_steps_attend_over_it_only(models):
    """Across growths (64 -> 128 -> 159 slots) the tokens stay transformers' own, and no step attends over more
    than twice the slots in use (the first ones over 64, not over the prompt + max_new_tokens)."""
    hf, ours = models
    ids, mask = left_padded([9, 4, 6])
    new = 150
    widths = []  # keys each forward pass attends over
    keys = lambda module, args: widths.append(args[2].attention_mask.shape[-1])  # noqa: E731  args[2]: the mask
    hook = ours.h[0].self_attention.register_forward_pre_hook(keys)
    try:
        got = generate(ours, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
    finally:
        hook.remove()
    assert torch.equal(got, hf_generate(hf, ids, mask, max_new_tokens=new, eos_token_id=[]))
    T = ids.shape[1]
    steps = widths[1:]  # after the prefill, which attends over the prompt
    assert len(steps) == new - 1 and steps[0] == MIN_CAPACITY
    for written, width in enumerate(steps, start=T + 1):
        assert written <= width <= max(MIN_CAPACITY, 2 * written)


def test_a_compiled_decoder_grows_too(models):
    """A compiled step across four cache lengths (64 to 512 slots): the eager tokens, with at most two compilations."""
    from torch._dynamo.utils import counters

    _, ours = models
    ids, mask = left_padded([5, 3])
    decoder = Decoder(ours, 2, compile=True)
    eager = generate(ours, ids, attention_mask=mask, max_new_tokens=300, eos_token_id=[])
    counters.clear()
    compiled = generate(ours, ids, attention_mask=mask, max_new_tokens=300, eos_token_id=[], decoder=decoder)
    assert torch.equal(compiled, eager)
    assert list(decoder.caches) == [512] and decoder.cache.max_len == 512  # the smaller ones were freed
    assert counters["stats"]["unique_graphs"] <= 2  # the first length, then one with dynamic shapes


def test_the_memory_checks_count_what_is_allocated_and_what_the_machine_has(models):
    """The KV cache's estimate is the bytes its tensors take (README: 2 x layers x hidden x 2 bytes per token in
    bf16), and the CPU's available memory lies between the kernel's free and total pages."""
    import os

    _, ours = models
    config = ours.config
    for dtype, n_head in [(torch.float32, config.n_head), (torch.bfloat16, config.n_head), (torch.float16, 3)]:
        cache = KVCache(config, 5, 96, dtype, "cpu", n_head)
        allocated = sum(t.numel() * t.element_size() for t in cache.tensors())
        assert KVCache.nbytes(config, 5, 96, dtype, n_head) == allocated
    per_token_bf16 = 2 * config.n_layer * config.hidden_size * 2
    assert KVCache.nbytes(config, 1, 1, torch.bfloat16, config.n_head) == per_token_bf16
    page = os.sysconf("SC_PAGE_SIZE")
    free, total = os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    available = bloom.memory.available_memory(torch.device("cpu"))
    assert 0.5 * free <= available <= total  # MemAvailable: free pages plus reclaimable ones (free moves meanwhile)


def test_a_growth_that_cannot_fit_is_refused_and_keeps_the_tokens(models, monkeypatch):
    """With room for the 64-slot cache but not the 128-slot one: a MemoryError with both figures, and the tokens
    chosen so far, which are the unconstrained generation's."""
    _, ours = models
    ids, mask = left_padded([9, 4, 6])
    free_run = generate(ours, ids, attention_mask=mask, max_new_tokens=200, eos_token_id=[])
    B = ids.shape[0]
    first = KVCache.nbytes(ours.config, B, 64, torch.float32, ours.config.n_head)
    monkeypatch.setattr(bloom.memory, "available_memory", lambda device: first + 1000)
    message = r"KV cache of 128 slots for 3 rows \(64 slots written\) needs .* GB, but .* GB is available on cpu"
    with pytest.raises(MemoryError, match=message) as error:
        generate(ours, ids, attention_mask=mask, max_new_tokens=200, eos_token_id=[])
    kept = error.value.sequences
    assert kept.shape == (B, 64 + 1)  # the token for slot 64 was chosen, then the cache was full
    assert torch.equal(kept, free_run[:, : 64 + 1])


def test_a_prompt_whose_attention_cannot_fit_is_refused_before_allocating(models, monkeypatch):
    """A 4,000-token prompt with 50 MB left: its attention, even in query chunks (2 of 2,000 rows: the whole
    (1, 6, 4000, 4000) float32 scores exceed SCORES_BUDGET), needs more, and nothing is allocated."""
    _, ours = models
    ids = torch.randint(4, 320, (1, 4000))
    monkeypatch.setattr(bloom.memory, "available_memory", lambda device: 50 * 10**6)
    with pytest.raises(MemoryError, match=r"the attention over a prompt of 4000 tokens .*1x6x2000x4000 .* needs"):
        generate(ours, ids, max_new_tokens=5)


# Sampling settings at their limits: the limit's answer, never a float overflow.


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_temperature_near_zero_samples_the_greedy_tokens(models, temperature):
    """float32 overflowed to inf / NaN here and sampled token 0 forever."""
    hf, ours = models
    ids, mask = left_padded([8, 5])
    greedy = hf_generate(hf, ids, mask, max_new_tokens=20, eos_token_id=None)
    for extra in ({}, {"top_k": 5}, {"top_p": 0.9}):
        sampled = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], do_sample=True,
                           temperature=temperature, seed=0, **extra)  # fmt: skip
        assert torch.equal(sampled, greedy)


def test_a_tiny_repetition_penalty_gives_its_limit(models):
    """A penalty of 1e-40 overflowed float32 (every seen positive logit became inf, so the lowest id won). Its
    greedy tokens are those of any penalty small enough to rank seen tokens above all others but large enough
    not to overflow: transformers' at 1e-20."""
    hf, ours = models
    ids, _ = left_padded([10, 10])
    expected = hf_generate(hf, ids, None, max_new_tokens=20, eos_token_id=None, repetition_penalty=1e-20)
    got = generate(ours, ids, max_new_tokens=20, eos_token_id=[], repetition_penalty=1e-40)
    assert torch.equal(got, expected)


# EOS as a list of ids, as transformers takes it.


def test_a_list_of_eos_ids_stops_each_row_at_any_of_them_like_transformers(models):
    hf, ours = models
    ids, mask = left_padded([7, 12, 4])
    free_run = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    eos = [int(free_run[0, 12 + 2]), int(free_run[1, 12 + 5])]  # two rows' tokens play EOS
    expected = hf_generate(hf, ids, mask, max_new_tokens=20, eos_token_id=eos)
    assert (expected[:, 12:] == PAD).any()  # they did stop rows
    for spelling in (eos, tuple(eos), torch.tensor(eos)):
        assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=spelling), expected)
    assert generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[]).shape == (3, 32)


# One generation per decoder at a time.


def test_a_decoder_shared_by_two_threads_serves_one_and_refuses_the_other(models):
    """Both would write into the one cache: the second call is refused while the first is running, the first
    gives the tokens it gives alone, and the decoder serves again once it is free."""
    _, ours = models
    ids, mask = left_padded([6, 3])
    other_ids, other_mask = left_padded([4, 5])
    alone = generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    decoder = Decoder(ours, 2)
    started, resume, result = threading.Event(), threading.Event(), {}

    def pause_after_the_first_token(tokens):
        if not started.is_set():
            started.set()
            resume.wait(timeout=60)

    def first_call():
        result["tokens"] = generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[],
                                    decoder=decoder, streamer=pause_after_the_first_token)  # fmt: skip

    thread = threading.Thread(target=first_call)
    thread.start()
    try:
        assert started.wait(timeout=60)
        with pytest.raises(RuntimeError, match="this Decoder is already generating .* give each concurrent"):
            generate(ours, other_ids, attention_mask=other_mask, max_new_tokens=12, eos_token_id=[], decoder=decoder)
    finally:
        resume.set()
        thread.join()
    assert torch.equal(result["tokens"], alone)
    again = generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], decoder=decoder)
    assert torch.equal(again, alone)


def test_generate_steps_leave_the_callers_code_between_steps_in_its_own_autograd_mode(models):
    """inference_mode only around each step's work: two streams interleaved and closed in either order leave the
    caller with autograd on, and each still steps after the other is closed."""
    _, ours = models
    ids, mask = left_padded([6, 4])
    alone = [t for t, _ in generate_steps(ours, ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])]
    a = generate_steps(ours, ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    b = generate_steps(ours, ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    first_a, first_b = next(a)[0], next(b)[0]
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert (torch.ones(2, requires_grad=True) * 2).requires_grad  # the caller's autograd works between steps
    a.close()
    assert not torch.is_inference_mode_enabled()
    rest_b = [t for t, _ in b]  # resumed after the other was closed
    assert not torch.is_inference_mode_enabled()
    assert torch.equal(first_a, alone[0]) and torch.equal(torch.stack([first_b, *rest_b]), torch.stack(alone))


def test_generate_steps_takes_generates_defaults(models):
    _, ours = models
    ids, mask = left_padded([5, 7])
    columns = [tokens for tokens, _ in generate_steps(ours, ids, attention_mask=mask, max_new_tokens=4)]
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=4)  # without the columns after every EOS
    assert len(columns) == 4 and torch.equal(torch.stack(columns, dim=1)[:, : out.shape[1] - 7], out[:, 7:])


def test_a_decoder_used_directly_names_its_misuse(models):
    _, ours = models
    decoder = Decoder(ours, 2, max_len=4)
    with pytest.raises(RuntimeError, match=r"step\(\) continues a prompt: call prefill\(\) first"):
        decoder.step(torch.tensor([5, 6]))
    ids = torch.tensor([[5, 6, 7, 8, 9]] * 2)
    with pytest.raises(ValueError, match=r"a prompt of 5 tokens does not fit this decoder's max_len=4"):
        decoder.prefill(ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match=r"shape \(batch_size=2, T\), got \(1, 3\) and \(1, 3\)"):
        decoder.prefill(ids[:1, :3], torch.ones_like(ids[:1, :3]))
    logits = decoder.prefill(ids[:, :3], torch.ones_like(ids[:, :3]))
    assert logits.shape == (2, 1, ours.config.vocab_size) and decoder.step(torch.tensor([5, 6])).shape == logits.shape


def test_a_decoder_is_free_again_after_a_failed_call(models):
    _, ours = models
    decoder = Decoder(ours, 1)
    with pytest.raises(ValueError, match="input_ids"):
        generate(ours, torch.tensor([[5, 999]]), max_new_tokens=3, decoder=decoder)
    with pytest.raises(RuntimeError, match="streamer failed"):
        generate(ours, torch.tensor([[5, 9]]), max_new_tokens=3, decoder=decoder,
                 streamer=lambda tokens: (_ for _ in ()).throw(RuntimeError("streamer failed")))  # fmt: skip
    assert generate(ours, torch.tensor([[5, 9]]), max_new_tokens=3, eos_token_id=[], decoder=decoder).shape == (1, 5)


# Bad arguments: refused, naming the argument, before any work.


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, top_k=0), "top_k"),
        (dict(top_k=5), "do_sample=True"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), r"repetition_penalty must be a finite number > 0, .*got nan"),
        (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number"),
        (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])), "row 1 of the batch ends in padding"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])), "row 1 of the batch ends in padding"),
        (dict(decoder="small"), "at least 14 slots"),
        (dict(decoder="other model"), "another model"),
        (dict(decoder=object()), "decoder must be a bloom.Decoder, got object"),
        (dict(attention_mask=torch.ones(1, 3, dtype=torch.long)), "attention_mask"),
        (dict(repetition_penalty=1e-101), r"repetition_penalty .* within \[1e-100, 1e\+100\], got 1e-101"),
        (dict(repetition_penalty="2"), "repetition_penalty must be a number, got '2'"),
        (dict(do_sample=True, top_k=2.5), "top_k must be an integer, got 2.5"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
        (dict(do_sample=1), "do_sample must be True or False"),
        (dict(do_sample=True, seed=2**70), "seed must be an integer in"),
        (dict(seed=3), "seed only applies when sampling: pass do_sample=True"),
        (dict(eos_token_id=-1), "eos_token_id -1 is not a token id: the model's vocabulary has ids 0..319"),
        (dict(eos_token_id=320), "eos_token_id 320 is not a token id"),
        (dict(eos_token_id=True), "eos_token_id must be an integer token id, got True"),
        (dict(eos_token_id=2.0), "eos_token_id must be an integer token id, got 2.0"),
        (dict(eos_token_id="2"), "eos_token_id must be an integer token id, got '2'"),
        (dict(eos_token_id=[2, "3"]), r"eos_token_id\[1\] must be an integer token id"),
        (dict(eos_token_id=[2, 999]), r"eos_token_id\[1\] 999 is not a token id"),
        (dict(eos_token_id=torch.tensor([2.0])), "eos_token_id as a tensor must hold integer ids"),
        (dict(pad_token_id=-3), "pad_token_id -3 is not a token id"),
        (dict(pad_token_id=1000), "pad_token_id 1000 is not a token id"),
        (dict(input_ids=torch.tensor([[5, 6, 7], [8, -1, 9]])), r"input_ids\[1, 1\] = -1 is not a token id"),
        (dict(input_ids=torch.tensor([[5, 6, 320], [8, 7, 9]])), r"input_ids\[0, 2\] = 320 is not a token id"),
        (dict(input_ids=torch.tensor([[5.0, 6.0]])), "input_ids must hold integer token ids, got torch.float32"),
        (dict(input_ids=[[5, 6]]), "input_ids must be a tensor, got list"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1], [0, 2, 1, 1]])), r"only 0 \(padding\) and 1 .*\[1, 1\] = 2"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0.5, 1, 1]])), r"attention_mask\[1, 1\] = 0.5"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1], [-1, 1, 1, 1]])), r"attention_mask\[1, 0\] = -1"),
    ],
)
def test_bad_arguments(models, kwargs, message, tmp_path):
    _, ours = models
    ids = torch.randint(4, 320, (2, 4))
    if kwargs.get("decoder") == "small":
        kwargs["decoder"] = Decoder(ours, 2, 8)
    elif kwargs.get("decoder") == "other model":
        kwargs["decoder"] = Decoder(load_pretrained(save_transformers(random_hf_bloom(), tmp_path)), 2, 40)
    kwargs.setdefault("max_new_tokens", 10)
    with pytest.raises(ValueError, match=message):
        generate(ours, kwargs.pop("input_ids", ids), **kwargs)


# The logits processors, on hand-made logits, against their definitions.


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 0.0, 1.0, 0.0, -1.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept[0].tolist() == [False, True, False, True, False]
    assert kept[1].tolist() == [True, True, True, True, False]  # ties with the 2nd largest stay
    assert torch.isfinite(top_k_filter(logits, 99)).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, False, True, True]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, None, None), (1.8, None, 0.9), (0.5, 12, None), (1.3, 30, 0.8)]
)
def test_first_sampled_tokens_follow_transformers_warped_distribution(models, temperature, top_k, top_p):
    """8,000 rows of one prompt each draw their first token: the frequencies are the probabilities that
    transformers' temperature, top-k and top-p warpers give its own logits (within sampling noise), and no
    token outside the set they keep is drawn."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    hf, ours = models
    ids, _ = left_padded([9])
    with torch.no_grad():
        scores = hf(input_ids=ids).logits[:, -1].double()  # (1, V)
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k is not None else []
    warpers += [TopPLogitsWarper(top_p)] if top_p is not None else []
    for warper in warpers:
        scores = warper(ids, scores)
    expected = torch.softmax(scores, dim=-1)[0].float()  # (V,)
    rows = 8000
    out = generate(ours, ids.expand(rows, -1), max_new_tokens=1, do_sample=True, temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_token_id=[], seed=0)  # fmt: skip
    frequencies = torch.bincount(out[:, -1], minlength=expected.numel()).float() / rows
    assert expected.max() < 0.9 and (expected > 0.01).sum() > 3  # a distribution, not one token
    assert (frequencies[expected == 0] == 0).all()
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.02)


def test_temperature_and_sampling_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    for temperature in (0.5, 2.0):
        probs = torch.softmax(logits / temperature, dim=-1)
        draws = torch.stack([sample(probs, generator) for _ in range(20000)]).flatten()
        frequencies = torch.bincount(draws, minlength=4) / draws.numel()
        torch.testing.assert_close(frequencies, probs[0], rtol=0, atol=0.015)
    assert (sample(torch.tensor([[0.0, 1.0, 0.0]]).expand(100, 3), generator) == 1).all()


# Logits that are not finite after the prompt: a damaged checkpoint, or activations out of fp16's range.


def test_a_weight_holding_nan_is_named(checkpoint, tmp_path):
    hf, _ = checkpoint
    damaged = copy.deepcopy(hf)
    with torch.no_grad():
        damaged.transformer.h[1].mlp.dense_4h_to_h.weight[3, 7] = float("nan")
    ours = load_pretrained(save_transformers(damaged, tmp_path))
    ids, mask = left_padded([5, 3])
    with torch.no_grad():  # transformers' own forward: NaN logits, for a reason it does not say
        assert torch.isnan(damaged(input_ids=ids, attention_mask=mask).logits[:, -1]).any(dim=-1).all()
    with pytest.raises(ValueError, match=r"after the prompt hold NaN or inf \(rows 0, 1\): the model's "
                                         r"h\.1\.mlp\.dense_4h_to_h\.weight holds NaN or inf, so its checkpoint is "
                                         "damaged"):  # fmt: skip
        generate(ours, ids, attention_mask=mask, max_new_tokens=2)


def test_fp16_activations_that_overflow_are_told_apart_from_damaged_weights(checkpoint, tmp_path):
    hf, _ = checkpoint
    loud = copy.deepcopy(hf)
    with torch.no_grad():  # finite in fp16 (below 65504), but the final LayerNorm's outputs are not
        loud.transformer.ln_f.weight.fill_(60000.0)
        loud.transformer.ln_f.bias.fill_(60000.0)
    folder = save_transformers(loud, tmp_path)
    ids, mask = left_padded([4])
    with torch.no_grad():
        assert not torch.isfinite(loud.half()(input_ids=ids, attention_mask=mask).logits[:, -1]).all()
    with pytest.raises(ValueError, match=r"\(row 0\), while no weight does: the activations overflowed float16; load "
                                         "the model in bf16"):  # fmt: skip
        generate(load_pretrained(folder, dtype=torch.float16), ids, attention_mask=mask, max_new_tokens=2)
    in_bf16 = generate(load_pretrained(folder, dtype=torch.bfloat16), ids, attention_mask=mask, max_new_tokens=2)
    assert in_bf16.shape == (1, 6)  # the advice holds

"""Property tests of generation, bounded in time: random batch shapes, left padding, EOS ids and sampling
settings, each checked against transformers, or against the definitions of top-k and top-p applied by
transformers' own logits processors; random bad inputs, each refused with the culprit named.

Derandomized (the same examples every run), so that a failure can be reproduced; hypothesis prints the example.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_checkpoint import random_hf_bloom, save_transformers
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from bloom import generate, load_pretrained

PAD, VOCAB = 3, 320
FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = random_hf_bloom(hidden_size=48, n_head=6, n_layer=3)
    return hf, load_pretrained(save_transformers(hf, tmp_path_factory.mktemp("ckpt")))


@st.composite
def padded_batches(draw, max_rows: int = 4, max_len: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of random lengths (special ids excluded), left-padded with PAD, and their mask."""
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_rows))
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens = draw(st.lists(st.integers(4, VOCAB - 1), min_size=length, max_size=length))
        ids[row, T - length :] = torch.tensor(tokens)
        mask[row, T - length :] = 1
    return ids, mask


@FUZZ
@given(batch=padded_batches(), new=st.integers(1, 12), eos=st.lists(st.integers(4, VOCAB - 1), max_size=3))
def test_greedy_equals_transformers_and_each_prompt_alone(models, batch, new, eos):
    hf, ours = models
    ids, mask = batch
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=eos, pad_token_id=PAD)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                               eos_token_id=eos, pad_token_id=PAD)  # fmt: skip
    assert torch.equal(got, expected)
    T = ids.shape[1]
    for row in range(ids.shape[0]):
        prompt = ids[row : row + 1, mask[row].bool()]
        alone = generate(ours, prompt, max_new_tokens=new, eos_token_id=eos, pad_token_id=PAD)[0, prompt.shape[1] :]
        assert torch.equal(got[row, T : T + len(alone)], alone)
        assert (got[row, T + len(alone) :] == PAD).all()  # the row stopped at EOS; the others went on


@FUZZ
@given(
    batch=padded_batches(max_rows=3),
    new=st.integers(1, 8),
    temperature=st.floats(-200, 3).map(lambda e: 10.0**e),  # log-uniform: mostly near 0, where float32 overflowed
    top_k=st.none() | st.integers(1, 40),
    top_p=st.none() | st.floats(0.01, 1.0),
    penalty=st.just(1.0) | st.floats(-50, 50).map(lambda e: 10.0**e),
    seed=st.integers(0, 2**64 - 1),
)
def test_sampled_tokens_lie_in_the_top_k_and_top_p_sets(models, batch, new, temperature, top_k, top_p, penalty, seed):
    """Each sampled token is one that transformers' processors (penalty, temperature, top-k, top-p, in float64
    so that nothing overflows) leave a chance, give or take 1e-4 of a logit for the rounding of the two
    implementations: the sets they keep are the most likely tokens, so a token is in if it is as likely as the
    least likely token kept."""
    hf, ours = models
    ids, mask = batch
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], seed=seed, **sampling)
    B, T = ids.shape
    assert out.shape == (B, T + new) and ((out >= 0) & (out < VOCAB)).all()
    full_mask = torch.cat([mask, torch.ones(B, new, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = hf(input_ids=out, attention_mask=full_mask).logits.double()  # (B, T + new, V)
    seen = out.clone()  # transformers penalises every id in input_ids: stand each pad for its row's first token
    first_real = out.gather(1, mask.argmax(dim=1, keepdim=True))  # (B, 1)
    seen[:, :T] = torch.where(mask.bool(), out[:, :T], first_real)
    for step in range(new):
        prefix, scores = seen[:, : T + step], logits[:, T + step - 1]  # (B, T + step), (B, V)
        penalized = RepetitionPenaltyLogitsProcessor(penalty)(prefix, scores)
        processors = [TemperatureLogitsWarper(temperature)]
        processors += [TopKLogitsWarper(top_k)] if top_k is not None else []
        processors += [TopPLogitsWarper(top_p)] if top_p is not None and top_p < 1.0 else []
        kept = penalized
        for processor in processors:
            kept = processor(prefix, kept)
        kept = torch.isfinite(kept)  # (B, V)
        least_kept = penalized.masked_fill(~kept, float("inf")).min(dim=-1).values  # (B,)
        chosen = penalized.gather(1, out[:, T + step, None])[:, 0]  # (B,)
        assert (chosen >= least_kept - 1e-4 * least_kept.abs().clamp(min=1)).all(), f"step {step}"


BAD_INPUTS = {
    "an id below 0": ("input_ids", -1, r"input_ids\[{row}, {col}\] = -1 is not a token id"),
    "an id past the vocabulary": ("input_ids", VOCAB, r"input_ids\[{row}, {col}\] = 320 is not a token id"),
    "a mask value of 2": ("attention_mask", 2, r"attention_mask\[{row}, {col}\] = 2"),
    "a mask value of -1": ("attention_mask", -1, r"attention_mask\[{row}, {col}\] = -1"),
}


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(batch=padded_batches(), data=st.data())
def test_a_bad_value_anywhere_is_refused_with_its_place(models, batch, data):
    _, ours = models
    ids, mask = batch
    kind = data.draw(st.sampled_from(sorted(BAD_INPUTS)))
    name, value, message = BAD_INPUTS[kind]
    row = data.draw(st.integers(0, ids.shape[0] - 1))
    col = data.draw(st.integers(0, ids.shape[1] - 1))
    (ids if name == "input_ids" else mask)[row, col] = value
    with pytest.raises(ValueError, match=message.format(row=row, col=col)):
        generate(ours, ids, attention_mask=mask, max_new_tokens=3)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    name=st.sampled_from(["eos_token_id", "pad_token_id"]),
    value=st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=VOCAB),
        st.booleans(),
        st.floats(),
        st.text(max_size=3),
        st.lists(st.integers(max_value=-1) | st.integers(min_value=VOCAB), min_size=1, max_size=3),
    ),
)
def test_an_eos_or_pad_that_is_not_an_id_is_refused_by_name(models, name, value):
    _, ours = models
    if name == "pad_token_id" and isinstance(value, list):
        value = value[0]
    with pytest.raises(ValueError, match=rf"{name}(\[\d+\])? .*(must be an integer token id|is not a token id)"):
        generate(ours, torch.tensor([[5, 6, 7]]), max_new_tokens=3, **{name: value})

"""The BLOOM-specific pieces of bloom/model.py checked against their definitions and transformers."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.bloom import modeling_bloom as hf_bloom

import bloom.model
from bloom import Bloom, BloomConfig, generate
from bloom.model import alibi_bias, alibi_slopes, bloom_gelu, causal_mask


def test_alibi_slopes_power_of_two_are_geometric():
    # 16 heads: 2^(-k/2); float32 torch.pow lands a hair off the exact values (0.49999997 for k=2)
    slopes = alibi_slopes(16)
    exact = torch.tensor([2 ** (-k / 2) for k in range(1, 17)], dtype=torch.float64)
    assert slopes.dtype == torch.float32
    torch.testing.assert_close(slopes.double(), exact, rtol=4e-7, atol=0)


@pytest.mark.parametrize(
    "n_head,expected",
    [
        (6, [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]),
        (12, [2.0**-k for k in range(1, 9)] + [2 ** -(k + 0.5) for k in range(4)]),
        (112, [2 ** (-k / 8) for k in range(1, 65)] + [2 ** (-(2 * j - 1) / 16) for j in range(1, 49)]),
    ],
)
def test_alibi_slopes_other_head_counts_append_odd_powers(n_head, expected):
    # float32 pow to the 95th power is a few ulps (5e-7 relative) off the exact value
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(alibi_slopes(n_head).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n_head", [1, 5, 6, 12, 16, 32, 112])
def test_alibi_slopes_are_bitwise_those_of_transformers(n_head):
    assert torch.equal(alibi_slopes(n_head), hf_bloom._get_alibi_slopes(n_head, torch.device("cpu")))


def test_alibi_bias_counts_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    slopes = torch.tensor([0.5, 0.25])
    bias = alibi_bias(mask, slopes, torch.float32)  # (B, nh, 1, S)
    assert bias.shape == (2, 2, 1, 5)
    assert bias[0, 0, 0].tolist() == [0, 0, 0, 0.5, 1.0]
    assert bias[1, 1, 0].tolist() == [0, 0.25, 0.5, 0.75, 1.0]


def test_alibi_bias_is_rounded_to_the_model_dtype():
    mask = torch.ones(1, 2048, dtype=torch.long)
    bias = alibi_bias(mask, alibi_slopes(16), torch.bfloat16)
    assert bias.dtype == torch.bfloat16
    exact = alibi_slopes(16)[1] * 2047  # 0.49999997 * 2047 = 1023.4999 in float32
    assert bias[0, 1, 0, -1] == exact.bfloat16() == 1024  # bf16 rounds positions by up to 4 at 2048 tokens


def test_causal_mask_hides_future_and_padding_but_never_a_whole_row():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    additive = causal_mask(mask, torch.arange(3), torch.float16)  # (B, 1, T, S)
    visible = additive == 0
    assert additive.dtype == torch.float16 and additive.min() == torch.finfo(torch.float16).min
    assert visible[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert visible[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    # with a cache, a query at slot 1 sees slots 0..1 that are real
    assert (causal_mask(mask, torch.tensor([1]), torch.float32)[:, 0, 0] == 0).tolist() == [
        [False, True, False],
        [True, True, False],
    ]


def test_gelu_is_the_tanh_form():
    x = torch.linspace(-8, 8, 10001)
    torch.testing.assert_close(bloom_gelu(x), F.gelu(x, approximate="tanh"), rtol=0, atol=5e-7)
    assert (bloom_gelu(x) - F.gelu(x)).abs().max() > 1e-4  # and not the erf form
    for dtype in (torch.float16, torch.bfloat16):  # step by step in half precision, like transformers
        assert torch.equal(bloom_gelu(x.to(dtype)), hf_bloom.bloom_gelu_forward(x.to(dtype)))


def tiny_model(**overrides) -> Bloom:
    config = BloomConfig(**({"hidden_size": 64, "n_layer": 2, "n_head": 8, "vocab_size": 100} | overrides))
    model = Bloom(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
    return model


def test_forward_shape_and_left_padding_equals_prompt_alone():
    model = tiny_model()
    prompt = torch.randint(4, 100, (1, 9))
    batch = torch.cat([torch.cat([torch.full((1, 4), 3), prompt], dim=1), torch.randint(4, 100, (1, 13))])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        logits = model(batch, mask)
        alone = model(prompt)
    assert logits.shape == (2, 13, 100)
    torch.testing.assert_close(logits[0, 4:], alone[0], rtol=0, atol=1e-5)


def test_fp16_padding_cannot_poison_real_tokens():
    """Large fp16 scores plus the mask can round to -inf; a fully masked padding row would then be NaN."""
    model = tiny_model(n_head=4)
    with torch.no_grad():
        for block in model.h:
            block.self_attention.query_key_value.weight.mul_(40)
    model = model.half()
    ids = torch.randint(4, 100, (1, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        logits = model(ids, mask)
    assert torch.isfinite(logits).all()


def test_logits_are_the_tied_embedding():
    model = tiny_model()
    assert not any("lm_head" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        model.word_embeddings.weight[7].zero_()
        assert (model(torch.tensor([[5, 6]]))[..., 7] == 0).all()


def test_parameter_count_formula():
    config = BloomConfig(hidden_size=64, n_layer=3, n_head=8, vocab_size=100)
    with torch.device("meta"):
        model = Bloom(config)
    V, h, L = 100, 64, 3
    assert sum(p.numel() for p in model.parameters()) == V * h + 2 * h + L * (12 * h * h + 13 * h) + 2 * h
    assert math.isclose(config.head_dim, 8)


def test_mask_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"attention_mask is \(1, 4\), expected \(batch, keys\) = \(1, 5\)"):
        tiny_model()(torch.randint(4, 100, (1, 5)), torch.ones(1, 4, dtype=torch.long))


def test_input_ids_must_be_a_batch_and_may_be_empty():
    model = Bloom(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).eval()
    with pytest.raises(ValueError, match=r"input_ids is \(5,\), expected a \(batch, tokens\) tensor"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids is list, expected a \(batch, tokens\) tensor"):
        model([[5, 6]])
    with torch.no_grad():  # a batch of empty prompts (tokenizer.batch_encode([""])): no positions, no logits
        assert model(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 64)


def test_ids_outside_the_vocabulary_are_refused_by_name():
    """As generate refuses them: the first bad id named by its place, where the embedding would raise IndexError."""
    model = Bloom(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).eval()
    for ids, message in [
        (torch.tensor([[5, 64]]), r"input_ids\[0, 1\] = 64 is not a token id: the model's vocabulary has ids 0..63"),
        (torch.tensor([[5, 6], [7, -2]]), r"input_ids\[1, 1\] = -2 is not a token id"),
        (torch.tensor([[5.0, 6.0]]), r"input_ids must hold integer token ids, got torch.float32"),
    ]:
        with pytest.raises(ValueError, match=message):
            model(ids)


def test_long_inputs_attend_in_chunks_with_the_values_of_the_whole(monkeypatch):
    """A scores budget of a few query rows forces the chunked path on a short, left-padded batch."""
    model = tiny_model(n_head=6, hidden_size=48)
    ids = torch.randint(4, 100, (2, 37))
    mask = torch.ones_like(ids)
    mask[0, :11] = 0
    with torch.no_grad():
        whole = model(ids, mask)
        monkeypatch.setattr(bloom.model, "SCORES_BUDGET", 2 * 6 * 5 * 37 * 4)  # 5 query rows of float32 scores
        chunked = model(ids, mask)
    torch.testing.assert_close(chunked[0, 11:], whole[0, 11:], rtol=0, atol=1e-5)  # padding positions mean nothing
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-5)


def test_chunked_prefill_generates_the_tokens_of_the_whole(monkeypatch):
    model = tiny_model()
    ids = torch.randint(4, 100, (1, 40))
    whole = generate(model, ids, max_new_tokens=12, eos_token_id=[])
    monkeypatch.setattr(bloom.model, "SCORES_BUDGET", 8 * 3 * 40 * 4)  # prefill in 3-row chunks; decode steps whole
    assert torch.equal(generate(model, ids, max_new_tokens=12, eos_token_id=[]), whole)


def test_a_hook_on_the_probabilities_sees_them_whole_however_long_the_input(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(bloom.model, "SCORES_BUDGET", 64)
    seen = []
    model.h[1].self_attention.probs.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.randint(4, 100, (1, 30)))
    assert seen == [(1, 8, 30, 30)]

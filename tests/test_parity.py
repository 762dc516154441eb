"""Our logits against transformers' BLOOM on the same tiny random checkpoints."""

import pytest
import torch
from tiny_checkpoint import left_padded, random_hf_bloom, save_transformers
from transformers import BloomForCausalLM

from bloom import load_pretrained

SHAPES = [  # (hidden_size, n_head, n_layer): power-of-two heads and not
    (48, 6, 2),
    (96, 12, 2),
    (64, 16, 3),
    (64, 8, 2),
    (80, 5, 1),
]


@pytest.mark.parametrize("hidden_size,n_head,n_layer", SHAPES)
def test_fp32_logits_equal_transformers(tmp_path, hidden_size, n_head, n_layer):
    hf = random_hf_bloom(hidden_size=hidden_size, n_head=n_head, n_layer=n_layer)
    ours = load_pretrained(save_transformers(hf, tmp_path))
    ids, mask = left_padded([19, 7, 12, 1], hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    real = mask.bool()  # padding positions carry no meaning (see Bloom.forward)
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    # with no mask, every position is real
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden_size,n_head,n_layer", SHAPES[:3])
def test_half_precision_logits_match_transformers(tmp_path, dtype, hidden_size, n_head, n_layer):
    """In bf16/fp16 both implementations round; the tolerance is derived from that rounding.

    Justification: a reimplementation is as good as the reference in half precision when (a) it is no
    further from the exact (fp32) logits than transformers is, and (b) it differs from transformers by
    at most a quarter of transformers' own rounding error. Since ours follows transformers op for op,
    the two agree far more closely than that in practice (bit for bit on this CPU).
    """
    hf32 = random_hf_bloom(hidden_size=hidden_size, n_head=n_head, n_layer=n_layer)
    folder = save_transformers(hf32, tmp_path)
    hf = BloomForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ours = load_pretrained(folder, dtype=dtype)
    assert ours.word_embeddings.weight.dtype == dtype
    ids, mask = left_padded([16, 9, 3], hf.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        exact = hf32(input_ids=ids, attention_mask=mask).logits[real]
        theirs = hf(input_ids=ids, attention_mask=mask).logits[real].float()
        got = ours(ids, mask)[real].float()
    reference_error = (theirs - exact).abs().max()
    assert reference_error > 0  # half precision really did round
    assert (got - exact).abs().max() <= reference_error * 1.05
    assert (got - theirs).abs().max() <= reference_error * 0.25

"""Weight-only int8: half the bytes of the linear weights, logits within a measured bound of bf16."""

import pytest
import torch
from tiny_checkpoint import random_hf_bloom, save_bigscience, save_transformers

import bloom.checkpoints.loader
from bloom import generate, load_pretrained
from bloom.model import TiedEmbedding
from bloom.scale.quantize import Int8Embedding, Int8Linear, int8_matmul, quantize_int8, quantize_rows

# Bounds measured on these tiny checkpoints (seeds 0-5, 32 prompts of 16 tokens), with headroom, the embedding
# (also the LM head) and the blocks' linear layers in int8:
# - RMS(int8 - bf16) / RMS(bf16) logits: 2.9-4.0%           -> bound 5%
# - max |int8 - fp32| / max |bf16 - fp32| (bf16's own error): 1.7-2.3x -> bound 4x
# - first greedy token equal to bf16's: 90.6-93.8% of prompts -> bound 80%
RMS_BOUND, ERROR_RATIO_BOUND, AGREEMENT_BOUND = 0.05, 4.0, 0.8


def quantized_bytes(model) -> int:
    """Bytes of the embedding and of the blocks' linear layers (weights, scales, biases)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    quantized = (".self_attention.", ".mlp.", "word_embeddings.")
    return sum(t.numel() * t.element_size() for n, t in tensors if any(part in n for part in quantized))


def test_int8_linear_is_the_dequantized_product():
    linear = torch.nn.Linear(16, 8)
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (8,) and q.weight.abs().max() == 127
    x = torch.randn(3, 16)
    dequantized = q.weight.float() * q.scale[:, None]
    torch.testing.assert_close(q(x), x @ dequantized.T + linear.bias)
    assert (dequantized - linear.weight).abs().max() <= q.scale.max() / 2 + 1e-7  # rounding: half a step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounding_stays_within_half_a_step_of_the_stored_scale(dtype):
    weight = torch.randn(256, 512).to(dtype)
    weight[0] *= 1e-6  # an fp16 scale of this row would underflow to 0
    weight[1] = 0
    q, scale = quantize_rows(weight)
    assert scale.dtype == dtype and (scale > 0).all()
    error = (q.double() * scale.double()[:, None] - weight.double()).abs()  # (out, in)
    assert (error <= scale.double()[:, None] * (0.5 + 1e-3)).all()
    assert (q[1] == 0).all()
    assert error[0].max() <= 0.05 * weight[0].double().abs().max()  # the tiny row is kept, not zeroed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 16, 17])
@pytest.mark.parametrize("features", [8, 24, 40, 64, 192])  # only multiples of 64 take the CPU's int8 kernel
def test_int8_matmul_is_the_dequantized_product(dtype, rows, features):
    weight = torch.randint(-127, 128, (40, features), dtype=torch.int8)
    scale = torch.rand(40).to(dtype) / 100
    x = torch.randn(1, rows, features).to(dtype)  # (B, T, in)
    y = int8_matmul(x, weight, scale)
    assert y.shape == (1, rows, 40) and y.dtype == dtype
    exact = x.double() @ (weight.double() * scale.double()[:, None]).T
    # rounded to bf16 at most twice (the product, then the scaling); fp32's summation order aside
    rtol, atol = (2**-7, 2**-7 * exact.abs().max()) if dtype == torch.bfloat16 else (1e-5, 1e-5 * exact.abs().max())
    torch.testing.assert_close(y.double(), exact, rtol=rtol, atol=atol)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_int8_halves_memory_and_stays_within_the_bound(tmp_path, seed):
    folder = save_transformers(random_hf_bloom(seed=seed, hidden_size=64, n_head=8, n_layer=3), tmp_path)
    torch.manual_seed(seed)
    bf16 = load_pretrained(folder, dtype="bf16")
    int8 = load_pretrained(folder, dtype="bf16", quantize="int8")
    assert quantized_bytes(int8) / quantized_bytes(bf16) < 0.52  # int8 weights plus a bf16 scale per row, and biases
    assert all(isinstance(block.mlp.dense_h_to_4h, Int8Linear) for block in int8.h)
    assert isinstance(int8.word_embeddings, Int8Embedding)

    ids = torch.randint(4, 320, (32, 16))
    with torch.no_grad():
        reference, quantized = bf16(ids).float(), int8(ids).float()
        exact = load_pretrained(folder, dtype="fp32")(ids)
    assert (quantized - reference).pow(2).mean().sqrt() <= RMS_BOUND * reference.pow(2).mean().sqrt()
    assert (quantized - exact).abs().max() <= ERROR_RATIO_BOUND * (reference - exact).abs().max()

    # Greedy: mostly the same first token, and always where bf16's top-2 margin exceeds twice the largest
    # change int8 made to any logit at that position (there the bound guarantees the same argmax).
    first_new = generate(int8, ids, max_new_tokens=1, eos_token_id=[])[:, -1]
    expected = generate(bf16, ids, max_new_tokens=1, eos_token_id=[])[:, -1]
    assert (first_new == expected).float().mean() >= AGREEMENT_BOUND
    top2 = reference[:, -1].topk(2).values
    sure = (top2[:, 0] - top2[:, 1]) > 2 * (quantized[:, -1] - reference[:, -1]).abs().amax(dim=-1)
    assert sure.sum() >= 8 and torch.equal(first_new[sure], expected[sure])


def test_int8_logits_are_transformers_with_the_dequantized_weights(tmp_path):
    """An independent check of the int8 path: transformers' BLOOM given q x scale for every weight that int8
    holds (the embedding, which is also its LM head, and the blocks' linear layers) computes our logits."""
    from tiny_checkpoint import left_padded

    hf = random_hf_bloom(seed=7, hidden_size=64, n_head=8, n_layer=3)
    int8 = load_pretrained(save_transformers(hf, tmp_path), dtype="fp32", quantize="int8")
    hf_modules = dict(hf.transformer.named_modules())
    quantized = [(name, m) for name, m in int8.named_modules() if isinstance(m, Int8Linear | Int8Embedding)]
    assert len(quantized) == 1 + 4 * 3
    with torch.no_grad():
        for name, module in quantized:
            hf_modules[name].weight.copy_(module.weight.float() * module.scale[:, None])
        ids, mask = left_padded([16, 11, 5], vocab_size=320)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        ours = int8(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


def test_quantizing_while_loading_equals_quantizing_the_loaded_model(tmp_path, monkeypatch):
    folder = save_bigscience(random_hf_bloom(hidden_size=64, n_head=8, n_layer=2), tmp_path, dtype=torch.float16)
    monkeypatch.setattr(bloom.checkpoints.loader, "READ_CHUNK_BYTES", 1000)  # several chunks of rows per weight
    loaded = load_pretrained(folder, dtype="bf16", quantize="int8").state_dict()
    afterwards = quantize_int8(load_pretrained(folder, dtype="bf16")).state_dict()
    assert loaded.keys() == afterwards.keys()
    assert all(torch.equal(loaded[name], afterwards[name]) for name in loaded)
    assert loaded["h.1.mlp.dense_4h_to_h.weight"].dtype == torch.int8


def test_an_int8_load_keeps_no_view_of_the_file_and_copies_its_float_tensors_exactly(tmp_path):
    # a view of the mapped file keeps the pages around it resident (188 MB of bloom-560m's for 0.6 MB of norms)
    folder = save_bigscience(random_hf_bloom(hidden_size=64, n_head=8, n_layer=2), tmp_path, dtype=torch.bfloat16)
    loaded = load_pretrained(folder, dtype="bf16", quantize="int8")
    files = [str(path.resolve()) for path in folder.glob("*.safetensors")]
    with open("/proc/self/maps") as maps:
        spans = [line.split()[0].split("-") for line in maps if line.rstrip().endswith(tuple(files))]
    spans = [(int(begin, 16), int(end, 16)) for begin, end in spans]
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert not [name for name, t in tensors.items() if any(a <= t.data_ptr() < b for a, b in spans)]
    afterwards = quantize_int8(load_pretrained(folder, dtype="bf16")).state_dict()
    assert all(torch.equal(t, afterwards[name]) for name, t in loaded.state_dict().items())
    assert loaded.h[0].input_layernorm.weight.dtype == torch.bfloat16


def test_quantizing_leaves_norms_alone(tmp_path):
    folder = save_transformers(random_hf_bloom(hidden_size=64, n_head=8, n_layer=2), tmp_path)
    model = quantize_int8(load_pretrained(folder, dtype="bf16"))
    assert model.word_embeddings.weight.dtype == torch.int8
    assert model.h[0].input_layernorm.weight.dtype == model.ln_f.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_embedding_looks_up_and_unembeds_with_the_dequantized_rows(dtype):
    embedding = TiedEmbedding.from_pretrained(torch.randn(300, 64).to(dtype))
    q = Int8Embedding.from_embedding(embedding)
    dequantized = q.weight.to(dtype) * q.scale[:, None]  # (V, C), each row rounded once
    ids = torch.randint(0, 300, (2, 7))
    assert torch.equal(q(ids), dequantized[ids])
    error = q.weight.double() * q.scale.double()[:, None] - embedding.weight.double()
    assert (error.abs() <= q.scale.double()[:, None] * 0.501).all()  # half a step, as for the linear layers
    x = torch.randn(2, 1, 64).to(dtype)  # a decode step: bf16 takes the CPU's int8 kernel
    exact = x.double() @ dequantized.double().T
    tolerance = 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(q.unembed(x).double(), exact, rtol=tolerance, atol=tolerance * exact.abs().max())


def test_unknown_scheme(tmp_path):
    with pytest.raises(ValueError, match="quantize='int4'"):
        load_pretrained(tmp_path, quantize="int4")

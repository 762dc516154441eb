"""bloom.matvec: a decode step's kernels (products, attention, GeLU), compiled from matvec.c, against float64,
torch's own ops, and generation without them."""

import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from tiny_checkpoint import left_padded, random_hf_bloom, save_transformers

from bloom import generate, load_pretrained, matvec
from bloom.config import BloomConfig
from bloom.generation.decode_step import plan
from bloom.generation.decoder import Decoder
from bloom.model import Attention, CausalMask, Linear, alibi_bias, alibi_slopes, bloom_gelu
from bloom.scale.quantize import quantize_rows


def ulp(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` values around y."""
    return y.abs().clamp(min=torch.finfo(dtype).tiny) * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16, 17, 18, 20, 32, 40, 139])  # 17: 16 + 1; 139: 8 x 16 + 11
@pytest.mark.parametrize("features", [7, 64, 100, 1024, 2500])  # tails of every width; 2500: in spans
def test_products_equal_float64_within_float32_summation(build, dtype, rows, features):
    x, weight, bias = torch.randn(rows, features), torch.randn(37, features), torch.randn(37)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    exact = F.linear(x.double(), weight.double(), bias.double())  # (rows, 37)
    y = matvec.linear(x, weight, bias)
    assert y.shape == (rows, 37) and y.dtype == dtype
    sum_error = features * torch.finfo(torch.float32).eps * (x.double().abs() @ weight.double().abs().T)
    assert ((y.double() - exact).abs() <= sum_error + ulp(exact, dtype)).all()  # float32 sums, rounded once


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_products_over_no_features_are_the_bias(build, rows):
    # never asked by a model (matvec.linear divides by the features), but a kernel must not read sums it never made
    kernels = matvec.library()
    for dtype, kernel in ((torch.float32, kernels.linear_f32), (torch.bfloat16, kernels.linear_bf16)):
        bias, y = torch.randn(7).to(dtype), torch.full((rows, 7), float("nan")).to(dtype)
        x, weight = torch.ones(rows, 1).to(dtype), torch.ones(7, 1).to(dtype)  # read as (rows, 0) and (7, 0)
        kernel(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), rows, 7, 0)
        assert torch.equal(y, bias.expand(rows, 7))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 4, 11, 16, 17, 18, 20, 139])
@pytest.mark.parametrize("features", [33, 256, 300, 2100])  # 300: four 64-wide chunks, a tail past 32
def test_int8_products_equal_the_dequantized_product(build, dtype, rows, features):
    q, scale = quantize_rows(torch.randn(50, features).to(dtype))
    x, bias = torch.randn(rows, features).to(dtype), torch.randn(50).to(dtype)
    exact = (x.double() @ q.double().T) * scale.double() + bias.double()
    y = matvec.int8_linear(x, q, scale, bias)
    assert y.dtype == dtype
    sum_error = features * torch.finfo(torch.float32).eps * (x.double().abs() @ q.double().abs().T) * scale.double()
    assert ((y.double() - exact).abs() <= 2 * sum_error + ulp(exact, dtype)).all()
    assert torch.equal(matvec.int8_linear(x, q, scale), matvec.int8_linear(x, q, scale, torch.zeros(50).to(dtype)))


REFUSE_ALLOCATIONS = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
/* aligned_alloc, except that it returns NULL for the sizes in $REFUSED_SIZES (separated by commas), saying so on
 * stderr */
void *aligned_alloc(size_t alignment, size_t size) {
    static void *(*real)(size_t, size_t);
    if (!real) real = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "aligned_alloc");
    for (const char *p = getenv("REFUSED_SIZES"); p && *p;) {
        char *end;
        if ((size_t)strtoull(p, &end, 10) == size) {
            fprintf(stderr, "refused %zu bytes\n", size);
            return NULL;
        }
        p = *end == ',' ? end + 1 : NULL;
    }
    return real(alignment, size);
}
"""


def test_int8_products_without_a_widening_buffer_equal_those_with_it(tmp_path):
    """Beside bf16 activations of 5 to 7 rows, the AVX-512 tiles widen int8 weights into a buffer of each thread's
    own (their lane tiles take 8 rows or more); the AVX2 tiles, where they cannot multiply in integers (here: no
    memory for x as int16), widen x to float32 once. Without the buffer, the int8 tiles multiply the rows of W as they
    are: the same products, added in the same order, so the same bits. The allocations are refused in a child
    process (LD_PRELOAD)."""
    lib = matvec.library()
    if lib is None or lib.tiles == "portable":
        pytest.skip("the widening buffers belong to the AVX-512 and AVX2 tiles")
    shim = tmp_path / "refuse.so"
    source = tmp_path / "refuse.c"
    source.write_text(REFUSE_ALLOCATIONS)
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", str(source), "-o", str(shim), "-ldl"], check=True)
    rows, features, n = 6, 2100, 90
    code = (
        "import sys, torch\n"
        "from bloom import matvec\n"
        "from bloom.scale.quantize import quantize_rows\n"
        f"torch.manual_seed(0); q, scale = quantize_rows(torch.randn({n}, {features}).bfloat16())\n"
        f"x, bias = torch.randn({rows}, {features}).bfloat16(), torch.randn({n}).bfloat16()\n"
        "sys.stdout.buffer.write(matvec.int8_linear(x, q, scale, bias).view(torch.int16).numpy().tobytes())\n"
    )
    # linear_int8_bf16's buffer: a group of 4 rows of W as bf16, or x as float32; and those refused in both runs:
    # with AVX2, x as int16 (rows of 32-byte multiples)
    buffer_bytes, always_refused = {
        "avx512": (2 * ((4 * features + 31) // 32 * 32), []),
        "avx2": ((4 * rows * features + 63) // 64 * 64, [(2 * rows * ((features + 15) // 16 * 16) + 63) // 64 * 64]),
    }[lib.tiles]
    outputs = {}
    for refused in (always_refused, [*always_refused, buffer_bytes]):
        env = {**os.environ, "LD_PRELOAD": str(shim), "REFUSED_SIZES": ",".join(map(str, refused))}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)
        assert run.stderr.count(b"refused") == len(refused), run.stderr.decode()[-2000:]  # the fallbacks ran
        outputs[len(refused)] = run.stdout
    assert len(outputs[len(always_refused)]) == rows * n * 2
    assert outputs[len(always_refused)] == outputs[len(always_refused) + 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_int8_products_convert_every_int8_value_exactly(build, dtype, rows):
    # each of the 256 values, -128 and 0 included, in each row of W, at another position in each row
    q = ((torch.arange(256) * 7 + torch.arange(40)[:, None] * 13) % 256 - 128).to(torch.int8)  # (40, 256)
    x, scale = torch.randn(rows, 256).to(dtype), torch.ones(40).to(dtype)
    exact = x.double() @ q.double().T
    sum_error = 256 * torch.finfo(torch.float32).eps * (x.double().abs() @ q.double().abs().T)
    assert ((matvec.int8_linear(x, q, scale).double() - exact).abs() <= 2 * sum_error + ulp(exact, dtype)).all()


def in_units(x: torch.Tensor) -> torch.Tensor:
    """Each row of x (M, K) rounded, to nearest even, to multiples of 2^(e - 15), its largest |x| < 2^e: the int16
    values with which the AVX2 tiles multiply bf16 x beside int8 W, in float64."""
    unit = 2.0 ** (torch.frexp(x.double().abs().amax(dim=1, keepdim=True)).exponent - 15)
    return torch.round(x.double() / unit) * unit


# magnitudes from 2^-120 to 2^100 (bf16 has float32's range); 8200 features: chunks of 2048 values' int32 sums, a
# tail of 8
@pytest.mark.parametrize("magnitude", [2.0**-120, 2.0**-30, 1.0, 2.0**100])
@pytest.mark.parametrize("features", [40, 1010, 8200])  # 1010: an odd chunk of 16 and a tail of 2
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_int8_products_of_bf16_rows_within_the_rounding_to_units(build, magnitude, features, rows):
    """bf16 x beside int8 W: where the tiles are AVX2's, each row's values within 2^8 of its largest are multiplied
    exactly and smaller ones as rounded to 2^-15 of it, the products added exactly in integers; elsewhere (and for
    rows whose largest |x| is below 2^-112) as bf16 values in float32 sums. Either way within the rounding's bound of
    the dequantized product."""
    dtype = torch.bfloat16
    torch.manual_seed(features)
    # values spread over 2^-20 to 2^4 of the magnitude, so that many lie far below their row's largest
    x = (torch.randn(rows, features) * 2.0 ** torch.randint(-20, 5, (rows, features)) * magnitude).to(dtype)
    q = torch.randint(-128, 128, (70, features), dtype=torch.int8)
    scale, bias = torch.rand(70).add(0.5).to(dtype), torch.randn(70).mul(magnitude).to(dtype)
    y = matvec.int8_linear(x, q, scale, bias).double()
    exact = (x.double() @ q.double().T) * scale.double() + bias.double()
    from_units = (in_units(x) @ q.double().T) * scale.double() + bias.double()
    # float32: the sums of values and of chunks; ulp: y's rounding to dtype, once
    sum_error = features * torch.finfo(torch.float32).eps * (x.double().abs() @ q.double().abs().T) * scale.double()
    rounding = (in_units(x) - x.double()).abs() @ q.double().abs().T * scale.double()  # x in units
    assert ((y - exact).abs() <= rounding + sum_error + ulp(exact, dtype)).all()
    if matvec.library().tiles == "avx2" and x.double().abs().max() >= 2.0**-112:  # below, the unit: not a normal float
        assert rounding.max() > 0  # some values rounded: a test of the rounding
        chunk_error = 6 * torch.finfo(torch.float32).eps * (in_units(x).abs() @ q.double().abs().T)
        assert ((y - from_units).abs() <= chunk_error * scale.double() + ulp(from_units, dtype)).all()


@pytest.mark.parametrize("weight", [-128, 127])
@pytest.mark.parametrize("rows", [1, 2])
def test_int8_products_at_their_largest_stay_within_the_integers(build, weight, rows):
    # every x at 32640 units (1.9921875: the largest bf16 below 2) times every weight at its extreme, over 16400
    # features: a lane of the AVX2 tiles' int32 sums adds at most 128 pairs of products here, 2 · 128 · 32640 each
    # (257 would overflow it)
    x, q = torch.full((rows, 16400), 1.9921875).bfloat16(), torch.full((3, 16400), weight, dtype=torch.int8)
    y = matvec.int8_linear(x, q, torch.ones(3).bfloat16())
    assert torch.equal(y, torch.full((rows, 3), 16400 * weight * 1.9921875).bfloat16())


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_products_of_bf16_carry_infinities_and_nans(build, rows, bad):
    # the integers of the AVX2 tiles hold neither: such rows go through the float32 tiles, as in torch
    torch.manual_seed(rows)
    x, q = torch.randn(rows, 300).bfloat16(), torch.randint(-127, 128, (20, 300), dtype=torch.int8)
    x[-1, 77] = bad
    y = matvec.int8_linear(x, q, torch.ones(20).bfloat16()).double()
    exact = x.double() @ q.double().T  # the last row NaN, or ±inf (NaN where q is 0 there); the others finite
    assert torch.equal(y.isnan(), exact.isnan()) and torch.equal(y.isinf(), exact.isinf())
    assert torch.equal(y[exact.isinf()], exact[exact.isinf()])  # the signs
    finite = exact[:-1]
    sum_error = 300 * torch.finfo(torch.float32).eps * (x[:-1].double().abs() @ q.double().abs().T)
    assert ((y[:-1] - finite).abs() <= sum_error + ulp(finite, torch.bfloat16)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_head, head_dim, slots", [(5, 16, 7), (16, 64, 300), (3, 40, 1), (2, 100, 45), (2, 160, 20)])
def test_one_query_attention_equals_the_reference_attend(build, dtype, n_head, head_dim, slots):
    attention = Attention(BloomConfig(hidden_size=n_head * head_dim, n_layer=1, n_head=n_head, vocab_size=8))
    q = torch.randn(2, n_head, 1, head_dim).to(dtype)
    k, v = torch.randn(2, n_head, slots, head_dim).to(dtype), torch.randn(2, n_head, slots, head_dim).to(dtype)
    used = slots - slots // 4  # a decode step in a longer cache: the query at slot used - 1, later slots unwritten
    attention_mask = torch.ones(2, slots, dtype=torch.long)
    attention_mask[:, used:] = 0
    attention_mask[1, : slots // 3] = 0  # a left-padded row
    alibi = alibi_bias(attention_mask, alibi_slopes(n_head), dtype)  # (B, nh, 1, S)
    mask = CausalMask(attention_mask, torch.tensor([used - 1]), dtype).whole()  # (B, 1, 1, S)
    reference = attention.attend(q, k, v, alibi, mask)
    y = matvec.attend(q, k, v, alibi, mask, 1 / head_dim**0.5)
    assert y.shape == reference.shape and y.dtype == dtype
    # the same roundings; float32 sums in another order, and exp's last bit
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # about one rounding
    torch.testing.assert_close(y, reference, rtol=rtol, atol=1e-5)
    hidden = (attention_mask == 0)[:, None, :, None]  # (B, 1, S, 1): padding and unwritten slots
    unread_k, unread_v = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan"))
    assert torch.equal(matvec.attend(q, unread_k, unread_v, alibi, mask, 1 / head_dim**0.5), y)  # never read


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_attention_with_masked_slots_amid_visible_ones_or_no_visible_slot_equals_the_reference(build, dtype):
    attention = Attention(BloomConfig(hidden_size=2 * 8, n_layer=1, n_head=2, vocab_size=8))
    q, k, v = torch.randn(3, 2, 1, 8).to(dtype), torch.randn(3, 2, 40, 8).to(dtype), torch.randn(3, 2, 40, 8).to(dtype)
    alibi = alibi_bias(torch.ones(3, 40, dtype=torch.long), alibi_slopes(2), dtype)  # (B, nh, 1, S)
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(3, 1, 1, 40, dtype=dtype)
    mask[0, ..., 5:9] = mask[0, ..., 20:] = lowest  # masked slots between visible ones, and at the end
    mask[1, ..., :] = lowest  # no visible slot: not a mask the model makes, but the kernel takes it
    y = matvec.attend(q, k, v, alibi, mask, 8**-0.5)
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y, attention.attend(q, k, v, alibi, mask), rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("head_dim", [4, 32])  # 32: the values' sum over pairs of values
def test_bf16_attention_keeps_a_subnormal_probability_and_a_nan_key_as_torch(build, head_dim):
    attention = Attention(BloomConfig(hidden_size=head_dim, n_layer=1, n_head=1, vocab_size=8))
    q, k = torch.zeros(1, 1, 1, head_dim, dtype=torch.bfloat16), torch.zeros(1, 1, 2, head_dim, dtype=torch.bfloat16)
    v = torch.tensor([[[[0.0] * head_dim, [1e38] * head_dim]]], dtype=torch.bfloat16)
    alibi = torch.tensor([[[[0.0, -88.0]]]], dtype=torch.bfloat16)  # slot 1's probability: e^-88, below 2^-126
    mask = torch.zeros(1, 1, 1, 2, dtype=torch.bfloat16)
    reference = attention.attend(q, k, v, alibi, mask)
    assert reference.abs().min() > 0.5  # torch keeps the subnormal probability, which weighs 1e38
    torch.testing.assert_close(matvec.attend(q, k, v, alibi, mask, 0.5), reference, rtol=8e-3, atol=0)
    k[..., 1, 0] = float("nan")  # a visible key that is NaN: NaN out, as torch
    assert attention.attend(q, k, v, alibi, mask).isnan().all()
    assert matvec.attend(q, k, v, alibi, mask, 0.5).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_generations_half_precision_attention_multiplies_in_float32_where_torchs_is_slow(dtype):
    """fp16 always, bf16 on an x86 CPU without AVX-512 BF16: float32 products, each rounded to the dtype once."""
    slow = dtype == torch.float16 or matvec._NO_BF16_INSTRUCTIONS
    n_head, head_dim, T = 4, 16, 37
    attention = Attention(BloomConfig(hidden_size=n_head * head_dim, n_layer=1, n_head=n_head, vocab_size=8))
    q, k, v = (torch.randn(2, n_head, T, head_dim).to(dtype) for _ in range(3))
    attention_mask = torch.ones(2, T, dtype=torch.long)
    attention_mask[1, :9] = 0  # a left-padded row
    alibi = alibi_bias(attention_mask, alibi_slopes(n_head), dtype)  # (B, nh, 1, T)
    mask = CausalMask(attention_mask, torch.arange(T), dtype).whole()  # (B, 1, T, T)
    reference = attention.attend(q, k, v, alibi, mask)  # torch's half-precision products, as transformers
    with torch.no_grad(), matvec.decoding():
        assert matvec.upcasts(q) == slow and not matvec.upcasts(q.float())
        y = attention.attend(q, k, v, alibi, mask)
    with matvec.decoding():
        assert not matvec.upcasts(q.clone().requires_grad_())  # autograd: torch's ops
    assert not matvec.upcasts(q)  # a plain forward: torch's ops, as transformers
    if not slow:
        assert torch.equal(y, reference)
        return
    by_hand_scores = (
        torch.baddbmm(
            alibi.expand(2, n_head, 1, T).reshape(8, 1, T).float(),
            q.reshape(8, T, 16).float(),
            k.reshape(8, T, 16).float().transpose(1, 2),
            alpha=0.25,
        )
        .to(dtype)
        .view(2, n_head, T, T)
    )
    by_hand_probs = torch.softmax(by_hand_scores + mask, dim=-1, dtype=torch.float32).to(dtype)
    assert torch.equal(y, (by_hand_probs.float() @ v.float()).to(dtype))  # float32 products, each rounded once
    assert y.dtype == dtype and (y != reference).float().mean() < 0.01  # where float32 sums' order decides
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y, reference, rtol=eps, atol=eps / 8)  # about one rounding of the dtype


def test_layers_use_the_kernels_only_while_decoding_and_without_autograd(monkeypatch):
    monkeypatch.setattr(matvec, "max_rows", lambda weight_dtype, x_dtype: 8)  # this CPU's limit aside: 8 rows
    linear = Linear(64, 48)
    x = torch.randn(2, 1, 64)
    x_many = torch.randn(9, 64)
    with torch.no_grad():
        outside = linear(x)
        with matvec.decoding():
            inside = linear(x)
            many_rows = linear(x_many)
    assert torch.equal(outside, F.linear(x, linear.weight, linear.bias))  # torch's op, bit for bit
    assert torch.equal(inside, matvec.linear(x, linear.weight, linear.bias)) and not torch.equal(inside, outside)
    assert torch.equal(many_rows, F.linear(x_many, linear.weight, linear.bias))  # rows past max_rows: torch's op
    assert not torch.equal(many_rows, matvec.linear(x_many, linear.weight, linear.bias))
    with matvec.decoding():
        y = linear(x)  # grad enabled, weight requires grad: torch's op, so that gradients flow
    y.sum().backward()
    assert linear.weight.grad is not None and torch.equal(y, outside)


def test_the_tiles_are_the_cpus_and_take_products_up_to_their_rows_and_every_build_attends(build, tiny_model_folder):
    """Each build holds the widest tiles its target has: AVX-512 BF16 ones, AVX2 ones, or portable loops, which
    torch's matmul outruns: products then stay torch's, through the layers and the block step alike."""
    tiles = matvec.library().tiles
    with open("/proc/cpuinfo") as cpuinfo:
        flags = set(next((line for line in cpuinfo if line.startswith("flags")), "").split())  # x86's
    native = "avx512" if {"avx512f", "avx512bw", "avx512_bf16", "avx512vbmi"} <= flags else "avx2"
    native = native if {"avx2", "fma", "f16c"} <= flags else "portable"
    assert tiles == {"native": native, "x86-64-v3": "avx2", "x86-64-v2": "portable"}[build]
    weights = (torch.randn(48, 64), torch.zeros(48, 64, dtype=torch.int8))  # fp32, and int8 beside fp32 x
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 9, 16)
    with matvec.decoding(), torch.no_grad():
        takes_products = [matvec.applies(torch.randn(rows, 64), w) for rows in (1, 300) for w in weights]
        attends = matvec.attends(q, k)
    vector = tiles != "portable"  # fp32's AVX-512 tiles take any number of rows, its AVX2 tiles up to 64
    assert takes_products == [vector, vector, tiles == "avx512", vector] and attends
    assert (plan(load_pretrained(tiny_model_folder), 1) is not None) == vector


def test_decoding_is_per_thread():
    seen = []
    with matvec.decoding():
        worker = threading.Thread(target=lambda: seen.append(matvec.gelu_applies(torch.randn(8))))
        worker.start()
        worker.join()
        assert matvec.gelu_applies(torch.randn(8))
    assert seen == [False] and not matvec.gelu_applies(torch.randn(8))


DTYPES_AND_QUANTIZE = [(dtype, quantize) for quantize in (None, "int8") for dtype in ("fp32", "bf16", "fp16")]


@pytest.mark.parametrize("dtype, quantize", DTYPES_AND_QUANTIZE)
def test_generation_with_the_kernels_gives_torchs_greedy_tokens(tmp_path, dtype, quantize):
    folder = save_transformers(random_hf_bloom(hidden_size=160, n_head=5, n_layer=3, vocab_size=1000), tmp_path)
    model = load_pretrained(folder, dtype=dtype, quantize=quantize)
    ids, mask = left_padded([9, 4, 7], vocab_size=1000)
    tokens = {
        kernels: generate(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=24,
            eos_token_id=[],
            decoder=Decoder(model, 3, matvec_kernels=kernels),
        )
        for kernels in (True, False)
    }
    assert torch.equal(tokens[True], tokens[False])


def test_each_step_s_logits_equal_torchs_within_float32_rounding(tmp_path):
    model = load_pretrained(save_transformers(random_hf_bloom(hidden_size=96, n_head=4, n_layer=2), tmp_path))
    ids, mask = left_padded([6, 3])
    fast, eager = Decoder(model, 2), Decoder(model, 2, matvec_kernels=False)
    with torch.inference_mode():
        logits = [fast.prefill(ids, mask), eager.prefill(ids, mask)]
        torch.testing.assert_close(*logits, rtol=1e-5, atol=1e-5)
        for _ in range(5):
            token = logits[1][:, -1].argmax(-1)
            logits = [fast.step(token), eager.step(token)]
            torch.testing.assert_close(*logits, rtol=1e-5, atol=1e-5)
            assert not torch.equal(*logits)  # the kernels did run


def test_the_library_is_built_once_rebuilt_when_damaged_and_a_missing_compiler_falls_back_to_torch(tmp_path):
    code = (
        "import warnings, torch; warnings.simplefilter('always')\n"
        "from bloom import matvec\n"
        "with matvec.decoding(): print(matvec.gelu_applies(torch.randn(8)))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True) for _ in range(2)]
    assert [run.stdout for run in runs] == ["True\n", "True\n"]
    assert "compiling the CPU decode kernels" in runs[0].stderr and runs[1].stderr == ""  # the second finds it
    (library,) = (tmp_path / "bloom").glob("matvec-*.so")
    library.write_bytes(b"not a shared library")  # damaged in the cache: built again
    rebuilt = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert rebuilt.stdout == "True\n" and "compiling the CPU decode kernels" in rebuilt.stderr
    missing = subprocess.run(
        [sys.executable, "-c", code], env={**env, "CC": "no-such-cc", "XDG_CACHE_HOME": str(tmp_path / "other")},
        capture_output=True, text=True,
    )  # fmt: skip
    assert missing.stdout == "False\n" and "no C compiler 'no-such-cc'" in missing.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_gelu_of_every_16_bit_value_rounds_each_operation_like_bloom_gelu(build, dtype):
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)  # looked up in a table
    x = x[~x.isnan()]
    reference = bloom_gelu(x)  # outside decoding(): torch's ops
    y = matvec.gelu(x)
    assert (y != reference).float().mean() < 0.01  # where tanh's last float32 bit decides a rounding
    torch.testing.assert_close(y, reference, rtol=2 * torch.finfo(dtype).eps, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("size", [4000, 70000])  # a decode step's values, and a prefill's, which threads share
def test_gelu_rounds_each_operation_like_bloom_gelu(build, dtype, size):
    x = torch.cat([torch.randn(size) * 3, torch.tensor([0.0, -0.0, 1e-20, -30.0, 30.0, 200.0, -200.0])]).to(dtype)
    reference = bloom_gelu(x)  # outside decoding(): torch's ops
    y = matvec.gelu(x)
    if dtype != torch.float32:  # the same value but where tanh's last float32 bit decides a rounding
        assert (y != reference).float().mean() < 0.01
        torch.testing.assert_close(y, reference, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    else:  # 1 + tanh(u) is within ~1e-7 of torch's: relative to GeLU's tiny negative values, not to 1
        torch.testing.assert_close(y, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, n", [(1, 1), (3, 37), (16, 1000)])  # 37, 1000: a tail past whole 16-wide chunks
def test_argmax_is_torchs_argmax_of_the_float32_logits(build, dtype, rows, n):
    logits = torch.randn(rows, n)
    if n > 30:
        logits[0, [2, 9, 30]] = 9.0  # equal largest values: the first
        logits[-1, [20, 25]] = float("nan")  # a NaN is the largest: the first NaN, past an infinity
        logits[-1, 3] = float("inf")
    if n > 32:
        logits[1, 0] = float("nan")  # in the first chunk
        logits[2, n - 1] = float("nan")  # in the tail past whole chunks
    if n > 800:
        logits[3, [300, 301, 700]] = 10.0  # equal largest values past the first chunks: the first
        logits[4, [77, 500]] = float("nan")  # NaNs past the first chunks
    logits = logits.to(dtype)
    assert torch.equal(matvec.argmax(logits), torch.argmax(logits.float(), dim=-1))
    signed_zeros = torch.full((2, n), float("-inf")).to(dtype)  # -0.0 and 0.0 are equal; all -inf: index 0
    signed_zeros[0, n // 2] = -0.0
    signed_zeros[0, -1] = 0.0
    assert torch.equal(matvec.argmax(signed_zeros), torch.argmax(signed_zeros.float(), dim=-1))

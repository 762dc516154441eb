"""The decode step in one kernel call for all blocks (bloom.generation.decode_step) against the same step through the
model's modules (bloom.matvec's per-operation kernels), which test_matvec.py holds to torch's ops and
transformers'."""

import pytest
import torch
from tiny_checkpoint import left_padded, random_hf_bloom, save_transformers
from torch import nn

import bloom.model
from bloom import generate, load_pretrained, matvec
from bloom.generation import decode_step
from bloom.generation.decode_step import plan
from bloom.generation.decoder import Decoder
from bloom.model import MLP, Bloom

DTYPES_AND_QUANTIZE = [(dtype, quantize) for quantize in (None, "int8") for dtype in ("fp32", "bf16", "fp16")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    hf = random_hf_bloom(hidden_size=160, n_head=5, n_layer=3, vocab_size=1000)
    return save_transformers(hf, tmp_path_factory.mktemp("model"))


@pytest.fixture(autouse=True)
def products_in_the_kernels(monkeypatch):
    """Every library takes products here as the AVX-512 tiles do, the portable loops too: generation sends those
    none (matvec.max_rows, since torch's ops outrun them), and their block kernel is still held to the modules."""
    limits = matvec.MAX_ROWS["avx512"]
    monkeypatch.setattr(matvec, "max_rows", lambda weight_dtype, x_dtype: limits.get((weight_dtype, x_dtype), 0))


def through_the_modules(decoder: Decoder, token: torch.Tensor) -> torch.Tensor:
    """decoder.step, sent through the model's modules by a forward hook that does nothing."""
    handle = decoder.model.register_forward_hook(lambda *args: None)
    try:
        return decoder.step(token)
    finally:
        handle.remove()


@pytest.mark.parametrize("lengths", [[9, 4], [9, 4, 7, 1, 8, 3]])  # 6 rows: tiles of 4 rows of W by 4 of x
@pytest.mark.parametrize("dtype, quantize", DTYPES_AND_QUANTIZE)
def test_each_step_and_the_cache_equal_the_step_through_the_modules(build, folder, dtype, quantize, lengths):
    model = load_pretrained(folder, dtype=dtype, quantize=quantize)
    ids, mask = left_padded(lengths, vocab_size=1000)
    fused, modules = Decoder(model, len(lengths)), Decoder(model, len(lengths))
    # fp32: float32 rounding (the LayerNorm sums in another order); half precision: that rounding where it decides
    # an intermediate's last bit, carried through three blocks (measured in the logits, whose largest is about 4:
    # bf16 none, with int8 0.018, about one bf16 step; fp16 0.0044): about twice that
    tolerance = {"fp32": 1e-5, "bf16": 0.04, "fp16": 0.01}[dtype]
    with torch.inference_mode():
        logits = [fused.prefill(ids, mask), modules.prefill(ids, mask)]  # the prompt: through the modules, both
        for _ in range(6):
            token = logits[1][:, -1].argmax(-1)
            assert fused.fused_step.applies()  # this step: one call for all blocks
            logits = [fused.step(token), through_the_modules(modules, token)]
            torch.testing.assert_close(*logits, rtol=0, atol=tolerance)
            assert (logits[0].argmax(-1) == logits[1].argmax(-1)).all()
    for mine, theirs in zip(fused.cache.tensors(), modules.cache.tensors(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype, quantize, rows", [("fp32", None, 16), ("bf16", None, 20), ("bf16", "int8", 20)])
def test_many_rows_of_a_width_and_head_size_off_the_vector_width(build, tmp_path, dtype, quantize, rows):
    """Width 52, heads of 13: every LayerNorm, add and attention of a block step ends in a partial vector."""
    hf = random_hf_bloom(hidden_size=52, n_head=4, n_layer=2, vocab_size=300)
    model = load_pretrained(save_transformers(hf, tmp_path), dtype=dtype, quantize=quantize)
    ids, mask = left_padded([3 + row % 7 for row in range(rows)], vocab_size=300)
    fused, modules = Decoder(model, rows), Decoder(model, rows)
    with torch.inference_mode():
        logits = [fused.prefill(ids, mask), modules.prefill(ids, mask)]
        for _ in range(4):
            token = logits[1][:, -1].argmax(-1)
            assert fused.fused_step.applies()
            logits = [fused.step(token), through_the_modules(modules, token)]
            torch.testing.assert_close(*logits, rtol=0, atol={"fp32": 1e-5, "bf16": 0.1}[dtype])


@pytest.mark.parametrize("dtype, quantize", DTYPES_AND_QUANTIZE)
def test_greedy_tokens_equal_the_modules_across_a_cache_growth(folder, dtype, quantize):
    """The same tokens, but for a tie: where a row's choices differ, the model's logits for both are the largest,
    within the steps' float32 rounding (a random bf16 model's logits tie exactly now and then, and rounding decides
    which of the two argmax takes); the row's tokens diverge after it."""
    model = load_pretrained(folder, dtype=dtype, quantize=quantize)
    ids, mask = left_padded([9, 30], vocab_size=1000)
    fused = generate(model, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[])
    handle = model.register_forward_hook(lambda *args: None)  # every step through the modules
    modules = generate(model, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[])
    handle.remove()
    # 30 + 40 slots: the cache grows from 64 to 128 slots on the way
    tolerance = {"fp32": 1e-5, "bf16": 0.04, "fp16": 0.01}[dtype]  # as between the steps' logits above
    full_mask = torch.cat([mask, torch.ones(2, 40, dtype=mask.dtype)], dim=1)
    for row in range(2):
        differ = (fused[row] != modules[row]).nonzero()
        if len(differ):
            at = int(differ[0])
            with torch.inference_mode():
                logits = model(modules[row : row + 1, :at], full_mask[row : row + 1, :at])[0, -1].float()
            chosen = logits[[int(fused[row, at]), int(modules[row, at])]]
            assert (chosen >= logits.max() - tolerance).all(), f"row {row}, token {at}: not a tie"


def test_a_hook_sends_each_step_through_the_modules(folder):
    model = load_pretrained(folder)
    calls = []
    handle = model.h[1].mlp.act.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4, eos_token_id=[])
    handle.remove()
    assert calls == [(1, 3, 640)] + [(1, 1, 640)] * 3  # the prompt, then every step


def prefilled_twice(folder):
    """A model and two decoders that ran the same prompt: one to step as it would, one through the modules."""
    model = load_pretrained(folder)
    ids, mask = left_padded([5], vocab_size=1000)
    fused, modules = Decoder(model, 1), Decoder(model, 1)
    with torch.inference_mode():
        fused.prefill(ids, mask), modules.prefill(ids, mask)
    return model, fused, modules


@pytest.mark.parametrize("replaced", [False, True])
def test_a_weight_edited_or_replaced_during_a_generation_is_seen_by_the_next_step(folder, replaced):
    model, fused, modules = prefilled_twice(folder)
    with torch.inference_mode():
        layer = model.h[2].mlp.dense_4h_to_h
        if replaced:  # another tensor: the planned step no longer applies, the steps go through the modules
            layer.weight = nn.Parameter(layer.weight * 3.0)
        else:  # the same tensor, edited in place: the planned step reads it
            layer.weight.mul_(3.0)
        assert fused.fused_step.applies() is not replaced
        token = torch.tensor([7])
        torch.testing.assert_close(fused.step(token), through_the_modules(modules, token), rtol=0, atol=1e-5)
        model.h[1].mlp = type(model.h[1].mlp)(model.config)  # another module
        assert not fused.fused_step.applies()


class Halved(nn.Module):
    """A module of the user's around one of the model's: its output halved."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args) / 2


def halve_the_mlp_output(mlp):
    of = mlp.forward
    mlp.forward = lambda x: of(x) / 2


class HalvedMLP(MLP):
    def forward(self, x):
        return super().forward(x) / 2


SHIFT = torch.randn(160, generator=torch.Generator().manual_seed(0))  # added to a (B, T, C) output


def moved(module, method):
    bloom_s = getattr(module, method)
    setattr(module, method, lambda *args, **kwargs: bloom_s(*args, **kwargs) + SHIFT)


EDITS = {
    "a forward set on a module": lambda model: halve_the_mlp_output(model.h[1].mlp),
    "a subclass": lambda model: setattr(model.h[1].mlp, "__class__", HalvedMLP),
    "a wrapper module": lambda model: setattr(model.h[1], "mlp", Halved(model.h[1].mlp)),
    "a tap's forward": lambda model: setattr(model.h[1].mlp.act, "forward", lambda x: x / 2),
    "the model's hidden": lambda model: moved(model, "hidden"),
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_a_forward_of_the_users_runs_in_every_step_of_generate(folder, edit):
    """generate on a model whose forward the user changed equals greedy decoding by whole forward passes, which can
    only run the changed forward: the step that does the blocks' work in one call must not skip it."""
    model = load_pretrained(folder)
    edit(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    generated = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    sequence = ids
    with torch.inference_mode():
        for _ in range(6):
            sequence = torch.cat([sequence, model(sequence)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, sequence)
    assert plan(model, 1) is None


@pytest.mark.parametrize(("cls", "method"), [(MLP, "forward"), (Bloom, "hidden")])
def test_a_method_changed_on_the_class_runs_in_every_step(folder, monkeypatch, cls, method):
    """The step does the work of the blocks' forwards and of what the model's calls (Bloom.hidden)."""
    model = load_pretrained(folder)
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    bloom_s = getattr(cls, method)
    monkeypatch.setattr(cls, method, lambda self, *args, **kwargs: bloom_s(self, *args, **kwargs) + SHIFT)
    with torch.inference_mode():
        by_forwards = ids
        for _ in range(6):
            by_forwards = torch.cat([by_forwards, model(by_forwards)[:, -1:].argmax(-1)], dim=1)
    assert not torch.equal(by_forwards, plain)  # the change changes the tokens
    assert torch.equal(generate(model, ids, max_new_tokens=6, eos_token_id=[]), by_forwards)


def test_a_function_of_the_model_module_changed_runs_in_every_step(folder, monkeypatch):
    """The forwards call bloom.model's functions by name: a GeLU replaced there (an ablation) is the user's too."""
    model = load_pretrained(folder)
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    gelu = bloom.model.bloom_gelu
    monkeypatch.setattr(bloom.model, "bloom_gelu", lambda x: gelu(x) * 3 + 1)
    with torch.inference_mode():
        by_forwards = ids
        for _ in range(6):
            by_forwards = torch.cat([by_forwards, model(by_forwards)[:, -1:].argmax(-1)], dim=1)
    assert not torch.equal(by_forwards, plain)
    assert torch.equal(generate(model, ids, max_new_tokens=6, eos_token_id=[]), by_forwards)


def test_a_torch_method_changed_before_bloom_was_imported_is_the_users(folder, monkeypatch):
    """What the step stands for was read at import: a LayerNorm.forward changed before that is no torch's."""
    layer_norm = nn.LayerNorm.forward

    def halved(self, x):
        return layer_norm(self, x) / 2

    assert decode_step.written_by_torch_or_bloom(layer_norm) and not decode_step.written_by_torch_or_bloom(halved)
    monkeypatch.setattr(nn.LayerNorm, "forward", halved)
    monkeypatch.setitem(decode_step.METHODS[nn.LayerNorm], "forward", halved)  # as if it had been so at import
    assert plan(load_pretrained(folder), 1) is None


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_a_forward_changed_after_the_prefill_runs_in_the_next_steps(folder, edit):
    model, fused, modules = prefilled_twice(folder)
    with torch.inference_mode():
        assert fused.fused_step.applies()
        edit(model)
        assert not fused.fused_step.applies()
        token = torch.tensor([7])
        for _ in range(3):
            logits = fused.step(token)
            torch.testing.assert_close(logits, through_the_modules(modules, token), rtol=0, atol=1e-5)
            token = logits[:, -1].argmax(-1)


def test_the_plan_declines_what_the_kernel_does_not_compute(folder):
    bf16 = load_pretrained(folder, dtype="bf16")
    most = matvec.MAX_ROWS["avx512"][torch.bfloat16, torch.bfloat16]  # as products_in_the_kernels limits them
    assert plan(bf16, most) is not None and plan(bf16, most + 1) is None  # more rows than bloom.matvec.max_rows
    int8 = load_pretrained(folder, dtype="bf16", quantize="int8")
    most = matvec.MAX_ROWS["avx512"][torch.int8, torch.bfloat16]
    assert plan(int8, most) is not None and plan(int8, most + 1) is None
    assert plan(load_pretrained(folder, dtype="fp16"), 64) is not None
    other = load_pretrained(folder)
    other.h[1].mlp.dense_h_to_4h = nn.Linear(160, 640)  # a layer the kernel does not know
    assert plan(other, 1) is None
    split = load_pretrained(folder)
    split.h[0].self_attention.head_offset = 2  # heads split over processes (bloom.scale.parallel)
    assert plan(split, 1) is None
    transposed = nn.Parameter(torch.randn(640, 160).bfloat16().t())  # (160, 640), not contiguous
    for change in (
        lambda m: setattr(m.h[0], "input_layernorm", nn.LayerNorm(160, elementwise_affine=False)),  # no weights
        lambda m: m.h[1].post_attention_layernorm.float(),  # another dtype than the model's
        lambda m: setattr(m.h[2].mlp.dense_4h_to_h, "weight", transposed),
    ):
        model = load_pretrained(folder, dtype="bf16")
        change(model)
        assert plan(model, 1) is None
        generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=3, eos_token_id=[])  # through the modules
    step = plan(load_pretrained(folder), 1)
    with torch.no_grad():
        assert step.applies()
    assert not step.applies()  # autograd needs the modules' ops


def test_a_blocks_call_with_tensors_that_do_not_fit_is_refused(folder):
    blocks = plan(load_pretrained(folder), 1).blocks

    def step(x, keys, values, alibi, mask, at):  # every layer's cache the same tensors
        return blocks(x, [(keys, values)] * 3, alibi, mask, at)

    fits = dict(x=torch.randn(1, 160), keys=torch.zeros(1, 5, 8, 32), values=torch.zeros(1, 5, 8, 32),
                alibi=torch.zeros(1, 5, 8), mask=torch.zeros(1, 8), at=7)  # fmt: skip
    with torch.inference_mode():
        assert step(**fits).shape == (1, 160)
        with pytest.raises(ValueError, match="2 layers' keys and values for 3 blocks"):
            blocks(fits["x"], [(fits["keys"], fits["values"])] * 2, fits["alibi"], fits["mask"], 7)
        last_too_short = [(fits["keys"], fits["values"])] * 2 + [(fits["keys"][:, :, :7], fits["values"][:, :, :7])]
        with pytest.raises(ValueError, match=r"layer 2: .* \(1, 5, 7, 32\)"):  # the layer named, its cache shown
            blocks(fits["x"], last_too_short, fits["alibi"], fits["mask"], 5)
        wrong_ones = (
            dict(at=8),
            dict(mask=torch.zeros(1, 9)),
            dict(values=torch.zeros(1, 5, 8, 32).half()),
            dict(x=torch.randn(2, 160)),
            dict(keys=torch.zeros(1, 5, 32, 8).transpose(2, 3)),
            dict(keys=torch.zeros(1, 5, 8, 16), values=torch.zeros(1, 5, 8, 16)),  # another head size
            dict(
                keys=torch.zeros(1, 10, 8, 16), values=torch.zeros(1, 10, 8, 16), alibi=torch.zeros(1, 10, 8)
            ),  # another number of heads
            {name: t.bfloat16() for name, t in fits.items() if name != "at"},
        )  # not the block's dtype
        for wrong in wrong_ones:  # fmt: skip
            with pytest.raises(ValueError, match="block of width 160 and 5 heads, at slot"):
                step(**{**fits, **wrong})
        with pytest.raises(ValueError, match="^a torch.float32 block"):  # no layer named: all of them share the mask
            step(**{**fits, "mask": torch.zeros(1, 9)})

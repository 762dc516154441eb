"""A decode step on the CPU with its blocks in one call into bloom.matvec, instead of Block.forward's ~20 torch
operations and ~15 module calls each: the kernels of a step through the model inside bloom.matvec.decoding(), and a
LayerNorm of its own (which sums in another order than torch's: results within float32 rounding), without the ~2 ms
of Python and dispatch they cost per step of a 24-block model (a step of bloom-560m reads its weights in 15-30 ms,
depending on the machine's moment).

The Decoder plans it (`plan`) when a prompt is run, from the model's layers as they are then, and takes it for each
step while it `applies`: an eager CPU decoder with the kernels, outside autograd, a model made of bloom's own layers
(bf16, fp16 or fp32, or int8 from bloom.scale.quantize; not split over processes by bloom.scale.parallel) whose
tensors are the kernel's shapes, dtype and layout, few enough rows for the kernels (bloom.matvec.max_rows), no
forward hook anywhere (a probe sees the model's own forward, module by module), the methods it does the work of as
bloom defines them (no subclass, no forward or other method set on a module or its class), and the same tensors as
when it was planned (a layer or weight replaced since then sends the rest of the generation through the model).
Otherwise the step goes through the model.
"""

import math
from inspect import getattr_static, isfunction

import torch
from torch import nn

import bloom.model
from bloom import matvec
from bloom.kv_cache import KVCache
from bloom.model import MLP, Attention, Block, Bloom, Linear, Tap, alibi_bias, alibi_slopes, causal_mask
from bloom.scale.quantize import Int8Linear

# The classes whose work the step does, and the methods by which they do it (forward and what it calls, as each class
# defines or inherits them at import): a subclass, or a method replaced on a class or set on a module, is the user's
STANDS_FOR = (Bloom, Block, Attention, MLP, Linear, Int8Linear, nn.LayerNorm, Tap)
METHODS = {
    cls: {name: getattr_static(cls, name) for name in {"forward", *vars(cls)} if callable(getattr(cls, name))}
    for cls in STANDS_FOR
}  # fmt: skip (getattr_static: a classmethod as it is stored, not bound anew)
METHOD_NAMES = frozenset(name for methods in METHODS.values() for name in methods)
# and the functions of bloom.model that the forwards call by name (bloom.model.bloom_gelu = ... ablates the GeLU)
FUNCTIONS = {name: f for name, f in vars(bloom.model).items() if isfunction(f) and f.__module__ == "bloom.model"}


def written_by_torch_or_bloom(method: object) -> bool:
    """Whether a method (or the function of a classmethod or staticmethod) comes from torch's or bloom's code, not from
    a change made before bloom was imported (nn.LayerNorm.forward = ...)."""
    module = getattr(getattr(method, "__func__", method), "__module__", None) or ""
    return module.startswith(("torch.", "bloom."))


def classes_as_defined(modules: list[nn.Module]) -> bool:
    """Whether each module's class is exactly one of STANDS_FOR, with its methods, and bloom.model's functions, as
    they were at import."""
    if any(getattr(bloom.model, name) is not f for name, f in FUNCTIONS.items()):
        return False
    return all(
        cls in METHODS and all(getattr_static(cls, name) is method for name, method in METHODS[cls].items())
        for cls in set(map(type, modules))
    )


def stood_for(model: Bloom) -> list[nn.Module]:
    """The modules whose work the step does: the model and everything in its blocks."""
    return [model, *(m for m in model.h.modules() if not isinstance(m, nn.ModuleList))]


class DecodeStep:
    """`model(tokens[:, None], mask, cache, slot)` for one token per row: tokens (B,), mask (B, S), slot (1,) ->
    the logits after it, (B, 1, V), its keys and values written at `slot` of every layer's cache."""

    def __init__(self, model: Bloom, blocks: list[matvec.DecodeBlock]) -> None:
        self.model, self.blocks = model, matvec.DecodeBlocks(blocks)
        self.slopes = alibi_slopes(model.config.n_head)  # (nh,)
        self.modules = list(model.modules())  # whose hooks `applies` looks for
        self.replaced = stood_for(model)  # whose methods must stay bloom's
        # and their attributes: a method set on one since (`mlp.forward = ...`) adds one
        self.attributes = [vars(m) for m in self.replaced]
        self.attribute_counts = list(map(len, self.attributes))
        # every module's submodules, parameters and buffers as (its dict, name, value), and where the tensors'
        # data are: what `applies` compares with the model's
        self.members = [(d, name, value) for m in self.modules for d in (m._modules, m._parameters, m._buffers)
                        for name, value in d.items()]  # fmt: skip
        self.tensors = [value for _, _, value in self.members if isinstance(value, torch.Tensor)]
        self.addresses = [t.data_ptr() for t in self.tensors]

    def applies(self) -> bool:
        """Outside autograd, no forward hook on any module (nor a global one), which this step would skip, the
        methods it does the work of unchanged, and the model made of the modules and tensors it was planned with
        (none replaced, no `.data` swapped)."""
        if torch.is_grad_enabled():
            return False
        if not classes_as_defined(self.replaced) or list(map(len, self.attributes)) != self.attribute_counts:
            return False
        module = torch.nn.modules.module
        if module._global_forward_hooks or module._global_forward_pre_hooks:
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.modules):
            return False
        if any(d.get(name) is not value for d, name, value in self.members):
            return False
        return [t.data_ptr() for t in self.tensors] == self.addresses

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, cache: KVCache) -> torch.Tensor:
        model = self.model
        dtype = model.ln_f.weight.dtype
        x = model.word_embeddings_layernorm(model.word_embeddings(tokens[:, None]))[:, 0]  # (B, C)
        alibi = alibi_bias(mask, self.slopes, dtype)[:, :, 0]  # (B, nh, S)
        additive_mask = causal_mask(mask, slot, dtype)[:, 0, 0]  # (B, S): the query at `slot`
        x = self.blocks(x, [(kv.k, kv.v) for kv in cache.layers], alibi, additive_mask, int(slot))
        return model.word_embeddings.unembed(model.ln_f(x)[:, None])  # (B, 1, V)


def plan(model: Bloom, rows: int) -> DecodeStep | None:
    """The model's decode step for `rows` rows through bloom.matvec's block kernel, or None where it does not apply
    (a dtype, device, layer or tensor it does not take, a method of the user's, heads split over processes, more rows
    than matvec.max_rows)."""
    dtype = model.ln_f.weight.dtype
    if model.ln_f.weight.device.type != "cpu" or not matvec.has_block_kernel(dtype):
        return None
    replaced = stood_for(model)
    if not classes_as_defined(replaced) or any(METHOD_NAMES.intersection(vars(m)) for m in replaced):
        return None  # a method of the user's: the step would skip it
    if not all(written_by_torch_or_bloom(f) for methods in METHODS.values() for f in methods.values()):
        return None  # changed before bloom was imported
    blocks = []
    for block in model.h:
        attention, mlp = block.self_attention, block.mlp
        norms = (block.input_layernorm, block.post_attention_layernorm)
        layers = (attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
        if attention.head_offset or attention.n_head != model.config.n_head:  # heads split over processes
            return None
        if any(type(layer) not in (Linear, Int8Linear) for layer in layers):
            return None
        if any(rows > matvec.max_rows(layer.weight.dtype, dtype) for layer in layers):
            return None
        if any(type(norm) is not nn.LayerNorm or norm.eps != norms[0].eps for norm in norms):  # the kernel: one eps
            return None
        norm_tensors = (norms[0].weight, norms[0].bias, norms[1].weight, norms[1].bias)
        products = tuple((layer.weight, getattr(layer, "scale", None), layer.bias) for layer in layers)  # int8: scale
        alpha = 1.0 / math.sqrt(attention.head_dim)
        try:  # tensors of other shapes, dtypes or layouts than the kernel reads
            blocks.append(matvec.DecodeBlock(norm_tensors, products, norms[0].eps, alpha, attention.n_head, dtype))
        except ValueError:
            return None
    return DecodeStep(model, blocks)

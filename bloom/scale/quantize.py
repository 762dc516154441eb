"""Weight-only int8 for the blocks' linear layers and the word embedding: half the bytes of bf16, activations
untouched (but for bf16 activations on an x86 CPU with AVX2 but not AVX-512 BF16, where bloom.matvec multiplies
them in integers while generating: each row's values within a factor 2^8 of its largest exactly, smaller ones rounded
by 2^-15 of the largest at most; bloom/matvec.c).

Each output channel (row) of a weight gets its own scale: w ≈ q · scale with q = round(w / scale) in
[-127, 127] and scale = max |row| / 127. The product is computed as (x · qᵀ) · scale, which equals
x · (q · scale)ᵀ, so the int8 matrix is only ever converted to the activation dtype, never rescaled.
The embedding's rows are a token's vector and, in the LM head, that token's output channel: one scale per
row serves both, the lookup (q[id] · scale[id]) and the head (x · qᵀ) · scale.

Under tensor parallelism the row-parallel layers are quantized too: each process scales its own partial
product (its columns of the weight, with its own scales) before the all_reduce sums them.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bloom import matvec
from bloom.model import Bloom
from bloom.scale.parallel import RowParallelLinear

# torch's CPU kernel that multiplies bf16 activations by an int8 weight without converting the weight:
# 2-3x faster than a bf16 matmul for up to ~16 rows (a decode step), slower beyond, slow in fp16 and fp32.
# It reads the input features in vector-width blocks and has no tail (measured: wrong results or a crash
# for 8, 24 or 40 features), so it is used only where they are a multiple of 64, as in every BLOOM.
PACKED_KERNEL_MAX_ROWS, PACKED_KERNEL_FEATURE_MULTIPLE = 16, 64


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (out, in) int8 and (out,) scales in the weight's dtype, one per row.

    q is rounded against the scale as stored (rounded to the weight's dtype), so |q · scale - w| stays within
    half a step. A scale too small for that dtype (fp16 rows below ~1e-5) becomes its smallest positive value
    instead of 0, which would zero the row.
    """
    w = weight.to(torch.float32, copy=True)  # (out, in), the one temporary copy (divided in place)
    # (out,): max |row| / 127, from the row's largest and smallest values: w.abs() would copy w, and
    # torch.linalg.vector_norm's first call imports torch._dynamo (0.8 s)
    largest = torch.maximum(w.amax(dim=1), -w.amin(dim=1))
    scale = (largest / 127).to(weight.dtype)
    smallest = torch.finfo(weight.dtype).smallest_normal * torch.finfo(weight.dtype).eps  # the smallest subnormal
    scale.clamp_(min=smallest)
    q = w.div_(scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """(..., in) · ((out, in) int8 · (out,) scale)ᵀ (+ bias) -> (..., out), in x's dtype.

    The CPU's int8 kernel and the conversion path round differently in bf16, so with int8 weights a row of a
    long or large batch can differ from the same prompt alone by bf16 rounding (not bitwise, as without int8).
    A generation's few rows go to bloom.matvec's kernel instead.
    """
    if matvec.applies(x, weight):
        return matvec.int8_linear(x, weight, scale, bias)
    rows, features = x.numel() // x.shape[-1], x.shape[-1]
    if (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and rows <= PACKED_KERNEL_MAX_ROWS
        and features % PACKED_KERNEL_FEATURE_MULTIPLE == 0
    ):
        y = torch._weight_int8pack_mm(x.reshape(rows, features).contiguous(), weight, scale)  # (rows, out)
        y = y.view(*x.shape[:-1], -1)
    else:
        y = F.linear(x, weight.to(x.dtype)) * scale
    return y if bias is None else y + bias


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) in the activation dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, bias={self.bias is not None}, int8"

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "Int8Linear":
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(*quantize_rows(linear.weight.detach()), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight, self.scale, self.bias)  # (..., out)


class Int8RowParallelLinear(Int8Linear):
    """RowParallelLinear with an int8 weight: y = all_reduce(x_r · (q_r · scale_r)ᵀ) + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.weight, self.scale)  # this process's partial sum
        dist.all_reduce(y)
        return y + self.bias


class Int8Embedding(nn.Module):
    """`bloom.model.TiedEmbedding` with int8 rows: lookup (B, T) -> (B, T, C) and unembed (B, T, C) -> (B, T, V)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # (V, C) int8
        self.register_buffer("scale", scale)  # (V,) in the model's dtype

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, int8"

    @classmethod
    def from_embedding(cls, embedding: nn.Module) -> "Int8Embedding":
        return cls(*quantize_rows(embedding.weight.detach()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.scale.dtype) * self.scale[ids, None]  # (B, T, C): q · scale, rounded once

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight, self.scale)  # (B, T, V)


def quantize_int8(model: Bloom) -> Bloom:
    """Replace, in place, the word embedding and every linear layer of the blocks by their int8 versions;
    returns the model.

    On a meta-device model this only builds the int8 layers, to be filled by `load_state_dict`
    (which is how `load_pretrained(..., quantize="int8")` quantizes each weight as it reads it).
    """
    model.word_embeddings = Int8Embedding.from_embedding(model.word_embeddings)
    for block in model.h:
        for parent in (block.self_attention, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, RowParallelLinear):
                    setattr(parent, name, Int8RowParallelLinear.from_linear(child))
                elif isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(child))
    return model

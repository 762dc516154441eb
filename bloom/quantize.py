"""Weight-only int8 for the blocks' linear layers: half the bytes of bf16, activations untouched.

Each output channel (row) of a weight gets its own scale: w ≈ q · scale with q = round(w / scale) in
[-127, 127] and scale = max |row| / 127. The product is computed as (x · qᵀ) · scale, which equals
x · (q · scale)ᵀ, so the int8 matrix is only ever converted to the activation dtype, never rescaled.
The embedding (which is also the LM head) stays in the model's dtype.
"""

import torch
import torch.nn.functional as F
from torch import nn

from bloom.model import Bloom


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) in the activation dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1).float().clamp(min=1e-12) / 127  # (out,)
        q = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale.to(weight.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale  # (..., out)
        return y if self.bias is None else y + self.bias


def quantize_int8(model: Bloom) -> Bloom:
    """Replace, in place, every nn.Linear of the blocks by an Int8Linear; returns the model."""
    for block in model.h:
        for parent in (block.self_attention, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(child))
    return model

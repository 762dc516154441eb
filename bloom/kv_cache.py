"""The key/value cache: preallocated, fixed-shape buffers that decoding writes into in place.

Layout, for every layer: keys and values are (B, nh, S_max, hd), position s of the sequence at index s.
Slot s holds the token at column s of the generated sequence (left padding included), so a batch shares
one slot index per step and the shapes never change while decoding.
"""

import torch
from torch import nn

from bloom.config import BloomConfig


class LayerKV(nn.Module):
    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hd) at `slots` (T,) and return all keys and values, (B, nh, S_max, hd) each."""
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class KVCache(nn.Module):
    def __init__(
        self,
        config: BloomConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        n_head: int | None = None,
    ) -> None:
        """n_head: the heads this process computes (default: all; fewer when heads are split, bloom.parallel)."""
        super().__init__()
        self.batch_size, self.max_len = batch_size, max_len
        shape = (batch_size, n_head or config.n_head, max_len, config.head_dim)
        self.layers = nn.ModuleList(LayerKV(shape, dtype, device) for _ in range(config.n_layer))

"""The key/value cache: fixed-shape buffers that decoding writes into in place.

Layout, for every layer: keys and values are (B, nh, S_max, hd), position s of the sequence at index s.
Slot s holds the token at column s of the generated sequence (left padding included), so a batch shares
one slot index per step. A cache never changes shape: when a sequence outgrows it, `bloom.generation.decoder.Decoder`
moves on to a larger one (`copy_from`), so that memory follows the tokens actually generated.

The caches are plain objects holding tensors, not modules with buffers: torch.compile guards a module's buffers
by identity, so every new cache would compile the decode step again (and fail past dynamo's recompile limit),
while plain tensors are guarded by shape and dtype, and a new Decoder reuses the step compiled for an earlier one.
"""

import torch

from bloom.config import BloomConfig


class LayerKV:
    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str) -> None:
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hd) at `slots` (T,) and return all keys and values, (B, nh, S_max, hd) each."""
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class KVCache:
    def __init__(
        self,
        config: BloomConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        n_head: int | None = None,
    ) -> None:
        """n_head: the heads this process computes (default: all; fewer when heads are split, bloom.scale.parallel)."""
        self.max_len = max_len
        shape = (batch_size, n_head or config.n_head, max_len, config.head_dim)
        self.layers = [LayerKV(shape, dtype, device) for _ in range(config.n_layer)]

    @staticmethod
    def nbytes(config: BloomConfig, batch_size: int, max_len: int, dtype: torch.dtype, n_head: int) -> int:
        """The bytes a cache of these sizes takes: keys and values of every layer."""
        return 2 * config.n_layer * batch_size * n_head * max_len * config.head_dim * dtype.itemsize

    def copy_from(self, other: "KVCache", n_slots: int) -> None:
        """Copy the first n_slots slots of every layer's keys and values from a cache of the same batch and heads."""
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine[:, :, :n_slots] = theirs[:, :, :n_slots]

    def tensors(self) -> list[torch.Tensor]:
        """Every layer's keys and values."""
        return [t for layer in self.layers for t in (layer.k, layer.v)]

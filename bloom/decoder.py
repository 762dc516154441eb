"""The one-token decode step of generation, over a preallocated KV cache: eager, or compiled for speed."""

import torch
import torch._inductor.config as inductor_config

from bloom.kv_cache import KVCache
from bloom.model import Bloom


class Decoder:
    """A model's KV cache for `batch_size` rows of up to `max_len` tokens, and its decode step.

    `step(tokens (B,), mask (B, max_len), slot (1,)) -> logits (B, 1, V)` feeds one token per row into the
    cache at `slot`. With `compile=True` the step is compiled once, as one graph (fullgraph), and reused by
    every `generate` call given this decoder:
    - on the CPU with inductor's freezing, which folds the weights into the compiled code as constants and
      lays them out for the CPU's matmul kernels (bf16 decode of bloom-560m on 2 cores: 15 -> 30 tokens/s);
      the matmul weights are copied when the first step compiles: after editing weights, make a new Decoder;
    - on CUDA as a CUDA graph (mode "reduce-overhead"), which removes the launch overhead of ~20 kernels per
      block. The cache's tensors are marked as static addresses, so the graph writes into them in place
      instead of copying them in (a graph may only mutate such inputs); the logits a step returns live in the
      graph's memory and are overwritten by the next step.
    The cache belongs to the decoder, so the compiled step always sees the same buffers.
    """

    def __init__(self, model: Bloom, batch_size: int, max_len: int, *, compile: bool = False) -> None:
        weight = model.word_embeddings.weight
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        n_head = model.h[0].self_attention.n_head  # the heads of this process
        self.cache = KVCache(model.config, batch_size, max_len, weight.dtype, weight.device, n_head)

        def step(tokens: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, cache: KVCache) -> torch.Tensor:
            return model(tokens[:, None], mask, cache, slot)  # the cache as an argument: measured faster

        if not compile:
            self._step = step
        elif weight.device.type == "cuda":
            for tensor in self.cache.tensors():
                torch._dynamo.mark_static_address(tensor)
            self._step = torch.compile(step, fullgraph=True, mode="reduce-overhead")
        else:
            self._step = torch.compile(step, fullgraph=True)
        self._freeze = compile and weight.device.type == "cpu"
        self._graphed = compile and weight.device.type == "cuda"

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        # inductor reads `freezing` from its global config when it compiles (the first call);
        # torch.compile(options={"freezing": True}) does not reach it
        if self._graphed:  # the previous step's outputs are no longer needed: the graph may reuse their memory
            torch.compiler.cudagraph_mark_step_begin()
        with inductor_config.patch(freezing=self._freeze):
            return self._step(tokens, mask, slot, self.cache)

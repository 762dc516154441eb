"""The one-token decode step of generation, over a preallocated KV cache: eager, or compiled for speed."""

import weakref

import torch
import torch._inductor.config as inductor_config

from bloom.kv_cache import KVCache
from bloom.model import Bloom

# model -> the in-place versions (Tensor._version) of its weights when inductor's freezing copied them
_FROZEN_VERSIONS: "weakref.WeakKeyDictionary[Bloom, list[int]]" = weakref.WeakKeyDictionary()


class Decoder:
    """A model's KV cache for `batch_size` rows of up to `max_len` tokens, and its decode step.

    `step(tokens (B,), mask (B, max_len), slot (1,)) -> logits (B, 1, V)` feeds one token per row into the
    cache at `slot`. With `compile=True` the step is compiled once, as one graph (fullgraph), and reused by
    every `generate` call and by every later Decoder of this model (a new batch size or length compiles once
    more, with dynamic shapes):
    - on the CPU with inductor's freezing, which folds the weights into the compiled code as constants and
      lays them out for the CPU's matmul kernels (bf16 decode of bloom-560m on 2 cores: 15 -> 30 tokens/s).
      The compiled code holds a copy of the weights: `check` compiles again after they are edited in place;
    - on CUDA as a CUDA graph (mode "reduce-overhead"), which removes the launch overhead of ~20 kernels per
      block. The cache's tensors are marked as static addresses, so the graph writes into them in place
      instead of copying them in (a graph may only mutate such inputs); the logits a step returns live in the
      graph's memory and are overwritten by the next step.
    The cache belongs to the decoder, so its steps always write into the same tensors (a CUDA graph is recorded
    again for another decoder's cache). A compiled step does not run forward hooks, so probing (bloom.probe)
    needs an eager decoder.
    """

    def __init__(self, model: Bloom, batch_size: int, max_len: int, *, compile: bool = False) -> None:
        weight = model.ln_f.weight  # the model's dtype and device (the embedding may be int8)
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        n_head = model.h[0].self_attention.n_head  # the heads of this process
        self.cache = KVCache(model.config, batch_size, max_len, weight.dtype, weight.device, n_head)

        def step(tokens: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, cache: KVCache) -> torch.Tensor:
            return model(tokens[:, None], mask, cache, slot)  # the cache as an argument: measured faster

        if not compile:
            self._step = step
        elif weight.device.type == "cuda":
            for tensor in self.cache.tensors():  # unguarded: another Decoder's cache re-records the graph, no recompile
                torch._dynamo.mark_static_address(tensor, guard=False)
            self._step = torch.compile(step, fullgraph=True, mode="reduce-overhead")
        else:
            self._step = torch.compile(step, fullgraph=True)
        self.compiled = compile
        self._freeze = compile and weight.device.type == "cpu"
        self._graphed = compile and weight.device.type == "cuda"

    def check(self) -> None:
        """Before each generate() call: make sure the compiled step still computes what the model would.

        Refuses forward hooks, which a compiled step would skip without a word. Under freezing, compares the
        in-place versions of the weights with those the step was compiled with, and after an edit drops all
        compiled code (torch.compiler.reset) so that the next step compiles with the new values.
        """
        if not self.compiled:
            return
        hooked = [name for name, m in self.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        if hooked:
            raise ValueError(
                f"forward hooks on {', '.join(hooked[:3])}: a compiled decode step would not run them; "
                "decode with Decoder(..., compile=False) while probing"
            )
        if self._freeze:
            tensors = (*self.model.parameters(), *self.model.buffers())
            versions = [-1 if t.is_inference() else t._version for t in tensors]  # made in inference_mode: no count
            if _FROZEN_VERSIONS.setdefault(self.model, versions) != versions:
                torch.compiler.reset()
                _FROZEN_VERSIONS[self.model] = versions

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        # inductor reads `freezing` from its global config when it compiles (the first call);
        # torch.compile(options={"freezing": True}) does not reach it
        if self._graphed:  # the previous step's outputs are no longer needed: the graph may reuse their memory
            torch.compiler.cudagraph_mark_step_begin()
        with inductor_config.patch(freezing=self._freeze):
            return self._step(tokens, mask, slot, self.cache)

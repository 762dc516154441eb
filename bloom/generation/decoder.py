"""The one-token decode step of generation and the KV cache it writes into, which grows with the sequence:
eager, or compiled for speed."""

import threading
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from bloom import matvec
from bloom.config import is_integer
from bloom.generation import decode_step
from bloom.kv_cache import KVCache
from bloom.memory import check_fits
from bloom.model import Bloom

MIN_CAPACITY = 64  # slots of the smallest cache

# model -> the in-place versions (Tensor._version) of its weights when inductor's freezing copied them
_FROZEN_VERSIONS: "weakref.WeakKeyDictionary[Bloom, list[int]]" = weakref.WeakKeyDictionary()


class Decoder:
    """A model's KV cache for `batch_size` rows, grown as the sequences grow, and its decode step.

    `prefill(input_ids (B, T), attention_mask (B, T))` runs the prompt into a cache and returns the logits of
    its last position, (B, 1, V); each `step(tokens (B,))` then feeds one token per row into the next slot and
    returns the logits after it. `max_len` bounds the slots (prompt + new tokens) the decoder may ever hold;
    None leaves the bound to the device's memory.

    Memory and time follow the tokens actually generated, not `max_new_tokens`. The cache is allocated when
    it is needed, at a power of two of slots (at least MIN_CAPACITY, at most max_len) that holds the prompt
    and one more token; when the sequence fills it, the decoder moves on to one twice as long and copies the
    slots written so far. Each step attends over the current cache only, never more than twice the slots in
    use (or MIN_CAPACITY). Before a cache is allocated its size is compared with the memory the device has
    available (bloom.memory), and a MemoryError gives both instead of an allocator failure.
    The decoder keeps the cache it uses for the next call (drop the decoder to free it). A CUDA-graph decoder
    keeps every cache it has grown through, one per length, because a graph replays only on the addresses it
    was recorded with: they are few, and add up to less than twice the largest.

    One generation at a time: `claimed()` is held by `generate` for the whole call (by a `stream` until it
    ends), and a second call on the same decoder meanwhile, from another thread or by interleaving two
    streams, is refused with a RuntimeError, because both would write into the same cache. Give each
    concurrent generation its own Decoder.

    With `compile=True` the step is compiled once, as one graph (fullgraph), and reused by every `generate`
    call and by every later Decoder of this model. Every cache length is one more shape: the second compiles
    again with dynamic shapes, which then serve all others (this is what keeps growth cheap to compile):
    - on the CPU with inductor's freezing, which folds the weights into the compiled code as constants and
      lays them out for the CPU's matmul kernels (bf16 decode of bloom-560m on 2 cores, measured before the
      matvec kernels: 15 -> 30 tokens/s; the eager step with them is as fast).
      The compiled code holds a copy of the weights: `check` compiles again after they are edited in place;
    - on CUDA as a CUDA graph (mode "reduce-overhead"), which removes the launch overhead of ~20 kernels per
      block. The caches' tensors are marked as static addresses, so the graph writes into them in place
      instead of copying them in (a graph may only mutate such inputs); a graph is recorded once per cache.
      The logits a step returns live in the graph's memory and are overwritten by the next step.
    A compiled step does not run forward hooks, so probing (bloom.research.probe) needs an eager decoder.

    On the CPU an eager decoder sends a step's products of few rows (bloom.matvec.max_rows: with AVX-512 BF16 up
    to 128 in bf16 and int8, any number in fp32 and fp16; with AVX2 up to 128 in fp32, any number otherwise), the
    LM head of a prefill, the one-query attention and the GeLU to bloom.matvec's kernels (`matvec_kernels`, default
    True): they read the weights at nearly the machine's bandwidth, 1.6-2x faster than torch's matmul in bf16 (3-4x
    at a batch's rows on an AVX2 CPU), and differ from torch by float32 rounding. Each prefill also plans
    `fused_step` (bloom.generation.decode_step): while no forward hook is registered, a step runs each block as one
    kernel call instead of through its modules, the same computation without ~2 ms of Python.
    On a CPU without AVX2 the kernels are portable loops that torch's matmul outruns: there the products, the LM
    head included, stay torch's and no block step is planned; the attention and the GeLU still go to them.
    matvec_kernels=False keeps torch's ops: each step's logits are then transformers' own, and `generate` takes its
    greedy tokens with torch's argmax instead of bloom.matvec.argmax (the same tokens).
    """

    def __init__(
        self,
        model: Bloom,
        batch_size: int,
        max_len: int | None = None,
        *,
        compile: bool = False,
        matvec_kernels: bool = True,
    ) -> None:
        if not (is_integer(batch_size) and batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if max_len is not None and not (is_integer(max_len) and max_len >= 1):
            raise ValueError(f"max_len must be an integer >= 1 or None, got {max_len!r}")
        weight = model.ln_f.weight  # the model's dtype and device (the embedding may be int8)
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        self.n_head = model.h[0].self_attention.n_head  # the heads of this process
        self.caches: dict[int, KVCache] = {}  # by length in slots
        self.cache: KVCache | None = None  # the one in use
        self.length = 0  # slots written in it
        self.mask: torch.Tensor | None = None  # (B, cache.max_len): the prompt's mask, then 1 for every new token
        self.slot: torch.Tensor | None = None  # (1,): where the next token goes, advanced in place
        self._prompt_mask: torch.Tensor | None = None  # (B, T)
        self._in_use = threading.Lock()
        self.fused_step: decode_step.DecodeStep | None = None  # planned by each prefill

        def step(tokens: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, cache: KVCache) -> torch.Tensor:
            return model(tokens[:, None], mask, cache, slot)  # the cache as an argument: measured faster

        if not compile:
            self._step = step
        elif weight.device.type == "cuda":
            self._step = torch.compile(step, fullgraph=True, mode="reduce-overhead")
        else:
            self._step = torch.compile(step, fullgraph=True)
        self.compiled = compile
        self._freeze = compile and weight.device.type == "cpu"
        self._graphed = compile and weight.device.type == "cuda"
        # not under compile: ctypes calls would break its graph. The library is built here (the first time on
        # this machine), before a caller starts printing or timing the generation.
        on_cpu = weight.device.type == "cpu"
        self.matvec_kernels = matvec_kernels and not compile and on_cpu and matvec.library() is not None

    def _products(self) -> AbstractContextManager:
        """Where the model's products go during a prefill or step: bloom.matvec's kernels, or torch's ops."""
        return matvec.decoding() if self.matvec_kernels else nullcontext()

    @contextmanager
    def claimed(self) -> Iterator[None]:
        """Hold the decoder for one generation; refuse it to anyone else until then."""
        if not self._in_use.acquire(blocking=False):
            raise RuntimeError(
                "this Decoder is already generating (in another thread, or in a stream that has not ended): "
                "it serves one generation at a time, because both would write into its one KV cache; give each "
                "concurrent generation its own Decoder"
            )
        try:
            yield
        finally:
            self._in_use.release()

    def capacity_for(self, n_slots: int) -> int:
        """The length of the cache that holds n_slots: a power of two, at least MIN_CAPACITY, at most max_len."""
        capacity = max(MIN_CAPACITY, 1 << (n_slots - 1).bit_length())
        return capacity if self.max_len is None else min(capacity, self.max_len)

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

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) into a cache with room for one more token; logits of its last position, (B, 1, V)."""
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape or input_ids.shape[0] != self.batch_size:
            raise ValueError(
                f"prefill takes input_ids and attention_mask of shape (batch_size={self.batch_size}, T), got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        T = input_ids.shape[1]
        if self.max_len is not None and T > self.max_len:
            raise ValueError(f"a prompt of {T} tokens does not fit this decoder's max_len={self.max_len}")
        self._prompt_mask, self.length, self.cache = attention_mask, 0, None  # the last call's cache: not needed
        self._use(self.capacity_for(T + 1))
        with self._products():
            logits = self.model(input_ids, attention_mask, self.cache, last_only=True)
        self.slot = torch.tensor([T], device=input_ids.device)
        self.length = T
        # the steps' one call for all blocks, planned from the layers as they are now
        self.fused_step = decode_step.plan(self.model, self.batch_size) if self.matvec_kernels else None
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) into the next slot; the logits after it, (B, 1, V)."""
        if self.cache is None:
            raise RuntimeError("step() continues a prompt: call prefill() first")
        if self.length == self.cache.max_len:
            if self.max_len is not None and self.length == self.max_len:
                raise ValueError(f"this decoder holds at most max_len={self.max_len} slots, and they are full")
            self._use(self.capacity_for(self.length + 1))
        if self._graphed:  # the previous step's outputs are no longer needed: the graph may reuse their memory
            torch.compiler.cudagraph_mark_step_begin()
        with self._products():
            if self.fused_step is not None and self.fused_step.applies():
                logits = self.fused_step(tokens, self.mask, self.slot, self.cache)
            elif self.compiled:
                # inductor reads `freezing` from its global config when it compiles (the first call);
                # torch.compile(options={"freezing": True}) does not reach it. Imported here: it takes ~0.9 s
                import torch._inductor.config as inductor_config

                with inductor_config.patch(freezing=self._freeze):
                    logits = self._step(tokens, self.mask, self.slot, self.cache)
            else:
                logits = self._step(tokens, self.mask, self.slot, self.cache)
        self.slot += 1
        self.length += 1
        return logits

    def _use(self, capacity: int) -> None:
        """Move on to the cache of `capacity` slots (allocated if this decoder has none yet), with what is written."""
        cache = self.caches.get(capacity)
        if not self._graphed:  # only a CUDA graph needs the smaller caches again: free them
            self.caches = {}
        if cache is None:
            weight = self.model.ln_f.weight  # the model's dtype (the embedding may be int8)
            B, device = self.batch_size, weight.device
            needed = KVCache.nbytes(self.model.config, B, capacity, weight.dtype, self.n_head)
            check_fits(f"a KV cache of {capacity} slots for {B} rows ({self.length} slots written)", needed, device)
            try:
                cache = KVCache(self.model.config, B, capacity, weight.dtype, device, self.n_head)
            except torch.OutOfMemoryError as error:
                raise MemoryError(f"a KV cache of {capacity} slots for {B} rows: {error}") from None
            if self._graphed:  # unguarded: another cache re-records the graph, no recompile
                for tensor in cache.tensors():
                    torch._dynamo.mark_static_address(tensor, guard=False)
            self.caches[capacity] = cache
        if self.length:
            cache.copy_from(self.cache, self.length)
        self.cache = cache
        prompt_mask = self._prompt_mask
        self.mask = torch.ones(self.batch_size, capacity, dtype=torch.long, device=prompt_mask.device)
        self.mask[:, : prompt_mask.shape[1]] = prompt_mask  # every slot after the prompt holds a real token

"""The C heap under torch's CPU tensors (glibc's malloc): keep what tensors free for the next ones while a forward
pass runs, and hand it back to the OS when the pass ends.

By default glibc maps every block above 128 kB-32 MB afresh from the kernel and unmaps it when it is freed, and
trims the heap's free top. A forward pass allocates and frees large tensors in every layer (scores,
probabilities, the MLP's 4·C activations): each one's pages were faulted in and zeroed again, layer after
layer, which took longer than the arithmetic on them (a bf16 forward over 2 x 1024 tokens of bloom-560m: 3.2
million page faults). `keep_freed_memory` has malloc keep freed blocks of up to KEPT_BLOCK_BYTES, so that the
next layer's tensors reuse them, and `Bloom.hidden` calls `release_freed_memory` at the end of each pass over
more than one token, so that the process does not keep what it freed beyond the pass (with the blocks kept for
good, a helper's loops of forwards over varied shapes ended holding 1-5 GB more, and peaked up to 1.5x higher).
Measured in fresh processes alternated (scratch, random bloom-560m weights, bf16, 2 cores), with malloc's
defaults and then with both:
- a forward over 2 x 1024 tokens: 7.7-8.1 s, then 4.3-4.4 s; peak RSS 2.32 GB both times;
- a prefill of one 128-token prompt 197-200 ms, then 160; of 16 prompts 2.5 s, then 1.9-2.0; decode steps unchanged;
- forwards over 12 shapes from 1 x 64 to 1 x 2048 tokens: 33-34 s, then 25-26; peak 2.33-2.38 GB both times;
- perplexity over 2,000 tokens with 6 window settings: 53 s, then 32; peak 1.97 GB, then 2.21;
- scripts/long_context.py (one window of 16,384 tokens): 24-25 s, then 10.7; peak 1.32-1.48 GB, then 1.93.
Larger blocks (a long input's logits, its chunks of attention scores) are still mapped afresh: kept too, the
forward over 2 x 1024 tokens took 3.9-4.3 s but peaked at 3.3-3.5 GB; kept only up to 128 MB, 5.7 s (and the
long context 19.9 s).
"""

import ctypes
import os
import platform

_LIBC = ctypes.CDLL(None)  # this process's C library
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
KEPT_BLOCK_BYTES = 256 << 20  # the largest block malloc keeps when freed (above it: mapped and unmapped)
KEPT_TOP_BYTES = 1 << 30  # the free memory at the heap's top that malloc keeps between `release_freed_memory` calls


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to KEPT_BLOCK_BYTES for the next allocations. Returns whether it
    was set: not on another C library, nor where the user has set malloc's thresholds (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_, or GLIBC_TUNABLES' glibc.malloc). `bloom.load_pretrained` calls it once the weights
    are read."""
    if platform.libc_ver()[0] != "glibc" or not hasattr(_LIBC, "mallopt"):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        f"MALLOC_{name}_THRESHOLD_" in os.environ for name in ("MMAP", "TRIM")
    ):
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES) and _LIBC.mallopt(M_TRIM_THRESHOLD, KEPT_TOP_BYTES))


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing)."""
    malloc_trim = getattr(_LIBC, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)

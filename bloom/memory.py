"""How much memory a device has left, so that generation can refuse an allocation before the allocator fails; and
how the C heap (glibc's malloc, under torch's CPU tensors) keeps or hands back what tensors free.

On Linux the CPU allocator overcommits: a tensor too large for the machine is often granted and then killed
by the kernel when its pages are touched, with no Python error at all. Comparing an estimate with what is
available first is what turns that into a message.
"""

import ctypes
import math
import os
import platform
from pathlib import Path

import torch

from bloom.model import Bloom, query_chunks

GB = 1e9
_LIBC = ctypes.CDLL(None)  # this process's C library
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
KEPT_BYTES = 1 << 30  # the largest block that keep_freed_memory has malloc keep, and the free top it keeps


class _MallocInfo(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


def available_memory(device: torch.device) -> int | None:
    """Bytes that a new tensor on `device` can take now, or None where the platform does not say.

    CPU: MemAvailable of /proc/meminfo (Linux). CUDA: the device's free memory plus what torch's caching
    allocator holds unused.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            lines = Path("/proc/meminfo").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 + heap_free_bytes()  # the file counts kB
    return None


def heap_free_bytes() -> int:
    """Bytes the C heap holds freed, which the next tensors reuse (glibc's mallinfo2; elsewhere 0)."""
    mallinfo2 = getattr(_LIBC, "mallinfo2", None)
    if mallinfo2 is None:
        return 0
    mallinfo2.restype = _MallocInfo
    return mallinfo2().fordblks


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the blocks that tensors free, up to KEPT_BYTES each, for the next tensors, instead
    of handing them back to the kernel. Returns whether it was set (not on another C library, nor where the user
    has set malloc's thresholds: MALLOC_*_THRESHOLD_ or GLIBC_TUNABLES).

    By default glibc maps every block above 128 kB-32 MB afresh from the kernel and unmaps it when freed, and
    trims the heap's free top. A forward pass allocates and frees large tensors in every layer (scores,
    probabilities, the MLP's 4·C activations, the logits): each one's pages were then faulted in and zeroed again,
    which took longer than the arithmetic on them. A forward over 2 x 1024 tokens of bloom-560m in bf16 (scratch,
    fresh processes, 2 cores) took 7.4-7.9 s with 3.2 million page faults, 4.0-4.3 s with none once set; the prefill
    of a batch of 16 prompts of 128 tokens 2.4-2.7 s against 1.9, one prompt's 200 against 165 ms, and one window
    of 16,384 tokens (scripts/long_context.py) 24-25 s against 9.5-10.2.
    The price: memory the process freed stays its own (its resident size stays near its peak, as torch's CUDA
    caching allocator keeps GPU memory), which `available_memory` counts as available (`heap_free_bytes`).
    `bloom.load_pretrained` sets it once the weights are in memory.
    """
    if platform.libc_ver()[0] != "glibc" or not hasattr(_LIBC, "mallopt"):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        f"MALLOC_{name}_THRESHOLD_" in os.environ for name in ("MMAP", "TRIM")
    ):
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, KEPT_BYTES) and _LIBC.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES))


def release_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing)."""
    malloc_trim = getattr(_LIBC, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


def check_fits(what: str, needed: int, device: torch.device) -> None:
    """Raise MemoryError, naming `what`, when `needed` bytes are more than `device` has available."""
    available = available_memory(device)
    if available is not None and needed > available:
        raise MemoryError(f"{what} needs {needed / GB:.3g} GB, but {available / GB:.3g} GB is available on {device}")


def check_attention_fits(model: Bloom, batch_size: int, prompt_len: int) -> None:
    """Refuse, before a forward pass allocates them, attention tensors of a prompt (or window) that cannot fit.

    A forward pass over T tokens attends from every token to every other, one layer at a time, `rows` queries
    at once: the scores (B, nh, rows, T) and the masked scores in the model dtype, their float32 softmax and its copy in
    the model dtype, beside the (B, 1, rows, T) additive mask and its boolean (measured: 707 MB added for a
    3,000-token prompt of a 6-head fp32 model, estimated 693 MB). rows = T while the float32 scores fit in
    bloom.model.SCORES_BUDGET or a probe watches them; beyond it attention takes chunks of queries that fit in
    it (bloom.model.Attention), so that memory grows linearly with T. The KV cache is checked as it grows.
    """
    weight = model.ln_f.weight  # the model's dtype and device (the embedding may be int8)
    attention = model.h[0].self_attention
    n_head, itemsize = attention.n_head, weight.dtype.itemsize
    n_chunks = query_chunks(batch_size, n_head, prompt_len, prompt_len)  # as Attention.forward splits
    probed = any(block.self_attention.probed() for block in model.h)
    rows = prompt_len if probed else math.ceil(prompt_len / n_chunks)
    per_score = 2 * itemsize + 4 + (0 if weight.dtype == torch.float32 else itemsize)
    needed = batch_size * rows * prompt_len * (n_head * per_score + itemsize + 1)
    check_fits(
        f"the attention over a prompt of {prompt_len} tokens (batch {batch_size}, {n_head} heads: "
        f"{batch_size}x{n_head}x{rows}x{prompt_len} scores at once)",
        needed,
        weight.device,
    )

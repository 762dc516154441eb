"""How much memory a device has left, so that generation can refuse an allocation before the allocator fails.

On Linux the CPU allocator overcommits: a tensor too large for the machine is often granted and then killed
by the kernel when its pages are touched, with no Python error at all. Comparing an estimate with what is
available first is what turns that into a message.
"""

import math
from pathlib import Path

import torch

from bloom.model import Bloom, query_chunks

GB = 1e9


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
                return int(line.split()[1]) * 1024  # the file counts kB
    return None


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

"""How much memory a device has left, so that generation can refuse an allocation before the allocator fails.

On Linux the CPU allocator overcommits: a tensor too large for the machine is often granted and then killed
by the kernel when its pages are touched, with no Python error at all. Comparing an estimate with what is
available first is what turns that into a message.
"""

from pathlib import Path

import torch

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

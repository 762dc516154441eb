"""Peak memory of a patching sweep over every block of a bloom-560m-shaped model (random weights, fp32, CPU).

    python scripts/patching_memory.py --seq-len 64 --batch-size 8 --batches 4

Builds the model on the fly (no download), runs `attribution_patching` over "h.*" (one forward and one
backward pass), then `activation_patching` over "h.*" at every position: 24 blocks x T positions, batch_size
rows per forward pass. Each batch allocates the same tensors, so the peak is reached in the first batch;
`--batches N` stops the sweep after N batches (a whole sweep at T=64 is 192 forward passes of 8 x 64 tokens),
and the peak printed after batch 1 and after batch N shows whether memory grows with the sweep.
Prints the peak resident set size (ru_maxrss) after each phase and the bound it is checked against:
weights + 2 x the logits of one batch (batch_size x T x V x 4 bytes) + 0.5 GiB for torch and the activations.
"""

import argparse
import resource
import sys
import time

import torch

from bloom import Bloom, BloomConfig
from bloom.heap import keep_freed_memory
from bloom.research.patching import activation_patching, attribution_patching

GiB = 2**30


class _Enough(Exception):
    """Raised by the metric to end the sweep after the requested number of batches."""


def peak_rss() -> int:
    """The process's peak resident set size so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(seq_len: int = 64, batch_size: int = 8, batches: int | None = None) -> int:
    torch.manual_seed(0)
    config = BloomConfig.from_name("bloom-560m")
    model = Bloom(config).eval().requires_grad_(False)  # random weights of the published shape
    keep_freed_memory()  # as load_pretrained does
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    logits = batch_size * seq_len * config.vocab_size * 4
    bound = weights + 2 * logits + GiB // 2
    print(f"bloom-560m shape, fp32: weights {weights / GiB:.2f} GiB; logits of one batch {logits / GiB:.2f} GiB")
    print(f"after building the model: peak RSS {peak_rss() / GiB:.2f} GiB")
    clean, corrupt = torch.randint(0, 250680, (2, 1, seq_len))
    metric = lambda logits: logits[:, -1, 1000] - logits[:, -1, 2000]  # noqa: E731

    start = time.perf_counter()
    attribution_patching(model, clean, corrupt, metric, "h.*")
    print(f"attribution_patching over h.*: {time.perf_counter() - start:.0f} s, peak RSS {peak_rss() / GiB:.2f} GiB")

    total = -(-config.n_layer * seq_len // batch_size)
    limit = total if batches is None else min(batches, total)
    passes = 0

    def count_pass(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal passes
        passes += 1  # the first is the clean run, the next ones the batches of patched runs
        if passes > 1:
            print(f"  batch {passes - 1}/{total}: peak RSS {peak_rss() / GiB:.2f} GiB", file=sys.stderr)
        if passes > limit:  # this batch ran: stop before the next one
            raise _Enough

    handle = model.register_forward_hook(count_pass)
    start = time.perf_counter()
    try:
        activation_patching(model, clean, corrupt, metric, "h.*", batch_size=batch_size)
    except _Enough:
        pass
    finally:
        handle.remove()
    seconds = time.perf_counter() - start
    peak = peak_rss()
    print(
        f"activation_patching over h.* ({config.n_layer} blocks x {seq_len} positions, batch {batch_size}): "
        f"{limit} of {total} batches in {seconds:.0f} s, peak RSS {peak / GiB:.2f} GiB"
    )
    print(f"bound: weights + 2 x logits + 0.5 GiB = {bound / GiB:.2f} GiB -> {'within' if peak <= bound else 'OVER'}")
    return 0 if peak <= bound else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=64, help="prompt length T (default 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="patched rows per forward pass (default 8)")
    parser.add_argument("--batches", type=int, default=None, help="stop after this many batches (default: all)")
    args = parser.parse_args()
    sys.exit(main(args.seq_len, args.batch_size, args.batches))

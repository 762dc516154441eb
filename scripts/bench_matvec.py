"""The decode step's products alone: bloom.matvec's kernels against torch's ops, side by side in one process.

Weights of the bloom-560m shape (24 blocks' qkv, dense, h_to_4h, 4h_to_h, then the 250880-row LM head: more
than the CPU's caches hold, as in a real decode step), multiplied by M rows of activations. Prints the bytes of
weights read per second by each, the ratio, and the share of the machine's bandwidth (a sum() over 0.5 GB).

    python scripts/bench_matvec.py                      # bf16, fp16, fp32 and int8; 1, 2, 4, 8, 16, 32 rows
    python scripts/bench_matvec.py --dtypes bf16 --rows 1
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/bench_matvec.py --march x86-64-v3
        # as on a CPU with AVX2 but not AVX-512: the kernels' AVX2 tiles, torch's ops limited to AVX2
"""

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bloom import matvec
from bloom.command_line.bench import KERNELS, memory_bandwidth_gb_s
from bloom.scale.quantize import int8_matmul, quantize_rows

HIDDEN, LAYERS, VOCAB = 1024, 24, 250880


def median_seconds(run, reps: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def weights(dtype: torch.dtype) -> list[torch.Tensor]:
    shapes = [(3 * HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (4 * HIDDEN, HIDDEN), (HIDDEN, 4 * HIDDEN)] * LAYERS
    return [torch.randn(shape, dtype=dtype) for shape in [*shapes, (VOCAB, HIDDEN)]]


def products(function, x: dict[int, torch.Tensor], weights: list[tuple]) -> Callable[[], list[torch.Tensor]]:
    """A run of `function(x, *weight)` over every weight, x picked by the weight's input features."""
    return lambda: [function(x[weight[0].shape[1]], *weight) for weight in weights]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32", "int8"],
                        choices=["bf16", "fp16", "fp32", "int8"])  # fmt: skip
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--march", help="build the kernels for this target instead of this CPU (-march=native)")
    args = parser.parse_args()
    if args.march:  # installed where matvec.library() returns it, as tests/conftest.py does
        matvec._library, matvec._tried = matvec.load(matvec.build(args.march)), True
    if matvec.library() is None:
        raise SystemExit("bloom.matvec's kernels could not be built here (see the warning): nothing to measure")
    torch.manual_seed(0)
    bandwidth = memory_bandwidth_gb_s(torch.device("cpu"))
    kind = matvec.library().tiles
    tiles = f"{KERNELS[kind]} tiles" if kind in KERNELS else "portable loops"
    print(f"{torch.get_num_threads()} threads, {tiles}, memory bandwidth (sum over 0.5 GB) {bandwidth:.1f} GB/s")
    print("| weights | rows | torch GB/s | kernels GB/s | kernels / torch | kernels' share of bandwidth |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.dtypes:
        if name == "int8":
            quantized = [quantize_rows(w) for w in weights(torch.bfloat16)]  # (q, scale) pairs
            nbytes = sum(q.numel() + scale.numel() * scale.element_size() for q, scale in quantized)
            x_dtype = torch.bfloat16
        else:
            x_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
            dense = weights(x_dtype)
            nbytes = sum(w.numel() * w.element_size() for w in dense)
        for rows in args.rows:
            x = {k: torch.randn(rows, k, dtype=x_dtype) for k in (HIDDEN, 4 * HIDDEN)}  # by input features
            if name == "int8":
                ours = products(matvec.int8_linear, x, quantized)
                theirs = products(int8_matmul, x, quantized)
            else:
                ours = products(matvec.linear, x, [(w,) for w in dense])
                theirs = products(F.linear, x, [(w,) for w in dense])
            t_ours, t_theirs = median_seconds(ours, args.reps), median_seconds(theirs, args.reps)
            print(f"| {name} | {rows} | {nbytes / t_theirs / 1e9:.1f} | {nbytes / t_ours / 1e9:.1f} | "
                  f"{t_theirs / t_ours:.2f}x | {nbytes / t_ours / 1e9 / bandwidth:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()

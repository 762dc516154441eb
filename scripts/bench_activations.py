"""`bloom activations` throughput, and its memory when the corpus grows: 1x and 10x side by side.

Each corpus size runs in a fresh process (this script with --worker) that builds a random-weight model of
the given shape (speed and memory do not depend on the values), exports random token ids with
`bloom.research.activations.export` into a temporary folder, and reports tokens/s, its peak resident memory (the
kernel's high-water mark, ru_maxrss) and its resident memory just before the export; then it runs the same
batches through the model alone (`model.hidden`, nothing recorded or written), so that the cost of recording
and writing reads as a ratio on a machine whose speed varies. Tokenizing is not measured: the ids are made up.

    python scripts/bench_activations.py                          # 8192 and 81920 tokens, a small model
    python scripts/bench_activations.py --shape bloom-560m --tokens 2048 --scales 1
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bloom.config import BloomConfig
from bloom.heap import keep_freed_memory
from bloom.model import Bloom
from bloom.research.activations import export, windows

SMALL = BloomConfig(vocab_size=1000, hidden_size=512, n_layer=4, n_head=8)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def worker(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    config = SMALL if args.shape == "small" else BloomConfig.from_name(args.shape)
    model = Bloom(config).eval()
    keep_freed_memory()  # as load_pretrained does, which `bloom activations` calls
    ids = torch.randint(0, config.vocab_size, (args.tokens,))
    before = rss_mb()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        export(model, ids, args.points, Path(folder) / "acts", context=args.context, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        written = sum(f.stat().st_size for f in (Path(folder) / "acts").iterdir()) / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kilobytes on Linux
    start = time.perf_counter()
    with torch.inference_mode():
        spans = windows(args.tokens, args.context)
        for i in range(0, len(spans), args.batch_size):  # the export's batches (every window is full here)
            model.hidden(torch.stack([ids[begin:end] for begin, end in spans[i : i + args.batch_size]]))
    forward = time.perf_counter() - start
    return {"tokens": args.tokens, "seconds": seconds, "forward_seconds": forward, "before_mb": before,
            "peak_mb": peak, "written_mb": written}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", help="'small' (512 wide, 4 blocks, 8 heads) or a preset name")
    parser.add_argument("--tokens", type=int, default=8192, help="the 1x corpus (default 8192)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10], help="corpus sizes, times --tokens")
    parser.add_argument("--points", nargs="+", default=["h.*"], help="default: every block's output")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    print(f"shape {args.shape}, points {' '.join(args.points)}, context {args.context}, batch {args.batch_size}, "
          f"fp32, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print("| corpus | tokens | export tokens/s | forward alone tokens/s | written MB | RSS before export MB "
          "| peak RSS MB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = []
    for scale in args.scales:
        argv = [sys.executable, __file__, "--worker", "--shape", args.shape, "--tokens", str(args.tokens * scale),
                "--points", *args.points, "--context", str(args.context),
                "--batch-size", str(args.batch_size)]  # fmt: skip
        r = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        results.append(r)
        speeds = f"{r['tokens'] / r['seconds']:.0f} | {r['tokens'] / r['forward_seconds']:.0f}"
        print(f"| {scale}x | {r['tokens']} | {speeds} | {r['written_mb']:.0f} | {r['before_mb']:.0f} "
              f"| {r['peak_mb']:.0f} |")  # fmt: skip
    if len(results) > 1:
        first, last = results[0], results[-1]
        corpus, written = last["tokens"] / first["tokens"], last["written_mb"] / first["written_mb"]
        added = [r["peak_mb"] - r["before_mb"] for r in (first, last)]
        print(f"corpus x{corpus:.0f}, written x{written:.1f}: peak RSS x{last['peak_mb'] / first['peak_mb']:.3f}, "
              f"added by the export {added[0]:.0f} -> {added[1]:.0f} MB")  # fmt: skip
    overhead = [r["seconds"] / r["forward_seconds"] for r in results]
    print("export time / forward-alone time: " + ", ".join(f"{x:.2f}" for x in overhead))
    return 0


if __name__ == "__main__":
    sys.exit(main())

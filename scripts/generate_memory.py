"""Memory and time of generation follow the tokens generated, not max_new_tokens: measured side by side.

For each number of tokens actually generated, runs the same greedy decode under a tight bound
(max_new_tokens = the tokens generated) and under loose ones (10**6, 10**9), and prints the decode time
per token and the KV cache the decoder holds, with their ratios to the tight bound's. A random model of a
small BLOOM shape (the weights do not matter to either figure); --hidden, --layers, --heads change it.
"""

import argparse
import time
from contextlib import closing

import torch

from bloom.config import BloomConfig
from bloom.generation.decoder import Decoder
from bloom.generation.generate import generate_steps
from bloom.heap import keep_freed_memory
from bloom.model import Bloom


def decode(model: Bloom, ids: torch.Tensor, n_tokens: int, bound: int) -> tuple[float, int]:
    """Generate n_tokens greedily under max_new_tokens=bound: (seconds per decode step, cache bytes held)."""
    decoder = Decoder(model, ids.shape[0], ids.shape[1] + bound)
    steps = generate_steps(model, ids, max_new_tokens=bound, eos_token_id=[], decoder=decoder)
    with closing(steps):
        next(steps)  # the prefill
        start = time.perf_counter()
        for _ in range(n_tokens - 1):
            next(steps)
        seconds = (time.perf_counter() - start) / (n_tokens - 1)
    held = sum(t.nbytes for cache in decoder.caches.values() for t in cache.tensors())
    return seconds, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 256], help="tokens generated per run")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BloomConfig(hidden_size=args.hidden, n_layer=args.layers, n_head=args.heads)
    model = Bloom(config).eval()
    keep_freed_memory()  # as load_pretrained does, which `bloom generate` calls
    ids = torch.randint(4, 1000, (1, 8))
    print(f"random BLOOM: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {config.vocab_size}")
    print("| generated | max_new_tokens | ms / step | KV cache held | time ratio | memory ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.tokens:
        tight_seconds, tight_bytes = decode(model, ids, n, n)
        for bound in (n, 10**6, 10**9):
            seconds, held = decode(model, ids, n, bound) if bound != n else (tight_seconds, tight_bytes)
            print(f"| {n} | {bound:,} | {seconds * 1e3:.2f} | {held / 1e6:.2f} MB | "
                  f"{seconds / tight_seconds:.2f} | {held / tight_bytes:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()

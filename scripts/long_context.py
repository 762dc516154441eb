"""One forward over a long input under an address-space limit: perplexity with --context 16384 in 6 GiB.

Runs `bloom.research.perplexity.perplexity` (what `bloom perplexity` calls) on random tokens with a random model of the
given shape, in a child process whose address space is capped with RLIMIT_AS, and prints its time and peak
resident memory. `--whole` lifts the attention's scores budget (bloom.model.SCORES_BUDGET), so that every layer
computes its (B, nh, T, S) float32 scores at once, as transformers does: at 16,384 tokens that does not fit.

    python scripts/long_context.py                      # 16,384 tokens, 8 heads, 6 GiB
    python scripts/long_context.py --whole              # the same with the whole scores: fails
"""

import argparse
import math
import resource
import subprocess
import sys
import time

import torch


def child(args: argparse.Namespace) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (args.limit_gib * 2**30, args.limit_gib * 2**30))
    import bloom.model
    from bloom import Bloom, BloomConfig
    from bloom.heap import keep_freed_memory
    from bloom.research.perplexity import perplexity

    if args.whole:
        bloom.model.SCORES_BUDGET = math.inf
    config = BloomConfig(hidden_size=args.hidden, n_layer=args.layers, n_head=args.heads, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = Bloom(config).eval()
    keep_freed_memory()  # as load_pretrained does, which `bloom perplexity` calls
    tokens = torch.randint(4, args.vocab, (args.tokens,)).tolist()
    start = time.perf_counter()
    result = perplexity(model, tokens, context=args.tokens, stride=args.tokens, batch_size=1)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"{args.tokens} tokens in one window: {seconds:.1f} s, peak RSS {peak_gb:.2f} GB, "
          f"{result.nll:.3f} nats per token over {result.n_scored} tokens")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="the context, one window (default 16384)")
    parser.add_argument("--limit-gib", type=int, default=6, help="RLIMIT_AS of the child process (default 6)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="default 2")
    parser.add_argument("--heads", type=int, default=8, help="default 8")
    parser.add_argument("--vocab", type=int, default=250880, help="default 250880, BLOOM's")
    parser.add_argument("--whole", action="store_true", help="compute each layer's scores at once (transformers' way)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    shape = f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}"
    scores_gb = args.heads * args.tokens**2 * 4 / 1e9
    print(f"{shape}; one layer's whole float32 scores: {scores_gb:.1f} GB; address space limit {args.limit_gib} GiB")
    result = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        print(f"failed ({'whole scores' if args.whole else 'chunked'}): {last}")
        return 1
    print(("whole scores: " if args.whole else "chunked: ") + result.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())

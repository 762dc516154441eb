"""Where a batched decode step's time goes on the CPU: each kind of product of the blocks, the attention and the LM
head, each timed alone through bloom.matvec's kernels, beside the whole step and the machine's bandwidth.

    python scripts/decode_parts.py                        # bloom-560m, bf16, 16 prompts of 64-128 tokens
    python scripts/decode_parts.py --batch-size 1 --dtype fp32

A random model of a preset's shape (nothing to download) runs a left-padded prompt per row, as `bloom bench`'s
batch does, then decode steps. Each part is timed over all the layers, on the decoder's own tensors (its weights,
its KV cache, its mask), the median of `--reps`; the products and the LM head are given in GFLOP/s (2 per
multiply-add), the attention in GB/s of keys and values read (visible slots only, as the kernel reads them). The
kernels are called as the block step calls them, with their arguments made beforehand: through bloom.matvec's
Python functions, which allocate each output, the 96 products of bloom-560m took 1-2 ms more. What is left of the
step is its Python and the work between the kernels. Beside them, torch's own matmul of two 2048 x 2048 squares in the
dtype the kernels multiply in (bf16 in the AVX-512 tiles, float32 for fp32 and fp16 and in the AVX2 tiles), the shape
in which the multiply-adds are easiest to keep busy: each product's rate is also given as a share of it, and the step
as it would be with every product at that rate.
"""

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from bloom import matvec
from bloom.checkpoints.loader import DTYPES
from bloom.command_line.bench import memory_bandwidth_gb_s, random_model
from bloom.generation.decoder import Decoder
from bloom.model import alibi_bias, alibi_slopes, causal_mask


def median_seconds(work, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calls_in_a_row(calls: list[Callable[[], object]], tensors: list[torch.Tensor]) -> Callable[[], None]:
    """One function that makes the calls one after another; it holds the tensors their pointers point into."""

    def run() -> None:
        for call in calls:
            call()

    run.tensors = tensors
    return run


def products(layers: list[torch.nn.Module], x: dict[int, torch.Tensor], dtype: torch.dtype) -> Callable[[], None]:
    """The layers' products of x (by width) through the kernel of their dtype."""
    kernel = getattr(matvec.library(), matvec._KERNEL_DTYPES[dtype])
    calls, tensors = [], []
    for layer in layers:
        N, K = layer.weight.shape
        rows = x[K].shape[0]
        x_read = x[K].float() if dtype == torch.float16 else x[K]  # the fp16 kernel reads x in float32
        y = torch.empty(rows, N, dtype=dtype)
        bias = getattr(layer, "bias", None)
        pointers = [x_read.data_ptr(), layer.weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr()]
        calls.append(functools.partial(kernel, *pointers, rows, N, K))
        tensors += [x_read, y]
    return calls_in_a_row(calls, tensors)


SQUARE = 2048  # rows and columns of the matrices of square_matmul_gflop_s


def square_matmul_gflop_s(dtype: torch.dtype, reps: int) -> float:
    """torch's own matmul of two SQUARE x SQUARE matrices in `dtype`, in GFLOP/s: the rate the machine's multiply-adds
    reach in the most favourable shape, against which a decode step's products of few rows are measured."""
    a, b = torch.randn(SQUARE, SQUARE).to(dtype), torch.randn(SQUARE, SQUARE).to(dtype)
    a @ b  # the first call, with its one-time setup, untimed
    return 2 * SQUARE**3 / median_seconds(lambda: a @ b, reps) / 1e9


def attentions(
    caches: list, q: torch.Tensor, alibi: torch.Tensor, mask: torch.Tensor, alpha: float
) -> Callable[[], None]:
    """The one-query attention of q (B, nh, 1, hd) over each layer's cache, through the kernel."""
    B, nh, _, hd = q.shape
    S = caches[0].k.shape[2]
    kernel = getattr(matvec.library(), matvec._ATTEND_DTYPES[q.dtype])
    alibi, mask = alibi.expand(B, nh, 1, S).contiguous(), mask.expand(B, 1, 1, S).contiguous()
    y = torch.empty_like(q)
    calls = [
        functools.partial(kernel, *(t.data_ptr() for t in (q, kv.k, kv.v, alibi, mask, y)), B * nh, nh, S, hd, alpha)
        for kv in caches
    ]
    return calls_in_a_row(calls, [alibi, mask, y])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="bloom-560m", help="a preset name (default bloom-560m)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="default bf16")
    parser.add_argument("--batch-size", type=int, default=16, help="rows (default 16)")
    parser.add_argument("--prompt-len", type=int, default=128, help="the longest prompt; others down to half (128)")
    parser.add_argument("--reps", type=int, default=15, help="timings per part (default 15)")
    args = parser.parse_args()

    model = random_model(args.shape, DTYPES[args.dtype])
    B, P = args.batch_size, args.prompt_len
    prompt = torch.randint(4, 250000, (B, P))
    prompt_mask = torch.ones_like(prompt)
    for row in range(1, B):  # row i: P - i·P/(2(B-1)) tokens, left-padded
        prompt_mask[row, : P // 2 * row // (B - 1)] = 0
    decoder = Decoder(model, B)
    tokens = torch.full((B,), 5)

    with torch.inference_mode(), matvec.decoding():
        decoder.prefill(prompt, prompt_mask)
        decoder.step(tokens)  # the step's plan and the kernels' first call
        if decoder.fused_step is None or not decoder.fused_step.applies():  # then the parts below are not the step's
            raise SystemExit(f"a decode step of {args.dtype}, batch {B}, does not run in bloom.matvec's block kernels "
                             "here (bloom.generation.decode_step.plan: too many rows, or portable loops): no parts "
                             "to time")  # fmt: skip
        step = median_seconds(lambda: decoder.step(tokens), args.reps)

        dtype, config = model.ln_f.weight.dtype, model.config
        nh, hd = config.n_head, config.hidden_size // config.n_head
        mask, slot = decoder.mask, decoder.slot
        alibi = alibi_bias(mask, alibi_slopes(nh), dtype)  # (B, nh, 1, S)
        additive = causal_mask(mask, slot, dtype)[:, :, :1]  # (B, 1, 1, S): the query at `slot`
        x = {width: torch.randn(B, width).to(dtype) for width in (config.hidden_size, 4 * config.hidden_size)}
        q = torch.randn(B, nh, 1, hd).to(dtype)

        kinds = {"qkv": [], "dense": [], "h_to_4h": [], "4h_to_h": []}  # each kind's layers, one per block
        for block in model.h:
            attention, mlp = block.self_attention, block.mlp
            layers = (attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
            for kind, layer in zip(kinds, layers, strict=True):
                kinds[kind].append(layer)
        parts = {kind: median_seconds(products(layers, x, dtype), args.reps) for kind, layers in kinds.items()}
        parts["attention"] = median_seconds(attentions(decoder.cache.layers, q, alibi, additive, hd**-0.5), args.reps)
        lm_head = products([model.word_embeddings], x, dtype)
        parts["LM head"] = median_seconds(lm_head, args.reps)
    bandwidth = memory_bandwidth_gb_s(torch.device("cpu"))
    # the multiply-adds the kernels do: bf16's in bf16 in the AVX-512 tiles; fp32's, fp16's and every AVX2 tile's in
    # float32 (their weights are widened first; torch's own fp16 matmul on the CPU runs at under 1 GFLOP/s, and its
    # bf16 one at ~0.3 without AVX-512 BF16: no ceiling)
    in_bf16 = dtype == torch.bfloat16 and matvec.library().tiles == "avx512"
    multiplied_in = "bf16" if in_bf16 else "fp32"  # the names of DTYPES (--dtype may be bfloat16)
    ceiling = square_matmul_gflop_s(DTYPES[multiplied_in], args.reps)

    visible = int((mask[:, : int(slot) + 1] != 0).sum())  # the slots the kernel reads, over the batch
    kv_bytes = 2 * visible * nh * hd * dtype.itemsize * config.n_layer
    flops = {kind: 2 * B * sum(layer.weight.numel() for layer in layers) for kind, layers in kinds.items()}
    flops["LM head"] = 2 * B * model.word_embeddings.weight.numel()
    print(f"{args.shape} {args.dtype}, batch {B}, {torch.get_num_threads()} threads, sum() at {bandwidth:.1f} GB/s")
    squares = f"torch's matmul of {SQUARE} x {SQUARE} squares in {multiplied_in}"
    print(f"{squares}: {ceiling:.0f} GFLOP/s (below: the products' share)")
    print(f"whole decode step: {step * 1e3:.2f} ms")
    for name, seconds in parts.items():
        if name in flops:
            gflop_s = flops[name] / seconds / 1e9
            rate = f"{gflop_s:.0f} GFLOP/s ({gflop_s / ceiling:.0%})"
        else:
            rate = f"{kv_bytes / seconds / 1e9:.1f} GB/s"
        print(f"  {name:10s} {seconds * 1e3:7.2f} ms  {seconds / step:4.0%} of the step  {rate}")
    rest = step - sum(parts.values())
    what = "Python; embedding, LayerNorms, GeLU, residual adds, cache writes"
    print(f"  {'the rest':10s} {rest * 1e3:7.2f} ms  {rest / step:4.0%} of the step  ({what})")
    gflop = sum(flops.values()) / 1e9
    products_at_squares = gflop / ceiling  # every product at the squares' rate
    step_at_squares = products_at_squares + parts["attention"] + rest
    print(
        f"the products' {gflop:.1f} GFLOP at the squares' rate: {products_at_squares * 1e3:.1f} ms; with the "
        f"attention and the rest as measured, a step of {step_at_squares * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()

"""Where an eager decode step's time goes: torch.profiler over decode steps of a random model of a preset's shape.

    python scripts/decode_profile.py                          # bloom-560m, bf16, batch 1, 128-token prompt
    python scripts/decode_profile.py --dtype fp32 --quantize int8 --threads 1

Prints the operators by their own CPU time, and the step time next to what reading the weights once at the
bandwidth of a plain sum() (measured here) would take.
"""

import argparse
import time

import torch

from bloom.checkpoints.loader import DTYPES
from bloom.command_line.bench import memory_bandwidth_gb_s, random_model
from bloom.generation.decoder import Decoder
from bloom.scale.quantize import quantize_int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="bloom-560m", help="a preset name (default bloom-560m)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="default bf16")
    parser.add_argument("--quantize", choices=["int8"], help="int8 weights (bloom.scale.quantize)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--prompt-len", type=int, default=128, help="default 128")
    parser.add_argument("--steps", type=int, default=8, help="profiled decode steps (default 8)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = random_model(args.shape, DTYPES[args.dtype])
    if args.quantize:
        quantize_int8(model)
    weight_gb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e9

    decoder = Decoder(model, 1)
    prompt = torch.randint(4, 250000, (1, args.prompt_len))
    token = torch.tensor([5])
    with torch.inference_mode():
        decoder.prefill(prompt, torch.ones_like(prompt))
        for _ in range(3):  # warm-up
            decoder.step(token)
        start = time.perf_counter()
        for _ in range(args.steps):
            decoder.step(token)
        step_s = (time.perf_counter() - start) / args.steps
        with torch.profiler.profile() as profile:
            for _ in range(args.steps):
                decoder.step(token)
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    bandwidth = memory_bandwidth_gb_s(torch.device("cpu"))
    print(f"{args.shape} {args.dtype}{' int8' if args.quantize else ''}, {torch.get_num_threads()} threads: "
          f"{step_s * 1e3:.1f} ms a step (not profiled); reading the {weight_gb:.2f} GB of weights at the "
          f"{bandwidth:.1f} GB/s of a sum() would take {weight_gb / bandwidth * 1e3:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()

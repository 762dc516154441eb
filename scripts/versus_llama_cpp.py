"""Decode and prefill beside llama.cpp's: `bloom bench`'s workers and llama.cpp's own llama-bench, alternated in fresh
processes on the same checkpoint.

llama.cpp is the program a CPU user would pick instead of this one. Convert the checkpoint with its
convert_hf_to_gguf.py (bf16 and q8_0: q8_0 rounds the activations to 8 bits in blocks of 32 and multiplies integers;
our int8 keeps them, or on AVX2 rounds only each row's values below 2^-8 of its largest), build its tools, then:

    python scripts/versus_llama_cpp.py --model CHECKPOINT --llama-bench llama.cpp/build/bin/llama-bench \\
        --gguf bf16=bloom-560m-bf16.gguf q8_0=bloom-560m-q8_0.gguf

A published checkpoint converts as it is. A random one of `bloom bench --shape` has neither a tokenizer nor
"architectures" in its config.json, which the converter needs: give a copy of it a tokenizer.json (any; the converter
pads the vocabulary to the model's) and "architectures": ["BloomForCausalLM"], and where the converter does not know
the tokenizer's pre-tokenizer, tell it BLOOM's ("bloom").

Each run starts ours in --dtype (bf16 by default), ours with int8 weights, then llama-bench on each GGUF, with as
many threads as torch uses. Ours: a `--prompt-len`-token prompt, then `--new-tokens` greedy tokens (as `bloom bench`,
batch 1); llama.cpp: pp (a prompt of that many tokens, from an empty context) and tg (that many new tokens after a
context of the prompt's length: `-d`), each `--reps` times after its warm-up. Prints the medians over the runs, the
decode's bytes of weights per second against a sum() over 0.5 GB measured by each process (llama-bench: by this
one, just before and after it), and the ratios ours / llama.cpp.
"""

import argparse
import json
import shutil
import statistics
import subprocess
from pathlib import Path

import torch

from bloom.command_line.bench import Bandwidth, run_worker


def llama_bench(binary: str, gguf: str, args: argparse.Namespace, **test: int) -> dict:
    """One llama-bench process on one test (n_prompt, n_gen, n_depth), its result as JSON."""
    command = [binary, "-m", gguf, "-t", str(torch.get_num_threads()), "-r", str(args.reps), "-o", "jsonl",
               "-p", str(test["n_prompt"]), "-n", str(test["n_gen"]), "-d", str(test["n_depth"])]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return next(r for r in results if all(r[key] == value for key, value in test.items()))


def llama_run(binary: str, gguf: str, args: argparse.Namespace, bandwidth: Bandwidth) -> dict:
    """Prefill and decode of one GGUF in bench's terms, with the bandwidth measured around its decode."""
    prefill = llama_bench(binary, gguf, args, n_prompt=args.prompt_len, n_gen=0, n_depth=0)
    before = bandwidth.measure()
    decode = llama_bench(binary, gguf, args, n_prompt=0, n_gen=args.new_tokens, n_depth=args.prompt_len)
    gb_s = (before + bandwidth.measure()) / 2
    weight_gb = decode["model_size"] / 1e9
    return {"prefill_ms": args.prompt_len / prefill["avg_ts"] * 1e3, "decode_tok_s": decode["avg_ts"],
            "weight_gb": weight_gb, "bandwidth_gb_s": gb_s, "bandwidth_used": decode["avg_ts"] * weight_gb / gb_s,
            "decode_tok_s_reps": decode["samples_ts"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the checkpoint folder the GGUF files were made from")
    parser.add_argument("--llama-bench", required=True, help="llama.cpp's llama-bench binary")
    parser.add_argument("--gguf", nargs="+", required=True, metavar="NAME=FILE", help="GGUF files, named")
    parser.add_argument("--dtype", default="bf16", help="ours: the dtype to load the checkpoint in (default bf16)")
    parser.add_argument("--prompt-len", type=int, default=128, help="default 128")
    parser.add_argument("--new-tokens", type=int, default=128, help="default 128")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per process (default 3)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per implementation (default 3)")
    args = parser.parse_args()
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: no such folder")
    if shutil.which(args.llama_bench) is None:
        parser.error(f"--llama-bench {args.llama_bench}: no such program")
    if any("=" not in pair for pair in args.gguf):
        parser.error(f"--gguf {' '.join(args.gguf)}: each a NAME=FILE pair")
    ggufs = dict(pair.split("=", 1) for pair in args.gguf)
    for name, path in ggufs.items():
        if not Path(path).is_file():
            parser.error(f"--gguf {name}={path}: no such file")
    ours = argparse.Namespace(model=args.model, dtype=args.dtype, device="cpu", batch_size=1, compile=False,
                              prompt_len=args.prompt_len, new_tokens=args.new_tokens, reps=args.reps)  # fmt: skip
    bandwidth = Bandwidth.fresh(torch.device("cpu"))
    results: dict[str, list[dict]] = {}
    for run in range(args.runs):
        for impl in ("ours", "ours-int8", *ggufs):  # alternated, so that drifts of the machine hit all alike
            print(f"run {run + 1}/{args.runs}: {impl}", flush=True)
            if impl in ggufs:
                result = llama_run(args.llama_bench, ggufs[impl], args, bandwidth)
            else:
                result = run_worker(impl, ours)
            results.setdefault(impl if impl.startswith("ours") else f"llama.cpp {impl}", []).append(result)

    columns = [("prefill ms", "prefill_ms", ".1f"), ("decode tok/s", "decode_tok_s", ".1f"),
               ("weights GB", "weight_gb", ".3f"), ("memory GB/s", "bandwidth_gb_s", ".1f"),
               ("of memory GB/s", "bandwidth_used", ".0%")]  # fmt: skip
    medians = {impl: {key: statistics.median(r[key] for r in runs) for _, key, _ in columns}
               for impl, runs in results.items()}  # fmt: skip
    print(f"\n{torch.get_num_threads()} threads, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.runs} process(es) x {args.reps} rep(s) | {args.model}\n")  # fmt: skip
    print("| | " + " | ".join(title for title, _, _ in columns) + " | decode tok/s, every rep |")
    print("|---|" + "---:|" * len(columns) + "---|")
    for impl, m in medians.items():
        reps = ", ".join(f"{s:.1f}" for r in results[impl] for s in r["decode_tok_s_reps"])
        print(f"| {impl} | " + " | ".join(f"{m[key]:{fmt}}" for _, key, fmt in columns) + f" | {reps} |")
    for impl in ("ours", "ours-int8"):
        for peer in (p for p in medians if p.startswith("llama.cpp")):
            decode = medians[impl]["decode_tok_s"] / medians[peer]["decode_tok_s"]
            prefill = medians[peer]["prefill_ms"] / medians[impl]["prefill_ms"]
            print(f"{impl} / {peer}: decode {decode:.2f}x, prefill {prefill:.2f}x as fast")


if __name__ == "__main__":
    main()

"""`bloom bench`: load time, memory, prefill and decode speed, ours and transformers' side by side.

Each measurement runs in a fresh process (`python -m bloom.command_line.bench --worker ...`), alternating the two
implementations, so neither inherits the other's memory or caches; the checkpoint's files are read once before
each (when they fit in half the free memory), so that every load finds them in the OS's page cache. Speed does
not depend on the weights' values, so `--shape bloom-560m` builds a random checkpoint of that shape in the
published layout.
Without transformers installed, only ours is measured.
"""

import argparse
import importlib.util
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from bloom import matvec
from bloom.checkpoints.loader import DTYPES, load_pretrained, weight_files
from bloom.command_line.arguments import (
    DTYPE_CHOICES,
    USER_ERRORS,
    CommandParser,
    checkpoint,
    device,
    fail,
    int_at_least,
    positive_int,
)
from bloom.config import PRESETS, BloomConfig
from bloom.generation.decoder import Decoder
from bloom.generation.generate import generate
from bloom.heap import keep_freed_memory
from bloom.memory import available_memory
from bloom.model import Bloom

IMPLEMENTATIONS = ("ours", "ours-int8", "transformers")
PROG = "bloom bench"
SPREAD_WARNING = 0.10  # (max - min) / median of the repeated decode speeds beyond which the table warns


def rss_gb() -> float:
    """Current resident memory of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e9


def memory_bandwidth_gb_s(device: torch.device, gigabytes: float = 0.5, reps: int = 5) -> float:
    """The bytes per second this process reads from memory: a plain sum() over a tensor far larger than the
    caches, the best of `reps` (a decode step at full speed reads its weights as fast)."""
    return Bandwidth.fresh(device, gigabytes).measure(reps)


class Bandwidth:
    """The bytes per second a plain sum() reads from the memory of some tensors (their bytes seen as float32, so that
    every dtype sums alike), measured again whenever asked: on a shared machine it moves (36-83 GB/s here, from one
    second to the next), so a decode speed is compared with the bandwidth measured just before and after its timed
    generation. On a virtual machine it also depends on which of the host's pages the memory sits in: two tensors
    of 0.5 GB in one process read at 40 and 57 GB/s, so a decode is also compared with a sum over its own weights."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.views = [view for view in map(float32_view, tensors) if view.numel()]
        self.bytes = sum(view.numel() * 4 for view in self.views)
        device = self.views[0].device
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    @classmethod
    def fresh(cls, device: torch.device, gigabytes: float = 0.5) -> "Bandwidth":
        """Over a new float32 tensor of `gigabytes`, far larger than the caches."""
        x = torch.ones(int(gigabytes * 1e9) // 4, device=device)
        x.sum()  # touches every page once
        return cls([x])

    @classmethod
    def of_weights(cls, weights: list[torch.Tensor]) -> "Bandwidth":
        """Over the largest of a model's weights, which hold 99% of their bytes (not the LayerNorms and biases,
        whose sums would time the calls more than the memory)."""
        weights = sorted(weights, key=lambda w: w.numel() * w.element_size(), reverse=True)
        total, taken, held = sum(w.numel() * w.element_size() for w in weights), [], 0
        for weight in weights:
            if held >= 0.99 * total:
                break
            taken.append(weight)
            held += weight.numel() * weight.element_size()
        return cls(taken)

    def measure(self, reps: int = 5) -> float:
        """GB/s read by the fastest of `reps` passes over the tensors."""
        best = float("inf")
        for _ in range(reps):
            self.sync()
            start = time.perf_counter()
            for view in self.views:
                view.sum()
            self.sync()
            best = min(best, time.perf_counter() - start)
        return self.bytes / 1e9 / best


def float32_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, without a copy, as float32 (the whole 4-byte words that fall inside it)."""
    data = tensor.detach().view(-1).view(torch.uint8)
    start = -data.storage_offset() % 4
    return data[start : start + (data.numel() - start) // 4 * 4].view(torch.float32)


class TokenClock:
    """When each new token of one generation was chosen. Ours calls it with each step's tokens (B,);
    transformers' generate calls `put`, first with the prompt, which is no new token, then with each step's
    tokens, and `end`. On CUDA each token waits for the device (a host sync, as transformers' streaming does)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync, self.times, self.prompt_seen = sync, [], False

    def __call__(self, tokens: torch.Tensor) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self(value)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def measure(
    load: Callable[[], torch.nn.Module],
    run: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int, TokenClock | None], torch.Tensor],
    args: argparse.Namespace,
) -> dict:
    """Time `load()`, then generations of `new_tokens` with `run(model, ids, mask, n, clock)`, which hands each
    step's tokens to the clock: the prefill is the time to the first token, the decode the time from the first
    to the last. (A decode timed as a whole generation less a separate prefill's time gave 305 to 5651 tok/s in
    one run at batch 16, whose prefill takes longer than its decode.)

    A batch holds prompts of different lengths, from `prompt_len` tokens down to half of it, left-padded.

    Memory is the peak added by loading and a first short generation: GPU memory allocated on CUDA, resident
    memory (RSS) on the CPU.
    """
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    before = rss_gb()
    start = time.perf_counter()
    model = load()
    sync()
    load_s = time.perf_counter() - start
    weights = [*model.parameters(), *model.buffers()]  # int8 weights are buffers
    weight_gb = sum(w.numel() * w.element_size() for w in weights) / 1e9

    ids = torch.randint(4, 250680, (args.batch_size, args.prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.remainder(model.config.vocab_size).to(device)
    mask = torch.ones_like(ids)
    for row in range(1, args.batch_size):  # the first row is the longest prompt, the last half as long
        mask[row, : args.prompt_len // 2 * row // (args.batch_size - 1)] = 0
    ids = ids.masked_fill(mask == 0, 3)  # the checkpoints' pad id
    start = time.perf_counter()
    run(model, ids, mask, 2, None)  # warm-up (compiles, when asked); it reads every weight, which mmap defers
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        memory_gb = torch.cuda.max_memory_allocated(device) / 1e9
    else:  # the process's peak RSS (kilobytes on Linux) less what it held before loading
        memory_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9 - before
    bandwidth = Bandwidth.fresh(device)  # after the peak memory is taken: its 0.5 GB are not the model's
    weights_bandwidth = Bandwidth.of_weights(weights)
    prefill, steps_per_s = [], []
    bandwidths, weights_bandwidths = [bandwidth.measure()], [weights_bandwidth.measure()]
    for _ in range(args.reps):
        clock = TokenClock(sync)
        sync()
        start = time.perf_counter()
        tokens = run(model, ids, mask, args.new_tokens, clock)
        if len(clock.times) != args.new_tokens:
            raise RuntimeError(f"the clock saw {len(clock.times)} new tokens of a generation of {args.new_tokens}")
        prefill.append(clock.times[0] - start)
        steps_per_s.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
        bandwidths.append(bandwidth.measure())
        weights_bandwidths.append(weights_bandwidth.measure())
    around = [(first + second) / 2 for first, second in itertools.pairwise(bandwidths)]  # each rep's bandwidth
    weights_around = [(first + second) / 2 for first, second in itertools.pairwise(weights_bandwidths)]
    decode_gb_s = [s * weight_gb for s in steps_per_s]  # every step reads every weight once
    return {
        "load_s": load_s,
        "warmup_s": warmup_s,
        "memory_gb": memory_gb,
        "weight_gb": weight_gb,
        "prefill_ms": statistics.median(prefill) * 1e3,
        "decode_tok_s": statistics.median(steps_per_s) * args.batch_size,
        "decode_gb_s": statistics.median(decode_gb_s),
        "bandwidth_gb_s": statistics.median(around),
        "bandwidth_used": statistics.median(d / gb_s for d, gb_s in zip(decode_gb_s, around, strict=True)),
        "weights_bandwidth_gb_s": statistics.median(weights_around),
        "weights_bandwidth_used": statistics.median(
            d / gb_s for d, gb_s in zip(decode_gb_s, weights_around, strict=True)
        ),
        "decode_tok_s_reps": [s * args.batch_size for s in steps_per_s],
        "tokens": tokens[:, args.prompt_len :].tolist(),
    }


def ours_worker(args: argparse.Namespace) -> dict:
    decoders: dict[Bloom, Decoder] = {}

    def run(model: Bloom, ids: torch.Tensor, mask: torch.Tensor, n: int, clock: TokenClock | None) -> torch.Tensor:
        if model not in decoders:  # one decoder (and compiled step) for all the runs
            decoders[model] = Decoder(model, args.batch_size, args.prompt_len + args.new_tokens, compile=args.compile)
        return generate(model, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], streamer=clock,
                        decoder=decoders[model])  # fmt: skip

    quantize = "int8" if args.worker == "ours-int8" else None
    return measure(lambda: load_pretrained(args.model, dtype=args.dtype, device=args.device, quantize=quantize),
                   run, args)  # fmt: skip


def random_model(name: str, dtype: torch.dtype) -> Bloom:
    """A model of preset `name` on the CPU with random weights (N(0, 0.02); LayerNorms at 1 and 0), in eval mode, and
    the C heap set as load_pretrained sets it (bloom.heap)."""
    with torch.device("meta"):
        model = Bloom(BloomConfig.from_name(name)).to(dtype)
    model = model.to_empty(device="cpu").eval()  # the weights' bytes once, in their dtype (bloom-7b1: 14 GB in bf16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "layernorm" in pname or pname.startswith("ln_f"):
                param.fill_(1.0 if pname.endswith("weight") else 0.0)
            else:
                param.normal_(0, 0.02, generator=generator)
    keep_freed_memory()
    return model


def build_random_checkpoint(name: str, dtype: torch.dtype, folder: Path) -> Path:
    """A checkpoint of preset `name` with random weights, in the bigscience layout (reused if present: config.json
    is written last, so a run interrupted while writing the weights builds it again)."""
    if (folder / "config.json").is_file():
        return folder
    config = BloomConfig.from_name(name)
    model = random_model(name, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    config_json = {"model_type": "bloom", "n_embed": config.hidden_size, "n_layer": config.n_layer,
                   "num_attention_heads": config.n_head, "vocab_size": config.vocab_size, "pad_token_id": 3,
                   "torch_dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    return folder


def read_into_page_cache(folder: Path) -> int:
    """Read the weight files of a checkpoint folder once (through the hub cache's symlinks too), so that the next
    load finds them in the OS's page cache; returns the bytes read. Without it the first worker after another
    checkpoint's runs loads from the disk and the next from memory, and their load times compare the two. Files
    larger than half the available memory would not stay cached: they are not read (0), and each load is timed
    from wherever they are."""
    paths = weight_files(folder, allow_pickle=True)  # those loading reads
    available = available_memory(torch.device("cpu"))
    if available is not None and sum(path.stat().st_size for path in paths) > available // 2:
        return 0
    total, buffer = 0, bytearray(64 << 20)
    for path in paths:
        with open(path, "rb") as file:
            while n := file.readinto(buffer):
                total += n
    return total


def run_worker(impl: str, args: argparse.Namespace) -> dict:
    # -P: the current folder is not put first on the worker's sys.path, where a folder named bloom (the clone's)
    # would stand for this package
    command = [sys.executable, "-P", "-m", "bloom.command_line.bench", "--worker", impl, "--model", str(args.model),
               "--dtype", args.dtype, "--device", args.device, "--batch-size", str(args.batch_size),
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--reps", str(args.reps),
               "--compile" if args.compile else "--no-compile"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:  # its traceback's last line says what failed; the command shows the rest
        last_line = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        last_line = last_line.removeprefix(f"{PROG}: error: ")
        raise ChildProcessError(f"the {impl} worker failed: {last_line} (rerun it alone: {' '.join(command)})")
    return json.loads(result.stdout.strip().splitlines()[-1])


KERNELS = {"avx512": "AVX-512", "avx2": "AVX2"}  # bloom.matvec's tiles, as the bench names them


def cpu_description(compiled: bool) -> str:
    """The CPU's threads, and which of bloom.matvec's kernels ours decodes with there (a compiled step: none)."""
    library = None if compiled else matvec.library()
    if library is None:
        kernels = "no decode kernels"
    elif library.tiles != "portable":
        kernels = f"{KERNELS[library.tiles]} decode kernels"
    else:  # bloom.matvec.max_rows
        kernels = "portable decode kernels, torch's products"
    return f"CPU ({torch.get_num_threads()} threads, {kernels})"


def table(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    columns = [("load s", "load_s", ".2f"), ("warm-up s", "warmup_s", ".1f"), ("peak mem GB", "memory_gb", ".2f"),
               ("prefill ms", "prefill_ms", ".1f"), ("decode tok/s", "decode_tok_s", ".1f"),
               ("decode GB/s", "decode_gb_s", ".1f"), ("memory GB/s", "bandwidth_gb_s", ".1f"),
               ("of memory GB/s", "bandwidth_used", ".0%"), ("weights' GB/s", "weights_bandwidth_gb_s", ".1f"),
               ("of weights' GB/s", "weights_bandwidth_used", ".0%")]  # fmt: skip
    medians = {
        impl: {key: statistics.median(r[key] for r in runs) for _, key, _ in columns} for impl, runs in results.items()
    }
    device = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_description(args.compile)
    )
    dtype = args.dtype + (f" (stored {args.stored_dtype})" if args.stored_dtype else "")
    prompts = f"prompt {args.prompt_len}"
    if args.batch_size > 1:
        prompts = f"prompts of {args.prompt_len - args.prompt_len // 2}-{args.prompt_len} tokens, left-padded"
    lines = [
        f"{device} | torch {torch.__version__} | {dtype} | batch {args.batch_size} | {prompts} | "
        f"{args.new_tokens} new tokens | ours {'compiled' if args.compile else 'eager'} | "
        f"median of {args.runs} process(es) x {args.reps} rep(s) | {args.model}",
        "",
        "| | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for impl, m in medians.items():
        lines.append(f"| {impl} | " + " | ".join(f"{m[key]:{fmt}}" for _, key, fmt in columns) + " |")
    for numerator, denominator in (("ours", "transformers"), ("ours-int8", "ours")):
        if numerator in medians and denominator in medians:
            top, bottom = medians[numerator], medians[denominator]
            ratios = " | ".join(f"{top[key] / bottom[key]:.2f}x" for _, key, _ in columns)
            lines.append(f"| {numerator} / {denominator} | {ratios} |")
    lines += ["", "prefill ms: to a generation's first new token; decode tok/s: from its first new token to the last; "
              "decode GB/s: the weights' bytes x decode steps per second; memory GB/s: a sum() over 0.5 GB "
              "in the same process just before and after each timed generation (the machine's bandwidth then); "
              "of memory GB/s: the median over the decodes of their share of it; weights' GB/s and its share: the "
              "same sum() over the memory the model's weights sit in (their bytes as float32), which on a virtual "
              "machine can read slower or faster than a new tensor's"]  # fmt: skip
    lines += spread_warnings(results)
    if "transformers" in results:
        same = all(r["tokens"] == results["ours"][0]["tokens"] for r in results["transformers"])
        lines += ["", f"generated tokens identical (ours, transformers): {'yes' if same else 'no'}"]
    return "\n".join(lines)


def spread_warnings(results: dict[str, list[dict]]) -> list[str]:
    """A line for each implementation whose repeated decode speeds (every rep of every process) spread too far."""
    warnings = []
    for impl, runs in results.items():
        speeds = [speed for r in runs for speed in r["decode_tok_s_reps"]]
        spread = (max(speeds) - min(speeds)) / statistics.median(speeds)
        if len(speeds) > 1 and spread > SPREAD_WARNING:
            warnings.append(
                f"warning: {impl}'s {len(speeds)} decode speeds spread {spread:.0%} of their median "
                f"({min(speeds):.1f}-{max(speeds):.1f} tok/s): too wide to trust; use more --runs and --reps, "
                "or a quieter machine"
            )
    return warnings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        return run(parser, parser.parse_args(argv))
    except USER_ERRORS as error:  # a worker's last line is then `bloom bench: error: ...`
        fail(parser, error)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Build the checkpoint if asked, measure each implementation in fresh processes, print the table."""
    if getattr(args, "worker", None):
        worker = _transformers_worker() if args.worker == "transformers" else ours_worker
        print(json.dumps(worker(args)))
        return 0
    if (args.model is None) == (args.shape is None):
        parser.error("give exactly one of --model and --shape")
    if args.model is None:
        if args.build_dir is not None and Path(args.build_dir).exists() and not Path(args.build_dir).is_dir():
            parser.error(f"--build-dir {args.build_dir}: a file, not a folder")
        stored = args.stored_dtype or args.dtype
        folder = Path(args.build_dir or tempfile.gettempdir()) / f"bloom-bench-{args.shape}-{stored}"
        print(f"building a random {args.shape} checkpoint in {folder} ...", file=sys.stderr)
        args.model = build_random_checkpoint(args.shape, DTYPES[stored], folder)
    elif args.stored_dtype or args.build_dir:
        flag = "--stored-dtype" if args.stored_dtype else "--build-dir"
        parser.error(f"{flag} is for a --shape checkpoint; a --model is read where it is, in its own dtype")
    implementations = ["ours", "ours-int8"] if args.quantize else ["ours"]
    if importlib.util.find_spec("transformers") is not None:
        implementations.append("transformers")
    else:
        print("transformers is not installed: measuring ours only", file=sys.stderr)
    results: dict[str, list[dict]] = {impl: [] for impl in implementations}
    for i in range(args.runs):
        for impl in implementations:  # alternate, so that drifts of the machine hit both alike
            print(f"run {i + 1}/{args.runs}: {impl}", file=sys.stderr)
            if Path(args.model).is_dir():  # each load from the page cache (a hub id's files: wherever they are)
                read_into_page_cache(Path(args.model))
            results[impl].append(run_worker(impl, args))
    print(table(results, args))
    return 0


def _transformers_worker() -> Callable[[argparse.Namespace], dict]:
    import bloom_reference  # imports transformers, which the bloom package itself never does

    return bloom_reference.bench_worker


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    return parser


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=checkpoint, help="checkpoint folder or hub repo id")
    parser.add_argument("--shape", choices=PRESETS, metavar="PRESET", help="instead of --model: a preset name "
                        "(bloom-560m, bloom-7b1, ...) to build with random weights")  # fmt: skip
    parser.add_argument("--build-dir", help="where --shape checkpoints are built and kept (default: the temp dir)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help="default bf16")
    parser.add_argument("--stored-dtype", choices=DTYPE_CHOICES, help="the dtype the --shape checkpoint "
                        "is stored in, which both load into --dtype (default: --dtype)")  # fmt: skip
    parser.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="prompts of different lengths, from "
                        "--prompt-len tokens down to half of it, left-padded (default 1)")  # fmt: skip
    parser.add_argument("--prompt-len", type=positive_int, default=128, help="tokens of the (longest) prompt "
                        "(default 128)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int_at_least(2), default=128, help="2 or more (default 128)")
    parser.add_argument("--reps", type=positive_int, default=2, help="timed repetitions per process (default 2)")
    parser.add_argument("--runs", type=positive_int, default=2, help="fresh processes per implementation (default 2)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="ours decodes with a compiled step (bloom.Decoder); default: eager")  # fmt: skip
    parser.add_argument("--quantize", choices=["int8"], help="also measure ours with int8 weights (ours-int8), "
                        "beside ours in the checkpoint's dtype")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

"""The `bloom` command line: generate, perplexity, activations, inspect, parity, bench, download, evaluate."""

import argparse
import importlib.metadata
import importlib.util
import inspect
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import constants as hub_constants

import bloom.command_line.bench
import bloom.research.activations
from bloom.checkpoints.hub import OFFLINE, resolve_folder
from bloom.checkpoints.loader import (
    DTYPES,
    checkpoint_patterns,
    is_complete,
    load_config,
    load_pretrained,
    weight_files,
)
from bloom.checkpoints.tokenizer import CONFIG_FILES, TOKENIZER_FILE, BloomTokenizer, load_tokenizer
from bloom.command_line.arguments import (
    DTYPE_CHOICES,
    USER_ERRORS,
    CommandParser,
    check_prompts,
    checkpoint,
    device,
    fail,
    int_at_least,
    non_negative_int,
    output_file,
    output_folder,
    positive_int,
    read_text,
    seed,
)
from bloom.config import write_whole
from bloom.generation.decoder import Decoder
from bloom.generation.generate import check_sampling, generate, resolve_eos_ids
from bloom.generation.streaming import TextStream
from bloom.memory import check_attention_fits
from bloom.model import Bloom
from bloom.research import page, viz
from bloom.research.lens import logit_lens
from bloom.research.perplexity import perplexity
from bloom.research.probe import record
from bloom.scale.parallel import join_process_group, shared_seed

MAX_NEW_TOKENS = 64
CONTEXT, BATCH_SIZE = 1024, 4
PARITY_NEW_TOKENS = 20
PAGE_LIMIT_MB = 200  # an inspect.html past this would hardly open in a browser tab: refused before any work
INSPECT_TOP_K = 5  # the logit lens guesses the page shows on hover
# Largest difference allowed at any layer, relative to that tensor's scale: max |ours - theirs| / max |theirs|.
# fp32: both follow the same operations (measured: bit-identical on CPU). Half precision: a few roundings may
# land differently (unit roundoff: fp16 4.9e-4, bf16 3.9e-3).
PARITY_TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
PARITY_DESCRIPTION = """\
Run our BLOOM and transformers' BLOOM on the same checkpoint and prompts (left-padded batch) and print, for
the embedding LayerNorm, each block's output, ln_f and the logits, the largest absolute difference and the
largest difference relative to the reference tensor's scale (max |ours - theirs| / max |theirs|), at real
tokens; then the first new token where the two greedy generations differ (not compared when a tensor holds
NaN or inf).

Exit status 1, naming the first tensor at fault, when a relative difference exceeds the dtype's tolerance or a
tensor holds NaN or inf on either side (the greedy tokens alone do not fail: near-ties can flip them):
""" + ", ".join(f"{str(dtype).removeprefix('torch.')} {tol:g}" for dtype, tol in PARITY_TOLERANCES.items())
DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(generate).parameters.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command_parser  # the subcommand's own parser: its usage, its flags
    try:
        return args.run(command, args)
    except BrokenPipeError:  # the reader of stdout went away (`bloom generate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 1
    except USER_ERRORS as error:  # what the user typed or pointed at; any other exception is a bug
        fail(command, error)
    except KeyboardInterrupt:
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="bloom", description="BLOOM language models in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"bloom {importlib.metadata.version('bloom-pytorch')}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    gen = commands.add_parser(
        "generate",
        help="continue prompts, streaming the text to stdout",
        description="Continue one prompt (streamed to stdout) or several (one left-padded batch, printed when "
        "done, each row under a line '--- i/N ---'). Greedy unless --do-sample. The last line on stderr gives load "
        "time, token counts and tokens/s.",
    )
    add_model_arguments(gen)
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    prompts.add_argument("--prompt-file", type=Path, help="a file with one prompt per line (blank lines are skipped)")
    gen.add_argument(
        "--max-new-tokens", type=non_negative_int, default=MAX_NEW_TOKENS, help=f"default {MAX_NEW_TOKENS}"
    )
    # Sampling options default to None, meaning "generate()'s own default": defaults live in one place.
    gen.add_argument("--do-sample", action="store_true", help="sample instead of taking the most likely token")
    gen.add_argument(
        "--temperature", type=float, help=f"divide the logits by this (sampling; default {DEFAULTS['temperature']})"
    )
    gen.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default: all)")
    gen.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this much probability")
    gen.add_argument(
        "--repetition-penalty",
        type=float,
        help=f"> 1 discourages repeating tokens (default {DEFAULTS['repetition_penalty']})",
    )
    gen.add_argument("--tp", type=positive_int, default=1, help="split the model over this many processes, launched "
                         "with torchrun --nproc-per-node TP (default 1)")  # fmt: skip
    gen.add_argument("--seed", type=seed, help="make sampling reproducible (0 to 2**64 - 1)")
    gen.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                     help="decode with a step compiled by torch.compile: a slow first token, and on the CPU a copy "
                          "of the weights (default: eager, with bloom.matvec's CPU kernels)")  # fmt: skip
    gen.set_defaults(run=run_generate)

    ppl = commands.add_parser(
        "perplexity",
        help="perplexity of a text file, with sliding windows",
        description="Perplexity of a UTF-8 text file: windows of --context tokens every --stride tokens, each "
        "token scored once with the context before it (transformers' fixed-length-model procedure).",
    )
    add_model_arguments(ppl)
    ppl.add_argument("--file", type=Path, required=True, help="the text to score")
    ppl.add_argument("--context", type=int_at_least(2), default=CONTEXT, help=f"tokens per window (default {CONTEXT})")
    ppl.add_argument(
        "--stride", type=int, help=f"tokens between window starts (default: half of --context, so {CONTEXT // 2})"
    )
    ppl.add_argument(
        "--batch-size", type=positive_int, default=BATCH_SIZE, help=f"windows per forward (default {BATCH_SIZE})"
    )
    ppl.set_defaults(run=run_perplexity)

    inspect_ = commands.add_parser(
        "inspect",
        help="draw attention maps, ALiBi biases and a logit-lens grid for a prompt (needs matplotlib)",
        description="Write, for one prompt, into --out: attention_layerNN.png (every head of layer NN), alibi.png "
        "(each head's ALiBi bias), logit_lens.png (each layer's top next-token guess), and inspect.html, one "
        "self-contained page where you pick a layer and a head and hover for exact values; print their paths. "
        "Layers and heads are numbered from 0.",
    )
    add_model_arguments(inspect_)
    inspect_.add_argument("--prompt", required=True)
    inspect_.add_argument("--out", type=Path, required=True, help="folder for the pictures (created if needed)")
    inspect_.set_defaults(run=run_inspect)

    acts = commands.add_parser(
        "activations",
        help="write the activations of a long text at named points, for probes and sparse autoencoders",
        description="Cut a UTF-8 text into consecutive windows of --context tokens (the last one shorter), run "
        "them --batch-size at a time, and write every token's row at each --points name (bloom.research.probe names, "
        "wildcards allowed: h.11, h.*.mlp.act, h.3.self_attention.context) into --out: one safetensors file per "
        "point (rows in the model's --dtype), the token ids, and index.json. Streams to disk; run the same "
        "command again to resume an interrupted export. Read it back with "
        "bloom.research.activations.load(folder, point).",
    )
    add_model_arguments(acts)
    acts.add_argument("--file", type=Path, required=True, help="the text")
    acts.add_argument("--points", nargs="+", action="extend", required=True, metavar="P",
                      help="points to record, e.g. h.11 h.*.mlp.act (given twice: all of them)")  # fmt: skip
    acts.add_argument("--context", type=positive_int, default=CONTEXT, help=f"tokens per window (default {CONTEXT})")
    acts.add_argument("--out", type=Path, required=True, help="folder for the export (new, empty, or one to resume)")
    acts.add_argument(
        "--batch-size", type=positive_int, default=BATCH_SIZE, help=f"windows per forward (default {BATCH_SIZE})"
    )
    acts.add_argument("--max-tokens", type=positive_int, help="export only the text's first K tokens")
    acts.set_defaults(run=run_activations)

    parity = commands.add_parser(
        "parity",
        help="compare with transformers' BLOOM, layer by layer (needs transformers)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=PARITY_DESCRIPTION,
    )
    add_model_arguments(parity, quantize=False)  # int8 is no reimplementation of transformers' numbers
    parity.add_argument("--reference", type=checkpoint, help="the checkpoint transformers loads (default: --model)")
    parity.add_argument("--prompt", action="append", help="a prompt; repeat for several (default: three built in)")
    parity.add_argument(
        "--max-new-tokens", type=positive_int, default=PARITY_NEW_TOKENS, help=f"default {PARITY_NEW_TOKENS}"
    )
    parity.set_defaults(run=run_parity)

    bench = commands.add_parser(
        "bench",
        help="measure load time, memory, prefill and decode speed against transformers",
        description=bloom.command_line.bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bloom.command_line.bench.add_bench_arguments(bench)
    bench.set_defaults(run=bloom.command_line.bench.run)

    evaluate = commands.add_parser(
        "evaluate",
        help="score the model on lm-evaluation-harness tasks (needs lm-eval)",
        description="Run EleutherAI's lm-evaluation-harness on the model (bloom.research.evaluation.BloomLM) and print "
        "its results table. Task names are the harness's (lambada_openai, hellaswag, piqa, ...) or those of "
        "task YAML files in --include-path. Install the harness with: pip install -e '.[eval]'",
    )
    add_model_arguments(evaluate)
    evaluate.add_argument("--tasks", required=True, help="comma-separated task names, e.g. lambada_openai,piqa")
    evaluate.add_argument(
        "--num-fewshot", type=non_negative_int, help="examples in each prompt (default: each task's own)"
    )
    evaluate.add_argument(
        "--limit",
        type=float,
        help="score only the first N documents of each task, or this fraction of them if below 1 (for testing)",
    )
    evaluate.add_argument("--batch-size", type=positive_int, default=1, help="requests per forward (default 1)")
    evaluate.add_argument("--include-path", type=Path, help="a folder of extra task YAML files")
    evaluate.add_argument("--output", type=Path, help="also write the harness's results to this JSON file")
    evaluate.set_defaults(run=run_evaluate)

    download = commands.add_parser(
        "download", help="fetch a hub checkpoint into the local cache", description="Fetch config.json, the "
        "safetensors weights and the tokenizer files of a hub repo (nothing else) into the huggingface cache."
    )  # fmt: skip
    download.add_argument("repo_id", help="e.g. bigscience/bloomz-560m")
    download.add_argument("--revision", help="branch, tag or commit")
    download.set_defaults(run=run_download)
    return parser


def add_model_arguments(command: argparse.ArgumentParser, *, quantize: bool = True) -> None:
    """--model, --revision, --dtype, --device; and --quantize unless the command compares exact numbers."""
    command.add_argument("--model", type=checkpoint, required=True,
                         help="checkpoint folder or hub repo id, e.g. bigscience/bloomz-560m")  # fmt: skip
    command.add_argument("--revision", help="branch, tag or commit of a hub repo")
    command.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: the checkpoint's stored dtype")
    command.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    if quantize:
        command.add_argument(
            "--quantize",
            choices=["int8"],
            help="int8 weights for the embedding (also the LM head) and the blocks' linear layers",
        )


def load(args: argparse.Namespace, tokenizer: BloomTokenizer | None = None) -> tuple[Bloom, BloomTokenizer, float]:
    """The model and tokenizer the arguments name (the tokenizer unless given), and the seconds it took.

    The tokenizer comes first: it is small, and a checkpoint without one fails before its weights are read.
    """
    tp = getattr(args, "tp", 1)  # only `generate` takes --tp
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's processes
    if tp > 1:
        args.device = join_process_group(tp, args.device)
    elif launched > 1:  # each process would run the whole model and print everything
        if hasattr(args, "tp"):
            raise ValueError(f"torchrun launched {launched} processes without --tp: pass --tp {launched}")
        raise ValueError(f"torchrun launched {launched} processes, but this command runs in one")
    start = time.perf_counter()
    tokenizer = tokenizer or model_tokenizer(args)
    tokenizer.check_fits(load_config(args.model, revision=args.revision).vocab_size)  # before the weights
    dtype = args.dtype and DTYPES[args.dtype]
    model = load_pretrained(
        args.model, dtype=dtype, device=args.device, revision=args.revision, progress=is_main(),
        quantize=args.quantize, tensor_parallel=tp > 1,
    )  # fmt: skip
    return model, tokenizer, time.perf_counter() - start


def model_tokenizer(args: argparse.Namespace) -> BloomTokenizer:
    """The tokenizer of --model (a folder or a repo id: load_tokenizer's single-file form is not one of them)."""
    if Path(args.model).is_file():
        raise NotADirectoryError(f"--model {args.model}: expected a checkpoint folder or a hub repo id, found a file")
    return load_tokenizer(args.model, revision=args.revision)


def run_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    prompts = check_prompts(args.prompt) if args.prompt else read_prompts(args.prompt_file)
    sampling_only = ("temperature", "top_k", "top_p", "seed")  # a repetition penalty applies to greedy choices too
    sampling = {
        name: getattr(args, name) for name in (*sampling_only, "repetition_penalty") if getattr(args, name) is not None
    }
    given = [f"--{name.replace('_', '-')}" for name in sampling_only if name in sampling]
    if given and not args.do_sample:  # even at its default value (generate() cannot tell it was given)
        verb = "applies" if len(given) == 1 else "apply"
        parser.error(f"{' and '.join(given)} only {verb} when sampling: pass --do-sample")
    settings = DEFAULTS | sampling  # refuse bad arguments before spending time on loading
    check_sampling(args.do_sample, settings["temperature"], settings["top_k"], settings["top_p"],
                   settings["repetition_penalty"], args.max_new_tokens)  # fmt: skip
    model, tokenizer, load_seconds = load(args)
    if args.tp > 1 and args.do_sample and args.seed is None:
        sampling["seed"] = shared_seed()

    input_ids, attention_mask = (t.to(args.device) for t in tokenizer.batch_encode(prompts))
    check_attention_fits(model, *input_ids.shape)  # before the prompt is echoed
    B, T = input_ids.shape
    decoder = Decoder(model, B, T + args.max_new_tokens, compile=args.compile)  # builds bloom.matvec's kernels once
    eos_ids = resolve_eos_ids(model, tokenizer.eos_token_id)  # without the tokenizer's, the model config's
    streamer = StdoutStream(tokenizer, prompts[0], eos_ids, show=is_main()) if len(prompts) == 1 else None
    start = time.perf_counter()
    try:
        output = generate(
            model, input_ids, attention_mask=attention_mask, max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            streamer=streamer, decoder=decoder, **sampling,
        )  # fmt: skip
    except (MemoryError, KeyboardInterrupt, ValueError) as error:  # the KV cache could not grow, Ctrl-C, or NaN
        so_far = getattr(error, "sequences", None)  # logits: print what was generated, then the error (or exit 130)
        if is_main() and streamer is not None:
            streamer.finish()
        elif is_main() and so_far is not None:
            print_rows(tokenizer, prompts, so_far[:, input_ids.shape[1] :])
        if is_main() and isinstance(error, KeyboardInterrupt):
            new = 0 if so_far is None else so_far.shape[1] - input_ids.shape[1]
            print(f"interrupted after {new} new tokens", file=sys.stderr)
        raise
    seconds = time.perf_counter() - start
    new_tokens = output[:, input_ids.shape[1] :]
    if not is_main():  # under tensor parallelism every process holds the same tokens; one prints them
        return 0
    if streamer is not None:
        streamer.finish()
    else:
        print_rows(tokenizer, prompts, new_tokens)
    n_new = count_new_tokens(new_tokens, eos_ids)
    print(
        f"load {load_seconds:.2f} s | prompt {int(attention_mask.sum())} tokens | new {n_new} tokens | "
        f"{n_new / seconds:.1f} tokens/s" + (" (compiling included)" if args.compile else ""),
        file=sys.stderr,
    )
    return 0


def print_rows(tokenizer: BloomTokenizer, prompts: list[str], new_tokens: torch.Tensor) -> None:
    """Each prompt followed by its new tokens (B, N), under a line `--- i/B ---` (the text may hold newlines)."""
    for i, (prompt, row) in enumerate(zip(prompts, new_tokens, strict=True), start=1):
        print(f"--- {i}/{len(prompts)} ---")
        print(prompt + tokenizer.decode(row.tolist(), skip_special_tokens=True))


def is_main() -> bool:
    """Whether this process prints: the only one, or process 0 of a tensor-parallel group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def run_perplexity(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    text = read_text(args.file, "--file")
    if args.stride is None:
        args.stride = max(1, args.context // 2)
    if not 0 < args.stride <= args.context:
        parser.error(f"--stride must be between 1 and --context ({args.context}), got {args.stride}")
    tokenizer = model_tokenizer(args)
    token_ids = tokenizer.encode(text)
    if len(token_ids) < 2:  # found before the weights are read
        raise ValueError(f"--file {args.file}: {len(token_ids)} token(s); perplexity needs at least 2")
    model, _, _ = load(args, tokenizer)
    result = perplexity(
        model, token_ids, context=args.context, stride=args.stride, batch_size=args.batch_size,
        progress=True,
    )  # fmt: skip
    windows = f"{result.n_windows} window" + ("s" if result.n_windows != 1 else "")
    print(f"perplexity {result.perplexity:.4f} | {result.n_scored} tokens scored in {windows}")
    return 0


def run_activations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    text = read_text(args.file, "--file")
    with torch.device("meta"):  # the point names depend on the layer count: checked before the weights are read
        skeleton = Bloom(load_config(args.model, revision=args.revision))
    try:
        names = bloom.research.activations.point_names(skeleton, args.points)
    except ValueError as error:
        raise ValueError(f"--points: {error}") from None
    tokenizer = model_tokenizer(args)
    token_ids = tokenizer.encode(text)[: args.max_tokens]
    if not token_ids:
        raise ValueError(f"--file {args.file}: 0 tokens, nothing to export")
    output_folder(args.out, "--out")
    model_name = args.model + (f"@{args.revision}" if args.revision else "")  # a repo at its revision
    if Path(args.model).is_dir():  # the same folder however it is spelled
        model_name = str(Path(args.model).resolve())
    try:
        # what export would refuse whatever the loaded dtype, before the weights are read; the rest (a half-written
        # export's dtype) once they are
        bloom.research.activations.check_folder(args.out, model_name, token_ids, names, args.context)
        model, _, _ = load(args, tokenizer)
        out = bloom.research.activations.export(
            model, token_ids, args.points, args.out, context=args.context, batch_size=args.batch_size,
            model_name=model_name, progress=True,
        )  # fmt: skip
    except bloom.research.activations.OutFolderError as error:
        raise ValueError(f"--out {error}") from None
    except (KeyboardInterrupt, OSError) as error:  # Ctrl-C, a full disk: what is written stays, and is resumed
        if (args.out / bloom.research.activations.INDEX).is_file():
            interrupted = isinstance(error, KeyboardInterrupt)
            print(f"{'interrupted: ' if interrupted else ''}{args.out} keeps the batches written so far; "
                  f"{'' if interrupted else 'once the cause is fixed, '}the same command again finishes the export",
                  file=sys.stderr)  # fmt: skip
        raise
    print(out)
    return 0


def run_inspect(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("bloom inspect draws with matplotlib: pip install -e '.[viz]'")
    check_prompts([args.prompt])
    output_folder(args.out, "--out")
    tokenizer = model_tokenizer(args)
    ids = torch.tensor([tokenizer.encode(args.prompt)], device=args.device)  # (1, T)
    config = load_config(args.model, revision=args.revision)
    megabytes = page.size_bytes(config.n_layer, config.n_head, ids.shape[1]) / 1e6
    if megabytes > PAGE_LIMIT_MB:  # every head of every layer is in the page: its size grows with T²
        most = math.isqrt(PAGE_LIMIT_MB * 10**6 * 3 // (16 * config.n_layer * config.n_head))
        heads = f"{config.n_layer} layers × {config.n_head} heads"
        raise ValueError(f"--prompt: its {ids.shape[1]} tokens would make a page of about {megabytes:.0f} MB (every "
                         f"head's T × T attention, {heads}), more than a browser tab opens well ({PAGE_LIMIT_MB} MB): "
                         f"a prompt of up to {most} tokens fits")  # fmt: skip
    model, tokenizer, _ = load(args, tokenizer)
    with torch.inference_mode(), record(model, "h.*.self_attention.probs") as seen:
        model(ids)
    attention = torch.stack([seen[f"h.{i}.self_attention.probs"][0] for i in range(len(model.h))])  # (L, nh, T, T)
    labels = [readable(tokenizer.decode([i])) for i in ids[0].tolist()]
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [
        viz.save(viz.attention_heads(attention[i], labels, f"layer {i}"), args.out / f"attention_layer{i:02d}.png")
        for i in range(len(model.h))
    ]
    paths.append(viz.save(viz.alibi(model.config.n_head, len(labels)), args.out / "alibi.png"))
    probs, top_ids = logit_lens(model, ids, k=INSPECT_TOP_K)  # (n_layer + 1, 1, T, k) each
    top = [[[readable(tokenizer.decode([i])) for i in guesses] for guesses in row] for row in top_ids[:, 0].tolist()]
    first = [[guesses[0] for guesses in row] for row in top]
    paths.append(viz.save(viz.logit_lens_grid(probs[:, 0, :, 0], first, labels), args.out / "logit_lens.png"))
    paths.append(page.write(args.out / "inspect.html", args.prompt, labels, attention, probs[:, 0], top))
    for path in paths:
        print(path)
    stale = sorted(p.name for p in args.out.glob("attention_layer*.png") if p not in paths)
    if stale:  # another model's layers, from an earlier run into this folder
        print(f"warning: {args.out} also holds {', '.join(stale)} from an earlier run", file=sys.stderr)
    return 0


def readable(token: str) -> str:
    """A token as a picture label: whitespace made visible."""
    return token.replace(" ", "·").replace("\n", "↵").replace("\t", "→") or "∅"


def run_parity(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        import bloom_reference  # imports transformers, which the bloom package itself never does
    except ImportError as error:
        raise ValueError(f"bloom parity needs transformers ({error}): pip install -e '.[parity]'") from None
    return bloom_reference.run_parity(args, PARITY_TOLERANCES)


def run_evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import json

    try:  # the harness is an optional extra: imported here only, never by `import bloom`
        import lm_eval
        import lm_eval.tasks
        import lm_eval.utils

        from bloom.research.evaluation import BloomLM
    except ImportError as error:
        raise ValueError(f"bloom evaluate runs lm-evaluation-harness ({error}): pip install -e '.[eval]'") from None
    tasks = [task for task in args.tasks.split(",") if task]
    if not tasks:
        parser.error("--tasks names no task")
    if args.limit is not None and not (0 < args.limit < 1 or (1 <= args.limit <= 2**62 and args.limit.is_integer())):
        parser.error(f"--limit must be a whole number of documents or a fraction below 1, got {args.limit:g}")
    if args.include_path is not None and not args.include_path.is_dir():
        raise FileNotFoundError(f"--include-path {args.include_path}: no such folder")
    if args.output is not None:
        output_file(args.output, "--output")
    task_manager = lm_eval.tasks.TaskManager(include_path=None if args.include_path is None else str(args.include_path))
    unknown = [task for task in tasks if task not in task_manager.all_tasks and not Path(task).is_file()]
    if unknown:  # before spending time on loading
        where = "" if args.include_path is None else f" nor in --include-path {args.include_path}"
        raise ValueError(f"--tasks: {', '.join(unknown)}: not a task of the harness{where} (lm-eval ls tasks)")
    model, tokenizer, _ = load(args)
    lm = BloomLM(model, tokenizer=tokenizer, device=args.device, batch_size=args.batch_size)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit  # below 1: a fraction
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit, task_manager=task_manager,
            log_samples=False,
        )  # fmt: skip
    except ValueError as error:  # random.sample's words, from the harness's few-shot sampler
        if args.num_fewshot and "Sample larger than population" in str(error):
            raise ValueError(f"--num-fewshot {args.num_fewshot}: a task has fewer documents to draw the examples "
                             "from") from None  # fmt: skip
        raise
    print(lm_eval.utils.make_table(results))
    if results.get("groups"):
        print(lm_eval.utils.make_table(results, "groups"))
    if args.output is not None:
        text = json.dumps(results, indent=2, default=lm_eval.utils.handle_non_serializable, ensure_ascii=False)
        write_whole(args.output, lambda partial: partial.write_text(text + "\n", encoding="utf-8"))
    return 0


def run_download(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.repo_id or Path(args.repo_id).exists():
        raise ValueError(f"{args.repo_id!r} is not a hub repo id (owner/name): bloom download fetches from the hub")
    folder = resolve_folder(
        args.repo_id,
        patterns=checkpoint_patterns() + [TOKENIZER_FILE, *CONFIG_FILES],
        is_complete=lambda folder: is_complete(folder) and (folder / TOKENIZER_FILE).is_file(),
        revision=args.revision,
    )
    # an unreachable hub leaves huggingface_hub with the cached snapshot, however partial: say what it lacks
    why = OFFLINE if hub_constants.HF_HUB_OFFLINE else "the hub did not provide it"
    try:
        weight_files(folder)  # names a missing shard, or pickles only
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{args.repo_id}: the cached copy lacks a file ({error}), and {why}") from None
    for needed in ("config.json", TOKENIZER_FILE):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{args.repo_id}: the cached copy in {folder} has no {needed}, and {why}")
    print(folder)
    return 0


class StdoutStream:
    """generate()'s streamer for one prompt: prints the prompt, then each piece of text as soon as it is final.

    Under tensor parallelism every process streams, with `show` on process 0 only: a streamer makes generate()
    check for EOS at every step, and all processes must stop at the same step, or one would wait forever in a
    collective that the others never join.
    """

    def __init__(self, tokenizer: BloomTokenizer, prompt: str, eos_ids: tuple[int, ...], show: bool = True) -> None:
        self.text = TextStream(tokenizer)
        self.eos_ids = eos_ids
        self.done = False
        self.show = show
        self.print(prompt)

    def __call__(self, tokens: torch.Tensor) -> None:
        token = int(tokens[0])
        if self.done:
            return
        self.done = token in self.eos_ids
        self.print(self.text.push(token))

    def finish(self) -> None:
        self.print(self.text.flush() + "\n")

    def print(self, text: str) -> None:
        if self.show:
            print(text, end="", flush=True)


def read_prompts(path: Path) -> list[str]:
    lines = read_text(path, "--prompt-file").split("\n")  # not splitlines(): a form feed or U+2028 stays in its line
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path}: no prompts (one per line)")
    return prompts


def count_new_tokens(new_tokens: torch.Tensor, eos_ids: tuple[int, ...]) -> int:
    """Tokens generated per row up to and including the first EOS (any of eos_ids), summed over the batch."""
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, dtype=new_tokens.dtype, device=new_tokens.device)).int()
    after_eos = is_eos.cumsum(dim=1) - is_eos > 0
    return int((~after_eos).sum())

"""transformers' BLOOM as the reference: `bloom parity` (layer by layer) and the reference side of `bloom bench`.

The only module of this distribution, tests aside, that imports transformers (`pip install -e ".[parity]"`);
the `bloom` package itself never does. In the parity table both models see the same token ids (our
tokenizer), and every tensor is compared at real (non-padding) positions.
"""

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import BloomForCausalLM

from bloom import BloomConfig, generate, load_pretrained, load_tokenizer
from bloom.checkpoints.hub import resolve_folder
from bloom.checkpoints.loader import DTYPES, checkpoint_patterns, is_complete, load_config
from bloom.command_line.arguments import check_prompts
from bloom.command_line.bench import TokenClock, measure
from bloom.research.probe import record

PROMPTS = ["Translate to English: Je t'aime.", "The capital of France is", "def fibonacci(n):"]


@dataclass(frozen=True)
class LayerDiff:
    name: str
    max_abs: float
    max_rel: float  # max_abs / max |reference|


def ours_by_layer(model, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode(), record(model, "word_embeddings_layernorm", "h.*", "ln_f") as seen:
        logits = model(ids, mask)
    names = ["word_embeddings_layernorm", *(f"h.{i}" for i in range(len(model.h))), "ln_f"]
    return {name: seen[name] for name in names} | {"logits": logits}


def transformers_by_layer(hf: BloomForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same tensors from transformers. Its hidden_states are: the embedding LayerNorm's output, the output of
    every block but the last, and ln_f's output; the last block's own output is taken with a hook."""
    last_block: list[torch.Tensor] = []
    handle = hf.transformer.h[-1].register_forward_hook(lambda module, args, output: last_block.append(output[0]))
    try:
        with torch.inference_mode():
            out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    states, n_layer = out.hidden_states, hf.config.n_layer
    blocks = {f"h.{i}": states[i + 1] for i in range(n_layer - 1)} | {f"h.{n_layer - 1}": last_block[0]}
    return {"word_embeddings_layernorm": states[0], **blocks, "ln_f": states[-1], "logits": out.logits}


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], mask: torch.Tensor) -> list[LayerDiff]:
    real = mask.bool()
    diffs = []
    for name, reference in theirs.items():
        a, b = ours[name][real].double(), reference[real].double()
        max_abs = (a - b).abs().max().item()
        diffs.append(LayerDiff(name, max_abs, max_abs / max(b.abs().max().item(), 1e-30)))
    return diffs


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first position where two token sequences differ (a length difference counts), or None."""
    n = min(len(a), len(b))
    differs = (a[:n] != b[:n]).nonzero()
    if len(differs):
        return int(differs[0])
    return None if len(a) == len(b) else n


def reference_folder(args: argparse.Namespace) -> Path:
    """The local folder of the checkpoint transformers loads (--reference, else --model): from the huggingface
    cache when it is there, so that transformers itself never waits on the network."""
    reference, flag = (args.reference, "--reference") if args.reference else (args.model, "--model")
    try:
        return resolve_folder(reference, patterns=[*checkpoint_patterns(), "config.json"], is_complete=is_complete,
                              revision=args.revision)  # fmt: skip
    except OSError as error:
        raise OSError(f"{flag} {error}") from error  # from: the hub's own error tells whether it was reachable


def run_parity(args: argparse.Namespace, tolerances: dict[torch.dtype, float]) -> int:
    """Print the layer table and the greedy comparison; 0 if every layer is within its dtype's tolerance
    (max |ours - theirs| / max |theirs|), else 1."""
    prompts = check_prompts(args.prompt) if args.prompt else PROMPTS
    reference = args.reference or args.model
    hf_folder = reference_folder(args)  # the arguments and files are checked before any weight is read
    tokenizer = load_tokenizer(args.model, revision=args.revision)
    config = load_config(args.model, revision=args.revision)
    tokenizer.check_fits(config.vocab_size)
    if args.reference:  # the same shape, or there is no layer to compare with
        try:
            theirs = BloomConfig.from_json(hf_folder / "config.json")
        except (OSError, ValueError) as error:
            raise ValueError(f"--reference {reference}: {error}") from None
        shape = lambda c: f"{c.n_layer} layers, width {c.hidden_size}, {c.n_head} heads, {c.vocab_size} rows"  # noqa: E731
        if shape(theirs) != shape(config):
            raise ValueError(f"--reference {reference} has {shape(theirs)}, --model {args.model} {shape(config)}")
    model = load_pretrained(args.model, dtype=args.dtype, device=args.device, revision=args.revision)
    dtype = model.ln_f.weight.dtype
    try:
        hf = BloomForCausalLM.from_pretrained(hf_folder, dtype=dtype, local_files_only=True).to(args.device).eval()
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # its first line says why
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{'--reference' if args.reference else '--model'} {reference}: transformers cannot load "
                         f"it ({why})") from None  # fmt: skip
    ids, mask = (t.to(args.device) for t in tokenizer.batch_encode(prompts))
    tolerance = tolerances[dtype]

    diffs = compare(ours_by_layer(model, ids, mask), transformers_by_layer(hf, ids, mask), mask)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"ours: {args.model} | transformers: {reference} | {dtype_name} | {len(prompts)} prompts, "
          f"{int(mask.sum())} tokens | tolerance {tolerance:g} (max abs / max |reference|)")  # fmt: skip
    print(f"{'tensor':<28}{'max abs diff':>14}{'max rel diff':>14}")
    beyond = [d for d in diffs if not d.max_rel <= tolerance]  # NaN: a NaN or inf on either side
    for d in diffs:
        flag = "  <-- beyond tolerance" if d in beyond else ""
        print(f"{d.name:<28}{d.max_abs:>14.3e}{d.max_rel:>14.3e}{flag}")

    finite = all(math.isfinite(d.max_rel) for d in diffs)
    differ = 0
    if finite:
        kwargs = dict(attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False)
        ours_tokens = generate(model, ids, eos_token_id=tokenizer.eos_token_id, **kwargs)
        with torch.inference_mode():
            theirs_tokens = hf.generate(input_ids=ids, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id, **kwargs)  # fmt: skip
        T = ids.shape[1]
        for prompt, a, b in zip(prompts, ours_tokens[:, T:], theirs_tokens[:, T:], strict=True):
            at = first_difference(a, b)
            differ += at is not None
            verdict = "identical" if at is None else f"first differs at new token {at}"
            print(f"greedy, {args.max_new_tokens} new tokens, {prompt!r}: {verdict}")
    else:
        print("greedy: not compared, as a tensor above holds NaN or inf")

    if beyond:
        first = beyond[0]
        why = f"{first.max_rel:.3e} > {tolerance:g}" if math.isfinite(first.max_rel) else "NaN or inf on a side"
        print(f"FAIL: first tensor beyond tolerance: {first.name} ({why})")
        return 1
    near_ties = f" (the greedy tokens of {differ} prompt(s) differ: probably near-ties in the logits)" if differ else ""
    print(f"OK: every tensor within tolerance{near_ties}")
    return 0


def bench_worker(args: argparse.Namespace) -> dict:
    """`bloom bench`'s measurement of transformers' BLOOM (eager, its default DynamicCache), as for ours."""

    def load() -> BloomForCausalLM:
        # on CPU, then moved: device_map would need the accelerate package
        return BloomForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(args.device).eval()

    def run(model: BloomForCausalLM, ids: torch.Tensor, mask: torch.Tensor, n: int, clock: TokenClock | None
            ) -> torch.Tensor:  # fmt: skip
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=3, streamer=clock)  # fmt: skip

    return measure(load, run, args)

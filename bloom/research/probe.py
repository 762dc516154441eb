"""Look inside a forward pass, and change it, without editing the model: `record` and `patch`.

Every submodule of `Bloom` is a place to look, named by its path (`model.named_modules()`):

    word_embeddings_layernorm        (B, T, C)   the residual stream entering block 0
    h.{i}                            (B, T, C)   the residual stream after block i
    h.{i}.self_attention             (B, T, C)   what attention adds to the residual stream
    h.{i}.self_attention.q / .k / .v (B, nh, T, hd)
    h.{i}.self_attention.scores      (B, nh, T, S) q·kᵀ/√hd + ALiBi bias, per head, WITHOUT the causal and
                                                 padding mask: softmax(scores + mask) = probs
    h.{i}.self_attention.probs       (B, nh, T, S) attention probabilities, per head
    h.{i}.self_attention.context     (B, nh, T, hd) each head's output, before `dense` mixes them
    h.{i}.resid_mid                  (B, T, C)   the residual stream after attention's add, before the MLP:
                                                 resid_mid + mlp = h.{i}
    h.{i}.mlp.dense_h_to_4h          (B, T, 4C)  MLP pre-activations
    h.{i}.mlp.act                    (B, T, 4C)  MLP activations (after the GeLU)
    h.{i}.mlp                        (B, T, C)   what the MLP adds to the residual stream
    ln_f                             (B, T, C)   the final LayerNorm's output

Names take shell-style wildcards per dotted part: "h.*.self_attention.probs", "h.*" (every block's
output, not what is inside them), "h.1[0-5]"; "**" stands for any number of parts: "**" is every point of the
model (TransformerLens's run_with_cache), "h.3.**" block 3 and everything in it, "**.probs" every layer's
attention probabilities. Both context managers work through forward
hooks, which they remove on exit; outside them the model runs exactly as written. `generate` runs them too,
with the default eager decoder; a compiled decoder (`Decoder(..., compile=True)`) would skip them, so it refuses.
When decoding, S is the KV cache's length, and the scores of slots not yet written mean nothing (the mask hides
them); `record(..., every_call=True)` keeps the prefill's and every step's tensors, whose T axes concatenate to
what one forward pass over the whole sequence records.
Under tensor parallelism (`--tp`) each process holds its own heads, and head numbers count within the process.
The research tools beside this module (weights, attribution, patching; docs/research.md) are built on these points.

    with record(model, "h.*", "h.*.self_attention.probs") as seen:
        model(ids)
    seen["h.3.self_attention.probs"]  # (B, nh, T, T)

    with record(model, "h.*.self_attention.context", grad=True) as seen:
        model(ids)[0, -1, token].backward()
    seen["h.3.self_attention.context"].grad  # (B, nh, T, hd): d logit / d each head's output

    with patch(model, {"h.5.self_attention.context": zero_head(7), "h.2": other_prompts_residual}):
        logits = model(ids)
"""

import fnmatch
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

Edit = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor
CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def find(model: nn.Module, pattern: str) -> dict[str, nn.Module]:
    """The submodules whose names match `pattern`; a pattern that matches nothing is an error."""
    parts = pattern.split(".")
    matched = {name: module for name, module in model.named_modules() if name and matches(name.split("."), parts)}
    # a list of modules (`h`) is never called itself, so a hook on it would never fire
    found = {name: module for name, module in matched.items() if not isinstance(module, CONTAINERS)}
    if matched and not found:
        raise ValueError(f"{pattern!r} names a list of modules, which is never called itself: name its members, "
                         f"e.g. {next(iter(matched))}.0 or {next(iter(matched))}.*")  # fmt: skip
    if not found:
        blocks = sum(1 for name, _ in model.named_modules() if re.fullmatch(r"h\.\d+", name))
        where = {0: "", 1: "its only block is h.0; "}.get(blocks, f"its {blocks} blocks are h.0 to h.{blocks - 1}; ")
        examples = "h.0, h.0.self_attention.context, h.0.mlp.act, ln_f"
        raise ValueError(f"no module of the model is named like {pattern!r} ({where}names look like: {examples})")
    return found


def matches(name: list[str], pattern: list[str]) -> bool:
    """Whether a name's dotted parts match a pattern's: each part a shell-style wildcard, "**" any number of parts."""
    if not pattern:
        return not name
    if pattern[0] == "**":
        return any(matches(name[i:], pattern[1:]) for i in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], pattern[0]) and matches(name[1:], pattern[1:])


def find_all(model: nn.Module, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """The names of the submodules matching any of `patterns`, each once, in the model's order."""
    if not patterns:
        raise ValueError("no points named: give at least one name or pattern, e.g. 'h.*'")
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(f"point names are strings, got {patterns!r}")
    matched = {name for pattern in patterns for name in find(model, pattern)}
    return [name for name, _ in model.named_modules() if name in matched]


def is_per_head(name: str) -> bool:
    """Whether the point holds a tensor with a head axis, (B, nh, T, ...): self_attention's q, k, v, scores,
    probs and context."""
    parent, _, leaf = name.rpartition(".")
    return parent.endswith("self_attention") and leaf in ("q", "k", "v", "scores", "probs", "context")


def refuse_int8(model: nn.Module, what: str) -> None:
    """Raise for a model loaded with quantize="int8": its int8 weights are no float matrices to view or
    differentiate through."""
    if any(tensor.dtype == torch.int8 for tensor in model.buffers()):
        raise ValueError(f"{what} needs float weights, and this model's are int8 (quantize='int8'): use a model "
                         "loaded or kept without it")  # fmt: skip


@contextmanager
def record(
    model: nn.Module, *patterns: str, grad: bool = False, every_call: bool = False
) -> Iterator[dict[str, torch.Tensor | list[torch.Tensor]]]:
    """Record the outputs of the named modules into the yielded dict (name -> tensor).

    grad: keep the recorded tensors in the autograd graph, so that after the caller's `backward()` each
        one's `.grad` holds the gradient with respect to it. When the model's parameters do not require
        gradients (`model.requires_grad_(False)`), each recorded tensor that would not be tracked becomes a
        leaf that is, and everything after it is tracked; the values are unchanged. Needs autograd on (not
        under no_grad or inference_mode) and float weights: a model with int8 weights (quantize="int8") is
        refused, since torch has no backward for the bf16 int8 product and the tools are checked on float
        weights.
    every_call: each entry is the list of the module's outputs, one per call, in order (`generate`: the
        prefill, then each decode step), instead of the output of the last call.
    """
    if grad:
        refuse_int8(model, "record(grad=True)")
    seen: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    names = [name for item in patterns for name in ([item] if isinstance(item, str) else item)]  # lists too
    modules = {name: model.get_submodule(name) for name in find_all(model, names)}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if grad and (not torch.is_grad_enabled() or torch.is_inference_mode_enabled()):
                raise ValueError(f"record(grad=True) of {name}: a forward pass ran with autograd off (under no_grad "
                                 "or inference_mode, as generate and the research tools run theirs): run that pass "
                                 "outside this record(grad=True)")  # fmt: skip
            if not grad:
                kept = output.detach()
            elif output.requires_grad:
                kept = output
                kept.retain_grad()
            else:
                kept = output.detach().requires_grad_()  # a leaf: what follows is computed from it
            if every_call:
                seen.setdefault(name, []).append(kept)
            else:
                seen[name] = kept
            return kept if grad else None

        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def patch(model: nn.Module, edits: dict[str, Edit]) -> Iterator[None]:
    """Replace the outputs of the named modules while the block runs.

    Each edit is a tensor (used instead of the output: same shape) or a function of the output that returns
    the new one (`zero_head(h)`, `lambda x: 2 * x`). A function should not change its input in place: a
    `record` of the same point entered before this `patch` would hold the changed tensor. Hooks run in the order
    the `with` blocks were entered: a `record` entered inside this block sees the patched output, one entered
    before it the model's own. Points matched by several patterns get each edit, in the dict's order.
    """
    if not isinstance(edits, dict):
        raise TypeError(f"patch takes a dict of point name -> edit, got {type(edits).__name__}")
    handles = []

    def apply(name: str, edit: Edit) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            try:
                new = edit(output) if callable(edit) else edit
            except (ValueError, IndexError) as error:
                raise ValueError(f"patch for {name}: {error}") from error
            except Exception as error:  # kept as it is, with the point named beneath it
                error.add_note(f"in the patch for {name}")
                raise
            if not isinstance(new, torch.Tensor) or new.shape != output.shape:
                found = f"shape {tuple(new.shape)}" if isinstance(new, torch.Tensor) else type(new).__name__
                hint = "" if callable(edit) else (
                    " (a tensor stands for every call's output; generate's decode steps take one token each: edit "
                    "them with a function of the output)"
                )  # fmt: skip
                raise ValueError(f"patch for {name}: the edit gave {found}, the output is {tuple(output.shape)}{hint}")
            return new.to(output.dtype)

        return hook

    try:
        for pattern, edit in edits.items():
            for name, module in find(model, pattern).items():
                if isinstance(edit, ZeroHead) and not is_per_head(name):
                    raise ValueError(f"patch for {name}: zero_head({edit.head}) edits a point with a head axis "
                                     f"(self_attention.context, q, k, v, scores, probs); {name} has none")  # fmt: skip
                handles.append(module.register_forward_hook(apply(name, edit)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class ZeroHead:
    """An edit for a per-head point, (B, nh, T, ...), that zeroes one head: `zero_head(h)`."""

    def __init__(self, head: int) -> None:
        self.head = head

    def __call__(self, per_head: torch.Tensor) -> torch.Tensor:
        if not 0 <= self.head < per_head.shape[1]:
            raise ValueError(f"zero_head({self.head}): there are {per_head.shape[1]} heads, numbered from 0")
        per_head = per_head.clone()
        per_head[:, self.head] = 0
        return per_head


def zero_head(head: int) -> ZeroHead:
    """An edit for `*.self_attention.context` (B, nh, T, hd) that removes one head's output (or for another
    point with a head axis: q, k, v, scores, probs); `patch` refuses it on a point without one."""
    return ZeroHead(head)

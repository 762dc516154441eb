"""Which activations matter for a behaviour: patch a clean run's activations into a corrupted run.

Both sweeps take a clean prompt and a corrupted one of the same length (1, T), a metric of the logits, and
probe patterns naming the points to sweep (bloom.research.probe). For each matching point and each position t they
answer: how much does the metric move when the corrupted run gets the clean run's activation at (point, t)?
Points with a head axis (`self_attention.q/k/v/scores/probs/context`, (B, nh, T, ...)) are swept per head too.

- `activation_patching` runs it: one patched forward pass per (point, [head,] t), stacked along the batch axis
  `batch_size` at a time, so a sweep costs P·T/batch_size forward passes. Exact.
- `attribution_patching` estimates it to first order, from one forward and one backward pass of the
  corrupted run: Σ (clean − corrupt) · ∂metric/∂activation over the entries at (point, [head,] t).
  Approximate: good where the metric is close to linear in the activation, poor across a saturated softmax
  or LayerNorm (attention probabilities, large residual changes); check the points it ranks first with
  `activation_patching`.

A metric maps logits (n, T, V) to one number per row, (n,): e.g. a logit difference at the last position,
`lambda logits: logits[:, -1, good] - logits[:, -1, bad]`.
"""

from collections.abc import Callable

import torch
from huggingface_hub.utils import tqdm

from bloom.config import is_integer
from bloom.model import Bloom
from bloom.research.probe import find_all, is_per_head, patch, record, refuse_int8

Metric = Callable[[torch.Tensor], torch.Tensor]


def activation_patching(
    model: Bloom,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    metric: Metric,
    points: str | list[str],
    batch_size: int = 8,
) -> tuple[list[str], torch.Tensor]:
    """metric(corrupted run with the clean activation at one point and position) for every point and position.

    Returns (labels, values): the P names of the points matching `points`, and values (P, T), or (P, nh, T)
    when the points are per-head ones (a sweep mixing the two kinds is refused: make two calls). Runs
    ceil(P·[nh·]T / batch_size) forward passes of `batch_size` rows; memory grows with batch_size·T·V for the
    logits. A progress bar shows on stderr when the sweep takes more than 2 seconds.
    """
    if not (is_integer(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    names, per_head, T = _check(model, clean_ids, corrupt_ids, points)
    with torch.no_grad(), record(model, *names) as clean:
        model(clean_ids)
    n_head = clean[names[0]].shape[1] if per_head else 1
    # one row per patch: which point, head and position; a point's rows are contiguous, head-major
    point = torch.arange(len(names)).repeat_interleave(n_head * T)
    head = torch.arange(n_head).repeat_interleave(T).repeat(len(names))
    position = torch.arange(T).repeat(len(names) * n_head)
    values = torch.empty(len(point))
    for start in tqdm(range(0, len(point), batch_size), desc="activation patching", unit="batch", delay=2):
        rows = torch.arange(start, min(start + batch_size, len(point)))
        edits = {}
        for p, name in enumerate(names):
            mine = rows[point[rows] == p]
            if len(mine):
                edits[name] = _put(clean[name], mine - start, head[mine] if per_head else None, position[mine])
        with torch.no_grad(), patch(model, edits):
            out = _checked(metric(model(corrupt_ids.expand(len(rows), T))), len(rows))
        values[rows] = out.float().cpu()
    return names, values.view(len(names), n_head, T) if per_head else values.view(len(names), T)


def attribution_patching(
    model: Bloom, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor, metric: Metric, points: str | list[str]
) -> tuple[list[str], torch.Tensor]:
    """The first-order estimate of `activation_patching`'s effect, metric(patched) − metric(corrupt).

    At the corrupted run, Σ (clean − corrupt) · ∂metric/∂activation summed over each (point, [head,] t)'s
    entries. Returns (labels, estimates) shaped as activation_patching's values. One forward and one
    backward pass (the model's parameters get no .grad).
    """
    refuse_int8(model, "attribution_patching")
    if torch.is_inference_mode_enabled():
        raise ValueError("attribution_patching needs autograd: call it outside torch.inference_mode()")
    names, per_head, T = _check(model, clean_ids, corrupt_ids, points)
    with torch.no_grad(), record(model, *names) as clean:
        model(clean_ids)
    with torch.enable_grad(), record(model, *names, grad=True) as corrupt:
        out = _checked(metric(model(corrupt_ids)), 1)
        grads = torch.autograd.grad(out.sum(), [corrupt[name] for name in names], allow_unused=True)
    estimates = []
    for name, grad in zip(names, grads, strict=True):
        change = (clean[name] - corrupt[name].detach())[0]  # (T, ...) or (nh, T, ...)
        product = torch.zeros_like(change) if grad is None else change * grad[0]
        estimates.append(product.flatten(start_dim=2 if per_head else 1).sum(-1).float())  # (nh, T) or (T,)
    return names, torch.stack(estimates)


def _check(
    model: Bloom, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor, points: str | list[str]
) -> tuple[list[str], bool, int]:
    """The names of the points (in the model's order), whether they are per-head points, and T."""
    if clean_ids.ndim != 2 or clean_ids.shape[0] != 1 or clean_ids.shape != corrupt_ids.shape:
        raise ValueError(
            f"clean_ids {tuple(clean_ids.shape)} and corrupt_ids {tuple(corrupt_ids.shape)} must both be one "
            "prompt of the same length, (1, T)"
        )
    patterns = [points] if isinstance(points, str) else points
    names = find_all(model, patterns)
    heads = [is_per_head(name) for name in names]
    if any(heads) and not all(heads):
        per_head = [n for n, h in zip(names, heads, strict=True) if h][:2]
        whole = [n for n, h in zip(names, heads, strict=True) if not h][:2]
        raise ValueError(
            f"points {', '.join(per_head)} are per head (B, nh, T, ...) and {', '.join(whole)} are not (B, T, ...): "
            "sweep them in two calls"
        )
    return names, all(heads), clean_ids.shape[1]


def _checked(out: object, rows: int) -> torch.Tensor:
    """The metric's output for logits of `rows` rows, which must be one value per row."""
    if not isinstance(out, torch.Tensor) or out.shape != (rows,):
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"metric gave {found} for logits of {rows} row{'s' if rows != 1 else ''}: it must return "
                         "one value per row")  # fmt: skip
    return out


def _put(clean: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor | None, positions: torch.Tensor) -> Callable:
    """An edit writing the clean activation (1, [nh,] T, ...) into `rows` of the output at (head,) position."""

    def edit(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        if heads is None:
            output[rows, positions] = clean[0, positions]  # (n, T, ...)
        else:
            output[rows, heads, positions] = clean[0, heads, positions]  # (n, nh, T, ...)
        return output

    return edit

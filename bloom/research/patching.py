"""Which activations matter for a behaviour: patch a clean run's activations into a corrupted run.

Both sweeps take clean prompts and corrupted ones, N pairs (N, T) (row i of each is a pair, N = 1 for a single pair),
a metric of the logits, and probe patterns naming the points to sweep (bloom.research.probe). Pairs of different
lengths come left-padded with their `attention_mask` (N, T), one for both prompts of a pair, whose two prompts have
the same length; at a pair's padding, a patch changes nothing. For each matching point and each position t they
answer: how much does the metric move when the corrupted runs get their clean runs' activation at (point, t)?
Over several pairs the answer is the mean over the pairs. Points with a head axis
(`self_attention.q/k/v/scores/probs/context`, (B, nh, T, ...)) are swept per head too.

- `activation_patching` runs it: one patched forward pass of the N corrupted prompts per (point, [head,] t), those
  runs stacked along the batch axis, the N rows of max(batch_size // N, 1) patches in a forward pass, so a sweep
  costs P·T / max(batch_size // N, 1) forward passes. Exact.
- `attribution_patching` estimates it to first order, from one forward and one backward pass of the
  corrupted runs: Σ (clean − corrupt) · ∂metric/∂activation over the entries at (point, [head,] t).
  Approximate: good where the metric is close to linear in the activation, poor across a saturated softmax
  or LayerNorm (attention probabilities, large residual changes); check the points it ranks first with
  `activation_patching`.

A metric maps the logits of the N pairs' runs, (N, T, V) in the pairs' order, to one number per pair, (N,): e.g. a
logit difference at the last position, `lambda logits: logits[:, -1, good] - logits[:, -1, bad]`, where good and
bad are token ids, or (N,) tensors of them when each pair has its own answer. It may instead return one number for
the N pairs together (a 0-dim tensor, as TransformerLens's metrics end in `.mean()`), which is taken as their mean.
"""

from collections.abc import Callable

import torch
from huggingface_hub.utils import tqdm

from bloom.config import is_integer
from bloom.model import Bloom, refuse_non_tokens
from bloom.research.probe import find_all, is_per_head, patch, record, refuse_int8

Metric = Callable[[torch.Tensor], torch.Tensor]


def activation_patching(
    model: Bloom,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    metric: Metric,
    points: str | list[str],
    batch_size: int = 8,
    progress: bool = True,
    per_pair: bool = False,
    all_positions: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> tuple[list[str], torch.Tensor]:
    """metric(corrupted runs with their clean activation at one point and position) for every point and position.

    Returns (labels, values): the P names of the points matching `points`, and values (P, T), or (P, nh, T)
    when the points are per-head ones (a sweep mixing the two kinds is refused: make two calls); over N pairs,
    each value is the mean of the metric over the pairs, or with `per_pair` each pair's own, (N, P, [nh,] T), for
    their spread (the metric must then give one value per pair). A forward pass runs the N pairs of
    max(batch_size // N, 1) patches, so a sweep takes ceil(P·[nh·]T / max(batch_size // N, 1)) of them; memory grows
    with the rows of one pass times T·V for the logits. A progress bar shows on stderr when the sweep takes more than
    2 seconds, unless `progress` is False. With `all_positions`, each point (and head) is patched at every position
    at once, one patch instead of T, and the values lose their T axis: (P,) or (P, nh). `attention_mask` (N, T) marks
    the real tokens of both prompts of each pair (1) and their left padding (0); a patch at a pair's padding leaves
    its run as it was, so a position padded in some pairs averages their unpatched metric in.
    """
    if not (is_integer(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    names, per_head, (N, T) = _check(model, clean_ids, corrupt_ids, points, attention_mask)
    with torch.no_grad(), record(model, *names) as clean:
        model(clean_ids, attention_mask)
    n_head = clean[names[0]].shape[1] if per_head else 1
    # one patch per point, head and position (or all positions); a point's patches are contiguous, head-major
    n_pos = 1 if all_positions else T
    point = torch.arange(len(names)).repeat_interleave(n_head * n_pos)
    head = torch.arange(n_head).repeat_interleave(n_pos).repeat(len(names))
    position = torch.arange(n_pos).repeat(len(names) * n_head)
    values = torch.empty(len(point), N if per_pair else 1)  # (patches, pairs) or (patches, their mean)
    per_pass = max(batch_size // N, 1)
    passes = range(0, len(point), per_pass)
    for start in tqdm(passes, desc="activation patching", unit="batch", delay=2, disable=not progress):
        patches = torch.arange(start, min(start + per_pass, len(point)))
        row_patch = patches.repeat_interleave(N)  # rows: a patch's N pairs in turn
        row_pair = torch.arange(N).repeat(len(patches))
        edits = {}
        for p, name in enumerate(names):
            rows = (point[row_patch] == p).nonzero()[:, 0]
            if len(rows):
                mine = row_patch[rows]
                heads, positions = head[mine] if per_head else None, None if all_positions else position[mine]
                edits[name] = _put(clean[name], rows, row_pair[rows], heads, positions)
        with torch.no_grad(), patch(model, edits):
            mask = None if attention_mask is None else attention_mask.repeat(len(patches), 1)
            logits = model(corrupt_ids.repeat(len(patches), 1), mask)  # (patches·N, T, V)
        out = [_checked(metric(of_patch), N, per_pair).float() for of_patch in logits.split(N)]  # one per patch
        values[patches] = torch.stack([o.reshape(N) if per_pair else o.mean()[None] for o in out]).cpu()
    values = values.T.reshape(-1, len(names), n_head, n_pos)  # (N or 1, P, nh, T or 1)
    values = values[..., 0] if all_positions else values
    values = values if per_head else values[:, :, 0]
    return names, values if per_pair else values[0]


def attribution_patching(
    model: Bloom,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    metric: Metric,
    points: str | list[str],
    per_pair: bool = False,
    all_positions: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> tuple[list[str], torch.Tensor]:
    """The first-order estimate of `activation_patching`'s effect, metric(patched) − metric(corrupt).

    At the corrupted runs, Σ (clean − corrupt) · ∂metric/∂activation summed over each (point, [head,] t)'s
    entries (with `all_positions`, over every t too), and over N pairs its mean over the pairs (or with `per_pair`
    each pair's own). Returns (labels, estimates) shaped as activation_patching's values, 0 at a pair's padding
    (`attention_mask` as there). One forward and one backward pass of the N pairs (the model's parameters get no
    .grad).
    """
    refuse_int8(model, "attribution_patching")
    if torch.is_inference_mode_enabled():
        raise ValueError("attribution_patching needs autograd: call it outside torch.inference_mode()")
    names, per_head, (N, _) = _check(model, clean_ids, corrupt_ids, points, attention_mask)
    with torch.no_grad(), record(model, *names) as clean:
        model(clean_ids, attention_mask)
    with torch.enable_grad(), record(model, *names, grad=True) as corrupt:
        out = _checked(metric(model(corrupt_ids, attention_mask)), N, per_pair)
        grads = torch.autograd.grad(out.sum(), [corrupt[name] for name in names], allow_unused=True)
    estimates = []
    for name, grad in zip(names, grads, strict=True):
        change = clean[name].float() - corrupt[name].detach().float()  # (N, T, ...) or (N, nh, T, ...), in float32
        product = torch.zeros_like(change) if grad is None else change * grad.float()
        by_pair = product.flatten(start_dim=3 if per_head else 2).sum(-1)  # (N, nh, T) or (N, T)
        by_pair = by_pair.sum(-1) if all_positions else by_pair
        # per pair, the mean; a metric of all the pairs at once (0-dim) was their mean already
        estimates.append(by_pair if per_pair else by_pair.mean(0) if out.ndim else by_pair.sum(0))
    return names, torch.stack(estimates, dim=1 if per_pair else 0)


def _check(
    model: Bloom,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    points: str | list[str],
    attention_mask: torch.Tensor | None,
) -> tuple[list[str], bool, tuple[int, int]]:
    """The names of the points (in the model's order), whether they are per-head points, and (N, T)."""
    if clean_ids.ndim != 2 or 0 in clean_ids.shape or clean_ids.shape != corrupt_ids.shape:
        raise ValueError(
            f"clean_ids {tuple(clean_ids.shape)} and corrupt_ids {tuple(corrupt_ids.shape)} must both be N prompts "
            "of the same length, (N, T), row i of each a pair (left-padded, with their attention_mask)"
        )
    refuse_non_tokens(clean_ids, model.config.vocab_size, "clean_ids")
    refuse_non_tokens(corrupt_ids, model.config.vocab_size, "corrupt_ids")
    if attention_mask is None:
        _refuse_padding(clean_ids, "clean_ids", model.config.pad_token_id)
        _refuse_padding(corrupt_ids, "corrupt_ids", model.config.pad_token_id)
    else:
        _check_mask(attention_mask, tuple(clean_ids.shape))
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
    return names, all(heads), tuple(clean_ids.shape)


def _check_mask(mask: object, shape: tuple[int, int]) -> None:
    """Refuse a mask that is not left padding of the pairs' (N, T) prompts: 0s, then 1s to the end of each row."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask is {found}, clean_ids and corrupt_ids {shape}: one tensor for both prompts "
                         "of each pair")  # fmt: skip
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    not_left = (mask[:, 1:] < mask[:, :-1]).any(1) | (mask[:, -1] != 1)  # (N,): a 1 before a 0, or a 0 last
    if not_left.any():
        raise ValueError(f"attention_mask row {int(not_left.nonzero()[0])} is not left padding (0s, then 1s to the "
                         "end): the sweeps take tokenizer.batch_encode's, so that the last position is every pair's "
                         "last token")  # fmt: skip


def _refuse_padding(ids: torch.Tensor, name: str, pad_token_id: int | None) -> None:
    """Without a mask, the pad token would be attended to as a token: refuse it, naming where it is."""
    if pad_token_id is None or not (ids == pad_token_id).any():
        return
    at = tuple(int(i) for i in (ids == pad_token_id).nonzero()[0])
    raise ValueError(f"{name}[{', '.join(map(str, at))}] is the pad token {pad_token_id}: pass the pairs' "
                     "attention_mask, or the padding is attended to as a token")  # fmt: skip


def _checked(out: object, pairs: int, per_pair: bool = False) -> torch.Tensor:
    """The metric's output for the logits of `pairs` pairs' runs: one value per pair, or (unless each pair's values
    are asked for) one for them all."""
    if per_pair and pairs > 1 and isinstance(out, torch.Tensor) and out.ndim == 0:
        raise ValueError("per_pair=True needs a metric of one value per pair, and this one gave one for them all: "
                         "drop its reduction (.mean())")  # fmt: skip
    if not isinstance(out, torch.Tensor) or out.shape not in ((pairs,), ()):
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"metric gave {found} for the logits of {pairs} pair{'s' if pairs != 1 else ''} "
                         f"({pairs}, T, V): it must return a tensor of one value per pair, ({pairs},), or of one "
                         "for them all, ()")  # fmt: skip
    return out


def _put(
    clean: torch.Tensor,
    rows: torch.Tensor,
    pairs: torch.Tensor,
    heads: torch.Tensor | None,
    positions: torch.Tensor | None,
) -> Callable:
    """An edit writing, into each of `rows` of the output, its pair's clean activation (N, [nh,] T, ...) at its
    (head and) position, or at every position (None)."""

    def edit(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        where = (rows,) if heads is None else (rows, heads)  # (n, T, ...) or (n, nh, T, ...)
        taken = (pairs,) if heads is None else (pairs, heads)
        if positions is None:
            output[where] = clean[taken]
        else:
            output[(*where, positions)] = clean[(*taken, positions)]
        return output

    return edit

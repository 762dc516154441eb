"""Which heads do a known job: each head's attention scored against a pattern of where that job looks.

A head's score is the attention its queries give to the pattern's target keys, averaged over the queries that have
a target (padding neither scores nor is a target): 1 for a head whose every such query looks only at its targets,
about 0 for one that ignores them. The patterns, made from the tokens (B, T), are (B, T, S) of 0/1:

    previous_token    the key just before the query: s = t - 1
    duplicate_token   earlier keys holding the query's token: s < t, token[s] = token[t]
    induction         earlier keys just after an earlier copy of the query's token: s < t, token[s - 1] = token[t]
                      (in "A B ... A" the second A looks at B, and so can predict B)

or a pattern of one's own, (B, T, T) or (T, T): 0/1, or weights, each key's probability counted times its weight
(a key after its query, s > t, is refused: attention never sees it). Duplicate-token and induction heads show on a
random sequence repeated twice, `torch.randint(4, 250000, (B, L)).repeat(1, 2)`: only its second half has targets,
so only it is scored. The mean is over all the scored queries of the batch together.

TransformerLens's `detect_head` (error_measure "mul") divides by every query instead, so that its scores are ours
times the share of queries with a target (about a half on a sequence repeated twice), and its induction pattern also
counts the query's own key where the token before it is the same (s = t); ours takes earlier keys only.
"""

import torch

from bloom.memory import check_attention_fits
from bloom.model import Bloom
from bloom.research.probe import find

PATTERNS = ("previous_token", "duplicate_token", "induction")
NEEDS = {  # what the tokens need for some query to have a target, by pattern
    "previous_token": "previous_token pattern: it needs two real tokens in a row",
    "duplicate_token": "duplicate_token pattern: give tokens that repeat (a random sequence twice)",
    "induction": "induction pattern: give tokens that repeat (a random sequence twice)",
    None: "given pattern: it marks no key of a real query",
}


def target_pattern(
    pattern: str | torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight of each key for each query's job, (B, T, S) float32: 0/1 for a pattern of PATTERNS, or one's own
    (B, T, T) or (T, T) (the same for every row) as given. Padded keys (attention_mask 0) are never targets, nor,
    for induction, keys that follow padding."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids is {tuple(input_ids.shape)}, expected (batch, tokens)")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: "
                         "they must be the same shape")  # fmt: skip
    B, T = input_ids.shape
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0  # (B, T)
    earlier = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril(-1)  # (T, S): s < t
    if isinstance(pattern, torch.Tensor):
        if pattern.shape not in ((B, T, T), (T, T)):
            raise ValueError(f"pattern is {tuple(pattern.shape)}: it must be (B, T, T) = {(B, T, T)} or (T, T), "
                             "the keys each query of input_ids should attend to")  # fmt: skip
        target = pattern.to(device=input_ids.device, dtype=torch.float32).expand(B, T, T)
        if (target[:, earlier.T] != 0).any():  # any weight where s > t
            raise ValueError("pattern marks keys after their query (s > t), which causal attention never sees")
    elif pattern not in PATTERNS:
        raise ValueError(f"pattern {pattern!r} is not one of {', '.join(PATTERNS)}, nor a (B, T, T) or (T, T) tensor")
    else:
        same = input_ids[:, :, None] == input_ids[:, None, :]  # (B, T, S): key s holds query t's token
        if pattern == "previous_token":
            target = earlier & ~earlier.tril(-2)  # s = t - 1
        elif pattern == "duplicate_token":
            target = same & earlier
        else:  # induction: key s follows a real copy of the query's token, same[t, s - 1]
            follows = torch.zeros_like(same)
            follows[:, :, 1:] = same[:, :, :-1] & real[:, None, :-1]
            target = follows & earlier
        target = target.expand(B, T, T).float()
    return target * real[:, None, :]


@torch.no_grad()
def head_scores(
    model: Bloom, input_ids: torch.Tensor, pattern: str | torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Every head's score for `pattern` on these tokens, (n_layer, nh): the mean over the batch's queries that have
    a target (and are not padding) of the attention probability the head puts on their targets. One forward pass
    without the LM head; each layer's probabilities are reduced as they are made, not kept."""
    target = target_pattern(pattern, input_ids, attention_mask)  # (B, T, S)
    scored = (target != 0).any(-1)  # (B, T): the queries with a target
    if attention_mask is not None:
        scored &= attention_mask != 0
    if not scored.any():
        needs = NEEDS[pattern if isinstance(pattern, str) else None]
        raise ValueError(f"no query of input_ids has a target of the {needs}")
    weight = scored.float() / scored.sum()  # (B, T): each scored query's share of the mean
    layers = find(model, "h.*.self_attention.probs")
    scores = [torch.empty(0)] * len(layers)

    def score_of(layer: int):
        def hook(module: torch.nn.Module, args: tuple, probs: torch.Tensor) -> None:  # probs (B, nh, T, S)
            on_target = (probs.float() * target[:, None]).sum(-1)  # (B, nh, T)
            scores[layer] = (on_target * weight[:, None]).sum((0, 2)).cpu()  # (nh,)

        return hook

    handles = [module.register_forward_hook(score_of(i)) for i, module in enumerate(layers.values())]
    try:
        check_attention_fits(model, *input_ids.shape)  # watched, the probabilities are never taken in chunks
        model.hidden(input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(scores)

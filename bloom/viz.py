"""Pictures of a forward pass (optional extra `viz`: matplotlib, imported only when a picture is drawn).

Each function writes one PNG of a fixed size (`figsize` inches x DPI) and returns its path.
"""

import math
import warnings
from pathlib import Path

import torch

from bloom.model import alibi_slopes

DPI = 100


def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def _figure(figsize: tuple[float, float]):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("pictures need matplotlib: pip install -e '.[viz]'") from None
    return Figure(figsize=figsize, dpi=DPI)


def _save(fig, path: Path) -> None:
    with warnings.catch_warnings():  # BLOOM speaks 46 languages; glyphs the font lacks are drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path)


def _label_axes(ax, tokens: list[str]) -> None:
    if len(tokens) <= 40:  # beyond that labels overlap; the picture still shows the pattern
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])


def attention_heads(probs: torch.Tensor, tokens: list[str], title: str, path: Path) -> Path:
    """One panel per head: (nh, T, T) attention probabilities, queries down, keys across."""
    n_head = probs.shape[0]
    rows, cols = _grid(n_head)
    fig = _figure((3.2 * cols, 3.2 * rows + 0.5))
    for head in range(n_head):
        ax = fig.add_subplot(rows, cols, head + 1)
        ax.imshow(probs[head].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {head}", fontsize=8)
        _label_axes(ax, tokens)
    fig.suptitle(title)
    _save(fig, path)
    return path


def alibi(n_head: int, n_tokens: int, path: Path) -> Path:
    """The ALiBi bias of each head as a query sees it: -slope x (query - key) on the keys it may attend to.

    The model adds slope x key position instead; per query row the two differ by a constant, which
    softmax ignores.
    """
    slopes = alibi_slopes(n_head)
    distance = torch.arange(n_tokens)[:, None] - torch.arange(n_tokens)[None, :]  # (T, T), query - key
    strongest = -slopes.max().item() * max(n_tokens - 1, 1)  # one colour scale for all heads, so slopes compare
    rows, cols = _grid(n_head)
    fig = _figure((2.6 * cols, 2.6 * rows + 0.5))
    for head in range(n_head):
        ax = fig.add_subplot(rows, cols, head + 1)
        bias = (-slopes[head] * distance).masked_fill(distance < 0, float("nan"))
        ax.imshow(bias.numpy(), cmap="magma", vmin=strongest, vmax=0)
        ax.set_title(f"head {head}: slope {slopes[head]:.4g}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"ALiBi bias, {n_head} heads, {n_tokens} tokens (darker: more penalised)")
    _save(fig, path)
    return path


def logit_lens_grid(probs: torch.Tensor, top_tokens: list[list[str]], tokens: list[str], path: Path) -> Path:
    """Layers (rows, embedding at the bottom) x positions (columns): each layer's top next-token guess and
    its probability. probs is (n_layer + 1, T); top_tokens the matching strings."""
    n_rows, T = probs.shape
    fig = _figure((1.5 + 0.9 * T, 1.5 + 0.45 * n_rows))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(probs.float().cpu().numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    for layer in range(n_rows):
        for t in range(T):
            ax.text(t, layer, top_tokens[layer][t][:8], ha="center", va="center", fontsize=6)
    ax.set_xticks(range(T), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(n_rows), ["embed"] + [f"h.{i}" for i in range(n_rows - 1)], fontsize=6)
    ax.set_title("logit lens: top next token after each layer (colour: its probability)")
    _save(fig, path)
    return path

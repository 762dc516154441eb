"""Pictures of a forward pass (optional extra `viz`: matplotlib, imported only when a picture is drawn).

Each function returns a matplotlib Figure laid out in inches so that nothing overlaps at any number of heads
(bloom-560m's 16, bloom-7b1's 32, bloom's 112) or tokens; `save` writes it as a PNG of exactly its size.
Heads and layers are numbered from 0, as in `bloom.research.probe` names ("h.0", head 0). Every heat map has a
colour bar with its scale; panels of one figure share it.

- Heat map panels are PANEL_MIN to PANEL_MAX inches square, growing with the tokens (PANEL_PER_TOKEN each).
- Token labels are drawn on the outer panels only (keys under the lowest panel of each column, queries
  left of the first column) and thinned to every k-th token when a label would not fit in its cell.
"""

import math
import warnings
from pathlib import Path

import torch

from bloom.config import write_whole
from bloom.model import alibi_slopes

DPI = 100
PANEL_MIN, PANEL_MAX, PANEL_PER_TOKEN = 2.0, 4.0, 0.06  # inches
LABEL_PT = 7  # token labels
LABEL_CHARS = 12  # longer labels are cut, with "…"
LABEL_PITCH = 1.4 * LABEL_PT / 72  # inches along an axis that one label needs, with some air
GAP_X, GAP_Y = 0.25, 0.4  # between panels: room for a panel's title above it
MARGIN = 0.3  # around everything
TITLE_IN = 0.6  # the figure's title
COLORBAR_IN = 1.1  # the colour bar, its ticks and its label, right of the panels


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("pictures need matplotlib: pip install -e '.[viz]'") from None
    return Figure(figsize=(width, height), dpi=DPI)


def save(fig, path: Path) -> Path:
    """Write the figure as a PNG of its own size (figsize x DPI pixels) and return the path."""
    with warnings.catch_warnings():  # BLOOM speaks 46 languages; glyphs the font lacks are drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        write_whole(path, lambda partial: fig.savefig(partial, dpi=DPI, format="png"))
    return path


def _short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


def _label_room(tokens: list[str]) -> float:
    """Inches that the longest (cut) label takes across its axis, plus the tick."""
    return 0.15 + max(len(_short(t)) for t in tokens) * 0.6 * LABEL_PT / 72


def label_step(n_tokens: int, axis_inches: float) -> int:
    """Label every k-th token, with k the smallest step at which labels do not overlap along the axis."""
    return max(1, math.ceil(n_tokens * LABEL_PITCH / axis_inches))


def _ticks(ax, axis: str, tokens: list[str], axis_inches: float) -> None:
    positions = list(range(0, len(tokens), label_step(len(tokens), axis_inches)))
    labels = [_short(tokens[i]) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, labels, rotation=90, fontsize=LABEL_PT)
    else:
        ax.set_yticks(positions, labels, fontsize=LABEL_PT)


def _panel_grid(n_panels: int, panel: float, left: float, bottom: float):
    """A figure with a grid of square panels, (rows, cols) near-square, and room for a colour bar.

    Returns (fig, axes in row-major order, colour bar axes, cols). `left` and `bottom` are the inches kept
    for labels left of the first column and under the lowest panels.
    """
    cols = math.ceil(math.sqrt(n_panels))
    rows = math.ceil(n_panels / cols)
    grid_w, grid_h = cols * panel + (cols - 1) * GAP_X, rows * panel + (rows - 1) * GAP_Y
    width = MARGIN + left + grid_w + COLORBAR_IN + MARGIN
    height = MARGIN + bottom + grid_h + GAP_Y + TITLE_IN
    fig = _figure(width, height)
    axes = []
    for i in range(n_panels):
        row, col = divmod(i, cols)
        x = MARGIN + left + col * (panel + GAP_X)
        y = MARGIN + bottom + (rows - 1 - row) * (panel + GAP_Y)
        axes.append(fig.add_axes((x / width, y / height, panel / width, panel / height)))
    bar_x = MARGIN + left + grid_w + 0.2
    colorbar = fig.add_axes((bar_x / width, (MARGIN + bottom) / height, 0.15 / width, grid_h / height))
    return fig, axes, colorbar, cols


def _panel_inches(n_tokens: int) -> float:
    return min(PANEL_MAX, max(PANEL_MIN, PANEL_PER_TOKEN * n_tokens))


def attention_heads(probs: torch.Tensor, tokens: list[str], title: str):
    """One panel per head of a layer: (nh, T, T) attention probabilities, queries down, keys across."""
    n_head, T, _ = probs.shape
    panel, room = _panel_inches(T), _label_room(tokens)
    fig, axes, bar, cols = _panel_grid(n_head, panel, left=room, bottom=room)
    for head, ax in enumerate(axes):
        image = ax.imshow(probs[head].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"head {head}", fontsize=8, pad=3)
        ax.set_xticks([])
        ax.set_yticks([])
        if head + cols >= n_head:  # the lowest panel of its column
            _ticks(ax, "x", tokens, panel)
        if head % cols == 0:
            _ticks(ax, "y", tokens, panel)
    fig.colorbar(image, cax=bar, label="attention probability (0 to 1)")
    fig.suptitle(f"{title}: attention of each head, queries down, keys across (heads from 0)",
                 y=1 - MARGIN / fig.get_figheight())  # fmt: skip
    return fig


def alibi(n_head: int, n_tokens: int):
    """The ALiBi bias of each head as a query sees it: -slope x (query - key) on the keys it may attend to.

    The model adds slope x key position instead; per query row the two differ by a constant, which
    softmax ignores. One colour scale for all heads, so that slopes compare.
    """
    slopes = alibi_slopes(n_head)
    distance = torch.arange(n_tokens)[:, None] - torch.arange(n_tokens)[None, :]  # (T, T), query - key
    strongest = -slopes.max().item() * max(n_tokens - 1, 1)
    fig, axes, bar, _ = _panel_grid(n_head, max(PANEL_MIN, _panel_inches(n_tokens) / 2), left=0, bottom=0)
    for head, ax in enumerate(axes):
        bias = (-slopes[head] * distance).masked_fill(distance < 0, float("nan"))
        image = ax.imshow(bias.numpy(), cmap="magma", vmin=strongest, vmax=0, interpolation="nearest")
        ax.set_title(f"head {head}: slope {slopes[head]:.4g}", fontsize=7, pad=3)
        ax.set_xticks([])
        ax.set_yticks([])
    label = "bias, relative form: -slope × (query - key)\n(the model adds slope × key; equal after softmax)"
    fig.colorbar(image, cax=bar, label=label)
    fig.suptitle(f"ALiBi bias, {n_head} heads (from 0), {n_tokens} tokens; queries down, keys across, "
                 "white: masked", y=1 - MARGIN / fig.get_figheight())  # fmt: skip
    return fig


def logit_lens_grid(probs: torch.Tensor, top_tokens: list[list[str]], tokens: list[str]):
    """Layers (rows, embedding at the bottom) x positions (columns): each layer's top next-token guess and
    its probability. probs is (n_layer + 1, T); top_tokens the matching strings. The guesses are written in
    the cells when the cells are wide enough (up to about 40 tokens)."""
    n_rows, T = probs.shape
    column = 0.9 if T <= 40 else max(0.12, 36 / T)  # inches
    row = max(0.3, 1.5 / n_rows)  # inches; at least 1.5 for the grid, so that the colour bar can be read
    room = _label_room(tokens)
    width = MARGIN + 0.6 + T * column + COLORBAR_IN + MARGIN
    height = MARGIN + room + n_rows * row + TITLE_IN
    fig = _figure(width, height)
    ax = fig.add_axes(((MARGIN + 0.6) / width, (MARGIN + room) / height, T * column / width, n_rows * row / height))
    image = ax.imshow(probs.float().cpu().numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower",
                      interpolation="nearest")  # fmt: skip
    if column >= 0.6:
        for layer in range(n_rows):
            for t in range(T):
                colour = "white" if probs[layer, t] > 0.6 else "black"
                ax.text(t, layer, _short(top_tokens[layer][t])[:8], ha="center", va="center", fontsize=6, color=colour)
    _ticks(ax, "x", tokens, T * column)
    ax.set_yticks(range(n_rows), ["embed"] + [f"h.{i}" for i in range(n_rows - 1)], fontsize=LABEL_PT)
    bar = fig.add_axes(((width - MARGIN - COLORBAR_IN + 0.2) / width, (MARGIN + room) / height, 0.15 / width,
                        n_rows * row / height))  # fmt: skip
    fig.colorbar(image, cax=bar, label="probability of the top token")
    fig.suptitle("logit lens: top next token after each block h.i (from 0), read through ln_f and the LM head",
                 y=1 - MARGIN / height)  # fmt: skip
    return fig

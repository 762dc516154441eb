"""Pictures of a forward pass (optional extra `viz`: matplotlib, imported only when a picture is drawn).

Each function returns a matplotlib Figure laid out in inches so that nothing overlaps at any number of heads
(bloom-560m's 16, bloom-7b1's 32, bloom's 112) or tokens; `save` writes it as a PNG of exactly its size.
Heads and layers are numbered from 0, as in `bloom.research.probe` names ("h.0", head 0). Every heat map has a
colour bar with its scale; panels of one figure share it.

- Heat map panels are PANEL_MIN to PANEL_MAX inches square, growing with the tokens (PANEL_PER_TOKEN each).
- Token labels are drawn on the outer panels only (keys under the lowest panel of each column, queries
  left of the first column) and thinned to every k-th token when a label would not fit in its cell.
- Titles and colour bar labels are wrapped into lines that fit the picture's width and the bar's height, so that
  a short prompt's narrow picture keeps them whole.
"""

import math
import textwrap
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
TITLE_PT, BAR_PT = 11, 10  # the figure's title, a colour bar's label
LINE = 1.3 / 72  # inches a line of text takes per point of its size
CHAR_IN = 0.62 / 72  # inches a character takes per point, at most on average (DejaVu Sans), for wrapping
COLORBAR_IN = 1.1  # the colour bar, its ticks and a one-line label, right of the panels


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


def _wrap(text: str, inches: float, points: float) -> str:
    """`text` in lines of at most `inches` at this font size, its own line breaks kept."""
    chars = max(8, int(inches / (CHAR_IN * points)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _lines(text: str) -> int:
    return text.count("\n") + 1


def _titled(width: float, body_height: float, title: str, bar_height: float, bar_label: str):
    """A figure `width` inches wide (plus room for a colour bar label longer than one line) with `body_height`
    inches under its title, which is wrapped to the width, as the bar's label is to `bar_height`. Returns (fig,
    the bar's label wrapped)."""
    bar_label = _wrap(bar_label, bar_height, BAR_PT)
    width += (_lines(bar_label) - 1) * BAR_PT * LINE
    title = _wrap(title, width - 2 * MARGIN, TITLE_PT)
    height = body_height + _lines(title) * TITLE_PT * LINE + 0.2
    fig = _figure(math.ceil(width * DPI) / DPI, math.ceil(height * DPI) / DPI)  # whole pixels
    fig.suptitle(title, fontsize=TITLE_PT, y=1 - MARGIN / height)
    return fig, bar_label


def _panel_grid(n_panels: int, panel: float, left: float, bottom: float, title: str, bar_label: str):
    """A figure with a grid of square panels, (rows, cols) near-square, a title, and room for a colour bar.

    Returns (fig, axes in row-major order, colour bar axes, cols, the bar's label wrapped to its height). `left` and
    `bottom` are the inches kept for labels left of the first column and under the lowest panels.
    """
    cols = math.ceil(math.sqrt(n_panels))
    rows = math.ceil(n_panels / cols)
    grid_w, grid_h = cols * panel + (cols - 1) * GAP_X, rows * panel + (rows - 1) * GAP_Y
    body_height = MARGIN + bottom + grid_h + GAP_Y
    fig, bar_label = _titled(MARGIN + left + grid_w + COLORBAR_IN + MARGIN, body_height, title, grid_h, bar_label)
    width, height = fig.get_size_inches()
    axes = []
    for i in range(n_panels):
        row, col = divmod(i, cols)
        x = MARGIN + left + col * (panel + GAP_X)
        y = MARGIN + bottom + (rows - 1 - row) * (panel + GAP_Y)
        axes.append(fig.add_axes((x / width, y / height, panel / width, panel / height)))
    bar_x = MARGIN + left + grid_w + 0.2
    colorbar = fig.add_axes((bar_x / width, (MARGIN + bottom) / height, 0.15 / width, grid_h / height))
    return fig, axes, colorbar, cols, bar_label


def _panel_inches(n_tokens: int) -> float:
    return min(PANEL_MAX, max(PANEL_MIN, PANEL_PER_TOKEN * n_tokens))


def attention_heads(probs: torch.Tensor, tokens: list[str], title: str):
    """One panel per head of a layer: (nh, T, T) attention probabilities, queries down, keys across."""
    n_head, T, _ = probs.shape
    panel, room = _panel_inches(T), _label_room(tokens)
    fig, axes, bar, cols, bar_label = _panel_grid(
        n_head, panel, room, room, f"{title}: attention of each head, queries down, keys across (heads from 0)",
        "attention probability (0 to 1)",
    )  # fmt: skip
    for head, ax in enumerate(axes):
        image = ax.imshow(probs[head].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"head {head}", fontsize=8, pad=3)
        ax.set_xticks([])
        ax.set_yticks([])
        if head + cols >= n_head:  # the lowest panel of its column
            _ticks(ax, "x", tokens, panel)
        if head % cols == 0:
            _ticks(ax, "y", tokens, panel)
    fig.colorbar(image, cax=bar).set_label(bar_label, fontsize=BAR_PT)
    return fig


def alibi(n_head: int, n_tokens: int):
    """The ALiBi bias of each head as a query sees it: -slope x (query - key) on the keys it may attend to.

    The model adds slope x key position instead; per query row the two differ by a constant, which
    softmax ignores. One colour scale for all heads, so that slopes compare.
    """
    slopes = alibi_slopes(n_head)
    distance = torch.arange(n_tokens)[:, None] - torch.arange(n_tokens)[None, :]  # (T, T), query - key
    strongest = -slopes.max().item() * max(n_tokens - 1, 1)
    title = (f"ALiBi bias, {n_head} head{'s' * (n_head > 1)} (from 0), {n_tokens} token{'s' * (n_tokens > 1)}; "
             "queries down, keys across, white: masked")  # fmt: skip
    label = "bias, relative form: -slope × (query - key)\n(the model adds slope × key; equal after softmax)"
    panel = max(PANEL_MIN, _panel_inches(n_tokens) / 2)
    fig, axes, bar, _, label = _panel_grid(n_head, panel, 0, 0, title, label)
    for head, ax in enumerate(axes):
        bias = (-slopes[head] * distance).masked_fill(distance < 0, float("nan"))
        image = ax.imshow(bias.numpy(), cmap="magma", vmin=strongest, vmax=0, interpolation="nearest")
        ax.set_title(f"head {head}: slope {slopes[head]:.4g}", fontsize=7, pad=3)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, cax=bar).set_label(label, fontsize=BAR_PT)
    return fig


def logit_lens_grid(probs: torch.Tensor, top_tokens: list[list[str]], tokens: list[str]):
    """Layers (rows, embedding at the bottom) x positions (columns): each layer's top next-token guess and
    its probability. probs is (n_layer + 1, T); top_tokens the matching strings. The guesses are written in
    the cells when the cells are wide enough (up to about 40 tokens)."""
    n_rows, T = probs.shape
    column = 0.9 if T <= 40 else max(0.12, 36 / T)  # inches
    row = max(0.3, 1.5 / n_rows)  # inches; at least 1.5 for the grid, so that the colour bar can be read
    room = _label_room(tokens)
    title = "logit lens: top next token after each block h.i (from 0), read through ln_f and the LM head"
    body_height = MARGIN + room + n_rows * row + GAP_Y
    fig, bar_label = _titled(MARGIN + 0.6 + T * column + COLORBAR_IN + MARGIN, body_height, title, n_rows * row,
                             "probability of the top token")  # fmt: skip
    width, height = fig.get_size_inches()
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
    bar_x = MARGIN + 0.6 + T * column + 0.2
    bar = fig.add_axes((bar_x / width, (MARGIN + room) / height, 0.15 / width, n_rows * row / height))
    fig.colorbar(image, cax=bar).set_label(bar_label, fontsize=BAR_PT)
    return fig

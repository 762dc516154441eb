"""The interactive page of `bloom inspect`: one self-contained HTML file (no network, nothing to build).

A reader picks a layer and a head and sees its attention pattern with the token labels, hovers a cell for
the exact probability, and switches to the head's ALiBi bias or to the logit lens. The page is
`page.html` beside this module (plain HTML, CSS and JavaScript); `write` fills in its data: the attention
probabilities and the logit lens's top-k as base64 float32 (exact, and 4 bytes a number before encoding),
the slopes, the token labels. Heads and layers are numbered from 0, as in `bloom.research.probe` names.

The page holds every head's probabilities: 4·n_layer·nh·T² bytes, a third more in base64 (bloom-560m at
100 tokens: 20 MB; bloom at 100 tokens: 70 layers of 112 heads, 420 MB, too much for a browser tab).
"""

import base64
import html
import json
from pathlib import Path

import torch

from bloom.config import write_whole
from bloom.model import alibi_slopes

TEMPLATE = Path(__file__).with_name("page.html")


def size_bytes(n_layer: int, n_head: int, n_tokens: int) -> int:
    """About the page's size: every head's T × T probabilities, 4 bytes each and a third more in base64."""
    return 4 * n_layer * n_head * n_tokens * n_tokens * 4 // 3


def _float32_base64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.detach().float().cpu().contiguous().numpy().tobytes()).decode("ascii")


def write(
    path: Path,
    prompt: str,
    tokens: list[str],
    attention: torch.Tensor,
    lens_probs: torch.Tensor,
    lens_tokens: list[list[list[str]]],
) -> Path:
    """Write the page and return its path.

    tokens: the prompt's T token labels. attention: (n_layer, nh, T, T) probabilities, queries then keys.
    lens_probs: (n_layer + 1, T, k), each layer's top-k next-token probabilities (row 0: the embedding);
    lens_tokens: the matching labels, [n_layer + 1][T][k].
    """
    n_layer, n_head, T, _ = attention.shape
    if T != len(tokens) or lens_probs.shape[:2] != (n_layer + 1, T):
        raise ValueError(f"attention {tuple(attention.shape)} and lens {tuple(lens_probs.shape)} do not match "
                         f"{n_layer} layers and {len(tokens)} tokens")  # fmt: skip
    data = {
        "prompt": prompt,
        "tokens": tokens,
        "n_layer": n_layer,
        "n_head": n_head,
        "slopes": alibi_slopes(n_head).tolist(),  # float32 values, exact as JSON numbers
        "attention": _float32_base64(attention),
        "lens_k": lens_probs.shape[2],
        "lens_probs": _float32_base64(lens_probs),
        "lens_tokens": lens_tokens,
    }
    # Inside <script>, "</script>" in a token would end the element: JSON may spell "<" as \u003c instead.
    text = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    # Each placeholder once, the data first: then the first __TITLE__ is still the template's <title>, even
    # when the data's tokens spell it, and a title spelling __DATA__ is never filled with the data.
    page = TEMPLATE.read_text(encoding="utf-8").replace("__DATA__", text, 1)
    page = page.replace("__TITLE__", html.escape(prompt[:60]), 1)
    # a page is whole or not there: never half of one beside an earlier one's pictures
    write_whole(path, lambda partial: partial.write_text(page, encoding="utf-8"))
    return path

"""Pictures: every heat map has a colour bar, PNGs have the figure's size, and no label overlaps another
label or a panel, at bloom-560m's 16 heads and 24 layers, bloom-7b1's 32 heads and bloom's 112."""

import base64
import itertools
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from bloom import load_tokenizer
from bloom.research import viz

WORDS = "The quick brown fox jumps over the lazy dog while Schwarzwälder cherry cakes wait on the sill".split()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # width, height from the IHDR chunk


def labels(n: int) -> list[str]:
    return ["·" * (i > 0) + WORDS[i % len(WORDS)] for i in range(n)]


def attention(n_head: int, T: int):
    probs = torch.softmax(torch.randn(n_head, T, T) + torch.full((T, T), float("-inf")).triu(1), dim=-1)
    return viz.attention_heads(probs, labels(T), "layer 3")


def lens(n_layer: int, T: int):
    top = [[WORDS[(layer + t) % len(WORDS)] for t in range(T)] for layer in range(n_layer + 1)]
    return viz.logit_lens_grid(torch.rand(n_layer + 1, T), top, labels(T))


FIGURES = {
    "attention, 16 heads, 12 tokens": lambda: attention(16, 12),
    "attention, 16 heads, 70 tokens": lambda: attention(16, 70),
    "attention, 32 heads, 20 tokens": lambda: attention(32, 20),
    "attention, 112 heads, 12 tokens": lambda: attention(112, 12),
    "alibi, 16 heads, 30 tokens": lambda: viz.alibi(16, 30),
    "alibi, 112 heads, 12 tokens": lambda: viz.alibi(112, 12),
    "logit lens, 24 layers, 12 tokens": lambda: lens(24, 12),
    "logit lens, 24 layers, 90 tokens": lambda: lens(24, 90),
    # a short prompt of a small model: narrow pictures, whose titles and colour bar labels must still fit
    "attention, 4 heads, 1 token": lambda: attention(4, 1),
    "attention, 16 heads, 3 tokens": lambda: attention(16, 3),
    "alibi, 1 head, 1 token": lambda: viz.alibi(1, 1),
    "alibi, 4 heads, 3 tokens": lambda: viz.alibi(4, 3),
    "logit lens, 2 layers, 1 token": lambda: lens(2, 1),
    "logit lens, 4 layers, 3 tokens": lambda: lens(4, 3),
}


@pytest.mark.parametrize("name", FIGURES)
def test_each_picture_has_colour_bars_its_size_and_no_overlapping_labels(name, tmp_path):
    fig = FIGURES[name]()
    check_colour_bars_and_panels(fig, name)
    FigureCanvasAgg(fig)  # savefig draws with this canvas; its renderer then measures the text below
    path = viz.save(fig, tmp_path / "picture.png")
    width, height = fig.get_size_inches() * viz.DPI
    assert png_size(path) == (round(width), round(height))
    check_no_overlaps(fig, fig.canvas.get_renderer())


def check_colour_bars_and_panels(fig, name: str) -> None:
    images = [image for ax in fig.axes for image in ax.images]
    with_bar = [image for image in images if image.colorbar is not None]
    assert with_bar and all(image.colorbar.ax.get_ylabel() for image in with_bar)  # a bar that says what it shows
    scales = {(image.cmap.name, image.norm.vmin, image.norm.vmax) for image in with_bar}
    assert all((image.cmap.name, image.norm.vmin, image.norm.vmax) in scales for image in images)
    panels = [image.axes for image in images]
    if not name.startswith("logit lens"):
        assert [ax.get_title().split(":")[0] for ax in panels] == [f"head {h}" for h in range(len(panels))]
        for ax in panels:  # at least PANEL_MIN inches square
            box = ax.get_window_extent()
            assert box.width >= viz.PANEL_MIN * viz.DPI - 1 and abs(box.width - box.height) < 1


def check_no_overlaps(fig, renderer) -> None:
    """No text (tick labels, titles, colour bar labels) overlaps another, or a panel, or leaves the picture."""
    texts = [fig._suptitle] if fig._suptitle else []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        for axis in (ax.xaxis, ax.yaxis):  # the labels of ticks inside the axis's range: the ones drawn
            low, high = sorted(axis.get_view_interval())
            ticks = zip(axis.get_ticklabels(), axis.get_majorticklocs(), strict=True)
            texts += [t for t, at in ticks if low <= at <= high]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]
    canvas = fig.bbox
    for text, box in boxes:
        assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1 and canvas.y0 <= box.y0 and box.y1 <= canvas.y1, text
    shrunk = [(text, box.expanded(0.98, 0.98)) for text, box in boxes]  # touching is fine, overlapping is not
    for (a, box_a), (b, box_b) in itertools.combinations(shrunk, 2):
        assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"
    panels = [ax.get_window_extent() for ax in fig.axes]
    for text, box in shrunk:
        assert not any(box.overlaps(panel) for panel in panels), f"{text!r} overlaps a panel"


def test_labels_are_thinned_only_when_they_would_not_fit(monkeypatch):
    def drawn(fig) -> int:  # key labels under the first column
        return len([t for t in fig.axes[-4].get_xticklabels() if t.get_text()])  # 16 heads: the last row's first

    assert drawn(attention(16, 12)) == 12
    assert 70 / 4 <= drawn(attention(16, 70)) < 70
    monkeypatch.setattr(viz, "label_step", lambda n_tokens, inches: 1)  # without thinning, 70 labels collide
    with pytest.raises(AssertionError, match="overlaps"):
        fig = attention(16, 70)
        FigureCanvasAgg(fig).draw()
        check_no_overlaps(fig, fig.canvas.get_renderer())


def test_inspect_command_writes_the_pictures_and_the_page(tiny_model_folder, tmp_path):
    command = [sys.executable, "-m", "bloom", "inspect", "--model", str(tiny_model_folder),
               "--prompt", "Le petit prince.", "--out", str(tmp_path / "pictures")]  # fmt: skip
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "attention_layer07.png").write_bytes(b"")  # left by a deeper model's run
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"warning: {tmp_path / 'pictures'} also holds attention_layer07.png from an earlier run" in result.stderr
    written = [Path(line) for line in result.stdout.splitlines()]
    names = sorted(p.name for p in written)
    assert names == ["alibi.png", "attention_layer00.png", "attention_layer01.png", "inspect.html", "logit_lens.png"]
    for path in written:
        assert path.parent == tmp_path / "pictures" and path.stat().st_size > 5000
        if path.suffix == ".png":
            width, height = png_size(path)
            assert width >= 600 and height >= 250
    page = (tmp_path / "pictures" / "inspect.html").read_text()
    assert "http" not in page  # nothing to fetch

    # the page's data are transformers' attention probabilities and logit lens for the same prompt
    from transformers import BloomForCausalLM

    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    ids = torch.tensor([load_tokenizer(tiny_model_folder).encode("Le petit prince.")])
    hf = BloomForCausalLM.from_pretrained(tiny_model_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(input_ids=ids, output_attentions=True, output_hidden_states=True)
        normed = [hf.transformer.ln_f(h) for h in out.hidden_states[:-1]] + [out.hidden_states[-1]]
        lens = torch.stack([torch.softmax(hf.lm_head(h)[0], dim=-1).topk(data["lens_k"]).values for h in normed])
    attention = torch.frombuffer(bytearray(base64.b64decode(data["attention"])), dtype=torch.float32)
    expected = torch.cat([layer[0] for layer in out.attentions])  # (n_layer * nh, T, T)
    torch.testing.assert_close(attention.view(expected.shape), expected, rtol=0, atol=1e-6)
    lens_probs = torch.frombuffer(bytearray(base64.b64decode(data["lens_probs"])), dtype=torch.float32)
    torch.testing.assert_close(lens_probs.view(lens.shape), lens, rtol=0, atol=1e-6)
    assert (data["n_layer"], data["n_head"], len(data["tokens"])) == (2, 6, ids.shape[1])

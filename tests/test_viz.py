"""Pictures: `bloom inspect` writes non-empty PNGs of the sizes the drawing functions promise."""

import struct
import subprocess
import sys
from pathlib import Path

import torch

from bloom import viz


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # width, height from the IHDR chunk


def test_each_picture_has_the_promised_size(tmp_path):
    probs = torch.softmax(torch.randn(6, 5, 5), dim=-1).tril()
    tokens = ["a", "b", "c", "d", "e"]
    attention = viz.attention_heads(probs, tokens, "t", tmp_path / "a.png")  # 6 heads: 2 x 3 panels
    assert png_size(attention) == (3 * 320, int((2 * 3.2 + 0.5) * 100))
    assert png_size(viz.alibi(16, 30, tmp_path / "b.png")) == (4 * 260, int((4 * 2.6 + 0.5) * 100))
    lens = torch.rand(4, 5)
    top = [["x"] * 5 for _ in range(4)]
    assert png_size(viz.logit_lens_grid(lens, top, tokens, tmp_path / "c.png")) == (600, 330)


def test_inspect_command_writes_the_pictures(tiny_model_folder, tmp_path):
    command = [sys.executable, "-m", "bloom", "inspect", "--model", str(tiny_model_folder),
               "--prompt", "Le petit prince.", "--out", str(tmp_path / "pictures")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    written = [Path(line) for line in result.stdout.splitlines()]
    names = sorted(p.name for p in written)
    assert names == ["alibi.png", "attention_h00.png", "attention_h01.png", "logit_lens.png"]
    for path in written:
        assert path.parent == tmp_path / "pictures" and path.stat().st_size > 5000
        width, height = png_size(path)
        assert width >= 600 and height >= 250

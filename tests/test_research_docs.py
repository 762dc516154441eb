"""docs/research.md's worked examples run as written: its python blocks, in order, in one namespace."""

import re
from pathlib import Path

import torch

DOC = Path(__file__).parent.parent / "docs" / "research.md"


def test_every_python_block_of_the_research_guide_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 7, "the guide lost its examples"
    namespace = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)  # noqa: S102
    assert all(not m._forward_hooks for m in namespace["model"].modules())
    assert isinstance(namespace["attrib"], torch.Tensor)

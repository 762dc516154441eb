"""Run under torchrun by tests/test_parallel.py: load a checkpoint split over the processes and save what
this process computed (logits, greedy tokens, the shapes it holds) to OUT/rank<r>.pt."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bloom import generate, load_pretrained

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo")
model = load_pretrained(folder, dtype="fp32", tensor_parallel=True)
ids = torch.randint(4, 320, (3, 11), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
mask[1, :4] = 0
mask[2, :9] = 0
with torch.no_grad():
    logits = model(ids, mask)
tokens = generate(model, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=-1)
shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
torch.save({"ids": ids, "mask": mask, "logits": logits, "tokens": tokens, "shapes": shapes},
           out / f"rank{dist.get_rank()}.pt")  # fmt: skip
dist.destroy_process_group()

"""Tensor parallelism: 2 processes with gloo give the single-process logits and tokens, each holding its slice."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_quantize import RMS_BOUND
from tiny_checkpoint import random_hf_bloom, save_bigscience

from bloom import Bloom, BloomConfig, generate, load_pretrained
from bloom.scale.parallel import split_heads

WORKER = str(Path(__file__).parent / "tp_worker.py")


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    return save_bigscience(random_hf_bloom(hidden_size=48, n_head=6, n_layer=2), tmp_path_factory.mktemp("tp"),
                           dtype=torch.float32)  # fmt: skip


def test_two_processes_equal_one(sharded_checkpoint, tmp_path):
    result = torchrun(2, WORKER, str(sharded_checkpoint), str(tmp_path), "fp32")
    assert result.returncode == 0, result.stderr[-3000:]
    whole = load_pretrained(sharded_checkpoint, dtype="fp32")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        ids, mask = got["ids"], got["mask"]
        with torch.no_grad():
            expected = whole(ids, mask)
        real = mask.bool()
        torch.testing.assert_close(got["logits"][real], expected[real], rtol=0, atol=1e-5)
        assert torch.equal(got["tokens"], generate(whole, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[]))
        # each process holds (and so read) only its slice: half the heads, half the MLP
        shapes = {name: shape for name, (shape, _) in got["tensors"].items()}
        assert shapes["h.0.self_attention.query_key_value.weight"] == (72, 48)  # 3 heads of 3 x 8 rows
        assert shapes["h.0.self_attention.dense.weight"] == (48, 24)
        assert shapes["h.1.mlp.dense_h_to_4h.weight"] == (96, 48)
        assert shapes["h.1.mlp.dense_4h_to_h.weight"] == (48, 96)
        assert shapes["word_embeddings.weight"] == (320, 48)  # replicated
    # sampling without a given seed: process 0 draws one and sends it, so every process samples alike
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert first["seed"] == second["seed"] and torch.equal(first["sampled"], second["sampled"])
    ids, mask = first["ids"], first["mask"]  # and they sample what one process does with that seed
    alone = generate(whole, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[], do_sample=True,
                     seed=first["seed"])  # fmt: skip
    assert torch.equal(first["sampled"], alone)


def test_int8_and_the_compiled_step_under_two_processes(tmp_path):
    # 128 features, so that the split row-parallel layers (64 and 256 input features) take the CPU's int8 kernel
    hf = random_hf_bloom(hidden_size=128, n_head=4, n_layer=2)
    folder = save_bigscience(hf, tmp_path / "checkpoint", dtype=torch.bfloat16)
    result = torchrun(2, WORKER, str(folder), str(tmp_path), "bf16", "int8")
    assert result.returncode == 0, result.stderr[-3000:]
    bf16 = load_pretrained(folder, dtype="bf16")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        with torch.no_grad():
            reference = bf16(got["ids"], got["mask"]).float()
        real = got["mask"].bool()
        # each process scales its own columns of a row-parallel weight, so the error is int8's, not more
        error = (got["logits"].float() - reference)[real].pow(2).mean().sqrt()
        assert error <= RMS_BOUND * reference[real].pow(2).mean().sqrt()
        assert torch.equal(got["tokens_compiled"], got["tokens"])
        tensors = got["tensors"]
        assert tensors["h.0.self_attention.dense.weight"] == ((128, 64), torch.int8)  # 2 of 4 heads, int8
        assert tensors["h.1.mlp.dense_4h_to_h.weight"] == ((128, 256), torch.int8)
        assert tensors["h.1.mlp.dense_4h_to_h.scale"] == ((128,), torch.bfloat16)  # this process's own scales
        assert tensors["h.1.mlp.dense_h_to_4h.weight"] == ((256, 128), torch.int8)


def test_the_command_line_under_torchrun(tiny_model_folder):
    args = [
        "--model",
        str(tiny_model_folder),
        "--prompt",
        "Bonjour, le monde",
        "--max-new-tokens",
        "8",
        "--dtype",
        "fp32",
    ]
    alone = subprocess.run([sys.executable, "-m", "bloom", "generate", *args], capture_output=True, text=True)
    split = torchrun(2, "-m", "bloom", "generate", *args, "--tp", "2")
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == alone.stdout  # printed once, by process 0
    assert "new 8 tokens" in split.stderr


def test_the_command_line_under_torchrun_stops_at_eos(eos_model_folder):
    """Every process must stop at the same step: one that stopped early would leave the others in an all_reduce."""
    from conftest import EOS_PROMPT

    args = ["--model", str(eos_model_folder), "--prompt", EOS_PROMPT, "--max-new-tokens", "20", "--dtype", "fp32"]
    alone = subprocess.run([sys.executable, "-m", "bloom", "generate", *args], capture_output=True, text=True)
    split = torchrun(2, "-m", "bloom", "generate", *args, "--tp", "2")
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == alone.stdout
    assert "new 3 tokens" in split.stderr


def test_heads_must_divide_over_the_processes():
    with torch.device("meta"):
        model = Bloom(BloomConfig(hidden_size=48, n_layer=2, n_head=6, vocab_size=100))
    with pytest.raises(ValueError, match="6 attention heads cannot be split evenly over 4 processes"):
        split_heads(model, 0, 4)


def test_tensor_parallel_needs_a_process_group(sharded_checkpoint):
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        load_pretrained(sharded_checkpoint, tensor_parallel=True)


def test_tp_without_torchrun_is_refused(tiny_model_folder):
    result = subprocess.run([sys.executable, "-m", "bloom", "generate", "--model", str(tiny_model_folder),
                             "--prompt", "x", "--tp", "2"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "torchrun --nproc-per-node 2" in result.stderr


def test_torchrun_without_tp_is_refused(tiny_model_folder, tmp_path):
    """Each process would run the whole model and print everything: the launch is named, before any weight."""
    (tmp_path / "t.txt").write_text("some text to score")
    for command, message in [
        (["generate", "--prompt", "x"], "torchrun launched 2 processes without --tp: pass --tp 2"),
        (["perplexity", "--file", str(tmp_path / "t.txt")], "launched 2 processes, but this command runs in one"),
    ]:
        result = subprocess.run([sys.executable, "-m", "bloom", *command, "--model", str(tiny_model_folder)],
                                capture_output=True, text=True, env=os.environ | {"WORLD_SIZE": "2"})  # fmt: skip
        assert result.returncode == 2 and message in result.stderr and result.stdout == "", result.stderr

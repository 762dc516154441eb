"""`bloom bench` runs its workers and prints one table: ours, ours-int8 and transformers, with the ratios.

Only that the measurement runs end to end and reports what it claims is tested here; speed is never asserted.
"""

import json
import subprocess
import sys

import torch
from transformers import BloomForCausalLM

import bloom.command_line.bench
from bloom import generate, load_pretrained, matvec
from bloom.command_line.bench import Bandwidth, TokenClock, float32_view, read_into_page_cache, spread_warnings


def test_bench_prints_the_side_by_side_table(tiny_model_folder, tmp_path):
    lengths = ["--batch-size", "3", "--prompt-len", "8", "--new-tokens", "4", "--reps", "1", "--runs", "1"]
    command = [sys.executable, "-P", "-m", "bloom", "bench", "--model", str(tiny_model_folder), "--dtype", "fp32",
               *lengths, "--quantize", "int8"]  # fmt: skip
    (tmp_path / "bloom").mkdir()  # run from beside a folder named bloom, as from a clone's parent: not the package
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"", "ours", "ours-int8", "transformers", "ours / transformers", "ours-int8 / ours"}
    assert all(len(line.split("|")) == 13 for line in rows.values())  # name and 10 figures per row
    assert "memory GB/s | of memory GB/s |" in rows[""]  # the machine's bandwidth, measured in each worker
    assert "weights' GB/s | of weights' GB/s |" in rows[""]  # and over the memory of each model's weights
    assert "fp32 | batch 3 | prompts of 4-8 tokens, left-padded | 4 new tokens | ours eager" in result.stdout
    tiles = {"avx512": "AVX-512 decode kernels", "avx2": "AVX2 decode kernels"}.get(
        matvec.library().tiles, "portable decode kernels"
    )
    assert f"threads, {tiles}" in result.stdout  # which kernels ours decoded with
    assert "generated tokens identical (ours, transformers): yes" in result.stdout  # fp32 greedy: bit parity


def test_the_clock_gets_each_new_token_of_either_implementation_once(tiny_model_folder):
    """The decode is timed from the first new token to the last: transformers' streamer protocol hands the clock
    the prompt first (no new token) and a batch's tokens per step, as ours does."""
    ids = torch.tensor([[5, 6, 7, 8], [3, 3, 9, 10]])
    mask = (ids != 3).long()
    ours, theirs = TokenClock(lambda: None), TokenClock(lambda: None)
    model = load_pretrained(tiny_model_folder, dtype="fp32")
    ours_ids = generate(model, ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[], streamer=ours)
    hf = BloomForCausalLM.from_pretrained(tiny_model_folder, dtype=torch.float32).eval()
    theirs_ids = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=3, streamer=theirs)  # fmt: skip
    assert torch.equal(ours_ids, theirs_ids)
    assert len(ours.times) == len(theirs.times) == 5


def test_bench_needs_exactly_one_of_model_and_shape(tiny_model_folder):
    for args in ([], ["--model", str(tiny_model_folder), "--shape", "bloom-560m"]):
        result = subprocess.run([sys.executable, "-m", "bloom", "bench", *args], capture_output=True, text=True)
        assert result.returncode == 2 and "exactly one of --model and --shape" in result.stderr


def test_a_stored_dtype_and_a_build_dir_are_only_for_a_built_checkpoint(tiny_model_folder, tmp_path):
    (tmp_path / "a_file").write_text("")
    for extra, message in [
        (["--model", str(tiny_model_folder), "--stored-dtype", "fp16"], "--stored-dtype is for a --shape checkpoint"),
        (["--model", str(tiny_model_folder), "--build-dir", str(tmp_path)], "--build-dir is for a --shape checkpoint"),
        (["--shape", "bloom-560m", "--build-dir", str(tmp_path / "a_file")], "a_file: a file, not a folder"),
    ]:
        result = subprocess.run([sys.executable, "-m", "bloom", "bench", *extra], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "building" not in result.stderr


def test_a_wide_spread_of_repeated_runs_is_flagged():
    steady = [{"decode_tok_s_reps": [20.0, 20.5]}, {"decode_tok_s_reps": [19.8, 20.2]}]
    noisy = [{"decode_tok_s_reps": [20.0, 11.0]}, {"decode_tok_s_reps": [19.0]}]
    warnings = spread_warnings({"ours": steady, "transformers": noisy})
    assert len(warnings) == 1 and warnings[0].startswith("warning: transformers's 3 decode speeds spread 47%")


def test_the_weight_files_are_read_through_symlinks_before_each_load(tmp_path):
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"  # laid out as the hub cache is
    blobs.mkdir(), snapshot.mkdir()
    sizes = {"model-00001-of-00002.safetensors": 3 << 20, "model-00002-of-00002.safetensors": 70 << 20}
    for name, size in sizes.items():
        (blobs / name).write_bytes(bytes(size))
        (snapshot / name).symlink_to(blobs / name)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))  # names the shards; not read
    (snapshot / "config.json").write_text("{}")  # not weights: not read
    assert read_into_page_cache(snapshot) == sum(sizes.values())


def test_weight_files_larger_than_half_the_free_memory_are_not_read(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(bytes(3 << 20))
    monkeypatch.setattr(bloom.command_line.bench, "available_memory", lambda device: 5 << 20)  # 5 MB free
    assert read_into_page_cache(tmp_path) == 0
    monkeypatch.setattr(bloom.command_line.bench, "available_memory", lambda device: 7 << 20)
    assert read_into_page_cache(tmp_path) == 3 << 20


def test_the_weights_bandwidth_reads_their_own_bytes_without_a_copy(tiny_model_folder):
    """A sum over the weights' memory reads that memory: float32 views of their bytes, not copies, over the largest
    weights that hold 99% of the bytes; a tensor at any byte offset gives the whole 4-byte words inside it."""
    storage = torch.arange(40, dtype=torch.int16).to(torch.bfloat16)
    for start in range(4):  # 2-byte elements: byte offsets 0, 2, 4, 6
        tensor = storage[start : start + 11]
        view = float32_view(tensor)
        skipped = (-2 * start) % 4
        assert view.data_ptr() == tensor.data_ptr() + skipped
        assert view.numel() == (22 - skipped) // 4
        assert torch.equal(view.view(torch.uint8), tensor.view(torch.uint8)[skipped : skipped + 4 * view.numel()])
    model = load_pretrained(tiny_model_folder, dtype="bf16", quantize="int8")
    weights = [*model.parameters(), *model.buffers()]
    bandwidth = Bandwidth.of_weights(weights)
    starts = {w.data_ptr() for w in weights}
    assert all(view.data_ptr() in starts for view in bandwidth.views)  # each a weight's own memory (aligned here)
    total = sum(w.numel() * w.element_size() for w in weights)
    assert 0.99 * total - 4 * len(bandwidth.views) <= bandwidth.bytes <= total
    assert bandwidth.measure(reps=1) > 0

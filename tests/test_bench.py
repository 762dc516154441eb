"""`bloom bench` runs its workers and prints one table: ours, ours-int8 and transformers, with the ratios.

Only that the measurement runs end to end and reports what it claims is tested here; speed is never asserted.
"""

import subprocess
import sys


def test_bench_prints_the_side_by_side_table(tiny_model_folder):
    lengths = ["--prompt-len", "8", "--new-tokens", "4", "--reps", "1", "--runs", "1"]
    command = [sys.executable, "-m", "bloom", "bench", "--model", str(tiny_model_folder), "--dtype", "fp32", *lengths,
               "--quantize", "int8"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"", "ours", "ours-int8", "transformers", "ours / transformers", "ours-int8 / ours"}
    assert all(len(line.split("|")) == 9 for line in rows.values())  # name and 6 figures per row
    assert "fp32 | batch 1 | prompt 8 | 4 new tokens | ours eager" in result.stdout
    assert "generated tokens identical (ours, transformers): yes" in result.stdout  # fp32 greedy: bit parity


def test_bench_needs_exactly_one_of_model_and_shape(tiny_model_folder):
    for args in ([], ["--model", str(tiny_model_folder), "--shape", "bloom-560m"]):
        result = subprocess.run([sys.executable, "-m", "bloom", "bench", *args], capture_output=True, text=True)
        assert result.returncode == 2 and "exactly one of --model and --shape" in result.stderr

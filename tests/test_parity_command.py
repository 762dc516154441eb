"""`bloom parity`: passes on matching checkpoints, fails naming the first layer when one tensor differs."""

import json
import shutil
import subprocess
import sys

from safetensors.torch import load_file, save_file


def parity(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bloom", "parity", "--max-new-tokens", "8", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_matching_checkpoint_passes(tiny_model_folder):
    result = parity("--model", str(tiny_model_folder), "--dtype", "fp32")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in ("word_embeddings_layernorm", "h.0", "h.1", "ln_f", "logits"):
        assert any(line.startswith(name) for line in lines), name
    assert result.stdout.count(": identical") == 3  # the three built-in prompts
    assert lines[-1] == "OK: every tensor within tolerance"


def test_bf16_passes_within_its_tolerance(tiny_model_folder):
    result = parity("--model", str(tiny_model_folder), "--dtype", "bf16", "--prompt", "Bonjour")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bfloat16" in result.stdout and "tolerance 0.03" in result.stdout


def test_one_perturbed_tensor_fails_naming_the_first_layer(tiny_model_folder, tmp_path):
    perturbed = shutil.copytree(tiny_model_folder, tmp_path / "perturbed")
    state = load_file(perturbed / "model.safetensors")
    state["transformer.h.1.mlp.dense_4h_to_h.bias"] += 0.01
    save_file(state, perturbed / "model.safetensors")
    result = parity("--model", str(perturbed), "--reference", str(tiny_model_folder), "--dtype", "fp32")
    assert result.returncode == 1
    table = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith(("h.", "ln_f", "logits"))}
    assert "beyond tolerance" not in table["h.0"] and "beyond tolerance" in table["h.1"]
    assert result.stdout.splitlines()[-1].startswith("FAIL: first tensor beyond tolerance: h.1 ")


def test_a_reference_of_another_shape_or_a_damaged_one_is_one_line(tiny_model_folder, tmp_path):
    deeper = shutil.copytree(tiny_model_folder, tmp_path / "deeper")
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps(config | {"n_layer": 3}))
    damaged = shutil.copytree(tiny_model_folder, tmp_path / "damaged")
    data = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(data[: len(data) // 2])
    for reference, message in [
        (deeper, f"--reference {deeper} has 3 layers, width 48, 6 heads, 704 rows, --model {tiny_model_folder} 2"),
        (damaged, f"--reference {damaged}: transformers cannot load it ("),
    ]:
        result = parity("--model", str(tiny_model_folder), "--reference", str(reference), "--dtype", "fp32")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"bloom parity: error: {message}" in result.stderr and result.stdout == ""


def test_the_bloom_package_never_imports_transformers():
    code = (
        "import sys, pkgutil, importlib, bloom\n"
        "for module in pkgutil.walk_packages(bloom.__path__, 'bloom.'):\n"
        "    if module.name != 'bloom.__main__':\n"
        "        importlib.import_module(module.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'matplotlib')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_nan_on_either_side_fails_naming_the_first_layer_that_holds_it(tiny_model_folder, tmp_path):
    """NaN compares false with any tolerance: it once passed as "OK"."""
    damaged = shutil.copytree(tiny_model_folder, tmp_path / "damaged")
    state = load_file(damaged / "model.safetensors")
    state["transformer.h.1.mlp.dense_h_to_4h.weight"][0, 0] = float("nan")
    save_file(state, damaged / "model.safetensors")
    for model, reference in [(damaged, tiny_model_folder), (tiny_model_folder, damaged)]:
        result = parity("--model", str(model), "--reference", str(reference), "--dtype", "fp32")
        assert result.returncode == 1, result.stdout + result.stderr
        table = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith(("h.", "logits"))}
        assert "beyond tolerance" not in table["h.0"] and "nan" in table["h.1"] and "beyond tolerance" in table["h.1"]
        assert "greedy: not compared, as a tensor above holds NaN or inf" in result.stdout
        assert result.stdout.splitlines()[-1] == "FAIL: first tensor beyond tolerance: h.1 (NaN or inf on a side)"

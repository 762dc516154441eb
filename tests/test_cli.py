"""The `bloom` command line, run as a user would: in a subprocess, on a tiny checkpoint folder."""

import json
import shutil
import subprocess
import sys

import torch

from bloom import generate, load_pretrained, load_tokenizer


def bloom(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bloom", *args], capture_output=True, text=True, timeout=120)


def expected_text(folder, prompts: list[str], max_new_tokens: int, dtype=None, **kwargs) -> list[str]:
    model, tokenizer = load_pretrained(folder, dtype=dtype), load_tokenizer(folder)
    ids, mask = tokenizer.batch_encode(prompts)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                   eos_token_id=tokenizer.eos_token_id, **kwargs)  # fmt: skip
    return [
        p + tokenizer.decode(row.tolist(), skip_special_tokens=True)
        for p, row in zip(prompts, out[:, ids.shape[1] :], strict=True)
    ]


def in_rows(texts: list[str]) -> str:
    """What `bloom generate` prints for a batch: each text under its number."""
    return "".join(f"--- {i + 1}/{len(texts)} ---\n{text}\n" for i, text in enumerate(texts))


def test_version():
    from importlib.metadata import version

    result = bloom("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"bloom {version('bloom-pytorch')}"


def test_help():
    result = bloom("generate", "--help")
    assert result.returncode == 0
    for flag in ("--model", "--prompt-file", "--max-new-tokens", "--do-sample", "--top-p", "--dtype", "--device"):
        assert flag in result.stdout


def test_generate_one_prompt_streams_the_greedy_text(tiny_model_folder):
    result = bloom(
        "generate", "--model", str(tiny_model_folder), "--prompt", "Bonjour, le monde", "--max-new-tokens", "12"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(tiny_model_folder, ["Bonjour, le monde"], 12)[0] + "\n"
    last_line = result.stderr.strip().splitlines()[-1]
    assert (
        last_line.startswith("load ")
        and "prompt " in last_line
        and "new 12 tokens" in last_line
        and "tokens/s" in last_line
    )


def test_streaming_stops_at_eos(eos_model_folder):
    from conftest import EOS_PROMPT

    result = bloom("generate", "--model", str(eos_model_folder), "--prompt", EOS_PROMPT, "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(eos_model_folder, [EOS_PROMPT], 20)[0] + "\n"
    assert "new 3 tokens" in result.stderr  # the EOS is counted, the padding after it is not


def test_a_tokenizer_without_eos_stops_at_the_model_configs(eos_model_folder, tmp_path):
    """tokenizer_config.json may say "eos_token": null; generation then stops at config.json's eos_token_id, as
    transformers' generate does."""
    from conftest import EOS_PROMPT

    folder = shutil.copytree(eos_model_folder, tmp_path / "no_eos")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(config | {"eos_token": None}))
    assert load_tokenizer(folder).eos_token_id is None
    result = bloom("generate", "--model", str(folder), "--prompt", EOS_PROMPT, "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(eos_model_folder, [EOS_PROMPT], 20)[0] + "\n"
    assert "new 3 tokens" in result.stderr


def test_generate_a_batch_from_a_file_with_sampling(tiny_model_folder, tmp_path):
    prompts = ["The quick brown fox", "我爱", "Où est la bibliothèque ?"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    args = [
        "--max-new-tokens",
        "8",
        "--do-sample",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--seed",
        "7",
    ]
    result = bloom("generate", "--model", str(tiny_model_folder), "--prompt-file", str(tmp_path / "prompts.txt"), *args)
    assert result.returncode == 0, result.stderr
    expected = expected_text(
        tiny_model_folder, prompts, 8, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=7
    )
    assert result.stdout == in_rows(expected)


def test_dtype(tiny_model_folder):
    """--dtype bf16 generates what the library generates in bf16, which is not what it generates in fp32; each row is
    printed under its number, as a prompt can hold newlines."""
    prompts, new = ["a", "bb", "Bonjour, le monde", "Bonjour,\nle monde"], 16
    in_bf16 = expected_text(tiny_model_folder, prompts, new, dtype=torch.bfloat16)
    assert in_bf16 != expected_text(tiny_model_folder, prompts, new, dtype=torch.float32)
    argv = ["generate", "--model", str(tiny_model_folder), "--max-new-tokens", str(new), "--dtype", "bf16"]
    result = bloom(*argv, *(arg for prompt in prompts for arg in ("--prompt", prompt)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == in_rows(in_bf16)


def test_prompt_and_prompt_file_are_exclusive(tiny_model_folder, tmp_path):
    result = bloom("generate", "--model", str(tiny_model_folder), "--prompt", "x", "--prompt-file", str(tmp_path / "p"))
    assert result.returncode == 2 and "not allowed with" in result.stderr


def test_missing_model_and_empty_prompt_file(tmp_path):
    result = bloom("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert result.returncode == 2 and "no such folder" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "empty.txt").write_text("\n\n")
    result = bloom("generate", "--model", str(tmp_path), "--prompt-file", str(tmp_path / "empty.txt"))
    assert result.returncode == 2 and "no prompts" in result.stderr


def test_download_from_the_local_cache(tiny_model_folder, tmp_path):
    from hub_cache import put_in_hub_cache

    commit = put_in_hub_cache(tiny_model_folder, tmp_path / "hub", "bigscience/bloom-tiny")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "bloom", "download", "bigscience/bloom-tiny"], capture_output=True,
                            text=True, timeout=120, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(commit)
    # a snapshot missing a file, as an interrupted download leaves it, is not reported complete while offline
    for missing in ("tokenizer.json", "model.safetensors"):
        put_in_hub_cache(tiny_model_folder, tmp_path / missing, "bigscience/bloom-tiny")
        snapshot = tmp_path / missing / "models--bigscience--bloom-tiny" / "snapshots" / commit
        (snapshot / missing).unlink()
        result = subprocess.run([sys.executable, "-m", "bloom", "download", "bigscience/bloom-tiny"],
                                capture_output=True, text=True, timeout=120,
                                env=env | {"HF_HUB_CACHE": str(tmp_path / missing)})  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert str(snapshot) in result.stderr and missing in result.stderr, result.stderr
        # offline: the hub was never asked, and the error says so
        assert "and HF_HUB_OFFLINE is set, so the hub was not asked" in result.stderr, result.stderr
        assert result.stdout == ""
    result = subprocess.run([sys.executable, "-m", "bloom", "download", str(tiny_model_folder)], capture_output=True,
                            text=True, timeout=120, env=env)  # fmt: skip
    assert result.returncode == 2 and "is not a hub repo id (owner/name)" in result.stderr


def test_perplexity_command_prints_the_library_value(tiny_model_folder, tmp_path):
    from bloom.research.perplexity import perplexity

    text = "Le petit prince. The little prince! 小王子。 " * 8
    (tmp_path / "text.txt").write_text(text)
    result = bloom("perplexity", "--model", str(tiny_model_folder), "--file", str(tmp_path / "text.txt"),
                   "--context", "32", "--stride", "12", "--batch-size", "3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer(tiny_model_folder)
    expected = perplexity(load_pretrained(tiny_model_folder), tokenizer.encode(text), context=32, stride=12)
    assert result.stdout.strip() == (
        f"perplexity {expected.perplexity:.4f} | {expected.n_scored} tokens scored in {expected.n_windows} windows"
    )
    default_stride = perplexity(load_pretrained(tiny_model_folder), tokenizer.encode(text), context=32, stride=16)
    assert default_stride.n_windows != expected.n_windows  # --stride was taken, not the default
    bad = bloom("perplexity", "--model", str(tiny_model_folder), "--file", str(tmp_path / "text.txt"), "--stride", "0")
    assert bad.returncode == 2 and "--stride" in bad.stderr
    bad = bloom("perplexity", "--model", str(tiny_model_folder), "--file", str(tmp_path / "text.txt"),
                "--batch-size", "0")  # fmt: skip
    assert bad.returncode == 2 and "--batch-size: must be 1 or more" in bad.stderr


def test_generate_with_int8_weights(tiny_model_folder):
    args = ["--prompt", "Bonjour, le monde", "--max-new-tokens", "6", "--dtype", "bf16", "--quantize", "int8"]
    result = bloom("generate", "--model", str(tiny_model_folder), *args)
    assert result.returncode == 0, result.stderr
    model, tokenizer = (
        load_pretrained(tiny_model_folder, dtype="bf16", quantize="int8"),
        load_tokenizer(tiny_model_folder),
    )
    ids = torch.tensor([tokenizer.encode("Bonjour, le monde")])
    out = generate(model, ids, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)
    assert (
        result.stdout
        == "Bonjour, le monde" + tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True) + "\n"
    )

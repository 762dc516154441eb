"""Every user error on the `bloom` command line ends in `bloom CMD: error: ...` naming the flag or file at
fault, with the subcommand's usage and exit status 2, before any weight is read, and never in a traceback.

Run in-process through bloom.command_line.cli.main (fast); as a subprocess only where a process boundary is the point
(torchrun, the bench worker).
"""

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import bloom.command_line.bench
import bloom.command_line.cli
from bloom.command_line.arguments import CommandParser, in_flags
from bloom.command_line.cli import main
from bloom.config import write_whole
from bloom.generation.decoder import Decoder
from bloom.research.activations import load


@pytest.fixture
def cli(capsys):
    """Run `bloom ARGS...` in this process: (exit status, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit:
            code = exit.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any weights are loaded: every error here must come before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(bloom.command_line.cli, "load_pretrained", refuse)


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


def assert_user_error(result, command: str, *names: str) -> str:
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    assert f"usage: bloom {command} " in err and f"\nbloom {command}: error: " in err, err  # its usage, not bloom's
    message = err.split(": error: ", 1)[1]
    for name in names:
        assert name in message, (name, message)
    return message


@pytest.mark.parametrize("command,flag", [("generate", "--prompt-file"), ("perplexity", "--file")])
def test_unreadable_files_are_named(cli, no_weights, tiny_model_folder, bad_files, command, flag):
    for path, why in [
        (bad_files / "latin1.txt", "not UTF-8 text (byte 0xe9 at offset 3)"),
        (bad_files, "Is a directory"),
        (bad_files / "missing.txt", "No such file or directory"),
    ]:
        result = cli(command, "--model", tiny_model_folder, flag, path)
        assert_user_error(result, command, f"{flag} {path}: {why}")


def test_a_text_too_short_to_score_is_named_before_loading(cli, no_weights, tiny_model_folder, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = cli("perplexity", "--model", tiny_model_folder, "--file", tmp_path / "empty.txt")
    assert_user_error(result, "perplexity", f"--file {tmp_path / 'empty.txt'}: 0 token(s)")


def test_an_out_folder_that_cannot_be_written_is_refused_before_loading(cli, no_weights, tiny_model_folder, bad_files):
    file = bad_files / "a_file"
    for out, why in [(file, "a file, not a folder"), (file / "pictures", "cannot write there")]:
        result = cli("inspect", "--model", tiny_model_folder, "--prompt", "x", "--out", out)
        assert_user_error(result, "inspect", f"--out {out}: {why}")
    if os.path.isdir("/proc/self"):  # a folder even root cannot write in
        assert_user_error(cli("inspect", "--model", tiny_model_folder, "--prompt", "x", "--out", "/proc/self"),
                          "inspect", "--out /proc/self: cannot write there")  # fmt: skip


def test_a_prompt_too_long_for_the_inspect_page_is_refused_before_loading(cli, no_weights, tiny_model_folder, tmp_path):
    """The page holds every head's T × T attention (2 layers × 6 heads here: 64 bytes per T²): 200 MB at 1,767
    tokens."""
    words = " ".join(f"w{i}" for i in range(3000))
    out = tmp_path / "pictures"
    result = cli("inspect", "--model", tiny_model_folder, "--prompt", words, "--out", out)
    heads = "(every head's T × T attention, 2 layers × 6 heads)"
    assert_user_error(result, "inspect", "--prompt: its ", "tokens would make a page of about", heads,
                      "a prompt of up to 1767 tokens")  # fmt: skip
    assert not out.exists()


def test_a_checkpoint_without_a_tokenizer_is_refused_before_its_weights(cli, no_weights, tiny_model_folder, tmp_path):
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(tiny_model_folder / name)
    assert_user_error(cli("generate", "--model", folder, "--prompt", "x"), "generate", str(folder), "tokenizer.json")


@pytest.mark.parametrize("command", ["generate", "perplexity"])
def test_attention_that_cannot_fit_is_refused_before_any_output(command, cli, tiny_model_folder, tmp_path, monkeypatch):
    """Our memory estimate refuses the prompt (or window) before the prefill, and before the prompt is echoed."""
    import bloom.memory

    monkeypatch.setattr(bloom.memory, "available_memory", lambda device: 1000)
    text = tmp_path / "text.txt"
    text.write_text("Le petit prince habitait une planète à peine plus grande que lui. " * 4)
    source = ["--prompt", text.read_text()] if command == "generate" else ["--file", text, "--context", "32"]
    code, out, err = cli(command, "--model", tiny_model_folder, *source)
    assert_user_error((code, out, err), command, "the attention over a prompt of", "GB is available on cpu")
    assert out == ""


@pytest.mark.parametrize(
    "point,names",
    [
        ("h.9", ["--points: no module of the model is named like 'h.9'", "blocks are h.0 to h."]),
        ("h.1.self_attention.probs", ["--points: point h.1.self_attention.probs", "not one row per token"]),
        ("**", ["--points: point h.0.self_attention.scores (of the pattern '**')", "e.g. h.*, h.*.resid_mid"]),
        ("h", ["--points: 'h' names a list of modules, which is never called itself", "h.0 or h.*"]),
    ],
)
def test_activation_points_are_checked_before_the_weights(cli, no_weights, tiny_model_folder, tmp_path, point, names):
    (tmp_path / "text.txt").write_text("some text")
    out = tmp_path / "acts"
    result = cli("activations", "--model", tiny_model_folder, "--file", tmp_path / "text.txt", "--points", point,
                 "--out", out)  # fmt: skip
    assert_user_error(result, "activations", point, *names)
    assert not out.exists()  # nothing left behind


def test_a_text_without_tokens_to_export_is_named_before_loading(cli, no_weights, tiny_model_folder, tmp_path):
    (tmp_path / "blank.txt").write_text("")
    out = tmp_path / "acts"
    result = cli("activations", "--model", tiny_model_folder, "--file", tmp_path / "blank.txt", "--points", "h.0",
                 "--out", out)  # fmt: skip
    assert_user_error(result, "activations", f"--file {tmp_path / 'blank.txt'}: 0 tokens")
    assert not out.exists()  # nothing left behind


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(cli, tiny_model_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Bonjour\nHello\n", encoding="utf-8-sig")
    plain = tmp_path / "plain.txt"
    plain.write_text("Bonjour\nHello\n", encoding="utf-8")
    options = ("--model", tiny_model_folder, "--max-new-tokens", "3")
    with_bom, without = (cli("generate", *options, "--prompt-file", path) for path in (prompts, plain))
    assert with_bom[0] == 0 and with_bom[:2] == without[:2]  # exit status and the generated text


def test_a_prompt_file_splits_at_newlines_only(cli, tiny_model_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Bon\x0cjour\u2028le\x85monde\r\nHello\n", encoding="utf-8")
    code, out, _ = cli("generate", "--model", tiny_model_folder, "--max-new-tokens", "2", "--prompt-file", prompts)
    assert code == 0 and out.startswith("--- 1/2 ---\nBon\x0cjour\u2028le\x85monde") and "\n--- 2/2 ---\nHello" in out


def test_a_batch_whose_cache_cannot_grow_prints_what_it_generated(cli, tiny_model_folder, monkeypatch):
    """Room for the 64-slot KV cache, not the 128-slot one: each prompt's text so far, then one error line."""
    import bloom.memory
    from bloom.config import BloomConfig
    from bloom.kv_cache import KVCache

    config = BloomConfig.from_json(tiny_model_folder / "config.json")
    room = KVCache.nbytes(config, 2, 64, torch.float32, config.n_head) + 1000
    monkeypatch.setattr(bloom.memory, "available_memory", lambda device: room)
    code, out, err = cli("generate", "--model", tiny_model_folder, "--prompt", "Bonjour", "--prompt", "Hello world",
                         "--max-new-tokens", "200", "--dtype", "fp32")  # fmt: skip
    assert_user_error((code, out, err), "generate", "KV cache of 128 slots for 2 rows (64 slots written)")
    lines = out.splitlines()
    assert lines[0::2] == ["--- 1/2 ---", "--- 2/2 ---"]
    for line, prompt in zip(lines[1::2], ["Bonjour", "Hello world"], strict=True):
        assert line.startswith(prompt) and len(line) > len(prompt)


def test_a_tokenizer_with_more_ids_than_the_embedding_is_refused(cli, tmp_path):
    from tiny_checkpoint import random_hf_bloom, save_transformers
    from tiny_tokenizer import build_tiny_tokenizer

    folder = tmp_path / "small_embedding"
    build_tiny_tokenizer(folder)
    save_transformers(random_hf_bloom(vocab_size=64, hidden_size=48, n_head=6, n_layer=1), folder)
    result = cli("generate", "--model", folder, "--prompt", "x")
    assert_user_error(result, "generate", "the model's embedding has only 64 rows", "vocab_size")


@pytest.mark.parametrize(
    "args,names",
    [
        (["--seed", str(2**70)], ["argument --seed", "between 0 and 2**64 - 1"]),
        (["--seed", "-1"], ["argument --seed"]),
        (["--seed", "3"], ["--seed only applies when sampling: pass --do-sample"]),
        (["--max-new-tokens", "-2"], ["argument --max-new-tokens", "0 or more"]),
        (["--do-sample", "--top-p", "1.5"], ["--top-p must be in (0, 1], got 1.5"]),
        (["--do-sample", "--top-p", "0"], ["--top-p must be in (0, 1]"]),
        (["--do-sample", "--top-k", "0"], ["--top-k must be >= 1, got 0"]),
        (["--do-sample", "--temperature", "nan"], ["--temperature must be a finite number > 0"]),
        (["--do-sample", "--temperature", "0"], ["--temperature must", "(greedy: without --do-sample)"]),
        (["--repetition-penalty", "inf"], ["--repetition-penalty must be a finite number > 0"]),
        (["--top-k", "5"], ["--top-k only applies when sampling: pass --do-sample"]),
        (["--temperature", "1.0", "--top-p", "1"], ["--temperature and --top-p only apply when sampling: pass --do-"]),
        (["--tp", "0"], ["argument --tp: must be 1 or more, got 0"]),
        (["--prompt", ""], ["--prompt number 2 is empty"]),
        (["--prompt", "caf\udce9"], ["--prompt number 2 is not UTF-8 text", "character 4"]),  # a shell's b"caf\xe9"
        (["--device", "tpu"], ["argument --device: 'tpu': not a device"]),
        (["--device", "meta"], ["argument --device: 'meta'"]),
        (["--device", "gpu0"], ["argument --device: 'gpu0'"]),
        (["--dtype", "int8"], ["argument --dtype: invalid choice: 'int8'"]),
        (["--dtype", "bf61"], ["did you mean 'bf16'?"]),
    ],
)
def test_bad_generate_arguments_name_the_flag_as_typed(cli, no_weights, tiny_model_folder, args, names):
    message = assert_user_error(
        cli("generate", "--model", tiny_model_folder, "--prompt", "x", *args), "generate", *names
    )
    for library_name in ("do_sample", "top_k", "top_p", "max_new_tokens", "repetition_penalty"):
        assert library_name not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_cuda_without_a_gpu(cli, no_weights, tiny_model_folder, device):
    result = cli("generate", "--model", tiny_model_folder, "--prompt", "x", "--device", device)
    assert_user_error(result, "generate", f"argument --device: {device}: CUDA is not available")


def test_a_gpu_this_machine_does_not_have(cli, no_weights, tiny_model_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = cli("generate", "--model", tiny_model_folder, "--prompt", "x", "--device", "cuda:7")
    assert_user_error(result, "generate", "cuda:7: this machine has 2 GPU(s), cuda:0 to cuda:1")


@pytest.mark.parametrize(
    "args,names",
    [
        (["--stride", "0"], ["--stride must be between 1 and --context"]),
        (["--context", "8", "--stride", "9"], ["--stride", "--context (8)", "got 9"]),
        (["--context", "1"], ["argument --context: must be 2 or more, got 1"]),  # a window of 1 scores nothing
        (["--batch-size", "-1"], ["argument --batch-size"]),
    ],
)
def test_bad_perplexity_numbers(cli, no_weights, tiny_model_folder, tmp_path, args, names):
    (tmp_path / "text.txt").write_text("some text to score")
    result = cli("perplexity", "--model", tiny_model_folder, "--file", tmp_path / "text.txt", *args)
    assert_user_error(result, "perplexity", *names)


@pytest.mark.parametrize(
    "args,names",
    [
        (["--batch-size", "0"], ["argument --batch-size"]),
        (["--new-tokens", "1"], ["argument --new-tokens: must be 2 or more"]),
        (["--reps", "0"], ["argument --reps"]),
        (["--runs", "-2"], ["argument --runs"]),
        (["--device", "tpu"], ["argument --device"]),
        (["--shape", "bloom-560"], ["argument --shape", "did you mean 'bloom-560m'?"]),
    ],
)
def test_bad_bench_numbers(cli, monkeypatch, args, names):
    monkeypatch.setattr(bloom.command_line.bench, "run_worker", lambda *a: pytest.fail("a worker was started"))
    assert_user_error(cli("bench", *args), "bench", *names)


@pytest.mark.parametrize(
    "command,args,typo,suggestion",
    [
        ("generate", ["--prompt", "x", "--max-new-token", "3"], "--max-new-token", "--max-new-tokens"),
        ("generate", ["--promt", "x"], "--promt", "--prompt"),  # before "one of --prompt --prompt-file is required"
        ("generate", ["--prompt", "x", "--do_sample"], "--do_sample", "--do-sample"),
        ("generate", ["--prompt", "x", "--temperature=0.5", "--top_p=0.9"], "--top_p", "--top-p"),
        ("perplexity", ["--file", "f.txt", "--strid", "3"], "--strid", "--stride"),
        ("inspect", ["--prompt", "x", "--output", "o"], "--output", "--out"),
        ("parity", ["--refrence", "r"], "--refrence", "--reference"),
        ("bench", ["--shape", "bloom-560m", "--new_tokens", "3"], "--new_tokens", "--new-tokens"),
    ],
)
def test_a_mistyped_flag_is_named_with_the_closest_one(cli, no_weights, command, args, typo, suggestion):
    model = [] if command == "bench" else ["--model", "m"]
    result = cli(command, *model, *args)
    assert_user_error(result, command, f"unrecognized argument {typo} (did you mean {suggestion}?)")


def test_a_prefix_is_not_a_flag(cli, no_weights, tiny_model_folder):
    result = cli("generate", "--model", tiny_model_folder, "--prompt", "x", "--max", "3")
    assert_user_error(result, "generate", "unrecognized argument --max (did you mean --max-new-tokens?)")


def test_a_stray_argument_gets_the_subcommands_usage(cli):
    assert_user_error(cli("download", "bigscience/bloom-560m", "extra"), "download", "unrecognized arguments: extra")


def test_a_value_that_begins_with_a_dash_is_shown_how_to_write(cli):
    code, _, err = cli("generate", "--model", "m", "--prompt", "-hello")
    assert code == 2 and "--prompt -hello: a value that begins with '-' is written --prompt=-hello" in err
    code, _, err = cli("generate", "--model", "--promt", "x")  # two dashes: a mistyped flag, not a value
    assert code == 2 and "unrecognized argument --promt (did you mean --prompt?)" in err


def test_a_mistyped_subcommand_is_named_with_the_closest_one(cli):
    code, _, err = cli("generat", "--model", "m")
    assert code == 2 and "Traceback" not in err
    assert "invalid choice: 'generat'" in err and "did you mean 'generate'?" in err


def test_library_argument_names_become_flags():
    parser = CommandParser(prog="bloom perplexity")
    for flag in ("--model", "--context", "--stride", "--batch-size", "--do-sample", "--out"):
        parser.add_argument(flag, action="store_true" if flag == "--do-sample" else "store")
    cases = {
        "stride must be in [1, context=1024], got 0": "--stride must be in [1, --context 1024], got 0",
        "batch_size must be 1 or more, got 0": "--batch-size must be 1 or more, got 0",
        "pass do_sample=True": "pass --do-sample",
        "context must be 1 or more": "--context must be 1 or more",
        # words that are also flags stay words in prose; flags already written as flags stay as they are
        "the weights do not fit the model of its config.json": "the weights do not fit the model of its config.json",
        "this export has another context; choose another --stride": "this export has another context; choose "
        "another --stride",
        "args.batch_size_max is unknown": "args.batch_size_max is unknown",
        # paths that begin or end with a flag's name stay paths
        "out/a1 already holds this export": "out/a1 already holds this export",
        "do_sample/config.json: not valid JSON": "do_sample/config.json: not valid JSON",
        "runs/context is not empty": "runs/context is not empty",
        "context.txt: no such file": "context.txt: no such file",
        "batch_size.": "--batch-size.",
    }
    for library, cli_message in cases.items():
        assert in_flags(library, parser) == cli_message


def test_a_missing_reference_fails_fast_before_any_model_is_loaded(cli, tiny_model_folder, monkeypatch):
    pytest.importorskip("transformers")
    import bloom_reference

    monkeypatch.setattr(bloom_reference, "load_pretrained", lambda *a, **k: pytest.fail("ours was loaded"))
    missing = tiny_model_folder.parent / "no_such_reference"
    result = cli("parity", "--model", tiny_model_folder, "--reference", missing)
    assert_user_error(result, "parity", f"--reference {missing}: no such folder")


def test_a_reference_the_hub_cannot_give_says_the_hub_is_unreachable(cli, tiny_model_folder, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import huggingface_hub.constants

    import bloom_reference

    monkeypatch.setattr(bloom_reference, "load_pretrained", lambda *a, **k: pytest.fail("ours was loaded"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    connections = []  # no attempt at all, so no retries (transformers used to try for 30 s)

    def connect(sock, address):
        connections.append(address)
        raise OSError("the test allows no connection")

    monkeypatch.setattr(socket.socket, "connect", connect)
    result = cli("parity", "--model", tiny_model_folder, "--reference", "bigscience/not-cached")
    assert connections == []
    message = assert_user_error(
        result, "parity", "--reference bigscience/not-cached", "the huggingface hub is unreachable"
    )
    assert "\n" not in message.strip(), message  # one line, as README says of every mistake


@pytest.mark.parametrize("command,args", [("download", []), ("generate", ["--prompt", "x"])])
def test_a_repo_neither_cached_nor_reachable(cli, no_weights, tmp_path, monkeypatch, command, args):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    repo = ["bigscience/not-cached"] if command == "download" else ["--model", "bigscience/not-cached"]
    result = cli(command, *repo, *args)
    message = assert_user_error(result, command, "bigscience/not-cached", "the huggingface hub is unreachable")
    assert "\n" not in message.strip(), message  # one line, as README says of every mistake
    result = cli(command, *repo, *args, "--revision", "v2")
    where = "neither a local folder nor in the huggingface cache"
    assert_user_error(result, command, f"bigscience/not-cached at revision 'v2': {where}")


@pytest.mark.parametrize("command", ["generate", "perplexity", "inspect"])
def test_a_file_as_model_and_a_tokenizer_past_the_embedding_are_named_before_the_weights(
    cli, no_weights, tiny_model_folder, tmp_path, command
):
    extra = {"generate": ["--prompt", "x"], "perplexity": ["--file", tmp_path / "t.txt"],
             "inspect": ["--prompt", "x", "--out", tmp_path / "pictures"]}[command]  # fmt: skip
    (tmp_path / "t.txt").write_text("some text to score")
    weights = tiny_model_folder / "model.safetensors"
    result = cli(command, "--model", weights, *extra)
    assert_user_error(result, command, f"--model {weights}: expected a checkpoint folder or a hub repo id")
    small = shutil.copytree(tiny_model_folder, tmp_path / "small_vocab")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(config | {"vocab_size": 320}))  # fewer rows than the tokenizer has
    result = cli(command, "--model", small, *extra)
    assert_user_error(result, command, "the tokenizer has ids up to", "only 320 rows")
    assert not (tmp_path / "pictures").exists()  # inspect's --out: made only when there is something to write


def test_unreadable_weights_are_named_with_the_systems_reason(tiny_model_folder, tmp_path):
    """safetensors reports a file it may not read as not found; the error gives the system's own reason."""
    folder = shutil.copytree(tiny_model_folder, tmp_path / "ckpt")
    (folder / "model.safetensors").chmod(0)
    command = [sys.executable, "-m", "bloom", "generate", "--model", str(folder), "--prompt", "x"]
    if os.geteuid() == 0:  # root reads any file: run without the capabilities that let it
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{folder / 'model.safetensors'}: cannot read weights ([Errno 13] Permission denied" in result.stderr


def test_a_closed_stdout_ends_quietly(tiny_model_folder):
    """`bloom generate ... | head -c 10`: the reader goes away, bloom stops without a traceback."""
    command = [sys.executable, "-m", "bloom", "generate", "--model", str(tiny_model_folder), "--prompt", "x"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before anything is printed
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "Traceback" not in err and "error" not in err, err


def test_other_user_errors_from_the_library_are_reported_without_a_traceback(cli, tiny_model_folder, monkeypatch):
    """An error found while working (here: the checkpoint) is reported as one, under the subcommand."""

    def bad_checkpoint(*args, **kwargs):
        raise ValueError("checkpoint in /x does not fit the model of its config.json: h.0 missing")

    monkeypatch.setattr(bloom.command_line.cli, "load_pretrained", bad_checkpoint)
    result = cli("generate", "--model", tiny_model_folder, "--prompt", "x")
    assert_user_error(result, "generate", "checkpoint in /x does not fit the model of its config.json")


def test_ctrl_c_ends_quietly(cli, tiny_model_folder, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bloom.command_line.cli, "load_pretrained", interrupted)
    code, _, err = cli("generate", "--model", tiny_model_folder, "--prompt", "x")
    assert code == 130 and "Traceback" not in err


@pytest.mark.parametrize("prompts", [["x"], ["x", "Le petit"]], ids=["streamed", "a batch"])
def test_ctrl_c_during_generation_prints_what_was_generated(cli, tiny_model_folder, monkeypatch, prompts):
    """Interrupted at its third decode step, a generation has 3 new tokens: it prints them, as a run of 3 does."""
    flags = [arg for prompt in prompts for arg in ("--prompt", prompt)]
    _, three, _ = cli("generate", "--model", tiny_model_folder, *flags, "--max-new-tokens", "3")
    step, calls = Decoder.step, []

    def interrupted(self, tokens):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, tokens)

    monkeypatch.setattr(Decoder, "step", interrupted)
    code, out, err = cli("generate", "--model", tiny_model_folder, *flags, "--max-new-tokens", "20")
    assert code == 130 and "Traceback" not in err
    assert out == three and "interrupted after 3 new tokens" in err


def test_a_bug_keeps_its_traceback(cli, tiny_model_folder, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(bloom.command_line.cli, "load_pretrained", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "--model", str(tiny_model_folder), "--prompt", "x"])


def test_a_failing_bench_worker_is_reported_in_one_line(cli, tiny_model_folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_model_folder / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # a header, no tensors
    result = cli("bench", "--model", broken, "--runs", "1", "--reps", "1", "--prompt-len", "2", "--new-tokens", "2")
    message = assert_user_error(result, "bench", "the ours worker failed: ", str(broken), "--worker ours")
    assert len(message.strip().splitlines()) == 1  # what failed, and the command that shows more


def test_torchrun_tensor_parallel_user_error(tiny_model_folder, bad_files):
    """Under torchrun each process that gets to the error reports it in one line; no traceback comes from bloom.
    (torchrun's launcher then prints its own ChildFailedError report, which bloom cannot silence. It stops the other
    process as soon as one fails, so the second may be stopped before it reports: once in seven CI runs.)"""
    prompt_file = bad_files / "latin1.txt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "bloom", "generate",
               "--model", str(tiny_model_folder), "--tp", "2", "--prompt-file", str(prompt_file)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    message = f"bloom generate: error: --prompt-file {prompt_file}: not UTF-8 text"
    reports = [line for line in result.stderr.splitlines() if "bloom generate: error" in line]
    assert 1 <= len(reports) <= 2 and all(message in line for line in reports), result.stderr[-3000:]
    assert f"{os.sep}bloom{os.sep}" not in "".join(line for line in result.stderr.splitlines() if "File " in line)


BAD = {  # fragments that each make a command line wrong
    "common": [["--device", "tpu"], ["--device", "cuda:99"], ["--dtype", "fp8"], ["--quantize", "int4"],
               ["--modle", "x"], ["--revision"], ["--model", "/no/such/folder"], ["--model", ""], ["-x"],
               ["--", "extra"]],
    "generate": [["--seed", str(2**70)], ["--seed", "-1"], ["--max-new-tokens", "-5"], ["--max-new-tokens", "1e3"],
                 ["--top-p", "0"], ["--do-sample", "--top-p", "1.5"], ["--do-sample", "--top-p", "nan"],
                 ["--top-k", "0"], ["--do-sample", "--top-k", "-3"], ["--do-sample", "--temperature", "0"],
                 ["--do-sample", "--temperature", "inf"], ["--repetition-penalty", "-1"], ["--tp", "0"],
                 ["--tp", "3"], ["--prompt", ""], ["--prompt-file", "{latin1}"], ["--prompt-file", "{dir}"],
                 ["--prompt-file", "{missing}"], ["--promt", "x"], ["--temperature", "hot"], ["--seed", "3"]],
    "perplexity": [["--file", "{latin1}"], ["--file", "{dir}"], ["--stride", "0"], ["--stride", "99999"],
                   ["--context", "0"], ["--batch-size", "0"], ["--context", "-1"], ["--strde", "2"]],
    "inspect": [["--out", "{a_file}"], ["--out", "{a_file}/sub"], ["--prompt", ""], ["--outt", "x"]],
    "parity": [["--reference", "{missing}"], ["--max-new-tokens", "-1"], ["--prompt", ""]],
    "bench": [["--batch-size", "0"], ["--new-tokens", "1"], ["--reps", "0"], ["--runs", "-2"],
              ["--shape", "bloom-9b"], ["--model", "m", "--shape", "bloom-560m"], ["--device", "tpu"],
              ["--prompt-len", "x"]],
    "download": [["--revison", "x"], ["extra"], ["--model", "m"], [""]],
    "activations": [["--file", "{latin1}"], ["--file", "{dir}"], ["--file", "{missing}"], ["--out", "{a_file}"],
                    ["--context", "0"], ["--batch-size", "0"], ["--max-tokens", "-1"], ["--pionts", "h.0"],
                    ["--points", "h.9"], ["--points", "h.0.self_attention.probs"], ["--points", "bogus"]],
    "evaluate": [["--batch-size", "0"], ["--num-fewshot", "-1"], ["--limit", "x"], ["--taks", "x"],
                 ["--device", "tpu"], ["--dtype", "fp8"], ["--quantize", "int4"], ["-x"], ["--", "extra"]],
}  # fmt: skip
VALID = {  # the rest of each command line
    "generate": ["--model", "{model}", "--prompt", "x"],
    "perplexity": ["--model", "{model}", "--file", "{text}"],
    "inspect": ["--model", "{model}", "--prompt", "x", "--out", "{out}"],
    "parity": ["--model", "{model}"],
    "bench": ["--shape", "bloom-560m"],
    "download": ["bigscience/bloom-560m"],
    "activations": ["--model", "{model}", "--file", "{text}", "--points", "h.0", "--out", "{out}"],
    "evaluate": ["--model", "{model}", "--tasks", "x"],  # bad values only: a task name is looked up in the harness
}


def test_fuzz_bad_command_lines(cli, no_weights, tiny_model_folder, bad_files, monkeypatch):
    """Random command lines with one to three wrong parts: each ends in exit status 2 and a `bloom CMD: error:`
    line, with nothing loaded."""
    pytest.importorskip("transformers")  # parity
    import bloom_reference

    monkeypatch.setattr(bloom_reference, "load_pretrained", lambda *a, **k: pytest.fail("ours was loaded"))
    monkeypatch.setattr(bloom.command_line.bench, "run_worker", lambda *a: pytest.fail("a bench worker was started"))
    monkeypatch.setattr(bloom.command_line.cli, "resolve_folder", lambda *a, **k: pytest.fail("download started"))
    (bad_files / "text.txt").write_text("some text")
    paths = {"model": tiny_model_folder, "text": bad_files / "text.txt", "out": bad_files / "pictures",
             "latin1": bad_files / "latin1.txt", "dir": bad_files, "missing": bad_files / "missing",
             "a_file": bad_files / "a_file"}  # fmt: skip
    rng = random.Random(0)
    for _ in range(400):
        command = rng.choice(list(VALID))
        pool = BAD[command] + ([] if command in ("bench", "download", "evaluate") else BAD["common"])
        parts = [VALID[command], *rng.sample(pool, rng.randint(1, 3))]  # a later flag overrides an earlier one
        argv = [arg.format(**paths) for part in parts for arg in part]
        code, _, err = cli(command, *argv)
        assert code == 2 and "Traceback" not in err, (argv, err)
        assert f"bloom {command}: error: " in err.strip().splitlines()[-1], (argv, err)


# A process whose files may not grow past `limit` bytes: its writes beyond fail as on a full disk (EFBIG, not a
# signal), a real failure of the operating system's, not a mock.
LIMITED = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
           "resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n")  # fmt: skip


def run_limited(limit: int, code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED.format(limit=limit) + code, *map(str, argv)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_a_file_written_whole_or_not_at_all_keeps_the_earlier_one_and_names_itself(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("earlier")
    code = ("from pathlib import Path\nfrom bloom.config import write_whole\ntry:\n"
            "    write_whole(Path(sys.argv[1]), lambda partial: partial.write_bytes(b'x' * 100_000))\n"
            "except OSError as error:\n    print(error.errno, error.filename)\n")  # fmt: skip
    done = run_limited(4096, code, path)
    assert done.stdout.split() == [str(27), str(path)], done.stderr  # EFBIG, the file meant
    assert path.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_file_written_whole_is_not_left_half_written_by_ctrl_c_or_an_error_of_another_kind(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("earlier")

    def half_then(error):
        def write(partial):
            partial.write_text("half")
            raise error

        return write

    with pytest.raises(KeyboardInterrupt):
        write_whole(path, half_then(KeyboardInterrupt()))
    with pytest.raises(OSError, match=rf"^{re.escape(str(path))}: encoder error -2$"):  # no errno: its own words kept
        write_whole(path, half_then(OSError("encoder error -2")))
    assert path.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


CLI = "from bloom.command_line.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def test_inspect_that_cannot_write_names_the_picture_and_leaves_none_half_written(tmp_path, tiny_model_folder):
    out = tmp_path / "inspect"
    done = run_limited(
        8192, CLI, "inspect", "--model", tiny_model_folder, "--prompt", "Hello there world", "--out", out
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"bloom inspect: error: [Errno 27] File too large: '{out / 'attention_layer00.png'}'" in done.stderr
    assert list(out.iterdir()) == []  # no partial picture


def test_activations_that_cannot_write_name_the_file_and_the_same_command_finishes(tmp_path, tiny_model_folder):
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 4, encoding="utf-8")
    out = tmp_path / "acts"
    argv = ["activations", "--model", tiny_model_folder, "--file", tmp_path / "text.txt", "--points", "h.1",
            "--context", "8", "--out", out]  # fmt: skip
    done = run_limited(4096, CLI, *argv)  # the index and the token ids fit, the rows (tokens × 48 × 4 bytes) do not
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"[Errno 27] File too large: '{out / 'h.1.safetensors'}'" in done.stderr
    assert f"{out} keeps the batches written so far; once the cause is fixed, the same command again finishes the " \
        "export" in done.stderr  # fmt: skip
    assert main([str(arg) for arg in argv]) == 0
    tokens, rows = load(out, "h.1")  # finished: load refuses an unfinished export
    assert rows.shape == (len(tokens), 48)

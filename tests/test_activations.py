"""`bloom activations`: exported rows against `record` on each window alone and transformers' hidden states."""

import copy
import fcntl
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import BloomForCausalLM

import bloom.command_line.cli
import bloom.research.activations
from bloom import load_pretrained, load_tokenizer
from bloom.command_line.cli import main
from bloom.research.activations import export, load, windows
from bloom.research.probe import patch, record
from bloom.scale.quantize import quantize_int8

POINTS = ["word_embeddings_layernorm", "h.*", "h.1.mlp.act", "h.0.self_attention.context", "ln_f"]
NAMES = ["word_embeddings_layernorm", "h.0", "h.0.self_attention.context", "h.1", "h.1.mlp.act", "ln_f"]


@pytest.fixture(scope="module")
def model(tiny_model_folder):
    return load_pretrained(tiny_model_folder)


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(4, 700, (45,), generator=torch.Generator().manual_seed(1))


def test_windows_cover_the_text_once_in_order():
    assert windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert windows(8, 4) == [(0, 4), (4, 8)]


def test_rows_equal_record_and_transformers_for_every_window(model, token_ids, tiny_model_folder, tmp_path):
    out = export(model, token_ids, POINTS, tmp_path / "acts", context=8, batch_size=2)  # 5 windows of 8, one of 5
    hf = BloomForCausalLM.from_pretrained(tiny_model_folder).eval()
    for begin, end in windows(len(token_ids), 8):
        ids = token_ids[None, begin:end]  # (1, T)
        with torch.no_grad(), record(model, *POINTS) as seen:
            model(ids)
            hidden = hf(ids, output_hidden_states=True).hidden_states  # n_layer + 1 of (1, T, C); last after ln_f
        context = seen["h.0.self_attention.context"][0].transpose(0, 1).reshape(end - begin, -1)  # (T, nh·hd)
        expected = {name: seen[name][0] for name in NAMES} | {"h.0.self_attention.context": context}
        theirs = {"word_embeddings_layernorm": hidden[0], "h.0": hidden[1], "ln_f": hidden[2]}
        for name in NAMES:
            tokens, rows = load(out, name)
            assert torch.equal(tokens, token_ids)
            torch.testing.assert_close(rows[begin:end], expected[name], rtol=0, atol=1e-5, msg=name)
            if name in theirs:
                torch.testing.assert_close(rows[begin:end], theirs[name][0], rtol=0, atol=1e-5, msg=name)


def test_files_are_safetensors_and_load_maps_them(model, token_ids, tmp_path):
    out = export(model, token_ids, ["h.1"], tmp_path / "acts", context=16)
    tokens, rows = load(out, "h.1")
    assert rows.shape == (45, 48) and rows.dtype == torch.float32
    with safe_open(out / "h.1.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("h.1"), rows)
    with safe_open(out / "tokens.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("tokens"), tokens)
    rows[0] = 0  # copy on write: the file keeps its values
    assert not torch.equal(load(out, "h.1")[1][0], rows[0])


def test_bf16_rows_equal_bf16_record(tiny_model_folder, token_ids, tmp_path):
    model = load_pretrained(tiny_model_folder, dtype=torch.bfloat16)
    out = export(model, token_ids, ["h.1"], tmp_path / "acts", context=45)
    with torch.no_grad(), record(model, "h.1") as seen:
        model(token_ids[None])
    assert torch.equal(load(out, "h.1")[1], seen["h.1"][0])


def test_an_interrupted_export_resumes_and_other_folders_are_refused(model, token_ids, tmp_path):
    calls = []

    def fail_on_third_batch(x):
        calls.append(1)
        if len(calls) == 4:  # the first call measures the widths; then one per batch
            raise KeyboardInterrupt
        return x

    out = tmp_path / "acts"
    with pytest.raises(KeyboardInterrupt), patch(model, {"h.0": fail_on_third_batch}):
        export(model, token_ids, ["h.1"], out, context=8, batch_size=2)
    with pytest.raises(ValueError, match="stopped at token 32 of 45"):
        load(out, "h.1")
    damaged = shutil.copytree(out, tmp_path / "damaged")  # the same half-written export, then harmed
    with open(damaged / "h.1.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=r"cannot resume: .*h.1.safetensors is not the file this export wrote"):
        export(model, token_ids, ["h.1"], damaged, context=8, batch_size=2)
    (damaged / "h.1.safetensors").unlink()
    with pytest.raises(ValueError, match=r"cannot resume: .*h.1.safetensors: No such file or directory; delete"):
        export(model, token_ids, ["h.1"], damaged, context=8, batch_size=2)
    for foreign in ("[]", '{"settings": {}, "widths": {}, "files": {}, "tokens_done": "abc"}'):
        (damaged / "index.json").write_text(foreign)
        with pytest.raises(ValueError, match=r"index.json: not an index written by bloom activations"):
            export(model, token_ids, ["h.1"], damaged, context=8, batch_size=2)
    export(model, token_ids, ["h.1"], out, context=8, batch_size=2)
    fresh = export(model, token_ids, ["h.1"], tmp_path / "fresh", context=8, batch_size=2)
    assert torch.equal(load(out, "h.1")[1], load(fresh, "h.1")[1])

    with pytest.raises(ValueError, match=r"already holds a complete export of this text, points and context \(F32 act"):
        export(model, token_ids, ["h.1"], out, context=8)
    with pytest.raises(ValueError, match=r"holds an export that differs in its context \(8 there, 4 now\) \("):
        export(model, token_ids, ["h.1"], out, context=4)
    with pytest.raises(
        ValueError, match=r"its text, n_tokens \(45 there, 44 now\), points \(\['h.1'\] there, \['h.0'\]"
    ):
        export(model, token_ids[:-1].flip(0), ["h.0"], out, context=8)
    with pytest.raises(ValueError, match=r"differs in its weights \('F32' there, 'int8' now\)"):  # not resumed in int8
        export(quantize_int8(copy.deepcopy(model)), token_ids, ["h.1"], out, context=8)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        export(model, token_ids, ["h.1"], tmp_path / "other", context=8)
    with pytest.raises(ValueError, match="h.0.self_attention.probs: attention over keys"):
        export(model, token_ids, ["h.0.self_attention.probs"], tmp_path / "probs", context=8)
    with pytest.raises(ValueError, match="h.7"):
        export(model, token_ids, ["h.7"], tmp_path / "none", context=8)
    with pytest.raises(KeyError, match="no point 'h.0'"):
        load(out, "h.0")


def test_a_second_export_into_a_folder_being_written_is_refused(model, token_ids, tmp_path):
    out = tmp_path / "acts"
    out.mkdir()
    other = os.open(out, os.O_RDONLY)  # as another export holds it
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="acts: another export is writing into it now"):
            export(model, token_ids, ["h.1"], out, context=8)
        assert not any(out.iterdir())  # nothing written beside the other one
    finally:
        os.close(other)
    export(model, token_ids, ["h.1"], out, context=8)  # free again once it ends


def test_an_export_stopped_while_making_its_files_starts_them_again(model, token_ids, tmp_path, monkeypatch):
    from bloom.research import activations

    headers, real_header = [], activations._header

    def stop_at_the_second_file(*args):
        headers.append(args)
        if len(headers) == 2:
            raise KeyboardInterrupt
        return real_header(*args)

    out = tmp_path / "acts"
    monkeypatch.setattr(activations, "_header", stop_at_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        export(model, token_ids, ["h.1"], out, context=8)
    monkeypatch.setattr(activations, "_header", real_header)
    export(model, token_ids, ["h.1"], out, context=8)
    fresh = export(model, token_ids, ["h.1"], tmp_path / "fresh", context=8)
    assert torch.equal(load(out, "h.1")[1], load(fresh, "h.1")[1])


def test_ctrl_c_says_how_to_finish_and_the_same_command_does(tiny_model_folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "text.txt").write_text("Le petit prince habitait une planète à peine plus grande que lui. " * 6)
    out = tmp_path / "acts"
    argv = ["activations", "--model", str(tiny_model_folder), "--file", str(tmp_path / "text.txt"), "--points", "h.1",
            "--context", "8", "--batch-size", "1", "--out", str(out)]  # fmt: skip
    write, calls = bloom.research.activations._write_batch, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        write(*args)

    monkeypatch.setattr(bloom.research.activations, "_write_batch", interrupted)
    assert main(argv) == 130
    assert f"interrupted: {out} keeps the batches written so far; the same command again" in capsys.readouterr().err
    monkeypatch.setattr(bloom.research.activations, "_write_batch", write)
    assert main(argv) == 0
    tokens, rows = load(out, "h.1")
    model = load_pretrained(tiny_model_folder)
    torch.testing.assert_close(rows, load(export(model, tokens, ["h.1"], tmp_path / "whole", context=8), "h.1")[1])


def test_command_exports_the_text_in_token_order(tiny_model_folder, tmp_path, capsys):
    text = "Le petit prince habitait une planète à peine plus grande que lui. " * 6
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "acts"
    argv = ["activations", "--model", str(tiny_model_folder), "--file", str(tmp_path / "text.txt"),
            "--points", "h.1", "--context", "16", "--batch-size", "3", "--points", "h.*.mlp.act",
            "--out", str(out)]  # fmt: skip
    assert main([*argv, "--max-tokens", "50"]) == 0
    assert {"h.1", "h.0.mlp.act", "h.1.mlp.act"} <= {p.stem for p in out.glob("*.safetensors")}  # --points twice: all
    expected = load_tokenizer(tiny_model_folder).encode(text)[:50]
    tokens, rows = load(out, "h.0.mlp.act")
    assert tokens.tolist() == expected and rows.shape == (50, 4 * 48)
    model = load_pretrained(tiny_model_folder)
    by_hand = export(model, torch.tensor(expected), ["h.0.mlp.act"], tmp_path / "by_hand", context=16)
    assert torch.equal(rows, load(by_hand, "h.0.mlp.act")[1])  # windows of --context 16 tokens
    whole = export(model, torch.tensor(expected), ["h.0.mlp.act"], tmp_path / "whole", context=64)
    assert not torch.equal(rows, load(whole, "h.0.mlp.act")[1])
    with pytest.raises(SystemExit) as exit_:  # other settings (all the tokens): refused, naming the folder
        main(argv)
    assert exit_.value.code == 2
    assert f"bloom activations: error: --out {out} holds an export that differs in its text" in capsys.readouterr().err
    respelled = [str(tiny_model_folder) + "/." if arg == str(tiny_model_folder) else arg for arg in argv]
    with pytest.raises(SystemExit):  # the same folder spelled otherwise: the same export
        main([*respelled, "--max-tokens", "50"])
    assert f"--out {out} already holds a complete export of this text, points and context (F32 activations, F32 " \
        "weights); delete it" in capsys.readouterr().err  # fmt: skip


@pytest.mark.parametrize(
    "held", ["a file", "another export", "this export, complete", "a running export", "an index that is not JSON"]
)
def test_the_command_refuses_its_out_folder_before_reading_any_weight(tmp_path, tiny_model_folder, monkeypatch,
                                                                     capsys, held):  # fmt: skip
    """What export refuses whatever the dtype is refused before the weights are read, naming --out."""
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 4, encoding="utf-8")
    out = tmp_path / "acts"
    argv = ["activations", "--model", str(tiny_model_folder), "--file", str(tmp_path / "text.txt"), "--points",
            "h.1", "--context", "8", "--out", str(out)]  # fmt: skip
    if held in ("a file", "a running export"):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        assert main([*argv, "--max-tokens", "20" if held == "another export" else "1000"]) == 0
    if held == "an index that is not JSON":
        (out / "index.json").write_text("{bad")
    monkeypatch.setattr(bloom.command_line.cli, "load_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    capsys.readouterr()
    other = os.open(out, os.O_RDONLY)  # as another export holds it, for "a running export"
    try:
        if held == "a running export":
            fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(SystemExit) as exit_:
            main(argv)
    finally:
        os.close(other)
    assert exit_.value.code == 2
    refused = {
        "a file": f"{out} is not empty and holds no index.json",
        "another export": f"{out} holds an export that differs in its text, n_tokens (20 there",
        "this export, complete": f"{out} already holds a complete export",
        "a running export": f"{out}: another export is writing into it now",
        "an index that is not JSON": f"{out / 'index.json'}: not valid JSON",
    }
    assert f"--out {refused[held]}" in capsys.readouterr().err


def test_a_half_written_export_of_another_dtype_is_refused_naming_out(tmp_path, tiny_model_folder, capsys):
    """Its dtype is known once the model is loaded: refused then, still as --out's fault."""
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 4, encoding="utf-8")
    out = tmp_path / "acts"
    argv = ["activations", "--model", str(tiny_model_folder), "--file", str(tmp_path / "text.txt"), "--points",
            "h.1", "--context", "8", "--batch-size", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps(index | {"tokens_done": 8}))  # as if stopped after one window
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv, "--dtype", "bf16"])
    assert f"--out {out} holds an export that differs in its weights ('F32' there, 'BF16' now)" in (
        capsys.readouterr().err
    )

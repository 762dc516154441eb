"""Tokenizer tests on a tiny BLOOM-style tokenizer trained at test time; transformers is the reference."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hub_cache import put_in_hub_cache
from tiny_tokenizer import build_tiny_tokenizer

from bloom.checkpoints.tokenizer import BloomTokenizer, load_tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Où est la bibliothèque ? Ça coûte 5,50 €.",
    "我爱自然语言处理。今天天气很好，我们去公园吧！",
    "Emoji 🙂🚀 👍🏽 and an unseen one 🦄",
    "  leading spaces,\ttabs\n\nand   runs of   whitespace  ",
    "(a|b) [x] {y} ... !!! ???",
    "Ωμέγα Кириллица עברית",
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def tok(tiny_folder: Path) -> BloomTokenizer:
    return load_tokenizer(tiny_folder)


@pytest.fixture
def folder_copy(tiny_folder: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny tokenizer folder that a test may edit."""
    return Path(shutil.copytree(tiny_folder, tmp_path / "tokenizer"))


def test_tiny_tokenizer_is_small_with_bloom_special_ids(tok: BloomTokenizer) -> None:
    assert 256 < tok.vocab_size < 1000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)


def test_pre_tokenizer_splits_like_bloom(tok: BloomTokenizer) -> None:
    pieces = [piece for piece, _ in tok.tokenizer.pre_tokenizer.pre_tokenize_str("Hello, world!  (a|b)")]
    assert pieces == ["Hello", ",", "Ġworld", "!ĠĠ(", "a", "|", "b", ")"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: BloomTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_bpe_merges_are_used(tok: BloomTokenizer) -> None:
    text = "The quick brown fox"
    assert len(tok.encode(text)) < len(text.encode("utf-8"))


def test_no_bos_or_eos_is_added_and_eos_in_text_is_special(tok: BloomTokenizer) -> None:
    ids = tok.encode("Hello world")
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    with_eos = tok.encode("Hello world</s>")
    assert with_eos == ids + [2]
    assert tok.decode(with_eos) == "Hello world</s>"
    assert tok.decode(with_eos, skip_special_tokens=True) == "Hello world"


def test_decode_accepts_a_tensor(tok: BloomTokenizer) -> None:
    ids = tok.encode("Bonjour à tous")
    assert tok.decode(torch.tensor(ids)) == "Bonjour à tous"
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([ids]))
    with pytest.raises(ValueError, match="decode takes token ids, integers >= 0, got -1"):
        tok.decode([5, -1])
    assert tok.decode([10**6]) == ""  # past the vocabulary (BLOOM's embedding has 200 rows more): as transformers


@pytest.mark.parametrize("text", [*TEXTS, "Hello </s> world<pad>", "<s>x<unk>"])
def test_matches_transformers(tiny_folder: Path, tok: BloomTokenizer, text: str) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_folder)
    ids = tok.encode(text)
    assert ids == reference(text)["input_ids"]
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_batch_encode_left_pads(tok: BloomTokenizer) -> None:
    texts = ["Hello", "The quick brown fox jumps over the lazy dog.", "", "我爱</s>"]
    input_ids, attention_mask = tok.batch_encode(texts)
    lengths = [len(tok.encode(text)) for text in texts]
    T = max(lengths)
    assert input_ids.shape == attention_mask.shape == (len(texts), T)
    assert input_ids.dtype == attention_mask.dtype == torch.int64
    for b, (text, n) in enumerate(zip(texts, lengths, strict=True)):
        assert attention_mask[b].tolist() == [0] * (T - n) + [1] * n
        assert input_ids[b, : T - n].tolist() == [tok.pad_token_id] * (T - n)
        assert input_ids[b, T - n :].tolist() == tok.encode(text)


def test_batch_encode_matches_transformers(tiny_folder: Path, tok: BloomTokenizer) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_folder)
    expected = reference(TEXTS, padding=True, return_tensors="pt")
    input_ids, attention_mask = tok.batch_encode(TEXTS)
    assert torch.equal(input_ids, expected["input_ids"])
    assert torch.equal(attention_mask, expected["attention_mask"])


def test_batch_encode_errors(tok: BloomTokenizer) -> None:
    with pytest.raises(ValueError, match="at least one"):
        tok.batch_encode([])
    no_pad = BloomTokenizer(tok.tokenizer, eos_token_id=2)
    with pytest.raises(ValueError, match="pad token"):
        no_pad.batch_encode(["hi"])


def test_special_ids_come_from_the_config(folder_copy: Path) -> None:
    (folder_copy / "special_tokens_map.json").unlink()
    config_file = folder_copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["pad_token"] = {"content": "</s>", "special": True}
    config["bos_token"] = None
    config_file.write_text(json.dumps(config))

    tok = load_tokenizer(folder_copy)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (2, None, 2, 0)


def test_special_tokens_map_overrides_tokenizer_config_like_transformers(folder_copy: Path) -> None:
    from transformers import AutoTokenizer

    (folder_copy / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<unk>"}))
    tok = load_tokenizer(folder_copy)
    reference = AutoTokenizer.from_pretrained(folder_copy)
    assert tok.pad_token_id == reference.pad_token_id == 0
    assert tok.eos_token_id == reference.eos_token_id == 2


def test_bloom_convention_without_config_files(folder_copy: Path) -> None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder_copy / name).unlink()
    tok = load_tokenizer(folder_copy)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
def test_config_token_absent_from_vocab_raises(folder_copy: Path, name: str) -> None:
    if name == "tokenizer_config.json":  # otherwise special_tokens_map.json would override it
        (folder_copy / "special_tokens_map.json").unlink()
    config_file = folder_copy / name
    config = json.loads(config_file.read_text())
    config["pad_token"] = "<|no such token|>"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{name}.*<\|no such token\|>"):
        load_tokenizer(folder_copy)


def test_load_from_a_tokenizer_json_path(folder_copy: Path, tok: BloomTokenizer) -> None:
    (folder_copy / "special_tokens_map.json").write_text(json.dumps({"pad_token": "</s>"}))
    from_file = load_tokenizer(folder_copy / "tokenizer.json")
    assert from_file.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    assert from_file.pad_token_id == 2  # the config files next to the file are read too


@pytest.mark.parametrize("shared_store", [False, True])
def test_load_from_a_hub_repo_id_in_a_local_cache(
    tiny_folder: Path, tok: BloomTokenizer, tmp_path: Path, cache_only: None, shared_store: bool
) -> None:
    """Served from a cache laid out by huggingface_hub's helpers: snapshot files are symlinks into blobs/."""
    commit = put_in_hub_cache(tiny_folder, tmp_path / "hub", "bigscience/tiny-bloom", shared_store=shared_store)
    for revision in (None, commit):
        loaded = load_tokenizer("bigscience/tiny-bloom", revision=revision, cache_dir=tmp_path / "hub")
        assert loaded.encode(TEXTS[4]) == tok.encode(TEXTS[4])
        assert loaded.pad_token_id == 3


def test_load_errors(folder_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(empty)

    (folder_copy / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(folder_copy)

    with pytest.raises(ValueError, match="revision"):
        load_tokenizer(folder_copy / "tokenizer.json", revision="main")


@pytest.mark.parametrize("value", [["</s>"], 2, True, {"special": True}, {"content": 2}, {"content": ["</s>"]}])
@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
def test_special_token_entries_of_the_wrong_shape_are_refused_naming_file_and_key(
    folder_copy: Path, name: str, value
) -> None:
    config_file = folder_copy / name
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"eos_token": value}))
    with pytest.raises(ValueError, match=rf"{name}: eos_token should be a token string"):
        load_tokenizer(folder_copy)


@pytest.mark.parametrize("contents", [b"[1, 2]", b'"eos_token"', b"\xff\xfe{}", b"[" * 100_000])
def test_config_files_that_are_not_json_objects_are_refused_naming_the_file(folder_copy: Path, contents) -> None:
    (folder_copy / "special_tokens_map.json").write_bytes(contents)
    with pytest.raises(ValueError, match="special_tokens_map.json: (expected a JSON object|not valid JSON)"):
        load_tokenizer(folder_copy)


def test_a_tokenizer_with_more_ids_than_the_embedding_has_rows_is_refused(tiny_folder: Path, tok: BloomTokenizer):
    from transformers import AutoTokenizer

    ids = len(AutoTokenizer.from_pretrained(tiny_folder))  # transformers' count, added tokens included
    tok.check_fits(ids)
    with pytest.raises(ValueError, match=rf"tokenizer has ids up to {ids - 1}, but the model's embedding has only "
                                         rf"{ids - 1} rows"):  # fmt: skip
        tok.check_fits(ids - 1)

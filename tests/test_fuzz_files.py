"""Property tests: damaged checkpoint and tokenizer files load correctly or fail with a clear error.

Each example copies a tiny checkpoint (the bigscience layout: fp16, two shards named by an index, the tokenizer
files beside it), damages one file as hypothesis draws (truncated, bytes overwritten, a header's dtype, shape,
offsets or keys changed, JSON garbled or its values swapped for random ones), and loads it. The load either
succeeds, holding exactly the tensors that safetensors itself reads from the files, or raises a ValueError or
FileNotFoundError (or a subclass) that names the damaged file, or the keys that went missing. Nothing else: no
other exception type, and no load longer than TIME_LIMIT seconds. Examples are drawn from a fixed seed, so the
default run is reproducible; `--hypothesis-seed` and more examples explore further.
"""

import json
import re
import shutil
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tiny_checkpoint import random_hf_bloom, save_bigscience
from tiny_tokenizer import build_tiny_tokenizer

from bloom import load_pretrained, load_tokenizer

TIME_LIMIT = 10  # seconds per load: a hang fails the example instead of the whole run
SHARDS = ("model_00001-of-00002.safetensors", "model_00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"
TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")
FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz_pristine")
    model = random_hf_bloom(vocab_size=704, hidden_size=16, n_head=2, n_layer=2)
    save_bigscience(model, folder, dtype=torch.float16, n_shards=2)
    build_tiny_tokenizer(folder)
    return folder


@contextmanager
def damaged_copy(pristine: Path):
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(shutil.copytree(pristine, Path(tmp) / "ckpt"))


@contextmanager
def time_limit(seconds: float):
    def fail(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_or_clear_error(load, folder: Path, culprit: str):
    """The loaded object, or None after an error that names `culprit` (or the keys that are missing)."""
    try:
        with time_limit(TIME_LIMIT):
            return load(folder)
    except (ValueError, FileNotFoundError) as error:
        message = str(error)
        assert culprit in message or re.search(r"missing keys|unexpected keys|stored twice", message), message
        assert "Traceback" not in message and len(message) < 2000, message
        return None


def assert_holds_the_files_tensors(model, folder: Path) -> None:
    """Bit for bit what safetensors reads from the (possibly damaged but still readable) shards, each tensor cast
    to the stored dtype of the embedding as the loader does."""
    stored = {}
    for shard in SHARDS:
        stored |= {k.removeprefix("transformer."): v for k, v in load_file(folder / shard).items()}
    stored.pop("lm_head.weight", None)
    state = model.state_dict()
    assert state.keys() == stored.keys()
    dtype = stored["word_embeddings.weight"].dtype
    for name, tensor in state.items():
        assert tensor.dtype == dtype
        assert torch.equal(tensor.view(torch.uint8), stored[name].to(dtype).view(torch.uint8)), name


# --- damaging safetensors files ---------------------------------------------------------------------------------

DTYPES = ["F16", "BF16", "F32", "F64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "I64", "XX", ""]


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@st.composite
def header_edits(draw, header: dict):
    """A header with one entry changed: its dtype, shape, offsets, name, or the entry removed."""
    keys = sorted(k for k in header if k != "__metadata__")
    key = draw(st.sampled_from(keys))
    entry = dict(header[key])
    header = dict(header)
    edit = draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "delete", "metadata"]))
    if edit == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif edit == "shape":
        entry["shape"] = draw(st.lists(st.integers(0, 2000), max_size=3))
    elif edit == "offsets":
        entry["data_offsets"] = draw(st.lists(st.integers(0, 2**20), min_size=2, max_size=2))
    elif edit == "rename":
        header[draw(st.sampled_from(["h.0.bogus", "transformer." + key, "lm_head.weight", "h.7.ln.weight"]))] = entry
        del header[key]
        return header
    elif edit == "delete":
        del header[key]
        return header
    else:
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers()))
        return header
    header[key] = entry
    return header


@FUZZ
@given(data=st.data(), shard=st.sampled_from(SHARDS), how=st.sampled_from(["truncate", "overwrite", "header"]))
def test_damaged_safetensors_shards(pristine, data, shard, how):
    with damaged_copy(pristine) as folder:
        path = folder / shard
        raw = path.read_bytes()
        if how == "truncate":
            path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        elif how == "overwrite":  # mostly in the 8-byte length and the JSON header, sometimes in the tensors
            (n,) = struct.unpack("<Q", raw[:8])
            start = data.draw(st.integers(0, 8 + n + 16) | st.integers(0, len(raw) - 1))
            patch = data.draw(st.binary(min_size=1, max_size=8))
            path.write_bytes(raw[:start] + patch + raw[start + len(patch) :])
        else:
            header, body = split_safetensors(raw)
            path.write_bytes(join_safetensors(data.draw(header_edits(header)), body))
        model = load_or_clear_error(load_pretrained, folder, shard)
        if model is not None:
            assert_holds_the_files_tensors(model, folder)


# --- damaging JSON files ----------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
SHARD_NAMES = st.sampled_from([*SHARDS, "../model_00001-of-00002.safetensors", "/etc/passwd", "", ".", "a/b", "C:x"])


@st.composite
def damaged_json(draw, text: str) -> bytes:
    """The file's text garbled, or its JSON with one value (at the top or one level down) replaced or removed."""
    how = draw(st.sampled_from(["value", "nested value", "delete", "document", "truncate", "bytes"]))
    document = json.loads(text)
    if how in ("value", "nested value", "delete") and isinstance(document, dict) and document:
        key = draw(st.sampled_from(sorted(document)))
        inner = document[key]
        if how == "nested value" and isinstance(inner, dict) and inner:
            inner[draw(st.sampled_from(sorted(inner)))] = draw(JSON_VALUES | SHARD_NAMES)
        elif how == "delete":
            del document[key]
        else:
            document[key] = draw(JSON_VALUES)
        return json.dumps(document).encode()
    if how == "truncate":
        return text.encode()[: draw(st.integers(0, len(text) - 1))]
    if how == "bytes":
        return draw(st.binary(max_size=40))
    return json.dumps(draw(JSON_VALUES)).encode()


@FUZZ
@given(data=st.data(), name=st.sampled_from(["config.json", INDEX]))
def test_damaged_config_and_index(pristine, data, name):
    with damaged_copy(pristine) as folder:
        path = folder / name
        path.write_bytes(data.draw(damaged_json(path.read_text())))
        model = load_or_clear_error(load_pretrained, folder, name)
        if model is not None:
            assert_holds_the_files_tensors(model, folder)


@FUZZ
@given(data=st.data(), name=st.sampled_from(TOKENIZER_CONFIGS))
def test_damaged_tokenizer_configs(pristine, data, name):
    with damaged_copy(pristine) as folder:
        path = folder / name
        path.write_bytes(data.draw(damaged_json(path.read_text())))
        tokenizer = load_or_clear_error(load_tokenizer, folder, name)
        if tokenizer is not None:  # the special ids are ids of the tokenizer, or absent
            for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
                assert token_id is None or 0 <= token_id < tokenizer.vocab_size


@FUZZ
@given(data=st.data(), how=st.sampled_from(["truncate", "overwrite", "value"]))
def test_damaged_tokenizer_json(pristine, data, how):
    with damaged_copy(pristine) as folder:
        path = folder / "tokenizer.json"
        raw = path.read_bytes()
        if how == "truncate":
            path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        elif how == "overwrite":
            start = data.draw(st.integers(0, len(raw) - 1))
            patch = data.draw(st.binary(min_size=1, max_size=8))
            path.write_bytes(raw[:start] + patch + raw[start + len(patch) :])
        else:  # a part of the pipeline replaced by a random value
            document = json.loads(raw)
            part = data.draw(st.sampled_from(["added_tokens", "pre_tokenizer", "decoder", "post_processor", "model"]))
            inner = data.draw(st.sampled_from(["vocab", "merges", "type", None]))
            if part == "model" and inner is not None:
                document["model"][inner] = data.draw(JSON_VALUES)
            else:
                document[part] = data.draw(JSON_VALUES)
            path.write_text(json.dumps(document))
        tokenizer = load_or_clear_error(load_tokenizer, folder, "tokenizer.json")
        if tokenizer is not None:  # whatever loaded encodes and decodes
            tokenizer.decode(tokenizer.encode("Hello, wörld 🙂"))

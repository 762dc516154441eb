"""Every checkpoint layout the loader accepts, and every bad checkpoint it must refuse clearly."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hub_cache import put_in_hub_cache
from safetensors.torch import save_file
from tiny_checkpoint import bigscience_state, random_hf_bloom, save_bigscience, save_transformers
from tiny_tokenizer import build_tiny_tokenizer

import bloom.checkpoints.loader
from bloom import Bloom, load_pretrained, load_tokenizer
from bloom.checkpoints.loader import load_config, weight_files


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_bloom(hidden_size=48, n_head=6, n_layer=3)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 320, (2, 11))


def logits(model, ids):
    with torch.no_grad():
        return model(ids) if isinstance(model, Bloom) else model(input_ids=ids).logits


def assert_same_model(ours: Bloom, hf_model, ids, dtype=torch.float32):
    """Ours holds exactly the reference's weights, rounded to `dtype`, and computes the same logits."""
    reference = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    state = ours.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in state.items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, reference[name].to(dtype)), name
    if dtype == torch.float32:
        torch.testing.assert_close(logits(ours, ids), logits(hf_model, ids), rtol=0, atol=1e-5)


def test_transformers_single_file(tmp_path, hf_model, ids):
    folder = save_transformers(hf_model, tmp_path)
    assert [p.name for p in weight_files(folder)] == ["model.safetensors"]
    model = load_pretrained(folder)
    assert not model.training
    assert_same_model(model, hf_model, ids)


def test_a_single_file_is_read_before_an_index_left_beside_it_as_transformers_reads_it(tmp_path, hf_model, ids):
    """An index from an earlier sharded save, whose shards are gone: transformers loads model.safetensors."""
    folder = save_transformers(hf_model, tmp_path / "single")
    sharded = save_transformers(hf_model, tmp_path / "sharded", max_shard_size="20KB")
    shutil.copy(sharded / "model.safetensors.index.json", folder)
    theirs = type(hf_model).from_pretrained(folder)
    assert [p.name for p in weight_files(folder)] == ["model.safetensors"]
    assert_same_model(load_pretrained(folder), theirs, ids)


def test_transformers_sharded(tmp_path, hf_model, ids):
    folder = save_transformers(hf_model, tmp_path, max_shard_size="20KB")
    assert len(weight_files(folder)) > 2
    assert_same_model(load_pretrained(folder), hf_model, ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bigscience_layout_keeps_the_stored_dtype(tmp_path, hf_model, ids, dtype):
    """No prefix, no lm_head, shards named from the index with the 176B underscore spelling."""
    folder = save_bigscience(hf_model, tmp_path, dtype=dtype)
    assert sorted(p.name for p in weight_files(folder)) == [f"model_0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert_same_model(load_pretrained(folder), hf_model, ids, dtype)


@pytest.mark.parametrize("asked", ["fp32", torch.float32, "float32"])
def test_cast_to_the_asked_dtype(tmp_path, hf_model, ids, asked):
    folder = save_bigscience(hf_model, tmp_path, dtype=torch.float16)
    model = load_pretrained(folder, dtype=asked)
    half_reference = {k: v.float() for k, v in bigscience_state(hf_model, torch.float16).items()}
    assert all(t.dtype == torch.float32 and torch.equal(t, half_reference[k]) for k, t in model.state_dict().items())


def test_cast_of_data_left_unaligned_by_the_header(tmp_path, hf_model):
    """The format does not pad its header: fp16 data may start at an odd byte of the file, and still casts."""
    folder = save_bigscience(hf_model, tmp_path, dtype=torch.float16, n_shards=1)
    (shard,) = weight_files(folder)
    data = shard.read_bytes()
    header_bytes = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + header_bytes].rstrip() + b" " * (1 - len(data[8 : 8 + header_bytes].rstrip()) % 2)
    assert (8 + len(header)) % 2 == 1  # every tensor's data now starts at an odd offset
    shard.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + header_bytes :])
    model = load_pretrained(folder, dtype="fp32")
    half_reference = {k: v.float() for k, v in bigscience_state(hf_model, torch.float16).items()}
    assert all(t.dtype == torch.float32 and torch.equal(t, half_reference[k]) for k, t in model.state_dict().items())


def test_prefix_with_a_stored_lm_head(tmp_path, hf_model, ids):
    """Fine-tunes saved from BloomForCausalLM may store lm_head.weight; it is the embedding and is skipped."""
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    tmp_path.mkdir(exist_ok=True)
    save_file(state, tmp_path / "model.safetensors")
    hf_model.config.to_json_file(tmp_path / "config.json")
    assert_same_model(load_pretrained(tmp_path), hf_model, ids)


@pytest.mark.parametrize(
    "layout",
    [
        "single file",
        "sharded, model-00001-of-0000N",  # transformers' save_pretrained, bloom-7b1
        "sharded, model_00001-of-0000N",  # the 176B model's spelling
        "sharded, blobs in the shared store",  # huggingface_hub's cache-wide store for Xet downloads
    ],
)
def test_hub_repo_id_from_the_local_cache(tmp_path, hf_model, ids, cache_only, layout):
    """Every file of the snapshot is a relative symlink to a blob outside the snapshot folder, as in a real cache."""
    repo = tmp_path / "repo"
    if layout == "single file":
        save_transformers(hf_model, repo)
    elif layout == "sharded, model-00001-of-0000N":
        save_transformers(hf_model, repo, max_shard_size="20KB")
        assert (repo / "model-00001-of-00013.safetensors").is_file()
    else:
        save_bigscience(hf_model, repo, dtype=torch.float32)
    commit = put_in_hub_cache(repo, tmp_path / "hub", "bigscience/bloom-tiny", shared_store="shared" in layout)
    for revision in (None, "main", commit):
        model = load_pretrained("bigscience/bloom-tiny", revision=revision, cache_dir=tmp_path / "hub")
        assert_same_model(model, hf_model, ids)


def test_the_config_alone_is_read_from_a_repo_whose_weights_are_not_cached(tmp_path, hf_model, cache_only):
    """bloom activations checks its points against config.json before the weights are downloaded."""
    repo = save_transformers(hf_model, tmp_path / "repo")
    (repo / "model.safetensors").unlink()  # cached: config.json only
    put_in_hub_cache(repo, tmp_path / "hub", "bigscience/bloom-tiny")
    config = load_config("bigscience/bloom-tiny", cache_dir=tmp_path / "hub")
    assert config.n_layer == hf_model.config.n_layer and config.hidden_size == hf_model.config.hidden_size
    with pytest.raises(AssertionError, match="the cached snapshot should have been enough"):  # the weights: fetched
        load_pretrained("bigscience/bloom-tiny", cache_dir=tmp_path / "hub")


@pytest.mark.parametrize("missing", ["model_00002-of-00003.safetensors", "config.json", "tokenizer.json"])
def test_a_cached_snapshot_missing_a_file_says_how_to_complete_it(tmp_path, hf_model, monkeypatch, missing):
    """Offline, huggingface_hub hands back the partial snapshot an interrupted download left: the error names the
    missing file (a shard, the config, the tokenizer), the hub's part and `bloom download`."""
    import huggingface_hub.constants

    repo = save_bigscience(hf_model, tmp_path / "repo", dtype=torch.float32)
    build_tiny_tokenizer(repo)
    commit = put_in_hub_cache(repo, tmp_path / "hub", "bigscience/bloom-tiny")
    snapshot = tmp_path / "hub" / "models--bigscience--bloom-tiny" / "snapshots" / commit
    (snapshot / missing).unlink()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does
    message = (
        rf"{missing}.* the huggingface cache's copy of bigscience/bloom-tiny lacks it \(HF_HUB_OFFLINE is set, so the "
        r"hub was not asked\); an interrupted download leaves a copy so, and `bloom download bigscience/bloom-tiny`, "
        r"where the hub can be reached, completes it if the repo has the file"
    )
    load = load_tokenizer if missing == "tokenizer.json" else load_pretrained
    with pytest.raises(FileNotFoundError, match=message):
        load("bigscience/bloom-tiny", cache_dir=tmp_path / "hub")


def test_the_hub_cache_is_the_one_huggingface_hub_reads(tmp_path, hf_model):
    """huggingface_hub's own cache scanner sees every file of the snapshot, each a relative link into blobs/."""
    from huggingface_hub import scan_cache_dir

    repo = save_bigscience(hf_model, tmp_path / "repo", dtype=torch.float32)
    commit = put_in_hub_cache(repo, tmp_path / "hub", "bigscience/bloom-tiny")
    scan = scan_cache_dir(tmp_path / "hub")
    assert not scan.warnings
    (cached,) = scan.repos
    assert cached.repo_id == "bigscience/bloom-tiny" and cached.refs["main"].commit_hash == commit
    (revision,) = cached.revisions
    assert sorted(f.file_name for f in revision.files) == sorted(p.name for p in repo.iterdir())
    for file in revision.files:
        assert file.file_path.is_symlink()
        assert file.file_path.readlink() == Path("../../blobs") / file.blob_path.name


def test_a_symlink_the_user_placed_in_a_local_folder_is_followed(tmp_path, hf_model, ids):
    folder = save_bigscience(hf_model, tmp_path / "ckpt", dtype=torch.float32)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for shard in folder.glob("model_*.safetensors"):
        shard.rename(elsewhere / shard.name)
        shard.symlink_to(elsewhere / shard.name)  # absolute, out of the checkpoint folder
    assert_same_model(load_pretrained(folder), hf_model, ids)


def test_pickles_only_on_request_and_only_weights(tmp_path, hf_model, ids):
    state = {k: v.contiguous() for k, v in bigscience_state(hf_model, torch.float32).items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf_model.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="allow_pickle=True"):
        load_pretrained(tmp_path)
    assert_same_model(load_pretrained(tmp_path, allow_pickle=True), hf_model, ids)

    state["ln_f.bias"] = state["ln_f.bias"].to(torch.int32)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: tensor 'ln_f.bias' is stored as torch.int32"):
        load_pretrained(tmp_path, allow_pickle=True)

    # a pickle that references a function (here shutil.rmtree) must be refused by weights-only unpickling
    torch.save({"h.0.input_layernorm.weight": shutil.rmtree}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_pretrained(tmp_path, allow_pickle=True)


@pytest.fixture
def sharded(tmp_path, hf_model):
    return save_bigscience(hf_model, tmp_path / "ckpt", dtype=torch.float16)


def test_no_config(sharded):
    (sharded / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(sharded)


def test_no_weights(sharded):
    for path in sharded.glob("model*"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_pretrained(sharded)


def test_not_a_folder_nor_a_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pretrained(tmp_path / "nowhere")
    for name in ("nowhere/", "owner/", "/name", "a/b/c", "owner/na me"):  # not repo ids: the hub is not asked
        with pytest.raises(FileNotFoundError, match=f"{name}: no such folder, and not a hub repo id of the form"):
            load_pretrained(name, cache_dir=tmp_path / "hub")


def test_a_folder_under_home_is_found_and_a_device_this_machine_lacks_is_refused(tmp_path, hf_model, ids,
                                                                                 monkeypatch):  # fmt: skip
    monkeypatch.setenv("HOME", str(tmp_path))
    save_transformers(hf_model, tmp_path / "tiny")
    assert_same_model(load_pretrained("~/tiny"), hf_model, ids)
    build_tiny_tokenizer(tmp_path / "tiny")
    for spelled in ("~/tiny", "~/tiny/tokenizer.json"):
        assert load_tokenizer(spelled).encode("Hello world") == load_tokenizer(tmp_path / "tiny").encode("Hello world")
    with pytest.raises(ValueError, match=r"device 'gpu': not a device bloom runs on; use cpu, cuda or cuda:N"):
        load_pretrained("~/tiny", device="gpu")
    assert load_pretrained("~/tiny", device="cpu:0").ln_f.weight.device.type == "cpu"  # as torch spells it too
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device cuda: CUDA is not available on this machine"):
            load_pretrained("~/tiny", device="cuda")


def test_mistyped_relative_path_says_no_such_folder(tmp_path, monkeypatch):
    """'checkpoints/tiny' could be a repo id too: the hub is asked, and the error still names the folder."""
    monkeypatch.chdir(tmp_path)
    hub = "the (hub did not provide it|huggingface hub is unreachable)"  # online or not
    where = "neither a local folder nor in the huggingface cache"
    with pytest.raises(FileNotFoundError, match=f"checkpoints/tiny: {where}, and {hub}"):
        load_pretrained("checkpoints/tiny", cache_dir=tmp_path / "hub")


def test_missing_shard(sharded):
    (sharded / "model_00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model_00002-of-00003.safetensors"):
        load_pretrained(sharded)


@pytest.mark.parametrize("weight_map", [{}, ["model_00001-of-00003.safetensors"]])
def test_index_without_a_map_of_shards(sharded, weight_map):
    index_path = sharded / "model.safetensors.index.json"
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match="model.safetensors.index.json: its weight_map should map tensor names"):
        load_pretrained(sharded)


def test_config_that_is_not_an_object(sharded):
    (sharded / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object of settings, found a list"):
        load_pretrained(sharded)


def edit_index(folder: Path, edit) -> Path:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))
    return index_path


@pytest.mark.parametrize(
    "name",
    [
        "../elsewhere.safetensors", "..", ".", "", "/tmp/elsewhere.safetensors",
        "sub/../model_00002-of-00003.safetensors", "./model_00002-of-00003.safetensors", "..\\elsewhere.safetensors",
        "C:\\elsewhere.safetensors", "C:elsewhere.safetensors", "model_00002-of-00003.safetensors\0.txt",
    ],
)  # fmt: skip
def test_shard_names_that_leave_the_folder_are_refused_by_name(sharded, name):
    """Judged by the name alone, whether or not a file of that name exists."""
    shutil.copy(sharded / "model_00002-of-00003.safetensors", sharded.parent / "elsewhere.safetensors")

    def point_elsewhere(weight_map):
        for key, shard in weight_map.items():
            if shard.startswith("model_00002"):
                weight_map[key] = name

    edit_index(sharded, point_elsewhere)
    with pytest.raises(
        ValueError, match=rf"model.safetensors.index.json: shard {re.escape(repr(name))} is not a plain"
    ):
        load_pretrained(sharded)


@pytest.mark.parametrize("value", [["model_00001-of-00003.safetensors"], 3, None, {"file": "x"}])
def test_index_values_that_are_not_file_names_are_refused_by_key(sharded, value):
    index_path = edit_index(sharded, lambda weight_map: weight_map.update({"ln_f.bias": value}))
    with pytest.raises(ValueError, match=rf"{index_path}: weight_map\['ln_f.bias'\] should be a shard file name"):
        load_pretrained(sharded)


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"n_layer": 1_000_000}, "n_layer is 1000000, but the weights hold 3 blocks"),
        ({"n_layer": 2}, "n_layer is 2, but the weights hold 3 blocks"),
        ({"n_embed": 96}, r"vocab_size 320 and hidden_size 96 do not fit word_embeddings.weight in "
                          r"model_00001-of-00003.safetensors, of shape \(320, 48\)"),
        ({"vocab_size": 10**12}, r"vocab_size 1000000000000 and hidden_size 48 do not fit"),
    ],
)  # fmt: skip
def test_config_sizes_that_the_weights_contradict_are_refused_before_building(sharded, monkeypatch, edit, message):
    config_path = sharded / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | edit))

    def no_model(config):
        raise AssertionError("a model was built before the config was checked against the weights")

    monkeypatch.setattr(bloom.checkpoints.loader, "Bloom", no_model)
    with pytest.raises(ValueError, match=rf"{re.escape(str(config_path))}: {message}"):
        load_pretrained(sharded)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_shard(sharded, damage):
    shard = sharded / "model_00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 10] if damage == "truncate" else b"\x00garbage" * 40)
    with pytest.raises(ValueError, match="model_00003-of-00003.safetensors"):
        load_pretrained(sharded)


def rewrite_shard(folder: Path, name: str, edit) -> None:
    from safetensors.torch import load_file

    state = load_file(folder / name)
    edit(state)
    save_file(state, folder / name)


def test_wrong_shape_names_key_expected_and_found(sharded):
    def shrink(state):
        state["ln_f.weight"] = state["ln_f.weight"][:40].clone()

    rewrite_shard(sharded, "model_00003-of-00003.safetensors", shrink)
    with pytest.raises(
        ValueError, match=r"ln_f.weight in model_00003-of-00003.safetensors: expected \(48,\), found \(40,\)"
    ):
        load_pretrained(sharded)


def test_missing_and_unexpected_keys_are_listed(sharded):
    def rename(state):
        state["ln_f.gamma"] = state.pop("ln_f.weight")
        del state["ln_f.bias"]

    rewrite_shard(sharded, "model_00003-of-00003.safetensors", rename)
    with pytest.raises(ValueError, match=r"missing keys: ln_f.weight, ln_f.bias; unexpected keys: ln_f.gamma"):
        load_pretrained(sharded)


def test_key_stored_twice(sharded):
    def duplicate(state):
        state["transformer.ln_f.bias"] = state["ln_f.bias"].clone()

    rewrite_shard(sharded, "model_00003-of-00003.safetensors", duplicate)
    with pytest.raises(ValueError, match="stored twice: ln_f.bias"):
        load_pretrained(sharded)


def test_non_float_tensor(sharded):
    def to_int(state):
        state["ln_f.bias"] = state["ln_f.bias"].to(torch.int32)

    rewrite_shard(sharded, "model_00003-of-00003.safetensors", to_int)
    with pytest.raises(ValueError, match="'ln_f.bias' is stored as I32"):
        load_pretrained(sharded)


def test_unknown_dtype(sharded):
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load_pretrained(sharded, dtype="int8")


def test_heads_must_divide_hidden_size(sharded):
    config = json.loads((sharded / "config.json").read_text())
    config["num_attention_heads"] = 7
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: .*hidden_size 48 does not divide by n_head 7"):
        load_pretrained(sharded)


def test_revision_with_a_local_folder(sharded):
    with pytest.raises(ValueError, match="revision"):
        load_pretrained(sharded, revision="main")


def test_cast_in_chunks_of_rows(tmp_path, hf_model, ids, monkeypatch):
    """A cast reads a few rows at a time; the chunks must tile every tensor exactly."""
    monkeypatch.setattr(bloom.checkpoints.loader, "READ_CHUNK_BYTES", 7 * 48 * 4)  # 7 rows of the fp32 embedding
    folder = save_bigscience(hf_model, tmp_path, dtype=torch.bfloat16)
    model = load_pretrained(folder, dtype="fp32")
    reference = {k: v.float() for k, v in bigscience_state(hf_model, torch.bfloat16).items()}
    assert all(t.dtype == torch.float32 and torch.equal(t, reference[k]) for k, t in model.state_dict().items())

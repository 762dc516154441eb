import os

import pytest
import torch

from bloom import matvec


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Every test starts from the same seed and the float32 default dtype, and leaves them so."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default_dtype)


@pytest.fixture
def cache_only(monkeypatch):
    """Fail the test if the hub is asked for anything the local cache should have answered."""
    import bloom.checkpoints.hub

    real_snapshot_download = bloom.checkpoints.hub.snapshot_download

    def snapshot_download(*args, **kwargs):
        assert kwargs.get("local_files_only"), "the cached snapshot should have been enough"
        return real_snapshot_download(*args, **kwargs)

    monkeypatch.setattr(bloom.checkpoints.hub, "snapshot_download", snapshot_download)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    """A tiny checkpoint in transformers' layout plus the tiny BLOOM-style tokenizer, like a hub repo folder.

    Its embedding has more rows than the tokenizer has ids, as BLOOM's does (250880 vs 250680).
    """
    from tiny_checkpoint import random_hf_bloom, save_transformers
    from tiny_tokenizer import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny_bloom")
    build_tiny_tokenizer(folder)
    hf = random_hf_bloom(vocab_size=704, hidden_size=48, n_head=6, n_layer=2)
    save_transformers(hf, folder)
    return folder


EOS_PROMPT = "Bonjour, le monde"


@pytest.fixture(scope="session")
def eos_model_folder(tmp_path_factory):
    """Like tiny_model_folder, but greedy generation from EOS_PROMPT emits EOS as its third new token.

    Made by swapping the embedding rows (which are also the LM head's) of EOS and of the token a random model
    picks third; the fixture checks that this worked, so tests can rely on it.
    """
    from tiny_checkpoint import random_hf_bloom, save_transformers
    from tiny_tokenizer import build_tiny_tokenizer

    from bloom import generate, load_pretrained, load_tokenizer

    folder = tmp_path_factory.mktemp("eos_bloom")
    build_tiny_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    eos, ids = tokenizer.eos_token_id, torch.tensor([tokenizer.encode(EOS_PROMPT)])
    hf = random_hf_bloom(vocab_size=704, hidden_size=48, n_head=6, n_layer=2)
    third = int(generate(load_pretrained(save_transformers(hf, folder)), ids, max_new_tokens=3, eos_token_id=[])[0, -1])
    with torch.no_grad():
        embedding = hf.transformer.word_embeddings.weight
        embedding[[third, eos]] = embedding[[eos, third]]
    out = generate(load_pretrained(save_transformers(hf, folder)), ids, max_new_tokens=8, eos_token_id=eos)
    assert out.shape[1] == ids.shape[1] + 3 and out[0, -1] == eos, "the swap did not make EOS the third token"
    return folder


BUILDS = ["native", "x86-64-v3", "x86-64-v2"]  # this CPU's vector code, the AVX2 tiles, the portable loops


@pytest.fixture(scope="session")
def libraries(tmp_path_factory):
    """The library compiled once for each target of BUILDS (the AVX2 and portable ones only on x86-64)."""
    targets = BUILDS if os.uname().machine == "x86_64" else ["native"]
    return {target: matvec.load(matvec.build(target, tmp_path_factory.mktemp(target))) for target in targets}


@pytest.fixture(params=BUILDS)
def build(request, libraries, monkeypatch):
    """The library of one target, put where `matvec.library()` returns it."""
    if request.param not in libraries:
        pytest.skip("the AVX2 and portable builds are compiled for x86-64")
    monkeypatch.setattr(matvec, "_library", libraries[request.param])
    monkeypatch.setattr(matvec, "_tried", True)
    return request.param

"""Sliding-window perplexity against the same procedure run on transformers' logits."""

import math
import warnings

import pytest
import torch
from tiny_checkpoint import random_hf_bloom, save_transformers

import bloom.model
from bloom import load_pretrained
from bloom.research.perplexity import perplexity, sliding_windows

WINDOWS = [(100, 32, 8), (100, 32, 32), (31, 32, 16), (2, 4, 1), (257, 50, 49)]  # (n_tokens, context, stride)


@pytest.mark.parametrize("n_tokens,context,stride", WINDOWS)
def test_windows_score_every_token_with_context_exactly_once(n_tokens, context, stride):
    windows = sliding_windows(n_tokens, context, stride)
    scored = [t for w in windows for t in range(w.first_scored, w.end)]
    # a token that opens a window when windows do not overlap has no context: not scored (as in transformers)
    no_context = {0} | ({w.begin for w in windows} if stride == context else set())
    assert scored == [t for t in range(n_tokens) if t not in no_context]
    for w in windows:
        assert w.end - w.begin <= context and w.begin < w.first_scored <= w.end


def test_bad_windows():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 16, 17)
    with pytest.raises(ValueError, match="at least 2"):
        sliding_windows(1, 16, 8)
    with pytest.raises(ValueError, match="context must be 2 or more"):  # it would score no token at all
        sliding_windows(100, 1, 1)


def transformers_perplexity(hf, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """The loop of transformers' 'perplexity of fixed-length models' guide, summing NLL in float64."""
    nll, n_scored, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + context, ids.shape[1])
        target_len = end - prev_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = hf(input_ids=window, labels=labels).loss
        n_loss = int((labels[:, 1:] != -100).sum())
        nll += loss.double().item() * n_loss
        n_scored += n_loss
        prev_end = end
        if end == ids.shape[1]:
            break
    return math.exp(nll / n_scored), n_scored


@pytest.mark.parametrize("context,stride,batch_size", [(24, 8, 3), (24, 24, 2), (64, 16, 1)])
def test_perplexity_equals_transformers(tmp_path, context, stride, batch_size):
    hf = random_hf_bloom(hidden_size=48, n_head=6, n_layer=2)
    ours = load_pretrained(save_transformers(hf, tmp_path))
    ids = torch.randint(4, 320, (1, 150))
    expected, n_scored = transformers_perplexity(hf, ids, context, stride)
    got = perplexity(ours, ids[0].tolist(), context=context, stride=stride, batch_size=batch_size)
    assert got.n_scored == n_scored
    assert math.isclose(got.perplexity, expected, rel_tol=1e-4)
    assert math.isclose(got.perplexity, math.exp(got.nll), rel_tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tensor is taken as it is, without torch's copy-construct warning
        assert perplexity(ours, ids[0], context=context, stride=stride, batch_size=batch_size) == got


def test_token_ids_that_are_not_one_sequence_of_ids_are_refused(tmp_path):
    model = load_pretrained(save_transformers(random_hf_bloom(hidden_size=48, n_head=6, n_layer=2), tmp_path))
    with pytest.raises(ValueError, match=r"token_ids must be one sequence of ids, \(T,\), got \(1, 5\)"):
        perplexity(model, torch.arange(4, 9)[None], context=4, stride=2)
    with pytest.raises(ValueError, match=r"token_ids\[2\] = 320 is not a token id"):
        perplexity(model, [5, 6, 320, 7], context=4, stride=2)
    with pytest.raises(ValueError, match=r"the text has 0 token\(s\); perplexity needs at least 2"):
        perplexity(model, [], context=4, stride=2)
    with pytest.raises(ValueError, match=r"token_ids is a str: perplexity scores token ids, e.g. tokenizer.encode"):
        perplexity(model, "Hello world", context=4, stride=2)


def test_long_windows_equal_transformers(tmp_path):
    """4,096-token windows: our attention runs in query chunks (its float32 scores exceed the budget)."""
    hf = random_hf_bloom(hidden_size=48, n_head=6, n_layer=2)
    ours = load_pretrained(save_transformers(hf, tmp_path))
    assert 6 * 4096 * 4096 * 4 > bloom.model.SCORES_BUDGET
    ids = torch.randint(4, 320, (1, 4096 + 50))
    expected, n_scored = transformers_perplexity(hf, ids, 4096, 4096)
    got = perplexity(ours, ids[0].tolist(), context=4096, stride=4096, batch_size=1)
    assert got.n_scored == n_scored
    assert math.isclose(got.perplexity, expected, rel_tol=1e-6)

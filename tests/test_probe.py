"""Recording and editing a forward pass through bloom.research.probe, and the logit lens."""

import pytest
import torch
import torch.nn.functional as F

from bloom import Bloom, BloomConfig
from bloom.model import alibi_slopes
from bloom.research.lens import logit_lens
from bloom.research.probe import patch, record, zero_head


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = Bloom(BloomConfig(hidden_size=64, n_layer=3, n_head=8, vocab_size=100)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(4, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def test_last_residual_through_ln_f_and_head_is_the_logits(model, batch):
    ids, mask = batch
    with torch.no_grad(), record(model, "h.*", "ln_f") as seen:
        logits = model(ids, mask)
    assert sorted(seen) == ["h.0", "h.1", "h.2", "ln_f"]
    assert torch.equal(F.linear(model.ln_f(seen["h.2"]), model.word_embeddings.weight), logits)
    assert torch.equal(F.linear(seen["ln_f"], model.word_embeddings.weight), logits)


def test_attention_probabilities_sum_to_one_and_respect_causality_and_padding(model, batch):
    ids, mask = batch
    with torch.no_grad(), record(model, "h.*.self_attention.probs", "h.1.self_attention.q") as seen:
        model(ids, mask)
    assert seen["h.1.self_attention.q"].shape == (2, 8, 10, 8)
    for layer in range(3):
        probs = seen[f"h.{layer}.self_attention.probs"]  # (B, nh, T, S)
        assert probs.shape == (2, 8, 10, 10)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 8, 10))
        assert (probs.triu(diagonal=1) == 0).all()  # no query sees a later key
        assert (probs[1, :, 4:, :4] == 0).all()  # real tokens of the padded row never see the padding


def test_recording_leaves_no_hooks_and_changes_nothing(model, batch):
    ids, mask = batch
    with torch.no_grad():
        before = model(ids, mask)
        with record(model, "*", "h.*", "h.*.*", "h.*.*.*"):
            during = model(ids, mask)
        assert torch.equal(before, during)
    assert all(not m._forward_hooks for m in model.modules())


def test_ablating_a_head_changes_the_output_and_ablating_nothing_does_not(model, batch):
    ids, mask = batch
    with torch.no_grad():
        clean = model(ids, mask)
        with patch(model, {"h.1.self_attention.context": lambda x: x}):
            assert torch.equal(model(ids, mask), clean)
        name = "h.1.self_attention.context"
        with patch(model, {name: zero_head(3)}), record(model, name) as seen:
            ablated = model(ids, mask)
    assert (seen["h.1.self_attention.context"][:, 3] == 0).all()
    assert (seen["h.1.self_attention.context"][:, 2] != 0).any()
    assert (ablated - clean).abs().max() > 1e-3
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["word_embeddings_layernorm", "h.0", "h.1", "h.2"])
def test_patching_a_whole_activation_from_prompt_a_into_prompt_b_gives_a(model, name):
    a, b = torch.randint(4, 100, (1, 12)), torch.randint(4, 100, (1, 12))
    with torch.no_grad():
        with record(model, name) as seen:
            logits_a = model(a)
        with patch(model, {name: seen[name]}):
            patched_b = model(b)
        assert not torch.equal(model(b), logits_a)
    torch.testing.assert_close(patched_b, logits_a, rtol=0, atol=1e-6)


def test_bad_names_and_shapes_are_refused(model, batch):
    ids, mask = batch
    with pytest.raises(ValueError, match="h.9"):
        with record(model, "h.9"):
            pass
    bad_edits = [
        (
            {"h.0": torch.zeros(1, 2)},
            r"patch for h.0: the edit gave shape \(1, 2\), the output is \(2, 10, 64\) "
            r"\(a tensor stands for every call's output; generate's decode steps",
        ),
        ({"h.0": lambda x: x[:, :1]}, r"patch for h.0: the edit gave shape \(2, 1, 64\)"),
        ({"h.0": lambda x: None}, r"patch for h.0: the edit gave NoneType"),
        ({"h.1.self_attention.context": zero_head(8)}, r"h.1.self_attention.context: zero_head\(8\): there are 8"),
        ({"h.1.self_attention.context": zero_head(-1)}, r"h.1.self_attention.context: zero_head\(-1\)"),
    ]
    for edits, message in bad_edits:
        with pytest.raises(ValueError, match=message), torch.no_grad(), patch(model, edits):
            model(ids, mask)
    assert all(not m._forward_hooks for m in model.modules())


def test_points_that_never_run_or_have_no_heads_are_refused_before_the_forward_pass(model, batch):
    """`h` is the list of blocks, never called itself: a hook on it would record nothing. zero_head on a point
    without a head axis would zero a token position instead."""
    ids, mask = batch
    with pytest.raises(ValueError, match=r"'h' names a list of modules, which is never called itself: .* h.0 or h.\*"):
        with record(model, "h"):
            pass
    with record(model, "*") as seen:  # the top-level modules that run, without the list
        model(ids, mask)
    assert sorted(seen) == ["ln_f", "word_embeddings", "word_embeddings_layernorm"]
    for point in ("h.0", "h.0.mlp.act", "h.0.self_attention"):
        with pytest.raises(ValueError, match=rf"patch for {point}: zero_head\(2\) edits a point with a head axis"):
            with patch(model, {point: zero_head(2)}):
                pass
    with (
        torch.no_grad(),
        patch(model, {"h.0.self_attention.probs": zero_head(2)}),
        record(model, "h.0.self_attention.probs") as seen,
    ):
        model(ids, mask)
    assert not seen["h.0.self_attention.probs"][:, 2].any() and seen["h.0.self_attention.probs"][:, 3].any()
    assert all(not m._forward_hooks for m in model.modules())


def test_double_star_matches_any_number_of_parts(model, batch):
    ids, mask = batch
    with torch.no_grad(), record(model, "**") as everything:
        model(ids, mask)
    ran = [name for name, m in model.named_modules() if name and not isinstance(m, torch.nn.ModuleList)]
    assert sorted(everything) == sorted(ran)  # every module that runs
    for pattern, expected in [
        ("h.1.**", [name for name in ran if name == "h.1" or name.startswith("h.1.")]),
        ("**.probs", [name for name in ran if name.endswith(".probs")]),
        ("h.**.act", [name for name in ran if name.endswith("mlp.act")]),
        ("**.h.9", []),
    ]:
        if not expected:
            with pytest.raises(ValueError, match="no module of the model is named like"), record(model, pattern):
                pass
            continue
        with torch.no_grad(), record(model, pattern) as seen:
            model(ids, mask)
        assert sorted(seen) == sorted(expected), pattern
        assert all(torch.equal(seen[name], everything[name]) for name in expected)


def test_record_takes_a_list_and_bad_arguments_name_themselves(model, batch):
    ids, mask = batch
    with torch.no_grad(), record(model, ["h.0", "h.1"], "ln_f") as seen:
        model(ids, mask)
    assert list(seen) == ["h.0", "h.1", "ln_f"]
    with pytest.raises(ValueError, match="no points named"), record(model):
        pass
    with pytest.raises(TypeError, match=r"point names are strings, got \[3\]"), record(model, [3]):
        pass
    with pytest.raises(TypeError, match="patch takes a dict of point name -> edit, got list"), patch(model, ["h.0"]):
        pass
    with pytest.raises(RuntimeError) as error, torch.no_grad(), patch(model, {"h.1": lambda x: x + torch.zeros(5)}):
        model(ids, mask)
    assert error.value.__notes__ == ["in the patch for h.1"]  # torch's own error, with the point named


def test_logit_lens_last_row_is_the_models_prediction(model, batch):
    ids, mask = batch
    probs, tokens = logit_lens(model, ids, mask, k=4)
    assert probs.shape == tokens.shape == (4, 2, 10, 4)
    with torch.no_grad():
        expected = torch.topk(torch.softmax(model(ids, mask), dim=-1), 4, dim=-1)
    assert torch.equal(tokens[-1], expected.indices)
    torch.testing.assert_close(probs[-1], expected.values)
    assert (probs[:, :, :, :-1] >= probs[:, :, :, 1:]).all()  # sorted, most likely first
    assert not torch.equal(tokens[0], tokens[-1])  # early layers predict something else


def test_resid_mid_plus_mlp_is_the_block_and_softmax_of_the_masked_scores_is_probs(model, batch):
    ids, mask = batch
    points = ["h.*", "h.*.resid_mid", "h.*.mlp", "h.*.self_attention.scores", "h.*.self_attention.probs"]
    with torch.no_grad(), record(model, *points, "h.*.self_attention.q", "h.*.self_attention.k") as seen:
        model(ids, mask)
    allowed = torch.ones(10, 10).tril().bool() & mask.bool()[:, None, :]  # (B, T, S): earlier real keys
    allowed |= torch.eye(10, dtype=torch.bool)  # a padding query sees itself (bloom.model.causal_mask)
    for i in range(3):
        assert torch.equal(seen[f"h.{i}.resid_mid"] + seen[f"h.{i}.mlp"], seen[f"h.{i}"])
        scores, probs = seen[f"h.{i}.self_attention.scores"], seen[f"h.{i}.self_attention.probs"]  # (B, nh, T, S)
        assert scores.shape == (2, 8, 10, 10) and torch.isfinite(scores).all()  # the mask is not in the scores
        masked = scores.masked_fill(~allowed[:, None], float("-inf"))
        torch.testing.assert_close(torch.softmax(masked, dim=-1), probs, rtol=0, atol=1e-6)
        q, k = seen[f"h.{i}.self_attention.q"][0], seen[f"h.{i}.self_attention.k"][0]  # row 0: no padding
        slope_times_key_position = scores[0] - q @ k.transpose(1, 2) / 8**0.5  # (nh, T, S), hd = 8
        alibi = alibi_slopes(8)[:, None, None] * torch.arange(10.0)  # (nh, 1, S)
        torch.testing.assert_close(slope_times_key_position, alibi.expand(8, 10, 10), rtol=0, atol=1e-5)


def test_every_call_keeps_each_forward_pass_in_order(model, batch):
    ids, mask = batch
    with torch.no_grad(), record(model, "h.0", every_call=True) as seen:
        model(ids[:, :4]), model(ids, mask)
    assert [tuple(t.shape) for t in seen["h.0"]] == [(2, 4, 64), (2, 10, 64)]
    with torch.no_grad(), record(model, "h.0") as last:
        model(ids[:, :4]), model(ids, mask)
    assert torch.equal(last["h.0"], seen["h.0"][1])

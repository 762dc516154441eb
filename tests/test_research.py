"""The research tools (gradients through named points, residual decomposition, direct logit attribution,
patching sweeps, per-head weights) against transformers' BLOOM, read and edited with its own forward hooks
and differentiated with its own autograd, on a tiny random checkpoint with 6 heads (not a power of two)."""

import copy

import pytest
import torch
from tiny_checkpoint import left_padded, random_hf_bloom, save_transformers

from bloom import Bloom, BloomConfig, generate, load_pretrained
from bloom.research.attribution import direct_logit_attribution, residual_components
from bloom.research.head_scores import head_scores
from bloom.research.lens import logit_lens, logit_lens_log_probs
from bloom.research.patching import activation_patching, attribution_patching
from bloom.research.probe import patch, record
from bloom.research.weights import head_weights, ov_circuit, qk_circuit

N_LAYER, N_HEAD, C, V = 3, 6, 48, 320
HD = C // N_HEAD


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = random_hf_bloom(vocab_size=V, hidden_size=C, n_head=N_HEAD, n_layer=N_LAYER)
    ours = load_pretrained(save_transformers(hf, tmp_path_factory.mktemp("research_bloom")))
    return hf, ours


# Where transformers keeps the tensor of each of our named points: (module path, read the module's input?).
# transformers' blocks, attention and MLP return the residual stream with the add already done.
def hf_place(name: str) -> tuple[str, bool]:
    if name in ("word_embeddings_layernorm", "ln_f"):
        return name, name == "ln_f"  # ln_f: its input, the residual stream entering it
    i, point = name.split(".", 2)[1], name.split(".", 2)[2:]
    return {
        (): (f"h.{i}", False),
        ("resid_mid",): (f"h.{i}.self_attention", False),
        ("ln1",): (f"h.{i}.input_layernorm", False),
        ("qkv",): (f"h.{i}.self_attention.query_key_value", False),
        ("self_attention.probs",): (f"h.{i}.self_attention.attention_dropout", False),
        ("self_attention.context",): (f"h.{i}.self_attention.dense", True),  # (B, T, nh·hd), heads merged
        ("mlp.act",): (f"h.{i}.mlp.gelu_impl", False),
        ("mlp",): (f"h.{i}.mlp.dense_4h_to_h", False),
    }[tuple(point)]


def run_hf(hf, ids, names, mask=None, edits=None, grad=False):
    """Run transformers' BLOOM; returns (logits, {name: tensor}) with `edits` {name: fn(tensor) -> tensor}
    applied in its hooks and, with grad, each kept tensor's gradient retained."""
    edits, kept, handles = edits or {}, {}, []
    modules = dict(hf.transformer.named_modules())

    def hook_for(name, reads_input):
        def hook(module, args, output=None):
            whole = args if reads_input else output
            tensor = whole[0] if isinstance(whole, tuple) else whole
            if name in edits:
                tensor = edits[name](tensor)
            if grad:
                tensor.retain_grad()
            kept[name] = tensor
            if name in edits:
                return (tensor, *whole[1:]) if isinstance(whole, tuple) else tensor

        return hook

    for name in names:
        path, reads_input = hf_place(name)
        register = modules[path].register_forward_pre_hook if reads_input else modules[path].register_forward_hook
        handles.append(register(hook_for(name, reads_input)))
    try:
        with torch.set_grad_enabled(grad):
            logits = hf(input_ids=ids, attention_mask=mask).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, kept


def heads_of(merged):
    """(B, T, nh·hd) -> (B, nh, T, hd)"""
    B, T, _ = merged.shape
    return merged.view(B, T, N_HEAD, HD).transpose(1, 2)


def qkv_of(fused, which):
    """transformers' fused projection output (B, T, 3C) -> q, k or v (B, nh, T, hd)"""
    B, T, _ = fused.shape
    return fused.view(B, T, N_HEAD, 3, HD)[..., "qkv".index(which), :].transpose(1, 2)


ATTENTION = ["h.*.self_attention.q", "h.*.self_attention.k", "h.*.self_attention.v", "h.*.self_attention.probs"]
POINTS = [
    "word_embeddings_layernorm",
    "h.*",
    "h.*.resid_mid",
    *ATTENTION,
    "h.*.self_attention.context",
    "h.*.mlp.act",
    "h.*.mlp",
]


def hf_key(name):
    """The name transformers' tensor of our point is kept under: q, k and v all come from `h.{i}.qkv`."""
    return name.rsplit(".", 2)[0] + ".qkv" if name.endswith((".q", ".k", ".v")) else name


def hf_names(names):
    return sorted({hf_key(name) for name in names})


def hf_view(name, kept):
    """Our point `name` read from transformers' kept tensors, and its gradient (if any), in our shapes."""
    tensor = kept[hf_key(name)]
    if name.endswith((".q", ".k", ".v")):
        convert = lambda t: qkv_of(t, name[-1])  # noqa: E731
    elif name.endswith(".context"):
        convert = heads_of
    else:
        convert = lambda t: t  # noqa: E731
    return convert(tensor.detach()), None if tensor.grad is None else convert(tensor.grad)


def at_real(tensor, mask):
    """The entries of real (not padding) positions: (B, T, ...) or (B, nh, T, ...) -> (n_real, ...).

    For attention probabilities (B, nh, T, S), the masked keys (padding, later positions) are zeroed: the
    probability there is 0, and its gradient (context's gradient · that key's value) means nothing, since
    transformers' padding positions hold other values than ours."""
    if tensor.shape[-1] == mask.shape[1] and tensor.ndim == 4:  # probs or scores
        allowed = torch.ones(mask.shape[1], mask.shape[1]).tril().bool() & mask.bool()[:, None, :]  # (B, T, S)
        tensor = tensor * allowed[:, None]
    return (tensor.transpose(1, 2) if tensor.ndim == 4 else tensor)[mask.bool()]


@pytest.mark.parametrize("frozen", [False, True], ids=["weights-with-grad", "frozen-weights"])
def test_gradients_through_recorded_points_equal_transformers(models, frozen):
    hf, ours = models
    ids, mask = left_padded([9, 6], vocab_size=V)
    targets = torch.randint(0, V, ids.shape)

    def loss(logits):  # the log-likelihood of random targets at the real positions
        return (logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0] * mask).sum()

    ours.requires_grad_(not frozen)
    try:
        with record(ours, *POINTS, "h.*.self_attention.scores", grad=True) as seen:
            loss(ours(ids, mask)).backward()
    finally:
        ours.requires_grad_(True)
        ours.zero_grad(set_to_none=True)
    names = [n for n in seen if not n.endswith(".scores")]
    assert len(names) == 1 + 9 * N_LAYER
    logits, kept = run_hf(hf, ids, hf_names(names), mask, grad=True)
    loss(logits).backward()
    hf.zero_grad(set_to_none=True)
    for name in names:
        value, grad = hf_view(name, kept)
        torch.testing.assert_close(
            at_real(seen[name].detach(), mask), at_real(value, mask), rtol=0, atol=1e-5, msg=name
        )
        torch.testing.assert_close(at_real(seen[name].grad, mask), at_real(grad, mask), rtol=0, atol=1e-5, msg=name)
    for i in range(N_LAYER):  # scores: softmax's backward applied by hand to transformers' probs and their .grad
        probs, probs_grad = hf_view(f"h.{i}.self_attention.probs", kept)
        probs = at_real(probs, mask)  # masked keys zeroed: they get no gradient
        probs_grad = at_real(probs_grad, mask)
        scores_grad = probs * (probs_grad - (probs * probs_grad).sum(-1, keepdim=True))
        torch.testing.assert_close(
            at_real(seen[f"h.{i}.self_attention.scores"].grad, mask), scores_grad, rtol=0, atol=1e-5
        )


def test_every_logit_lens_row_is_transformers_hidden_state_through_its_ln_f_and_head(models):
    """hidden_states[i] enters block i (i < L); the last is already through ln_f."""
    hf, ours = models
    ids, mask = left_padded([7, 4], vocab_size=V)
    answers = torch.randint(0, V, ids.shape)  # (B, T): a token to follow at each position
    probs, tokens = logit_lens(ours, ids, mask, k=3)
    log_probs = logit_lens_log_probs(ours, ids, answers, mask)
    with torch.no_grad():
        states = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        normed = [hf.transformer.ln_f(h) for h in states[:-1]] + [states[-1]]
        expected = [torch.topk(torch.softmax(hf.lm_head(h).float(), dim=-1), 3, dim=-1) for h in normed]
        of_answers = [torch.log_softmax(hf.lm_head(h).float(), dim=-1).gather(-1, answers[..., None]) for h in normed]
    assert probs.shape == (N_LAYER + 1, 2, 7, 3) and log_probs.shape == (N_LAYER + 1, 2, 7)
    for row, top in enumerate(expected):
        real = mask.bool()
        assert torch.equal(tokens[row][real], top.indices[real]), f"row {row}"
        torch.testing.assert_close(probs[row][real], top.values[real], rtol=0, atol=1e-6, msg=f"row {row}")
        torch.testing.assert_close(log_probs[row][real], of_answers[row][..., 0][real], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"tokens is \(2, 6\): one token per position, a tensor like input_ids"):
        logit_lens_log_probs(ours, ids, answers[:, 1:], mask)
    with pytest.raises(ValueError, match=r"input_ids is list, expected a \(batch, tokens\) tensor"):
        logit_lens_log_probs(ours, ids.tolist(), answers, mask)


def test_record_with_grad_refuses_when_autograd_is_off(models):
    """Under no_grad or inference_mode, the user's own or a tool's (logit_lens runs its pass under inference_mode)."""
    _, ours = models
    refused = r"record\(grad=True\) of h.0: a forward pass ran with autograd off .* outside this record\(grad=True\)"
    for autograd_off in (torch.no_grad, torch.inference_mode):
        with pytest.raises(ValueError, match=refused):
            with autograd_off(), record(ours, "h.0", grad=True):
                ours(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match=refused), record(ours, "h.0", grad=True):
        logit_lens(ours, torch.tensor([[5, 6, 7]]))


def test_residual_components_sum_to_the_stream_entering_ln_f_and_heads_are_right(models):
    hf, ours = models
    ids, mask = left_padded([7, 5], vocab_size=V)
    labels, parts = residual_components(ours, ids, mask)
    layer_labels = lambda i: [f"h.{i}.head.{h}" for h in range(N_HEAD)] + [f"h.{i}.attn_bias", f"h.{i}.mlp"]  # noqa: E731
    assert labels == ["embed"] + sum((layer_labels(i) for i in range(N_LAYER)), [])
    assert parts.shape == (1 + N_LAYER * (N_HEAD + 2), 2, 7, C)
    _, kept = run_hf(hf, ids, ["ln_f", "word_embeddings_layernorm", "h.1.mlp"], mask)
    real = mask.bool()  # transformers' padding positions hold other values than ours, which mean nothing
    torch.testing.assert_close(parts.sum(0)[real], kept["ln_f"][real], rtol=0, atol=1e-5)
    torch.testing.assert_close(parts[0], kept["word_embeddings_layernorm"], rtol=0, atol=1e-6)
    torch.testing.assert_close(parts[labels.index("h.1.mlp")][real], kept["h.1.mlp"][real], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        parts[labels.index("h.2.attn_bias")], hf.transformer.h[2].self_attention.dense.bias.expand(2, 7, C)
    )
    for layer, head in [(0, 5), (2, 1)]:  # transformers with every other head's output zeroed before dense
        only_this_head = torch.zeros(C)
        only_this_head[head * HD : (head + 1) * HD] = 1
        dense = hf.transformer.h[layer].self_attention.dense
        handle = dense.register_forward_hook(lambda m, args, out: out.copy_(out - m.bias))
        try:
            _, kept = run_hf(hf, ids, [f"h.{layer}.self_attention.context"], mask,
                             edits={f"h.{layer}.self_attention.context": only_this_head.mul})  # fmt: skip
        finally:
            handle.remove()
        head_out = torch.nn.functional.linear(kept[f"h.{layer}.self_attention.context"], dense.weight)
        torch.testing.assert_close(
            parts[labels.index(f"h.{layer}.head.{head}")][real], head_out[real], rtol=0, atol=1e-5
        )


def test_direct_logit_attribution_sums_to_the_logits_and_one_head_is_frozen_ln_f_by_hand(models):
    hf, ours = models
    ids, mask = left_padded([8, 8], vocab_size=V)
    tokens = torch.randint(0, V, ids.shape)
    labels, attrib = direct_logit_attribution(ours, ids, tokens, mask)
    assert labels[-1] == "ln_f_bias" and attrib.shape == (len(labels), 2, 8)
    logits, kept = run_hf(hf, ids, ["ln_f", "h.1.self_attention.context"], mask)
    torch.testing.assert_close(attrib.sum(0), logits.gather(-1, tokens[..., None])[..., 0], rtol=0, atol=1e-4)
    layer, head = 1, 4
    x = kept["ln_f"]  # (B, T, C), the residual entering ln_f
    sl = slice(head * HD, (head + 1) * HD)
    c = kept["h.1.self_attention.context"][..., sl] @ hf.transformer.h[layer].self_attention.dense.weight[:, sl].T
    std = (x.var(-1, unbiased=False, keepdim=True) + hf.transformer.ln_f.eps).sqrt()
    row = hf.lm_head.weight[tokens]  # (B, T, C)
    by_hand = ((c - c.mean(-1, keepdim=True)) / std * hf.transformer.ln_f.weight * row).sum(-1)
    torch.testing.assert_close(attrib[labels.index(f"h.{layer}.head.{head}")], by_hand.detach(), rtol=0, atol=1e-5)
    bias = (hf.transformer.ln_f.bias * row).sum(-1)
    torch.testing.assert_close(attrib[-1], bias.detach(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"tokens is \(2, 7\)"):
        direct_logit_attribution(ours, ids, tokens[:, 1:], mask)
    with pytest.raises(ValueError, match=r"tokens is int: one token per position, a tensor like input_ids \(2, 8\)"):
        direct_logit_attribution(ours, ids, 5, mask)
    with pytest.raises(ValueError, match=r"tokens\[1, 2\] = 320 is not a token id"):
        direct_logit_attribution(ours, ids, tokens.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(V)), mask)


def metric(logits):
    return logits[:, -1, 17] - logits[:, -1, 42]


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(4, V, (1, 6)), torch.randint(4, V, (1, 6))


PAIRS = 3
GOOD, BAD = torch.tensor([17, 5, 99]), torch.tensor([42, 42, 7])  # each pair's right and wrong answer


def pair_metric(logits):  # (N, T, V) of the N pairs, in order -> (N,)
    return logits[:, -1].gather(1, GOOD[:, None])[:, 0] - logits[:, -1].gather(1, BAD[:, None])[:, 0]


@pytest.fixture(scope="module")
def pairs():
    return torch.randint(4, V, (PAIRS, 5)), torch.randint(4, V, (PAIRS, 5))


SWEEPS = [
    ("h.*", None),
    ("h.0.resid_mid", None),
    ("h.1.mlp", None),
    ("h.2.self_attention.context", [1, 5]),
]  # heads checked


@pytest.mark.parametrize(("points", "heads"), SWEEPS)
@pytest.mark.parametrize("several", [False, True], ids=["one pair", "3 pairs"])
def test_activation_patching_equals_a_loop_of_patched_transformers_runs(models, prompts, pairs, several, points, heads):
    """Each value is the metric of transformers' run of the corrupted prompt with the clean activation put back at
    one point (head) and position, averaged over the pairs: one run per pair, each with its own clean activation."""
    hf, ours = models
    clean, corrupt = pairs if several else prompts
    measure = pair_metric if several else metric
    N, T = clean.shape
    # one patch's pairs per pass, and several patches' pairs in one (7 // 3 = 2 patches, 12 // 3 = 4)
    labels, values = activation_patching(ours, clean, corrupt, measure, points, batch_size=5)
    for batch_size in (7, 12) if several else ():
        torch.testing.assert_close(
            activation_patching(ours, clean, corrupt, measure, points, batch_size=batch_size)[1], values
        )
    assert values.shape == ((len(labels), N_HEAD, T) if heads else (len(labels), T))
    _, clean_hf = run_hf(hf, clean, labels)
    expected = torch.zeros(N, len(labels), len(heads or [None]), T)  # each pair's
    for p, name in enumerate(labels):
        for j, h in enumerate(heads or [None]):
            for t in range(T):
                cols = slice(None) if h is None else slice(h * HD, (h + 1) * HD)  # per head: its slice of dense's input
                for i in range(N):

                    def put(x, name=name, t=t, cols=cols, i=i):
                        x = x.clone()
                        x[:, t, cols] = clean_hf[name][i, t, cols]
                        return x

                    logits, _ = run_hf(hf, corrupt[i : i + 1], [name], edits={name: put})
                    answers = (GOOD[i], BAD[i]) if several else (17, 42)
                    expected[i, p, j, t] = logits[0, -1, answers[0]] - logits[0, -1, answers[1]]
    _, each = activation_patching(ours, clean, corrupt, measure, points, batch_size=5, per_pair=True)
    for got, want in [(values, expected.mean(0)), (each, expected)]:  # the mean, and each pair's own
        torch.testing.assert_close(got[..., heads, :] if heads else got, want if heads else want[..., 0, :], rtol=0,
                                   atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("points", ["h.1", "h.0.mlp", "h.2.self_attention.context"])
@pytest.mark.parametrize("several", [False, True], ids=["one pair", "3 pairs"])
def test_patching_every_position_at_once_equals_transformers_runs(models, prompts, pairs, several, points):
    """all_positions: a point (a head) patched at every position in one run, as TransformerLens's *_all_pos sweeps;
    attribution patching's estimate of it is the sum of its estimates over the positions."""
    hf, ours = models
    clean, corrupt = pairs if several else prompts
    measure = pair_metric if several else metric
    N = clean.shape[0]
    labels, values = activation_patching(ours, clean, corrupt, measure, points, batch_size=4, all_positions=True)
    heads = points.endswith(".context")
    assert values.shape == ((1, N_HEAD) if heads else (1,))
    _, clean_hf = run_hf(hf, clean, labels)
    expected = torch.zeros(N_HEAD if heads else 1)
    for j in range(len(expected)):
        cols = slice(j * HD, (j + 1) * HD) if heads else slice(None)
        for i in range(N):

            def put(x, cols=cols, i=i):
                x = x.clone()
                x[:, :, cols] = clean_hf[labels[0]][i, :, cols]  # every position
                return x

            logits, _ = run_hf(hf, corrupt[i : i + 1], labels, edits={labels[0]: put})
            answers = (GOOD[i], BAD[i]) if several else (17, 42)
            expected[j] += (logits[0, -1, answers[0]] - logits[0, -1, answers[1]]) / N
    torch.testing.assert_close(values[0], expected if heads else expected[0], rtol=0, atol=1e-4)
    _, each_position = attribution_patching(ours, clean, corrupt, measure, points)
    _, at_once = attribution_patching(ours, clean, corrupt, measure, points, all_positions=True)
    torch.testing.assert_close(at_once, each_position.sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("points", ["h.*", "h.2.self_attention.context"])
def test_a_metric_of_all_the_pairs_at_once_is_taken_as_their_mean(models, pairs, points):
    """TransformerLens's metrics end in .mean(): a 0-dim metric gives the sweeps' values of the per-pair one."""
    _, ours = models
    clean, corrupt = pairs
    for sweep in (activation_patching, attribution_patching):
        per_pair = sweep(ours, clean, corrupt, pair_metric, points)[1]
        at_once = sweep(ours, clean, corrupt, lambda logits: pair_metric(logits).mean(), points)[1]
        torch.testing.assert_close(at_once, per_pair, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("points", ["h.*", "h.*.self_attention.context", "h.1.self_attention.q", "h.*.mlp.act"])
@pytest.mark.parametrize("several", [False, True], ids=["one pair", "3 pairs"])
def test_attribution_patching_equals_the_first_order_estimate_by_hand(models, prompts, pairs, several, points):
    hf, ours = models
    clean, corrupt = pairs if several else prompts
    measure = pair_metric if several else metric
    labels, estimates = attribution_patching(ours, clean, corrupt, measure, points)
    _, each = attribution_patching(ours, clean, corrupt, measure, points, per_pair=True)
    _, clean_hf = run_hf(hf, clean, hf_names(labels))
    logits, corrupt_hf = run_hf(hf, corrupt, hf_names(labels), grad=True)
    measure(logits).sum().backward()
    hf.zero_grad(set_to_none=True)
    for p, (name, estimate) in enumerate(zip(labels, estimates, strict=True)):
        clean_value, _ = hf_view(name, clean_hf)
        corrupt_value, grad = hf_view(name, corrupt_hf)
        by_hand = ((clean_value - corrupt_value) * grad).sum(-1)  # (N, T) or (N, nh, T): per position (and head)
        torch.testing.assert_close(estimate, by_hand.mean(0), rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(each[:, p], by_hand, rtol=1e-4, atol=1e-5, msg=name)  # each pair's own
    assert all(p.grad is None for p in ours.parameters())


def test_attribution_patching_sums_in_float32_in_a_half_precision_model(models, pairs):
    """A bf16 model's activations and gradients, multiplied and summed in float32, not rounded to bf16 on the way."""
    model = copy.deepcopy(models[1]).bfloat16()
    clean, corrupt = pairs
    labels, estimates = attribution_patching(model, clean, corrupt, pair_metric, "h.*")
    assert estimates.dtype == torch.float32
    with torch.no_grad(), record(model, "h.*") as clean_run:
        model(clean)
    with record(model, "h.*", grad=True) as corrupt_run:
        pair_metric(model(corrupt)).sum().backward()
    for p, name in enumerate(labels):
        change = clean_run[name].float() - corrupt_run[name].detach().float()
        by_hand = (change * corrupt_run[name].grad.float()).sum(-1).mean(0)  # (T,)
        torch.testing.assert_close(estimates[p], by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("points", ["h.*", "h.1.self_attention.context"])
def test_patching_a_left_padded_data_set_equals_each_pair_run_alone(models, points):
    """Pairs of 6, 3 and 5 tokens, left-padded with their mask: each pair's values are those of transformers' runs
    of that pair alone, unpadded, patched at the same token; at its padding, its unpatched metric (activation
    patching) and 0 (attribution patching)."""
    hf, ours = models
    lengths = [6, 3, 5]
    clean, mask = left_padded(lengths, V)
    corrupt = torch.where(mask.bool(), torch.randint(4, V, clean.shape), clean)  # the same padding
    N, T = clean.shape
    labels, values = activation_patching(ours, clean, corrupt, pair_metric, points, per_pair=True, attention_mask=mask)
    _, estimates = attribution_patching(ours, clean, corrupt, pair_metric, points, per_pair=True, attention_mask=mask)
    heads = points.endswith(".context")
    assert values.shape == ((N, len(labels), N_HEAD, T) if heads else (N, len(labels), T))
    for i, length in enumerate(lengths):
        pad = T - length
        clean_i, corrupt_i = clean[i : i + 1, pad:], corrupt[i : i + 1, pad:]  # (1, length): the pair alone
        answers = GOOD[i], BAD[i]
        logits, corrupt_hf = run_hf(hf, corrupt_i, hf_names(labels), grad=True)
        unpatched = logits[0, -1, answers[0]] - logits[0, -1, answers[1]]
        unpatched.backward()
        hf.zero_grad(set_to_none=True)
        _, clean_hf = run_hf(hf, clean_i, labels)
        for p, name in enumerate(labels):
            clean_value, _ = hf_view(name, clean_hf)
            corrupt_value, grad = hf_view(name, corrupt_hf)
            by_hand = ((clean_value - corrupt_value) * grad).sum(-1)[0]  # ([nh,] length)
            torch.testing.assert_close(estimates[i, p, ..., pad:], by_hand, rtol=1e-4, atol=1e-5)
            assert (estimates[i, p, ..., :pad] == 0).all()
            for j in range(N_HEAD if heads else 1):
                got = values[i, p, j] if heads else values[i, p]  # (T,)
                torch.testing.assert_close(got[:pad], unpatched.detach().expand(pad), rtol=0, atol=1e-4)
                cols = slice(j * HD, (j + 1) * HD) if heads else slice(None)
                for t in range(length):

                    def put(x, source=clean_hf[name], t=t, cols=cols):
                        x = x.clone()
                        x[:, t, cols] = source[0, t, cols]
                        return x

                    patched, _ = run_hf(hf, corrupt_i, [name], edits={name: put})
                    want = patched[0, -1, answers[0]] - patched[0, -1, answers[1]]
                    torch.testing.assert_close(got[pad + t], want, rtol=0, atol=1e-4)


def test_patching_refuses_padding_without_a_mask_and_a_mask_of_another_shape(models, pairs):
    _, ours = models
    clean, corrupt = pairs
    padded = corrupt.clone()
    padded[1, :2] = ours.config.pad_token_id
    for sweep in (activation_patching, attribution_patching):
        with pytest.raises(ValueError, match=r"corrupt_ids\[1, 0\] is the pad token 3: pass the pairs' attention_m"):
            sweep(ours, clean, padded, pair_metric, "h.*")
        with pytest.raises(ValueError, match=r"attention_mask is \(3, 4\), clean_ids and corrupt_ids \(3, 5\)"):
            sweep(ours, clean, corrupt, pair_metric, "h.*", attention_mask=torch.ones(3, 4))
        with pytest.raises(ValueError, match=r"attention_mask must hold only 0 \(padding\) and 1"):
            sweep(ours, clean, corrupt, pair_metric, "h.*", attention_mask=torch.full((3, 5), 2))
        with pytest.raises(ValueError, match=r"attention_mask is list, clean_ids and corrupt_ids \(3, 5\)"):
            sweep(ours, clean, corrupt, pair_metric, "h.*", attention_mask=[[1] * 5] * 3)
        for row, bad in [(1, [1, 1, 1, 0, 0]), (2, [0, 0, 0, 0, 0]), (0, [0, 1, 0, 1, 1])]:  # right, none, holes
            mask = torch.ones(3, 5, dtype=torch.long)
            mask[row] = torch.tensor(bad)
            with pytest.raises(ValueError, match=rf"attention_mask row {row} is not left padding \(0s, then 1s"):
                sweep(ours, clean, corrupt, pair_metric, "h.*", attention_mask=mask)
    mask = torch.ones_like(padded)
    mask[1, :2] = 0
    activation_patching(ours, clean, padded, pair_metric, "h.*", attention_mask=mask)  # with its mask: taken


def test_patching_refuses_mixed_points_bad_prompts_and_bad_metrics(models, prompts):
    _, ours = models
    clean, corrupt = prompts
    with pytest.raises(ValueError, match=r"h.0.self_attention.context.* are per head .* h.0, h.1 are not"):
        activation_patching(ours, clean, corrupt, metric, ["h.*", "h.0.self_attention.context"])
    with pytest.raises(ValueError, match=r"clean_ids \(1, 6\) and corrupt_ids \(1, 5\)"):
        attribution_patching(ours, clean, corrupt[:, 1:], metric, "h.*")
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        activation_patching(ours, clean, corrupt, metric, "h.*", batch_size=0)
    with pytest.raises(ValueError, match=r"metric gave \(1, 320\) for the logits of 1 pair \(1, T, V\)"):
        activation_patching(ours, clean, corrupt, lambda logits: logits[:, -1], "h.*", batch_size=5)
    with pytest.raises(ValueError, match=r"metric gave \(2, 1\) for the logits of 2 pairs .* \(2,\), or of one"):
        attribution_patching(ours, clean.repeat(2, 1), corrupt.repeat(2, 1), lambda logits: logits[:, -1, :1], "h.*")
    with pytest.raises(ValueError, match=r"per_pair=True needs a metric of one value per pair"):
        two = clean.repeat(2, 1), corrupt.repeat(2, 1)
        activation_patching(ours, *two, lambda logits: metric(logits).mean(), "h.*", per_pair=True)
    one = activation_patching(ours, clean, corrupt, lambda logits: metric(logits).mean(), "h.*", per_pair=True)[1]
    torch.testing.assert_close(one[0], activation_patching(ours, clean, corrupt, metric, "h.*")[1])  # 1 pair: its own
    with pytest.raises(ValueError, match=r"metric gave float for the logits of 1 pair"):
        activation_patching(ours, clean, corrupt, lambda logits: float(metric(logits)), "h.*")
    with pytest.raises(ValueError, match=r"clean_ids \(0, 6\) .* must both be N prompts"):
        activation_patching(ours, clean[:0], corrupt[:0], metric, "h.*")
    outside = corrupt.clone()
    outside[0, 2] = V
    for sweep in (activation_patching, attribution_patching):
        with pytest.raises(ValueError, match=r"corrupt_ids\[0, 2\] = 320 is not a token id"):
            sweep(ours, clean, outside, metric, "h.*")
    for sweep in (activation_patching, attribution_patching):
        with pytest.raises(ValueError, match="no points named"):
            sweep(ours, clean, corrupt, metric, [])
    with pytest.raises(ValueError, match=r"attribution_patching needs autograd: .*inference_mode"):
        with torch.inference_mode():
            attribution_patching(ours, clean, corrupt, metric, "h.*")


def test_head_weights_reproduce_q_k_v_and_the_circuits(models):
    hf, ours = models
    ids, mask = left_padded([7, 4], vocab_size=V)
    names = [f"h.{i}.{p}" for i in range(N_LAYER) for p in ("ln1", "qkv", "self_attention.probs")]
    _, kept = run_hf(hf, ids, names + ["h.1.self_attention.context"], mask)
    for i in range(N_LAYER):
        w = head_weights(ours, i)
        assert {k: tuple(v.shape) for k, v in w.items()} == {
            "W_Q": (N_HEAD, C, HD), "W_K": (N_HEAD, C, HD), "W_V": (N_HEAD, C, HD),
            "b_Q": (N_HEAD, HD), "b_K": (N_HEAD, HD), "b_V": (N_HEAD, HD), "W_O": (N_HEAD, HD, C), "b_O": (C,),
        }  # fmt: skip
        qkv = ours.h[i].self_attention.query_key_value
        assert all(
            w[k].untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr() for k in "W_Q W_K W_V".split()
        )
        x = kept[f"h.{i}.ln1"]  # (B, T, C)
        for which in "QKV":
            by_weights = torch.einsum("btc,hcd->bhtd", x, w[f"W_{which}"]) + w[f"b_{which}"][None, :, None]
            torch.testing.assert_close(by_weights, qkv_of(kept[f"h.{i}.qkv"], which.lower()), rtol=0, atol=1e-5)
    i, w = 1, head_weights(ours, 1)
    x, probs = kept["h.1.ln1"], kept["h.1.self_attention.probs"]
    q, k = qkv_of(kept["h.1.qkv"], "q"), qkv_of(kept["h.1.qkv"], "k")
    for h in (0, 5):
        qk = x @ qk_circuit(w, h) @ x.transpose(1, 2) + (x @ w["W_Q"][h] @ w["b_K"][h])[:, :, None]
        qk = qk + (x @ w["W_K"][h] @ w["b_Q"][h])[:, None, :] + w["b_Q"][h] @ w["b_K"][h]
        torch.testing.assert_close(qk, q[:, h] @ k[:, h].transpose(1, 2), rtol=0, atol=1e-4)
        written = probs[:, h] @ (x @ ov_circuit(w, h) + w["b_V"][h] @ w["W_O"][h])  # (B, T, C)
        sl = slice(h * HD, (h + 1) * HD)
        dense = hf.transformer.h[1].self_attention.dense.weight
        torch.testing.assert_close(
            written, kept["h.1.self_attention.context"][..., sl] @ dense[:, sl].T, rtol=0, atol=1e-5
        )
    for circuit in (qk_circuit, ov_circuit):
        for head in (N_HEAD, -1):  # -1 would index the last head
            with pytest.raises(
                ValueError, match=rf"{circuit.__name__}: head {head} does not exist; .* 0..{N_HEAD - 1}"
            ):
                circuit(w, head)
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        head_weights(ours, N_LAYER)


@pytest.mark.parametrize("point", ["h.1", "h.0.mlp", "h.2.self_attention.context"])
def test_a_patch_steers_every_step_of_generate_as_a_hook_steers_transformers(models, point):
    """Activation steering: a vector added to a point's output in the prefill and every decode step gives the tokens
    transformers' generate gives with a forward hook adding it at the same place."""
    hf, ours = models
    ids, mask = left_padded([6, 4], vocab_size=V)
    direction = 3 * torch.randn(C, generator=torch.Generator().manual_seed(2))
    if point.endswith(".context"):  # ours (B, nh, T, hd); transformers' dense input (B, T, nh·hd)

        def steer_ours(x):
            return x + heads_of(direction.expand(x.shape[0], x.shape[2], C))
    else:

        def steer_ours(x):
            return x + direction

    with patch(ours, {point: steer_ours}):
        steered = generate(ours, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    plain = generate(ours, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert not torch.equal(steered, plain)  # the direction changes the tokens
    path, reads_input = hf_place(point)
    module = dict(hf.transformer.named_modules())[path]
    if reads_input:
        handle = module.register_forward_pre_hook(lambda m, args: (args[0] + direction, *args[1:]))
    else:
        handle = module.register_forward_hook(
            lambda m, args, out: (out[0] + direction, *out[1:]) if isinstance(out, tuple) else out + direction
        )
    try:
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=3)  # fmt: skip
    finally:
        handle.remove()
    assert torch.equal(steered, theirs)


def test_recording_across_generate_concatenates_to_a_full_forward(models):
    hf, ours = models
    ids, mask = left_padded([6, 4], vocab_size=V)
    names = ["h.*", "h.*.resid_mid", "h.*.self_attention.q", "h.*.self_attention.context", "h.*.mlp"]
    with record(ours, *names, "h.1.self_attention.probs", every_call=True) as steps:
        out = generate(ours, ids, attention_mask=mask, max_new_tokens=5)
    assert all(len(calls) == 5 for calls in steps.values())  # the prefill and 4 decode steps (the 5th token is not fed)
    full_ids, full_mask = out[:, :-1], torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
    _, kept = run_hf(hf, full_ids, hf_names(steps), full_mask)
    T = full_ids.shape[1]
    for name, calls in steps.items():
        if name.endswith(".probs"):  # a prefill's keys are its own T tokens, a decode step's the whole cache
            S = calls[-1].shape[-1]
            calls = [torch.nn.functional.pad(calls[0], (0, S - calls[0].shape[-1])), *calls[1:]]
        recorded = torch.cat(calls, dim=2 if ".self_attention." in name else 1)  # along T
        recorded = recorded[..., :T] if name.endswith(".probs") else recorded
        value, _ = hf_view(name, kept)
        # decode steps go through bloom.matvec's kernels: float32 sums in another order than transformers'
        actual, expected = at_real(recorded, full_mask), at_real(value, full_mask)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_int8_residual_components_and_attribution_are_those_of_the_dequantized_weights(tmp_path):
    """With quantize="int8" the decomposition reads each head's slice of q · scale, the weight the int8 layer
    multiplies by: equal to the float model given those dequantized weights."""
    from bloom.scale.quantize import Int8Embedding, Int8Linear

    torch.manual_seed(0)
    folder = save_transformers(random_hf_bloom(vocab_size=V, hidden_size=C, n_head=N_HEAD, n_layer=N_LAYER), tmp_path)
    int8 = load_pretrained(folder, dtype="fp32", quantize="int8")
    twin = load_pretrained(folder, dtype="fp32")
    with torch.no_grad():
        for name, module in int8.named_modules():
            if isinstance(module, Int8Linear | Int8Embedding):
                twin.get_submodule(name).weight.copy_(module.weight.float() * module.scale[:, None])
    ids, mask = left_padded([7, 5], vocab_size=V)
    tokens = torch.randint(4, V, ids.shape)
    labels, parts = residual_components(int8, ids, mask)
    twin_labels, twin_parts = residual_components(twin, ids, mask)
    assert labels == twin_labels
    torch.testing.assert_close(parts, twin_parts, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), record(int8, f"h.{N_LAYER - 1}") as seen:
        int8(ids, mask)
    torch.testing.assert_close(parts.sum(0), seen[f"h.{N_LAYER - 1}"], rtol=1e-5, atol=1e-5)
    _, attrib = direct_logit_attribution(int8, ids, tokens, mask)
    torch.testing.assert_close(attrib, direct_logit_attribution(twin, ids, tokens, mask)[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logits = int8(ids, mask).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(attrib.sum(0), logits, rtol=0, atol=1e-4)


def test_research_tools_refuse_int8_weights_by_name(tmp_path):
    """int8 layers hold no float matrices to view and have no backward: each tool says so instead of returning
    the raw int8 values or failing inside autograd."""
    from bloom.scale.quantize import quantize_int8

    model = quantize_int8(Bloom(BloomConfig(vocab_size=64, hidden_size=64, n_layer=1, n_head=2)).to(torch.bfloat16))
    ids = torch.randint(0, 64, (1, 5))
    message = r"needs float weights, and this model's are int8"
    with pytest.raises(ValueError, match="head_weights " + message):
        head_weights(model, 0)
    with pytest.raises(ValueError, match="attribution_patching " + message):
        attribution_patching(model, ids, ids, lambda logits: logits[:, -1, 0], "h.*")
    with pytest.raises(ValueError, match=message), record(model, "h.0", grad=True):
        pass


def targets_by_hand(pattern, ids, mask):
    """The pattern's targets (B, T, S), one key at a time, from the definitions in head_scores' docstring."""
    B, T = ids.shape
    target = torch.zeros(B, T, T)
    for b in range(B):
        for t in range(T):
            for s in range(T):
                if pattern == "previous_token":
                    hit = s == t - 1
                elif pattern == "duplicate_token":
                    hit = s < t and ids[b, s] == ids[b, t]
                else:  # the key before s must be a real token too
                    hit = 1 <= s < t and ids[b, s - 1] == ids[b, t] and mask[b, s - 1] == 1
                target[b, t, s] = float(hit and mask[b, s] == 1)
    return target


@pytest.mark.parametrize("pattern", ["previous_token", "duplicate_token", "induction", "own"])
def test_head_scores_equal_transformers_attention_on_the_targets(models, pattern):
    """Each head's score: transformers' attention probabilities on the pattern's targets (built key by key),
    averaged over the unpadded queries that have one, on a left-padded batch of random sequences repeated twice."""
    hf, ours = models
    ids, mask = left_padded([10, 8, 6])
    ids = torch.cat([ids, ids], dim=1)  # each row's tokens twice, the padding in the middle masked too
    mask = torch.cat([mask, mask], dim=1)
    ids[0, -1] = ids[0, -2]  # a token repeated at once: a query that is its own key's successor is no target
    ids[2, [5, 15]] = 3  # a real token that is the padding's id, in both copies: padding is never a copy of it
    generator = torch.Generator().manual_seed(1)
    own = (torch.rand(3, 20, 20, generator=generator) * (torch.rand(3, 20, 20, generator=generator) < 0.3)).tril()
    scores = head_scores(ours, ids, own if pattern == "own" else pattern, mask)
    assert scores.shape == (N_LAYER, N_HEAD)
    target = own * mask[:, None, :] if pattern == "own" else targets_by_hand(pattern, ids, mask)  # own: weights
    scored = (target.sum(-1) > 0) & (mask == 1)  # (B, T)
    with torch.no_grad():
        attentions = hf(input_ids=ids, attention_mask=mask, output_attentions=True).attentions  # (B, nh, T, S) each
    for layer, probs in enumerate(attentions):
        on_target = (probs * target[:, None]).sum(-1)  # (B, nh, T)
        expected = on_target.permute(1, 0, 2)[:, scored].mean(-1)  # (nh,)
        torch.testing.assert_close(scores[layer], expected, rtol=0, atol=1e-5)


def test_head_scores_find_a_head_built_to_do_the_job():
    """A model whose every head attends to the previous token scores 1 on previous_token there and far less on
    duplicate_token; bad arguments are refused by name."""
    config = BloomConfig(vocab_size=V, hidden_size=C, n_head=N_HEAD, n_layer=1)
    model = Bloom(config).eval()
    first = torch.randint(4, V, (2, 5), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([first, first[:, :4]], dim=1)  # (2, 9): its last 4 tokens repeat its first 4
    to_previous = torch.full((9, 9), -1e4).diagonal_scatter(torch.zeros(8), -1)  # only key t - 1 (row 0: its own)
    to_previous[0, 0] = 0
    with patch(model, {"h.0.self_attention.scores": lambda scores: scores * 0 + to_previous}):
        previous = head_scores(model, ids, "previous_token")
        duplicate = head_scores(model, ids, "duplicate_token")  # its earlier copy is 5 keys back, never t - 1
    torch.testing.assert_close(previous, torch.ones(1, N_HEAD))
    assert (duplicate < 0.5).all()
    with pytest.raises(ValueError, match=r"pattern 'induct' is not one of previous_token, duplicate_token, induction"):
        head_scores(model, ids, "induct")
    with pytest.raises(ValueError, match=r"pattern is \(2, 9, 8\): it must be \(B, T, T\) = \(2, 9, 9\) or \(T, T\)"):
        head_scores(model, ids, torch.ones(2, 9, 8))
    with pytest.raises(ValueError, match=r"pattern marks keys after their query \(s > t\)"):
        head_scores(model, ids, torch.ones(9, 9))
    one_for_all = torch.ones(9, 9).tril(-1).triu(-1)  # (T, T): the previous token, for every row
    torch.testing.assert_close(head_scores(model, ids, one_for_all), head_scores(model, ids, "previous_token"))
    with pytest.raises(ValueError, match=r"no query of input_ids has a target of the induction pattern: give token"):
        head_scores(model, torch.arange(4, 13)[None], "induction")
    with pytest.raises(ValueError, match=r"of the previous_token pattern: it needs two real tokens in a row"):
        head_scores(model, ids[:, :1], "previous_token")
    with pytest.raises(ValueError, match=r"of the given pattern: it marks no key of a real query"):
        head_scores(model, ids, torch.zeros(9, 9))
    with pytest.raises(ValueError, match=r"attention_mask is \(2, 8\), input_ids \(2, 9\)"):
        head_scores(model, ids, "induction", torch.ones(2, 8))

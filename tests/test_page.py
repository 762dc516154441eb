"""`bloom inspect`'s HTML page in a real browser: headless Chromium loads it, runs it without a script error,
draws something, and shows on hover the probability `record` gives and the bias transformers' ALiBi gives."""

import io
import re

import numpy as np
import pytest
import torch
from browser import Browser, find_chromium, in_ci
from PIL import Image, ImageStat
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from bloom import Bloom, BloomConfig
from bloom.research import page
from bloom.research.lens import logit_lens
from bloom.research.probe import record

N_LAYER, N_HEAD, T = 3, 8, 14


@pytest.fixture(scope="module")
def chromium():
    executable = find_chromium()
    if executable is None:
        if in_ci():
            pytest.fail("CI=true but no chromium: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium); CI fails instead of skipping")
    return executable


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    browser = Browser(chromium, tmp_path_factory.mktemp("profile"))
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    """A page written from a random model's forward pass, with the tensors it was written from."""
    model = Bloom(BloomConfig(hidden_size=32, n_layer=N_LAYER, n_head=N_HEAD, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (1, T))
    with torch.inference_mode(), record(model, "h.*.self_attention.probs") as seen:
        model(ids)
    attention = torch.stack([seen[f"h.{i}.self_attention.probs"][0] for i in range(N_LAYER)])  # (L, nh, T, T)
    probs, top_ids = logit_lens(model, ids, k=3)
    labels = [f"t{i}" for i in range(T - 2)] + ["</script>", "<b>é"]  # markup in a token must stay text
    top = [[[f"id{i}" for i in guesses] for guesses in row] for row in top_ids[:, 0].tolist()]
    path = tmp_path_factory.mktemp("page") / "inspect.html"
    page.write(path, "a <prompt>", labels, attention, probs[:, 0], top)
    return path, attention, probs[:, 0], top


def tooltip_after_hovering(browser: Browser, view: str, layer: int, head: int, row: int, column: int) -> str:
    browser.evaluate(f"bloomPage.show({view!r}, {layer}, {head})")
    centre = browser.evaluate(f"bloomPage.cellCentre({row}, {column})")
    browser.hover(centre["x"], centre["y"])
    return browser.evaluate("document.getElementById('tip').textContent")


def test_page_runs_without_script_errors_and_draws_each_view(browser, inspected):
    path, *_ = inspected
    browser.open(path)
    assert browser.errors == []
    assert browser.evaluate("document.getElementById('prompt').textContent") == "a <prompt>"
    assert browser.evaluate("bloomPage.data.tokens.slice(-2)") == ["</script>", "<b>é"]
    for view in ("attention", "alibi", "lens"):
        browser.evaluate(f"bloomPage.show({view!r}, 1, 2)")
        screenshot = Image.open(io.BytesIO(browser.screenshot())).convert("L")
        assert screenshot.size == (1200, 900)
        assert ImageStat.Stat(screenshot).stddev[0] > 20, f"the {view} view looks blank"
    assert browser.errors == []


def test_hovering_shows_the_recorded_probability_and_transformers_alibi_bias(browser, inspected):
    path, attention, lens_probs, lens_top = inspected
    browser.open(path)
    for layer, head, query, key in [(0, 0, 0, 0), (1, 5, 9, 3), (2, 7, T - 1, T - 2), (2, 3, T - 1, 0)]:
        text = tooltip_after_hovering(browser, "attention", layer, head, query, key)
        assert f"query {query} " in text and f"key   {key} " in text
        shown = float(re.search(r"p = (\S+)", text).group(1))
        assert np.float32(shown) == attention[layer, head, query, key].item()  # 9 digits: the float32 exactly

    slopes = build_alibi_tensor(torch.ones(1, 2), N_HEAD, torch.float32)[:, 0, 1]  # slope x key position 1
    for head, query, key in [(0, 5, 2), (7, T - 1, 0), (3, 4, 4)]:
        text = tooltip_after_hovering(browser, "alibi", 0, head, query, key)
        shown = float(re.search(r"bias = (\S+)", text).group(1))
        assert shown == pytest.approx(-slopes[head].item() * (query - key), rel=1e-7, abs=1e-12)
    assert "masked" in tooltip_after_hovering(browser, "alibi", 0, 2, 3, 5)

    for layer, position in [(0, 0), (N_LAYER, 6)]:  # rows are drawn top-down: the last block first
        text = tooltip_after_hovering(browser, "lens", 0, 0, N_LAYER - layer, position)
        lines = text.splitlines()
        assert lines[0].startswith(("embed" if layer == 0 else f"h.{layer - 1}") + f", position {position} ")
        for j, line in enumerate(lines[1:]):
            probability, token = line.split()
            assert float(probability) == pytest.approx(lens_probs[layer, position, j].item(), rel=1e-5)
            assert token == lens_top[layer][position][j]
    assert browser.errors == []


def test_the_buttons_and_menus_switch_what_is_shown(browser, inspected):
    path, *_ = inspected
    browser.open(path)
    caption = "document.getElementById('caption').textContent"
    assert browser.evaluate(caption).startswith("Layer 0, head 0 (both counted from 0)")
    browser.evaluate("const h = document.getElementById('head'); h.value = '6'; h.dispatchEvent(new Event('change'))")
    browser.evaluate("const l = document.getElementById('layer'); l.value = '2'; l.dispatchEvent(new Event('change'))")
    assert browser.evaluate(caption).startswith("Layer 2, head 6 ")
    browser.click("button[data-view=alibi]")
    assert browser.evaluate(caption).startswith("ALiBi bias of head 6 ")
    browser.click("button[data-view=lens]")
    assert browser.evaluate(caption).startswith("Logit lens")
    assert browser.evaluate("document.getElementById('layer').disabled")
    browser.click("button[data-view=attention]")
    assert browser.evaluate(caption).startswith("Layer 2, head 6 ")
    assert browser.errors == []


@pytest.mark.parametrize(
    "broken, message",
    [("noSuchFunction();", "noSuchFunction is not defined"), ("show(", "SyntaxError"), ("console.error('x');", "x")],
)
def test_a_script_error_in_the_page_is_caught(browser, inspected, tmp_path, broken, message):
    """The checks above can fail: the same page with one broken statement reports it."""
    path, *_ = inspected
    start = 'show("attention", 0, 0);'
    (tmp_path / "broken.html").write_text(path.read_text(encoding="utf-8").replace(start, start + broken))
    browser.open(tmp_path / "broken.html")
    assert any(message in error for error in browser.errors), browser.errors


def test_placeholders_in_the_prompt_and_tokens_stay_text(tmp_path):
    """The template is filled once per placeholder: a prompt or token spelling __DATA__ or __TITLE__ is text."""
    import json
    import re

    from bloom.research import page

    tokens = ["__TITLE__", "__DATA__"]
    attention = torch.softmax(torch.randn(1, 2, 2, 2), dim=-1)  # (n_layer, nh, T, T)
    path = page.write(tmp_path / "p.html", "x __DATA__ y __TITLE__", tokens, attention, torch.rand(2, 2, 1),
                      [[["a"], ["b"]], [["c"], ["d"]]])  # fmt: skip
    text = path.read_text(encoding="utf-8")
    assert re.search(r"<title>bloom inspect: x __DATA__ y __TITLE__</title>", text)
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1)
    assert json.loads(data)["tokens"] == tokens

"""`bloom.research.evaluation.BloomLM` and `bloom evaluate` against the harness's own transformers adapter (HFLM).

The harness's hub datasets cannot be fetched here, so four tasks are written at test time from local JSON
files (`dataset_path: json`): a multiple-choice task (loglikelihood), a rolling-perplexity task
(loglikelihood_rolling) and two generation tasks (generate_until): one that says `do_sample: false`, and one
that gives only its stop string and length, as coqa and babi do. Both adapters run them on the same tiny
checkpoint folder in fp32 with a 32-token context, so that long texts are scored in several windows and long
prompts are cut. HFLM batches 2 requests, right-padded; BloomLM batches 3, left-padded.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

try:  # the `eval` extra; the `test` extra installs it, so CI fails rather than skips without it
    import lm_eval
except ImportError as error:
    if os.environ.get("CI") == "true":
        raise ImportError("CI=true but lm-evaluation-harness does not import: pip install -e '.[test]'") from error
    pytest.skip(f"lm-evaluation-harness does not import ({error}); CI fails instead", allow_module_level=True)
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from bloom import load_pretrained, load_tokenizer  # noqa: E402
from bloom.research.evaluation import BloomLM  # noqa: E402
from bloom.research.probe import patch, zero_head  # noqa: E402

MAX_LENGTH = 32
TASKS = ["tiny_mc", "tiny_rolling", "tiny_gen", "tiny_gen_plain"]
QUESTIONS = [
    ("The quick brown fox jumps over the", ["lazy dog.", "quick cat.", "moon"]),
    ("Le renard brun rapide saute", ["par-dessus le chien.", "dans le café.", "à l'école"]),
    ("def add(a, b):", ["return a + b", "pass", "print(a)"]),
    ("Hello, world! How are", ["you today?", "fine, thank", "the dog"]),
    ("El niño comió una", ["manzana", "bibliothèque", "renard brun"]),
]
TEXTS = [
    "BLOOM is a multilingual language model trained on 46 natural languages and 13 programming languages.",
    "Où est la bibliothèque ? Je voudrais un café crème, s'il vous plaît. Les élèves étudient à l'école.",
    "Hello, world!",
    "def add(a, b):\n    return a + b\n" * 8,
]
PROMPTS = [
    "The quick brown fox",
    "Les élèves étudient à l'école française depuis des années, et le renard brun rapide saute par-dessus",
    "我爱自然语言处理。",
    "Hello, world! How are you today?",
]
GEN_TOKENS = 12


def hf_greedy_text(hf_model, tokenizer, prompt: str, n: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


@pytest.fixture(scope="module")
def task_folder(tiny_model_folder, tmp_path_factory):
    """The four task YAMLs and their JSON data.

    Some choices and the stop string come from transformers' own greedy continuations, so that some
    continuations are the greedy ones (is_greedy is True somewhere) and generation stops at a stop string
    in the middle of what it would otherwise generate. A random model's greedy token is often a piece of a
    character, so only the questions whose greedy token decodes to text that encodes back to it get one.
    """
    from transformers import BloomForCausalLM

    folder = tmp_path_factory.mktemp("tasks")
    hf = BloomForCausalLM.from_pretrained(tiny_model_folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(tiny_model_folder)
    mc = []
    for question, choices in QUESTIONS:
        ids = tokenizer.encode(question)
        with torch.no_grad():
            greedy = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
        text = tokenizer.decode([greedy])
        if tokenizer.encode(question + text) == ids + [greedy]:  # the text is read back as the greedy token
            choices = [text, text + " the", *choices]  # greedy, then (most likely) not greedy
        mc.append({"question": question, "choices": choices, "label": 0})
    assert any(len(doc["choices"]) > 3 for doc in mc), "no greedy continuation to offer as a choice"
    text = hf_greedy_text(hf, tokenizer, PROMPTS[0], GEN_TOKENS)
    k = next(k for k in range(2, len(text)) if text[k] not in text[:k] and text[k].strip())
    stop = text[k]  # the first prompt's generation stops after k characters

    data = {
        "mc": mc,
        "rolling": [{"text": t} for t in TEXTS],
        "gen": [{"prompt": p, "answer": text[:k] if i == 0 else "?"} for i, p in enumerate(PROMPTS)],
    }
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {file}\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(file=folder / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "tiny_rolling.yaml").write_text(
        "task: tiny_rolling\n" + common.format(file=folder / "rolling.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common.format(file=folder / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: [{json.dumps(stop)}]\n  max_gen_toks: {GEN_TOKENS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "tiny_gen_plain.yaml").write_text(  # no do_sample, no temperature
        "task: tiny_gen_plain\n" + common.format(file=folder / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: [{json.dumps(stop)}]\n  max_gen_toks: {GEN_TOKENS}\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.fixture(scope="module")
def task_manager(task_folder):
    return TaskManager(include_path=str(task_folder), include_defaults=False)


def evaluate(lm, task_manager, tasks=TASKS, **kwargs):
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=task_manager, bootstrap_iters=0, log_samples=True, **kwargs
    )


@pytest.fixture(scope="module")
def reference(tiny_model_folder, task_manager):
    """The harness's transformers adapter on the tiny checkpoint."""
    hf = HFLM(pretrained=str(tiny_model_folder), dtype="float32", device="cpu", batch_size=2, max_length=MAX_LENGTH)
    return evaluate(hf, task_manager)


@pytest.fixture(scope="module")
def ours(tiny_model_folder, task_manager):
    return evaluate(BloomLM(tiny_model_folder, dtype="fp32", batch_size=3, max_length=MAX_LENGTH), task_manager)


def responses(results, task: str) -> list:
    """Each document's responses, one per request, in document order."""
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_equals_the_harness_adapter(reference, ours):
    theirs, mine = responses(reference, "tiny_mc"), responses(ours, "tiny_mc")
    assert len(mine) == len(QUESTIONS) and [len(doc) for doc in mine] == [len(doc) for doc in theirs]
    for doc_theirs, doc_mine in zip(theirs, mine, strict=True):
        for [(logprob_theirs, greedy_theirs)], [(logprob_mine, greedy_mine)] in zip(doc_theirs, doc_mine, strict=True):
            assert logprob_mine == pytest.approx(logprob_theirs, abs=1e-4)
            assert greedy_mine == greedy_theirs
    assert any(greedy for doc in theirs for [(_, greedy)] in doc)  # the greedy choices are recognised
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == reference["results"]["tiny_mc"][metric]


def test_few_shot_multiple_choice_equals_the_harness_adapter(tiny_model_folder, task_manager):
    """--num-fewshot 2: the harness puts two other documents before each question; both adapters score that."""
    hf = HFLM(pretrained=str(tiny_model_folder), dtype="float32", device="cpu", batch_size=2, max_length=MAX_LENGTH)
    theirs = evaluate(hf, task_manager, tasks=["tiny_mc"], num_fewshot=2, random_seed=0, fewshot_random_seed=0)
    mine = evaluate(BloomLM(tiny_model_folder, dtype="fp32", batch_size=3, max_length=MAX_LENGTH), task_manager,
                    tasks=["tiny_mc"], num_fewshot=2, random_seed=0, fewshot_random_seed=0)  # fmt: skip
    prompts = [s["arguments"][0][0] for s in sorted(mine["samples"]["tiny_mc"], key=lambda s: s["doc_id"])]
    questions = [q for q, _ in QUESTIONS]
    assert all(p.count("\n\n") == 2 and p.endswith(q) for p, q in zip(prompts, questions, strict=True))  # 2 shots
    for doc_theirs, doc_mine in zip(responses(theirs, "tiny_mc"), responses(mine, "tiny_mc"), strict=True):
        for [(logprob_theirs, greedy_theirs)], [(logprob_mine, greedy_mine)] in zip(doc_theirs, doc_mine, strict=True):
            assert logprob_mine == pytest.approx(logprob_theirs, abs=1e-4) and greedy_mine == greedy_theirs


def test_rolling_perplexity_equals_the_harness_adapter(reference, ours, tiny_model_folder):
    tokenizer = load_tokenizer(tiny_model_folder)
    assert max(len(tokenizer.encode(text)) for text in TEXTS) > 2 * MAX_LENGTH  # several windows
    theirs, mine = responses(reference, "tiny_rolling"), responses(ours, "tiny_rolling")
    assert len(mine) == len(TEXTS)
    for [logprob_theirs], [logprob_mine] in zip(theirs, mine, strict=True):
        assert logprob_mine == pytest.approx(logprob_theirs, abs=1e-4)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["tiny_rolling"][metric] == pytest.approx(
            reference["results"]["tiny_rolling"][metric], rel=1e-5
        )


@pytest.mark.parametrize("task", ["tiny_gen", "tiny_gen_plain"])
def test_greedy_generations_equal_the_harness_adapter(reference, ours, task):
    theirs, mine = responses(reference, task), responses(ours, task)
    assert mine == theirs
    assert theirs[0][0] and reference["results"][task]["exact_match,none"] > 0  # stopped at the stop string
    assert ours["results"][task]["exact_match,none"] == reference["results"][task]["exact_match,none"]


def test_a_hooked_model_in_memory_scores_differently(tiny_model_folder, task_manager, reference):
    model, tokenizer = load_pretrained(tiny_model_folder, dtype="fp32"), load_tokenizer(tiny_model_folder)
    lm = BloomLM(model, tokenizer=tokenizer, batch_size=4, max_length=MAX_LENGTH)
    with patch(model, {"h.0.self_attention.context": zero_head(0)}):
        ablated = evaluate(lm, task_manager, tasks=["tiny_mc"])
    plain = evaluate(lm, task_manager, tasks=["tiny_mc"])  # the hooks are gone: the harness adapter's numbers
    ablated_logprobs = [r[0][0] for doc in responses(ablated, "tiny_mc") for r in doc]
    plain_logprobs = [r[0][0] for doc in responses(plain, "tiny_mc") for r in doc]
    reference_logprobs = [r[0][0] for doc in responses(reference, "tiny_mc") for r in doc]
    assert plain_logprobs == pytest.approx(reference_logprobs, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(ablated_logprobs, plain_logprobs, strict=True)) > 0.1


def test_bad_arguments(tiny_model_folder):
    model = load_pretrained(tiny_model_folder)
    with pytest.raises(ValueError, match="tokenizer"):
        BloomLM(model)
    with pytest.raises(ValueError, match="dtype"):
        BloomLM(model, tokenizer=tiny_model_folder, dtype="bf16")
    with pytest.raises(ValueError, match="batch_size"):
        BloomLM(model, tokenizer=tiny_model_folder, batch_size=0)


def test_import_bloom_does_not_import_the_harness():
    code = "import sys, bloom, bloom.command_line.cli; sys.exit('lm_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_evaluate_command(tiny_model_folder, task_folder, reference, local_tasks_only, tmp_path, capsys):
    """`bloom evaluate` in-process on two local tasks, --limit 3: the table, the JSON file, the harness's
    accuracy over the same three documents."""
    from bloom.command_line.cli import main

    output = tmp_path / "results.json"
    argv = ["evaluate", "--model", str(tiny_model_folder), "--tasks", "tiny_mc,tiny_gen", "--limit", "3",
            "--batch-size", "2", "--include-path", str(task_folder), "--output", str(output),
            "--dtype", "fp32"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "acc" in printed and "tiny_gen" in printed and "exact_match" in printed
    results = json.loads(output.read_text())["results"]
    first_three = sorted(reference["samples"]["tiny_mc"], key=lambda s: s["doc_id"])[:3]
    assert results["tiny_mc"]["acc,none"] == pytest.approx(sum(s["acc"] for s in first_three) / 3)


@pytest.fixture
def local_tasks_only(monkeypatch):
    """Indexing the harness's thousands of built-in tasks takes ~15 s; the tasks here are all in --include-path."""
    import lm_eval.tasks

    def task_manager(include_path):
        return TaskManager(include_path=include_path, include_defaults=False)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", task_manager)


def test_evaluate_command_help_and_bad_tasks(task_folder, local_tasks_only, capsys, tmp_path):
    from bloom.command_line.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    for flag in ("--tasks", "--num-fewshot", "--limit", "--batch-size", "--include-path", "--output", "--quantize"):
        assert flag in printed
    # The task names are checked before the model is loaded: this folder does not exist.
    argv = ["evaluate", "--model", str(tmp_path / "nowhere"), "--tasks", "tiny_mc,tiny_nope"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--include-path", str(task_folder)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"bloom evaluate: error: --tasks: tiny_nope: not a task of the harness nor in --include-path {task_folder} "
        "(lm-eval ls tasks)\n"
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--output", "{tmp}/no/such/results.json"], "--output {tmp}/no/such/results.json: no folder {tmp}/no/such"),
        (["--output", "{tmp}"], "--output {tmp}: a folder, not a file"),
        (["--include-path", "{tmp}/nowhere"], "--include-path {tmp}/nowhere: no such folder"),
        (["--limit", "1.5"], "--limit must be a whole number of documents or a fraction below 1, got 1.5"),
        (["--limit", "inf"], "--limit must be a whole number of documents or a fraction below 1, got inf"),
        (["--limit", "nan"], "--limit must be a whole number of documents or a fraction below 1, got nan"),
        (["--limit", "1e30"], "--limit must be a whole number of documents or a fraction below 1, got 1e+30"),
    ],
)
def test_evaluate_command_checks_its_files_before_the_run(local_tasks_only, capsys, tmp_path, extra, message):
    from bloom.command_line.cli import main

    extra = [arg.format(tmp=tmp_path) for arg in extra]
    argv = ["evaluate", "--model", str(tmp_path / "nowhere"), "--tasks", "tiny_mc", *extra]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(f"bloom evaluate: error: {message.format(tmp=tmp_path)}\n")


def test_more_shots_than_a_task_has_documents_names_the_flag(tiny_model_folder, task_folder, local_tasks_only, capsys):
    from bloom.command_line.cli import main

    argv = ["evaluate", "--model", str(tiny_model_folder), "--tasks", "tiny_mc", "--num-fewshot", "100",
            "--include-path", str(task_folder)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "bloom evaluate: error: --num-fewshot 100: a task has fewer documents to draw the examples from" in err


def test_evaluate_command_with_int8_weights(tiny_model_folder, task_folder, local_tasks_only, capsys, monkeypatch):
    """The harness is handed the int8 model: its embedding and linear layers in int8."""
    import bloom.research.evaluation
    from bloom.command_line.cli import main
    from bloom.scale.quantize import Int8Embedding, Int8Linear

    handed = []

    class Spy(BloomLM):
        def __init__(self, model, **kwargs):
            handed.append(model)
            super().__init__(model, **kwargs)

    monkeypatch.setattr(bloom.research.evaluation, "BloomLM", Spy)
    argv = ["evaluate", "--model", str(tiny_model_folder), "--tasks", "tiny_mc", "--limit", "2",
            "--include-path", str(task_folder), "--quantize", "int8"]  # fmt: skip
    assert main(argv) == 0
    assert "tiny_mc" in capsys.readouterr().out
    (model,) = handed
    assert isinstance(model.word_embeddings, Int8Embedding) and isinstance(model.h[0].mlp.dense_h_to_4h, Int8Linear)


def test_evaluate_command_without_the_harness(tiny_model_folder, capsys, monkeypatch):
    from bloom.command_line.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    monkeypatch.delitem(sys.modules, "bloom.research.evaluation")
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", str(tiny_model_folder), "--tasks", "tiny_mc"])
    assert exit_.value.code == 2
    assert "pip install -e '.[eval]'" in capsys.readouterr().err

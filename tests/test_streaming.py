"""Streaming text: pieces are final, join up to the decoded text, and never split a character."""

import subprocess
import sys

import pytest
import torch

from bloom import generate, load_pretrained, load_tokenizer, stream
from bloom.generation.streaming import INCOMPLETE, TextStream


@pytest.fixture(scope="module")
def tokenizer(tiny_model_folder):
    return load_tokenizer(tiny_model_folder)


def test_text_stream_holds_back_split_characters(tokenizer):
    text = "Un 🦄 et un café, 我们 ok"
    ids = tokenizer.encode(text)
    assert any(INCOMPLETE in tokenizer.decode([i]) for i in ids)  # some token ends inside a character
    pieces = []
    stream_ = TextStream(tokenizer)
    for token_id in ids:
        pieces.append(stream_.push(token_id))
    pieces.append(stream_.flush())
    assert "" in pieces[:-1]  # something was held back
    assert all(INCOMPLETE not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_flush_gives_out_an_unfinished_character(tokenizer):
    stream_ = TextStream(tokenizer)
    first_byte = tokenizer.encode("🦄")[0]
    assert stream_.push(first_byte) == ""
    assert stream_.flush() == INCOMPLETE


def test_stream_yields_exactly_the_generated_text(tiny_model_folder, tokenizer):
    model = load_pretrained(tiny_model_folder)
    prompt = "Le café 🙂"
    pieces = list(stream(model, tokenizer, prompt, max_new_tokens=30, do_sample=True, seed=3))
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = generate(model, ids, max_new_tokens=30, do_sample=True, seed=3, eos_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1] :].tolist()
    assert len(pieces) > 1
    assert "".join(pieces) == tokenizer.decode(new, skip_special_tokens=True)


def test_stream_stops_at_eos(eos_model_folder):
    from conftest import EOS_PROMPT

    model, tokenizer = load_pretrained(eos_model_folder), load_tokenizer(eos_model_folder)
    forward_calls = []
    model.register_forward_hook(lambda *args: forward_calls.append(1))
    pieces = list(stream(model, tokenizer, EOS_PROMPT, max_new_tokens=20))
    # the prefill and a step after each of the 3 tokens (the last one sees that every row has finished)
    assert len(forward_calls) == 1 + 3
    ids = torch.tensor([tokenizer.encode(EOS_PROMPT)])
    two_before_eos = generate(model, ids, max_new_tokens=2)[0, ids.shape[1] :].tolist()
    assert "".join(pieces) == tokenizer.decode(two_before_eos)


def test_stream_refuses_a_streamer_and_unknown_arguments(tiny_model_folder, tokenizer):
    model = load_pretrained(tiny_model_folder)
    with pytest.raises(TypeError, match="streamer"):
        list(stream(model, tokenizer, "hi", max_new_tokens=2, streamer=print))
    with pytest.raises(TypeError):
        list(stream(model, tokenizer, "hi", max_new_tokens=2, top_q=0.5))
    with pytest.raises(ValueError, match="prompt is '', which has no tokens"):
        list(stream(model, tokenizer, "", max_new_tokens=2))


def test_two_interleaved_streams_on_one_decoder(tiny_model_folder, tokenizer):
    """Both streams would write into the decoder's one cache: the second is refused while the first is open,
    the first still yields the text it yields alone, and a stream closed early hands the decoder back."""
    from bloom.generation.decoder import Decoder

    model = load_pretrained(tiny_model_folder)
    decoder = Decoder(model, 1)
    kwargs = dict(max_new_tokens=20, eos_token_id=[])
    alone = list(stream(model, tokenizer, "Le café", **kwargs))
    first = stream(model, tokenizer, "Le café", decoder=decoder, **kwargs)
    pieces = [next(first)]
    second = stream(model, tokenizer, "Un 🦄", decoder=decoder, **kwargs)
    with pytest.raises(RuntimeError, match="this Decoder is already generating"):
        next(second)
    pieces += list(first)
    assert pieces == alone
    early = stream(model, tokenizer, "Un 🦄", decoder=decoder, **kwargs)
    next(early)
    early.close()
    assert list(stream(model, tokenizer, "Le café", decoder=decoder, **kwargs)) == alone


def test_a_stream_left_unfinished_when_python_exits_says_nothing(tiny_model_folder):
    """Closed while Python tears its modules down: torch's inference_mode decorator failed there, printing
    "Exception ignored in <generator object stream>" and a traceback after the program's own output."""
    code = ("import sys\nfrom bloom import load_pretrained, load_tokenizer, stream\n"
            "model, tokenizer = load_pretrained(sys.argv[1], progress=False), load_tokenizer(sys.argv[1])\n"
            "pieces = stream(model, tokenizer, 'Hello', max_new_tokens=10)\nprint(repr(next(pieces)))\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(tiny_model_folder)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr

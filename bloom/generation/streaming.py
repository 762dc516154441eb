"""Turn generated tokens into text as they arrive.

A byte-level BPE token can end in the middle of a multi-byte character ("é" is two bytes, an emoji four),
and decoding such a prefix yields U+FFFD. `TextStream` holds text back while it ends in an incomplete
character, so every piece it gives out is final and the pieces join up to exactly the decoded text.
"""

from collections.abc import Iterator
from contextlib import closing

import torch

from bloom.checkpoints.tokenizer import BloomTokenizer
from bloom.generation.generate import generate_steps
from bloom.model import Bloom

INCOMPLETE = "\ufffd"  # what the byte-level decoder gives for a character whose bytes are not all there


class TextStream:
    """Feed token ids one at a time with `push`; each call returns the text that became final.

    Only the ids after the last final piece are decoded again at each push (byte-level BPE decodes a
    sequence to the concatenation of its pieces' bytes), so a long stream costs linear, not quadratic, time.
    """

    def __init__(self, tokenizer: BloomTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.pending: list[int] = []  # ids whose text is not given out yet

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith(INCOMPLETE):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is left, incomplete characters included (the stream has ended)."""
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        self.pending = []
        return text


def stream(
    model: Bloom, tokenizer: BloomTokenizer, prompt: str, *, max_new_tokens: int, **generate_kwargs
) -> Iterator[str]:
    """Generate from one prompt and yield the new text piece by piece, stopping at EOS.

    Takes `generate`'s keyword arguments (do_sample, temperature, top_k, top_p, repetition_penalty,
    eos_token_id, seed, ...); the EOS token itself is not part of the text. A `decoder` passed in is held
    until the stream ends (is exhausted, closed or dropped): a second stream on it meanwhile is refused.
    """
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:  # BLOOM's tokenizer adds no BOS: an empty prompt is no token at all
        raise ValueError(f"prompt is {prompt!r}, which has no tokens: generation continues a prompt of one or more")
    input_ids = torch.tensor([prompt_ids], device=model.word_embeddings.weight.device)
    generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    if generate_kwargs.pop("streamer", None) is not None:
        raise TypeError("stream() is itself the streamer; do not pass streamer=")
    text = TextStream(tokenizer)
    steps = generate_steps(model, input_ids, max_new_tokens=max_new_tokens, **generate_kwargs)
    with closing(steps):  # hands a decoder back as soon as this ends
        for tokens, finished_before in steps:
            if finished_before[0]:
                break
            if piece := text.push(int(tokens[0])):
                yield piece
    if rest := text.flush():
        yield rest

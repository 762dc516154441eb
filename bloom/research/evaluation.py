"""Score BLOOM in EleutherAI's lm-evaluation-harness: `BloomLM`, the harness's language-model interface.

    lm = BloomLM("bigscience/bloom-560m", dtype="fp32", batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

or, to score a model changed in memory (a head ablated, a layer patched, weights edited):

    with patch(model, {"h.0.self_attention.context": zero_head(3)}):
        lm_eval.simple_evaluate(model=BloomLM(model, tokenizer=tokenizer), tasks=["piqa"])

The numbers are the harness's own transformers adapter's (`lm_eval.models.huggingface.HFLM`) on the same
checkpoint: texts are tokenized by the harness's `TemplateLM` (which splits a context from its continuation),
rolling windows for perplexity come from the harness's `get_rolling_token_windows` and `make_disjoint_window`,
and generated text is cut at the stop strings by the harness's `postprocess_generated_text`. What differs is
how the work is batched: requests are sorted longest first, left-padded, and each batch takes one forward
pass; a left-padded row gets the logits of its tokens alone, and its continuation is always its last
positions. Log-probabilities are taken in float32 (HFLM takes them in the logits' dtype: the same in fp32,
more accurate in half precision).

This module imports lm_eval; `import bloom` never imports this module.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from bloom.checkpoints.loader import load_pretrained
from bloom.checkpoints.tokenizer import BloomTokenizer, left_pad, load_tokenizer
from bloom.config import is_integer
from bloom.generation.generate import generate_steps
from bloom.model import Bloom
from bloom.research.perplexity import float_logits

MAX_LENGTH = 2048  # tokens per forward pass: BLOOM's training context, and the harness's default
MAX_GEN_TOKS = 256  # new tokens when a task does not say (HFLM's default)


class BloomLM(TemplateLM):
    """The harness's `LM` over our BLOOM: `loglikelihood`, `loglikelihood_rolling`, `generate_until`.

    pretrained: a checkpoint folder or hub repo id (read with `load_pretrained` and `load_tokenizer`), or a
        `Bloom` already in memory, scored as it is, hooks included; then pass its `tokenizer`.
    tokenizer: a `BloomTokenizer`, or where to load one from; default: `pretrained`.
    dtype: as in `load_pretrained` ("fp32", "bf16", "fp16" or a torch dtype); default: the stored dtype.
    device: where the model is loaded, or where the model in memory already is.
    batch_size: requests per forward pass.
    max_length: tokens per forward pass. Longer inputs lose their oldest tokens (loglikelihood,
        generate_until), or are scored in windows of this many tokens (loglikelihood_rolling).
    """

    def __init__(
        self,
        pretrained: str | Path | Bloom,
        *,
        tokenizer: BloomTokenizer | str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 1,
        max_length: int = MAX_LENGTH,
    ) -> None:
        super().__init__()
        if not (is_integer(batch_size) and batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not (is_integer(max_length) and max_length >= 2):
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        if isinstance(pretrained, Bloom):
            if tokenizer is None:
                raise ValueError("BloomLM(model): a model in memory needs its tokenizer too (tokenizer=...)")
            if dtype is not None:
                raise ValueError("dtype applies when loading; convert a model in memory with model.to(dtype)")
            self.model = pretrained
            weights_device = pretrained.word_embeddings.weight.device
            if weights_device != torch.empty(0, device=device).device:
                raise ValueError(f"the model is on {weights_device}, not on device={device!r}: pass device=")
        else:
            self.model = load_pretrained(pretrained, dtype=dtype, device=device)
            tokenizer = pretrained if tokenizer is None else tokenizer
        self.tokenizer = tokenizer if isinstance(tokenizer, BloomTokenizer) else load_tokenizer(tokenizer)
        self.tokenizer.check_fits(self.model.config.vocab_size)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token, which the harness needs (to end generations)")
        self._device = self.model.word_embeddings.weight.device
        self._batch_size = batch_size
        self._max_length = max_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced with: BOS when there is one, else EOS (as HFLM does)."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # BLOOM's post-processor adds no special tokens, so the flag changes nothing for its checkpoints.
        return self.tokenizer.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False).ids

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per request.

        requests: (the (context, continuation) strings or None, context ids, continuation ids), as
            TemplateLM.loglikelihood makes them. The model reads context + continuation minus its last token,
            keeping the last max_length tokens; the last len(continuation) positions predict the continuation.
        """
        inputs = [(context + continuation)[-(self.max_length + 1) : -1] for _, context, continuation in requests]
        for (_, context, continuation), tokens in zip(requests, inputs, strict=True):
            if not context or not continuation or len(continuation) > len(tokens):
                raise ValueError(
                    f"a loglikelihood request needs a context, a continuation, and at most max_length="
                    f"{self.max_length} continuation tokens; got {len(context)} and {len(continuation)} tokens"
                )
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for batch in self._batches(inputs, "loglikelihood", disable_tqdm):
            ids, mask = self._left_pad([inputs[i] for i in batch])  # (B, T) each
            with torch.inference_mode():
                hidden = self.model.hidden(ids, mask)  # (B, T, C)
            for row, i in enumerate(batch):
                strings, _, continuation = requests[i]
                results[i] = self._score(hidden[row, -len(continuation) :], continuation)
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, results[i])
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each request's text, every token scored once, in windows of max_length tokens.

        The windows are HFLM's: the first starts with prefix_token_id, each later one scores the tokens the
        one before did not reach, with the tokens just before them as context, up to max_length in all.
        """
        windows, owners = [], []  # (None, context ids, continuation ids); the request each belongs to
        for i, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[i] += logprob  # in window order, as HFLM sums them
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continue each context with our KV-cached `generate` until a stop string, EOS or max_gen_toks.

        Each request's generation arguments (a dict): `until` (a string or list of stop strings),
        `max_gen_toks` (or its aliases `max_new_tokens`, `max_tokens`), `do_sample`, `temperature`, `top_k`,
        `top_p`. Requests with the same arguments are batched together. The text returned ends before the
        first stop string, as HFLM's does.
        """
        groups: dict[str, list[int]] = {}  # requests with the same generation arguments
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        results = [""] * len(requests)
        for members in groups.values():
            contexts = [requests[i].args[0] for i in members]
            arguments = self._generation_arguments(requests[members[0]].args[1])
            max_context = self.max_length - arguments["max_new_tokens"]
            prompts = [self.tok_encode(context)[-max_context:] for context in contexts]
            for batch in self._batches(prompts, "generate_until", disable_tqdm):
                texts = self._generate([prompts[i] for i in batch], **arguments)
                for i, text in zip(batch, texts, strict=True):
                    results[members[i]] = text
                    self.cache_hook.add_partial("generate_until", requests[members[i]].args, text)
        return results

    def _generation_arguments(self, gen_kwargs: dict) -> dict:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos = self.tokenizer.decode([self.eot_token_id])
        arguments = {
            "until": handle_stop_sequences(kwargs.pop("until", None), eos=eos),
            "max_new_tokens": kwargs.pop("max_gen_toks"),
            "do_sample": bool(kwargs.pop("do_sample")),
        }
        # a task that gives neither do_sample nor a temperature (coqa's `until:` alone) decodes greedily with no
        # temperature; one that samples without a temperature samples at 1.0, transformers' default
        temperature = kwargs.pop("temperature", 1.0)
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        if kwargs:
            raise ValueError(
                f"generation arguments {sorted(kwargs)} are not supported by BloomLM (it takes until, "
                "max_gen_toks, do_sample, temperature, top_k, top_p)"
            )
        if arguments["do_sample"]:  # greedy decoding ignores them, as transformers' does
            arguments |= {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        if not 0 < arguments["max_new_tokens"] < self.max_length:
            raise ValueError(
                f"max_gen_toks must be between 1 and max_length - 1 = {self.max_length - 1}, "
                f"got {arguments['max_new_tokens']}"
            )
        return arguments

    def _generate(
        self,
        prompts: list[list[int]],
        *,
        until: list[str],
        max_new_tokens: int,
        do_sample: bool,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> list[str]:
        """The text each prompt continues with, cut before the first stop string; stops once every row has
        produced EOS or a stop string (checked in the decoded text, so a stop string split over several
        tokens is found)."""
        ids, mask = self._left_pad(prompts)  # (B, T) each
        steps = generate_steps(
            self.model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=self.eot_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )  # fmt: skip
        new_tokens: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for tokens, _ in steps:  # (B,) per step
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                new_tokens[row].append(token)
                text = self.tokenizer.decode(new_tokens[row], skip_special_tokens=True)
                done[row] = token == self.eot_token_id or any(stop and stop in text for stop in until)
            if all(done):
                break
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in new_tokens]
        return [postprocess_generated_text(text, until, None) for text in texts]

    def _batches(self, sequences: list[list[int]], description: str, disable_tqdm: bool):
        """Indices of `sequences`, longest first, batch_size at a time, with a progress bar over them."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        with tqdm(total=len(order), desc=f"bloom {description}", disable=disable_tqdm) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                yield batch
                bar.update(len(batch))

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token id lists -> left-padded ids and attention mask, (B, T) each, on the model's device."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        ids, mask = left_pad(rows, pad)
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def _score(self, hidden: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """(n, C) final hidden states predicting the n continuation tokens -> (sum of log p, all argmax)."""
        targets = torch.tensor(continuation, device=hidden.device)  # (n,)
        logprob, greedy = 0.0, True
        for at, logits in float_logits(self.model, hidden):  # (chunk, V)
            chunk_targets = targets[at]
            logprobs = F.log_softmax(logits, dim=-1).gather(-1, chunk_targets[:, None])  # (chunk, 1)
            logprob += float(logprobs.sum())
            greedy = greedy and bool((logits.argmax(dim=-1) == chunk_targets).all())
        return logprob, greedy

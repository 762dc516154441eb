"""BLOOM, hand-written: embedding + its LayerNorm, ALiBi attention, tanh-GeLU MLP, blocks, ln_f, tied head.

Shapes in the comments:
    B   batch                      T   tokens in this forward pass
    S   key positions: T, or the   V   vocabulary rows (250880)
        KV cache's length          C   hidden_size; nh heads, hd = C / nh

Module and parameter names are the published checkpoints' own (`h.3.self_attention.query_key_value.weight`),
so that the loader only has to strip a `transformer.` prefix and a reader can match every tensor to the file.

Numerics follow transformers' BLOOM op for op (docs/internals.md, section 3), which is what makes the fp32 logits
equal and the half-precision ones close: ALiBi slopes from a float32 torch.pow, scores as
baddbmm(alibi, q, kᵀ, alpha=1/√hd), softmax in float32, GeLU in HF's exact operation order.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from bloom import matvec
from bloom.config import BloomConfig
from bloom.heap import release_freed_memory
from bloom.kv_cache import KVCache, LayerKV


def alibi_slopes(n_head: int, device: torch.device | None = None) -> torch.Tensor:
    """Per-head ALiBi slopes, (nh,) float32.

    For nh a power of two: r, r², ..., r^nh with r = 2^(-8/nh). Otherwise the first c = 2^floor(log2 nh)
    heads get the slopes of a c-head model and the remaining heads take every other slope of a 2c-head
    model (odd powers), appended after them. Computed as float32 torch.pow of a float32 base, exactly as
    BLOOM was trained and as transformers computes them (16 heads give 0.49999997, not 0.5).
    """
    c = 2 ** math.floor(math.log2(n_head))
    base = torch.tensor(2.0 ** (-8.0 / c), dtype=torch.float32, device=device)
    slopes = torch.pow(base, torch.arange(1, c + 1, dtype=torch.int32, device=device))
    if c < n_head:
        extra_base = torch.tensor(2.0 ** (-4.0 / c), dtype=torch.float32, device=device)
        odd_powers = torch.arange(1, 2 * (n_head - c), 2, dtype=torch.int32, device=device)
        slopes = torch.cat([slopes, torch.pow(extra_base, odd_powers)])
    return slopes


def alibi_bias(attention_mask: torch.Tensor, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi bias slope_h · position(key), (B, S) mask -> (B, nh, 1, S) in `dtype`.

    A key's position counts the real tokens before it, so a left-padded row gets the same bias as the
    prompt alone. The bias grows with the key position instead of shrinking with the query-key distance:
    the two differ by a constant per query row, which softmax ignores.
    """
    positions = (attention_mask.cumsum(dim=-1) - 1) * attention_mask  # (B, S), pads at 0
    bias = slopes[None, :, None] * positions[:, None, :]  # (B, nh, S) float32
    return bias.to(dtype)[:, :, None, :]  # (B, nh, 1, S), rounded to the model dtype as transformers does


def causal_mask(attention_mask: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask, (B, S) mask and (T,) query slots -> (B, 1, T, S): 0 where the query may see the key,
    the dtype's minimum elsewhere.

    The query at slot t sees the real keys at slots up to t. A padding query also sees itself, so that no
    softmax row is empty: an all-masked row is NaN in fp16, and 0·NaN would carry it into the real tokens.
    Real tokens never see padding, so their outputs are unaffected.
    """
    key_slots = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (S,)
    query_slots = slots[:, None]  # (T, 1)
    allowed = (key_slots <= query_slots) & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    allowed |= key_slots == query_slots
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


class CausalMask:
    """The additive mask of one forward pass, from the (B, S) mask and the (T,) query slots, built when asked:
    whole, (B, 1, T, S), once for all the layers; or for a few query rows at a time, so that a long input
    never holds a (T, S) tensor."""

    def __init__(self, attention_mask: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> None:
        self.attention_mask, self.slots, self.dtype = attention_mask, slots, dtype
        self._whole: torch.Tensor | None = None

    def whole(self) -> torch.Tensor:
        if self._whole is None:
            self._whole = causal_mask(self.attention_mask, self.slots, self.dtype)  # (B, 1, T, S)
        return self._whole

    def rows(self, start: int, end: int) -> torch.Tensor:
        """The mask of queries start..end-1 over the keys they can see: the slots up to the last one's,
        (B, 1, end - start, S') with S' = slots[end - 1] + 1 (later keys are masked for all of them)."""
        keys = int(self.slots[end - 1]) + 1
        return causal_mask(self.attention_mask[:, :keys], self.slots[start:end], self.dtype)


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximate GeLU, with BLOOM's constant (float32 √(2/π)) and operation order.

    Equal to F.gelu(x, approximate="tanh") within 5e-7 in fp32, but evaluated step by step in fp16/bf16 like
    transformers, which matters for half-precision parity. A decode step's few rows take bloom.matvec's one pass.
    """
    if matvec.gelu_applies(x):
        return matvec.gelu(x)
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


# Bytes of float32 attention scores, (B, nh, T, S), computed at once. Beyond it, attention takes a chunk of queries
# at a time, so that memory grows linearly with T. 2**28 keeps bloom-560m whole up to 2048 tokens at batch 1.
SCORES_BUDGET = 2**28


def refuse_non_tokens(ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Raise, naming the first one, where `ids` holds anything but the vocabulary's token ids (one host sync)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got {ids.dtype}")
    outside = (ids < 0) | (ids >= vocab_size)
    if outside.any():
        at = tuple(int(i) for i in outside.nonzero()[0])
        raise ValueError(f"{name}[{', '.join(map(str, at))}] = {int(ids[at])} is not a token id: the model's "
                         f"vocabulary has ids 0..{vocab_size - 1}")  # fmt: skip


def query_chunks(batch: int, heads: int, queries: int, keys: int) -> int:
    """The chunks of queries attention takes so that each one's float32 scores fit in SCORES_BUDGET (1: whole)."""
    return math.ceil(batch * heads * queries * keys * 4 / SCORES_BUDGET)


class Tap(nn.Identity):
    """A named point in the forward pass (`h.3.self_attention.probs`) that returns its input unchanged.

    It exists so that `bloom.research.probe` can record or replace the tensor there with a forward hook; with no hook
    registered it costs one module call.
    """


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a generation's few rows (bloom.matvec.decoding) go to bloom.matvec's kernel instead."""
    if matvec.applies(x, weight):
        return matvec.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class TiedEmbedding(nn.Embedding):
    """The word embedding, (B, T) ids -> (B, T, C), which is also the LM head: `unembed`, (B, T, C) -> (B, T, V)."""

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.head_offset = 0  # this module's first head; not 0 when heads are split (bloom.scale.parallel)
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.q, self.k, self.v, self.scores, self.probs, self.context = (Tap() for _ in range(6))

    def forward(
        self, x: torch.Tensor, alibi: torch.Tensor, mask: CausalMask, kv: LayerKV | None, slots: torch.Tensor
    ) -> torch.Tensor:
        B, T, _ = x.shape
        alibi = alibi[:, self.head_offset : self.head_offset + self.n_head]  # (B, nh, 1, S): this module's heads
        # The fused projection's output features are laid out per head: [head][q | k | v][hd].
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3, self.head_dim)  # (B, T, nh, 3, hd)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # 3 x (B, nh, T, hd)
        q, k, v = self.q(q), self.k(k), self.v(v)
        if kv is not None:
            cached_k, cached_v = kv.update(slots, k, v)  # 2 x (B, nh, S_max, hd)
            if mask.attention_mask.shape[-1] == cached_k.shape[2]:  # decoding: attend over the whole cache,
                k, v = cached_k, cached_v  # unwritten slots masked (a prefill attends over its own T tokens only)
        n_chunks = query_chunks(B, self.n_head, T, k.shape[2])
        probed = self.probed()
        if not probed and matvec.attends(q, k):  # a decode step's one query per row, in bloom.matvec
            y = matvec.attend(q, k, v, alibi, mask.whole(), 1.0 / math.sqrt(self.head_dim))
        elif probed or n_chunks <= 1:  # all queries at once: the reference, op for op as transformers
            y = self.attend(q, k, v, alibi, mask.whole())  # (B, nh, T, hd)
        else:  # long inputs: memory linear in T, values equal within float32 rounding
            y = self.attend_in_chunks(q, k, v, alibi, mask, n_chunks)
        y = self.context(y)  # each head's output: (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # heads concatenated, (B, T, nh·hd)
        return self.dense(y)  # (B, T, C)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """softmax(alibi + q·kᵀ/√hd + mask) · v: queries (B, nh, T, hd), keys and values (B, nh, S, hd),
        alibi (B, nh, 1, S), mask (B, 1, T, S) -> (B, nh, T, hd)."""
        B, _, T, _ = q.shape
        S = k.shape[2]
        c = torch.float32 if matvec.upcasts(q) else q.dtype  # the products' dtype: q's, but see matvec.upcasts
        scores = (
            torch.baddbmm(  # alibi + (q · kᵀ) / √hd, without the mask (added below)
                alibi.expand(B, self.n_head, 1, S).reshape(B * self.n_head, 1, S).to(c),  # (B·nh, 1, S)
                q.reshape(B * self.n_head, T, self.head_dim).to(c),  # (B·nh, T, hd)
                k.reshape(B * self.n_head, S, self.head_dim).transpose(1, 2).to(c),  # (B·nh, hd, S)
                alpha=1.0 / math.sqrt(self.head_dim),
            )
            .to(q.dtype)
            .view(B, self.n_head, T, S)
        )
        scores = self.scores(scores)  # (B, nh, T, S)
        probs = self.probs(F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype))  # (B, nh, T, S)
        return (probs.to(c) @ v.to(c)).to(q.dtype)

    def attend_in_chunks(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi: torch.Tensor, mask: CausalMask, n_chunks: int
    ) -> torch.Tensor:
        """`attend`, n_chunks slices of the queries at a time, each against the keys it can see; same shapes."""
        T = q.shape[2]
        rows = math.ceil(T / n_chunks)  # chunks of about equal size
        y = torch.empty_like(q)  # (B, nh, T, hd), allocated first, so that no chunk's output sits among the next's
        # tensors in the C heap, which could then not reuse their memory (bloom.heap)
        for a in range(0, T, rows):
            chunk_mask = mask.rows(a, min(a + rows, T))  # (B, 1, rows, S')
            S = chunk_mask.shape[-1]
            queries = q[:, :, a : a + rows]
            y[:, :, a : a + rows] = self.attend(queries, k[:, :, :S], v[:, :, :S], alibi[..., :S], chunk_mask)
        return y

    def probed(self) -> bool:
        """Whether a hook watches the (B, nh, T, S) taps, which then see the whole tensor, however long T."""
        return any(tap._forward_hooks or tap._forward_pre_hooks for tap in (self.scores, self.probs))


class MLP(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = Linear(4 * config.hidden_size, config.hidden_size)
        self.act = Tap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(bloom_gelu(self.dense_h_to_4h(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = Attention(config)
        self.resid_mid = Tap()  # the residual stream between attention's add and the MLP's
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, alibi: torch.Tensor, mask: CausalMask, kv: LayerKV | None, slots: torch.Tensor
    ) -> torch.Tensor:
        x = self.resid_mid(x + self.self_attention(self.input_layernorm(x), alibi, mask, kv, slots))  # pre-LN adds
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Bloom(nn.Module):
    """BLOOM: token ids (B, T) -> logits (B, T, V), through the embedding and its LayerNorm, the blocks, ln_f and
    the LM head tied to the embedding."""

    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.config = config
        embedding = torch.empty(config.vocab_size, config.hidden_size)  # (V, C); no padding_idx: pad is trained
        if not embedding.is_meta:  # on the meta device (loading) a random init means nothing and costs a second
            nn.init.normal_(embedding)
        self.word_embeddings = TiedEmbedding.from_pretrained(embedding, freeze=False)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits of every position, (B, T) token ids -> (B, T, V).

        attention_mask: (B, S), 1 for real tokens and 0 for padding, which goes on the left. S = T, except when
            decoding with a cache: then S = cache.max_len and the mask covers every slot (future slots may be 1:
            causality hides them). Real positions of a padded row get the logits of that prompt alone;
            padding positions get logits that mean nothing.
        cache, slots: the KV cache, and the slots (T,) where these tokens go. Without slots, the tokens start
            the sequence (a prefill): they attend to each other only and are stored at slots 0..T-1. With
            slots, they attend to everything in the cache.
        last_only: return the logits of the last position only, (B, 1, V), as generation needs.
        """
        x = self.hidden(input_ids, attention_mask, cache, slots)  # (B, T, C)
        if last_only:
            x = x[:, -1:]  # skips a (T, C) x (C, 250880) product over the prompt when only the next token matters
        return self.word_embeddings.unembed(x)  # the LM head is the embedding: (B, T, V)

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states, after ln_f, (B, T) -> (B, T, C); arguments as in `forward`."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            found = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids is {found}, expected a (batch, tokens) tensor")
        B, T = input_ids.shape
        # checked in a whole pass (a prefill too), not in a decode step, given its slots (its token was sampled, and a
        # GPU decoder must not wait on the host), nor in a compiled or shapes-only (meta) pass
        if slots is None and input_ids.device.type != "meta" and not torch.compiler.is_compiling():
            refuse_non_tokens(input_ids, self.config.vocab_size)
        if slots is not None and cache is None:
            raise ValueError("slots say where tokens go in a KV cache: pass the cache too")
        S = T if slots is None else cache.max_len
        if slots is None:
            slots = torch.arange(T, device=input_ids.device)
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, expected (batch, keys) = {(B, S)}")
        dtype = self.ln_f.weight.dtype  # the model's (the embedding may be int8, bloom.scale.quantize)
        alibi = alibi_bias(attention_mask, alibi_slopes(self.config.n_head, input_ids.device), dtype)  # (B, nh, 1, S)
        mask = CausalMask(attention_mask, slots, dtype)  # (B, 1, T, S), built when a layer needs it

        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, alibi, mask, None if cache is None else cache.layers[i], slots)
        if T > 1 and not torch.compiler.is_compiling():
            release_freed_memory()  # what the layers freed and the next reused: back to the OS (bloom.heap)
        return self.ln_f(x)

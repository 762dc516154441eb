"""A decode step's work on the CPU in bloom/matvec.c, compiled on first use and called through ctypes: the
matrix-vector products of the linear layers and the LM head, the one-query attention, the GeLU, the blocks' step
made of them, all the blocks in one call (`DecodeBlocks`, for bloom.generation.decode_step), and the greedy choice
(`argmax`).

A decode step reads every weight once for one token per sequence; its speed is the speed at which the weights
stream from memory. torch's matmul reads them at ~60% of the machine's bandwidth for so few rows, the kernels
of matvec.c at 80-95% (`python scripts/bench_matvec.py`). They compute the same products in float32 with another
order of additions, so their results differ from torch's by float32 rounding (int8 weights beside bf16 activations on
AVX2: in integers, each row's values below 2^-8 of its largest rounded; bloom.scale.quantize): they are used only
inside `decoding()`, which generation enters (bloom.generation.decoder), and a plain forward pass stays op for op
transformers'.

The library is built once per machine and source, with the system's C compiler (`cc`, or $CC) for this CPU
(-march=native), into ~/.cache/bloom (or $XDG_CACHE_HOME/bloom), and takes about a second. Without a compiler,
or on another OS, a warning says so once and the work stays torch's. The products are AVX-512 BF16 tiles where the
CPU has it, AVX2 tiles where it has AVX2 and FMA (3-4x torch's bf16 and fp16 matmul at a batch's rows there, which
have no AVX-512 BF16 for oneDNN), and elsewhere portable loops, slower than torch's matmul, so that products then stay
torch's (`max_rows`); the rest goes to the kernels."""

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("matvec.c")
# Rows of x up to which the kernels are faster than torch's ops, by (weight dtype, activation dtype), measured
# on a 2-core AVX-512 BF16 machine with scripts/bench_matvec.py (every product of bloom-560m, the LM head's
# included) and by the prefill of one prompt of bloom-560m, where only the blocks' products change (alternated in
# one process):
# - bf16: 1.6x torch at 1 row, 1.4x at 16 and 32, 1.1-1.2x at 48 and 64, 0.9-1.1x at 96; a prefill of 64 tokens
#   86 ms with the kernels, 105 without. Since their tiles multiply spans of the rows (matvec.c, GROUP): 80 tokens
#   105 against 120, 96 tokens 118 against 129, 128 tokens 163-179 against 164-187, 192 tokens 268 against 245;
#   the products alone, blocks and LM head timed apart (scratch): 1.07x and 1.10x torch at 96 rows, 0.98x and
#   1.01x at 128; scripts/bench_matvec.py, the two together: 0.86-1.00x at 96, 0.75-0.82x at 128. With more rows
#   the products are limited by the CPU's multiply-adds, not by memory, and torch's packed weights won. Since the
#   lane tiles take more than 16 rows (matvec.c, lanes_bf16), on a Zen 4 machine (alternated in one process): a
#   prefill of 64 tokens 137 ms against 165, 96 tokens 198 against 222, 128 tokens 245-284 against 277-303, 192
#   tokens 412-414 against 425-431, 256 tokens 514 against 536; scripts/bench_matvec.py 1.14x at 128 rows. The limit
#   is 128 rows, as for int8: the kernels lead by 6-12% in each run there (the runs' ranges overlap: the machine's
#   noise), by 2-5% beyond, which another machine's torch could erase.
# - int8 with bf16 activations: 1.3x at 1 row, 1.8x at 16, 3x at 32 (torch's int8 kernel stops at 16 rows), 1.3x
#   at 96 and 128; a prefill of 32 tokens 71 ms against 89, 64 tokens 120 against 122, and with the spans 96
#   tokens 113 against 143, 128 tokens 148 against 177, 192 tokens 237 against 227.
# - fp32: the kernels win at every size since their tiles keep their loads in registers (matvec.c, load_f32_held):
#   1.17x at 256 rows, 1.28x at 512, 1.31-1.32x at 1024 and 2048; a prefill of 512 tokens 1761 against 2362 ms, a
#   batch of 16 prompts of 128 tokens 4972 against 6530.
# - fp16: torch's matmul reads 0.4 GB/s at a prefill's 128 rows (the kernels 2.1); int8 weights beside fp16 or
#   fp32 activations are converted whole at every call there: always the kernels.
# These are the AVX-512 tiles' limits. The AVX2 tiles, built where the CPU has AVX2 and FMA but not AVX-512 BF16,
# were measured on a Zen 4 machine whose AVX-512 its hypervisor hid (2 cores), against torch's own choice of kernels
# there, bloom-560m's products and a quarter of its LM head alternated in one process (scratch): torch's bf16 and fp16
# matmul, with no AVX-512 BF16 for oneDNN, ran at 31-34 GFLOP/s at every size from 16 rows to 512, the kernels at
# 108-125; bf16 at 1 row 33.6 against 31.0 GB/s. Int8 weights beside bf16 x, multiplied in integers: 3.1x torch at
# 1 row, 1.8x at 16, 4.8x at 128; beside fp16 and fp32 x 2.7-17x. fp32: 1.7x at 1 row, 1.4x at 32, 1.1x at 64 and
# 128, 0.7x at 512 (torch's packed weights ahead again); whole fp32 prefills of bloom-560m, alternated in one process
# on a later day, took 245 ms against torch's products' 396 at 16 tokens, 434 against 514 at 32, 616 against 650 at
# 64, but 1080 against 993 at 96 and 1364 against 1154 at 128: 64 rows.
# The portable loops, built where the CPU lacks AVX2 too, take no products (`max_rows`): built for x86-64-v3 before
# there were AVX2 tiles, on an AVX-512 machine with torch limited to AVX2 (ATEN_CPU_CAPABILITY=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2), they took 141 ms for a bloom-560m decode step against 115 with torch's products in fp32,
# 198 against 33 in bf16, 161 against 33 in fp16. The attention and GeLU kernels, 1-8% faster than torch's there, stay.
TILES = {2: "avx512", 1: "avx2", 0: "portable"}  # matvec.c's vector_tiles(): which tiles the products are
MAX_ROWS = {
    "avx512": {
        (torch.bfloat16, torch.bfloat16): 128,
        (torch.float32, torch.float32): math.inf,
        (torch.float16, torch.float16): math.inf,
        (torch.int8, torch.bfloat16): 128,
        (torch.int8, torch.float16): math.inf,
        (torch.int8, torch.float32): math.inf,
    },
    "avx2": {
        (torch.bfloat16, torch.bfloat16): math.inf,
        (torch.float32, torch.float32): 64,
        (torch.float16, torch.float16): math.inf,
        (torch.int8, torch.bfloat16): math.inf,
        (torch.int8, torch.float16): math.inf,
        (torch.int8, torch.float32): math.inf,
    },
}
_KERNEL_DTYPES = {torch.bfloat16: "linear_bf16", torch.float16: "linear_f16", torch.float32: "linear_f32"}
_INT8_KERNELS = {torch.bfloat16: "linear_int8_bf16", torch.float16: "linear_int8_f16", torch.float32: "linear_int8_f32"}
_ATTEND_DTYPES = {torch.bfloat16: "attend_bf16", torch.float16: "attend_f16", torch.float32: "attend_f32"}
_GELU_DTYPES = {torch.bfloat16: "gelu_bf16", torch.float16: "gelu_f16", torch.float32: "gelu_f32"}
_ARGMAX_DTYPES = {torch.bfloat16: "argmax_bf16", torch.float16: "argmax_f16", torch.float32: "argmax_f32"}
_BLOCK_DTYPES = {
    torch.bfloat16: "decode_blocks_bf16",
    torch.float16: "decode_blocks_f16",
    torch.float32: "decode_blocks_f32",
}


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


_state = threading.local()  # .decoding: whether this thread is inside decoding()
# an x86 CPU without AVX-512 BF16, where torch's bf16 matmul and bmm run without bf16 instructions (`upcasts`)
_NO_BF16_INSTRUCTIONS = platform.machine() in ("x86_64", "AMD64") and "avx512_bf16" not in _cpu_features().split()
_library: ctypes.CDLL | None = None
_tried = False
_build_lock = threading.Lock()


@contextmanager
def decoding() -> Iterator[None]:
    """Within it, this thread's products of few rows (`max_rows`), one-query attention and GeLU go to the kernels."""
    before = getattr(_state, "decoding", False)
    _state.decoding = True
    try:
        yield
    finally:
        _state.decoding = before


def _generating(*tensors: torch.Tensor) -> bool:
    """Within decoding(), on the CPU, and outside autograd (which needs torch's ops) for these tensors."""
    if not getattr(_state, "decoding", False) or any(t.device.type != "cpu" for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def max_rows(weight_dtype: torch.dtype, x_dtype: torch.dtype) -> float:
    """Rows of x up to which the kernels take a product: MAX_ROWS of the library's tiles (0 for dtypes without a
    kernel), 0 where it has the portable loops, which torch's ops outrun or at best match."""
    lib = library()
    return MAX_ROWS.get(lib.tiles, {}).get((weight_dtype, x_dtype), 0) if lib is not None else 0


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` (or `int8_linear`, for an int8 weight) computes x · weightᵀ here."""
    if not _generating(x, weight) or not weight.is_contiguous():
        return False
    return x.numel() // x.shape[-1] <= max_rows(weight.dtype, x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for (..., K) x and a (N, K) weight of x's dtype, bf16, fp16 or fp32, and an (N,) bias -> (..., N)."""
    rows, K, N = x.numel() // x.shape[-1], x.shape[-1], weight.shape[0]
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
    x_read = x.float() if x.dtype == torch.float16 else x.contiguous()  # the fp16 kernel reads x in float32
    getattr(library(), _KERNEL_DTYPES[x.dtype])(
        x_read.data_ptr(), weight.data_ptr(), _pointer(bias, x.dtype), y.data_ptr(), rows, N, K
    )
    return y


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """(x · weightᵀ) · scale + bias for x (..., K) in bf16, fp16 or fp32, an int8 (N, K) weight, and (N,) scale
    and bias in x's dtype."""
    rows, K, N = x.numel() // x.shape[-1], x.shape[-1], weight.shape[0]
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
    x_read = x.float() if x.dtype == torch.float16 else x.contiguous()  # the fp16 kernel reads x in float32
    pointers = [x_read.data_ptr(), weight.data_ptr(), _pointer(scale, x.dtype), _pointer(bias, x.dtype), y.data_ptr()]
    getattr(library(), _INT8_KERNELS[x.dtype])(*pointers, rows, N, K)
    return y


def attends(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `attend` computes this attention here: one query per row (B, nh, 1, hd), keys (B, nh, S, hd)."""
    if not _generating(q, k) or q.dtype not in _ATTEND_DTYPES:
        return False
    if q.shape[2] != 1 or k.dtype != q.dtype or not k.is_contiguous():
        return False
    return library() is not None


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi: torch.Tensor, mask: torch.Tensor, alpha: float
) -> torch.Tensor:
    """softmax(alibi + alpha · q·kᵀ + mask) · v with `Attention.attend`'s roundings, for one query per row:
    q (B, nh, 1, hd), k and v (B, nh, S, hd) contiguous, alibi (B, nh, 1, S), mask (B, 1, 1, S) -> (B, nh, 1, hd)."""
    B, nh, _, hd = q.shape
    S = k.shape[2]
    q, v = q.contiguous(), v.contiguous()
    alibi = alibi.expand(B, nh, 1, S).contiguous()
    mask = mask.expand(B, 1, 1, S).contiguous()
    y = torch.empty_like(q)  # (B, nh, 1, hd)
    pointers = [t.data_ptr() for t in (q, k, v, alibi, mask, y)]
    failed = getattr(library(), _ATTEND_DTYPES[q.dtype])(*pointers, B * nh, nh, S, hd, alpha)
    if failed:
        raise MemoryError(f"attention over {S} slots: the kernel could not allocate its {S} float32 scores")
    return y


def upcasts(t: torch.Tensor) -> bool:
    """Whether attention's batched products take `t`, fp16 on the CPU within generation (a prefill's), or bf16 on an
    x86 CPU without AVX-512 BF16, in float32: torch's fp16 bmm is slow on the CPU (448 of a 128-token bloom-560m
    prefill's 843 ms, the float32 one ~4 ms), and so is its bf16 bmm where oneDNN has no bf16 instructions to use
    (1.1 s of such a prefill's 2.15 s on an AVX2 machine). Each product is still rounded to the dtype once, as
    torch's half-precision product is: equal within float32 rounding."""
    slow = t.dtype == torch.float16 or (t.dtype == torch.bfloat16 and _NO_BF16_INSTRUCTIONS)
    return slow and _generating(t)


def gelu_applies(x: torch.Tensor) -> bool:
    """Whether `gelu` computes bloom_gelu(x) here: within generation, a prefill's rows too (one pass instead of
    torch's nine: 2.0 -> 0.3 ms a layer for a 128-token bf16 prompt of bloom-560m), without autograd."""
    return x.dtype in _GELU_DTYPES and _generating(x) and library() is not None


def gelu(x: torch.Tensor) -> torch.Tensor:
    """bloom.model.bloom_gelu in one pass, each of its operations rounded to x's dtype as torch rounds them."""
    x = x.contiguous()
    y = torch.empty_like(x)
    getattr(library(), _GELU_DTYPES[x.dtype])(x.data_ptr(), y.data_ptr(), x.numel())
    return y


def argmax_applies(logits: torch.Tensor) -> bool:
    """Whether `argmax` takes these (B, V) logits here: bf16, fp16 or fp32 on the CPU, with the library built."""
    return (
        logits.dim() == 2 and logits.dtype in _ARGMAX_DTYPES and logits.device.type == "cpu" and library() is not None
    )


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits.float(), dim=-1) of (B, V) logits -> (B,) int64: the first largest of each row, a NaN
    counting as the largest, without converting the logits."""
    logits = logits.contiguous()
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    getattr(library(), _ARGMAX_DTYPES[logits.dtype])(logits.data_ptr(), *logits.shape, tokens.data_ptr())
    return tokens


def has_block_kernel(dtype: torch.dtype) -> bool:
    """Whether `DecodeBlocks` takes activations of this dtype here (bf16, fp16, fp32, with the library built)."""
    return dtype in _BLOCK_DTYPES and library() is not None


class _Product(ctypes.Structure):  # matvec.c's struct product
    _fields_ = [("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Block(ctypes.Structure):  # matvec.c's struct block
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("ln1_weight", "ln1_bias")),
        *((name, _Product) for name in ("qkv", "dense")),
        *((name, ctypes.c_void_p) for name in ("ln2_weight", "ln2_bias")),
        *((name, _Product) for name in ("up", "down")),
        *((name, ctypes.c_void_p) for name in ("keys", "values")),
        *((name, ctypes.c_int64) for name in ("hidden", "heads")),
        *((name, ctypes.c_float) for name in ("eps", "alpha")),
    ]


class _Step(ctypes.Structure):  # matvec.c's struct step
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("alibi", "mask")),
        *((name, ctypes.c_int64) for name in ("rows", "slots", "slot")),
    ]


Product = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # weight, scale (int8 weights), bias


class DecodeBlock:
    """A block of a decode step (`DecodeBlocks` runs them), x (M, C) -> (M, C), for M rows of one token each.

    norms: the weights and biases of the two LayerNorms, (C,) each; products: (weight, scale or None, bias) of the
    fused qkv (3C, C), dense (C, C), dense_h_to_4h (4C, C) and dense_4h_to_h (C, 4C) layers, weights in `dtype`
    or int8 with a scale per row; eps: the LayerNorms' epsilon; heads: nh; alpha = 1/√hd. Tensors of other
    shapes, dtypes or layouts are refused (ValueError). They are held (their storage stays alive) and their
    addresses taken here, once: an in-place edit of a weight is seen, a weight replaced by another tensor is not.
    """

    def __init__(
        self,
        norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        products: tuple[Product, Product, Product, Product],
        eps: float,
        alpha: float,
        heads: int,
        dtype: torch.dtype,
    ) -> None:
        C = products[1][0].shape[0]  # dense: (C, C)
        shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)]
        fits = C % heads == 0 and all(t is not None and t.shape == (C,) for t in norms)
        for (weight, scale, bias), shape in zip(products, shapes, strict=True):
            fits &= weight.shape == shape and all(t is None or t.shape == shape[:1] for t in (scale, bias))
        if not fits:
            sizes = [None if t is None else tuple(t.shape) for t in (*norms, *(t for p in products for t in p))]
            raise ValueError(f"a block of width {C} and {heads} heads with tensors of shapes {sizes}")
        if dtype not in _BLOCK_DTYPES:
            raise ValueError(f"a block of {dtype} activations: the kernel takes {', '.join(map(str, _BLOCK_DTYPES))}")
        self.dtype, self.hidden, self.heads = dtype, C, heads
        self.tensors = [t.detach() for t in (*norms, *(t for p in products for t in p)) if t is not None]
        norms_at = [_pointer(t, dtype) for t in norms]
        products_at = [_product(*product, dtype) for product in products]
        tensors_at = (*norms_at[:2], *products_at[:2], *norms_at[2:], *products_at[2:])  # in struct block's order
        self.params = _Block(*tensors_at, hidden=C, heads=heads, eps=eps, alpha=alpha)

    def bind(self, keys: torch.Tensor, values: torch.Tensor, rows: int, slots: int) -> bool:
        """Whether the layer's cache fits a step of `rows` rows over `slots` slots, keys and values (rows, nh,
        slots, hd) each, contiguous, in the block's dtype, on the CPU; if so, hand their addresses to its next
        call."""
        shape = (rows, self.heads, slots, self.hidden // self.heads)
        if not all(t.shape == shape and _laid_out(t, self.dtype) for t in (keys, values)):
            return False
        self.params.keys, self.params.values = keys.data_ptr(), values.data_ptr()
        return True


class DecodeBlocks:
    """A decode step's blocks one after another in one call into matvec.c, x (M, C) -> (M, C): the work of each
    block's forward for M rows of one token each (bloom.generation.decode_step), all in one dtype."""

    def __init__(self, blocks: list[DecodeBlock]) -> None:
        kinds = {(block.dtype, block.hidden, block.heads) for block in blocks}
        if len(kinds) != 1:
            raise ValueError(f"blocks of one dtype, width and number of heads, at least one: {sorted(map(str, kinds))}")
        self.blocks = blocks
        self.dtype, self.hidden, self.heads = kinds.pop()
        self.kernel = getattr(library(), _BLOCK_DTYPES[self.dtype])
        self.params = (ctypes.POINTER(_Block) * len(blocks))(*(ctypes.pointer(block.params) for block in blocks))
        self.step = _Step()

    def __call__(
        self,
        x: torch.Tensor,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
        alibi: torch.Tensor,
        mask: torch.Tensor,
        at: int,
    ) -> torch.Tensor:
        """x (M, C) through every block; caches: each block's (keys, values), (M, nh, S, hd) each, written at slot
        `at`; alibi (M, nh, S) and the additive mask (M, S) of the query at that slot, the same for every block.
        Every tensor in the blocks' dtype, contiguous, on the CPU."""
        if len(caches) != len(self.blocks):
            raise ValueError(f"{len(caches)} layers' keys and values for {len(self.blocks)} blocks")
        M, S, nh = x.shape[0] if x.dim() else 0, mask.shape[-1] if mask.dim() else 0, self.heads
        fits = x.shape == (M, self.hidden) and alibi.shape == (M, nh, S) and mask.shape == (M, S) and 0 <= at < S
        fits &= all(_laid_out(t, self.dtype) for t in (x, alibi, mask))
        for i, (block, (keys, values)) in enumerate(zip(self.blocks, caches, strict=True)):
            if not (fits and block.bind(keys, values, M, S)):
                shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in (x, keys, values, alibi, mask))
                where = f"layer {i}: " if fits else ""  # a layer's cache, or what all the layers share
                raise ValueError(
                    f"{where}a {self.dtype} block of width {self.hidden} and {nh} heads, at slot {at} of x, keys, "
                    f"values, alibi, mask: {shapes}"
                )
        step = self.step
        step.alibi, step.mask, step.rows, step.slots, step.slot = alibi.data_ptr(), mask.data_ptr(), M, S, at
        out = torch.empty_like(x)
        if self.kernel(self.params, len(self.blocks), ctypes.byref(step), x.data_ptr(), out.data_ptr()):
            raise MemoryError(f"a decode step's blocks over {S} slots: the kernel could not allocate")
        return out


def _laid_out(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernels can read t as it is: of `dtype`, contiguous, on the CPU."""
    return t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"


def _product(weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype):
    """A product's struct: its weight in `dtype`, or int8 beside a scale in `dtype`; its bias (or None)."""
    _pointer(weight, torch.int8 if scale is not None else dtype)
    return _Product(weight.data_ptr(), _pointer(scale, dtype), _pointer(bias, dtype))


def _pointer(t: torch.Tensor | None, dtype: torch.dtype) -> int | None:
    if t is None:
        return None
    if not _laid_out(t, dtype):
        raise ValueError(
            f"a {tuple(t.shape)} {t.dtype} tensor on {t.device} where the kernel reads a contiguous {dtype} one "
            "on the CPU"
        )
    return t.data_ptr()


def library() -> ctypes.CDLL | None:
    """The kernels for this machine, built on the first call; None (after one warning) where they cannot be."""
    global _library, _tried
    if not _tried:
        with _build_lock:
            if not _tried:
                try:
                    _library = load_or_rebuild(build())
                except (OSError, RuntimeError) as error:
                    warnings.warn(
                        f"bloom: the CPU decode kernels are unavailable ({error}); decoding uses torch's matmul",
                        stacklevel=_outside_bloom(),
                    )
                _tried = True
    return _library


def _outside_bloom() -> int:
    """The stack level of the first caller outside the bloom package, for a warning to name the user's line
    rather than one of bloom's own."""
    level, frame = 2, sys._getframe(2)  # the caller of library()
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "bloom":
        level, frame = level + 1, frame.f_back
    return level


def load_or_rebuild(path: Path) -> ctypes.CDLL:
    """`load` a built library; if the file in the cache is damaged (cannot be loaded), build it again once."""
    try:
        return load(path)
    except OSError:
        path.unlink(missing_ok=True)
        return load(build())


def load(path: Path) -> ctypes.CDLL:
    """Open a built library and declare its functions' arguments."""
    lib = ctypes.CDLL(str(path))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name in _KERNEL_DTYPES.values():  # x, W, b, y, M, N, K
        getattr(lib, name).argtypes = [pointer] * 4 + [size] * 3
    for name in _INT8_KERNELS.values():  # x, W, scale, b, y, M, N, K
        getattr(lib, name).argtypes = [pointer] * 5 + [size] * 3
    for name in (*_KERNEL_DTYPES.values(), *_INT8_KERNELS.values()):
        getattr(lib, name).restype = None
    for name in _GELU_DTYPES.values():  # x, y, n
        getattr(lib, name).argtypes = [pointer, pointer, size]
        getattr(lib, name).restype = None
    for name in _ARGMAX_DTYPES.values():  # x, rows, n, out
        getattr(lib, name).argtypes = [pointer, size, size, pointer]
        getattr(lib, name).restype = None
    for name in _BLOCK_DTYPES.values():  # struct block *[n], n, struct step *, x, out -> 1 if out of memory
        blocks_at, step_at = ctypes.POINTER(ctypes.POINTER(_Block)), ctypes.POINTER(_Step)
        getattr(lib, name).argtypes = [blocks_at, size, step_at, pointer, pointer]
        getattr(lib, name).restype = ctypes.c_int
    for name in _ATTEND_DTYPES.values():  # q, k, v, alibi, mask, y, BH, heads, S, hd, alpha -> 1 if out of memory
        getattr(lib, name).argtypes = [pointer] * 6 + [size] * 4 + [ctypes.c_float]
        getattr(lib, name).restype = ctypes.c_int
    lib.vector_tiles.argtypes, lib.vector_tiles.restype = [], ctypes.c_int
    lib.tiles = TILES[lib.vector_tiles()]  # asked once: `max_rows` reads it for every product
    return lib


def build(march: str = "native", folder: Path | None = None) -> Path:
    """Compile matvec.c for `march` into `folder` (default: the cache), unless it is there already; its path.

    The file name holds a hash of the source, the flags and the CPU's feature list, so that an edit or another
    machine sharing the home folder builds its own.
    """
    if sys.platform != "linux":
        raise RuntimeError(f"built only on Linux, not {sys.platform}")
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler '{compiler}' on PATH (install gcc, or set CC)")
    flags = ["-O3", f"-march={march}", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]  # no fused a·b+c
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + _cpu_features().encode()).hexdigest()[:16]
    folder = folder or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bloom"
    path = folder / f"matvec-{platform.machine()}-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    print(f"bloom: compiling the CPU decode kernels into {path} (once per machine)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # built aside, then renamed: no half-written library
        built = Path(scratch) / path.name
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(built, path)
    return path

"""Activations of a long text, written to disk as they are computed: `export` and `load`.

The text's tokens are cut into consecutive windows of `context` tokens (the last one shorter), each token
in exactly one window, and the windows run `batch_size` at a time. For every named point (`bloom.research.probe`
names: "h.11", "h.*.mlp.act", "h.3.self_attention.context") each token gets one row: points of shape
(B, T, D) give their D features, per-head points (B, nh, T, hd) their heads side by side (nh·hd features,
head 0 first). Attention probabilities are refused: their width depends on the window.

The folder holds one safetensors file per point, a file of the token ids, and `index.json`:

    index.json           settings, shapes, and how many tokens are written ("tokens_done")
    tokens.safetensors   "tokens": (N,) int64, the text's token ids in order
    h.11.safetensors     "h.11": (N, D) in the model's dtype, row i is token i

Each point's file is laid out in full before the first batch (its header states (N, D)); every batch then
writes its rows in place, so memory holds one batch, never the corpus, and `load` maps the finished file
without copying it. index.json is rewritten after each batch's rows are on disk: an interrupted export
resumes where it stopped when run again with the same settings, and anything else in the folder is refused.
"""

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from huggingface_hub.utils import tqdm

from bloom.checkpoints.loader import safetensors_header
from bloom.config import naming, read_json, write_whole
from bloom.memory import check_attention_fits
from bloom.model import Bloom
from bloom.research.probe import find_all, is_per_head, record

INDEX = "index.json"
TOKENS = "tokens"
# safetensors' dtype names, and the numpy dtype that maps each one's bytes (bf16 through its 16 raw bits).
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64}


class OutFolderError(ValueError):
    """The export's folder is refused: it holds something else, another export, or one that cannot be resumed."""


def windows(n_tokens: int, context: int) -> list[tuple[int, int]]:
    """(begin, end) of consecutive windows of `context` tokens covering [0, n_tokens); the last may be shorter."""
    if context < 1:
        raise ValueError(f"context must be 1 or more, got {context}")
    return [(begin, min(begin + context, n_tokens)) for begin in range(0, n_tokens, context)]


def point_names(model: Bloom, patterns: Sequence[str]) -> list[str]:
    """The points the patterns name, in the model's order; attention probabilities and scores are refused."""
    names = find_all(model, patterns)
    for name in names:
        if name.endswith(("self_attention.probs", "self_attention.scores")):
            named_by = next((p for p in patterns if name in find_all(model, [p])), name)
            by = "" if named_by == name else f" (of the pattern {named_by!r})"
            raise ValueError(f"point {name}{by}: attention over keys is (B, nh, T, S), not one row per token; name "
                             "points with one, e.g. h.*, h.*.resid_mid, h.*.mlp.act, h.*.self_attention.context "
                             "(bloom.record keeps the attention)")  # fmt: skip
    return names


def _rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A recorded tensor as one row per token: (B, T, D) -> (B·T, D); (B, nh, T, hd) -> (B·T, nh·hd)."""
    if tensor.ndim == 4 and is_per_head(name):
        tensor = tensor.transpose(1, 2).flatten(2)  # (B, T, nh·hd)
    if tensor.ndim != 3:
        raise ValueError(f"point {name}: shape {tuple(tensor.shape)}, expected (batch, tokens, features)")
    return tensor.flatten(0, 1)  # (B·T, D)


def _header(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """A safetensors header for one tensor (8-byte length, then JSON padded to a multiple of 8)."""
    size = int(np.prod(shape)) * dtype.itemsize
    entry = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, size]}
    text = json.dumps({key: entry}).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _settings(model: Bloom, model_name: str, token_ids: torch.Tensor, points: list[str], context: int) -> dict:
    dtype = model.ln_f.weight.dtype  # the activations' (the embedding may be int8)
    return _run_settings(model_name, token_ids, points, context) | {
        "weights": "int8" if any(t.dtype == torch.int8 for t in model.buffers()) else SAFETENSORS_DTYPES[dtype],
        "dtype": SAFETENSORS_DTYPES[dtype],
    }


def _run_settings(model_name: str, token_ids: torch.Tensor, points: list[str], context: int) -> dict:
    """The settings known before the weights are loaded."""
    return {
        "model": model_name,
        "tokens_sha256": hashlib.sha256(token_ids.numpy().tobytes()).hexdigest(),
        "n_tokens": len(token_ids),
        "points": points,
        "context": context,
    }


def check_folder(out: Path, model_name: str, token_ids: Sequence[int], points: list[str], context: int) -> None:
    """Refuse, before the model is loaded, a folder that `export` would refuse whatever the weights' dtype: one
    not empty and without an index, or holding another export, or this text's export complete, or one that another
    export is writing into now. `points` are the names `point_names` gives."""
    out, token_ids = Path(out), torch.as_tensor(token_ids, dtype=torch.int64).flatten()
    settings = _run_settings(model_name, token_ids, points, context)
    if out.is_dir():
        with _only_writer(out):  # a lock taken and let go: another export writing there now is refused
            pass
    if not (out / INDEX).is_file():
        _refuse_foreign(out)
        return
    index = _read_index(out)
    _refuse_other_export(out, index, settings)
    _refuse_complete(out, index, settings)


def _refuse_foreign(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise OutFolderError(f"{out} is not empty and holds no {INDEX}: choose an empty or new folder")


def _refuse_complete(out: Path, index: dict, settings: dict) -> None:
    if index["tokens_done"] == settings["n_tokens"]:
        theirs = index.get("settings") or {}
        kinds = f"{theirs.get('dtype')} activations, {theirs.get('weights')} weights"
        raise OutFolderError(f"{out} already holds a complete export of this text, points and context ({kinds}); "
                             "delete it to write it again")  # fmt: skip


def _refuse_other_export(out: Path, index: dict, settings: dict) -> None:
    """Refuse an index whose export differs from `settings` in any of their keys."""
    theirs = index.get("settings") or {}
    differ = ", ".join(
        "text" if key == "tokens_sha256" else f"{key} ({theirs.get(key)!r} there, {settings[key]!r} now)"
        for key in settings
        if theirs.get(key) != settings[key]
    )
    if differ:
        raise OutFolderError(
            f"{out} holds an export that differs in its {differ} ({out / INDEX}); choose another --out"
        )


def _write_index(out: Path, index: dict) -> None:
    text = json.dumps(index, indent=2)
    write_whole(out / INDEX, lambda partial: partial.write_text(text))  # a reader sees the old index or the new one


def _read_index(folder: Path) -> dict:
    if not (folder / INDEX).is_file():
        raise FileNotFoundError(f"{folder}: no {INDEX}, so not a folder written by bloom activations")
    try:
        index = read_json(folder / INDEX)
    except ValueError as error:  # not JSON: a refusal of the folder as the others are
        raise OutFolderError(str(error)) from None
    shapes = {"settings": dict, "widths": dict, "files": dict, "tokens_done": int}
    if not isinstance(index, dict) or any(not isinstance(index.get(key), kind) for key, kind in shapes.items()):
        raise OutFolderError(f"{folder / INDEX}: not an index written by bloom activations")
    return index


@contextmanager
def _only_writer(out: Path) -> Iterator[None]:
    """Hold `out` for this export: a second export into it meanwhile is refused (an advisory lock on the folder,
    released when the process ends, however it ends)."""
    folder = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutFolderError(f"{out}: another export is writing into it now") from None
        yield
    finally:
        os.close(folder)


def _check_files(out: Path, widths: dict[str, int], n_tokens: int, dtype: torch.dtype) -> None:
    """Before resuming: every file is one this export made, its header and length as written."""
    shapes = {TOKENS: (torch.int64, (n_tokens,))} | {name: (dtype, (n_tokens, w)) for name, w in widths.items()}
    for name, (kind, shape) in shapes.items():
        path, header = out / f"{name}.safetensors", _header(name, kind, shape)
        length = len(header) + math.prod(shape) * kind.itemsize
        try:
            with open(path, "rb") as f:
                same = f.read(len(header)) == header and os.fstat(f.fileno()).st_size == length
        except OSError as error:
            raise OutFolderError(
                f"{out}: cannot resume: {path}: {error.strerror}; delete {out} to start again"
            ) from None
        if not same:
            raise OutFolderError(f"{out}: cannot resume: {path} is not the file this export wrote (changed or cut "
                                 f"short); delete {out} to start again")  # fmt: skip


def _start(out: Path, settings: dict, widths: dict[str, int], token_ids: torch.Tensor, dtype: torch.dtype) -> int:
    """Prepare `out` and return the number of tokens already written (0 for a new export)."""
    if (out / INDEX).is_file():
        index = _read_index(out)
        _refuse_other_export(out, index, settings)
        _refuse_complete(out, index, settings)
        if not 0 <= index["tokens_done"] < settings["n_tokens"]:
            raise OutFolderError(f"{out / INDEX}: not an index written by bloom activations")
        if index["tokens_done"]:
            _check_files(out, widths, len(token_ids), dtype)
            return index["tokens_done"]
    else:  # the index first: a run stopped before its files below are made makes them again when started again
        _refuse_foreign(out)
        files = {name: f"{name}.safetensors" for name in [TOKENS, *widths]}
        _write_index(out, {"settings": settings, "widths": widths, "files": files, "tokens_done": 0})
    with naming(out / f"{TOKENS}.safetensors"), open(out / f"{TOKENS}.safetensors", "wb") as f:
        f.write(_header(TOKENS, torch.int64, (len(token_ids),)))
        f.write(token_ids.numpy().tobytes())
    for name, width in widths.items():
        header = _header(name, dtype, (len(token_ids), width))
        with naming(out / f"{name}.safetensors"), open(out / f"{name}.safetensors", "wb") as f:
            f.write(header)
            f.truncate(len(header) + len(token_ids) * width * dtype.itemsize)  # sparse until written
    return 0


@torch.inference_mode()
def export(
    model: Bloom,
    token_ids: Sequence[int] | torch.Tensor,
    points: Sequence[str],
    out: Path,
    *,
    context: int,
    batch_size: int = 4,
    model_name: str = "",
    progress: bool = False,
) -> Path:
    """Write every token's activation row at each point into the folder `out`; returns `out`.

    token_ids: the text's ids (N,). model_name: what the index records as the model (the command passes
    --model's folder as an absolute path, or the repo id and --revision). A folder holding a half-written export
    of the same settings (model_name, int8 or float weights, token ids, points, context, dtype) is resumed,
    whatever the batch size; any other non-empty folder is refused.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
    token_ids = torch.as_tensor(token_ids, dtype=torch.int64).flatten()
    if len(token_ids) == 0:
        raise ValueError("there are no tokens to export")
    out = Path(out)
    names = point_names(model, points)
    n_windows = -(-len(token_ids) // context)
    check_attention_fits(model, min(batch_size, n_windows), min(context, len(token_ids)))
    device, dtype = model.ln_f.weight.device, model.ln_f.weight.dtype  # (the embedding may be int8)
    with record(model, *names) as seen:  # one token, to learn each point's width before writing anything
        model.hidden(token_ids[:1, None].to(device))
    widths = {name: _rows(name, seen[name]).shape[1] for name in names}
    settings = _settings(model, model_name, token_ids, names, context)
    out.mkdir(parents=True, exist_ok=True)
    with _only_writer(out):
        done = _start(out, settings, widths, token_ids, dtype)
        headers = {name: len(_header(name, dtype, (len(token_ids), widths[name]))) for name in names}
        index = _read_index(out)

        todo = [w for w in windows(len(token_ids), context) if w[0] >= done]
        with ExitStack() as stack:
            files = {name: stack.enter_context(open(out / f"{name}.safetensors", "r+b")) for name in names}
            with tqdm(total=len(token_ids), initial=done, desc="Exporting", unit="token", unit_scale=True,
                      disable=not progress) as bar:  # fmt: skip
                while todo:
                    length = todo[0][1] - todo[0][0]  # windows of one length per batch: no padding
                    batch = [w for w in todo[:batch_size] if w[1] - w[0] == length]
                    todo = todo[len(batch) :]
                    ids = torch.stack([token_ids[begin:end] for begin, end in batch]).to(device)  # (B, T)
                    begin, end = batch[0][0], batch[-1][1]
                    offsets = {name: headers[name] + begin * widths[name] * dtype.itemsize for name in names}
                    _write_batch(model, ids, files, offsets, dtype)
                    index["tokens_done"] = end
                    _write_index(out, index)  # only after the rows are on disk
                    bar.update(end - begin)
    return out


def _write_batch(
    model: Bloom, ids: torch.Tensor, files: dict[str, BinaryIO], offsets: dict[str, int], dtype: torch.dtype
) -> None:
    """Run one batch of windows (B, T) and write each point's rows (B·T, D) into its file at its offset, synced.
    A function of its own, so that none of the batch's tensors outlives it among the next batch's, whose memory the
    C heap then reuses (bloom.heap; the last point's rows, alive until the next batch's were made, let the peak grow
    with the corpus)."""
    with record(model, *offsets) as seen:
        model.hidden(ids)
    for name, offset in offsets.items():
        rows = _rows(name, seen[name]).cpu().contiguous()  # (B·T, D), the batch's tokens in order
        data = rows.view(torch.int16) if dtype == torch.bfloat16 else rows  # numpy has no bf16
        f = files[name]
        with naming(f.name):
            f.seek(offset)
            f.write(data.numpy())  # written from the tensor's memory, no copy
            f.flush()
            os.fsync(f.fileno())


def _map(path: Path) -> torch.Tensor:
    """The single tensor of a safetensors file, memory-mapped (copy on write: edits never reach the file)."""
    tensors, data_start = safetensors_header(path)
    (entry,) = tensors.values()
    shape, dtype = tuple(entry["shape"]), NUMPY_DTYPES[entry["dtype"]]
    array = np.memmap(path, dtype=dtype, mode="c", offset=data_start, shape=shape)
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if entry["dtype"] == "BF16" else tensor


def load(folder: Path, point: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N,) int64, activations (N, D)) of one point of a finished export, memory-mapped, in text order."""
    folder = Path(folder)
    index = _read_index(folder)
    n_tokens = index["settings"]["n_tokens"]
    if index["tokens_done"] != n_tokens:
        raise ValueError(f"{folder}: the export stopped at token {index['tokens_done']} of {n_tokens}; "
                         "run the same bloom activations command again to finish it")  # fmt: skip
    if point not in index["widths"]:
        raise KeyError(f"{folder} has no point {point!r}; it has: {', '.join(index['widths'])}")
    return _map(folder / index["files"][TOKENS]), _map(folder / index["files"][point])

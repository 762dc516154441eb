"""Load a published BLOOM checkpoint (folder or hub repo id) into `bloom.model.Bloom`.

What the published files look like:
- `config.json`, and the weights as one `model.safetensors`, or shards listed by `model.safetensors.index.json`
  (file names are read from its weight_map; the 176B model spells them `model_000NN-of-00072.safetensors`). A shard
  name must be a plain file name of the folder; where the file links to is not judged, since a huggingface cache
  links every file of a snapshot to a blob outside it.
- Keys are the module names of `Bloom` (`h.0.mlp.dense_h_to_4h.weight`), with no prefix in the bigscience repos
  and with `transformer.` in checkpoints saved from transformers' BloomForCausalLM.
- No lm_head: it is the word embedding. A stored `lm_head.weight` is skipped.

Every header is read and checked before any tensor is, first against config.json's sizes (before a model of
that size is built), then key by key against the model: a bad checkpoint raises before anything is loaded.
The model is built on the meta device and each tensor is read once, cast and moved, then assigned, so loading
holds a single copy of the weights: kept in the stored dtype on the CPU, the weights are the memory-mapped
file itself (copy-on-write); cast, moved to a GPU or quantized to int8, they are converted a chunk of rows at
a time, and a quantized model's few float tensors (LayerNorms, biases) are read into memory of their own, so
that it keeps no view of the file.
"""

import json
import math
import mmap
import pickle
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub.utils import tqdm
from safetensors import SafetensorError, safe_open

from bloom.checkpoints.hub import incomplete_cache, resolve_folder
from bloom.config import BloomConfig, read_json
from bloom.heap import keep_freed_memory, release_freed_memory
from bloom.model import Bloom
from bloom.scale.parallel import split_heads
from bloom.scale.quantize import Int8Embedding, Int8Linear, quantize_int8, quantize_rows

PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip
READ_CHUNK_BYTES = 16 * 2**20  # converted or moved a chunk at a time
# quantized a chunk of rows at a time, sized by quantize_rows' float32 copy: bloom-560m's int8 load peaks at
# 1.04x its int8 weights with 4 MB, 1.13x with 16 MB (and loads no slower)
QUANTIZE_CHUNK_BYTES = 4 * 2**20
_BLOCK_KEY = re.compile(r"h\.([0-9]+)\.")  # a block's tensor: h.3.mlp.dense_4h_to_h.weight
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`torch.bfloat16`, "bf16" or "bfloat16" -> torch.bfloat16; the same for fp32 and fp16."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or the torch dtypes")


def load_pretrained(
    path_or_repo_id: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
    quantize: str | None = None,
    tensor_parallel: bool = False,
) -> Bloom:
    """Load a BLOOM checkpoint and return the model in eval mode.

    path_or_repo_id: a folder with config.json and the weights, or a hub repo id such as
        "bigscience/bloom-560m" (the local huggingface cache is tried first, then only config.json and the
        safetensors files are downloaded).
    dtype: the model's dtype ("fp32", "bf16", "fp16" or a torch dtype); default: the stored dtype of the
        word embedding.
    revision, cache_dir: for hub repo ids (a branch, tag or commit; the huggingface cache folder).
    allow_pickle: also accept `pytorch_model*.bin` files, read with torch.load(weights_only=True). Off by
        default: safetensors files never run code, pickles might.
    progress: show a progress bar over the tensors while they are read.
    quantize: "int8" stores the word embedding (also the LM head) and the blocks' linear weights as int8
        with a scale per row (`bloom.scale.quantize`): half their bf16 bytes. Each weight is quantized as soon as
        it is read, so the unquantized weights are never all in memory at once.
    tensor_parallel: split every block's heads and MLP over the processes of the initialised
        torch.distributed group (`bloom.scale.parallel`); each process reads only its slices of the files.

    Once the weights are in memory, glibc's malloc is told to keep what tensors free for the next ones
    (`bloom.heap.keep_freed_memory`), which each forward pass hands back to the OS when it ends: a pass then no
    longer pages its large tensors in afresh in every layer (1.2-2.3x faster on the CPU).
    """
    target_dtype = None if dtype is None else parse_dtype(dtype)
    try:
        device = check_device(device)
    except ValueError as error:
        raise ValueError(f"device {error}") from None
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantize={quantize!r}; the one scheme is 'int8'")
    config_path, files = _checkpoint(path_or_repo_id, revision, cache_dir, allow_pickle)
    config = BloomConfig.from_json(config_path)
    with ExitStack() as stack:
        readers = [stack.enter_context(_open(path)) for path in files]
        _check_config_fits(config_path, config, readers)  # before a model of the config's size is built
        with torch.device("meta"):
            model = Bloom(config)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # as stored
        parts = {}  # model key -> (dim, rank, world size) of the slice this process reads
        if tensor_parallel:
            if not dist.is_initialized():
                raise ValueError("tensor_parallel=True needs torch.distributed initialised first (run under torchrun)")
            with torch.device("meta"):
                parts = split_heads(model, dist.get_rank(), dist.get_world_size())
        if quantize == "int8":
            quantize_int8(model)  # on meta: the int8 layers, empty
        int8_modules = (Int8Linear, Int8Embedding)
        int8_weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, int8_modules)}
        sources = _check_keys(readers, expected)  # model key -> (reader, stored key)
        embedding_reader, embedding_key = sources["word_embeddings.weight"]
        target_dtype = target_dtype or embedding_reader.dtype(embedding_key)
        state = {}
        for name, (reader, key) in tqdm(sources.items(), desc="Loading weights", unit="tensor", disable=not progress):
            if name in int8_weights:
                scale_name = name.removesuffix("weight") + "scale"
                state[name], state[scale_name] = reader.read_int8(key, target_dtype, device, parts.get(name))
                # each weight's float copy, freed, handed back: glibc keeps freed blocks of up to 32 MB, and the
                # int8 weights allocated in between stop its heap from shrinking (loading bloom-560m in int8
                # peaked at +1.14 GB instead of +0.35 GB)
                release_freed_memory()
            else:
                # quantized, the model keeps no view of the file: its few float tensors are copied
                state[name] = reader.read(key, target_dtype, device, parts.get(name), copy=quantize is not None)
    model.load_state_dict(state, assign=True, strict=True)
    keep_freed_memory()  # from now on, the tensors of a forward pass reuse what the pass freed (bloom.heap)
    return model.eval()


def load_config(
    path_or_repo_id: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> BloomConfig:
    """The checkpoint's config.json, from the folder or repo `load_pretrained` would read, so that what depends on
    the model's shape can be checked before its weights are loaded: a repo not in the cache gets its config.json
    downloaded, and nothing else."""
    folder = resolve_folder(
        path_or_repo_id,
        patterns=["config.json"],
        is_complete=lambda f: (f / "config.json").is_file(),
        revision=revision,
        cache_dir=cache_dir,
    )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json{incomplete_cache(path_or_repo_id)}")
    return BloomConfig.from_json(folder / "config.json")


def _checkpoint(
    path_or_repo_id: str | Path, revision: str | None, cache_dir: str | Path | None, allow_pickle: bool
) -> tuple[Path, list[Path]]:
    """The config.json and the weight files of a checkpoint, in a local folder or the huggingface cache (fetched
    there if it is a repo id not in the cache)."""
    folder = resolve_folder(
        path_or_repo_id,
        patterns=checkpoint_patterns(allow_pickle),
        is_complete=lambda f: is_complete(f, allow_pickle),
        revision=revision,
        cache_dir=cache_dir,
    )
    config_path = folder / "config.json"
    if not config_path.is_file():  # the file that is missing, and, in a partial cached snapshot, where it comes from
        raise FileNotFoundError(f"{folder}: no config.json{incomplete_cache(path_or_repo_id)}")
    try:
        return config_path, weight_files(folder, allow_pickle)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}{incomplete_cache(path_or_repo_id)}") from None


def check_device(device: str | torch.device) -> torch.device:
    """The device cpu (cpu:0), cuda or cuda:N, where this machine has it; a ValueError saying why not otherwise."""
    text = str(device)
    match = re.fullmatch(r"cpu(?::0)?|cuda(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"{text!r}: not a device bloom runs on; use cpu, cuda or cuda:N")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{text}: CUDA is not available on this machine")
        n = torch.cuda.device_count()
        if int(match[1] or 0) >= n:
            raise ValueError(f"{text}: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
    return torch.device(text)


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder: the single file, or else the shards named by an index (the single
    file first, as transformers looks: an index left beside it from an earlier sharded save is not read)."""
    kinds = [("model.safetensors.index.json", "model.safetensors")]
    if allow_pickle:
        kinds.append(("pytorch_model.bin.index.json", "pytorch_model.bin"))
    for index_name, single_name in kinds:
        if (folder / single_name).is_file():
            return [folder / single_name]
        if (folder / index_name).is_file():
            return _shards_from_index(folder, folder / index_name)
    if not allow_pickle and any(folder.glob("pytorch_model*.bin")):
        raise FileNotFoundError(
            f"{folder}: only pickle weights (pytorch_model*.bin) found; convert them to safetensors, or from Python "
            "pass load_pretrained(..., allow_pickle=True) to read them with torch.load(weights_only=True) (the "
            "command line never unpickles)"
        )
    raise FileNotFoundError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")


def checkpoint_patterns(allow_pickle: bool = False) -> list[str]:
    """The files of a hub repo that loading needs (a repo also holds .bin, flax and onnx copies)."""
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
    return patterns + ["*.bin", "*.bin.index.json"] if allow_pickle else patterns


def is_complete(folder: Path, allow_pickle: bool = False) -> bool:
    """Whether a (cached) folder holds the config and every weight file."""
    try:
        return (folder / "config.json").is_file() and all(p.is_file() for p in weight_files(folder, allow_pickle))
    except (FileNotFoundError, ValueError):
        return False


def _shards_from_index(folder: Path, index_path: Path) -> list[Path]:
    """The shard files an index names, in order. A shard name must be a plain file name: what it resolves to
    is not judged, because a huggingface cache links every file of a snapshot to a blob outside its folder."""
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: its weight_map should map tensor names to shard files, got {weight_map!r:.80}")
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise ValueError(f"{index_path}: weight_map[{key!r}] should be a shard file name, got {name!r:.80}")
    shards = []
    for name in dict.fromkeys(weight_map.values()):  # unique, in order
        if name in ("", ".", "..") or any(character in name for character in "/\\:\0"):
            raise ValueError(
                f"{index_path}: shard {name!r:.80} is not a plain file name; shards must be files of the checkpoint "
                "folder, named without folders, '..', drive letters or separators"
            )
        path = folder / name
        try:
            found = path.is_file()
        except OSError:  # e.g. a name too long for the file system
            found = False
        if not found:
            raise FileNotFoundError(f"{index_path}: shard {name!r:.80} is missing from {folder}")
        shards.append(path)
    return shards


def safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensors (name -> dtype, shape, data_offsets; no __metadata__) and where their data
    begins: after the 8-byte header length and the JSON header."""
    with open(path, "rb") as file:
        header_bytes = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_bytes))
    return {key: info for key, info in header.items() if key != "__metadata__"}, 8 + header_bytes


def data_offsets(path: Path) -> dict[str, int]:
    """Where each tensor's bytes start in a safetensors file, at its data_offsets (which safe_open has already
    checked against the file)."""
    tensors, data_start = safetensors_header(path)
    return {key: data_start + info["data_offsets"][0] for key, info in tensors.items()}


class _SafetensorsReader:
    def __init__(self, path: Path, handle) -> None:
        self.path, self._handle = path, handle
        self.shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # from the header
        self._offsets = data_offsets(path)  # where each tensor's bytes start in the file
        self._mapped: mmap.mmap | None = None  # the file, mapped by `row_chunks` when first asked

    def dtype(self, key: str) -> torch.dtype:
        code = self._handle.get_slice(key).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} is stored as {code}, not a float type BLOOM uses")
        return _SAFETENSORS_DTYPES[code]

    def read(
        self,
        key: str,
        dtype: torch.dtype,
        device: torch.device,
        part: tuple[int, int, int] | None = None,
        copy: bool = False,
    ) -> torch.Tensor:
        """The tensor in `dtype` on `device`, holding one copy of it in memory at any time.

        Whole, in the stored dtype, on the CPU: a copy-on-write view of the memory-mapped file, read lazily, or
        with `copy`, read into memory without mapping the file (a view's pages, and the neighbours the kernel maps
        with them, stay resident as long as the view lives: 188 MB of bloom-560m's file for its 0.6 MB of
        LayerNorms and biases in one int8 load). Otherwise filled from `row_chunks`. With `part` = (dim, index,
        count), only slice `index` of `count` equal slices along `dim` is read.
        """
        if part is None and dtype == self.dtype(key) and device.type == "cpu":
            return self._read_copy(key) if copy else self._handle.get_tensor(key)
        out = torch.empty(self._shape(key, part), dtype=dtype, device=device)
        for rows, chunk in self.row_chunks(key, dtype, device, part):
            out[rows] = chunk  # converted to `dtype` as it is copied: one pass over the chunk
        return out

    def _read_copy(self, key: str) -> torch.Tensor:
        """The whole tensor as stored, read from the file into memory of its own (through the page cache only)."""
        shape, stored = self.shapes[key], self.dtype(key)
        data = bytearray(math.prod(shape) * stored.itemsize)
        with open(self.path, "rb") as file:
            file.seek(self._offsets[key])
            if file.readinto(data) != len(data):
                raise ValueError(f"{self.path}: tensor {key!r} runs past the end of the file")
        return torch.frombuffer(data, dtype=stored).view(shape) if data else torch.empty(shape, dtype=stored)

    def read_int8(
        self, key: str, dtype: torch.dtype, device: torch.device, part: tuple[int, int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A weight (or its slice `part`) quantized by `quantize_rows` a chunk of rows at a time: (out, in) int8
        and (out,) scales. No whole copy of it in `dtype` is ever made."""
        shape = self._shape(key, part)
        q = torch.empty(shape, dtype=torch.int8, device=device)
        scale = torch.empty(shape[0], dtype=dtype, device=device)
        for rows, chunk in self.row_chunks(key, torch.float32, device, part, QUANTIZE_CHUNK_BYTES):
            q[rows], scale[rows] = quantize_rows(chunk.to(dtype))  # one scale per row: chunks quantize alike
        return q, scale

    def row_chunks(
        self,
        key: str,
        dtype: torch.dtype,
        device: torch.device,
        part: tuple[int, int, int] | None = None,
        chunk_bytes: int = READ_CHUNK_BYTES,
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, chunk): the tensor or its slice `part`, a `chunk_bytes` chunk (of rows in `dtype`) at a
        time, on `device` in the stored dtype, for the caller to convert as it copies. On the CPU a chunk is a view
        of the file's mapping, so the caller converts straight from the file's pages (one pass, no copy in between),
        and once it has, the pages are given back (madvise): they never pile up next to the copies."""
        shape = self._shape(key, part)
        rows, columns = slice(0, shape[0]), slice(None)
        if part is not None:
            dim, index, _ = part
            piece = slice(index * shape[dim], (index + 1) * shape[dim])
            rows, columns = (piece, columns) if dim == 0 else (rows, piece)
        stored_shape, stored = self.shapes[key], self.dtype(key)
        stored_row_bytes = math.prod(stored_shape[1:]) * stored.itemsize
        rows_per_chunk = max(1, chunk_bytes // max(1, math.prod(shape[1:]) * dtype.itemsize))
        file_bytes = torch.frombuffer(self._mapping(), dtype=torch.uint8)  # the whole file: nothing read yet
        for start in range(rows.start, rows.stop, rows_per_chunk):
            stop = min(start + rows_per_chunk, rows.stop)
            begin, end = self._offsets[key] + start * stored_row_bytes, self._offsets[key] + stop * stored_row_bytes
            raw = file_bytes[begin:end]
            if begin % stored.itemsize:  # a header whose length leaves the data unaligned: copy this chunk's bytes
                raw = raw.clone()
            mapped = raw.view(stored).view(stop - start, *stored_shape[1:])
            chunk = mapped if len(shape) == 1 else mapped[:, columns]
            yield slice(start - rows.start, stop - rows.start), chunk.to(device=device)
            del raw, mapped, chunk  # the caller has copied it: give its pages back (the file stays in the page cache)
            page = mmap.PAGESIZE
            self._mapping().madvise(mmap.MADV_DONTNEED, begin // page * page, end - begin // page * page)

    def _mapping(self) -> mmap.mmap:
        """The whole file, mapped privately once (read where asked, never written)."""
        if self._mapped is None:
            with open(self.path, "rb") as file:
                self._mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mapped

    def _shape(self, key: str, part: tuple[int, int, int] | None) -> list[int]:
        """The stored shape, or the shape of slice `part` = (dim, index, count)."""
        shape = list(self._handle.get_slice(key).get_shape())
        if part is not None:
            dim, _, count = part
            shape[dim] //= count
        return shape


class _PickleReader:
    def __init__(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ValueError(f"{path}: expected a dict mapping tensor names to tensors")
        self.path, self._state = path, state
        self.shapes = {key: tuple(t.shape) for key, t in state.items()}

    def dtype(self, key: str) -> torch.dtype:
        dtype = self._state[key].dtype
        if dtype not in _SAFETENSORS_DTYPES.values():
            raise ValueError(f"{self.path}: tensor {key!r} is stored as {dtype}, not a float type BLOOM uses")
        return dtype

    def read(
        self,
        key: str,
        dtype: torch.dtype,
        device: torch.device,
        part: tuple[int, int, int] | None = None,
        copy: bool = False,
    ) -> torch.Tensor:
        tensor = self._state[key]
        if part is not None:
            dim, index, count = part
            size = tensor.shape[dim] // count
            tensor = tensor.narrow(dim, index * size, size)
        return tensor.to(device=device, dtype=dtype, copy=copy)

    def read_int8(
        self, key: str, dtype: torch.dtype, device: torch.device, part: tuple[int, int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows(self.read(key, dtype, device, part))


class _open:
    """Context manager over one weight file that names the file in every error it raises."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stack = ExitStack()

    def __enter__(self) -> _SafetensorsReader | _PickleReader:
        try:
            open(self.path, "rb").close()  # the system's reason first (safetensors says "not found" for a permission)
            if self.path.suffix == ".bin":
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                return _PickleReader(self.path, state)
            handle = self._stack.enter_context(safe_open(self.path, framework="pt"))
            return _SafetensorsReader(self.path, handle)
        except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as error:
            self._stack.close()
            raise ValueError(f"{self.path}: cannot read weights ({error})") from None

    def __exit__(self, *exc_info) -> None:
        self._stack.close()


def _check_config_fits(config_path: Path, config: BloomConfig, readers: list) -> None:
    """Refuse a config.json whose sizes the stored shapes contradict, naming the key, before anything is built
    (a wrong n_layer would otherwise build a million blocks before the keys are compared)."""
    blocks = set()
    for reader in readers:
        for key, shape in reader.shapes.items():
            name = key.removeprefix(PREFIX)
            if name == "word_embeddings.weight" and shape != (config.vocab_size, config.hidden_size):
                raise ValueError(
                    f"{config_path}: vocab_size {config.vocab_size} and hidden_size {config.hidden_size} do not fit "
                    f"{key} in {reader.path.name}, of shape {shape}"
                )
            if match := _BLOCK_KEY.match(name):
                blocks.add(int(match[1]))
    numbered_in_order = blocks == set(range(len(blocks)))
    # Blocks h.0 .. h.k-1 make the config wrong; oddly numbered ones are the weights' fault, for the key check to
    # name, unless the config asks for more blocks than are stored.
    if len(blocks) != config.n_layer and (numbered_in_order or config.n_layer > len(blocks)):
        listed = ", ".join(f"h.{i}" for i in sorted(blocks)[:8]) + (", ..." if len(blocks) > 8 else "")
        numbers = "" if numbered_in_order else f" ({listed})"
        raise ValueError(
            f"{config_path}: n_layer is {config.n_layer}, but the weights hold {len(blocks)} blocks{numbers}"
        )


def _check_keys(readers: list, expected: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Map each model key to (reader, stored key), or raise naming every missing, unexpected or misshapen key."""
    sources: dict[str, tuple] = {}
    unexpected, misshapen, duplicated = [], [], []
    misshapen_names = set()
    for reader in readers:
        for key, shape in reader.shapes.items():
            name = key.removeprefix(PREFIX)
            if name == LM_HEAD:
                if shape != expected["word_embeddings.weight"]:
                    misshapen.append(
                        f"{key} in {reader.path.name}: expected {expected['word_embeddings.weight']}, found {shape}"
                    )
                continue
            if name not in expected:
                unexpected.append(f"{key} ({reader.path.name})")
            elif name in sources:
                duplicated.append(f"{name} (in {sources[name][0].path.name} and {reader.path.name})")
            elif shape != expected[name]:
                misshapen.append(f"{key} in {reader.path.name}: expected {expected[name]}, found {shape}")
                misshapen_names.add(name)
            else:
                sources[name] = (reader, key)
    missing = [name for name in expected if name not in sources and name not in misshapen_names]
    problems = [
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("keys with the wrong shape", misshapen),
        ("keys stored twice", duplicated),
    ]
    report = "; ".join(f"{what}: {', '.join(items)}" for what, items in problems if items)
    if report:
        folder = readers[0].path.parent
        raise ValueError(f"checkpoint in {folder} does not fit the model of its config.json: {report}")
    for reader, key in sources.values():
        reader.dtype(key)  # raises on a non-float tensor before anything is read
    return sources

"""BLOOM's tokenizer, read from a checkpoint's tokenizer.json with the `tokenizers` library.

tokenizer.json holds the whole pipeline (a regex pre-tokenizer, byte-level BPE, a
byte-level decoder), so this module only adds what a generation loop needs: plain
encode/decode, left-padded batches, and the special token ids. BLOOM's
post-processor adds no BOS or EOS, and "</s>" written in the text encodes to the
EOS id. Batches are always padded on the left, as BLOOM's checkpoints ask
(`padding_side: "left"`), so that every prompt ends at the last position.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from bloom.checkpoints.hub import incomplete_cache, resolve_folder
from bloom.config import read_json

TOKENIZER_FILE = "tokenizer.json"
# Read in this order; a later file overrides an earlier one, as in transformers.
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# BLOOM's own special tokens, used when no config file names them.
BLOOM_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


class BloomTokenizer:
    """A `tokenizers.Tokenizer` plus the special token ids of its checkpoint."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id

    def check_fits(self, embedding_rows: int) -> None:
        """Refuse a model whose embedding has fewer rows than this tokenizer has ids (`model.config.vocab_size`).

        BLOOM's embedding has more rows than its tokenizer has ids (250880 vs 250680); fewer would make some
        token ids index past the embedding.
        """
        ids = max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        if ids > embedding_rows:
            raise ValueError(
                f"the tokenizer has ids up to {ids - 1}, but the model's embedding has only {embedding_rows} rows "
                "(vocab_size in its config.json): the tokenizer does not belong to this model"
            )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with whatever the post-processor adds (nothing, for BLOOM)."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a string, got {type(text).__name__} (batch_encode takes a list)")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D sequence of ids."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                raise ValueError(f"decode expects a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        negative = [i for i in ids if i < 0]  # ids past the vocabulary decode to "", as in transformers
        if negative:
            raise ValueError(f"decode takes token ids, integers >= 0, got {negative[0]}")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode `texts` into left-padded `input_ids` and `attention_mask`, both (B, T) int64.

        The mask is 1 on real tokens and 0 on padding; T is the longest encoding.
        """
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise ValueError(f"batch_encode takes a list of strings, got {type(texts).__name__}")
        if not texts:
            raise ValueError("batch_encode needs at least one text")
        if self.pad_token_id is None:
            raise ValueError("batch_encode needs a pad token, and this tokenizer has none")
        return left_pad([encoding.ids for encoding in self.tokenizer.encode_batch(texts)], self.pad_token_id)


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids -> left-padded `input_ids` and `attention_mask`, both (B, T) int64, T the longest row.

    The mask is 1 on real tokens and 0 on padding; an empty row stays all padding.
    """
    T = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.int64)  # (B, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.int64)  # (B, T)
    for b, row in enumerate(rows):
        if row:
            input_ids[b, -len(row) :] = torch.tensor(row, dtype=torch.int64)
            attention_mask[b, -len(row) :] = 1
    return input_ids, attention_mask


def load_tokenizer(
    path_or_repo_id: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> BloomTokenizer:
    """Load a BLOOM tokenizer from a tokenizer.json file, a folder holding one, or a hub repo id.

    The special tokens come from tokenizer_config.json / special_tokens_map.json
    next to tokenizer.json when they name them, and otherwise from BLOOM's
    convention (<s>, </s>, <pad>, <unk>) for those of its tokens in the vocabulary.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_file():
        if revision is not None:
            raise ValueError(f"revision={revision!r} only applies to hub repo ids, not to the local file {path}")
        file = path
    else:
        folder = resolve_folder(
            path_or_repo_id,
            patterns=[TOKENIZER_FILE, *CONFIG_FILES],
            is_complete=lambda folder: (folder / TOKENIZER_FILE).is_file(),
            revision=revision,
            cache_dir=cache_dir,
        )
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{folder}: no {TOKENIZER_FILE} in this folder{incomplete_cache(path_or_repo_id)}")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers reports every parse error as a bare Exception
        raise ValueError(f"{file}: not a valid {TOKENIZER_FILE} ({err})") from err
    ids = special_token_ids(tokenizer, file.parent)
    return BloomTokenizer(tokenizer, **{f"{key}_id": token_id for key, token_id in ids.items()})


def special_token_ids(tokenizer: Tokenizer, folder: Path) -> dict[str, int | None]:
    """Map "bos_token", "eos_token", "pad_token" and "unk_token" to their ids (None when there is none).

    A token named in a config file must be in the vocabulary; an explicit null
    in a config file means the checkpoint has no such token.
    """
    named: dict[str, tuple[str | None, Path]] = {}  # key -> (token, the file that named it)
    for name in CONFIG_FILES:
        file = folder / name
        if not file.is_file():
            continue
        config = read_json(file)
        if not isinstance(config, dict):
            raise ValueError(f"{file}: expected a JSON object of settings, found a {type(config).__name__}")
        for key in BLOOM_SPECIAL_TOKENS:
            if key in config:
                named[key] = (_token_content(config[key], file, key), file)

    ids: dict[str, int | None] = {}
    for key, bloom_token in BLOOM_SPECIAL_TOKENS.items():
        if key not in named:
            ids[key] = tokenizer.token_to_id(bloom_token)
            continue
        token, file = named[key]
        ids[key] = None if token is None else tokenizer.token_to_id(token)
        if token is not None and ids[key] is None:
            raise ValueError(f"{file}: {key} {token!r} is not in the tokenizer's vocabulary")
    return ids


def _token_content(value: Any, file: Path, key: str) -> str | None:
    """The token a config file names: a plain string, an AddedToken dict {"content": ..., ...}, or null."""
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if value is None or isinstance(value, str):
        return value
    raise ValueError(
        f'{file}: {key} should be a token string, an object with a "content" string, or null; got {value!r:.60}'
    )

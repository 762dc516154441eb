"""A huggingface hub cache laid out on disk as huggingface_hub lays it out, so the hub path runs without a network.

What `hf_hub_download` leaves behind (huggingface_hub/file_download.py), built here with its own helpers:

    models--bigscience--bloom-tiny/
        blobs/<sha256 of the file>     an LFS file (weights, tokenizer.json), named by its X-Linked-Etag
        blobs/<git blob sha1>          a small file kept in git (config.json), named by its ETag
        refs/main                      the commit hash that main points to
        snapshots/<commit>/model_00001-of-00003.safetensors -> ../../blobs/<sha256>   (relative symlinks)

With `shared_store=True`, as a Xet download does when the cache holds huggingface_hub's shared blob store, each
LFS blob is itself a relative symlink into `<cache>/blobs/<2 hex>/<xet hash>`, outside the repo's folder.
"""

import hashlib
from pathlib import Path

from huggingface_hub.file_download import (
    _cache_commit_hash_for_specific_revision,
    _create_symlink,
    _get_pointer_path,
    repo_folder_name,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin")
LFS_NAMES = ("tokenizer.json",)  # over the hub's 10 MB limit for plain git files in the bigscience repos


def is_lfs(file: Path) -> bool:
    return file.suffix in LFS_SUFFIXES or file.name in LFS_NAMES


def etag(file: Path) -> str:
    """The name the hub gives the file's blob: sha256 of the contents for LFS files, else the git blob sha1."""
    data = file.read_bytes()
    if is_lfs(file):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def put_in_hub_cache(
    folder: Path, cache_dir: Path, repo_id: str, commit: str = COMMIT, *, shared_store: bool = False
) -> str:
    """Store the files of `folder` in `cache_dir` as the snapshot of `repo_id` at `commit`, which refs/main names."""
    storage = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = storage / "blobs" / etag(file)
        pointer = Path(_get_pointer_path(str(storage), commit, file.relative_to(folder).as_posix()))
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():  # files with the same contents share one blob
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(file.read_bytes())
            if shared_store and is_lfs(file):
                from huggingface_hub.utils._shared_blobs import publish_blob_to_shared_store  # recent versions only

                xet_hash = hashlib.sha256(b"xet" + blob.read_bytes()).hexdigest()  # stands in for the Xet hash
                shared = publish_blob_to_shared_store(
                    blob_path=str(blob), xet_hash=xet_hash, cache_dir=cache_dir, expected_size=blob.stat().st_size
                )
                assert shared and blob.is_symlink(), "huggingface_hub did not move the blob to its shared store"
        _create_symlink(str(blob), str(pointer), new_blob=False)
        assert pointer.is_symlink() and not pointer.readlink().is_absolute(), "expected a relative symlink"
    _cache_commit_hash_for_specific_revision(str(storage), "main", commit)
    return commit

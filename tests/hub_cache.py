"""A huggingface hub cache laid out on disk, so the hub code path runs for real without a network."""

import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(folder: Path, cache_dir: Path, repo_id: str, commit: str = COMMIT) -> str:
    """Copy `folder` into `cache_dir` as the snapshot of `repo_id` at `commit`, which refs/main points to."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit

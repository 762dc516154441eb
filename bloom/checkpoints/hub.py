"""Turn "a local folder or a hub repo id" into a local folder.

A path that exists is used as it is. Anything else is taken as a hub repo id
("bigscience/bloom-560m") and fetched with huggingface_hub: the local cache is
tried first, and only the files matching `patterns` are downloaded.
"""

from collections.abc import Callable
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

OFFLINE = "HF_HUB_OFFLINE is set, so the hub was not asked"  # why a cached copy was not completed


def resolve_folder(
    path_or_repo_id: str | Path,
    *,
    patterns: list[str],
    is_complete: Callable[[Path], bool],
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Return a local folder holding the files of a checkpoint.

    `patterns` are the glob patterns of the files worth downloading, and
    `is_complete(folder)` says whether a cached snapshot already has all the
    files needed (a sharded checkpoint may be only partly cached).
    """
    path = Path(path_or_repo_id).expanduser()  # ~/folder, as a shell would read it
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path}: expected a checkpoint folder, found a file")
        if revision is not None:
            raise ValueError(f"revision={revision!r} only applies to hub repo ids, not to the local folder {path}")
        return path
    repo_id = str(path_or_repo_id)
    if not is_repo_id(repo_id):
        raise FileNotFoundError(f"{repo_id}: no such folder, and not a hub repo id of the form 'owner/name'")
    try:
        cached = Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns, local_files_only=True
            )
        )
        if is_complete(cached):
            return cached
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:  # a mistyped local path lands here too
        network = network_error(error)
        why = (
            f"the huggingface hub is unreachable ({type(network).__name__}: {network})"
            if network is not None
            else f"the hub did not provide it ({' '.join(str(error).split())})"  # on one line
        )
        at = "" if revision is None else f" at revision {revision!r}"
        where = "neither a local folder nor in the huggingface cache"
        raise FileNotFoundError(f"{repo_id}{at}: {where}, and {why}") from None


def incomplete_cache(path_or_repo_id: str | Path) -> str:
    """What to add to "this file is missing" when the folder is the huggingface cache's copy of a repo (not a
    local folder): that an interrupted download leaves a copy so, and how to complete it. "" for a local folder."""
    if Path(path_or_repo_id).expanduser().exists():
        return ""
    offline = f" ({OFFLINE})" if hub_constants.HF_HUB_OFFLINE else ""
    return (f": the huggingface cache's copy of {path_or_repo_id} lacks it{offline}; an interrupted download leaves "
            f"a copy so, and `bloom download {path_or_repo_id}`, where the hub can be reached, completes it if the "
            "repo has the file")  # fmt: skip


def is_repo_id(name: str) -> bool:
    """Whether `name` is a hub repo id, owner/name, as huggingface_hub checks it ("folder/" is not one)."""
    if name.count("/") != 1 or name.startswith((".", "/")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def network_error(error: BaseException) -> BaseException | None:
    """The failed connection (or huggingface_hub's offline mode) behind `error`, if there is one."""
    names = {"ConnectionError", "TransportError", "TimeoutError", "OfflineModeIsEnabled"}
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        from_a_network_library = type(error).__module__ != "builtins"  # not a pipe or a local socket
        if from_a_network_library and names & {cls.__name__ for cls in type(error).__mro__}:
            return error
        error = error.__cause__ or error.__context__
    return None

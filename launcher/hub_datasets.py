"""Hugging Face datasets in `data.datasets[].source` (hf://datasets/ORG/NAME[@REVISION][/GLOB]),
resolved once on the submitting machine for the job that reads the raw images (`cache`).

Like model ids (launcher/hub_models.py): the files the URL's glob selects are looked up in the
Hugging Face cache the profile names (`hf_home`); when every one is there, no network is used.
Otherwise the repository's file list is fetched and exactly the matching files are downloaded
(huggingface_hub's snapshot_download, with its progress bars). The frozen recipe then holds the
local snapshot path with the same glob, and the job runs with HF_HUB_OFFLINE=1.

Other jobs keep the URL: `train` reads the latent cache, `preflight` and `sweep` no images. A
token comes from this shell's HF_TOKEN (read by huggingface_hub, never written).
"""

from __future__ import annotations

import re
from pathlib import Path

from launcher.hub_access import HubRequest, hub_cache_dir, hub_endpoint, hub_errors
from launcher.hub_models import Resolved
from sd35dist.config.hf_datasets import HubDataset, is_hf_dataset_url, matching_files, parse_hf_dataset_url
from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import Recipe

JOBS_READING_IMAGES = ("cache",)
REPO_TYPE = "dataset"
SHOWN_FILES = 5


def resolve_hub_datasets(recipe: Recipe, job: str, hf_home: str | None, recipe_file: str, *,
                         download: bool = True) -> Resolved:
    """The recipe with each hf:// dataset source the local snapshot's path + glob, for a job that reads images.

    `download` False (a dry run): the cache alone is looked at; a dataset not in it keeps its URL and
    a note says what submit will download.
    """
    hub_indices = [i for i, d in enumerate(recipe.data.datasets) if is_hf_dataset_url(d.source)]
    if job not in JOBS_READING_IMAGES or not hub_indices:
        return Resolved(recipe, {})
    cache = hub_cache_dir(hf_home)
    datasets, notes = list(recipe.data.datasets), []
    for index in hub_indices:
        hub = parse_hf_dataset_url(datasets[index].source)
        request = HubRequest(recipe_file, f"data.datasets[{index}].source", hub.repo, hub.revision,
                             "dataset repository", cache,
                             f"hf download {hub.repo} --repo-type dataset --include '{hub.pattern}'"
                             + (f" --revision {hub.revision}" if hub.revision else ""),
                             "name local parquet files as the source")
        snapshot = cached_snapshot(hub, cache)
        if snapshot is None and not download:
            notes.append(f"note: data.datasets[{index}].source {hub.url()} is not in the Hugging Face cache {cache}: "
                         f"submit downloads its files matching {hub.pattern} there first")
            continue
        snapshot = snapshot or _download(hub, cache, request)
        datasets[index] = datasets[index].model_copy(update={"source": f"{snapshot}/{hub.pattern}"})
    data = recipe.data.model_copy(update={"datasets": datasets})
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent)}
    return Resolved(recipe.model_copy(update={"data": data}), env, "\n".join(notes) or None)


def cached_snapshot(hub: HubDataset, cache: Path) -> Path | None:
    """The cached snapshot when it holds every file of the glob (no network), else None.

    The repository's file list at that commit, which snapshot_download keeps in the cache, says which
    files the glob selects; a snapshot cached without that list counts when the glob matches a file in it."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        tree = [f.path for f in get_cached_repo_tree(hub.repo, repo_type=REPO_TYPE, revision=hub.revision,
                                                     cache_dir=cache)]
        names = matching_files(hub.pattern, tree)
        if not names:
            return None
        patterns = [_fnmatch_literal(name) for name in names]
    except CachedRepoTreeNotFoundError:
        names, patterns = [], [hub.pattern]
    try:
        snapshot = Path(snapshot_download(hub.repo, repo_type=REPO_TYPE, revision=hub.revision, cache_dir=cache,
                                          allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, IncompleteSnapshotError, FileNotFoundError):
        return None
    if not names:
        present = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        names = matching_files(hub.pattern, present)
    return snapshot if names and all((snapshot / name).is_file() for name in names) else None


def _fnmatch_literal(name: str) -> str:
    """`name` as an allow_patterns entry that matches it alone (huggingface_hub matches with fnmatch)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _download(hub: HubDataset, cache: Path, request: HubRequest) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    with hub_errors(request):
        info = HfApi(endpoint=hub_endpoint()).dataset_info(hub.repo, revision=hub.revision)
        names = matching_files(hub.pattern, [s.rfilename for s in info.siblings or []])
        if not names:
            parquet = [s.rfilename for s in info.siblings or [] if s.rfilename.endswith((".parquet", ".parq"))]
            shown = ", ".join(parquet[:SHOWN_FILES]) + (" …" if len(parquet) > SHOWN_FILES else "")
            raise ConfigError(request.recipe_file, request.key, f"no file of {hub} matches {hub.pattern} "
                              + (f"(its parquet files: {shown})" if parquet else
                                 "and it holds no parquet files: its parquet conversion is "
                                 f"hf://datasets/{hub.repo}@refs/convert/parquet/default/SPLIT/*.parquet"))
        cache.mkdir(parents=True, exist_ok=True)
        print(f"sd35dist: downloading {len(names)} file{'s' if len(names) > 1 else ''} of {hub} matching "
              f"{hub.pattern} into {cache}", flush=True)
        return Path(snapshot_download(hub.repo, repo_type=REPO_TYPE, revision=hub.revision, cache_dir=cache,
                                      allow_patterns=[_fnmatch_literal(n) for n in names], endpoint=hub_endpoint()))
    raise AssertionError("unreachable: hub_errors raises")

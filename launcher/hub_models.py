"""Hugging Face ids in `model.pretrained`, resolved once on the submitting machine.

`org/name[@revision]` is looked up in the Hugging Face cache the profile names (`hf_home`, on
storage every node sees; default: this shell's HF_HOME, else ~/.cache/huggingface): when the
files the job opens are there, no network is used. Otherwise only those files are downloaded
(train: transformer and scheduler; cache: VAE, text encoders, tokenizers; sweep: VAE and
scheduler), with huggingface_hub's progress bars. The frozen recipe then holds the snapshot's
local path, and the job runs with HF_HUB_OFFLINE=1: ranks never reach the network.

A token is read by huggingface_hub from this shell's HF_TOKEN (or `hf auth login`'s file) and
is never written anywhere. Every failure is one line naming what to do (exit status 2).
No torch here: huggingface_hub only, imported when an id is met.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.hub_access import HubRequest, hub_cache_dir, hub_endpoint, hub_errors
from sd35dist.config.hub_ids import HubId, hub_id_of
from sd35dist.config.loading import ConfigError
from sd35dist.config.model_layout import MODEL_INDEX, job_parts, missing_in_model_dir
from sd35dist.config.recipe import Recipe

JOB_FOLDERS = {
    "train": ("transformer", "scheduler"),
    "cache": ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"),
    "sweep": ("vae", "scheduler"),
}
"""What each job opens of the base model; other jobs (preflight) open none of it."""


def allow_patterns(job: str, transformer_subfolder: str = "transformer") -> list[str]:
    """The files of the repository `job` needs (huggingface_hub's allow_patterns)."""
    folders = [transformer_subfolder if f == "transformer" else f for f in JOB_FOLDERS.get(job, ())]
    return [MODEL_INDEX, *(f"{folder}/*" for folder in folders)] if folders else []


@dataclass(frozen=True)
class Resolved:
    recipe: Recipe
    """The recipe with model.pretrained the local snapshot (unchanged when it was no hub id)."""
    env: dict[str, str]
    """What the job environment needs for it: HF_HUB_OFFLINE=1 and HF_HOME."""
    note: str | None = None


def resolve_hub_model(recipe: Recipe, job: str, hf_home: str | None, recipe_file: str, *,
                      download: bool = True) -> Resolved:
    """`model.pretrained` as a local snapshot of the hub cache when it is a hub id.

    `download` False (a dry run): the cache alone is looked at; when the files are not there the
    recipe keeps the id and the note says what submit will download.
    """
    hub_id = hub_id_of(recipe.model.pretrained, Path.cwd())
    if hub_id is None:
        return Resolved(recipe, {})
    cache = hub_cache_dir(hf_home)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent)}
    patterns = allow_patterns(job, recipe.model.transformer_subfolder)
    parts = job_parts(job, recipe.model.transformer_subfolder)
    cached = _cached_snapshot(hub_id, cache, patterns, parts)
    if cached is None and patterns and not download:
        return Resolved(recipe, env, f"note: model.pretrained {hub_id} is not in the Hugging Face cache {cache}: "
                                     f"submit downloads {', '.join(patterns)} there first")
    if cached is None and not patterns:
        # A job that opens none of the model: nothing to fetch; ranks are told no path.
        return Resolved(recipe, env)
    snapshot = cached or _download(hub_id, cache, patterns, recipe_file)
    problem = missing_in_model_dir(snapshot, parts)
    if problem:
        raise ConfigError(recipe_file, "model.pretrained",
                          f"{hub_id} (snapshot {snapshot}) {problem}: is it an SD3 diffusers repository?")
    model = recipe.model.model_copy(update={"pretrained": str(snapshot)})
    return Resolved(recipe.model_copy(update={"model": model}), env)


def _cached_snapshot(hub_id: HubId, cache: Path, patterns: list[str], parts: dict) -> Path | None:
    """The snapshot in the cache when it holds everything the job opens (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(hub_id.repo, revision=hub_id.revision, cache_dir=cache,
                                      allow_patterns=patterns or None, local_files_only=True))
    except (LocalEntryNotFoundError, IncompleteSnapshotError, FileNotFoundError):
        return None
    return path if missing_in_model_dir(path, parts) is None else None


def _download(hub_id: HubId, cache: Path, patterns: list[str], recipe_file: str) -> Path:
    from huggingface_hub import snapshot_download

    request = HubRequest(recipe_file, "model.pretrained", hub_id.repo, hub_id.revision, "repository", cache,
                         f"hf download {hub_id.repo}", "set model.pretrained to a local diffusers directory")
    with hub_errors(request):
        cache.mkdir(parents=True, exist_ok=True)
        print(f"sd35dist: downloading {', '.join(patterns)} of {hub_id} into {cache}", flush=True)
        return Path(snapshot_download(hub_id.repo, revision=hub_id.revision, cache_dir=cache, allow_patterns=patterns,
                                      endpoint=hub_endpoint()))
    raise AssertionError("unreachable: hub_errors raises")

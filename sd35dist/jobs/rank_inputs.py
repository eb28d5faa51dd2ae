"""What a rank checks before it joins the process group: the recipe, and the inputs it names.

Every rank reads the same frozen recipe and sees the same files, so a mistake found here is
found alike on every rank, before minutes of model loading; it is a ConfigError naming the
recipe file and the key (`error: recipe.yaml: model.pretrained: … does not exist`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sd35dist.config.hf_datasets import is_hf_dataset_url
from sd35dist.config.hub_ids import hub_id_of
from sd35dist.config.input_checks import check_recipe_inputs
from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import DataSection, ModelSection, Recipe, load_recipe, resolve_paths
from sd35dist.models.sd3_components import ModelDirectoryIncomplete, check_model_dir


def load_rank_recipe(path: Path) -> Recipe:
    """The recipe with relative paths made absolute against the working directory (a prompts
    file against the recipe's directory); a frozen recipe's paths are absolute already."""
    return resolve_paths(load_recipe(path), Path.cwd(), path.resolve().parent)


def check_rank_inputs(recipe: Recipe, job: str, source: str, run_dir: Path | None = None) -> None:
    """What submit checks (config/input_checks.py), again on the rank for scripts submitted with plain
    sbatch: prompts file, output directory, sizes and LoRA targets against the model's config; and
    the run directory the job writes its logs and reports into."""
    check_recipe_inputs(recipe, job, source, visible_everywhere=True)
    if run_dir is not None:
        for candidate in (run_dir, *run_dir.parents):
            if candidate.exists():
                if not candidate.is_dir():
                    raise ConfigError("--run-dir", str(run_dir), f"{candidate} is a file: name a directory")
                break


def train_model_parts(model: ModelSection) -> tuple[str, ...]:
    """What training reads of model.pretrained: the scheduler and the transformer."""
    custom = model.transformer_subfolder != "transformer"  # not a layout check_model_dir knows
    return ("scheduler",) if custom else ("transformer", "scheduler")


def check_pretrained(recipe: Recipe, source: str, parts: tuple[str, ...]) -> None:
    """model.pretrained holds `parts` (subfolders with their config and weights) in SD3's layout."""
    if hub_id_of(recipe.model.pretrained) is not None:
        raise ConfigError(source, "model.pretrained", f"{recipe.model.pretrained} is a Hugging Face id: ranks run offline "
                                                      "on a local snapshot; start the job with `sd35dist submit`, which "
                                                      "downloads it once, or name a local diffusers directory")
    try:
        check_model_dir(Path(recipe.model.pretrained), parts)
    except ModelDirectoryIncomplete as err:
        raise ConfigError(source, "model.pretrained", str(err)) from None


def check_dataset_sources(data: DataSection, source: str) -> None:
    """Every data.datasets[i].source names what its format reads: a folder a directory that can be listed
    (local path or fsspec URL); webdataset and parquet at least one file, the first one there (and a
    parquet file with the columns the dataset names). The rest is checked by the rank that reads it."""
    from sd35dist.data.input_shards import DatasetInputError, expand_source

    for index, dataset in enumerate(data.datasets):
        if is_hf_dataset_url(dataset.source):
            raise ConfigError(source, f"data.datasets[{index}].source",
                              f"{dataset.source} is a Hugging Face dataset: ranks run offline on a local snapshot; "
                              "start the job with `sd35dist submit`, which downloads its files once, or name local "
                              "parquet files")
        if dataset.format == "folder":
            if not _is_directory(dataset.source, data.storage_options):
                raise ConfigError(source, f"data.datasets[{index}].source",
                                  f"{dataset.source} is not a directory (dataset {dataset.id})")
            continue
        try:
            files = expand_source(dataset, data.storage_options)
            if not files:
                raise DatasetInputError(dataset.id, "source", f"{dataset.source} names no {dataset.format} files")
            if dataset.format == "parquet":
                from sd35dist.data.parquet_source import row_group_sizes

                row_group_sizes(dataset, files[0], data.storage_options)
            elif not _is_file(files[0], data.storage_options):
                raise DatasetInputError(dataset.id, "source", f"{files[0]} does not exist")
        except DatasetInputError as err:
            raise ConfigError(source, f"data.datasets[{index}].{err.key}", f"dataset {dataset.id}: {err.message}") from None


def _is_file(url: str, storage_options: dict[str, Any]) -> bool:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        return bool(fs.isfile(path))
    except (FileNotFoundError, PermissionError):
        return False


def _is_directory(url: str, storage_options: dict[str, Any]) -> bool:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        return bool(fs.isdir(root.rstrip("/") or root))
    except (FileNotFoundError, PermissionError):
        return False

"""WebDataset tar shards → images with their captions, read with webdataset's own tar iterators.

A sample is the tar members that share a key (`000123.jpg`, `000123.txt`, `000123.json`, as
img2dataset writes them; webdataset's rule: the key ends at the first dot of the file name).
The image is the first member with an image extension; the caption is the `.txt`, else the
`.json`'s "caption" (caption_strategy textfile). The shard is read in one pass into memory:
one tar at a time per rank.
"""

from __future__ import annotations

import json
import tarfile
from typing import Any

import fsspec

from sd35dist.config.recipe import DatasetSection
from sd35dist.data.image_source import Rejected, SourceImage
from sd35dist.data.input_shards import DatasetInputError, InputShard

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
"""Member extensions taken as the sample's image, in this order of preference."""
CAPTION_ORIGIN = "caption (.txt, or .json with a caption)"


def _caption(sample: dict[str, Any]) -> str | None:
    if isinstance(sample.get("txt"), bytes):
        return sample["txt"].decode("utf-8", errors="replace")
    if isinstance(sample.get("json"), bytes):
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return None
        caption = meta.get("caption") if isinstance(meta, dict) else None
        return caption if isinstance(caption, str) else None
    return None


def tar_samples(url: str, storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Every sample of one tar, in the tar's order (webdataset's group_by_keys over tar_file_expander)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with fsspec.open(url, "rb", **storage_options) as stream:
        return list(group_by_keys(tar_file_expander([{"url": url, "stream": stream}])))


def read_tar_shard(shard: InputShard, dataset: DatasetSection,
                   storage_options: dict[str, Any]) -> tuple[list[SourceImage], list[Rejected]]:
    """The shard's images (bytes and captions in memory) and the samples that have no image."""
    try:
        samples = tar_samples(shard.url, storage_options)
    except FileNotFoundError:
        raise DatasetInputError(dataset.id, "source", f"{shard.url} does not exist") from None
    except (tarfile.TarError, EOFError) as err:
        reason = " ".join(str(err.args[0] if err.args else err).split("@")[0].split())
        raise DatasetInputError(dataset.id, "source", f"{shard.url} is not a readable tar file ({reason})") from None
    except ValueError as err:  # webdataset: the same key and extension twice
        raise DatasetInputError(dataset.id, "source", f"{shard.url}: {str(err.args[0]).split(' @ ')[0]}") from None
    images: list[SourceImage] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for sample in samples:
        key = sample["__key__"]
        path = f"{shard.name}/{key}"
        if path in seen:  # webdataset groups consecutive members: a key may come back later in the tar
            rejected.append(Rejected(dataset.id, path, "the key occurs twice in the tar (its members are not "
                                                       "consecutive); the first sample was kept"))
            continue
        seen.add(path)
        found = next((ext for ext in IMAGE_KEYS if isinstance(sample.get(ext), bytes)), None)
        if found is None:
            members = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
            rejected.append(Rejected(dataset.id, path, f"no image in the sample (it holds {members})"))
            continue
        images.append(SourceImage(dataset.id, path, None, None, data=sample[found], caption=_caption(sample),
                                  caption_origin=CAPTION_ORIGIN))
    return images, rejected

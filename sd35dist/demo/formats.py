"""The generated demo images as the formats large datasets come in: WebDataset tars and parquet.

The images and captions of demo/dataset.py for the same seed, encoded once, so a folder, a
tar and a parquet file written from one `demo_samples` hold identical bytes; written with
webdataset's TarWriter and pyarrow: what img2dataset and Hugging Face datasets' parquet exports look like
(`KEY.png` + `KEY.txt` + `KEY.json` in a tar; `image`, `caption`, `width`, `height` columns).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from sd35dist.demo.dataset import DEMO_SIZES, demo_caption, demo_image


class DemoSample(NamedTuple):
    key: str
    png: bytes
    caption: str
    size: tuple[int, int]


def demo_samples(count: int, seed: int = 0, trigger: str = "k4s4",
                 sizes: Sequence[tuple[int, int]] = DEMO_SIZES) -> Iterator[DemoSample]:
    """The demo dataset's images and captions, in its order (the folder's img_NNNN.png)."""
    rng = random.Random(seed)
    for index in range(count):
        size = sizes[index % len(sizes)]
        buffer = io.BytesIO()
        demo_image(rng, size).save(buffer, format="PNG")
        yield DemoSample(f"img_{index:06d}", buffer.getvalue(), demo_caption(rng, trigger), size)


def write_folder(directory: Path, samples: Iterator[DemoSample]) -> int:
    """NAME.png + NAME.txt files; returns how many."""
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for sample in samples:
        (directory / f"{sample.key}.png").write_bytes(sample.png)
        (directory / f"{sample.key}.txt").write_text(sample.caption + "\n")
        count += 1
    return count


def write_webdataset(directory: Path, samples: Iterator[DemoSample], per_shard: int) -> list[Path]:
    """Tar shards `shard-NNNNN.tar` of `per_shard` samples each: KEY.png, KEY.txt, KEY.json."""
    from webdataset import TarWriter

    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    for index, sample in enumerate(samples):
        if index % per_shard == 0:
            if writer is not None:
                writer.close()
            paths.append(directory / f"shard-{len(paths):05d}.tar")
            writer = TarWriter(str(paths[-1]))
        meta = {"caption": sample.caption, "width": sample.size[0], "height": sample.size[1]}
        writer.write({"__key__": sample.key, "png": sample.png, "txt": sample.caption, "json": json.dumps(meta)})
    if writer is not None:
        writer.close()
    return paths


def write_parquet(directory: Path, samples: Iterator[DemoSample], rows_per_group: int, groups_per_file: int) -> list[Path]:
    """Parquet files `part-NNNNN.parquet` with columns image (PNG bytes), caption, width, height."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.string()),
                        ("width", pa.int32()), ("height", pa.int32())])
    paths: list[Path] = []
    writer = None
    rows: list[DemoSample] = []
    groups = 0

    def flush() -> None:
        nonlocal writer, groups
        if not rows:
            return
        if writer is None or groups == groups_per_file:
            if writer is not None:
                writer.close()
            paths.append(directory / f"part-{len(paths):05d}.parquet")
            writer = pq.ParquetWriter(str(paths[-1]), schema)
            groups = 0
        table = pa.table({"key": [r.key for r in rows], "image": [r.png for r in rows],
                          "caption": [r.caption for r in rows], "width": [r.size[0] for r in rows],
                          "height": [r.size[1] for r in rows]}, schema=schema)
        writer.write_table(table, row_group_size=len(rows))
        groups += 1
        rows.clear()

    for sample in samples:
        rows.append(sample)
        if len(rows) == rows_per_group:
            flush()
    flush()
    if writer is not None:
        writer.close()
    return paths

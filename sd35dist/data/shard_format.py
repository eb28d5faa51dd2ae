"""One cache shard: a safetensors container of many samples of one aspect bucket (no pickle).

Tensors are stacked along a leading sample axis:
  latent_mean, latent_std   [N, C, H/8, W/8]  VAE latent distribution (see vae_encoding.py)
  prompt_embeds             [N, 77 + T5 tokens, joint dim]
  pooled_prompt_embeds      [N, pooled dim]
  original_size             [N, 2] int32 (width, height) before resize
  crop_top_left             [N, 2] int32 (top, left) in the resized image
The header metadata holds the format, the bucket and one JSON record per sample
(key, dataset, image, repeat, caption), so a shard describes itself.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence

import torch
from safetensors.torch import save as save_safetensors

SHARD_FORMAT = "sd35dist-shard/1"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOAT_KEYS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds")


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    key: str
    """Unique within the cache: <dataset>/<image path>#<repeat>."""
    dataset: str
    image: str
    repeat: int
    caption: str


@dataclasses.dataclass
class CachedSample:
    record: SampleRecord
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def encode_shard(samples: Sequence[CachedSample], bucket: str, dtype: str) -> bytes:
    """Serialize samples (all of one bucket) to safetensors bytes; same input → same bytes."""
    if not samples:
        raise ValueError("a shard needs at least one sample")
    cast = DTYPES[dtype]
    tensors = {key: torch.stack([getattr(s, key) for s in samples]).to(cast).contiguous() for key in FLOAT_KEYS}
    tensors["original_size"] = torch.tensor([s.original_size for s in samples], dtype=torch.int32)
    tensors["crop_top_left"] = torch.tensor([s.crop_top_left for s in samples], dtype=torch.int32)
    metadata = {
        "format": SHARD_FORMAT,
        "bucket": bucket,
        "dtype": dtype,
        "samples": json.dumps([dataclasses.asdict(s.record) for s in samples], ensure_ascii=False),
    }
    return save_canonical(tensors, metadata)


def save_canonical(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the JSON header's keys sorted.

    The safetensors writer emits its header from a hash map, so key order (and the file's
    bytes) can change between runs; sorting makes equal content give equal bytes and sha256.
    """
    blob = save_safetensors(tensors, metadata=metadata)
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data section to 8 bytes
    return len(text).to_bytes(8, "little") + text + blob[8 + header_len :]


def shard_metadata(data: bytes) -> dict[str, str]:
    """The header metadata of a shard, without loading its tensors."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__", {})


def decode_shard(data: bytes) -> tuple[dict[str, torch.Tensor], list[SampleRecord], str]:
    """(tensors, sample records, bucket) of a shard's bytes."""
    metadata = shard_metadata(data)
    if metadata.get("format") != SHARD_FORMAT:
        raise ValueError(f"not an sd35dist shard (format {metadata.get('format')!r})")
    records = [SampleRecord(**r) for r in json.loads(metadata["samples"])]
    return tensors_view(data), records, metadata["bucket"]


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I32": torch.int32,
                      "I64": torch.int64, "U8": torch.uint8}


def tensors_view(data: bytes | bytearray) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes as views into `data`, without copying.

    The stream decodes every byte it reads; safetensors' own loader copies each tensor once
    more, which on a busy node costs as much CPU as the network. The views keep `data` alive.
    """
    buffer = memoryview(data)
    header_len = int.from_bytes(buffer[:8], "little")
    header = json.loads(bytes(buffer[8 : 8 + header_len]))
    base = 8 + header_len
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")  # views are never written
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            flat = torch.frombuffer(buffer, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start) \
                if end > start else torch.empty(0, dtype=dtype)
            out[name] = flat.view(info["shape"])
    return out


def bytes_per_sample(latent_shape: Sequence[int], text_shape: Sequence[int], pooled_dim: int, dtype: str) -> int:
    """Tensor bytes one sample takes in a shard (latent mean + std, prompt and pooled embeddings)."""
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    latent = 1
    for side in latent_shape:
        latent *= side
    text = 1
    for side in text_shape:
        text *= side
    return (2 * latent + text + pooled_dim) * itemsize + 2 * 2 * 4


def samples_per_shard(target_bytes: float, per_sample: int) -> int:
    """Samples in each full shard so it stays near the target size (at least one)."""
    return max(1, int(target_bytes // per_sample))

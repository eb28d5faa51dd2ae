"""Load SD3.5's frozen parts (tokenizers, CLIP-L, CLIP-G, T5, VAE) from a local diffusers directory.

The directory has SD3.5 Large's layout (model_index.json plus one subfolder per component).
Everything is read with `from_pretrained(local_dir, local_files_only=True)`: nothing is ever
fetched, and the tiny test model goes through the very same calls as the 8B checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sd35dist.config.model_layout import REQUIRED_FILES, WEIGHT_SUFFIXES, WEIGHTED

TEXT_ENCODER_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
# What a latent cache depends on: change any of these and cached latents/embeddings are stale.
CACHE_INPUT_PARTS = ("vae", *TEXT_ENCODER_PARTS)

# Bytes read from each end of a weight file: detects a swapped fine-tune without hashing GBs.
FINGERPRINT_BYTES = 1 << 20


class ModelDirectoryIncomplete(FileNotFoundError):
    """The model directory lacks a component subfolder, its config or its weights."""


@dataclass(frozen=True)
class TextEncoders:
    """SD3's three text encoders with their tokenizers, frozen, in eval mode.

    clip_l = text_encoder/ + tokenizer/, clip_g = text_encoder_2/ + tokenizer_2/,
    t5 = text_encoder_3/ + tokenizer_3/ (the names diffusers' StableDiffusion3Pipeline uses).
    """

    clip_l_tokenizer: Any
    clip_l: torch.nn.Module
    clip_g_tokenizer: Any
    clip_g: torch.nn.Module
    t5_tokenizer: Any
    t5: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return self.clip_l.device


def check_model_dir(model_dir: Path, parts: tuple[str, ...] = tuple(REQUIRED_FILES)) -> None:
    """Raise ModelDirectoryIncomplete naming the first missing subfolder or file among `parts`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirectoryIncomplete(
            f"{model_dir} does not exist; expected a local diffusers directory with SD3.5 Large's layout"
        )
    if not (model_dir / "model_index.json").is_file():
        raise ModelDirectoryIncomplete(
            f"{model_dir}: no model_index.json; expected a local diffusers directory with SD3.5 Large's layout"
        )
    for part in parts:
        folder = model_dir / part
        if not folder.is_dir():
            raise ModelDirectoryIncomplete(f"{model_dir}: missing subfolder {part}/ (SD3.5 Large's layout has it)")
        if not (folder / REQUIRED_FILES[part]).is_file():
            raise ModelDirectoryIncomplete(f"{model_dir}: {part}/ has no {REQUIRED_FILES[part]}")
        if part in WEIGHTED:
            _check_weights_present(model_dir, part)


def load_text_encoders(model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TextEncoders:
    """The three tokenizers and text encoders of an SD3 directory, frozen, on `device` in `dtype`."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    model_dir = Path(model_dir)
    check_model_dir(model_dir, TEXT_ENCODER_PARTS)

    def tokenizer(cls, subfolder: str):
        return cls.from_pretrained(model_dir, subfolder=subfolder, local_files_only=True)

    def encoder(cls, subfolder: str):
        model = cls.from_pretrained(model_dir, subfolder=subfolder, dtype=dtype, local_files_only=True)
        return _frozen(model.to(device))

    return TextEncoders(
        clip_l_tokenizer=tokenizer(CLIPTokenizer, "tokenizer"),
        clip_l=encoder(CLIPTextModelWithProjection, "text_encoder"),
        clip_g_tokenizer=tokenizer(CLIPTokenizer, "tokenizer_2"),
        clip_g=encoder(CLIPTextModelWithProjection, "text_encoder_2"),
        t5_tokenizer=tokenizer(T5TokenizerFast, "tokenizer_3"),
        t5=encoder(T5EncoderModel, "text_encoder_3"),
    )


def load_vae(model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The AutoencoderKL of an SD3 directory, frozen, on `device` in `dtype`."""
    from diffusers import AutoencoderKL

    model_dir = Path(model_dir)
    check_model_dir(model_dir, ("vae",))
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=dtype, local_files_only=True)
    return _frozen(vae.to(device))


def encoder_identity(model_dir: Path) -> dict[str, dict[str, Any]]:
    """Which VAE, text encoders and tokenizers these are, cheaply, for a latent-cache manifest.

    Per subfolder: the library and class from model_index.json, the sha256 of its config file, and
    a weights fingerprint (sha256 over the index file, each weight file's name and size, and its
    first and last MiB) -- or, for a tokenizer, the sha256 of all its files, which are small.
    """
    model_dir = Path(model_dir)
    check_model_dir(model_dir, CACHE_INPUT_PARTS)
    model_index = json.loads((model_dir / "model_index.json").read_text())
    identity: dict[str, dict[str, Any]] = {}
    for part in CACHE_INPUT_PARTS:
        folder = model_dir / part
        library, class_name = model_index.get(part, [None, None])
        entry: dict[str, Any] = {
            "library": library,
            "class": class_name,
            "config_sha256": _sha256_file(folder / REQUIRED_FILES[part]),
        }
        if part in WEIGHTED:
            entry["weights_sha256"] = _weights_fingerprint(folder)
        else:
            entry["files_sha256"] = _files_sha256(folder)
        identity[part] = entry
    return identity


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _index_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.index.json"))


def _check_weights_present(model_dir: Path, part: str) -> None:
    folder = model_dir / part
    for index_file in _index_files(folder):
        shards = set(json.loads(index_file.read_text())["weight_map"].values())
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise ModelDirectoryIncomplete(f"{model_dir}: {part}/ lacks shard(s) {', '.join(missing)} named in {index_file.name}")
    if not _weight_files(folder):
        raise ModelDirectoryIncomplete(f"{model_dir}: {part}/ has no weights (*.safetensors)")


def _weights_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for index_file in _index_files(folder):
        digest.update(f"index {index_file.name} {_sha256_file(index_file)}\n".encode())
    for weight_file in _weight_files(folder):
        size = weight_file.stat().st_size
        digest.update(f"file {weight_file.name} {size}\n".encode())
        with weight_file.open("rb") as handle:
            digest.update(handle.read(FINGERPRINT_BYTES))
            if size > 2 * FINGERPRINT_BYTES:
                handle.seek(size - FINGERPRINT_BYTES)
                digest.update(handle.read(FINGERPRINT_BYTES))
            else:
                digest.update(handle.read())
    return digest.hexdigest()


def _files_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f"{path.name} {_sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

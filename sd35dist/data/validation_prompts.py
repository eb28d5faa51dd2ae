"""The validation prompts' text embeddings, stored with the cache so ranks never load text encoders.

`sd35dist cache` (or `sd35dist cache --validation-only`) encodes the recipe's validation
prompts and negative prompt once and writes them as one safetensors file next to the shards;
the manifest names the file (size, sha256) and a hash of the prompt list. Training, `sample`
and `sweep` read them back and refuse, in one line naming the command to run, when the
recipe's prompts are not the ones the cache holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
from safetensors.torch import load as load_safetensors

from sd35dist.config.loading import ConfigError
from sd35dist.config.validation_section import ValidationSection
from sd35dist.data.manifest import ShardEntry, ShardManifest, read_manifest, write_manifest
from sd35dist.data.storage import Store, sha256_hex

VALIDATION_PROMPTS_NAME = "validation_prompts.safetensors"


def prompts_hash(prompts: list[str], negative_prompt: str, max_sequence_length: int) -> str:
    """What the stored embeddings encode: the same prompts, negative prompt and T5 length hash equal."""
    canonical = json.dumps({"prompts": prompts, "negative_prompt": negative_prompt,
                            "max_sequence_length": max_sequence_length}, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class PromptEmbeddings:
    prompts: tuple[str, ...]
    prompt_embeds: torch.Tensor
    """[P, 77 + T5 tokens, d_T5], float32."""
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    """[1, 77 + T5 tokens, d_T5]: the negative prompt (the unconditional side of guidance)."""
    negative_pooled_prompt_embeds: torch.Tensor


def encode_validation_prompts(text_encoders, prompts: list[str], negative_prompt: str,
                              max_sequence_length: int) -> PromptEmbeddings:
    from sd35dist.models.prompt_encoding import encode_prompts

    embeds, pooled = encode_prompts(text_encoders, prompts, max_sequence_length)
    negative, negative_pooled = encode_prompts(text_encoders, [negative_prompt], max_sequence_length)
    return PromptEmbeddings(tuple(prompts), embeds.float().cpu(), pooled.float().cpu(),
                            negative.float().cpu(), negative_pooled.float().cpu())


def write_validation_prompts(store: Store, embeddings: PromptEmbeddings, negative_prompt: str,
                             max_sequence_length: int, dtype: str) -> tuple[ShardEntry, str]:
    """Write the embeddings file; returns its manifest entry and the prompt-list hash."""
    from sd35dist.data.shard_format import DTYPES, save_canonical

    tensors = {name: getattr(embeddings, name).to(DTYPES[dtype]).contiguous()
               for name in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                            "negative_pooled_prompt_embeds")}
    digest = prompts_hash(list(embeddings.prompts), negative_prompt, max_sequence_length)
    blob = save_canonical(tensors, {"format": "sd35dist-validation-prompts/1", "dtype": dtype,
                                    "prompts": json.dumps(list(embeddings.prompts), ensure_ascii=False),
                                    "negative_prompt": negative_prompt, "prompts_sha256": digest})
    store.write_bytes(VALIDATION_PROMPTS_NAME, blob)
    entry = ShardEntry(VALIDATION_PROMPTS_NAME, "", len(embeddings.prompts), len(blob), sha256_hex(blob), dtype)
    return entry, digest


def record_in_manifest(store: Store, entry: ShardEntry, digest: str) -> ShardManifest:
    """Point an existing manifest at freshly written validation embeddings (`cache --validation-only`)."""
    manifest = dataclasses.replace(read_manifest(store), validation_prompts=entry, validation_prompts_sha256=digest)
    write_manifest(store, manifest)
    return manifest


def read_validation_prompts(store: Store, manifest: ShardManifest, section: ValidationSection,
                            recipe_file: str) -> PromptEmbeddings:
    """The cached embeddings of the recipe's prompts; a stale or missing file is a one-line ConfigError."""
    prompts = section.prompt_list()
    fix = f"run `sd35dist cache --recipe {recipe_file} --validation-only` (or `sd35dist submit --job cache`)"
    if manifest.validation_prompts is None:
        raise ConfigError(recipe_file, "validation.prompts", f"the cache at {store.url} holds no validation prompts: {fix}")
    expected = prompts_hash(prompts, section.negative_prompt, manifest.max_sequence_length)
    if manifest.validation_prompts_sha256 != expected:
        raise ConfigError(recipe_file, "validation.prompts",
                          f"the prompts differ from those cached at {store.url}: {fix}")
    entry = manifest.validation_prompts
    blob = store.read_bytes(entry.path)
    if sha256_hex(blob) != entry.sha256:
        raise ConfigError(recipe_file, "validation.prompts", f"{store.url_of(entry.path)} is corrupt (sha256): {fix}")
    tensors = {k: v.float() for k, v in load_safetensors(blob).items()}
    return PromptEmbeddings(tuple(prompts), tensors["prompt_embeds"], tensors["pooled_prompt_embeds"],
                            tensors["negative_prompt_embeds"], tensors["negative_pooled_prompt_embeds"])
